//! The encode forms on regions of the caller's buffers (`buffer.slice(offset..)`): every op reads
//! its operands from their regions and writes its results into theirs and nowhere else, at word
//! offsets that are and are not 16-byte (vec4) or storage-offset aligned, and refuses regions
//! that are misaligned, too small, or in the buffer of another operand it writes.

mod common;

use common::arena::{usage, Arena};
use common::{bits, logits, with_gpu};
use wgpu_softmax::{
    Context, CrossEntropyBuffers, CrossEntropyOptions, DeviceGradOutput, Error, GradDestination,
    GradOutput, Reduction, Strategy, TargetEncoding, Targets, Tolerance,
};

/// Shapes over the kernel layouts: short rows, vec4 rows, scalar rows, split rows, and
/// unaligned rows long enough to stream or split (read as vec4s where the operands share their
/// place within a vec4).
const SHAPES: [(usize, usize); 6] = [
    (3, 5),
    (9, 256),
    (33, 130),
    (2, 70_000),
    (5, 4099),
    (2, 70_001),
];

/// Word offsets for an input and an output: unaligned, 16-byte aligned, and around the device's
/// storage-offset alignment.
fn offset_pairs(ctx: &Context) -> Vec<(usize, usize)> {
    let align = ctx.device().limits().min_storage_buffer_offset_alignment as usize / 4;
    vec![
        (1, 3),
        (4, 8),
        (align, align + 5),
        (align + 3, 2 * align + 4),
    ]
}

/// Asserts `got` is within `tolerance` of `want` (a whole-buffer result), and bitwise equal to
/// it where every operand starts on 16 bytes, since the kernels are then the same.
fn check(got: &[f32], want: &[f32], tolerance: Tolerance, same_kernel: bool, what: &str) {
    let want64: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
    let cmp = tolerance.compare(got, &want64);
    assert!(cmp.passed(), "{what}: {cmp:?}");
    if same_kernel {
        assert_eq!(
            bits(got),
            bits(want),
            "{what}: bits differ from the whole-buffer form"
        );
    }
}

#[test]
fn the_split_shape_splits() {
    with_gpu(|ctx| {
        let (rows, cols) = SHAPES[3];
        assert!(
            matches!(ctx.strategy(rows, cols), Strategy::SplitRow { .. }),
            "{rows}x{cols} should take split rows here, not {}",
            ctx.strategy(rows, cols)
        );
    });
}

#[test]
fn forward_ops_read_and_write_only_their_regions() {
    with_gpu(|ctx| {
        for (rows, cols) in SHAPES {
            let n = rows * cols;
            let x = logits(rows, cols, 3.0, (rows * cols) as u64);
            let want_sm = ctx.softmax(&x, cols).unwrap();
            let want_lsm = ctx.log_softmax(&x, cols).unwrap();
            for (a, b) in offset_pairs(ctx) {
                let what = format!("{rows}x{cols} at words {a} -> {b}");
                let input = Arena::new(ctx, a + n + 7, &[(a, &bits(&x))], usage());
                let output = Arena::new(ctx, b + 2 * n + 9, &[], usage());
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let (x_region, sm, lsm) = (
                    input.region(a, n),
                    output.region(b, n),
                    output.region(b + n, n),
                );
                ctx.encode_softmax(&mut encoder, x_region, sm, rows, cols)
                    .unwrap();
                // The log-softmax right after the softmax, in the same output buffer.
                let mut second = ctx.device().create_command_encoder(&Default::default());
                ctx.encode_log_softmax(&mut second, x_region, lsm, rows, cols)
                    .unwrap();
                ctx.queue().submit([encoder.finish(), second.finish()]);
                let _ = input.written(ctx, &[], &what);
                let got = output.written(ctx, &[(b, n), (b + n, n)], &what);
                let aligned = a % 4 == 0 && b % 4 == 0 && n % 4 == 0;
                check(&got[0], &want_sm, Tolerance::SOFTMAX, aligned, &what);
                check(&got[1], &want_lsm, Tolerance::LOG_SOFTMAX, aligned, &what);
            }
        }
    });
}

#[test]
fn backward_ops_and_the_jacobian_read_and_write_only_their_regions() {
    with_gpu(|ctx| {
        for (rows, cols) in SHAPES {
            let n = rows * cols;
            let y = ctx.softmax(&logits(rows, cols, 2.0, 5), cols).unwrap();
            let dy = logits(rows, cols, 1.0, 6);
            let want = ctx.softmax_backward(&y, &dy, cols).unwrap();
            let log_y = ctx.log_softmax(&logits(rows, cols, 2.0, 7), cols).unwrap();
            let want_log = ctx.log_softmax_backward(&log_y, &dy, cols).unwrap();
            let jacobian = (cols <= 256).then(|| ctx.softmax_jacobian(&y, cols).unwrap());
            for (a, b) in offset_pairs(ctx) {
                let what = format!("{rows}x{cols} at words {a} -> {b}");
                // y and dy are two regions of one buffer: reading both is allowed.
                let (y_at, dy_at, log_y_at) = (a, a + n + 1, a + 2 * n + 2);
                let inputs = Arena::new(
                    ctx,
                    a + 3 * n + 5,
                    &[
                        (y_at, &bits(&y)),
                        (dy_at, &bits(&dy)),
                        (log_y_at, &bits(&log_y)),
                    ],
                    usage(),
                );
                let jac_len = jacobian.as_ref().map_or(0, Vec::len);
                let output = Arena::new(ctx, b + 2 * n + jac_len + 3, &[], usage());
                let (dx_at, ldx_at, jac_at) = (b, b + n, b + 2 * n);
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                ctx.encode_softmax_backward(
                    &mut encoder,
                    inputs.region(y_at, n),
                    inputs.region(dy_at, n),
                    output.region(dx_at, n),
                    rows,
                    cols,
                )
                .unwrap();
                ctx.encode_log_softmax_backward(
                    &mut encoder,
                    inputs.region(log_y_at, n),
                    inputs.region(dy_at, n),
                    output.region(ldx_at, n),
                    rows,
                    cols,
                )
                .unwrap();
                if jacobian.is_some() {
                    ctx.encode_softmax_jacobian(
                        &mut encoder,
                        inputs.region(y_at, n),
                        output.region(jac_at, jac_len),
                        rows,
                        cols,
                    )
                    .unwrap();
                }
                ctx.queue().submit([encoder.finish()]);
                let _ = inputs.written(ctx, &[], &what);
                let ranges = [(dx_at, n), (ldx_at, n), (jac_at, jac_len)];
                let got = output.written(ctx, &ranges, &what);
                let aligned = [y_at, dy_at, log_y_at, b, b + n].iter().all(|o| o % 4 == 0);
                check(&got[0], &want, Tolerance::SOFTMAX, aligned, &what);
                check(&got[1], &want_log, Tolerance::LOG_SOFTMAX, aligned, &what);
                if let Some(want_jac) = &jacobian {
                    // The Jacobian's softmax pass goes through a buffer of the context's own.
                    let same = aligned && (b + 2 * n) % 4 == 0;
                    check(&got[2], want_jac, Tolerance::SOFTMAX, same, &what);
                }
            }
        }
    });
}

/// The loss and gradient of the host form, which the encode form must match.
fn host_cross_entropy(
    ctx: &Context,
    x: &[f32],
    cols: usize,
    targets: &[i64],
    options: &CrossEntropyOptions<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let out = ctx
        .cross_entropy_with_grad(x, cols, Targets::Indices(targets), options, GradOutput::One)
        .unwrap();
    (out.loss, out.grad)
}

#[test]
fn cross_entropy_reads_and_writes_only_its_regions() {
    with_gpu(|ctx| {
        let reductions = [Reduction::None, Reduction::Mean, Reduction::Sum];
        for (shape, (rows, cols)) in SHAPES.into_iter().enumerate() {
            let n = rows * cols;
            let x = logits(rows, cols, 3.0, 11);
            // Every third row ignored, to exercise the mean's divisor found on the device.
            let targets: Vec<i64> = (0..rows)
                .map(|r| {
                    if r % 3 == 2 {
                        -100
                    } else {
                        ((r * 7) % cols) as i64
                    }
                })
                .collect();
            let target_words: Vec<u32> = targets.iter().map(|&t| t as i32 as u32).collect();
            let (a, b) = offset_pairs(ctx)[shape % 4];
            for reduction in reductions {
                let options = CrossEntropyOptions {
                    reduction,
                    ..Default::default()
                };
                let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
                let (want_loss, want_grad) = host_cross_entropy(ctx, &x, cols, &targets, &options);
                let loss_len = want_loss.len();
                // A reduced loss either written into a storage region or copied into a region of
                // a buffer that only allows copies.
                for loss_usage in [usage(), wgpu::BufferUsages::COPY_DST] {
                    if loss_usage == wgpu::BufferUsages::COPY_DST && reduction == Reduction::None {
                        continue;
                    }
                    let what = format!("{rows}x{cols} {reduction:?} {loss_usage:?} at {a} -> {b}");
                    let (x_at, t_at) = (a, a + n + 2);
                    let inputs = Arena::new(
                        ctx,
                        t_at + rows + 3,
                        &[(x_at, &bits(&x)), (t_at, &target_words)],
                        usage(),
                    );
                    let grads = Arena::new(ctx, b + n + 4, &[], usage());
                    let losses = Arena::new(ctx, b + loss_len + 6, &[], loss_usage);
                    let mut encoder = ctx.device().create_command_encoder(&Default::default());
                    let buffers = CrossEntropyBuffers {
                        logits: inputs.region(x_at, n),
                        targets: inputs.region(t_at, rows),
                        target_encoding: TargetEncoding::Indices,
                        loss: losses.region(b + 1, loss_len),
                        grad: GradDestination::Buffer(grads.region(b, n)),
                        rows,
                    };
                    loss_fn.encode(&mut encoder, buffers, 1.0).unwrap();
                    ctx.queue().submit([encoder.finish()]);
                    let _ = inputs.written(ctx, &[], &what);
                    let grad = grads.written(ctx, &[(b, n)], &what);
                    let loss = losses.written(ctx, &[(b + 1, loss_len)], &what);
                    check(&grad[0], &want_grad, Tolerance::SOFTMAX, false, &what);
                    check(&loss[0], &want_loss, Tolerance::LOG_SOFTMAX, false, &what);
                }
            }
        }
    });
}

#[test]
fn cross_entropy_in_place_and_probability_targets_in_regions() {
    with_gpu(|ctx| {
        for (shape, (rows, cols)) in SHAPES.into_iter().enumerate() {
            let n = rows * cols;
            let x = logits(rows, cols, 2.0, 12);
            let probs = ctx.softmax(&logits(rows, cols, 1.0, 13), cols).unwrap();
            let options = CrossEntropyOptions {
                reduction: Reduction::Mean,
                label_smoothing: 0.1,
                ..Default::default()
            };
            let want = ctx
                .cross_entropy_with_grad(
                    &x,
                    cols,
                    Targets::Probabilities(&probs),
                    &options,
                    GradOutput::One,
                )
                .unwrap();
            let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
            let (a, b) = offset_pairs(ctx)[(shape + 1) % 4];
            let what = format!("{rows}x{cols} in place at {a}, targets at {b}");
            // The logits are overwritten by their gradient, in a region of their buffer.
            let logits_arena = Arena::new(ctx, a + n + 3, &[(a, &bits(&x))], usage());
            let targets_arena = Arena::new(ctx, b + n + 2, &[(b, &bits(&probs))], usage());
            let losses = Arena::new(ctx, 8, &[], usage());
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            let buffers = CrossEntropyBuffers {
                logits: logits_arena.region(a, n),
                targets: targets_arena.region(b, n),
                target_encoding: TargetEncoding::Probabilities,
                loss: losses.region(5, 1),
                grad: GradDestination::InPlace,
                rows,
            };
            loss_fn.encode(&mut encoder, buffers, 1.0).unwrap();
            ctx.queue().submit([encoder.finish()]);
            let _ = targets_arena.written(ctx, &[], &what);
            let grad = logits_arena.written(ctx, &[(a, n)], &what);
            let loss = losses.written(ctx, &[(5, 1)], &what);
            check(&grad[0], &want.grad, Tolerance::SOFTMAX, false, &what);
            check(&loss[0], &want.loss, Tolerance::LOG_SOFTMAX, false, &what);
        }
    });
}

#[test]
fn bad_regions_are_typed_errors() {
    with_gpu(|ctx| {
        let (rows, cols) = (4, 10);
        let n = rows * cols;
        let arena = Arena::new(ctx, 4 * n, &[], usage());
        let other = Arena::new(ctx, 4 * n, &[], usage());
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let e = &mut encoder;
        // A region that does not start on a word.
        assert!(matches!(
            ctx.encode_softmax(
                e,
                arena.bytes(2..2 + 4 * n as u64),
                other.region(0, n),
                rows,
                cols
            ),
            Err(Error::Misaligned {
                what: "input",
                offset: 2,
                align: 4
            })
        ));
        // A region one word short: its own size is reported, not the buffer's.
        assert!(matches!(
            ctx.encode_log_softmax(e, arena.region(1, n), other.region(3, n - 1), rows, cols),
            Err(Error::BufferTooSmall { what: "output", size, needed })
                if size == 4 * (n as u64 - 1) && needed == 4 * n as u64
        ));
        // Disjoint regions of one buffer, one of them written: wgpu tracks the buffer whole.
        assert!(matches!(
            ctx.encode_softmax(e, arena.region(0, n), arena.region(n, n), rows, cols),
            Err(Error::Aliased {
                first: "input",
                second: "output"
            })
        ));
        assert!(matches!(
            ctx.encode_softmax_backward(
                e,
                arena.region(0, n),
                other.region(0, n),
                other.region(n, n),
                rows,
                cols
            ),
            Err(Error::Aliased {
                first: "grad_output",
                second: "grad_input"
            })
        ));
        assert!(matches!(
            ctx.encode_softmax_jacobian(e, arena.region(0, n), other.bytes(6..640), rows, cols),
            Err(Error::Misaligned {
                what: "output",
                offset: 6,
                ..
            })
        ));
        let loss_fn = ctx
            .cross_entropy_loss(cols, &CrossEntropyOptions::default())
            .unwrap();
        let buffers = CrossEntropyBuffers {
            logits: arena.region(0, n),
            targets: other.region(0, rows),
            target_encoding: TargetEncoding::Indices,
            loss: other.region(2 * n, 1),
            grad: GradDestination::None,
            rows,
        };
        assert!(matches!(
            loss_fn.encode(e, buffers, 1.0),
            Err(Error::Aliased {
                first: "targets",
                second: "loss"
            })
        ));
        let third = Arena::new(ctx, 8, &[], usage());
        let short_targets = CrossEntropyBuffers {
            targets: other.region(1, rows - 1),
            loss: third.region(0, 1),
            ..buffers
        };
        assert!(matches!(
            loss_fn.encode(e, short_targets, 1.0),
            Err(Error::BufferTooSmall {
                what: "targets",
                ..
            })
        ));
        let misaligned_loss = CrossEntropyBuffers {
            loss: third.bytes(1..5),
            ..buffers
        };
        assert!(matches!(
            loss_fn.encode(e, misaligned_loss, 1.0),
            Err(Error::Misaligned {
                what: "loss",
                offset: 1,
                align: 4
            })
        ));
        // Nothing above recorded anything; the encoder is still valid.
        ctx.queue().submit([encoder.finish()]);
        let _ = arena.written(ctx, &[], "after refused calls");
        let _ = other.written(ctx, &[], "after refused calls");
        let _ = third.written(ctx, &[], "after refused calls");
    });
}

#[test]
fn empty_batches_in_empty_regions_at_a_buffers_end() {
    with_gpu(|ctx| {
        let cols = 10;
        let input = Arena::new(ctx, 12, &[], usage());
        let output = Arena::new(ctx, 12, &[], usage());
        let losses = Arena::new(ctx, 4, &[], usage());
        let (empty_in, empty_out) = (input.bytes(48..48), output.bytes(48..48));
        let device = ctx.device();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = device.create_command_encoder(&Default::default());
        let e = &mut encoder;
        ctx.encode_softmax(e, empty_in, empty_out, 0, cols).unwrap();
        ctx.encode_log_softmax(e, empty_in, empty_out, 0, cols)
            .unwrap();
        ctx.encode_softmax_backward(e, empty_in, empty_in, empty_out, 0, cols)
            .unwrap();
        ctx.encode_log_softmax_backward(e, empty_in, empty_in, empty_out, 0, cols)
            .unwrap();
        ctx.encode_softmax_jacobian(e, empty_in, empty_out, 0, cols)
            .unwrap();
        for (slot, reduction) in [Reduction::None, Reduction::Mean, Reduction::Sum]
            .into_iter()
            .enumerate()
        {
            let options = CrossEntropyOptions {
                reduction,
                ..Default::default()
            };
            let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
            let loss = match reduction {
                Reduction::None => losses.bytes(16..16),
                _ => losses.region(slot, 1),
            };
            let buffers = CrossEntropyBuffers {
                logits: empty_in,
                targets: input.bytes(4..4),
                target_encoding: TargetEncoding::Indices,
                loss,
                grad: GradDestination::Buffer(empty_out),
                rows: 0,
            };
            loss_fn.encode(e, buffers, 1.0).unwrap();
        }
        ctx.queue().submit([encoder.finish()]);
        let error = pollster::block_on(scope.pop());
        assert!(error.is_none(), "{error:?}");
        let _ = input.written(ctx, &[], "empty batches");
        let _ = output.written(ctx, &[], "empty batches");
        // Mean over no rows is NaN, Sum is 0 (slot 0, Reduction::None, writes nothing).
        let loss = losses.written(ctx, &[(1, 1), (2, 1)], "empty batches");
        assert!(loss[0][0].is_nan(), "{loss:?}");
        assert_eq!(loss[1][0].to_bits(), 0, "{loss:?}");
    });
}

#[test]
fn cross_entropy_reads_its_upstream_gradient_from_a_region() {
    with_gpu(|ctx| {
        for (rows, cols) in SHAPES {
            let n = rows * cols;
            let x = logits(rows, cols, 2.0, 21);
            let targets: Vec<i64> = (0..rows).map(|r| ((r * 5) % cols) as i64).collect();
            let target_words: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
            let g: Vec<f32> = (0..rows).map(|r| 0.5 - r as f32 * 0.25).collect();
            for reduction in [Reduction::None, Reduction::Mean, Reduction::Sum] {
                let options = CrossEntropyOptions {
                    reduction,
                    ..Default::default()
                };
                // One multiplier per row for None, one for the batch otherwise.
                let (upstream, host_upstream) = match reduction {
                    Reduction::None => (&g[..], GradOutput::PerRow(&g)),
                    _ => (&g[..1], GradOutput::Scalar(g[0])),
                };
                let want = ctx
                    .cross_entropy_with_grad(
                        &x,
                        cols,
                        Targets::Indices(&targets),
                        &options,
                        host_upstream,
                    )
                    .unwrap();
                let what = format!("{rows}x{cols} {reduction:?}");
                let (x_at, t_at, g_at) = (3, 3 + n + 1, 3 + n + 1 + rows + 2);
                let inputs = Arena::new(
                    ctx,
                    g_at + rows + 1,
                    &[
                        (x_at, &bits(&x)),
                        (t_at, &target_words),
                        (g_at, &bits(upstream)),
                    ],
                    usage(),
                );
                let (grads, losses) = (
                    Arena::new(ctx, n + 3, &[], usage()),
                    Arena::new(ctx, rows + 8, &[], usage()),
                );
                let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
                let loss_len = want.loss.len();
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let buffers = CrossEntropyBuffers {
                    logits: inputs.region(x_at, n),
                    targets: inputs.region(t_at, rows),
                    target_encoding: TargetEncoding::Indices,
                    loss: losses.region(5, loss_len),
                    grad: GradDestination::Buffer(grads.region(1, n)),
                    rows,
                };
                let region = DeviceGradOutput::Region(inputs.region(g_at, upstream.len()));
                loss_fn.encode(&mut encoder, buffers, region).unwrap();
                ctx.queue().submit([encoder.finish()]);
                let grad = grads.written(ctx, &[(1, n)], &what);
                let loss = losses.written(ctx, &[(5, loss_len)], &what);
                let _ = inputs.written(ctx, &[], &what);
                check(&grad[0], &want.grad, Tolerance::SOFTMAX, false, &what);
                check(&loss[0], &want.loss, Tolerance::LOG_SOFTMAX, false, &what);

                // The same through the tensor form, the multipliers in a tensor.
                let x_t = ctx.upload(&x, cols).unwrap();
                let t_t = loss_fn.upload_targets(Targets::Indices(&targets)).unwrap();
                let g_t = ctx.upload(upstream, 1).unwrap();
                let loss_t = ctx.empty(loss_len, 1).unwrap();
                let grad_t = ctx.empty(rows, cols).unwrap();
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                loss_fn
                    .encode_tensors(
                        &mut encoder,
                        &x_t,
                        &t_t,
                        &loss_t,
                        GradDestination::Buffer((&grad_t).into()),
                        DeviceGradOutput::Region((&g_t).into()),
                    )
                    .unwrap();
                ctx.queue().submit([encoder.finish()]);
                let what = format!("{what}, tensors");
                check(
                    &grad_t.to_vec().unwrap(),
                    &want.grad,
                    Tolerance::SOFTMAX,
                    false,
                    &what,
                );
                check(
                    &loss_t.to_vec().unwrap(),
                    &want.loss,
                    Tolerance::LOG_SOFTMAX,
                    false,
                    &what,
                );
            }
        }
    });
}

#[test]
fn upstream_regions_and_in_place_calls_refuse_what_they_would_overwrite() {
    with_gpu(|ctx| {
        let (rows, cols) = (4, 10);
        let n = rows * cols;
        let options = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        let [logits, targets, grad, loss] = [0; 4].map(|_| Arena::new(ctx, 2 * n, &[], usage()));
        let buffers = CrossEntropyBuffers {
            logits: logits.region(0, n),
            targets: targets.region(0, rows),
            target_encoding: TargetEncoding::Indices,
            loss: loss.region(0, rows),
            grad: GradDestination::Buffer(grad.region(0, n)),
            rows,
        };
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let e = &mut encoder;
        let upstream = |region| DeviceGradOutput::Region(region);
        assert!(matches!(
            loss_fn.encode(e, buffers, upstream(targets.region(rows, rows - 1))),
            Err(Error::BufferTooSmall {
                what: "grad_output",
                ..
            })
        ));
        assert!(matches!(
            loss_fn.encode(e, buffers, upstream(targets.bytes(2..42))),
            Err(Error::Misaligned {
                what: "grad_output",
                ..
            })
        ));
        assert!(matches!(
            loss_fn.encode(e, buffers, upstream(grad.region(n, rows))),
            Err(Error::Aliased {
                first: "grad_output",
                second: "grad"
            })
        ));
        assert!(matches!(
            loss_fn.encode(e, buffers, upstream(loss.region(rows, rows))),
            Err(Error::Aliased {
                first: "grad_output",
                second: "loss"
            })
        ));
        let in_place = CrossEntropyBuffers {
            grad: GradDestination::InPlace,
            ..buffers
        };
        assert!(matches!(
            loss_fn.encode(e, in_place, upstream(logits.region(n, rows))),
            Err(Error::Aliased {
                first: "grad_output",
                second: "logits"
            })
        ));
        let targets_beside_logits = CrossEntropyBuffers {
            targets: logits.region(n, rows),
            ..in_place
        };
        assert!(matches!(
            loss_fn.encode(e, targets_beside_logits, 1.0),
            Err(Error::Aliased {
                first: "targets",
                second: "logits"
            })
        ));
        // A region beside the others in a buffer of its own is taken.
        loss_fn
            .encode(e, buffers, upstream(targets.region(rows, rows)))
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        let _ = loss.written(ctx, &[(0, rows)], "after one call");
    });
}

/// Unaligned rows streamed as the vec4s that hold them read and write a whole vec4 past their
/// end only where the buffer has one: a region that ends at its buffer's end, or a word or two
/// before it, takes the scalar kernel, and writes nothing outside its region either way.
#[test]
fn unaligned_rows_at_a_buffers_end() {
    with_gpu(|ctx| {
        let (rows, cols) = (3, 4099);
        let n = rows * cols;
        let x = logits(rows, cols, 3.0, 11);
        let want = ctx.softmax(&x, cols).unwrap();
        let want_log = ctx.log_softmax(&x, cols).unwrap();
        // Words after the region: none, a partial vec4, a whole one.
        for room in [0, 1, 3] {
            let what = format!("{room} words after the regions");
            let input = Arena::new(ctx, 4 + n + room, &[(4, &bits(&x))], usage());
            let output = Arena::new(ctx, 8 + n + room, &[], usage());
            let log_output = Arena::new(ctx, 8 + n + room, &[], usage());
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            let x_region = input.region(4, n);
            ctx.encode_softmax(&mut encoder, x_region, output.region(8, n), rows, cols)
                .unwrap();
            ctx.encode_log_softmax(&mut encoder, x_region, log_output.region(8, n), rows, cols)
                .unwrap();
            ctx.queue().submit([encoder.finish()]);
            let _ = input.written(ctx, &[], &what);
            let got = output.written(ctx, &[(8, n)], &what);
            check(&got[0], &want, Tolerance::SOFTMAX, room == 3, &what);
            let got = log_output.written(ctx, &[(8, n)], &what);
            check(&got[0], &want_log, Tolerance::LOG_SOFTMAX, room == 3, &what);
        }
    });
}

/// Cross-entropy's logits and gradient likewise (in their own buffers and in place); its
/// probability targets, read element by element, need no room after them and end their buffer
/// in every case.
#[test]
fn cross_entropy_over_unaligned_rows_at_a_buffers_end() {
    with_gpu(|ctx| {
        let (rows, cols) = (3, 4099);
        let n = rows * cols;
        let x = logits(rows, cols, 3.0, 11);
        let probs = ctx.softmax(&logits(rows, cols, 1.0, 13), cols).unwrap();
        let options = CrossEntropyOptions {
            reduction: Reduction::None,
            label_smoothing: 0.1,
            ..Default::default()
        };
        let targets = Targets::Probabilities(&probs);
        let want = ctx
            .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
            .unwrap();
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        for room in [0, 1, 3] {
            for in_place in [false, true] {
                let what = format!("{room} words after the regions, in place {in_place}");
                let logits_arena = Arena::new(ctx, 4 + n + room, &[(4, &bits(&x))], usage());
                let targets_arena = Arena::new(ctx, 8 + n, &[(8, &bits(&probs))], usage());
                let grads = Arena::new(ctx, 8 + n + room, &[], usage());
                let losses = Arena::new(ctx, 4 + rows, &[], usage());
                let (grad, grad_at) = if in_place {
                    (GradDestination::InPlace, (&logits_arena, 4))
                } else {
                    (GradDestination::Buffer(grads.region(8, n)), (&grads, 8))
                };
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                let buffers = CrossEntropyBuffers {
                    logits: logits_arena.region(4, n),
                    targets: targets_arena.region(8, n),
                    target_encoding: TargetEncoding::Probabilities,
                    loss: losses.region(4, rows),
                    grad,
                    rows,
                };
                loss_fn.encode(&mut encoder, buffers, 1.0).unwrap();
                ctx.queue().submit([encoder.finish()]);
                let _ = targets_arena.written(ctx, &[], &what);
                if in_place {
                    let _ = grads.written(ctx, &[], &what);
                } else {
                    let _ = logits_arena.written(ctx, &[], &what);
                }
                let got = grad_at.0.written(ctx, &[(grad_at.1, n)], &what);
                check(&got[0], &want.grad, Tolerance::SOFTMAX, room == 3, &what);
                let loss = losses.written(ctx, &[(4, rows)], &what);
                check(
                    &loss[0],
                    &want.loss,
                    Tolerance::LOG_SOFTMAX,
                    room == 3,
                    &what,
                );
            }
        }
    });
}
