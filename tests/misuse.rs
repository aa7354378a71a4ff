//! Every misuse of the public API is a typed error carrying the values involved, never a panic:
//! shapes and lengths, targets, weights, the caller's buffers, the caller's device.

mod common;

use common::{device_on_same_adapter, logits, with_gpu};
use wgpu_softmax::{
    Context, CrossEntropyBuffers, CrossEntropyOptions, Error, GradDestination, GradOutput,
    Reduction, TargetEncoding, Targets,
};

#[test]
fn host_forms_reject_bad_shapes_with_the_lengths_involved() {
    with_gpu(|ctx| {
        let x = [0.0f32; 6];
        type Host<'a> = Box<dyn Fn(&[f32], usize) -> Result<Vec<f32>, Error> + 'a>;
        let ops: Vec<(&str, Host<'_>)> = vec![
            ("softmax", Box::new(|x, c| ctx.softmax(x, c))),
            ("log_softmax", Box::new(|x, c| ctx.log_softmax(x, c))),
            (
                "softmax_backward",
                Box::new(|x, c| ctx.softmax_backward(x, x, c)),
            ),
            (
                "log_softmax_backward",
                Box::new(|x, c| ctx.log_softmax_backward(x, x, c)),
            ),
            ("jacobian", Box::new(|x, c| ctx.softmax_jacobian(x, c))),
            (
                "cross_entropy",
                Box::new(|x, c| {
                    let t = vec![0i64; x.len() / c.max(1)];
                    ctx.cross_entropy(x, c, Targets::Indices(&t), &Default::default())
                }),
            ),
        ];
        for (name, op) in &ops {
            assert!(matches!(op(&x, 0), Err(Error::ZeroCols)), "{name}");
            assert!(
                matches!(
                    op(&x[..5], 2),
                    Err(Error::LengthNotMultiple {
                        len: 5,
                        cols: 2,
                        ..
                    })
                ),
                "{name}"
            );
        }
        for result in [
            ctx.softmax_backward(&x, &x[..3], 3),
            ctx.log_softmax_backward(&x, &[0.0; 9], 3),
        ] {
            assert!(matches!(
                result,
                Err(Error::LengthMismatch {
                    what: "grad_output",
                    expected: 6,
                    ..
                })
            ));
        }
        assert!(matches!(
            ctx.softmax_backward(&x[..5], &x[..5], 2),
            Err(Error::LengthNotMultiple { what: "y", .. })
        ));
    });
}

#[test]
fn cross_entropy_targets_and_options_are_checked_with_row_and_value() {
    with_gpu(|ctx| {
        let x = logits(4, 3, 1.0, 0);
        let opts = CrossEntropyOptions::default();
        for (targets, row, value) in [
            (Targets::Indices(&[0, 1, 2, 3]), 3, 3),
            (Targets::Indices(&[0, -1, 2, 0]), 1, -1),
            (Targets::Indices(&[i64::MIN, 0, 0, 0]), 0, i64::MIN),
            (Targets::IndicesI32(&[0, 0, 7, 0]), 2, 7),
        ] {
            let got = ctx.cross_entropy_with_grad(&x, 3, targets, &opts, GradOutput::One);
            match got {
                Err(Error::TargetOutOfRange {
                    row: r,
                    value: v,
                    classes: 3,
                    ignore_index: -100,
                }) if (r, v) == (row, value) => {}
                other => panic!("{targets:?}: {other:?}"),
            }
        }
        // The ignore index is not a class; any other negative value is out of range.
        let custom = CrossEntropyOptions {
            ignore_index: -5,
            ..Default::default()
        };
        assert!(ctx
            .cross_entropy(&x, 3, Targets::Indices(&[0, -5, 1, 2]), &custom)
            .is_ok());
        assert!(matches!(
            ctx.cross_entropy(&x, 3, Targets::Indices(&[0, -100, 1, 2]), &custom),
            Err(Error::TargetOutOfRange {
                row: 1,
                value: -100,
                ignore_index: -5,
                ..
            })
        ));
        // Device-resident targets are checked on upload.
        let loss_fn = ctx.cross_entropy_loss(3, &opts).unwrap();
        assert!(matches!(
            loss_fn.upload_targets(Targets::IndicesI32(&[1, 3])),
            Err(Error::TargetOutOfRange {
                row: 1,
                value: 3,
                ..
            })
        ));
        assert!(matches!(
            loss_fn.upload_targets(Targets::Probabilities(&[0.5; 5])),
            Err(Error::LengthNotMultiple {
                len: 5,
                cols: 3,
                ..
            })
        ));
        for weight in [&[1.0f32; 2][..], &[1.0; 4][..], &[][..]] {
            let o = CrossEntropyOptions {
                weight: Some(weight),
                ..Default::default()
            };
            let expected = |e: &Error| {
                matches!(e, Error::LengthMismatch { what: "weight", expected: 3, actual }
                    if *actual == weight.len())
            };
            assert!(expected(&ctx.cross_entropy_loss(3, &o).unwrap_err()));
            let err = ctx
                .cross_entropy(&x, 3, Targets::Indices(&[0; 4]), &o)
                .unwrap_err();
            assert!(expected(&err), "{err:?}");
        }
        for e in [-0.5, 1.01, f32::NAN] {
            let o = CrossEntropyOptions {
                label_smoothing: e,
                ..Default::default()
            };
            assert!(matches!(
                ctx.cross_entropy_loss(3, &o),
                Err(Error::LabelSmoothing(_))
            ));
        }
        assert!(matches!(
            ctx.cross_entropy_loss(0, &opts),
            Err(Error::ZeroCols)
        ));
    });
}

#[test]
fn device_resident_shapes_must_agree() {
    with_gpu(|ctx| {
        let a = ctx.upload(&[0.0; 6], 3).unwrap();
        let b = ctx.upload(&[0.0; 6], 2).unwrap();
        let c = ctx.upload(&[0.0; 9], 3).unwrap();
        assert!(matches!(
            a.softmax_backward(&c),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            a.log_softmax_backward(&b),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(a.log_softmax_into(&a), Err(Error::Aliased { .. })));
        let loss_fn = ctx
            .cross_entropy_loss(3, &CrossEntropyOptions::default())
            .unwrap();
        let targets = loss_fn
            .upload_targets(Targets::Indices(&[0, 1, 2]))
            .unwrap();
        assert!(matches!(
            loss_fn.loss(&a, &targets),
            Err(Error::LengthMismatch {
                what: "target rows",
                expected: 2,
                actual: 3
            })
        ));
        assert!(matches!(
            loss_fn.loss(&b, &targets),
            Err(Error::LengthMismatch {
                what: "logits cols",
                ..
            })
        ));
        assert!(matches!(
            loss_fn.loss_and_grad(&c, &targets, GradOutput::PerRow(&[1.0, 2.0])),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
        // Shapes too large to exist are errors, not arithmetic overflow.
        assert!(matches!(
            ctx.empty(usize::MAX, 3),
            Err(Error::ShapeTooLarge { .. })
        ));
        assert!(matches!(
            ctx.empty(3, usize::MAX),
            Err(Error::ShapeTooLarge { .. })
        ));
        assert!(matches!(ctx.empty(2, 0), Err(Error::ZeroCols)));
        let max = ctx.device().limits().max_buffer_size;
        assert!(matches!(
            ctx.empty(1, (max / 4 + 1) as usize),
            Err(Error::TensorTooLarge { .. })
        ));
    });
}

fn buffer(ctx: &Context, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage,
        mapped_at_creation: false,
    })
}

#[test]
fn callers_buffers_are_checked_for_size_and_usage() {
    with_gpu(|ctx| {
        let storage = wgpu::BufferUsages::STORAGE;
        let good = buffer(ctx, 400, storage);
        let other = buffer(ctx, 400, storage);
        let out = buffer(ctx, 400, storage);
        let small = buffer(ctx, 396, storage);
        let copy_only = buffer(ctx, 400, wgpu::BufferUsages::COPY_DST);
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let e = &mut encoder;
        assert!(matches!(
            ctx.encode_softmax_backward(e, &good, &small, &out, 10, 10),
            Err(Error::BufferTooSmall {
                what: "grad_output",
                size: 396,
                needed: 400
            })
        ));
        assert!(matches!(
            ctx.encode_log_softmax_backward(e, &good, &other, &copy_only, 10, 10),
            Err(Error::MissingUsage {
                what: "grad_input",
                missing
            }) if missing == storage
        ));
        assert!(matches!(
            ctx.encode_softmax_backward(e, &good, &other, &good, 10, 10),
            Err(Error::Aliased {
                first: "y",
                second: "grad_input"
            })
        ));
        assert!(matches!(
            ctx.encode_log_softmax(e, &good, &out, 11, 10),
            Err(Error::BufferTooSmall {
                what: "input",
                needed: 440,
                ..
            })
        ));
        // Absurd shapes saturate into a size check instead of overflowing.
        for (rows, cols) in [(usize::MAX, 1), (1, usize::MAX), (usize::MAX, usize::MAX)] {
            assert!(matches!(
                ctx.encode_softmax(e, &good, &out, rows, cols),
                Err(Error::BufferTooSmall { .. })
            ));
            assert!(matches!(
                ctx.encode_softmax_backward(e, &good, &other, &out, rows, cols),
                Err(Error::BufferTooSmall { .. })
            ));
        }

        for reduction in [Reduction::Mean, Reduction::None] {
            let options = CrossEntropyOptions {
                reduction,
                ..Default::default()
            };
            let loss_fn = ctx.cross_entropy_loss(10, &options).unwrap();
            let loss = buffer(ctx, 40, storage | wgpu::BufferUsages::COPY_DST);
            let buffers = CrossEntropyBuffers {
                logits: (&good).into(),
                targets: (&other).into(),
                target_encoding: TargetEncoding::Indices,
                loss: (&loss).into(),
                grad: GradDestination::Buffer((&out).into()),
                rows: 10,
            };
            let no_usage = CrossEntropyBuffers {
                logits: (&copy_only).into(),
                ..buffers
            };
            assert!(matches!(
                loss_fn.encode(e, no_usage, 1.0),
                Err(Error::MissingUsage { what: "logits", .. })
            ));
            let short_probabilities = CrossEntropyBuffers {
                target_encoding: TargetEncoding::Probabilities,
                targets: (&small).into(),
                ..buffers
            };
            assert!(matches!(
                loss_fn.encode(e, short_probabilities, 1.0),
                Err(Error::BufferTooSmall {
                    what: "targets",
                    ..
                })
            ));
            let in_place_read_only = CrossEntropyBuffers {
                logits: (&copy_only).into(),
                grad: GradDestination::InPlace,
                ..buffers
            };
            assert!(matches!(
                loss_fn.encode(e, in_place_read_only, 1.0),
                Err(Error::MissingUsage { what: "logits", .. })
            ));
            if reduction == Reduction::None {
                // The per-row loss written over the logits or into the gradient's buffer.
                let over_logits = CrossEntropyBuffers {
                    loss: (&good).into(),
                    ..buffers
                };
                assert!(matches!(
                    loss_fn.encode(e, over_logits, 1.0),
                    Err(Error::Aliased {
                        first: "logits",
                        second: "loss"
                    })
                ));
                let over_grad = CrossEntropyBuffers {
                    loss: (&out).into(),
                    ..buffers
                };
                assert!(matches!(
                    loss_fn.encode(e, over_grad, 1.0),
                    Err(Error::Aliased {
                        first: "grad",
                        second: "loss"
                    })
                ));
            }
            let huge = CrossEntropyBuffers {
                rows: usize::MAX,
                ..buffers
            };
            assert!(matches!(
                loss_fn.encode(e, huge, 1.0),
                Err(Error::BufferTooSmall { .. })
            ));
        }
        // A reduced loss is written into the caller's buffer (`STORAGE`) or copied into it
        // (`COPY_DST`): one of the two it must allow.
        let loss_fn = ctx
            .cross_entropy_loss(10, &CrossEntropyOptions::default())
            .unwrap();
        let readable_only = buffer(ctx, 4, wgpu::BufferUsages::COPY_SRC);
        let buffers = CrossEntropyBuffers {
            logits: (&good).into(),
            targets: (&other).into(),
            target_encoding: TargetEncoding::Indices,
            loss: (&readable_only).into(),
            grad: GradDestination::None,
            rows: 10,
        };
        assert!(matches!(
            loss_fn.encode(e, buffers, 1.0),
            Err(Error::MissingUsage { what: "loss", missing }) if missing == storage
        ));
        // Nothing above recorded anything; the encoder is still valid.
        ctx.queue().submit([encoder.finish()]);
    });
}

/// A caller's device created with fewer storage buffers per stage than the cross-entropy kernel
/// binds (seven operands and the split-row partials) is refused with the limit named.
#[test]
fn a_device_below_the_needed_limits_is_refused_with_the_limit_named() {
    with_gpu(|base| {
        for (name, needed, adjust) in [
            (
                "max_storage_buffers_per_shader_stage",
                8,
                (|l| wgpu::Limits {
                    max_storage_buffers_per_shader_stage: 4,
                    ..l
                }) as fn(wgpu::Limits) -> wgpu::Limits,
            ),
            ("max_compute_invocations_per_workgroup", 64, |l| {
                wgpu::Limits {
                    max_compute_invocations_per_workgroup: 32,
                    ..l
                }
            }),
            ("max_compute_workgroup_storage_size", 5120, |l| {
                wgpu::Limits {
                    max_compute_workgroup_storage_size: 4096,
                    ..l
                }
            }),
        ] {
            let (device, queue) = device_on_same_adapter(base, adjust);
            let actual = match name {
                "max_storage_buffers_per_shader_stage" => {
                    device.limits().max_storage_buffers_per_shader_stage
                }
                "max_compute_invocations_per_workgroup" => {
                    device.limits().max_compute_invocations_per_workgroup
                }
                _ => device.limits().max_compute_workgroup_storage_size,
            };
            match Context::from_device(device, queue) {
                Err(Error::InsufficientLimit {
                    limit,
                    needed: n,
                    actual: a,
                }) => {
                    assert_eq!((limit, n, a), (name, needed, u64::from(actual)));
                }
                other => panic!("{name}: expected InsufficientLimit, got {other:?}"),
            }
        }
        // Exactly the limits needed are enough for every kernel, the widest included.
        let (device, queue) = device_on_same_adapter(base, |l| wgpu::Limits {
            max_storage_buffers_per_shader_stage: 8,
            ..l
        });
        let ctx = Context::from_device(device, queue).unwrap();
        let x = logits(5, 300, 1.0, 3);
        let out = ctx
            .cross_entropy_with_grad(
                &x,
                300,
                Targets::Indices(&[1, 2, 3, 4, 5]),
                &Default::default(),
                GradOutput::One,
            )
            .unwrap();
        assert!(out.loss[0].is_finite());
    });
}
