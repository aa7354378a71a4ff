//! Training ops on the GPU against the f64 reference: softmax backward, the Jacobian, and
//! cross-entropy with its fused gradient, over shapes and every option.

mod common;

use common::{
    assert_grad_close, assert_same_bits, bounded_context, check_backward, check_host_and_in_place,
    cross_entropy_options, device_on_same_adapter, index_targets, logits, one_pass_contexts,
    probability_targets, small_limits_context, strategy_tunings, tuned, with_gpu, LOSS_TOLERANCE,
    ONE_PASS_OTHER_CHUNKS, ONE_PASS_SHAPES,
};
use wgpu_softmax::cpu::{reference, CrossEntropyOutput};
use wgpu_softmax::{
    Context, CrossEntropyBuffers, CrossEntropyOptions, Error, GradDestination, GradOutput,
    Reduction, TargetEncoding, Targets, Tolerance, Tuning,
};

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (4, 2),
    (3, 7),
    (33, 2049),
    (2, 50_000),
    (70_000, 10),
    (3, 70_001),
];

#[test]
fn backward_matches_the_reference_on_every_shape() {
    with_gpu(|ctx| {
        for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
            let x = logits(rows, cols, 2.0, i as u64);
            let dy = logits(rows, cols, 1.0, 100 + i as u64);
            check_backward(ctx, &x, &dy, cols, &format!("{rows}x{cols}"));
        }
    });
}

/// The backward ops' split rows taken in one pass (`backward_split_wait`), as cross-entropy's
/// below: against the reference, and the same bits whichever pass wrote a chunk. Row 1 of the
/// wider shapes has a NaN in dy and row 2 a chunk of y = 0 (softmax) or -inf (log-softmax):
/// NaN reaches every element of its row only, and the chunk's shares are 0.
#[test]
fn backward_split_rows_in_one_pass_match_whichever_pass_writes_them() {
    with_gpu(|base| {
        let contexts = one_pass_contexts(base, |t, wait| t.backward_split_wait = wait);
        for (rows, cols) in ONE_PASS_SHAPES {
            let mut x = logits(rows, cols, 2.0, cols as u64);
            let mut dy = logits(rows, cols, 1.0, 1 + cols as u64);
            let wide = rows > 2 && cols > 300;
            if wide {
                dy[cols + 7] = f32::NAN;
                x[2 * cols..2 * cols + 300].fill(f32::NEG_INFINITY);
            }
            let as_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
            let y = as_f32(reference::softmax(&x, cols).unwrap());
            let ly = as_f32(reference::log_softmax(&x, cols).unwrap());
            let want = reference::softmax_backward(&y, &dy, cols).unwrap();
            let want_log = reference::log_softmax_backward(&ly, &dy, cols).unwrap();
            if wide {
                assert!(want[cols..2 * cols].iter().all(|v| v.is_nan()));
                assert!(want[2 * cols..].iter().all(|v| v.is_finite()));
            }
            let mut first = None;
            for (name, ctx) in &contexts {
                let what = format!("{name} {rows}x{cols}");
                let got = ctx.softmax_backward(&y, &dy, cols).unwrap();
                let cmp = Tolerance::SOFTMAX.compare(&got, &want);
                assert!(cmp.passed(), "softmax_backward {what}: {cmp:?}");
                let got_log = ctx.log_softmax_backward(&ly, &dy, cols).unwrap();
                let cmp = Tolerance::LOG_SOFTMAX.compare(&got_log, &want_log);
                assert!(cmp.passed(), "log_softmax_backward {what}: {cmp:?}");
                if *name == ONE_PASS_OTHER_CHUNKS {
                    continue;
                }
                assert_same_bits(&mut first, vec![got, got_log], &what);
            }
        }
    });
}

#[test]
fn backward_device_and_encode_forms_agree_with_the_host_form() {
    with_gpu(|ctx| {
        let (rows, cols) = (20, 300);
        let x = logits(rows, cols, 2.0, 1);
        let dy = logits(rows, cols, 1.0, 2);
        let y = ctx.upload(&x, cols).unwrap().softmax().unwrap();
        let g = ctx.upload(&dy, cols).unwrap();
        let dx = y.softmax_backward(&g).unwrap().to_vec().unwrap();
        let host = ctx
            .softmax_backward(&y.to_vec().unwrap(), &dy, cols)
            .unwrap();
        assert_eq!(dx, host);
        let out = ctx.empty(rows, cols).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_softmax_backward(
            &mut encoder,
            y.buffer(),
            g.buffer(),
            out.buffer(),
            rows,
            cols,
        )
        .unwrap();
        ctx.queue().submit([encoder.finish()]);
        assert_eq!(out.to_vec().unwrap(), host);
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        assert!(matches!(
            ctx.encode_softmax_backward(
                &mut encoder,
                y.buffer(),
                g.buffer(),
                g.buffer(),
                rows,
                cols
            ),
            Err(Error::Aliased { .. })
        ));
        assert!(matches!(
            ctx.softmax_backward(&x, &dy[1..], cols),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
    });
}

#[test]
fn jacobian_matches_the_reference_and_its_cap() {
    with_gpu(|ctx| {
        for &(rows, cols) in &[(1, 1), (5, 3), (7, 40), (2, 300)] {
            let x = logits(rows, cols, 2.0, cols as u64);
            let got = ctx.softmax_jacobian(&x, cols).unwrap();
            let want = reference::softmax_jacobian(&x, cols).unwrap();
            let cmp = Tolerance::SOFTMAX.compare(&got, &want);
            assert!(cmp.passed(), "jacobian {rows}x{cols}: {cmp:?}");
        }
        // The encode form on the caller's buffers gives the host form's result.
        let (rows, cols) = (9, 12);
        let x = logits(rows, cols, 2.0, 99);
        let input = ctx.upload(&x, cols).unwrap();
        let output = ctx.empty(rows, cols * cols).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_softmax_jacobian(&mut encoder, input.buffer(), output.buffer(), rows, cols)
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        assert_eq!(
            output.to_vec().unwrap(),
            ctx.softmax_jacobian(&x, cols).unwrap()
        );
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        assert!(matches!(
            ctx.encode_softmax_jacobian(&mut encoder, input.buffer(), input.buffer(), rows, cols),
            Err(Error::BufferTooSmall { what: "output", .. })
        ));
        // Calls recorded one after another share the probabilities buffer; a wider one grows it.
        let (x2, cols2) = (logits(3, 50, 2.0, 7), 50);
        let input2 = ctx.upload(&x2, cols2).unwrap();
        let output2 = ctx.empty(3, cols2 * cols2).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_softmax_jacobian(&mut encoder, input.buffer(), output.buffer(), rows, cols)
            .unwrap();
        ctx.encode_softmax_jacobian(&mut encoder, input2.buffer(), output2.buffer(), 3, cols2)
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        assert_eq!(
            output.to_vec().unwrap(),
            ctx.softmax_jacobian(&x, cols).unwrap()
        );
        let cmp = Tolerance::SOFTMAX.compare(
            &output2.to_vec().unwrap(),
            &reference::softmax_jacobian(&x2, cols2).unwrap(),
        );
        assert!(cmp.passed(), "second recorded jacobian: {cmp:?}");
        let wide = vec![0.0; 1025];
        assert!(matches!(
            ctx.softmax_jacobian(&wide, 1025),
            Err(Error::JacobianTooWide {
                cols: 1025,
                max: 1024
            })
        ));
    });
}

/// Every combination of target kind, weights, smoothing and reduction, on several shapes.
#[test]
fn cross_entropy_matches_the_reference_for_every_option() {
    with_gpu(|ctx| {
        for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
            let x = logits(rows, cols, 3.0, 10 + i as u64);
            let idx = index_targets(rows, cols, i as u64, 5);
            let probs = probability_targets(rows, cols, 20 + i as u64);
            let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
            let per_row: Vec<f32> = (0..rows).map(|r| 1.0 + (r % 3) as f32).collect();
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for (options, grad_output) in cross_entropy_options(&weight, &per_row) {
                    let what = format!(
                        "{rows}x{cols} probabilities={} {options:?}",
                        matches!(targets, Targets::Probabilities(_)),
                    );
                    let got = ctx
                        .cross_entropy_with_grad(&x, cols, targets, &options, grad_output)
                        .unwrap();
                    let want =
                        reference::cross_entropy(&x, cols, targets, &options, grad_output).unwrap();
                    let cmp = LOSS_TOLERANCE.compare(&got.loss, &want.loss);
                    assert!(cmp.passed(), "{what}: loss {cmp:?}");
                    assert_grad_close(&got.grad, &want.grad, &what);
                    let loss_only = ctx.cross_entropy(&x, cols, targets, &options).unwrap();
                    assert_eq!(loss_only, got.loss, "{what}: loss-only kernel");
                }
            }
        }
    });
}

/// The device-resident forms reduce over the batch on the device: the mean's divisor and the
/// reduced loss are sums over the rows, in one pass for a batch of one block and beyond in two
/// (per-block partials by invocation or by workgroup, then their sum) or in one (the blocks'
/// sums tallied, the last workgroup adding them), the loss also in the row pass itself (its
/// workgroups' sums tallied), on a 2-D grid where the workgroups outnumber the device's
/// workgroups per dimension, and with blocks of other sizes. Each context runs the cases one
/// after another, so a tally left dirty by one call would spoil the next. The mean's divisor is
/// found on the host for uploaded targets and on the device otherwise: both are checked.
#[test]
fn device_reductions_match_the_reference_on_every_batch_size() {
    with_gpu(|base| {
        let (device, queue) = device_on_same_adapter(base, |limits| wgpu::Limits {
            max_compute_workgroups_per_dimension: 40,
            ..limits
        });
        let mut contexts = Vec::new();
        // loss_tally 2: the row pass adds up the loss of calls of at most two workgroups.
        let every = u32::MAX;
        for (batch_team, batch_tally, loss_tally) in
            [(0, 0, 0), (2, 0, 0), (0, 1, 0), (0, 1, every), (0, 0, 2)]
        {
            let tuning = Tuning {
                batch_team,
                batch_tally,
                loss_tally,
                ..Tuning::SOFTWARE
            };
            let name = format!(
                "batch_team={batch_team} batch_tally={batch_tally} loss_tally={loss_tally}"
            );
            contexts.push((name.clone(), tuned(base, tuning)));
            let narrow = Context::from_device_with_tuning(device.clone(), queue.clone(), tuning)
                .expect("adopt a device with a narrow grid");
            contexts.push((format!("{name}, 40 per dimension"), narrow));
        }
        // Blocks of 3 rows per invocation (a row count no power of two) and of 1 (what GPUs
        // use: many blocks for the second pass, or many slots for the tally).
        for (batch_rows, batch_tally) in [(3, 0), (1, 0), (1, 1)] {
            let tuning = Tuning {
                batch_rows,
                batch_tally,
                ..Tuning::SOFTWARE
            };
            let name = format!("batch_rows={batch_rows} batch_tally={batch_tally}");
            contexts.push((name, tuned(base, tuning)));
        }
        let weight = [0.5, 2.0, 1.25];
        let reversed = [1.25, 2.0, 0.5];
        for &(rows, cols) in &[(1, 3), (31, 3), (4096, 3), (4097, 3), (300_000, 2)] {
            let x = logits(rows, cols, 2.0, rows as u64);
            let idx = index_targets(rows, cols, 5, 7);
            let idx32: Vec<i32> = idx.iter().map(|&v| v as i32).collect();
            let probs = probability_targets(rows, cols, 6);
            let cases = [
                (Targets::Indices(&idx), None),
                (Targets::Indices(&idx), Some(&weight[..cols])),
                (Targets::Probabilities(&probs), None),
            ];
            for (targets, weight) in cases {
                let probabilities = matches!(targets, Targets::Probabilities(_));
                for reduction in [Reduction::Mean, Reduction::Sum] {
                    let options = CrossEntropyOptions {
                        weight,
                        reduction,
                        ..Default::default()
                    };
                    // Another loss's weights (reversed) over the same uploaded targets.
                    let other_options = CrossEntropyOptions {
                        weight: weight.map(|_| &reversed[reversed.len() - cols..]),
                        ..options
                    };
                    let reference = |options| {
                        reference::cross_entropy(
                            &x,
                            cols,
                            targets,
                            options,
                            GradOutput::Scalar(0.5),
                        )
                        .unwrap()
                    };
                    let (want, other_want) = (reference(&options), reference(&other_options));
                    for (i, (name, ctx)) in contexts.iter().enumerate() {
                        // Probability targets reduce as index targets do: the first context
                        // covers them.
                        if probabilities && i > 0 {
                            continue;
                        }
                        let what = format!(
                            "{name} {rows}x{cols} {reduction:?} probabilities={probabilities} \
                             weighted={}",
                            weight.is_some()
                        );
                        let check = |(loss, grad): (Vec<f32>, Vec<f32>),
                                     want: &CrossEntropyOutput<f64>,
                                     path: &str| {
                            let cmp = LOSS_TOLERANCE.compare(&loss, &want.loss);
                            assert!(cmp.passed(), "{what}, {path}: loss {cmp:?}");
                            assert_grad_close(&grad, &want.grad, &format!("{what}, {path}"));
                        };
                        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
                        let t = ctx.upload(&x, cols).unwrap();
                        let targets_t = loss_fn.upload_targets(targets).unwrap();
                        // The mean's divisor found on the host at upload.
                        let out = loss_fn
                            .loss_and_grad(&t, &targets_t, GradOutput::Scalar(0.5))
                            .unwrap();
                        let loss = out.loss.to_vec().unwrap();
                        check((loss.clone(), out.grad.to_vec().unwrap()), &want, "tensors");
                        let loss_only = loss_fn.loss(&t, &targets_t).unwrap().to_vec().unwrap();
                        assert_eq!(loss_only, loss, "{what}: loss-only kernel");
                        // Found on the device, over the caller's own targets.
                        let (raw, encoding) = if probabilities {
                            (ctx.upload(&probs, cols), TargetEncoding::Probabilities)
                        } else {
                            let words = bytemuck::cast_slice(&idx32);
                            (ctx.upload(words, 1), TargetEncoding::Indices)
                        };
                        let raw = raw.unwrap();
                        let got = recorded_loss_and_grad(ctx, &t, |encoder, loss, grad| {
                            let buffers = CrossEntropyBuffers {
                                logits: t.buffer().into(),
                                targets: raw.buffer().into(),
                                target_encoding: encoding,
                                loss: loss.buffer().into(),
                                grad: GradDestination::Buffer(grad.buffer().into()),
                                rows,
                            };
                            loss_fn.encode(encoder, buffers, 0.5).unwrap();
                        });
                        check(got, &want, "caller's buffers");
                        if i > 0 {
                            continue;
                        }
                        // Recorded into an encoder, as the device-resident form.
                        let got = recorded_loss_and_grad(ctx, &t, |encoder, loss, grad| {
                            let grad = GradDestination::Buffer(grad.buffer().into());
                            loss_fn
                                .encode_tensors(encoder, &t, &targets_t, loss, grad, 0.5)
                                .unwrap();
                        });
                        check(got, &want, "encode_tensors");
                        // Found on the device, over targets another loss uploaded.
                        let other = ctx.cross_entropy_loss(cols, &other_options).unwrap();
                        let out = other
                            .loss_and_grad(&t, &targets_t, GradOutput::Scalar(0.5))
                            .unwrap();
                        let got = (out.loss.to_vec().unwrap(), out.grad.to_vec().unwrap());
                        check(got, &other_want, "another loss's targets");
                    }
                }
            }
        }
    });
}

/// The reduced loss added up in the row pass (`loss_tally`) under every kernel strategy: an
/// invocation, a subgroup or a workgroup per row, rows in registers or streamed, scalar and vec4
/// (split rows keep the batch sum). The calls run one after another: each must leave the tally
/// clean for the next.
#[test]
fn losses_tallied_in_the_row_pass_match_under_every_strategy() {
    with_gpu(|base| {
        let weight: Vec<f32> = (0..2049).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
        for (name, tuning) in strategy_tunings() {
            let ctx = tuned(
                base,
                Tuning {
                    loss_tally: u32::MAX,
                    ..tuning
                },
            );
            for &(rows, cols) in &[(1, 5), (33, 7), (300, 8), (70, 128), (9, 2049), (5, 2048)] {
                let x = logits(rows, cols, 2.0, (rows * cols) as u64);
                let idx = index_targets(rows, cols, 3, 4);
                let probs = probability_targets(rows, cols, 8);
                for (targets, w, reduction) in [
                    (Targets::Indices(&idx), None, Reduction::Mean),
                    (
                        Targets::Indices(&idx),
                        Some(&weight[..cols]),
                        Reduction::Mean,
                    ),
                    (
                        Targets::Indices(&idx),
                        Some(&weight[..cols]),
                        Reduction::Sum,
                    ),
                    (Targets::Probabilities(&probs), None, Reduction::Mean),
                ] {
                    let options = CrossEntropyOptions {
                        weight: w,
                        reduction,
                        label_smoothing: if w.is_some() { 0.1 } else { 0.0 },
                        ..Default::default()
                    };
                    let what = format!(
                        "{name} {rows}x{cols} {reduction:?} probabilities={} weighted={}",
                        matches!(targets, Targets::Probabilities(_)),
                        w.is_some()
                    );
                    let want = reference::cross_entropy(
                        &x,
                        cols,
                        targets,
                        &options,
                        GradOutput::Scalar(2.0),
                    )
                    .unwrap();
                    let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
                    let targets_t = loss_fn.upload_targets(targets).unwrap();
                    let mut t = ctx.upload(&x, cols).unwrap();
                    let loss = loss_fn
                        .loss_and_grad_in_place(&mut t, &targets_t, GradOutput::Scalar(2.0))
                        .unwrap()
                        .to_vec()
                        .unwrap();
                    let cmp = LOSS_TOLERANCE.compare(&loss, &want.loss);
                    assert!(cmp.passed(), "{what}: loss {cmp:?}");
                    assert_grad_close(&t.to_vec().unwrap(), &want.grad, &what);
                }
            }
        }
    });
}

/// Cross-entropy's split rows taken in one pass (`loss_split_wait`): a chunk writes its gradient
/// (and the first chunk its row's loss) when its row's other chunks have shared their
/// statistics within the wait, and the finishing pass does the rest. On any adapter some chunks
/// take each path (a row of one chunk never waits; a short wait leaves most to the finishing
/// pass), and the results must match the reference and be the same bits whichever pass wrote
/// them, out of place and in place (where the finishing pass must read logits no chunk has
/// overwritten yet). Row 1 of the wider shapes starts with a whole chunk of -inf: with its index
/// target there (a loss of +inf, from the chunk's target terms), with label smoothing (mass on
/// every class, so +inf too) and with probability targets that give the chunk no mass (a
/// finite loss). Each context runs every case in turn, each after a mean whose batch sum is
/// tallied, so a call that left its sync words or tally slots behind would hand stale
/// statistics to the next.
#[test]
fn cross_entropy_split_rows_in_one_pass_match_whichever_pass_writes_them() {
    with_gpu(|base| {
        let contexts = one_pass_contexts(base, |t, wait| t.loss_split_wait = wait);
        // A mean over 2000 short rows: its sum over the batch (8 blocks) is tallied in the same buffer as the
        // sync words, and a slot left set would read as a stored statistic in the next split.
        let (tally_rows, tally_cols) = (2000, 8);
        let tally_x = logits(tally_rows, tally_cols, 2.0, 77);
        let tally_idx = index_targets(tally_rows, tally_cols, 78, 0);
        let tally_targets = Targets::Indices(&tally_idx);
        let tally_options = CrossEntropyOptions::default();
        let tally_want = reference::cross_entropy(
            &tally_x,
            tally_cols,
            tally_targets,
            &tally_options,
            GradOutput::One,
        )
        .unwrap();
        for (rows, cols) in ONE_PASS_SHAPES {
            let mut x = logits(rows, cols, 3.0, cols as u64);
            let mut idx = index_targets(rows, cols, 5, 0);
            let mut probs = probability_targets(rows, cols, 6);
            let wide = rows > 1 && cols > 300;
            if wide {
                x[cols..cols + 300].fill(f32::NEG_INFINITY);
                probs[cols..cols + 300].fill(0.0);
                idx[1] = 5;
            }
            if rows > 2 {
                idx[2] = -100;
            }
            let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
            let per_row: Vec<f32> = (0..rows).map(|r| 1.0 + (r % 3) as f32).collect();
            let cases = [
                (
                    "weighted indices",
                    Targets::Indices(&idx),
                    Some(&weight[..]),
                    0.0,
                    Reduction::None,
                    GradOutput::PerRow(&per_row),
                ),
                (
                    "smoothed indices",
                    Targets::Indices(&idx),
                    None,
                    0.1,
                    Reduction::None,
                    GradOutput::PerRow(&per_row),
                ),
                (
                    "weighted probabilities",
                    Targets::Probabilities(&probs),
                    Some(&weight[..]),
                    0.0,
                    Reduction::Mean,
                    GradOutput::Scalar(0.5),
                ),
            ];
            for (case, targets, weight, label_smoothing, reduction, grad_output) in cases {
                let options = CrossEntropyOptions {
                    weight,
                    label_smoothing,
                    reduction,
                    ..Default::default()
                };
                let want =
                    reference::cross_entropy(&x, cols, targets, &options, grad_output).unwrap();
                if wide && reduction == Reduction::None {
                    assert_eq!(want.loss[1], f64::INFINITY, "{case} {rows}x{cols}");
                }
                let mut first = None;
                for (name, ctx) in &contexts {
                    let what = format!("{name} {case} {rows}x{cols}");
                    let tally_fn = ctx.cross_entropy_loss(tally_cols, &tally_options).unwrap();
                    let mut t = ctx.upload(&tally_x, tally_cols).unwrap();
                    let tallied = tally_fn
                        .loss_and_grad_in_place(
                            &mut t,
                            &tally_fn.upload_targets(tally_targets).unwrap(),
                            GradOutput::One,
                        )
                        .unwrap()
                        .to_vec()
                        .unwrap();
                    let cmp = LOSS_TOLERANCE.compare(&tallied, &tally_want.loss);
                    assert!(cmp.passed(), "{what}: tallied mean {cmp:?}");
                    let input = (&x[..], cols, targets, grad_output);
                    let got = check_host_and_in_place(ctx, input, &options, (&want, true), &what);
                    // The same chunking gives the same bits, whichever pass wrote a chunk.
                    if *name == ONE_PASS_OTHER_CHUNKS {
                        continue;
                    }
                    assert_same_bits(&mut first, vec![got.loss, got.grad], &what);
                }
            }
        }
    });
}

/// The loss and gradient that `record` writes, given an encoder, a one-value loss tensor and a
/// gradient tensor shaped like `logits`, once submitted.
fn recorded_loss_and_grad(
    ctx: &Context,
    logits: &wgpu_softmax::Tensor,
    record: impl FnOnce(&mut wgpu::CommandEncoder, &wgpu_softmax::Tensor, &wgpu_softmax::Tensor),
) -> (Vec<f32>, Vec<f32>) {
    let loss = ctx.empty(1, 1).unwrap();
    let grad = ctx.empty(logits.rows(), logits.cols()).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    record(&mut encoder, &loss, &grad);
    ctx.queue().submit([encoder.finish()]);
    (loss.to_vec().unwrap(), grad.to_vec().unwrap())
}

/// Backward and cross-entropy under every kernel strategy, on unaligned rows (scalar kernels, or
/// the vec4s that hold them, shared by neighbouring rows' teams) and aligned ones (vec4 kernels
/// where the family has them), special values included.
#[test]
fn training_ops_match_the_reference_under_every_strategy() {
    with_gpu(|base| {
        for (name, tuning) in strategy_tunings() {
            let ctx = tuned(base, tuning);
            for &(rows, cols) in &[
                (9, 2),
                (3, 7),
                (33, 2049),
                (5, 8),
                (70, 128),
                (5, 100),
                (33, 2048),
                (5, 1000),
                (2, 20_000),
            ] {
                let what = format!("{name} {rows}x{cols}");
                let mut x = logits(rows, cols, 2.0, cols as u64);
                x[cols / 2] = f32::NEG_INFINITY;
                let dy = logits(rows, cols, 1.0, 1 + cols as u64);
                check_backward(&ctx, &x, &dy, cols, &what);

                let idx = index_targets(rows, cols, 3, 4);
                let probs = probability_targets(rows, cols, 4);
                let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
                for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                    let options = CrossEntropyOptions {
                        weight: Some(&weight),
                        label_smoothing: 0.1,
                        ..Default::default()
                    };
                    let got = ctx
                        .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
                        .unwrap();
                    let want =
                        reference::cross_entropy(&x, cols, targets, &options, GradOutput::One)
                            .unwrap();
                    let cmp = LOSS_TOLERANCE.compare(&got.loss, &want.loss);
                    assert!(cmp.passed(), "cross-entropy {what}: loss {cmp:?}");
                    assert_grad_close(&got.grad, &want.grad, &format!("cross-entropy {what}"));
                }
            }
        }
    });
}

/// The GPU gradient against central differences of the f64 loss, directly.
#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    with_gpu(|ctx| {
        let (rows, cols) = (6, 9);
        let x = logits(rows, cols, 1.5, 77);
        let idx = index_targets(rows, cols, 3, 4);
        let weight: Vec<f32> = (0..cols).map(|c| 1.0 + c as f32 * 0.1).collect();
        let options = CrossEntropyOptions {
            weight: Some(&weight),
            label_smoothing: 0.2,
            ..Default::default()
        };
        let targets = Targets::Indices(&idx);
        let got = ctx
            .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
            .unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let h = 1e-5;
        for i in 0..x.len() {
            let mut plus = x64.clone();
            let mut minus = x64.clone();
            plus[i] += h;
            minus[i] -= h;
            let lp = reference::cross_entropy_loss_f64(&plus, cols, targets, &options).unwrap()[0];
            let lm = reference::cross_entropy_loss_f64(&minus, cols, targets, &options).unwrap()[0];
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (f64::from(got.grad[i]) - fd).abs() < 1e-6,
                "element {i}: {} vs {fd}",
                got.grad[i]
            );
        }
    });
}

#[test]
fn cross_entropy_invariants_hold() {
    with_gpu(|ctx| {
        let (rows, cols) = (300, 37);
        let x = logits(rows, cols, 2.0, 5);
        let idx = index_targets(rows, cols, 6, 7);
        let sum = CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let out = ctx
            .cross_entropy_with_grad(&x, cols, Targets::Indices(&idx), &sum, GradOutput::One)
            .unwrap();
        for (r, row) in out.grad.chunks(cols).enumerate() {
            if idx[r] == -100 {
                assert!(
                    row.iter().all(|&g| g == 0.0),
                    "ignored row {r} must be exactly 0"
                );
            } else {
                let s: f64 = row.iter().map(|&g| f64::from(g)).sum();
                assert!(s.abs() < 1e-5, "row {r} sums to {s}");
            }
        }
        // One-hot probabilities give the loss and gradient of index targets (no row ignored).
        let idx = index_targets(rows, cols, 8, 0);
        let mut onehot = vec![0.0f32; rows * cols];
        for (r, &t) in idx.iter().enumerate() {
            onehot[r * cols + t as usize] = 1.0;
        }
        for reduction in [Reduction::Mean, Reduction::None] {
            let options = CrossEntropyOptions {
                reduction,
                label_smoothing: 0.05,
                ..Default::default()
            };
            let grad_output = GradOutput::One;
            let a = ctx
                .cross_entropy_with_grad(&x, cols, Targets::Indices(&idx), &options, grad_output)
                .unwrap();
            let b = ctx
                .cross_entropy_with_grad(
                    &x,
                    cols,
                    Targets::Probabilities(&onehot),
                    &options,
                    grad_output,
                )
                .unwrap();
            let want: Vec<f64> = b.loss.iter().map(|&v| f64::from(v)).collect();
            assert!(
                LOSS_TOLERANCE.compare(&a.loss, &want).passed(),
                "{reduction:?}"
            );
            let want: Vec<f64> = b.grad.iter().map(|&v| f64::from(v)).collect();
            assert_grad_close(&a.grad, &want, "one-hot vs index");
        }
    });
}

#[test]
fn ignored_rows_follow_pytorch() {
    with_gpu(|ctx| {
        let (rows, cols) = (4, 5);
        let x = logits(rows, cols, 1.0, 1);
        let all_ignored = [-100i64; 4];
        let mean = CrossEntropyOptions::default();
        let out = ctx
            .cross_entropy_with_grad(
                &x,
                cols,
                Targets::Indices(&all_ignored),
                &mean,
                GradOutput::One,
            )
            .unwrap();
        assert!(out.loss[0].is_nan(), "all ignored with mean is NaN");
        assert!(out.grad.iter().all(|&g| g == 0.0));
        let sum = CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        assert_eq!(
            ctx.cross_entropy(&x, cols, Targets::Indices(&all_ignored), &sum)
                .unwrap(),
            [0.0]
        );
        let custom = CrossEntropyOptions {
            ignore_index: 3,
            reduction: Reduction::None,
            ..Default::default()
        };
        let loss = ctx
            .cross_entropy(&x, cols, Targets::IndicesI32(&[3, 0, 3, 1]), &custom)
            .unwrap();
        assert_eq!((loss[0], loss[2]), (0.0, 0.0));
        assert!(loss[1] > 0.0 && loss[3] > 0.0);
    });
}

#[test]
fn in_place_gradient_equals_the_out_of_place_one() {
    with_gpu(|ctx| {
        // Unaligned rows, then aligned ones (vec4 kernels).
        for &(rows, cols) in &[
            (70_000, 10),
            (33, 2049),
            (3, 70_001),
            (70_000, 12),
            (33, 2048),
            (3, 70_000),
        ] {
            let x = logits(rows, cols, 2.0, 3);
            let idx = index_targets(rows, cols, 4, 9);
            let loss_fn = ctx
                .cross_entropy_loss(cols, &CrossEntropyOptions::default())
                .unwrap();
            let targets = loss_fn.upload_targets(Targets::Indices(&idx)).unwrap();
            let t = ctx.upload(&x, cols).unwrap();
            let out = loss_fn
                .loss_and_grad(&t, &targets, GradOutput::One)
                .unwrap();
            let mut t = ctx.upload(&x, cols).unwrap();
            let loss = loss_fn
                .loss_and_grad_in_place(&mut t, &targets, GradOutput::One)
                .unwrap();
            assert_eq!(
                loss.to_vec().unwrap(),
                out.loss.to_vec().unwrap(),
                "{rows}x{cols}"
            );
            assert_eq!(
                t.to_vec().unwrap(),
                out.grad.to_vec().unwrap(),
                "{rows}x{cols}"
            );
        }
    });
}

#[test]
fn encode_form_writes_the_callers_buffers() {
    with_gpu(|ctx| {
        let (rows, cols) = (40, 100);
        let x = logits(rows, cols, 2.0, 12);
        let idx: Vec<i32> = index_targets(rows, cols, 13, 6)
            .iter()
            .map(|&t| t as i32)
            .collect();
        let options = CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..Default::default()
        };
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        let logits_t = ctx.upload(&x, cols).unwrap();
        let targets = ctx.upload(bytemuck::cast_slice(&idx), 1).unwrap();
        let loss = ctx.empty(1, 1).unwrap();
        let grad = ctx.empty(rows, cols).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let buffers = CrossEntropyBuffers {
            logits: logits_t.buffer().into(),
            targets: targets.buffer().into(),
            target_encoding: TargetEncoding::Indices,
            loss: loss.buffer().into(),
            grad: GradDestination::Buffer(grad.buffer().into()),
            rows,
        };
        loss_fn.encode(&mut encoder, buffers, 2.0).unwrap();
        ctx.queue().submit([encoder.finish()]);
        let want = reference::cross_entropy(
            &x,
            cols,
            Targets::IndicesI32(&idx),
            &options,
            GradOutput::Scalar(2.0),
        )
        .unwrap();
        assert!(LOSS_TOLERANCE
            .compare(&loss.to_vec().unwrap(), &want.loss)
            .passed());
        assert_grad_close(&grad.to_vec().unwrap(), &want.grad, "encode");
        // A reduced loss is written into a loss buffer bound for storage, and copied into one
        // that only allows copies; both get the loss, for the sum and the mean.
        use wgpu::BufferUsages as U;
        for reduction in [Reduction::Sum, Reduction::Mean] {
            let options = CrossEntropyOptions {
                reduction,
                ..options
            };
            let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
            let want = reference::cross_entropy(
                &x,
                cols,
                Targets::IndicesI32(&idx),
                &options,
                GradOutput::One,
            )
            .unwrap();
            for usage in [U::STORAGE | U::COPY_SRC, U::COPY_DST | U::COPY_SRC] {
                let loss = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 4,
                    usage,
                    mapped_at_creation: false,
                });
                let seen = ctx.empty(1, 1).unwrap();
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let buffers = CrossEntropyBuffers {
                    loss: (&loss).into(),
                    grad: GradDestination::None,
                    ..buffers
                };
                loss_fn.encode(&mut encoder, buffers, 1.0).unwrap();
                encoder.copy_buffer_to_buffer(&loss, 0, seen.buffer(), 0, 4);
                ctx.queue().submit([encoder.finish()]);
                let cmp = LOSS_TOLERANCE.compare(&seen.to_vec().unwrap(), &want.loss);
                assert!(cmp.passed(), "{reduction:?} into a {usage:?} loss: {cmp:?}");
            }
        }
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let aliased = CrossEntropyBuffers {
            grad: GradDestination::Buffer(logits_t.buffer().into()),
            ..buffers
        };
        assert!(matches!(
            loss_fn.encode(&mut encoder, aliased, 1.0),
            Err(Error::Aliased { .. })
        ));
        let small = ctx.empty(1, 1).unwrap();
        let bad = CrossEntropyBuffers {
            grad: GradDestination::Buffer(small.buffer().into()),
            ..buffers
        };
        assert!(matches!(
            loss_fn.encode(&mut encoder, bad, 1.0),
            Err(Error::BufferTooSmall { what: "grad", .. })
        ));
        // The tensor form checks the shapes of its tensors, and the gradient buffer as above.
        let uploaded = loss_fn.upload_targets(Targets::IndicesI32(&idx)).unwrap();
        let per_row_loss = ctx.empty(rows, 1).unwrap();
        let none = GradDestination::None;
        assert!(matches!(
            loss_fn.encode_tensors(&mut encoder, &logits_t, &uploaded, &per_row_loss, none, 1.0),
            Err(Error::LengthMismatch { what: "loss", .. })
        ));
        let short = loss_fn
            .upload_targets(Targets::IndicesI32(&idx[1..]))
            .unwrap();
        assert!(matches!(
            loss_fn.encode_tensors(&mut encoder, &logits_t, &short, &loss, none, 1.0),
            Err(Error::LengthMismatch { .. })
        ));
        let small_grad = GradDestination::Buffer(small.buffer().into());
        assert!(matches!(
            loss_fn.encode_tensors(&mut encoder, &logits_t, &uploaded, &loss, small_grad, 1.0),
            Err(Error::BufferTooSmall { what: "grad", .. })
        ));
    });
}

#[test]
fn cross_entropy_special_values_stay_in_their_rows() {
    with_gpu(|base| {
        let mut contexts = vec![("default", base.clone())];
        contexts.extend(
            strategy_tunings()
                .into_iter()
                .map(|(name, tuning)| (name, tuned(base, tuning))),
        );
        for (name, ctx) in &contexts {
            // Unaligned and aligned rows, in registers, streamed and split.
            for cols in [6, 8, 2048, 20_000] {
                let what = format!("{name} cols {cols}");
                let mut x = logits(5, cols, 1.0, 2);
                x[0] = f32::NAN;
                // Row 1: its target is -inf and is the first logit any lane reads.
                x[cols] = f32::NEG_INFINITY;
                // Row 2: -inf logits away from the target contribute nothing.
                x[2 * cols + 1] = f32::NEG_INFINITY;
                x[3 * cols - 1] = f32::NEG_INFINITY;
                // Row 4: a leading run of -inf holding the target.
                x[4 * cols..4 * cols + cols / 2].fill(f32::NEG_INFINITY);
                let idx = [1i64, 0, 3, 4, 1];
                let options = CrossEntropyOptions {
                    reduction: Reduction::None,
                    ..Default::default()
                };
                let targets = Targets::Indices(&idx);
                let out = ctx
                    .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
                    .unwrap();
                assert!(out.loss[0].is_nan(), "{what}");
                assert_eq!(out.loss[1], f32::INFINITY, "{what}");
                assert!(out.loss[2].is_finite() && out.loss[3].is_finite(), "{what}");
                assert_eq!(out.loss[4], f32::INFINITY, "{what}");
                assert!(out.grad[..cols].iter().all(|g| g.is_nan()), "{what}");
                let want =
                    reference::cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
                let cmp = LOSS_TOLERANCE.compare(&out.loss, &want.loss);
                assert!(cmp.passed(), "{what}: {cmp:?}");
                assert_grad_close(&out.grad, &want.grad, &what);
                // With label smoothing every class carries mass: any -inf logit makes the loss
                // infinite.
                let smoothed = CrossEntropyOptions {
                    label_smoothing: 0.1,
                    ..options
                };
                let out = ctx
                    .cross_entropy_with_grad(&x, cols, targets, &smoothed, GradOutput::One)
                    .unwrap();
                let want = reference::cross_entropy(&x, cols, targets, &smoothed, GradOutput::One)
                    .unwrap();
                assert_eq!(out.loss[2], f32::INFINITY, "{what} smoothed");
                let cmp = LOSS_TOLERANCE.compare(&out.loss, &want.loss);
                assert!(cmp.passed(), "{what} smoothed: {cmp:?}");
                assert_grad_close(&out.grad, &want.grad, &format!("{what} smoothed"));
            }
        }
    });
}

#[test]
fn cross_entropy_misuse_returns_typed_errors() {
    with_gpu(|ctx| {
        let x = logits(3, 4, 1.0, 0);
        let opts = CrossEntropyOptions::default();
        match ctx.cross_entropy(&x, 4, Targets::Indices(&[0, 7, 1]), &opts) {
            Err(Error::TargetOutOfRange {
                row: 1,
                value: 7,
                classes: 4,
                ..
            }) => {}
            other => panic!("expected TargetOutOfRange, got {other:?}"),
        }
        assert!(matches!(
            ctx.cross_entropy(&x, 4, Targets::Indices(&[0, 1]), &opts),
            Err(Error::LengthMismatch {
                what: "targets",
                ..
            })
        ));
        let bad_weight = CrossEntropyOptions {
            weight: Some(&[1.0; 3]),
            ..Default::default()
        };
        assert!(matches!(
            ctx.cross_entropy(&x, 4, Targets::Indices(&[0, 1, 2]), &bad_weight),
            Err(Error::LengthMismatch { what: "weight", .. })
        ));
        let bad_smoothing = CrossEntropyOptions {
            label_smoothing: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            ctx.cross_entropy(&x, 4, Targets::Indices(&[0, 1, 2]), &bad_smoothing),
            Err(Error::LabelSmoothing(_))
        ));
        assert!(matches!(
            ctx.cross_entropy(&x, 4, Targets::Probabilities(&[0.25; 8]), &opts),
            Err(Error::LengthMismatch {
                what: "targets",
                ..
            })
        ));
        let none = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        assert!(matches!(
            ctx.cross_entropy_with_grad(
                &x,
                4,
                Targets::Indices(&[0, 1, 2]),
                &none,
                GradOutput::PerRow(&[1.0; 2])
            ),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
        assert!(matches!(
            ctx.cross_entropy_with_grad(
                &x,
                4,
                Targets::Indices(&[0, 1, 2]),
                &opts,
                GradOutput::PerRow(&[1.0; 3])
            ),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
    });
}

/// The host Jacobian runs in row blocks, so its result may exceed every buffer of the device;
/// a device tensor of that size is refused.
#[test]
fn host_jacobian_exceeds_one_buffer() {
    with_gpu(|base| {
        // Bindings of 1 MiB, buffers of 4 MiB: 40 rows of 300 x 300 Jacobians are 14.4 MB.
        let ctx = small_limits_context(base);
        let (rows, cols) = (40, 300);
        let x = logits(rows, cols, 3.0, 21);
        let got = ctx.softmax_jacobian(&x, cols).unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&got, &reference::softmax_jacobian(&x, cols).unwrap());
        assert!(cmp.passed(), "host jacobian over max_buffer_size: {cmp:?}");
        assert_eq!(
            pollster::block_on(ctx.softmax_jacobian_async(&x, cols)).unwrap(),
            got
        );
        assert!(matches!(
            ctx.upload(&x, cols).unwrap().softmax_jacobian(),
            Err(Error::TensorTooLarge { .. })
        ));
        // One row's Jacobian wider than a binding (600 x 600 x 4 bytes) is an error.
        assert!(matches!(
            ctx.softmax_jacobian(&logits(1, 600, 1.0, 2), 600),
            Err(Error::RowTooLong { .. })
        ));
    });
}

#[test]
fn async_forms_match_the_blocking_ones() {
    with_gpu(|ctx: &Context| {
        let x = logits(10, 20, 1.0, 4);
        let dy = logits(10, 20, 1.0, 5);
        let a = pollster::block_on(ctx.softmax_backward_async(&x, &dy, 20)).unwrap();
        assert_eq!(a, ctx.softmax_backward(&x, &dy, 20).unwrap());
        let idx = index_targets(10, 20, 1, 0);
        let opts = CrossEntropyOptions::default();
        let a = pollster::block_on(ctx.cross_entropy_with_grad_async(
            &x,
            20,
            Targets::Indices(&idx),
            &opts,
            GradOutput::One,
        ))
        .unwrap();
        let b = ctx
            .cross_entropy_with_grad(&x, 20, Targets::Indices(&idx), &opts, GradOutput::One)
            .unwrap();
        assert_eq!((a.loss, a.grad), (b.loss, b.grad));
    });
}

/// A row summed by one invocation: without blocked accumulation the f32 sums of cancelling
/// `dy * y` terms over 1000 columns missed the 1e-5 bounds (seen on llvmpipe, where rows of up to
/// 4096 columns run one invocation per row).
#[test]
fn sums_over_a_whole_row_in_one_invocation_stay_within_tolerance() {
    use wgpu_softmax::Tuning;
    with_gpu(|base| {
        let tuning = Tuning {
            thread_max_cols: 4096,
            thread_max_cols_without_subgroups: 4096,
            ..Tuning::SOFTWARE
        };
        let ctx =
            Context::from_device_with_tuning(base.device().clone(), base.queue().clone(), tuning)
                .expect("adopt device");
        let (rows, cols) = (256, 1000);
        let x = logits(rows, cols, 4.0, 21);
        let dy = logits(rows, cols, 4.0, 22);
        let y = ctx.softmax(&x, cols).unwrap();
        let got = ctx.softmax_backward(&y, &dy, cols).unwrap();
        let want = reference::softmax_backward(&y, &dy, cols).unwrap();
        assert!(
            Tolerance::SOFTMAX.compare(&got, &want).passed(),
            "softmax_backward"
        );
        let ly = ctx.log_softmax(&x, cols).unwrap();
        let got = ctx.log_softmax_backward(&ly, &dy, cols).unwrap();
        let want = reference::log_softmax_backward(&ly, &dy, cols).unwrap();
        let cmp = Tolerance::LOG_SOFTMAX.compare(&got, &want);
        assert!(cmp.passed(), "log_softmax_backward: {cmp:?}");
        let idx = index_targets(rows, cols, 23, 7);
        let options = CrossEntropyOptions {
            reduction: Reduction::Sum,
            label_smoothing: 0.1,
            ..Default::default()
        };
        let got = ctx
            .cross_entropy_with_grad(&x, cols, Targets::Indices(&idx), &options, GradOutput::One)
            .unwrap();
        let want =
            reference::cross_entropy(&x, cols, Targets::Indices(&idx), &options, GradOutput::One)
                .unwrap();
        assert_grad_close(&got.grad, &want.grad, "cross-entropy");
    });
}

/// Cross-entropy over rows that are not a multiple of 4 columns, split in chunks of 301 to 304
/// columns (both chunk teams) and streamed: chunk boundaries fall at every place within a vec4,
/// and the kernels that read a row (a chunk) as the vec4s that hold it mask both ends, the
/// target's terms included. Targets sit on either side of chunk boundaries and at a row's
/// ends; special values fill whole edge vec4s; index targets (weighted, smoothed) and weighted
/// probabilities; the in-place gradient must be the same bits.
#[test]
fn cross_entropy_over_unaligned_rows_split_at_every_place_within_a_vec4() {
    with_gpu(|base| {
        let split = |chunk, split_team| Tuning {
            thread_max_cols: 0,
            split_min_cols: 1,
            split_max_rows: u32::MAX,
            split_chunk: chunk,
            split_team,
            ..base.tuning()
        };
        let streamed = Tuning {
            thread_max_cols: 0,
            max_items: 1,
            split_min_cols: u32::MAX,
            ..base.tuning()
        };
        let contexts = [
            ("chunk 301", split(301, 0)),
            ("chunk 302", split(302, 2)),
            ("chunk 303", split(303, 0)),
            ("chunk 304", split(304, 2)),
            ("streamed", streamed),
        ];
        for (name, tuning) in contexts {
            let ctx = tuned(base, tuning);
            // Where the split contexts cut a row (the streamed one reads it whole).
            let chunk = i64::from(tuning.split_chunk.min(302));
            for (rows, cols) in [(7, 1001), (7, 611)] {
                let what = format!("{name} {rows}x{cols}");
                let c = cols as i64;
                let mut x = logits(rows, cols, 2.0, (cols as i64 + chunk) as u64);
                let at = |r: usize, class: i64| r * cols + class as usize;
                // Row 2: NaN in the last class; row 3: +inf at a chunk's start; row 4: a -inf
                // target at a chunk's end with the vec4s around it -inf too; row 5: -inf
                // throughout.
                x[at(2, c - 1)] = f32::NAN;
                x[at(3, chunk)] = f32::INFINITY;
                x[at(4, chunk - 3)..at(4, chunk + 3)].fill(f32::NEG_INFINITY);
                x[at(5, 0)..at(6, 0)].fill(f32::NEG_INFINITY);
                let idx = [0, c - 1, chunk - 1, chunk, chunk - 1, 1, chunk + 1];
                let probs = probability_targets(rows, cols, 7);
                let weight: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
                let per_row: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32).collect();
                let cases = [
                    (
                        "weighted indices",
                        Targets::Indices(&idx),
                        Some(&weight[..]),
                        0.0,
                    ),
                    ("smoothed indices", Targets::Indices(&idx), None, 0.1),
                    (
                        "weighted probabilities",
                        Targets::Probabilities(&probs),
                        Some(&weight[..]),
                        0.0,
                    ),
                ];
                for (case, targets, weight, label_smoothing) in cases {
                    let what = format!("{what} {case}");
                    let options = CrossEntropyOptions {
                        weight,
                        label_smoothing,
                        reduction: Reduction::None,
                        ..Default::default()
                    };
                    let grad_output = GradOutput::PerRow(&per_row);
                    let want =
                        reference::cross_entropy(&x, cols, targets, &options, grad_output).unwrap();
                    let input = (&x[..], cols, targets, grad_output);
                    let got = check_host_and_in_place(&ctx, input, &options, (&want, true), &what);
                    for r in [2, 3, 5] {
                        assert!(got.loss[r].is_nan(), "{what}: row {r}");
                        assert!(got.grad[at(r, 0)..at(r + 1, 0)].iter().all(|g| g.is_nan()));
                    }
                    assert!(got.loss[0].is_finite(), "{what}: {}", got.loss[0]);
                    if case != "weighted probabilities" {
                        assert_eq!(got.loss[4], f32::INFINITY, "{what}");
                    }
                }
            }
        }
    });
}

/// Cross-entropy with the default options over index targets from `seed` (none ignored), the
/// host form then in place (the same bits), against the reference.
fn check_plain_loss(ctx: &Context, x: &[f32], cols: usize, seed: u64, what: &str) {
    let idx = index_targets(x.len() / cols, cols, seed, 0);
    let options = CrossEntropyOptions::default();
    let targets = Targets::Indices(&idx);
    let want = reference::cross_entropy(x, cols, targets, &options, GradOutput::One).unwrap();
    let input = (x, cols, targets, GradOutput::One);
    let what = format!("cross-entropy {what}");
    check_host_and_in_place(ctx, input, &options, (&want, true), &what);
}

/// Softmax, its backward and cross-entropy (as [`check_plain_loss`]) of `rows x cols` logits
/// from `seed` (upstream gradient and targets from the seeds after it), against the reference.
fn check_forward_backward_and_loss(
    ctx: &Context,
    (rows, cols): (usize, usize),
    seed: u64,
    what: &str,
) {
    let x = logits(rows, cols, 2.0, seed);
    let y = ctx.softmax(&x, cols).unwrap();
    let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
    assert!(cmp.passed(), "softmax {what}: {cmp:?}");
    let dy = logits(rows, cols, 1.0, seed + 1);
    check_backward(ctx, &x, &dy, cols, what);
    check_plain_loss(ctx, &x, cols, seed + 2, what);
}

/// A table that splits every row into chunks of `split_chunk` elements, a chunk to one
/// invocation (`split_team` 0) or to a workgroup of one (2: in one pass where waits of `wait`
/// loads and the adapter's loop budget allow): chunks as short as one element, rows of thousands
/// of chunks.
fn short_chunks(split_chunk: u32, split_team: u32, wait: u32) -> Tuning {
    Tuning {
        thread_max_cols: 0,
        row_workgroup: 1,
        row_workgroup_without_subgroups: 1,
        split_min_cols: 1,
        split_max_rows: u32::MAX,
        split_chunk,
        split_team,
        split_wait: wait,
        loss_split_wait: wait,
        backward_split_wait: wait,
        ..Tuning::GPU
    }
}

/// Split rows whose partials outgrow the rows (chunks of 1 element: two words of partials per
/// element for softmax, four for cross-entropy; cross-entropy's chunks of 4 in one pass: five
/// sync words per 4 elements) run in row blocks whose partials fit a binding, as their
/// operands do. The blocks were sized by the rows alone: on a device whose bindings hold 64
/// KiB, the partials of the later rows of a block fell past the binding, and their outputs and
/// losses came out wrong or NaN.
#[test]
fn split_partials_larger_than_their_rows_fit_the_binding() {
    with_gpu(|base| {
        let contexts = [
            // Scalar kernels (vec4 ones round chunks up to whole vec4s): 94 KiB of logits, 375
            // KiB of cross-entropy partials.
            ("chunks of 1, an invocation each", 1, 0, 1, (24, 1000)),
            // 109 KiB of logits, 138 KiB of sync words; 70 chunks a row keep the pass that
            // works out the chunks left within a software adapter's loop budget.
            ("chunks of 4 in one pass", 4, 2, 4, (100, 280)),
        ];
        for (name, split_chunk, split_team, vector, (rows, cols)) in contexts {
            // A team of one invocation lets a chunk be as short as one element (or one vec4).
            let tuning = Tuning {
                vector,
                ..short_chunks(split_chunk, split_team, 64)
            };
            let ctx = bounded_context(base, tuning, 64 << 10, 4 << 20);
            let strategy = ctx.strategy(rows, cols);
            assert!(
                matches!(strategy, wgpu_softmax::Strategy::SplitRow { chunk, .. } if chunk == split_chunk),
                "{name}: {strategy:?}"
            );
            let x = logits(rows, cols, 2.0, 41);
            let what = format!("{name}, {rows}x{cols}");
            let y = ctx.softmax(&x, cols).unwrap();
            let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
            assert!(cmp.passed(), "softmax {what}: {cmp:?}");
            let dy = logits(rows, cols, 1.0, 42);
            check_backward(&ctx, &x, &dy, cols, &what);
            let idx = index_targets(rows, cols, 43, 5);
            let probs = probability_targets(rows, cols, 44);
            let per_row = vec![1.0f32; rows];
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for (reduction, grad_output) in [
                    (Reduction::None, GradOutput::PerRow(&per_row)),
                    (Reduction::Mean, GradOutput::One),
                ] {
                    let options = CrossEntropyOptions {
                        reduction,
                        ..Default::default()
                    };
                    let want =
                        reference::cross_entropy(&x, cols, targets, &options, grad_output).unwrap();
                    let input = (&x[..], cols, targets, grad_output);
                    let case = format!("cross-entropy {what} {reduction:?}");
                    check_host_and_in_place(&ctx, input, &options, (&want, true), &case);
                }
            }
        }
    });
}

/// Rows that fit a binding whose partials at the table's chunks would not (chunks of one
/// element over rows of 10 000 columns, 40 KB, on a device whose bindings hold 64 KiB: 80 KB of
/// softmax partials, 200 KB of cross-entropy sync words) were refused as `RowTooLong`; their
/// chunks now lengthen until the partials fit, and every op matches the reference.
#[test]
fn rows_whose_partials_alone_outgrow_a_binding_take_longer_chunks() {
    with_gpu(|base| {
        let (rows, cols) = (3, 10_000);
        for (name, split_team) in [("an invocation a chunk", 0), ("a workgroup a chunk", 2)] {
            let tuning = Tuning {
                vector: 1,
                ..short_chunks(1, split_team, 4096)
            };
            let ctx = bounded_context(base, tuning, 64 << 10, 4 << 20);
            check_forward_backward_and_loss(
                &ctx,
                (rows, cols),
                81,
                &format!("{name}, {rows}x{cols}"),
            );
        }
    });
}

/// Split rows in one pass whose rows have many chunks (chunks of one vec4 for a team of one
/// invocation): where a row's chunks do not all run at once, the pass that works out the rest
/// takes them one after another, each combining the row's partials, chunks x chunks loop
/// iterations for one invocation. Past a software adapter's loop budget (which ends the
/// invocation, silently) softmax came out wrong on `3x4096` (1024 chunks a row); such rows
/// now take two passes there.
#[test]
fn one_pass_splits_of_many_chunks_stay_within_the_loop_budget() {
    with_gpu(|base| {
        let ctx = tuned(base, short_chunks(4, 2, 4096));
        for (rows, cols) in [(3, 4096), (2, 1200)] {
            check_forward_backward_and_loss(&ctx, (rows, cols), 51, &format!("{rows}x{cols}"));
        }
    });
}

/// Logits of `rows x cols` whose split rows' partials make a plain f32 sum drift: each row's
/// first element `ln 4096`, then pairs `(0, c)` with `exp(c)` about 1e-4. Every chunk of an even
/// number of elements but the first has the same partial, about `(1 + 1e-4) / 4096`, which a
/// running sum between 1 and 2.5 rounds down by a fifth of a unit in its last place at every
/// addition: 6e-5 of the sum over 6000 chunks, six times the softmax tolerance on the first
/// element's 0.4. Summed `SUM_BLOCK` partials at a time, the drift stays within it.
fn drifting_logits(rows: usize, cols: usize) -> Vec<f32> {
    let c = (0.4f64 * 2f64.powi(-12)).ln() as f32;
    let big = 4096f32.ln();
    (0..rows * cols)
        .map(|i| match (i % cols, i % 2) {
            (0, _) => big,
            (_, 0) => 0.0,
            _ => c,
        })
        .collect()
}

/// A split row of thousands of chunks, whose partials one invocation (or a workgroup of one)
/// combines: softmax, log-softmax and cross-entropy along rows, a chunk to an invocation and a
/// chunk to a workgroup (in one pass where the adapter's loop budget allows), and softmax along
/// an axis cut into chunks of two. Their partials were summed one after another,
/// and the statistics drifted out of the accuracy table (a random kernel-choice table found it:
/// chunks of 2 over rows of 11 856 columns, 1.003e-5 relative).
#[test]
fn split_rows_of_thousands_of_chunks_sum_their_partials_in_blocks() {
    with_gpu(|base| {
        let (rows, cols) = (2, 12_000);
        let x = drifting_logits(rows, cols);
        for (name, split_team) in [("two passes", 0), ("one pass", 2)] {
            let tuning = Tuning {
                vector: 1,
                ..short_chunks(2, split_team, 4096)
            };
            let ctx = tuned(base, tuning);
            let strategy = ctx.strategy(rows, cols);
            assert!(
                matches!(strategy, wgpu_softmax::Strategy::SplitRow { chunk, .. } if chunk <= 4),
                "{name}: {strategy:?}"
            );
            let what = format!("{name}, {rows}x{cols}");
            let y = ctx.softmax(&x, cols).unwrap();
            let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
            assert!(cmp.passed(), "softmax {what}: {cmp:?}");
            let ly = ctx.log_softmax(&x, cols).unwrap();
            let want = reference::log_softmax(&x, cols).unwrap();
            let cmp = Tolerance::LOG_SOFTMAX.compare(&ly, &want);
            assert!(cmp.passed(), "log-softmax {what}: {cmp:?}");
            check_plain_loss(&ctx, &x, cols, 61, &what);
        }
        // Along the middle axis of [1, 12 000, 4]: four lines, each cut into chunks of 2.
        let ctx = tuned(
            base,
            Tuning {
                axis_lines: u32::MAX,
                axis_min_chunk: 1,
                axis_vec4_max_inner: 0,
                ..Tuning::GPU
            },
        );
        let layout = wgpu_softmax::AxisLayout::from_parts(1, cols, 4).unwrap();
        let lines = drifting_logits(layout.lines(), cols);
        let x = layout.from_rows(&lines).unwrap();
        let y = layout
            .to_rows(&ctx.along(layout).softmax(&x).unwrap())
            .unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&lines, cols).unwrap());
        assert!(cmp.passed(), "softmax along [1, {cols}, 4]: {cmp:?}");
    });
}
