//! Argument checks shared by the CPU paths and the GPU operations.
//!
//! Every public operation validates all of its arguments here before it writes any output, so a
//! failed call leaves the caller's buffers untouched and both backends reject exactly the same
//! inputs with exactly the same [`Error`] values. Nothing in this module panics, whatever the input.

use crate::error::{Error, Result};
use crate::options::{CrossEntropyOptions, GradOutput, Reduction, Targets};
use rayon::prelude::*;

/// The widest row [`softmax_jacobian`](crate::cpu::fast::softmax_jacobian) accepts: the output
/// grows with `cols²`, so a wider row is almost certainly a mistake (and 4 MiB per row already).
pub const JACOBIAN_MAX_COLS: usize = 1024;

/// The rows of index targets that [`resolve_indices`] checks as one piece of work.
const RESOLVE_CHUNK: usize = 1 << 16;

/// The number of rows of a flat row-major batch of `len` elements, `cols` per row.
///
/// `what` names the argument in the error.
pub(crate) fn batch_rows(what: &'static str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 {
        return Err(Error::ZeroCols);
    }
    if !len.is_multiple_of(cols) {
        return Err(Error::LengthNotMultiple { what, len, cols });
    }
    Ok(len / cols)
}

/// Checks that an argument has the length another one dictates.
pub(crate) fn same_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Validates the input of a softmax Jacobian and returns `rows`; the output then holds
/// `rows * cols * cols` elements, which this guarantees is representable.
pub(crate) fn jacobian_rows(what: &'static str, len: usize, cols: usize) -> Result<usize> {
    let rows = batch_rows(what, len, cols)?;
    if cols > JACOBIAN_MAX_COLS {
        return Err(Error::JacobianTooWide {
            cols,
            max: JACOBIAN_MAX_COLS,
        });
    }
    // Bytes rather than elements, so that the byte size of the output buffer is representable
    // too.
    let max_rows = usize::MAX / (cols * cols * std::mem::size_of::<f32>());
    if rows > max_rows {
        return Err(Error::ShapeTooLarge {
            what: "rows",
            value: rows,
            max: max_rows,
        });
    }
    Ok(rows)
}

/// The marker that [`CrossEntropyTargets::Indices`] stores for a row whose target equals
/// `ignore_index`. Valid targets lie in `[0, cols)`, so a negative value cannot collide with one,
/// whatever `ignore_index` the caller chose.
pub(crate) const IGNORED_ROW: i32 = -1;

/// Cross-entropy targets after validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CrossEntropyTargets<'a> {
    /// One class per row, each in `[0, cols)`, or [`IGNORED_ROW`]. Both index widths end up here
    /// as `i32`, the width the shaders read.
    Indices(Vec<i32>),
    /// A distribution per row, `rows * cols` values, exactly as the caller passed them.
    Probabilities(&'a [f32]),
}

/// The upstream gradient after validation against the reduction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum UpstreamGrad<'a> {
    /// One factor for every row (`Mean`, `Sum`, or `None` with a single row).
    Uniform(f32),
    /// One factor per row (`None`), `rows` values.
    PerRow(&'a [f32]),
}

/// Everything a backend needs to evaluate a cross-entropy once the arguments have been checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CrossEntropyPlan<'a> {
    /// Rows of the logits.
    pub rows: usize,
    /// Classes, `>= 1` and at most `i32::MAX`.
    pub cols: usize,
    /// The targets, with ignored rows marked.
    pub targets: CrossEntropyTargets<'a>,
    /// The class weights (`cols` values), `None` for all ones.
    pub weight: Option<&'a [f32]>,
    /// Label smoothing, in `[0, 1]`.
    pub label_smoothing: f32,
    /// The reduction.
    pub reduction: Reduction,
    /// The upstream gradient `dL/dloss`.
    pub upstream: UpstreamGrad<'a>,
    /// Rows that are not ignored (all rows for probability targets).
    pub kept_rows: usize,
    /// The denominator of [`Reduction::Mean`]: the sum of `weight[target]` over kept rows for
    /// index targets (0 when every row is ignored), `rows` for probability targets. It depends
    /// only on targets and weights, never on the logits, which is why it is resolved here: a
    /// backend can scale the gradient in the same pass that computes it.
    pub mean_denominator: f64,
}

impl CrossEntropyPlan<'_> {
    /// The factor that multiplies row `row`'s `softmax * sum(q) - q` in the gradient of the
    /// reduced loss: the upstream gradient, divided by [`Self::mean_denominator`] for `Mean`.
    ///
    /// It is not defined for ignored rows, whose gradient is exactly zero whatever this says.
    pub(crate) fn grad_scale(&self, row: usize) -> f64 {
        let upstream = match self.upstream {
            UpstreamGrad::Uniform(g) => g,
            UpstreamGrad::PerRow(g) => g[row],
        };
        f64::from(upstream) / self.grad_divisor()
    }

    /// [`Self::grad_scale`] of the rows from `first`, one per element of `out`, in a loop that
    /// vectorises.
    pub(crate) fn grad_scales(&self, first: usize, out: &mut [f64]) {
        match self.upstream {
            UpstreamGrad::Uniform(_) => out.fill(self.grad_scale(first)),
            UpstreamGrad::PerRow(g) => {
                let divisor = self.grad_divisor();
                for (s, &g) in out.iter_mut().zip(&g[first..]) {
                    *s = f64::from(g) / divisor;
                }
            }
        }
    }

    /// What the upstream gradient is divided by: [`Self::mean_denominator`] for `Mean`, 1 (an
    /// exact division) otherwise.
    fn grad_divisor(&self) -> f64 {
        match self.reduction {
            Reduction::Mean => self.mean_denominator,
            Reduction::None | Reduction::Sum => 1.0,
        }
    }

    /// The target class of `row` for index targets, `None` if the row is ignored or the targets
    /// are probabilities.
    pub(crate) fn target(&self, row: usize) -> Option<usize> {
        match &self.targets {
            CrossEntropyTargets::Indices(t) if t[row] != IGNORED_ROW => Some(t[row] as usize),
            _ => None,
        }
    }

    /// Whether `row` is ignored (index targets equal to `ignore_index`).
    pub(crate) fn is_ignored(&self, row: usize) -> bool {
        matches!(&self.targets, CrossEntropyTargets::Indices(t) if t[row] == IGNORED_ROW)
    }
}

/// Validates every argument of a cross-entropy over logits of `logits_len` elements and resolves
/// what the backends need, in the order: logits shape, label smoothing, weight, targets, upstream
/// gradient.
pub(crate) fn cross_entropy<'a>(
    logits_len: usize,
    cols: usize,
    targets: Targets<'a>,
    options: &CrossEntropyOptions<'a>,
    grad_output: GradOutput<'a>,
) -> Result<CrossEntropyPlan<'a>> {
    let rows = batch_rows("logits", logits_len, cols)?;
    // Class indices travel to the shaders as i32.
    if cols > i32::MAX as usize {
        return Err(Error::ShapeTooLarge {
            what: "cols",
            value: cols,
            max: i32::MAX as usize,
        });
    }
    let e = options.label_smoothing;
    // Written so that NaN fails too.
    if !(0.0..=1.0).contains(&e) {
        return Err(Error::LabelSmoothing(e));
    }
    if let Some(w) = options.weight {
        same_len("weight", cols, w.len())?;
    }

    let (targets, kept_rows, mean_denominator) = match targets {
        Targets::Indices(t) => {
            same_len("targets", rows, t.len())?;
            resolve_indices(t, cols, options.ignore_index, options.weight)?
        }
        Targets::IndicesI32(t) => {
            same_len("targets", rows, t.len())?;
            resolve_indices(t, cols, options.ignore_index, options.weight)?
        }
        Targets::Probabilities(p) => {
            same_len("targets", logits_len, p.len())?;
            (CrossEntropyTargets::Probabilities(p), rows, rows as f64)
        }
    };

    let upstream = upstream_grad(options.reduction, rows, grad_output)?;

    Ok(CrossEntropyPlan {
        rows,
        cols,
        targets,
        weight: options.weight,
        label_smoothing: e,
        reduction: options.reduction,
        upstream,
        kept_rows,
        mean_denominator,
    })
}

/// Checks the upstream gradient of a loss against the reduction and the row count: a scalar for
/// `Mean` and `Sum` (a one-element slice is taken as one), one value per row for `None`.
pub(crate) fn upstream_grad(
    reduction: Reduction,
    rows: usize,
    grad_output: GradOutput<'_>,
) -> Result<UpstreamGrad<'_>> {
    Ok(match (reduction, grad_output) {
        (_, GradOutput::One) => UpstreamGrad::Uniform(1.0),
        (Reduction::Mean | Reduction::Sum, GradOutput::Scalar(g)) => UpstreamGrad::Uniform(g),
        (Reduction::None, GradOutput::Scalar(g)) => {
            same_len("grad_output", rows, 1)?;
            UpstreamGrad::Uniform(g)
        }
        (Reduction::Mean | Reduction::Sum, GradOutput::PerRow(g)) => {
            same_len("grad_output", 1, g.len())?;
            UpstreamGrad::Uniform(g[0])
        }
        (Reduction::None, GradOutput::PerRow(g)) => {
            same_len("grad_output", rows, g.len())?;
            UpstreamGrad::PerRow(g)
        }
    })
}

/// What the index targets of a call are checked against.
#[derive(Clone, Copy)]
struct TargetRule<'w> {
    cols: usize,
    ignore_index: i64,
    weight: Option<&'w [f32]>,
}

/// A chunk's number of kept rows and sum of their target weights; None where a target is out of
/// range.
type Resolved = Option<(usize, f64)>;

/// [`resolve_chunk`] built for the instruction set the CPU path's kernels run with.
fn resolve_chunk_on<T: Copy + Into<i64>>(out: &mut [i32], t: &[T], rule: TargetRule) -> Resolved {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        use crate::cpu::fast::{isa, Isa};
        #[target_feature(enable = "avx512f,avx2")]
        fn avx512<T: Copy + Into<i64>>(out: &mut [i32], t: &[T], rule: TargetRule) -> Resolved {
            resolve_chunk(out, t, rule)
        }
        #[target_feature(enable = "avx2")]
        fn avx2<T: Copy + Into<i64>>(out: &mut [i32], t: &[T], rule: TargetRule) -> Resolved {
            resolve_chunk(out, t, rule)
        }
        match isa() {
            // SAFETY: `isa()` found AVX-512F and AVX2 on this CPU.
            Isa::Avx512 => return unsafe { avx512(out, t, rule) },
            // SAFETY: `isa()` found AVX2 on this CPU.
            Isa::Avx2 => return unsafe { avx2(out, t, rule) },
            Isa::Baseline => {}
        }
    }
    resolve_chunk(out, t, rule)
}

/// Converts a chunk of index targets into `out` (see [`resolve_indices`]), in one pass without
/// branches that vectorises.
#[inline(always)]
fn resolve_chunk<T: Copy + Into<i64>>(
    out: &mut [i32],
    targets: &[T],
    rule: TargetRule,
) -> Resolved {
    let TargetRule {
        cols,
        ignore_index,
        weight,
    } = rule;
    let mut bad = false;
    for (o, &value) in out.iter_mut().zip(targets) {
        let value = value.into();
        let ignored = value == ignore_index;
        // `cols <= i32::MAX`, so every in-range target converts to i32.
        bad |= !ignored & !(value >= 0 && (value as u64) < cols as u64);
        *o = if ignored { IGNORED_ROW } else { value as i32 };
    }
    if bad {
        return None;
    }
    let kept = out.iter().filter(|&&class| class != IGNORED_ROW).count();
    let weight_sum = weight.map_or(0.0, |w| {
        out.iter()
            .filter(|&&class| class != IGNORED_ROW)
            .fold(0.0, |sum, &class| sum + f64::from(w[class as usize]))
    });
    Some((kept, weight_sum))
}

/// Checks index targets and converts them to `i32` with ignored rows marked; also returns the
/// number of kept rows and the sum of their target weights.
///
/// Runs in chunks of [`RESOLVE_CHUNK`] rows, in parallel when there are several, each in one
/// pass without branches that vectorises (it took a tenth of the CPU path's cross-entropy on 10
/// columns); the offending row is looked for only once a bad target is known to exist. The
/// chunks' weight sums are added in order, so the result does not depend on the threads.
fn resolve_indices<'a, T: Copy + Into<i64> + Sync>(
    targets: &[T],
    cols: usize,
    ignore_index: i64,
    weight: Option<&[f32]>,
) -> Result<(CrossEntropyTargets<'a>, usize, f64)> {
    let in_range = |value: i64| value >= 0 && (value as u64) < cols as u64;
    let mut resolved = vec![0i32; targets.len()];
    let rule = TargetRule {
        cols,
        ignore_index,
        weight,
    };
    let chunk = |(out, targets): (&mut [i32], &[T])| resolve_chunk_on(out, targets, rule);
    let parts: Vec<Resolved> = if targets.len() > RESOLVE_CHUNK {
        resolved
            .par_chunks_mut(RESOLVE_CHUNK)
            .zip(targets.par_chunks(RESOLVE_CHUNK))
            .map(chunk)
            .collect()
    } else {
        vec![chunk((&mut resolved, targets))]
    };
    if parts.iter().any(Option::is_none) {
        let (row, value) = targets
            .iter()
            .map(|&value| value.into())
            .enumerate()
            .find(|&(_, value)| value != ignore_index && !in_range(value))
            .expect("a target out of range was seen");
        return Err(Error::TargetOutOfRange {
            row,
            value,
            classes: cols,
            ignore_index,
        });
    }
    let (kept, weight_sum) = parts
        .into_iter()
        .flatten()
        .fold((0, 0.0), |(k, s), (kept, sum)| (k + kept, s + sum));
    let denominator = if weight.is_some() {
        weight_sum
    } else {
        kept as f64
    };
    Ok((CrossEntropyTargets::Indices(resolved), kept, denominator))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CrossEntropyOptions<'static> {
        CrossEntropyOptions::default()
    }

    #[test]
    fn batch_rows_checks_shape() {
        assert_eq!(batch_rows("x", 12, 4).unwrap(), 3);
        assert_eq!(batch_rows("x", 0, 4).unwrap(), 0);
        assert!(matches!(batch_rows("x", 0, 0), Err(Error::ZeroCols)));
        assert!(matches!(
            batch_rows("x", 10, 4),
            Err(Error::LengthNotMultiple {
                what: "x",
                len: 10,
                cols: 4
            })
        ));
    }

    #[test]
    fn same_len_reports_both_lengths() {
        assert!(same_len("dy", 3, 3).is_ok());
        assert!(matches!(
            same_len("dy", 3, 4),
            Err(Error::LengthMismatch {
                what: "dy",
                expected: 3,
                actual: 4
            })
        ));
    }

    #[test]
    fn jacobian_cap_and_overflow() {
        assert_eq!(jacobian_rows("x", 2048, 1024).unwrap(), 2);
        assert!(matches!(
            jacobian_rows("x", 1025, 1025),
            Err(Error::JacobianTooWide {
                cols: 1025,
                max: JACOBIAN_MAX_COLS
            })
        ));
        assert!(matches!(
            jacobian_rows("x", usize::MAX - usize::MAX % 1024, 1024),
            Err(Error::ShapeTooLarge { what: "rows", .. })
        ));
    }

    #[test]
    fn cross_entropy_resolves_indices_and_denominator() {
        let w = [1.0, 2.0, 3.0];
        let o = CrossEntropyOptions {
            weight: Some(&w),
            ignore_index: 7,
            ..opts()
        };
        let p = cross_entropy(9, 3, Targets::Indices(&[2, 7, 1]), &o, GradOutput::One).unwrap();
        assert_eq!(p.rows, 3);
        assert_eq!(
            p.targets,
            CrossEntropyTargets::Indices(vec![2, IGNORED_ROW, 1])
        );
        assert_eq!(p.kept_rows, 2);
        assert_eq!(p.mean_denominator, 5.0);
        assert_eq!(p.grad_scale(0), 0.2);
        assert_eq!(p.target(0), Some(2));
        assert_eq!(p.target(1), None);
        assert!(p.is_ignored(1));

        let p = cross_entropy(
            6,
            3,
            Targets::IndicesI32(&[-100, 0]),
            &opts(),
            GradOutput::One,
        )
        .unwrap();
        assert_eq!(
            p.targets,
            CrossEntropyTargets::Indices(vec![IGNORED_ROW, 0])
        );
        assert_eq!(p.mean_denominator, 1.0);
    }

    #[test]
    fn cross_entropy_resolves_many_chunks() {
        // Several chunks of RESOLVE_CHUNK rows, the last one partial.
        let rows = 3 * RESOLVE_CHUNK + 5;
        let w = [0.5, 1.0, 2.0];
        let targets: Vec<i32> = (0..rows)
            .map(|r| if r % 7 == 0 { -100 } else { (r % 3) as i32 })
            .collect();
        let o = CrossEntropyOptions {
            weight: Some(&w),
            ..opts()
        };
        let p = cross_entropy(
            3 * rows,
            3,
            Targets::IndicesI32(&targets),
            &o,
            GradOutput::One,
        )
        .unwrap();
        let kept: Vec<usize> = (0..rows).filter(|r| r % 7 != 0).collect();
        assert_eq!(p.kept_rows, kept.len());
        let want: f64 = kept.iter().map(|&r| f64::from(w[r % 3])).sum();
        assert_eq!(p.mean_denominator, want);
        let want: Vec<i32> = targets
            .iter()
            .map(|&t| if t == -100 { IGNORED_ROW } else { t })
            .collect();
        assert_eq!(p.targets, CrossEntropyTargets::Indices(want));

        // The first bad row is reported, whichever chunk it is in and whatever comes after.
        let mut bad = targets.clone();
        bad[2 * RESOLVE_CHUNK + 3] = 3;
        bad[rows - 1] = -5;
        assert!(matches!(
            cross_entropy(3 * rows, 3, Targets::IndicesI32(&bad), &o, GradOutput::One),
            Err(Error::TargetOutOfRange { row, value: 3, .. }) if row == 2 * RESOLVE_CHUNK + 3
        ));
    }

    #[test]
    fn cross_entropy_probabilities_divide_by_rows() {
        let t = [0.5; 6];
        let p = cross_entropy(
            6,
            3,
            Targets::Probabilities(&t),
            &opts(),
            GradOutput::Scalar(3.0),
        )
        .unwrap();
        assert_eq!(p.kept_rows, 2);
        assert_eq!(p.mean_denominator, 2.0);
        assert_eq!(p.grad_scale(1), 1.5);
    }

    #[test]
    fn cross_entropy_errors() {
        let one = GradOutput::One;
        let e = |r: Result<CrossEntropyPlan<'_>>| r.unwrap_err();
        assert!(matches!(
            e(cross_entropy(6, 0, Targets::Indices(&[]), &opts(), one)),
            Error::ZeroCols
        ));
        assert!(matches!(
            e(cross_entropy(7, 3, Targets::Indices(&[0, 0]), &opts(), one)),
            Error::LengthNotMultiple {
                what: "logits",
                len: 7,
                cols: 3
            }
        ));
        assert!(matches!(
            e(cross_entropy(6, 3, Targets::Indices(&[0]), &opts(), one)),
            Error::LengthMismatch {
                what: "targets",
                expected: 2,
                actual: 1
            }
        ));
        assert!(matches!(
            e(cross_entropy(
                6,
                3,
                Targets::Probabilities(&[0.0; 5]),
                &opts(),
                one
            )),
            Error::LengthMismatch {
                what: "targets",
                expected: 6,
                actual: 5
            }
        ));
        assert!(matches!(
            e(cross_entropy(6, 3, Targets::Indices(&[0, 3]), &opts(), one)),
            Error::TargetOutOfRange {
                row: 1,
                value: 3,
                classes: 3,
                ignore_index: -100
            }
        ));
        assert!(matches!(
            e(cross_entropy(
                6,
                3,
                Targets::Indices(&[-1, 0]),
                &opts(),
                one
            )),
            Error::TargetOutOfRange {
                row: 0,
                value: -1,
                ..
            }
        ));
        assert!(matches!(
            e(cross_entropy(
                3,
                3,
                Targets::Indices(&[i64::MAX]),
                &opts(),
                one
            )),
            Error::TargetOutOfRange {
                value: i64::MAX,
                ..
            }
        ));
        assert!(matches!(
            e(cross_entropy(
                3,
                3,
                Targets::IndicesI32(&[i32::MIN]),
                &opts(),
                one
            )),
            Error::TargetOutOfRange { .. }
        ));
        let w = [1.0; 2];
        let bad_w = CrossEntropyOptions {
            weight: Some(&w),
            ..opts()
        };
        assert!(matches!(
            e(cross_entropy(6, 3, Targets::Indices(&[0, 0]), &bad_w, one)),
            Error::LengthMismatch {
                what: "weight",
                expected: 3,
                actual: 2
            }
        ));
        for s in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let o = CrossEntropyOptions {
                label_smoothing: s,
                ..opts()
            };
            let err = e(cross_entropy(6, 3, Targets::Indices(&[0, 0]), &o, one));
            assert!(matches!(err, Error::LabelSmoothing(v) if v.to_bits() == s.to_bits()));
        }
        for s in [0.0, 1.0] {
            let o = CrossEntropyOptions {
                label_smoothing: s,
                ..opts()
            };
            assert!(cross_entropy(6, 3, Targets::Indices(&[0, 0]), &o, one).is_ok());
        }
        let none = CrossEntropyOptions {
            reduction: Reduction::None,
            ..opts()
        };
        let t = Targets::Indices(&[0, 0]);
        assert!(matches!(
            e(cross_entropy(6, 3, t, &none, GradOutput::PerRow(&[1.0]))),
            Error::LengthMismatch {
                what: "grad_output",
                expected: 2,
                actual: 1
            }
        ));
        assert!(matches!(
            e(cross_entropy(6, 3, t, &none, GradOutput::Scalar(1.0))),
            Error::LengthMismatch {
                what: "grad_output",
                expected: 2,
                actual: 1
            }
        ));
        assert!(
            cross_entropy(3, 3, Targets::Indices(&[0]), &none, GradOutput::Scalar(2.0)).is_ok()
        );
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let o = CrossEntropyOptions {
                reduction,
                ..opts()
            };
            assert!(matches!(
                e(cross_entropy(6, 3, t, &o, GradOutput::PerRow(&[1.0, 1.0]))),
                Error::LengthMismatch {
                    what: "grad_output",
                    expected: 1,
                    actual: 2
                }
            ));
            assert!(matches!(
                e(cross_entropy(6, 3, t, &o, GradOutput::PerRow(&[]))),
                Error::LengthMismatch {
                    what: "grad_output",
                    expected: 1,
                    actual: 0
                }
            ));
        }
    }
}
