//! The conformance suite: every documented edge case, for every op (softmax, log-softmax, both
//! backward passes, cross-entropy loss and fused gradient), on the GPU against the f64 reference.
//! Each test is a row of the README's edge-case table.

mod common;

use common::{
    assert_grad_close, device_softmax_and_backward, logits, small_limits_context, with_gpu,
};
use wgpu_softmax::cpu::{self, reference};
use wgpu_softmax::{
    Context, CrossEntropyBuffers, CrossEntropyLoss, CrossEntropyOptions, GradDestination,
    GradOutput, Reduction, TargetEncoding, Targets, Tolerance,
};

const INF: f32 = f32::INFINITY;

/// Cross-entropy losses accumulate over up to a million classes in f32.
const LOSS: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 2e-5,
};

fn assert_close(got: &[f32], want: &[f64], tolerance: Tolerance, what: &str) {
    let cmp = tolerance.compare(got, want);
    assert!(cmp.passed(), "{what}: {cmp:?}");
}

/// Every row whose softmax is defined (no NaN, no +inf, not all -inf) sums to one.
fn assert_finite_rows_sum_to_one(x: &[f32], probs: &[f32], cols: usize, what: &str) {
    for (r, (xs, ps)) in x.chunks(cols).zip(probs.chunks(cols)).enumerate() {
        let defined = xs.iter().all(|v| !v.is_nan() && *v != INF) && xs.iter().any(|v| *v > -INF);
        if defined {
            let sum: f64 = ps.iter().map(|&p| f64::from(p)).sum();
            assert!((sum - 1.0).abs() <= 1e-5, "{what}: row {r} sums to {sum}");
        }
    }
}

/// Equal element by element, NaN matching NaN.
fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (x.is_nan() && y.is_nan()))
}

fn targets_for(rows: usize, cols: usize) -> Vec<i64> {
    (0..rows)
        .map(|r| {
            if r % 5 == 3 {
                -100
            } else {
                ((r * 7919 + 13) % cols) as i64
            }
        })
        .collect()
}

/// Runs all six ops on `x` and checks each against the reference.
fn check_every_op(ctx: &Context, x: &[f32], cols: usize, what: &str) {
    let rows = x.len() / cols;
    let probs = ctx.softmax(x, cols).expect("softmax");
    assert_close(
        &probs,
        &reference::softmax(x, cols).unwrap(),
        Tolerance::SOFTMAX,
        &format!("softmax {what}"),
    );
    assert_finite_rows_sum_to_one(x, &probs, cols, what);
    let log_probs = ctx.log_softmax(x, cols).expect("log_softmax");
    assert_close(
        &log_probs,
        &reference::log_softmax(x, cols).unwrap(),
        Tolerance::LOG_SOFTMAX,
        &format!("log_softmax {what}"),
    );

    let dy = logits(rows, cols, 1.0, 99);
    let got = ctx
        .softmax_backward(&probs, &dy, cols)
        .expect("softmax_backward");
    let want = reference::softmax_backward(&probs, &dy, cols).unwrap();
    let cmp = Tolerance::SOFTMAX.compare_backward_of(&got, &want, [&probs, &dy], cols, false);
    assert!(cmp.passed(), "softmax_backward {what}: {cmp:?}");
    let got = ctx
        .log_softmax_backward(&log_probs, &dy, cols)
        .expect("log_softmax_backward");
    let want = reference::log_softmax_backward(&log_probs, &dy, cols).unwrap();
    let cmp =
        Tolerance::LOG_SOFTMAX.compare_backward_of(&got, &want, [&log_probs, &dy], cols, true);
    assert!(cmp.passed(), "log_softmax_backward {what}: {cmp:?}");

    let idx = targets_for(rows, cols);
    for reduction in [Reduction::Mean, Reduction::None] {
        let options = CrossEntropyOptions {
            reduction,
            label_smoothing: 0.1,
            ..Default::default()
        };
        let targets = Targets::Indices(&idx);
        let got = ctx
            .cross_entropy_with_grad(x, cols, targets, &options, GradOutput::One)
            .expect("cross_entropy_with_grad");
        let want = reference::cross_entropy(x, cols, targets, &options, GradOutput::One).unwrap();
        let what = format!("cross-entropy {reduction:?} {what}");
        assert_close(&got.loss, &want.loss, LOSS, &what);
        assert_grad_close(&got.grad, &want.grad, &what);
        let loss = ctx.cross_entropy(x, cols, targets, &options).unwrap();
        assert!(same(&loss, &got.loss), "{what}: loss alone {loss:?}");
    }
}

/// The shapes of PyTorch's softmax tests, plus a single column and two columns.
#[test]
fn pytorch_shapes_match_the_reference_for_every_op() {
    with_gpu(|ctx| {
        for (i, &(rows, cols)) in [
            (0, 10),
            (32, 20),
            (31, 20),
            (32, 21),
            (31, 23),
            (32, 1536),
            (31, 2048),
            (33, 2049),
            (16, 30576),
            (9, 1),
            (9, 2),
        ]
        .iter()
        .enumerate()
        {
            let x = logits(rows, cols, 3.0, i as u64);
            check_every_op(ctx, &x, cols, &format!("{rows}x{cols}"));
        }
    });
}

/// Rows longer than any workgroup holds: the split-row kernels, and on software adapters the
/// loop budget (a row of 2^20 would run past 65 535 iterations in one invocation).
#[test]
fn very_long_rows_match_the_reference_for_every_op() {
    with_gpu(|ctx| {
        for (rows, cols) in [(2, 300_000), (1, 1 << 20)] {
            let x = logits(rows, cols, 3.0, cols as u64);
            check_every_op(ctx, &x, cols, &format!("{rows}x{cols}"));
        }
    });
}

#[test]
fn translation_invariance_holds_for_offsets_1e4_and_1e7() {
    with_gpu(|ctx| {
        for cols in [1, 2, 20, 2049, 70_001] {
            let rows = 3;
            // Small integers: x + c is exact in f32 for both offsets, so the results must be
            // bitwise equal, not merely close.
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 17) as f32 - 8.0)
                .collect();
            let idx = targets_for(rows, cols);
            let options = CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            };
            let ce = |x: &[f32]| {
                ctx.cross_entropy_with_grad(
                    x,
                    cols,
                    Targets::Indices(&idx),
                    &options,
                    GradOutput::One,
                )
                .unwrap()
            };
            let base = (
                ctx.softmax(&x, cols).unwrap(),
                ctx.log_softmax(&x, cols).unwrap(),
                ce(&x),
            );
            for c in [1e4f32, 1e7] {
                let shifted: Vec<f32> = x.iter().map(|v| v + c).collect();
                let what = format!("cols {cols} offset {c}");
                let probs = ctx.softmax(&shifted, cols).unwrap();
                assert_eq!(probs, base.0, "softmax {what}");
                assert_eq!(
                    ctx.log_softmax(&shifted, cols).unwrap(),
                    base.1,
                    "log_softmax {what}"
                );
                let out = ce(&shifted);
                assert_eq!(out.loss, base.2.loss, "cross-entropy loss {what}");
                assert_eq!(out.grad, base.2.grad, "cross-entropy grad {what}");
                // The backward ops see y, not x: equal y gives equal gradients.
                let dy = logits(rows, cols, 1.0, 5);
                assert_eq!(
                    ctx.softmax_backward(&probs, &dy, cols).unwrap(),
                    ctx.softmax_backward(&base.0, &dy, cols).unwrap(),
                    "softmax_backward {what}"
                );
            }
        }
    });
}

#[test]
fn a_dominant_logit_takes_all_the_mass() {
    with_gpu(|ctx| {
        let x = [1000.0, 0.0, 0.0, 0.0];
        assert_eq!(ctx.softmax(&x, 4).unwrap(), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(
            ctx.log_softmax(&x, 4).unwrap(),
            [0.0, -1000.0, -1000.0, -1000.0]
        );
        assert_eq!(ctx.log_softmax(&[1000.0, 1.0], 2).unwrap(), [0.0, -999.0]);
        // The winning class as target: no loss, and a gradient of exactly zero.
        let sum = CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let out = ctx
            .cross_entropy_with_grad(&x, 4, Targets::Indices(&[0]), &sum, GradOutput::One)
            .unwrap();
        assert_eq!(out.loss, [0.0]);
        assert_eq!(out.grad, [0.0; 4]);
        // A losing class as target: loss 1000, gradient (1, -1) at the two classes.
        let out = ctx
            .cross_entropy_with_grad(&x, 4, Targets::Indices(&[2]), &sum, GradOutput::One)
            .unwrap();
        assert_eq!(out.loss, [1000.0]);
        assert_eq!(out.grad, [1.0, 0.0, -1.0, 0.0]);
        // The backward passes at a saturated softmax.
        let y = [1.0, 0.0, 0.0, 0.0];
        let dy = [0.5, 1.0, -2.0, 3.0];
        assert_eq!(ctx.softmax_backward(&y, &dy, 4).unwrap(), [0.0; 4]);
        let ly = [0.0, -1000.0, -1000.0, -1000.0];
        assert_close(
            &ctx.log_softmax_backward(&ly, &dy, 4).unwrap(),
            &reference::log_softmax_backward(&ly, &dy, 4).unwrap(),
            Tolerance::LOG_SOFTMAX,
            "log_softmax_backward saturated",
        );
    });
}

/// Rows: a -inf entry, all -inf, a +inf, a NaN, then two ordinary rows that must be untouched.
fn special_rows(cols: usize) -> Vec<f32> {
    let mut x = logits(6, cols, 1.0, 7);
    let row = |r: usize| r * cols..(r + 1) * cols;
    x[row(0).start + cols / 2] = -INF;
    x[row(1)].fill(-INF);
    x[row(2).start] = INF;
    x[row(3).end - 1] = f32::NAN;
    x
}

#[test]
fn special_values_follow_the_documented_policy_in_every_op() {
    with_gpu(|ctx| {
        for cols in [2, 40, 5000, 70_001] {
            let x = special_rows(cols);
            let row = |r: usize| r * cols..(r + 1) * cols;
            let what = format!("cols {cols}");
            let probs = ctx.softmax(&x, cols).unwrap();
            let log_probs = ctx.log_softmax(&x, cols).unwrap();
            assert_eq!(probs[row(0).start + cols / 2], 0.0, "{what}");
            assert_eq!(log_probs[row(0).start + cols / 2], -INF, "{what}");
            for r in 1..4 {
                assert!(probs[row(r)].iter().all(|v| v.is_nan()), "{what} row {r}");
                assert!(
                    log_probs[row(r)].iter().all(|v| v.is_nan()),
                    "{what} row {r}"
                );
            }
            for r in [0, 4, 5] {
                assert!(
                    probs[row(r)].iter().all(|v| v.is_finite()),
                    "{what} row {r}"
                );
            }
            // Everything else, including the NaN placement, as the reference says.
            check_every_op(ctx, &x, cols, &what);

            // Cross-entropy: a -inf logit with no target mass contributes nothing; at the target
            // the loss is +inf; NaN, +inf and all -inf rows are NaN; other rows are untouched.
            let none = CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            };
            let off_target = ((cols / 2 + 1) % cols) as i64;
            let idx = [off_target, 0, 0, 0, 1 % cols as i64, 0];
            let out = ctx
                .cross_entropy_with_grad(&x, cols, Targets::Indices(&idx), &none, GradOutput::One)
                .unwrap();
            if cols > 1 {
                assert!(out.loss[0].is_finite(), "{what}: -inf off target");
                assert_eq!(out.grad[row(0).start + cols / 2], 0.0, "{what}");
            }
            for r in 1..4 {
                assert!(out.loss[r].is_nan(), "{what}: loss row {r}");
                assert!(out.grad[row(r)].iter().all(|g| g.is_nan()), "{what} {r}");
            }
            assert!(out.loss[4].is_finite() && out.loss[5].is_finite(), "{what}");
            let at_target = [(cols / 2) as i64, 0, 0, 0, 0, 0];
            let loss = ctx
                .cross_entropy(&x, cols, Targets::Indices(&at_target), &none)
                .unwrap();
            assert_eq!(loss[0], INF, "{what}: -inf at the target");
            // Probability targets with zero mass on the -inf class: finite.
            let mut p = vec![0.0f32; x.len()];
            for r in 0..6 {
                p[r * cols + (cols / 2 + 1) % cols] = 1.0;
            }
            let loss = ctx
                .cross_entropy(&x, cols, Targets::Probabilities(&p), &none)
                .unwrap();
            let want = reference::cross_entropy_loss_f64(
                &x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                cols,
                Targets::Probabilities(&p),
                &none,
            )
            .unwrap();
            assert_close(&loss, &want, LOSS, &format!("{what} probabilities"));
            if cols > 1 {
                assert!(loss[0].is_finite(), "{what}: zero mass on -inf");
            }
        }
    });
}

#[test]
fn empty_batches_give_empty_results() {
    with_gpu(|ctx| {
        assert!(ctx.softmax(&[], 7).unwrap().is_empty());
        assert!(ctx.log_softmax(&[], 7).unwrap().is_empty());
        assert!(ctx.softmax_backward(&[], &[], 7).unwrap().is_empty());
        assert!(ctx.log_softmax_backward(&[], &[], 7).unwrap().is_empty());
        let none = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let out = ctx
            .cross_entropy_with_grad(&[], 7, Targets::Indices(&[]), &none, GradOutput::One)
            .unwrap();
        assert!(out.loss.is_empty() && out.grad.is_empty());
        // PyTorch: the sum of nothing is +0 (not -0), the mean of nothing is NaN; on every
        // path and in every form.
        let no_rows = Targets::Indices(&[]);
        for reduction in [Reduction::Sum, Reduction::Mean] {
            let options = CrossEntropyOptions {
                reduction,
                ..Default::default()
            };
            let loss_fn = ctx.cross_entropy_loss(7, &options).unwrap();
            let x = ctx.upload(&[], 7).unwrap();
            let targets = loss_fn.upload_targets(no_rows).unwrap();
            let f64_loss = reference::cross_entropy(&[], 7, no_rows, &options, GradOutput::One)
                .unwrap()
                .loss;
            let fast = cpu::fast::cross_entropy(&[], 7, no_rows, &options, GradOutput::One)
                .unwrap()
                .loss;
            let with_grad = loss_fn
                .loss_and_grad(&x, &targets, GradOutput::One)
                .unwrap();
            assert!(with_grad.grad.is_empty());
            let found = [
                ("reference", f64_loss.iter().map(|&l| l as f32).collect()),
                ("cpu::fast", fast),
                (
                    "host",
                    ctx.cross_entropy(&[], 7, no_rows, &options).unwrap(),
                ),
                (
                    "tensor",
                    loss_fn.loss(&x, &targets).unwrap().to_vec().unwrap(),
                ),
                ("tensor with grad", with_grad.loss.to_vec().unwrap()),
                ("encode", encode_empty_loss(ctx, &loss_fn)),
            ];
            for (form, loss) in found {
                let ok = match reduction {
                    Reduction::Sum => loss.len() == 1 && loss[0].to_bits() == 0,
                    _ => loss.len() == 1 && loss[0].is_nan(),
                };
                assert!(ok, "{reduction:?} over no rows, {form}: {loss:?}");
            }
        }
    });
}

/// The reduced loss of no rows through `CrossEntropyLoss::encode`, on buffers of zero bytes
/// (a caller's natural buffers for an empty batch): the call and its submission raise no error.
fn encode_empty_loss(ctx: &Context, loss_fn: &CrossEntropyLoss) -> Vec<f32> {
    use wgpu::BufferUsages as U;
    let device = ctx.device();
    let buffer = |size| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: U::STORAGE | U::COPY_DST | U::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let (logits, targets, grad, loss) = (buffer(0), buffer(0), buffer(0), ctx.empty(1, 1).unwrap());
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut encoder = device.create_command_encoder(&Default::default());
    let buffers = CrossEntropyBuffers {
        logits: (&logits).into(),
        targets: (&targets).into(),
        target_encoding: TargetEncoding::Indices,
        loss: loss.buffer().into(),
        grad: GradDestination::Buffer((&grad).into()),
        rows: 0,
    };
    loss_fn.encode(&mut encoder, buffers, 1.0).unwrap();
    ctx.queue().submit([encoder.finish()]);
    let error = pollster::block_on(scope.pop());
    assert!(error.is_none(), "{error:?}");
    loss.to_vec().unwrap()
}

#[test]
fn identical_rows_give_identical_outputs_across_more_than_65535_rows() {
    with_gpu(|ctx| {
        for cols in [3, 64] {
            let rows = 70_000;
            let one = logits(1, cols, 4.0, cols as u64);
            let x: Vec<f32> = one.iter().copied().cycle().take(rows * cols).collect();
            let dy_row = logits(1, cols, 1.0, 2);
            let dy: Vec<f32> = dy_row.iter().copied().cycle().take(rows * cols).collect();
            let probs = ctx.softmax(&x, cols).unwrap();
            let log_probs = ctx.log_softmax(&x, cols).unwrap();
            let dx = ctx.softmax_backward(&probs, &dy, cols).unwrap();
            let ldx = ctx.log_softmax_backward(&log_probs, &dy, cols).unwrap();
            let idx = vec![1i64; rows];
            let none = CrossEntropyOptions {
                reduction: Reduction::None,
                ..Default::default()
            };
            let ce = ctx
                .cross_entropy_with_grad(&x, cols, Targets::Indices(&idx), &none, GradOutput::One)
                .unwrap();
            for (name, out, width) in [
                ("softmax", &probs, cols),
                ("log_softmax", &log_probs, cols),
                ("softmax_backward", &dx, cols),
                ("log_softmax_backward", &ldx, cols),
                ("cross-entropy loss", &ce.loss, 1),
                ("cross-entropy grad", &ce.grad, cols),
            ] {
                let first = &out[..width];
                for (r, row) in out.chunks(width).enumerate() {
                    assert_eq!(row, first, "{name} cols {cols} row {r}");
                }
            }
            assert_close(
                &probs[..cols],
                &reference::softmax(&one, cols).unwrap(),
                Tolerance::SOFTMAX,
                "first row",
            );
        }
    });
}

/// The host forms of every op on a device whose binding is 1 MiB and whose largest buffer is
/// 4 MiB: batches of 3 MiB (several bindings) and 10 MiB (more than a buffer) are split into
/// row blocks and give what one pass would.
#[test]
fn every_host_form_splits_batches_larger_than_a_binding_or_a_buffer() {
    with_gpu(|base| {
        let ctx = small_limits_context(base);
        let limits = ctx.device().limits();
        assert_eq!(limits.max_buffer_size, 4 << 20);
        for (rows, cols) in [(3 << 8, 1000), (10 << 8, 1000), (700_000, 4)] {
            let x = logits(rows, cols, 2.0, rows as u64);
            let what = format!("small limits {rows}x{cols}");
            assert!(x.len() * 4 > 1 << 20, "{what}");
            check_every_op(&ctx, &x, cols, &what);
            // Reductions over blocks: the sum and the weighted mean of all rows, not of a block.
            let idx = targets_for(rows, cols);
            let weight: Vec<f32> = (0..cols).map(|c| 0.5 + c as f32 * 0.25).collect();
            let probs = reference::softmax(&logits(rows, cols, 1.0, 3), cols)
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect::<Vec<_>>();
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for reduction in [Reduction::Sum, Reduction::Mean] {
                    let options = CrossEntropyOptions {
                        weight: Some(&weight),
                        reduction,
                        ..Default::default()
                    };
                    let g = GradOutput::Scalar(0.5);
                    let got = ctx
                        .cross_entropy_with_grad(&x, cols, targets, &options, g)
                        .unwrap();
                    let want = reference::cross_entropy(&x, cols, targets, &options, g).unwrap();
                    let what = format!("{what} {reduction:?}");
                    assert_close(&got.loss, &want.loss, LOSS, &what);
                    assert_grad_close(&got.grad, &want.grad, &what);
                }
            }
        }
        // The device-resident forms stay limited to one buffer.
        let x = logits(10 << 8, 1000, 1.0, 1);
        assert!(matches!(
            ctx.upload(&x, 1000),
            Err(wgpu_softmax::Error::TensorTooLarge { .. })
        ));
    });
}

/// One real batch over 128 MiB (the default binding size) per op family. Slow on software
/// adapters (a few seconds each); the small-limits test above covers the splitting logic.
#[test]
fn backward_and_cross_entropy_batches_over_128_mib() {
    with_gpu(|ctx| {
        let cols = 1000;
        let rows = (130 << 20) / (cols * 4) + 7;
        let x = logits(rows, cols, 2.0, 21);
        assert!(x.len() * 4 > 128 << 20);
        let dy = logits(rows, cols, 1.0, 22);
        let y: Vec<f32> = reference::softmax(&x, cols)
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_close(
            &ctx.softmax_backward(&y, &dy, cols).unwrap(),
            &reference::softmax_backward(&y, &dy, cols).unwrap(),
            Tolerance::SOFTMAX,
            "softmax_backward over 128 MiB",
        );
        drop((y, dy));
        let idx = targets_for(rows, cols);
        let options = CrossEntropyOptions::default();
        let targets = Targets::Indices(&idx);
        let got = ctx
            .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
            .unwrap();
        let want = reference::cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
        assert_close(&got.loss, &want.loss, LOSS, "cross-entropy over 128 MiB");
        assert_grad_close(&got.grad, &want.grad, "cross-entropy over 128 MiB");
    });
}

/// Device-resident tensors larger than one binding (but within one buffer) on the small device:
/// the row kernels are windowed, so a reduced cross-entropy whose logits span several windows
/// (70000x5) sums every window's rows; its passes over the batch read one value per row through
/// one binding, so more rows than one binding holds words (300000) are refused, not summed in
/// part.
#[test]
fn device_tensors_over_one_binding_are_right_or_refused() {
    with_gpu(|base| {
        let ctx = small_limits_context(base);
        for (rows, cols) in [(300_000, 3), (70_000, 5)] {
            device_tensors_over_one_binding(&ctx, rows, cols);
        }
    });
}

fn device_tensors_over_one_binding(ctx: &Context, rows: usize, cols: usize) {
    let x = logits(rows, cols, 2.0, 8);
    assert!(x.len() * 4 > 1 << 20 && x.len() * 4 <= 4 << 20);
    let refused = rows * 4 > 1 << 20;
    let t = ctx.upload(&x, cols).unwrap();
    let idx = targets_for(rows, cols);
    let dy = logits(rows, cols, 1.0, 9);
    let (y, dx) = device_softmax_and_backward(ctx, &t, &dy);
    assert_close(
        &dx,
        &reference::softmax_backward(&y, &dy, cols).unwrap(),
        Tolerance::SOFTMAX,
        &format!("device {rows}x{cols} softmax_backward over one binding"),
    );
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let options = CrossEntropyOptions {
            reduction,
            ..Default::default()
        };
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        let targets = loss_fn.upload_targets(Targets::Indices(&idx)).unwrap();
        let want =
            reference::cross_entropy(&x, cols, Targets::Indices(&idx), &options, GradOutput::One)
                .unwrap();
        match loss_fn.loss_and_grad(&t, &targets, GradOutput::One) {
            Ok(out) => {
                let what = format!("device {rows}x{cols} {reduction:?} over one binding");
                assert_close(&out.loss.to_vec().unwrap(), &want.loss, LOSS, &what);
                assert_grad_close(&out.grad.to_vec().unwrap(), &want.grad, &what);
            }
            Err(wgpu_softmax::Error::ShapeTooLarge { what, value, .. }) if refused => {
                assert_ne!(reduction, Reduction::None);
                assert_eq!(value, rows, "{what}");
            }
            Err(other) => panic!("{rows}x{cols} {reduction:?}: {other:?}"),
        }
    }
}
