//! The f64 oracle: plain, row-at-a-time loops that state the definitions directly.
//!
//! Inputs are `f32` like everywhere else in the crate; every intermediate value and every output
//! is `f64`, so the only rounding worth mentioning is that of the formulas themselves. The fast
//! CPU path and the GPU kernels are tested against these functions, which is why they favour
//! being obviously right over being quick.
//!
//! Per row `x` of length `C`, with `m = max_j x_j` and `S = sum_k exp(x_k - m)`:
//!
//! * `softmax_j = exp(x_j - m) / S`
//! * `log_softmax_j = (x_j - m) - ln(S)`
//!
//! A row that contains a NaN or `+inf`, or whose entries are all `-inf`, is *degenerate*: every
//! output that depends on it is NaN. In any other row a `-inf` entry has softmax exactly `0` and
//! log-softmax exactly `-inf`. These cases are decided by explicit tests, not left to arithmetic.

use crate::error::Result;
use crate::options::{CrossEntropyOptions, GradOutput, Reduction, Targets};
use crate::validate::{self, CrossEntropyTargets};

/// The result of a cross-entropy: the reduced loss and `dL/dlogits`.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyOutput<T> {
    /// `rows` values for [`Reduction::None`], else one.
    pub loss: Vec<T>,
    /// The gradient of the reduced loss, times the upstream gradient, shaped like the logits.
    pub grad: Vec<T>,
}

/// What a row's softmax needs: its maximum and `ln(S)`, or the fact that the row is degenerate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowStats {
    /// A NaN or `+inf` entry, or all entries `-inf`.
    Degenerate,
    /// `m = max_j x_j` (finite) and `ln(S)`, `S = sum_k exp(x_k - m)`.
    Finite { max: f64, log_sum: f64 },
}

impl RowStats {
    fn of(row: &[f64]) -> Self {
        if row.iter().any(|v| v.is_nan() || *v == f64::INFINITY) {
            return Self::Degenerate;
        }
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return Self::Degenerate;
        }
        let sum: f64 = row.iter().map(|&v| exp_shifted(v, max)).sum();
        Self::Finite {
            max,
            log_sum: sum.ln(),
        }
    }
}

/// `exp(v - max)` with a `-inf` entry mapped to exactly 0.
fn exp_shifted(v: f64, max: f64) -> f64 {
    if v == f64::NEG_INFINITY {
        0.0
    } else {
        (v - max).exp()
    }
}

/// `(v - max) - log_sum` with a `-inf` entry mapped to exactly `-inf`.
fn log_softmax_entry(v: f64, max: f64, log_sum: f64) -> f64 {
    if v == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        (v - max) - log_sum
    }
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Softmax of a non-degenerate row, or NaNs.
fn softmax_row(row: &[f64], out: &mut [f64]) {
    match RowStats::of(row) {
        RowStats::Degenerate => out.fill(f64::NAN),
        RowStats::Finite { max, log_sum } => {
            let sum = log_sum.exp();
            for (o, &v) in out.iter_mut().zip(row) {
                *o = exp_shifted(v, max) / sum;
            }
        }
    }
}

/// Row-wise `softmax_j = exp(x_j - m) / sum_k exp(x_k - m)` of a `rows x cols` batch.
pub fn softmax(x: &[f32], cols: usize) -> Result<Vec<f64>> {
    validate::batch_rows("x", x.len(), cols)?;
    let x = widen(x);
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        softmax_row(row, o);
    }
    Ok(out)
}

/// Row-wise `log_softmax_j = (x_j - m) - ln(sum_k exp(x_k - m))`, never `ln(softmax)`.
pub fn log_softmax(x: &[f32], cols: usize) -> Result<Vec<f64>> {
    validate::batch_rows("x", x.len(), cols)?;
    let x = widen(x);
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        match RowStats::of(row) {
            RowStats::Degenerate => o.fill(f64::NAN),
            RowStats::Finite { max, log_sum } => {
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = log_softmax_entry(v, max, log_sum);
                }
            }
        }
    }
    Ok(out)
}

fn check_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<()> {
    validate::batch_rows("y", y.len(), cols)?;
    validate::same_len("grad_output", y.len(), dy.len())
}

/// The gradient through softmax, given its output `y` and the upstream gradient `dy`:
/// `dx_j = y_j * (dy_j - sum_k dy_k * y_k)`.
pub fn softmax_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f64>> {
    check_backward(y, dy, cols)?;
    let mut out = vec![0.0; y.len()];
    for ((y, dy), o) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols))
    {
        let dot: f64 = y
            .iter()
            .zip(dy)
            .map(|(&y, &d)| f64::from(y) * f64::from(d))
            .sum();
        for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
            *o = f64::from(y) * (f64::from(d) - dot);
        }
    }
    Ok(out)
}

/// The gradient through log-softmax, given its output `y` and the upstream gradient `dy`:
/// `dx_j = dy_j - exp(y_j) * sum_k dy_k`.
pub fn log_softmax_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f64>> {
    check_backward(y, dy, cols)?;
    let mut out = vec![0.0; y.len()];
    for ((y, dy), o) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(out.chunks_exact_mut(cols))
    {
        let sum: f64 = dy.iter().map(|&d| f64::from(d)).sum();
        for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
            *o = f64::from(d) - f64::from(y).exp() * sum;
        }
    }
    Ok(out)
}

/// Per row, the `cols x cols` Jacobian of softmax, `J[i][j] = s_i * (delta_ij - s_j)` with
/// `s = softmax(row)`; `rows * cols * cols` values, each matrix row-major. At most
/// [`JACOBIAN_MAX_COLS`](super::JACOBIAN_MAX_COLS) columns.
pub fn softmax_jacobian(x: &[f32], cols: usize) -> Result<Vec<f64>> {
    let rows = validate::jacobian_rows("x", x.len(), cols)?;
    let x = widen(x);
    let mut out = vec![0.0; rows * cols * cols];
    let mut s = vec![0.0; cols];
    for (row, jac) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols * cols)) {
        softmax_row(row, &mut s);
        for (i, jac_row) in jac.chunks_exact_mut(cols).enumerate() {
            for (j, o) in jac_row.iter_mut().enumerate() {
                let delta = if i == j { 1.0 } else { 0.0 };
                *o = s[i] * (delta - s[j]);
            }
        }
    }
    Ok(out)
}

/// PyTorch's `F.cross_entropy` and its gradient, from `f32` logits.
///
/// With `lsm = log_softmax(row)`, `s = softmax(row)`, `w` the class weights (all ones by
/// default), `e` the label smoothing and `C = cols`, each row has a target distribution `q`:
///
/// * index target `t`: `q_c = (1 - e) * w_t * [c == t] + (e / C) * w_c`; a row whose target is
///   `ignore_index` is ignored (loss 0, gradient exactly 0, no share of the mean);
/// * probability target `p`: `q_c = w_c * ((1 - e) * p_c + e / C)`.
///
/// `loss_row = -sum_c q_c * lsm_c`, where a term with `q_c == 0` is exactly 0, and
/// `dloss_row/dx_c = s_c * sum_k q_k - q_c`. A degenerate row (NaN, `+inf`, all `-inf`) that is
/// not ignored has a NaN loss and a NaN gradient row.
///
/// `Sum` adds the row losses; `Mean` divides that sum by `D`, the sum of `w_t` over the rows
/// that are not ignored (index targets; NaN when `D` is 0) or by `rows` (probability targets).
/// The gradient is that of the reduced loss, times the upstream gradient `grad_output`.
pub fn cross_entropy(
    logits: &[f32],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
) -> Result<CrossEntropyOutput<f64>> {
    cross_entropy_f64(&widen(logits), cols, targets, options, grad_output)
}

/// [`cross_entropy`] from `f64` logits, so that finite differences can probe it finely.
pub fn cross_entropy_f64(
    logits: &[f64],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
) -> Result<CrossEntropyOutput<f64>> {
    let plan = validate::cross_entropy(logits.len(), cols, targets, options, grad_output)?;
    let e = f64::from(plan.label_smoothing);
    let c = cols as f64;
    let weight = |k: usize| plan.weight.map_or(1.0, |w| f64::from(w[k]));

    let mut row_loss = vec![0.0; plan.rows];
    let mut grad = vec![0.0; logits.len()];
    let mut q = vec![0.0; cols];
    for (r, (row, g)) in logits
        .chunks_exact(cols)
        .zip(grad.chunks_exact_mut(cols))
        .enumerate()
    {
        if plan.is_ignored(r) {
            continue;
        }
        match &plan.targets {
            CrossEntropyTargets::Indices(_) => {
                let t = plan.target(r).expect("a kept row has a target");
                for (k, q) in q.iter_mut().enumerate() {
                    let hit = if k == t { (1.0 - e) * weight(t) } else { 0.0 };
                    *q = hit + e / c * weight(k);
                }
            }
            CrossEntropyTargets::Probabilities(p) => {
                let p = &p[r * cols..(r + 1) * cols];
                for (k, q) in q.iter_mut().enumerate() {
                    *q = weight(k) * ((1.0 - e) * f64::from(p[k]) + e / c);
                }
            }
        }
        match RowStats::of(row) {
            RowStats::Degenerate => {
                row_loss[r] = f64::NAN;
                g.fill(f64::NAN);
            }
            RowStats::Finite { max, log_sum } => {
                let mut loss = 0.0;
                for (&q, &v) in q.iter().zip(row) {
                    if q != 0.0 {
                        loss -= q * log_softmax_entry(v, max, log_sum);
                    }
                }
                row_loss[r] = loss;
                let sum_q: f64 = q.iter().sum();
                let scale = plan.grad_scale(r);
                let sum = log_sum.exp();
                for ((g, &q), &v) in g.iter_mut().zip(&q).zip(row) {
                    *g = scale * (exp_shifted(v, max) / sum * sum_q - q);
                }
            }
        }
    }

    // From +0: the sum over no rows is 0, where `Iterator::sum` would give -0.
    let total = row_loss.iter().fold(0.0, |sum, &l| sum + l);
    let loss = match plan.reduction {
        Reduction::None => row_loss,
        Reduction::Sum => vec![total],
        Reduction::Mean => vec![total / plan.mean_denominator],
    };
    Ok(CrossEntropyOutput { loss, grad })
}

/// The reduced cross-entropy loss alone, from `f64` logits: what finite differences of the
/// gradient of [`cross_entropy`] are taken of.
pub fn cross_entropy_loss_f64(
    logits: &[f64],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
) -> Result<Vec<f64>> {
    Ok(cross_entropy_f64(logits, cols, targets, options, GradOutput::One)?.loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::Rng;
    use crate::error::Error;

    const INF: f32 = f32::INFINITY;
    const NAN: f32 = f32::NAN;

    fn assert_close(actual: &[f64], expected: &[f64], tol: f64) {
        assert_eq!(actual.len(), expected.len());
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let ok = if e.is_nan() {
                a.is_nan()
            } else if e.is_infinite() {
                a == e
            } else {
                (a - e).abs() <= tol * (1.0 + e.abs())
            };
            assert!(ok, "element {i}: got {a}, expected {e}");
        }
    }

    #[test]
    fn softmax_hand_values() {
        assert_eq!(
            softmax(&[1000.0, 0.0, 0.0, 0.0], 4).unwrap(),
            [1.0, 0.0, 0.0, 0.0]
        );
        let s = softmax(&[0.0, 0.0], 2).unwrap();
        assert_eq!(s, [0.5, 0.5]);
        let e = 1f64.exp();
        assert_close(
            &softmax(&[1.0, 0.0], 2).unwrap(),
            &[e / (e + 1.0), 1.0 / (e + 1.0)],
            1e-15,
        );
        assert!(softmax(&[], 3).unwrap().is_empty());
    }

    #[test]
    fn log_softmax_hand_values() {
        let l = log_softmax(&[1000.0, 1.0], 2).unwrap();
        assert_eq!(l[1], -999.0 + l[0]);
        assert!(l[0].abs() < 1e-300);
        assert_close(
            &log_softmax(&[0.0, 0.0, 0.0, 0.0], 4).unwrap(),
            &[-(4f64.ln()); 4],
            1e-15,
        );
    }

    #[test]
    fn special_values() {
        let x = [
            0.0, -INF, 1.0, // -inf entry in an ordinary row
            -INF, -INF, -INF, // all -inf
            0.0, INF, 1.0, // +inf
            NAN, 0.0, 1.0, // NaN
            -INF, 2.0, -INF, // one finite entry
        ];
        let s = softmax(&x, 3).unwrap();
        let l = log_softmax(&x, 3).unwrap();
        let e = 1f64.exp();
        assert_eq!(s[1], 0.0);
        assert_close(&s[0..3], &[1.0 / (1.0 + e), 0.0, e / (1.0 + e)], 1e-15);
        assert_eq!(l[1], f64::NEG_INFINITY);
        assert_close(
            &l[0..3],
            &[-(1.0 + e).ln(), f64::NEG_INFINITY, 1.0 - (1.0 + e).ln()],
            1e-15,
        );
        for out in [&s, &l] {
            assert!(out[3..12].iter().all(|v| v.is_nan()), "{out:?}");
        }
        assert_eq!(s[12..15], [0.0, 1.0, 0.0]);
        assert_eq!(l[12..15], [f64::NEG_INFINITY, 0.0, f64::NEG_INFINITY]);
        let j = softmax_jacobian(&x, 3).unwrap();
        assert!(j[9..36].iter().all(|v| v.is_nan()));
        assert!(j[..9].iter().chain(&j[36..]).all(|v| v.is_finite()));
    }

    #[test]
    fn nan_only_affects_its_row() {
        let x = [1.0, 2.0, NAN, 4.0, 1.0, 2.0];
        let s = softmax(&x, 2).unwrap();
        assert!(s[2].is_nan() && s[3].is_nan());
        assert_eq!(s[0..2], s[4..6]);
        assert!(s[0].is_finite());
    }

    #[test]
    fn translation_invariance() {
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..64).map(|_| rng.below(20) as f32 - 10.0).collect();
        let shifted: Vec<f32> = x.iter().map(|v| v + 1e7).collect();
        assert_close(
            &softmax(&shifted, 16).unwrap(),
            &softmax(&x, 16).unwrap(),
            1e-15,
        );
        assert_close(
            &log_softmax(&shifted, 16).unwrap(),
            &log_softmax(&x, 16).unwrap(),
            1e-15,
        );
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut rng = Rng::new(2);
        let x = rng.normals(5 * 77, 3.0);
        let s = softmax(&x, 77).unwrap();
        for row in s.chunks(77) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
        }
    }

    #[test]
    fn backward_matches_jacobian() {
        let mut rng = Rng::new(3);
        let cols = 5;
        let x = rng.normals(3 * cols, 2.0);
        let dy = rng.normals(3 * cols, 1.0);
        let y = softmax(&x, cols).unwrap();
        let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
        let dx = softmax_backward(&y32, &dy, cols).unwrap();
        let jac = softmax_jacobian(&x, cols).unwrap();
        for r in 0..3 {
            for j in 0..cols {
                // J is symmetric, so J^T dy = J dy.
                let expect: f64 = (0..cols)
                    .map(|i| jac[r * cols * cols + i * cols + j] * f64::from(dy[r * cols + i]))
                    .sum();
                assert!((dx[r * cols + j] - expect).abs() < 1e-6);
            }
        }
        let l = log_softmax(&x, cols).unwrap();
        let l32: Vec<f32> = l.iter().map(|&v| v as f32).collect();
        let dxl = log_softmax_backward(&l32, &dy, cols).unwrap();
        for r in 0..3 {
            let row = r * cols..(r + 1) * cols;
            let sum: f64 = dy[row.clone()].iter().map(|&d| f64::from(d)).sum();
            for j in row {
                let expect = f64::from(dy[j]) - y[j] * sum;
                assert!((dxl[j] - expect).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn jacobian_hand_values() {
        let j = softmax_jacobian(&[0.0, 0.0], 2).unwrap();
        assert_eq!(j, [0.25, -0.25, -0.25, 0.25]);
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(softmax(&[1.0], 0), Err(Error::ZeroCols)));
        assert!(matches!(
            log_softmax(&[1.0; 5], 2),
            Err(Error::LengthNotMultiple {
                what: "x",
                len: 5,
                cols: 2
            })
        ));
        assert!(matches!(
            softmax_backward(&[1.0; 4], &[1.0; 3], 2),
            Err(Error::LengthMismatch {
                what: "grad_output",
                expected: 4,
                actual: 3
            })
        ));
        assert!(matches!(
            log_softmax_backward(&[1.0; 5], &[1.0; 5], 2),
            Err(Error::LengthNotMultiple { what: "y", .. })
        ));
        assert!(matches!(
            softmax_jacobian(&[0.0; 1025], 1025),
            Err(Error::JacobianTooWide {
                cols: 1025,
                max: 1024
            })
        ));
    }

    fn targets_for<'a>(
        kind: u8,
        idx: &'a [i64],
        idx32: &'a [i32],
        probs: &'a [f32],
    ) -> Targets<'a> {
        match kind {
            0 => Targets::Indices(idx),
            1 => Targets::IndicesI32(idx32),
            _ => Targets::Probabilities(probs),
        }
    }

    /// Checks the analytic gradient against central differences of the reduced loss, scalarised
    /// with the upstream gradient.
    fn check_gradient(
        rows: usize,
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let logits: Vec<f64> = rng
            .normals(rows * cols, 2.0)
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let upstream: Vec<f32> = match options.reduction {
            Reduction::None => rng.normals(rows, 1.0),
            _ => vec![0.7],
        };
        let grad_output = match options.reduction {
            Reduction::None => GradOutput::PerRow(&upstream),
            _ => GradOutput::Scalar(upstream[0]),
        };
        let out = cross_entropy_f64(&logits, cols, targets, options, grad_output).unwrap();
        let scalar = |x: &[f64]| -> f64 {
            let loss = cross_entropy_loss_f64(x, cols, targets, options).unwrap();
            loss.iter()
                .zip(&upstream)
                .map(|(&l, &g)| l * f64::from(g))
                .sum()
        };
        let h = 1e-5;
        let mut x = logits.clone();
        for i in 0..x.len() {
            let orig = x[i];
            x[i] = orig + h;
            let up = scalar(&x);
            x[i] = orig - h;
            let down = scalar(&x);
            x[i] = orig;
            let numeric = (up - down) / (2.0 * h);
            assert!(
                (numeric - out.grad[i]).abs() <= 1e-7 + 1e-6 * numeric.abs(),
                "element {i}: analytic {}, numeric {numeric} ({options:?}, {targets:?})",
                out.grad[i]
            );
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let (rows, cols) = (6, 5);
        let idx = [0i64, 4, -100, 2, 2, 1];
        let idx32: Vec<i32> = idx.iter().map(|&v| v as i32).collect();
        let mut rng = Rng::new(9);
        let mut probs = rng.uniforms(rows * cols);
        for row in probs.chunks_mut(cols) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|p| *p /= s);
        }
        let w = [0.5, 1.0, 2.0, 0.0, 1.5];
        let mut seed = 100;
        for kind in 0..3 {
            for weight in [None, Some(&w[..])] {
                for label_smoothing in [0.0, 0.1, 1.0] {
                    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                        let options = CrossEntropyOptions {
                            weight,
                            ignore_index: -100,
                            reduction,
                            label_smoothing,
                        };
                        let targets = targets_for(kind, &idx, &idx32, &probs);
                        seed += 1;
                        check_gradient(rows, cols, targets, &options, seed);
                    }
                }
            }
        }
    }

    #[test]
    fn cross_entropy_hand_values() {
        // Row [0, ln 3]: softmax [1/4, 3/4].
        let x = [0.0, 3f32.ln()];
        let o = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let out = cross_entropy(&x, 2, Targets::Indices(&[1]), &o, GradOutput::One).unwrap();
        let e1 = f64::from(3f32.ln()).exp();
        let s1 = e1 / (1.0 + e1);
        assert_close(&out.loss, &[-s1.ln()], 1e-15);
        assert_close(&out.grad, &[1.0 - s1, s1 - 1.0], 1e-15);
        // With smoothing 1 the target is uniform.
        let o = CrossEntropyOptions {
            label_smoothing: 1.0,
            ..o
        };
        let out = cross_entropy(&x, 2, Targets::Indices(&[1]), &o, GradOutput::One).unwrap();
        let l = log_softmax(&x, 2).unwrap();
        assert_close(&out.loss, &[-(l[0] + l[1]) / 2.0], 1e-15);
    }

    #[test]
    fn one_hot_probabilities_equal_indices() {
        let mut rng = Rng::new(4);
        let (rows, cols) = (7, 6);
        let x = rng.normals(rows * cols, 2.0);
        let idx: Vec<i64> = (0..rows).map(|_| rng.below(cols) as i64).collect();
        let mut onehot = vec![0.0f32; rows * cols];
        for (r, &t) in idx.iter().enumerate() {
            onehot[r * cols + t as usize] = 1.0;
        }
        let w = [0.3, 1.0, 2.0, 0.5, 1.0, 4.0];
        for weight in [None, Some(&w[..])] {
            for label_smoothing in [0.0, 0.25] {
                for reduction in [Reduction::None, Reduction::Sum] {
                    let o = CrossEntropyOptions {
                        weight,
                        label_smoothing,
                        reduction,
                        ..Default::default()
                    };
                    let a = cross_entropy(&x, cols, Targets::Indices(&idx), &o, GradOutput::One)
                        .unwrap();
                    let b = cross_entropy(
                        &x,
                        cols,
                        Targets::Probabilities(&onehot),
                        &o,
                        GradOutput::One,
                    )
                    .unwrap();
                    assert_close(&a.loss, &b.loss, 1e-14);
                    assert_close(&a.grad, &b.grad, 1e-14);
                }
            }
        }
        // Without weights the means agree too; with weights only the index mean divides by the
        // target weights, as in PyTorch.
        let o = CrossEntropyOptions::default();
        let a = cross_entropy(&x, cols, Targets::Indices(&idx), &o, GradOutput::One).unwrap();
        let b = cross_entropy(
            &x,
            cols,
            Targets::Probabilities(&onehot),
            &o,
            GradOutput::One,
        )
        .unwrap();
        assert_close(&a.loss, &b.loss, 1e-14);
        assert_close(&a.grad, &b.grad, 1e-14);
    }

    #[test]
    fn unweighted_gradient_rows_sum_to_zero_and_ignored_rows_are_zero() {
        let mut rng = Rng::new(5);
        let (rows, cols) = (8, 9);
        let x = rng.normals(rows * cols, 3.0);
        let idx = [0i64, 8, 3, -5, 3, 2, -5, 1];
        for label_smoothing in [0.0, 0.3] {
            let o = CrossEntropyOptions {
                ignore_index: -5,
                label_smoothing,
                ..Default::default()
            };
            let out = cross_entropy(&x, cols, Targets::Indices(&idx), &o, GradOutput::One).unwrap();
            for (r, g) in out.grad.chunks(cols).enumerate() {
                if idx[r] == -5 {
                    assert!(g.iter().all(|&v| v == 0.0 && v.is_sign_positive()));
                } else {
                    assert!(g.iter().sum::<f64>().abs() < 1e-15);
                }
            }
        }
    }

    #[test]
    fn cross_entropy_special_rows_and_reductions() {
        let x = [
            0.0, 1.0, NAN, // NaN row
            1.0, -INF, 0.0, // -inf logit without target mass
            -INF, -INF, -INF, // all -inf, ignored
        ];
        let idx = [0i64, 0, -100];
        let o = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let out = cross_entropy(&x, 3, Targets::Indices(&idx), &o, GradOutput::One).unwrap();
        assert!(out.loss[0].is_nan());
        assert!(out.grad[0..3].iter().all(|v| v.is_nan()));
        assert!(out.loss[1].is_finite());
        assert!(out.grad[3..6].iter().all(|v| v.is_finite()));
        assert_eq!(out.grad[4], 0.0);
        assert_eq!(out.loss[2], 0.0);
        assert_eq!(out.grad[6..9], [0.0; 3]);

        // Every row ignored: Mean is 0/0, Sum is 0, the gradient is zero.
        let all = [-100i64; 3];
        let mean = cross_entropy(
            &x,
            3,
            Targets::Indices(&all),
            &Default::default(),
            GradOutput::One,
        )
        .unwrap();
        assert!(mean.loss[0].is_nan());
        assert!(mean.grad.iter().all(|&v| v == 0.0));
        let o = CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let sum = cross_entropy(&x, 3, Targets::Indices(&all), &o, GradOutput::One).unwrap();
        assert_eq!(sum.loss, [0.0]);

        // No rows at all.
        let empty = cross_entropy(
            &[],
            3,
            Targets::Probabilities(&[]),
            &Default::default(),
            GradOutput::One,
        )
        .unwrap();
        assert!(empty.loss[0].is_nan() && empty.grad.is_empty());
        let empty = cross_entropy(&[], 3, Targets::Indices(&[]), &o, GradOutput::One).unwrap();
        assert_eq!(empty.loss, [0.0]);
    }

    #[test]
    fn weighted_mean_divides_by_target_weights() {
        let x = [0.0, 0.0, 0.0, 0.0];
        let w = [1.0, 3.0];
        let o = CrossEntropyOptions {
            weight: Some(&w),
            ..Default::default()
        };
        let out = cross_entropy(&x, 2, Targets::Indices(&[0, 1]), &o, GradOutput::One).unwrap();
        // (1 + 3) * ln 2 / (1 + 3)
        assert_close(&out.loss, &[2f64.ln()], 1e-15);
        assert_close(&out.grad, &[-0.125, 0.125, 0.375, -0.375], 1e-15);
    }
}
