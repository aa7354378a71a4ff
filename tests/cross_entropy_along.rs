//! Cross-entropy with the classes along an axis that is not the last ([`Along::cross_entropy`]
//! and [`CrossEntropyLoss::encode_along`]): logits `[N, C, d1, ...]` read in place, against the
//! f64 reference run on the same lines moved last.

mod common;

use common::{
    assert_grad_close, bits, cross_entropy_options, index_targets, logits, read_buffer,
    small_limits_context, tuned, with_gpu, LOSS_TOLERANCE,
};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{
    AxisLayout, Context, CrossEntropyBuffers, CrossEntropyOptions, DeviceGradOutput, Engine, Error,
    GradDestination, GradOutput, Reduction, TargetEncoding, Targets, Tuning, TENSOR_USAGES,
};

/// (shape, class axis): lines held in registers (5, 16, 21 and 32 classes), streamed lines (33,
/// and 300 with a partial block), one class, the first axis, the last axis (the row kernels),
/// and empty tensors.
const LAYOUTS: &[(&[usize], isize)] = &[
    (&[2, 5, 3], 1),
    (&[2, 16, 7], 1),
    (&[3, 21, 8, 8], 1),
    (&[2, 32, 5], 1),
    (&[2, 33, 6], 1),
    (&[2, 300, 33], 1),
    (&[1, 1, 9], 1),
    (&[40, 6], 0),
    (&[3, 7, 4], -1),
    (&[0, 4, 5], 1),
    (&[2, 3, 0], 1),
];

/// `base`'s tuning, and one whose lines are cut into chunks of 2 or more classes whatever their
/// number (a partials pass and a finishing pass, as few long lines are), each on a device of its
/// own so that tests running at once compile their pipelines at once.
fn line_contexts(base: &Context) -> Vec<(&'static str, Context)> {
    let split = Tuning {
        axis_lines: 1 << 20,
        axis_min_chunk: 2,
        ..base.tuning()
    };
    vec![
        ("lines", tuned(base, base.tuning())),
        ("split lines", tuned(base, split)),
    ]
}

/// A distribution over the classes of every line, laid out like the logits.
fn probability_targets(layout: AxisLayout, seed: u64) -> Vec<f32> {
    let raw = logits(layout.lines(), layout.len(), 1.0, seed);
    let rows: Vec<f32> = reference::softmax(&raw, layout.len())
        .unwrap()
        .into_iter()
        .map(|v| v as f32)
        .collect();
    layout.from_rows(&rows).unwrap()
}

/// The f64 reference over the lines moved last; the gradient moved back.
fn reference_along(
    layout: AxisLayout,
    x: &[f32],
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
) -> (Vec<f64>, Vec<f64>) {
    let rows = layout.to_rows(x).unwrap();
    let probs;
    let targets = match targets {
        Targets::Probabilities(p) => {
            probs = layout.to_rows(p).unwrap();
            Targets::Probabilities(&probs)
        }
        other => other,
    };
    let want =
        reference::cross_entropy(&rows, layout.len(), targets, options, grad_output).unwrap();
    (want.loss, layout.from_rows(&want.grad).unwrap())
}

/// Every option (index and probability targets, class weights, label smoothing, each
/// reduction, a scalar and a per-line upstream gradient) on every layout, with the loss-only
/// kernel giving the fused kernel's loss; and the CPU path's.
#[test]
fn cross_entropy_along_an_axis_matches_the_reference_for_every_option() {
    with_gpu(|base| {
        for (name, ctx) in &line_contexts(base) {
            for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
                let layout = AxisLayout::new(shape, axis).unwrap();
                let (lines, classes) = (layout.lines(), layout.len());
                let along = ctx.along(layout);
                let x = logits(layout.numel(), 1, 3.0, 40 + i as u64);
                let idx = index_targets(lines, classes, i as u64, 5);
                let probs = probability_targets(layout, 60 + i as u64);
                let weight: Vec<f32> = (0..classes).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
                let per_line: Vec<f32> = (0..lines).map(|r| 1.0 + (r % 3) as f32).collect();
                for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                    for (options, grad_output) in cross_entropy_options(&weight, &per_line) {
                        let what = format!(
                            "{name} {shape:?} axis {axis} probabilities={} {options:?}",
                            matches!(targets, Targets::Probabilities(_)),
                        );
                        let got = along
                            .cross_entropy_with_grad(&x, targets, &options, grad_output)
                            .unwrap();
                        let (loss, grad) =
                            reference_along(layout, &x, targets, &options, grad_output);
                        let cmp = LOSS_TOLERANCE.compare(&got.loss, &loss);
                        assert!(cmp.passed(), "{what}: loss {cmp:?}");
                        assert_grad_close(&got.grad, &grad, &what);
                        let loss_only = along.cross_entropy(&x, targets, &options).unwrap();
                        assert_eq!(
                            bits(&loss_only),
                            bits(&got.loss),
                            "{what}: loss-only kernel"
                        );
                        // The CPU path.
                        let cpu = Engine::Cpu
                            .cross_entropy_with_grad_along(
                                &x,
                                layout,
                                targets,
                                &options,
                                grad_output,
                            )
                            .unwrap();
                        let cmp = LOSS_TOLERANCE.compare(&cpu.loss, &loss);
                        assert!(cmp.passed(), "{what}: CPU loss {cmp:?}");
                        assert_grad_close(&cpu.grad, &grad, &format!("{what} CPU"));
                        let cpu_loss = Engine::Cpu
                            .cross_entropy_along(&x, layout, targets, &options)
                            .unwrap();
                        let cmp = LOSS_TOLERANCE.compare(&cpu_loss, &loss);
                        assert!(cmp.passed(), "{what}: CPU loss alone {cmp:?}");
                        // The _into forms write what the others return.
                        let mut into = vec![f32::NAN; x.len()];
                        let into_loss = along
                            .cross_entropy_into(&x, targets, &options, grad_output, &mut into)
                            .unwrap();
                        assert_eq!(bits(&into_loss), bits(&got.loss), "{what}: into");
                        assert_eq!(bits(&into), bits(&got.grad), "{what}: into");
                        let into_loss = Engine::Cpu
                            .cross_entropy_along_into(
                                &x,
                                layout,
                                targets,
                                &options,
                                grad_output,
                                &mut into,
                            )
                            .unwrap();
                        assert_eq!(bits(&into_loss), bits(&cpu.loss), "{what}: CPU into");
                        assert_eq!(bits(&into), bits(&cpu.grad), "{what}: CPU into");
                    }
                }
            }
        }
    });
}

/// The tensor forms with the classes along an axis (`CrossEntropyLoss::loss_along`,
/// `loss_and_grad_along`, `loss_and_grad_in_place_along`) on logits uploaded as rows of `inner`
/// (not of the classes) and targets uploaded by the loss: the reference's loss and gradient for
/// every option, the loss alone the fused call's, and in place the same bits as into a new
/// tensor of the logits' shape. They share the host forms' kernels, so a few layouts (lines in
/// registers, streamed, the first axis, none) and half the options (every reduction, with and
/// without weights and smoothing) keep the test quick on software adapters.
#[test]
fn tensor_forms_along_an_axis_match_the_reference() {
    with_gpu(|ctx| {
        for i in [2, 5, 7, 9] {
            let (shape, axis) = LAYOUTS[i];
            let layout = AxisLayout::new(shape, axis).unwrap();
            let (lines, classes) = (layout.lines(), layout.len());
            let x = logits(layout.numel(), 1, 3.0, 80 + i as u64);
            let idx = index_targets(lines, classes, 90 + i as u64, 5);
            let probs = probability_targets(layout, 100 + i as u64);
            let weight: Vec<f32> = (0..classes).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
            let per_line: Vec<f32> = (0..lines).map(|r| 1.0 + (r % 4) as f32).collect();
            let cols = layout.inner().max(1);
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                let cases = cross_entropy_options(&weight, &per_line);
                for (options, grad_output) in cases.into_iter().step_by(2) {
                    let what = format!(
                        "{shape:?} axis {axis} probabilities={} {options:?}",
                        matches!(targets, Targets::Probabilities(_)),
                    );
                    let loss_fn = ctx.cross_entropy_loss(classes, &options).unwrap();
                    let uploaded = loss_fn.upload_targets(targets).unwrap();
                    let tx = ctx.upload(&x, cols).unwrap();
                    let both = loss_fn
                        .loss_and_grad_along(layout, &tx, &uploaded, grad_output)
                        .unwrap();
                    assert_eq!(
                        (both.grad.rows(), both.grad.cols()),
                        (tx.rows(), tx.cols()),
                        "{what}"
                    );
                    let (loss, grad) = reference_along(layout, &x, targets, &options, grad_output);
                    let got_loss = both.loss.to_vec().unwrap();
                    let cmp = LOSS_TOLERANCE.compare(&got_loss, &loss);
                    assert!(cmp.passed(), "{what}: loss {cmp:?}");
                    let got_grad = both.grad.to_vec().unwrap();
                    assert_grad_close(&got_grad, &grad, &what);
                    let alone = loss_fn.loss_along(layout, &tx, &uploaded).unwrap();
                    assert_eq!(
                        bits(&alone.to_vec().unwrap()),
                        bits(&got_loss),
                        "{what}: loss alone"
                    );
                    let mut in_place = ctx.upload(&x, cols).unwrap();
                    let in_place_loss = loss_fn
                        .loss_and_grad_in_place_along(layout, &mut in_place, &uploaded, grad_output)
                        .unwrap();
                    assert_eq!(
                        bits(&in_place_loss.to_vec().unwrap()),
                        bits(&got_loss),
                        "{what}: in place"
                    );
                    assert_eq!(
                        bits(&in_place.to_vec().unwrap()),
                        bits(&got_grad),
                        "{what}: in place"
                    );
                }
            }
        }

        // Shapes that disagree are typed errors.
        let layout = AxisLayout::new(&[2, 4, 3], 1).unwrap();
        let loss_fn = ctx
            .cross_entropy_loss(
                4,
                &CrossEntropyOptions {
                    reduction: Reduction::None,
                    ..Default::default()
                },
            )
            .unwrap();
        let x = ctx.upload(&[0.5; 24], 3).unwrap();
        let targets = loss_fn
            .upload_targets(Targets::Indices(&[0, 1, 2, 3, 0, 1]))
            .unwrap();
        let wrong_axis = AxisLayout::new(&[2, 4, 3], 2).unwrap();
        let err = loss_fn.loss_along(wrong_axis, &x, &targets).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    what: "classes",
                    ..
                }
            ),
            "{err}"
        );
        let short = ctx.upload(&[0.5; 21], 3).unwrap();
        let err = loss_fn.loss_along(layout, &short, &targets).unwrap_err();
        assert!(
            matches!(err, Error::LengthMismatch { what: "logits", .. }),
            "{err}"
        );
        let five = loss_fn
            .upload_targets(Targets::Indices(&[0, 1, 2, 3, 0]))
            .unwrap();
        let err = loss_fn.loss_along(layout, &x, &five).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    what: "target rows",
                    ..
                }
            ),
            "{err}"
        );
        let err = loss_fn
            .loss_and_grad_along(layout, &x, &targets, GradOutput::PerRow(&[1.0; 5]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    what: "grad_output",
                    ..
                }
            ),
            "{err}"
        );
    });
}

/// A NaN, +inf or only -inf in a line makes that line's loss and gradient NaN, and no other's;
/// a -inf target logit gives an infinite loss; ignored lines have loss 0 and a zero gradient.
#[test]
fn special_values_and_ignored_lines_stay_in_their_lines() {
    with_gpu(|base| {
        for (name, ctx) in &line_contexts(base) {
            for classes in [6, 40] {
                let layout = AxisLayout::new(&[2, classes, 5], 1).unwrap();
                let at = |o: usize, c: usize, i: usize| (o * classes + c) * 5 + i;
                let mut x = logits(layout.numel(), 1, 1.0, 7);
                x[at(0, 3, 0)] = f32::NAN;
                x[at(0, 0, 1)] = f32::INFINITY;
                for c in 0..classes {
                    x[at(0, c, 2)] = f32::NEG_INFINITY;
                }
                // Line 3's target logit is -inf; line 4 (ignored) holds a NaN.
                x[at(0, 2, 3)] = f32::NEG_INFINITY;
                x[at(0, 1, 4)] = f32::NAN;
                let mut idx = vec![1i64; 10];
                idx[3] = 2;
                idx[4] = -100;
                let options = CrossEntropyOptions {
                    reduction: Reduction::None,
                    ..Default::default()
                };
                let targets = Targets::Indices(&idx);
                let out = ctx
                    .along(layout)
                    .cross_entropy_with_grad(&x, targets, &options, GradOutput::One)
                    .unwrap();
                let what = format!("{name}, {classes} classes");
                for line in 0..3 {
                    assert!(out.loss[line].is_nan(), "{what}: line {line}");
                    for c in 0..classes {
                        assert!(out.grad[at(0, c, line)].is_nan(), "{what}: line {line}");
                    }
                }
                assert_eq!(out.loss[3], f32::INFINITY, "{what}");
                assert_eq!(out.loss[4], 0.0, "{what}");
                for c in 0..classes {
                    assert_eq!(out.grad[at(0, c, 4)].to_bits(), 0, "{what}: ignored line");
                }
                assert!(out.loss[5..].iter().all(|l| l.is_finite()), "{what}");
                let (loss, grad) = reference_along(layout, &x, targets, &options, GradOutput::One);
                let cmp = LOSS_TOLERANCE.compare(&out.loss, &loss);
                assert!(cmp.passed(), "{what}: {cmp:?}");
                assert_grad_close(&out.grad, &grad, &what);
            }
        }
    });
}

/// The caller's buffers: regions at offsets, the gradient in its own buffer and over the
/// logits, the mean's divisor found on the device from the caller's index targets (with
/// ignored lines), a reduced loss into a buffer that only allows copies, a per-line upstream
/// gradient on the device; device-resident tensors and uploaded targets; and, on a device whose
/// bindings hold 1 MiB, batches of several blocks of slabs or of rows (host and device forms).
#[test]
fn encode_along_writes_the_callers_buffers_in_blocks_of_slabs() {
    with_gpu(|base| {
        let small = small_limits_context(base);
        let [(_, base), (_, split)] = &line_contexts(base)[..] else {
            unreachable!("two contexts")
        };
        let [_, (_, small_split)] = &line_contexts(&small)[..] else {
            unreachable!("two contexts")
        };
        // Slabs of 21 x 1000 floats (84 000 bytes): 12 per 1 MiB binding.
        // The last axis (rows) of 30 000 x 21 floats: three blocks of rows.
        let cases: [(&Context, &[usize], isize); 6] = [
            (base, &[3, 21, 4, 5], 1),
            (split, &[3, 21, 4, 5], 1),
            (&small, &[3, 21, 4, 5], 1),
            (&small, &[30, 21, 1000], 1),
            (small_split, &[30, 21, 1000], 1),
            (&small, &[30_000, 21], 1),
        ];
        for (ctx, shape, axis) in cases {
            let layout = AxisLayout::new(shape, axis).unwrap();
            let (lines, classes, n) = (layout.lines(), layout.len(), layout.numel());
            let x = logits(n, 1, 2.0, 9);
            let idx = index_targets(lines, classes, 10, 4);
            let idx32: Vec<i32> = idx.iter().map(|&t| t as i32).collect();
            let per_line: Vec<f32> = (0..lines).map(|r| 0.5 + (r % 4) as f32).collect();
            let what = format!("{shape:?}");
            // The host form, in blocks of slabs on the small device.
            let options = CrossEntropyOptions::default();
            let got = ctx
                .along(layout)
                .cross_entropy_with_grad(&x, Targets::Indices(&idx), &options, GradOutput::One)
                .unwrap();
            let (loss, grad) = reference_along(
                layout,
                &x,
                Targets::Indices(&idx),
                &options,
                GradOutput::One,
            );
            let cmp = LOSS_TOLERANCE.compare(&got.loss, &loss);
            assert!(cmp.passed(), "{what} host: loss {cmp:?}");
            assert_grad_close(&got.grad, &grad, &format!("{what} host"));

            let device = ctx.device();
            let buffer = |words: usize, usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: (words * 4) as u64,
                    usage,
                    mapped_at_creation: false,
                })
            };
            // Everything 64 words (256 bytes) in, a storage alignment's worth.
            let pad = 64;
            let put = |data: &[u8]| {
                let b = buffer(pad + data.len() / 4, TENSOR_USAGES);
                ctx.queue().write_buffer(&b, (pad * 4) as u64, data);
                b
            };
            fn region(b: &wgpu::Buffer) -> wgpu::BufferSlice<'_> {
                b.slice(256..)
            }
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let options = CrossEntropyOptions {
                    reduction,
                    ..Default::default()
                };
                let loss_fn = ctx.cross_entropy_loss(classes, &options).unwrap();
                // Device-resident tensors: the targets uploaded (ignored lines marked their
                // way, the mean's divisor found at upload).
                let logits_t = ctx.upload(&x, classes).unwrap();
                let targets_t = loss_fn.upload_targets(Targets::Indices(&idx)).unwrap();
                let loss_t = match reduction {
                    Reduction::None => ctx.empty(lines, 1).unwrap(),
                    _ => ctx.empty(1, 1).unwrap(),
                };
                let grad_t = ctx.empty(lines, classes).unwrap();
                let mut encoder = device.create_command_encoder(&Default::default());
                loss_fn
                    .encode_tensors_along(
                        &mut encoder,
                        layout,
                        &logits_t,
                        &targets_t,
                        &loss_t,
                        GradDestination::Buffer((&grad_t).into()),
                        1.0,
                    )
                    .unwrap();
                ctx.queue().submit([encoder.finish()]);
                let (loss, grad) = reference_along(
                    layout,
                    &x,
                    Targets::Indices(&idx),
                    &options,
                    GradOutput::One,
                );
                let what = format!("{shape:?} {reduction:?} tensors");
                let cmp = LOSS_TOLERANCE.compare(&loss_t.to_vec().unwrap(), &loss);
                assert!(cmp.passed(), "{what}: loss {cmp:?}");
                assert_grad_close(&grad_t.to_vec().unwrap(), &grad, &what);
                let logits_buf = put(bytemuck::cast_slice(&x));
                let targets_buf = put(bytemuck::cast_slice(&idx32));
                let (loss_words, upstream, grad_output) = match reduction {
                    Reduction::None => (lines, put(bytemuck::cast_slice(&per_line)), {
                        GradOutput::PerRow(&per_line)
                    }),
                    _ => (
                        1,
                        put(bytemuck::cast_slice(&[1.5f32])),
                        GradOutput::Scalar(1.5),
                    ),
                };
                let (loss, grad) =
                    reference_along(layout, &x, Targets::Indices(&idx), &options, grad_output);
                for in_place in [false, true] {
                    let what = format!("{shape:?} {reduction:?} in place {in_place}");
                    let logits_buf = if in_place {
                        put(bytemuck::cast_slice(&x))
                    } else {
                        logits_buf.clone()
                    };
                    let grad_buf = buffer(pad + n, TENSOR_USAGES);
                    // A reduced loss that only allows copies is copied into.
                    let loss_usage = match (reduction, in_place) {
                        (Reduction::None, _) | (_, false) => TENSOR_USAGES,
                        _ => wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                    };
                    let loss_buf = buffer(pad + loss_words, loss_usage);
                    let mut encoder = device.create_command_encoder(&Default::default());
                    let buffers = CrossEntropyBuffers {
                        logits: region(&logits_buf).into(),
                        targets: region(&targets_buf).into(),
                        target_encoding: TargetEncoding::Indices,
                        loss: region(&loss_buf).into(),
                        grad: if in_place {
                            GradDestination::InPlace
                        } else {
                            GradDestination::Buffer(region(&grad_buf).into())
                        },
                        rows: lines,
                    };
                    let upstream = DeviceGradOutput::Region(region(&upstream).into());
                    loss_fn
                        .encode_along(&mut encoder, layout, buffers, upstream)
                        .unwrap();
                    ctx.queue().submit([encoder.finish()]);
                    let got_loss = &read_buffer(ctx, &loss_buf, pad + loss_words)[pad..];
                    let cmp = LOSS_TOLERANCE.compare(got_loss, &loss);
                    assert!(cmp.passed(), "{what}: loss {cmp:?}");
                    let written = if in_place { &logits_buf } else { &grad_buf };
                    let got_grad = &read_buffer(ctx, written, pad + n)[pad..];
                    assert_grad_close(got_grad, &grad, &what);
                }
            }
        }
    });
}

/// Bad arguments give typed errors and leave the outputs alone; lines longer than a software
/// adapter lets an invocation loop over are cut into chunks.
#[test]
fn misuse_along_an_axis_returns_typed_errors() {
    with_gpu(|ctx| {
        let layout = AxisLayout::new(&[2, 4, 3], 1).unwrap();
        let along = ctx.along(layout);
        let options = CrossEntropyOptions::default();
        let x = vec![0.5f32; 24];
        let idx = [0i64, 1, 2, 3, 0, 1];
        let err = along
            .cross_entropy(&x[..23], Targets::Indices(&idx), &options)
            .unwrap_err();
        assert!(
            matches!(err, Error::LengthMismatch { what: "logits", .. }),
            "{err}"
        );
        let err = along
            .cross_entropy(&x, Targets::Indices(&idx[..5]), &options)
            .unwrap_err();
        assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
        // No classes: an axis of length 0 is refused by the layout itself.
        let err = AxisLayout::new(&[2, 0, 3], 1).unwrap_err();
        assert!(matches!(err, Error::ZeroCols), "{err}");
        let bad = [0i64, 1, 2, 4, 0, 1];
        let err = along
            .cross_entropy(&x, Targets::Indices(&bad), &options)
            .unwrap_err();
        assert!(
            matches!(err, Error::TargetOutOfRange { row: 3, .. }),
            "{err}"
        );
        let mut grad = vec![7f32; 24];
        let err = along
            .cross_entropy_into(
                &x,
                Targets::Indices(&bad),
                &options,
                GradOutput::One,
                &mut grad,
            )
            .unwrap_err();
        assert!(matches!(err, Error::TargetOutOfRange { .. }), "{err}");
        assert!(grad.iter().all(|&g| g == 7.0), "grad untouched");
        for engine in [Engine::Gpu(ctx.clone()), Engine::Cpu] {
            let err = engine
                .cross_entropy_along_into(
                    &x,
                    layout,
                    Targets::Indices(&idx),
                    &options,
                    GradOutput::One,
                    &mut grad[..23],
                )
                .unwrap_err();
            assert!(
                matches!(err, Error::LengthMismatch { what: "grad", .. }),
                "{engine:?}: {err}"
            );
            assert!(grad.iter().all(|&g| g == 7.0), "{engine:?}: grad untouched");
        }

        // encode_along: the classes and the line count must agree with the loss and layout.
        let buffer = |bytes: u64| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes,
                usage: TENSOR_USAGES,
                mapped_at_creation: false,
            })
        };
        let (logits_buf, targets_buf, loss_buf) = (buffer(96), buffer(24), buffer(4));
        let buffers = |rows| CrossEntropyBuffers {
            logits: (&logits_buf).into(),
            targets: (&targets_buf).into(),
            target_encoding: TargetEncoding::Indices,
            loss: (&loss_buf).into(),
            grad: GradDestination::None,
            rows,
        };
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let five = ctx.cross_entropy_loss(5, &options).unwrap();
        let err = five
            .encode_along(&mut encoder, layout, buffers(6), 1.0)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    what: "classes",
                    ..
                }
            ),
            "{err}"
        );
        let four = ctx.cross_entropy_loss(4, &options).unwrap();
        let err = four
            .encode_along(&mut encoder, layout, buffers(5), 1.0)
            .unwrap_err();
        assert!(
            matches!(err, Error::LengthMismatch { what: "rows", .. }),
            "{err}"
        );
        four.encode_along(&mut encoder, layout, buffers(6), 1.0)
            .unwrap();
        // encode_tensors_along: the logits must hold the layout's elements, the targets one
        // class per line.
        let logits_t = ctx.upload(&x, 4).unwrap();
        let targets_t = four.upload_targets(Targets::Indices(&idx)).unwrap();
        let loss_t = ctx.empty(1, 1).unwrap();
        let short = ctx.upload(&x[..20], 4).unwrap();
        let five_targets = four.upload_targets(Targets::Indices(&idx[..5])).unwrap();
        for (logits, targets, what) in [
            (&short, &targets_t, "logits"),
            (&logits_t, &five_targets, "target rows"),
        ] {
            let err = four
                .encode_tensors_along(
                    &mut encoder,
                    layout,
                    logits,
                    targets,
                    &loss_t,
                    GradDestination::None,
                    1.0,
                )
                .unwrap_err();
            assert!(
                matches!(err, Error::LengthMismatch { what: w, .. } if w == what),
                "{what}: {err}"
            );
        }
        four.encode_tensors_along(
            &mut encoder,
            layout,
            &logits_t,
            &targets_t,
            &loss_t,
            GradDestination::None,
            1.0,
        )
        .unwrap();

        // 30 000 classes on a line: more than a software adapter lets an invocation loop over,
        // and two lines cannot fill a GPU. The lines are cut into chunks, in place, in the host
        // and the device forms alike.
        let long = AxisLayout::new(&[1, 30_000, 2], 1).unwrap();
        let x = logits(long.numel(), 1, 1.0, 3);
        let idx = [5i64, 29_999];
        let got = ctx
            .along(long)
            .cross_entropy_with_grad(&x, Targets::Indices(&idx), &options, GradOutput::One)
            .unwrap();
        let (loss, grad) =
            reference_along(long, &x, Targets::Indices(&idx), &options, GradOutput::One);
        assert!(LOSS_TOLERANCE.compare(&got.loss, &loss).passed());
        assert_grad_close(&got.grad, &grad, "30 000 classes");
        let x_buf = buffer(long.numel() as u64 * 4);
        let idx32 = [5i32, 29_999];
        let t_buf = buffer(8);
        ctx.queue()
            .write_buffer(&x_buf, 0, bytemuck::cast_slice(&x));
        ctx.queue()
            .write_buffer(&t_buf, 0, bytemuck::cast_slice(&idx32));
        let long_fn = ctx.cross_entropy_loss(30_000, &options).unwrap();
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        long_fn
            .encode_along(
                &mut encoder,
                long,
                CrossEntropyBuffers {
                    logits: (&x_buf).into(),
                    targets: (&t_buf).into(),
                    target_encoding: TargetEncoding::Indices,
                    loss: (&loss_buf).into(),
                    grad: GradDestination::None,
                    rows: 2,
                },
                1.0,
            )
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        let got = read_buffer(ctx, &loss_buf, 1);
        assert!(LOSS_TOLERANCE.compare(&got, &loss).passed(), "{got:?}");
    });
}
