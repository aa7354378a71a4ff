//! Property tests against the f64 reference over random shapes and magnitudes, subnormals and
//! -inf included. Case counts are small: every case is several GPU calls, about a millisecond
//! each on a software adapter.

mod common;

use common::context;
use proptest::prelude::*;
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{
    AxisLayout, CrossEntropyOptions, Engine, GradOutput, Reduction, Targets, Tolerance,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 32,
        // A failing case is printed with its input; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One logit: ordinary values, the ±80 range where exp over- and underflows in f32 without the
/// max shift, subnormals, zeros, and now and then -inf.
fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -5.0f32..5.0,
        3 => -80.0f32..80.0,
        1 => (-(1i32 << 23) + 1..(1i32 << 23)).prop_map(|m| f32::from_bits(m.unsigned_abs())
            * if m < 0 { -1.0 } else { 1.0 }),
        1 => Just(0.0f32),
        1 => Just(f32::NEG_INFINITY),
    ]
}

/// A batch `(x, cols)` of 1 to 6 rows of 1 to 700 columns.
fn batch(element: BoxedStrategy<f32>) -> impl Strategy<Value = (Vec<f32>, usize)> {
    (1usize..=6, prop_oneof![1usize..=8, 9usize..=700]).prop_flat_map(move |(rows, cols)| {
        (
            proptest::collection::vec(element.clone(), rows * cols),
            Just(cols),
        )
    })
}

/// A layout `[outer, C, inner]` (1 to 3 slabs of 1 to 300 classes at 2 to 70 positions) and
/// logits for it.
fn along_batch() -> impl Strategy<Value = (AxisLayout, Vec<f32>)> {
    (
        1usize..=3,
        prop_oneof![1usize..=40, 41usize..=300],
        2usize..=70,
    )
        .prop_flat_map(|(outer, classes, inner)| {
            let layout = AxisLayout::from_parts(outer, classes, inner).expect("a small layout");
            (
                Just(layout),
                proptest::collection::vec(logit(), layout.numel()),
            )
        })
}

fn finite_logit() -> BoxedStrategy<f32> {
    prop_oneof![4 => -5.0f32..5.0, 1 => -80.0f32..80.0].boxed()
}

/// Softmax or log-softmax in f64 of f64 input, for differencing: the reference takes f32, whose
/// rounding would swamp a step of 1e-6.
fn normalize_f64(x: &[f64], cols: usize, log: bool) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            row.iter()
                .map(move |v| {
                    if log {
                        v - m - s.ln()
                    } else {
                        (v - m).exp() / s
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn row_is_defined(row: &[f32]) -> bool {
    row.iter().any(|v| *v > f32::NEG_INFINITY)
}

proptest! {
    #![proptest_config(config())]

    /// Every row with a finite entry sums to one, each probability lies in [0, 1], larger logits
    /// never get smaller probabilities, and everything matches the reference.
    #[test]
    fn softmax_sums_to_one_preserves_order_and_matches((x, cols) in batch(logit().boxed())) {
        let Some(ctx) = context() else { return Ok(()) };
        let probs = ctx.softmax(&x, cols).unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&probs, &reference::softmax(&x, cols).unwrap());
        prop_assert!(cmp.passed(), "{:?}", cmp);
        for (xs, ps) in x.chunks(cols).zip(probs.chunks(cols)) {
            if !row_is_defined(xs) {
                prop_assert!(ps.iter().all(|p| p.is_nan()));
                continue;
            }
            let sum: f64 = ps.iter().map(|&p| f64::from(p)).sum();
            prop_assert!((sum - 1.0).abs() <= 1e-5, "sum {}", sum);
            prop_assert!(ps.iter().all(|&p| (0.0..=1.0).contains(&p)));
            for i in 0..cols {
                for j in 0..cols.min(64) {
                    if xs[i] < xs[j] {
                        prop_assert!(ps[i] <= ps[j], "x {} < {} but p {} > {}", xs[i], xs[j], ps[i], ps[j]);
                    }
                }
            }
        }
    }

    /// Shifting every logit of a row by a constant changes nothing. Logits on a grid of 1/8 keep
    /// `x + c` exact, so the results are compared bitwise.
    #[test]
    fn translation_invariance(
        (x, cols) in batch((-640i32..640).prop_map(|v| v as f32 / 8.0).boxed()),
        c in -10_000i32..10_000,
    ) {
        let Some(ctx) = context() else { return Ok(()) };
        let shifted: Vec<f32> = x.iter().map(|v| v + c as f32).collect();
        prop_assert_eq!(ctx.softmax(&shifted, cols).unwrap(), ctx.softmax(&x, cols).unwrap());
        prop_assert_eq!(
            ctx.log_softmax(&shifted, cols).unwrap(),
            ctx.log_softmax(&x, cols).unwrap()
        );
    }

    /// log_softmax equals ln(softmax) wherever softmax has not underflowed, and matches the
    /// reference everywhere (including -inf entries and the large negative values ln(softmax)
    /// could not give).
    #[test]
    fn log_softmax_is_ln_softmax_where_finite((x, cols) in batch(logit().boxed())) {
        let Some(ctx) = context() else { return Ok(()) };
        let log_probs = ctx.log_softmax(&x, cols).unwrap();
        let cmp = Tolerance::LOG_SOFTMAX.compare(&log_probs, &reference::log_softmax(&x, cols).unwrap());
        prop_assert!(cmp.passed(), "{:?}", cmp);
        let probs = ctx.softmax(&x, cols).unwrap();
        for (&l, &p) in log_probs.iter().zip(&probs) {
            if p.is_normal() {
                let ln = f64::from(p).ln();
                prop_assert!((f64::from(l) - ln).abs() <= 2e-5 + 1e-5 * ln.abs(), "{} vs ln {}", l, ln);
            } else if p == 0.0 {
                prop_assert!(l < -80.0 || l == f32::NEG_INFINITY, "log {} of an underflowed probability", l);
            }
        }
    }

    /// The backward passes are the vector-Jacobian products of the forward ops: compared with
    /// central differences of the f64 reference's `sum(dy * f(x))`.
    #[test]
    fn backward_matches_finite_differences(
        (x, cols) in batch(finite_logit()),
        seed in 0u64..1000,
    ) {
        let Some(ctx) = context() else { return Ok(()) };
        let rows = x.len() / cols;
        let dy = common::logits(rows, cols, 1.0, seed);
        let y = ctx.softmax(&x, cols).unwrap();
        let ly = ctx.log_softmax(&x, cols).unwrap();
        let dx = ctx.softmax_backward(&y, &dy, cols).unwrap();
        let ldx = ctx.log_softmax_backward(&ly, &dy, cols).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let objective = |x: &[f64], log: bool| -> f64 {
            normalize_f64(x, cols, log).iter().zip(&dy).map(|(o, &d)| o * f64::from(d)).sum()
        };
        let h = 1e-6;
        // A handful of coordinates per case keeps the reference work small.
        for i in (0..x.len()).step_by((x.len() / 8).max(1)) {
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += h;
            minus[i] -= h;
            for (log, got) in [(false, dx[i]), (true, ldx[i])] {
                let fd = (objective(&plus, log) - objective(&minus, log)) / (2.0 * h);
                prop_assert!(
                    (f64::from(got) - fd).abs() <= 2e-5 + 1e-4 * fd.abs(),
                    "log={} element {}: {} vs {}", log, i, got, fd
                );
            }
        }
    }

    /// Cross-entropy with the classes along the middle axis of `[outer, C, inner]` (random
    /// sizes, logits with subnormals and -inf, every fifth target ignored, smoothing, class
    /// weights and reduction), on the GPU and the CPU path, against the reference over the lines
    /// moved last.
    #[test]
    fn cross_entropy_along_an_axis_matches_the_reference(
        (layout, x) in along_batch(),
        seed in 0usize..1000,
        smoothing in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        weighted in any::<bool>(),
        reduction in prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), Just(Reduction::None)],
    ) {
        let Some(ctx) = context() else { return Ok(()) };
        let (lines, classes) = (layout.lines(), layout.len());
        let idx: Vec<i64> = (0..lines)
            .map(|r| if r % 5 == 1 { -100 } else { ((r * 7 + seed) % classes) as i64 })
            .collect();
        let weight: Vec<f32> = (0..classes).map(|c| 0.25 + (c % 4) as f32 * 0.5).collect();
        let options = CrossEntropyOptions {
            weight: weighted.then_some(&weight[..]),
            reduction,
            label_smoothing: smoothing,
            ..Default::default()
        };
        let targets = Targets::Indices(&idx);
        let w = |t: i64| if weighted { f64::from(weight[t as usize]) } else { 1.0 };
        let divisor: f64 = idx.iter().filter(|&&t| t != -100).map(|&t| w(t)).sum();
        let max_w = if weighted { weight.iter().fold(0.0, |m, &v| f64::max(m, f64::from(v))) } else { 1.0 };
        let natural = match reduction {
            Reduction::Mean if divisor > 0.0 => max_w / divisor,
            _ => max_w,
        };
        let rows = layout.to_rows(&x).unwrap();
        let want = reference::cross_entropy(&rows, classes, targets, &options, GradOutput::One).unwrap();
        let want_grad = layout.from_rows(&want.grad).unwrap();
        for engine in [Engine::Gpu(ctx.clone()), Engine::Cpu] {
            let got = engine
                .cross_entropy_with_grad_along(&x, layout, targets, &options, GradOutput::One)
                .unwrap();
            let cmp = Tolerance { abs: 1e-5, rel: 2e-5 }.compare(&got.loss, &want.loss);
            prop_assert!(cmp.passed(), "{:?} loss {:?}", engine, cmp);
            // A gradient element is a difference of terms up to max w / D (D the mean's divisor,
            // 1 otherwise), which f32 rounds at that scale: one class with label smoothing gives
            // exactly 0 in the reference and a few ulps of w / D on the CPU path.
            let scale = want_grad.iter().filter(|v| v.is_finite()).fold(natural, |m, v| m.max(v.abs()));
            let got_grad: Vec<f32> = got.grad.iter().map(|&g| (f64::from(g) / scale) as f32).collect();
            let want_scaled: Vec<f64> = want_grad.iter().map(|g| g / scale).collect();
            let cmp = Tolerance::SOFTMAX.compare(&got_grad, &want_scaled);
            prop_assert!(cmp.passed(), "{:?} grad {:?}", engine, cmp);
        }
    }

    /// The fused cross-entropy gradient against central differences of the f64 loss, with random
    /// targets, smoothing and reduction.
    #[test]
    fn cross_entropy_gradient_matches_finite_differences(
        (x, cols) in batch(finite_logit()),
        seed in 0usize..1000,
        smoothing in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        reduction in prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), Just(Reduction::None)],
    ) {
        let Some(ctx) = context() else { return Ok(()) };
        let rows = x.len() / cols;
        let idx: Vec<i64> = (0..rows).map(|r| ((r * 7 + seed) % cols) as i64).collect();
        let options = CrossEntropyOptions { reduction, label_smoothing: smoothing, ..Default::default() };
        let targets = Targets::Indices(&idx);
        let got = ctx.cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One).unwrap();
        let want = reference::cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
        let cmp = Tolerance { abs: 1e-5, rel: 2e-5 }.compare(&got.loss, &want.loss);
        prop_assert!(cmp.passed(), "loss {:?}", cmp);
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let total = |x: &[f64]| -> f64 {
            reference::cross_entropy_loss_f64(x, cols, targets, &options).unwrap().iter().sum()
        };
        let h = 1e-6;
        for i in (0..x.len()).step_by((x.len() / 8).max(1)) {
            let (mut plus, mut minus) = (x64.clone(), x64.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd = (total(&plus) - total(&minus)) / (2.0 * h);
            prop_assert!(
                (f64::from(got.grad[i]) - fd).abs() <= 2e-5 + 1e-4 * fd.abs(),
                "element {}: {} vs {}", i, got.grad[i], fd
            );
        }
    }
}
