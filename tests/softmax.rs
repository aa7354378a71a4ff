//! Softmax and log-softmax on the GPU against the f64 reference: every shape of the table, every
//! kernel strategy, the three API forms, the documented special values, and the typed errors.

mod common;

use common::{
    assert_same_bits, check_backward, logits, one_pass_contexts, read_buffer, small_limits_context,
    strategy_tunings, tuned, with_gpu, ONE_PASS_OTHER_CHUNKS, ONE_PASS_SHAPES, SHAPES,
};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{
    Context, ContextOptions, CrossEntropyOptions, Engine, Error, GradOutput, Strategy, Targets,
    Tolerance, Tuning,
};

fn check_softmax(ctx: &Context, x: &[f32], cols: usize, what: &str) {
    let got = ctx.softmax(x, cols).expect("softmax");
    let want = reference::softmax(x, cols).expect("reference");
    let cmp = Tolerance::SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "softmax {what}: {cmp:?}");
    let got = ctx.log_softmax(x, cols).expect("log_softmax");
    let want = reference::log_softmax(x, cols).expect("reference");
    let cmp = Tolerance::LOG_SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "log_softmax {what}: {cmp:?}");
}

#[test]
fn matches_the_reference_on_every_shape() {
    with_gpu(|ctx| {
        for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
            let x = logits(rows, cols, 3.0, i as u64);
            check_softmax(ctx, &x, cols, &format!("{rows}x{cols}"));
        }
    });
}

#[test]
fn large_magnitudes_and_wide_spreads_stay_accurate() {
    with_gpu(|ctx| {
        for (scale, cols) in [(80.0, 1000), (1e4, 37), (1e-3, 513)] {
            let x = logits(9, cols, scale, cols as u64);
            check_softmax(ctx, &x, cols, &format!("scale {scale}"));
        }
    });
}

/// Every strategy on shapes it would not be chosen for by default, so each kernel is exercised
/// on every backend whatever the adapter's defaults are.
#[test]
fn every_strategy_matches_the_reference() {
    with_gpu(|base| {
        for (name, tuning) in strategy_tunings() {
            let ctx = tuned(base, tuning);
            // Unaligned shapes (scalar kernels, or the vec4s that hold them: neighbouring rows'
            // teams then store to the same vec4s), then aligned ones (vec4 kernels).
            for &(rows, cols) in &[
                (1, 1),
                (9, 2),
                (3, 7),
                (33, 2049),
                (65, 4097),
                (0, 3),
                (0, 4),
                (3, 4),
                (9, 8),
                (70, 128),
                (5, 100),
                (33, 2048),
                (2, 20_000),
            ] {
                let x = logits(rows, cols, 2.0, (rows * cols) as u64);
                check_softmax(&ctx, &x, cols, &format!("{name} {rows}x{cols}"));
            }
            for cols in [8, 128, 2051, 4096] {
                check_special_values(&ctx, cols, &format!("{name} cols {cols}"));
            }
        }
    });
}

/// Unaligned rows split into chunks that are not a multiple of 4 columns either (the planner
/// keeps such chunks for kernels that load one element at a time): chunk boundaries then fall at
/// every place within a vec4, and the kernels that read a chunk as the vec4s that hold it mask
/// both ends. Both chunk teams, the special values, and the backward ops.
#[test]
fn unaligned_rows_split_at_every_place_within_a_vec4() {
    with_gpu(|base| {
        for (chunk, split_team) in [(301, 0), (302, 2), (303, 0), (304, 2)] {
            let ctx = tuned(
                base,
                Tuning {
                    split_min_cols: 1,
                    split_max_rows: u32::MAX,
                    split_chunk: chunk,
                    split_team,
                    ..base.tuning()
                },
            );
            for (rows, cols) in [(3, 1001), (2, 4099), (5, 611)] {
                let what = format!("chunk {chunk} {rows}x{cols}");
                let x = logits(rows, cols, 2.0, (rows * cols + chunk as usize) as u64);
                check_softmax(&ctx, &x, cols, &what);
                // The backward ops, whose kernels take their rows the same way.
                let dy = logits(rows, cols, 1.0, chunk as u64);
                check_backward(&ctx, &x, &dy, cols, &what);
            }
            check_special_values(&ctx, 1001, &format!("chunk {chunk}"));
        }
    });
}

/// Split rows taken in one pass (`split_wait`): a chunk writes its output when its row's other
/// chunks have shared their statistics within the wait, and the finishing pass writes the rest.
/// On any adapter some chunks take each path (a row of one chunk never waits; a short wait
/// leaves most to the finishing pass), and the outputs must match the reference and be the same
/// bits whichever pass wrote them. Each context runs two inputs of every shape in turn, so a
/// call that left its sync words behind would hand stale statistics to the next.
#[test]
fn split_rows_in_one_pass_match_whichever_pass_writes_them() {
    with_gpu(|base| {
        let contexts = one_pass_contexts(base, |t, wait| t.split_wait = wait);
        let inf = f32::INFINITY;
        for (rows, cols) in ONE_PASS_SHAPES {
            for seed in [1, 2] {
                let mut x = logits(rows, cols, 3.0, (seed * cols) as u64);
                if rows > 1 && cols > 300 {
                    // A whole chunk of -inf in a row that has finite entries: probability 0.
                    x[cols..cols + 300].fill(-inf);
                }
                let want = reference::softmax(&x, cols).unwrap();
                let want_log = reference::log_softmax(&x, cols).unwrap();
                let mut first = None;
                for (name, ctx) in &contexts {
                    let what = format!("{name} {rows}x{cols} seed {seed}");
                    let (sm, lsm) = (
                        ctx.softmax(&x, cols).unwrap(),
                        ctx.log_softmax(&x, cols).unwrap(),
                    );
                    let cmp = Tolerance::SOFTMAX.compare(&sm, &want);
                    assert!(cmp.passed(), "softmax {what}: {cmp:?}");
                    let cmp = Tolerance::LOG_SOFTMAX.compare(&lsm, &want_log);
                    assert!(cmp.passed(), "log_softmax {what}: {cmp:?}");
                    if rows > 1 && cols > 300 {
                        assert!(sm[cols..cols + 300].iter().all(|&v| v == 0.0), "{what}");
                        assert!(lsm[cols..cols + 300].iter().all(|&v| v == -inf), "{what}");
                    }
                    // The same chunking gives the same bits, whichever pass wrote a chunk.
                    if *name == ONE_PASS_OTHER_CHUNKS {
                        continue;
                    }
                    assert_same_bits(&mut first, vec![sm, lsm], &what);
                }
            }
        }
        for (name, ctx) in &contexts {
            for cols in [8, 1200, 4096] {
                check_special_values(ctx, cols, &format!("{name} cols {cols}"));
            }
        }
    });
}

#[test]
fn dominant_logit_takes_all_the_probability() {
    with_gpu(|ctx| {
        assert_eq!(
            ctx.softmax(&[1000.0, 0.0, 0.0, 0.0], 4).unwrap(),
            [1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(ctx.log_softmax(&[1000.0, 1.0], 2).unwrap(), [0.0, -999.0]);
    });
}

#[test]
fn translation_invariant_even_for_offsets_of_1e7() {
    with_gpu(|ctx| {
        for cols in [4, 100, 3000, 70_000] {
            // Integers are exact after adding 1e7 in f32, so x + c is exactly representable.
            let x: Vec<f32> = (0..3 * cols)
                .map(|i| ((i * 7919) % 17) as f32 - 8.0)
                .collect();
            let base = ctx.softmax(&x, cols).unwrap();
            let base_log = ctx.log_softmax(&x, cols).unwrap();
            for c in [1e4f32, 1e7] {
                let shifted: Vec<f32> = x.iter().map(|v| v + c).collect();
                assert_eq!(
                    ctx.softmax(&shifted, cols).unwrap(),
                    base,
                    "softmax cols {cols} c {c}"
                );
                assert_eq!(
                    ctx.log_softmax(&shifted, cols).unwrap(),
                    base_log,
                    "log cols {cols} c {c}"
                );
            }
        }
    });
}

/// Six rows of `cols` columns: a -inf entry, all -inf, a +inf, a NaN, -inf over the first half
/// (so that a streamed row's lanes start with blocks of -inf only), and an ordinary row.
fn check_special_values(ctx: &Context, cols: usize, what: &str) {
    let inf = f32::INFINITY;
    let mut x = logits(6, cols, 1.0, 7);
    let row = |r: usize| r * cols..(r + 1) * cols;
    x[row(0).start + cols / 2] = -inf; // a -inf entry: probability 0
    x[row(1)].fill(-inf); // all -inf: NaN
    x[row(2).start + cols / 3] = inf; // +inf: NaN row
    x[row(3).end - 1] = f32::NAN; // NaN: NaN row
    let half = row(4).start..row(4).start + cols / 2;
    x[half.clone()].fill(-inf); // probability 0 there, the rest as if alone

    // Row 5 is ordinary and must be unaffected.
    let sm = ctx.softmax(&x, cols).unwrap();
    let lsm = ctx.log_softmax(&x, cols).unwrap();
    assert_eq!(sm[row(0).start + cols / 2], 0.0, "{what}");
    assert_eq!(lsm[row(0).start + cols / 2], -inf, "{what}");
    assert!(sm[half.clone()].iter().all(|&v| v == 0.0), "{what}");
    assert!(lsm[half].iter().all(|&v| v == -inf), "{what}");
    for r in 1..4 {
        assert!(
            sm[row(r)].iter().all(|v| v.is_nan()),
            "softmax row {r} {what}"
        );
        assert!(lsm[row(r)].iter().all(|v| v.is_nan()), "log row {r} {what}");
    }
    let want = reference::softmax(&x, cols).unwrap();
    assert!(Tolerance::SOFTMAX.compare(&sm, &want).passed(), "{what}");
    let want = reference::log_softmax(&x, cols).unwrap();
    assert!(
        Tolerance::LOG_SOFTMAX.compare(&lsm, &want).passed(),
        "{what}"
    );
}

#[test]
fn special_values_follow_the_documented_policy() {
    with_gpu(|ctx| {
        // Unaligned rows run the scalar kernels (or, streamed, the vec4s that hold them),
        // aligned ones the vec4 kernels.
        for cols in [3, 41, 5001, 70_001, 4, 64, 4096, 65_536] {
            check_special_values(ctx, cols, &format!("cols {cols}"));
        }
    });
}

#[test]
fn identical_rows_give_identical_outputs_past_the_dispatch_limit() {
    with_gpu(|ctx| {
        for cols in [10, 100] {
            let rows = 70_000;
            let one = logits(1, cols, 4.0, 3);
            let x: Vec<f32> = one.iter().copied().cycle().take(rows * cols).collect();
            let out = ctx.softmax(&x, cols).unwrap();
            let first = &out[..cols];
            for r in 0..rows {
                assert_eq!(&out[r * cols..(r + 1) * cols], first, "row {r}");
            }
            let sum: f64 = first.iter().map(|&v| f64::from(v)).sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    });
}

#[test]
fn batch_over_128_mib_is_split_transparently() {
    with_gpu(|ctx| {
        let cols = 1000;
        let rows = (130 << 20) / (cols * 4) + 7;
        let x = logits(rows, cols, 2.0, 11);
        assert!(x.len() * 4 > 128 << 20);
        check_softmax(ctx, &x, cols, "over 128 MiB");
    });
}

/// Host forms stage batches through blocks of at most 64 MiB, but a row longer than that is
/// still one block when the device's binding holds it.
#[test]
fn host_forms_take_rows_longer_than_their_staging_block() {
    with_gpu(|ctx| {
        let cols = (64 << 20) / 4 + 4;
        let x = logits(1, cols, 3.0, 17);
        check_softmax(ctx, &x, cols, "one row over 64 MiB");
        let targets = [cols as i64 - 3];
        let options = wgpu_softmax::CrossEntropyOptions::default();
        let got = ctx
            .cross_entropy(&x, cols, wgpu_softmax::Targets::Indices(&targets), &options)
            .expect("cross-entropy");
        let want = reference::cross_entropy(
            &x,
            cols,
            wgpu_softmax::Targets::Indices(&targets),
            &options,
            wgpu_softmax::GradOutput::One,
        )
        .expect("reference");
        assert!(
            (f64::from(got[0]) - want.loss[0]).abs() <= 1e-5 * want.loss[0].abs().max(1.0),
            "cross-entropy of one row over 64 MiB: {} vs {}",
            got[0],
            want.loss[0]
        );
    });
}

/// A device with tiny limits exercises every chunking path in milliseconds: host batches larger
/// than a binding and a buffer, and tensors larger than one binding.
#[test]
fn small_device_limits_are_respected() {
    with_gpu(|base| {
        let ctx = small_limits_context(base);
        let cols = 1000;
        // 3 MiB: three times the binding limit, below the buffer limit.
        let x = logits(3 << 8, cols, 2.0, 5);
        check_softmax(&ctx, &x, cols, "host, small limits");
        let t = ctx.upload(&x, cols).unwrap();
        let y = t.softmax().unwrap().to_vec().unwrap();
        let cmp = Tolerance::SOFTMAX.compare(&y, &reference::softmax(&x, cols).unwrap());
        assert!(cmp.passed(), "tensor over one binding: {cmp:?}");
        // 10 MiB host batch: larger than the largest buffer.
        let x = logits(10 << 8, cols, 2.0, 6);
        check_softmax(&ctx, &x, cols, "host, over max_buffer_size");
        assert!(matches!(
            ctx.upload(&x, cols),
            Err(Error::TensorTooLarge { .. })
        ));
        // A single row wider than one binding is an error, not a wrong answer.
        let wide = vec![0.0f32; 300_000];
        assert!(matches!(
            ctx.softmax(&wide, wide.len()),
            Err(Error::RowTooLong { .. })
        ));
    });
}

#[test]
fn device_resident_ops_chain_without_readback() {
    with_gpu(|ctx| {
        let (rows, cols) = (129, 777);
        let x = logits(rows, cols, 2.0, 9);
        let t = ctx.upload(&x, cols).unwrap();
        assert_eq!((t.rows(), t.cols()), (rows, cols));
        let sm = t.softmax().unwrap();
        let lsm = t.log_softmax().unwrap();
        // log_softmax of probabilities in (0, 1] is well defined: a second op on a device result.
        let twice = sm.log_softmax().unwrap();
        let sm = sm.to_vec().unwrap();
        assert!(Tolerance::SOFTMAX
            .compare(&sm, &reference::softmax(&x, cols).unwrap())
            .passed());
        let lsm = pollster::block_on(lsm.to_vec_async()).unwrap();
        assert!(Tolerance::LOG_SOFTMAX
            .compare(&lsm, &reference::log_softmax(&x, cols).unwrap())
            .passed());
        let twice = twice.to_vec().unwrap();
        let want = reference::log_softmax(&sm, cols).unwrap();
        assert!(Tolerance::LOG_SOFTMAX.compare(&twice, &want).passed());
        let out = ctx.empty(rows, cols).unwrap();
        t.softmax_into(&out).unwrap();
        assert_eq!(out.to_vec().unwrap(), sm);
    });
}

#[test]
fn async_host_forms_match_the_blocking_ones() {
    with_gpu(|ctx| {
        let x = logits(40, 333, 2.0, 2);
        let a = pollster::block_on(ctx.softmax_async(&x, 333)).unwrap();
        assert_eq!(a, ctx.softmax(&x, 333).unwrap());
        let a = pollster::block_on(ctx.log_softmax_async(&x, 333)).unwrap();
        assert_eq!(a, ctx.log_softmax(&x, 333).unwrap());
    });
}

#[test]
fn encode_form_records_into_the_callers_encoder() {
    with_gpu(|ctx| {
        use wgpu::util::DeviceExt;
        let (rows, cols) = (50, 1234);
        let x = logits(rows, cols, 2.0, 4);
        let device = ctx.device();
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let input = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&x),
            usage,
        });
        let make = || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (x.len() * 4) as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        let (sm, lsm) = (make(), make());
        let mut encoder = device.create_command_encoder(&Default::default());
        ctx.encode_softmax(&mut encoder, &input, &sm, rows, cols)
            .unwrap();
        ctx.encode_log_softmax(&mut encoder, &input, &lsm, rows, cols)
            .unwrap();
        ctx.queue().submit([encoder.finish()]);
        let read = |buffer: &wgpu::Buffer| read_buffer(ctx, buffer, x.len());
        assert!(Tolerance::SOFTMAX
            .compare(&read(&sm), &reference::softmax(&x, cols).unwrap())
            .passed());
        assert!(Tolerance::LOG_SOFTMAX
            .compare(&read(&lsm), &reference::log_softmax(&x, cols).unwrap())
            .passed());
    });
}

#[test]
fn misuse_returns_typed_errors() {
    with_gpu(|ctx| {
        assert!(matches!(ctx.softmax(&[1.0, 2.0], 0), Err(Error::ZeroCols)));
        assert!(matches!(
            ctx.softmax(&[1.0, 2.0, 3.0], 2),
            Err(Error::LengthNotMultiple {
                len: 3,
                cols: 2,
                ..
            })
        ));
        assert!(matches!(
            ctx.upload(&[1.0; 5], 2),
            Err(Error::LengthNotMultiple { .. })
        ));
        let device = ctx.device();
        let buffer = |size, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let storage = wgpu::BufferUsages::STORAGE;
        let input = buffer(400, storage);
        let small = buffer(396, storage);
        let unusable = buffer(400, wgpu::BufferUsages::COPY_DST);
        let mut encoder = device.create_command_encoder(&Default::default());
        assert!(matches!(
            ctx.encode_softmax(&mut encoder, &input, &small, 10, 10),
            Err(Error::BufferTooSmall {
                what: "output",
                size: 396,
                needed: 400
            })
        ));
        assert!(matches!(
            ctx.encode_softmax(&mut encoder, &unusable, &input, 10, 10),
            Err(Error::MissingUsage { what: "input", .. })
        ));
        assert!(matches!(
            ctx.encode_softmax(&mut encoder, &input, &input, 10, 10),
            Err(Error::Aliased { .. })
        ));
        assert!(matches!(
            ctx.encode_softmax(&mut encoder, &input, &small, 10, 0),
            Err(Error::ZeroCols)
        ));
        let t = ctx.upload(&[0.0; 6], 3).unwrap();
        let other = ctx.empty(3, 3).unwrap();
        assert!(matches!(
            t.softmax_into(&other),
            Err(Error::LengthMismatch { .. })
        ));
        // Six elements either way, but rows of 2 instead of 3.
        let reshaped = ctx.empty(3, 2).unwrap();
        assert!(matches!(
            t.softmax_into(&reshaped),
            Err(Error::LengthMismatch {
                what: "output cols",
                ..
            })
        ));
    });
}

#[test]
fn unknown_adapter_name_is_an_error_not_a_panic() {
    let options = ContextOptions {
        adapter_name: Some("no-such-adapter-0xdeadbeef".into()),
        ..Default::default()
    };
    match pollster::block_on(Context::with_options(options)) {
        Err(Error::AdapterNotFound { wanted, .. }) => {
            assert_eq!(wanted, "no-such-adapter-0xdeadbeef")
        }
        other => panic!("expected AdapterNotFound, got {other:?}"),
    }
}

#[test]
fn default_tuning_follows_the_adapter_type() {
    with_gpu(|ctx| {
        let expected = Tuning::for_device_type(ctx.adapter_info().device_type);
        let caps = ctx.capabilities();
        assert_eq!(
            ctx.strategy(70_000, 10),
            expected.choose(70_000, 10, &caps, 1)
        );
        assert!(matches!(
            ctx.strategy(4, 300_000),
            Strategy::SplitRow { .. }
        ));
        assert_eq!(ctx.vector_width(4096), 4);
        assert_eq!(ctx.vector_width(10), 1);
        assert_eq!(
            ctx.strategy(4096, 4096),
            expected.choose(4096, 4096, &caps, 4)
        );
        let info = ctx.adapter_info();
        let fixed = info.subgroup_min_size == info.subgroup_max_size;
        let has = ctx.device().features().contains(wgpu::Features::SUBGROUP);
        assert_eq!(
            caps.subgroup_size.is_some(),
            has && fixed,
            "{caps:?} {info:?}"
        );
        eprintln!(
            "capabilities: {caps:?}; 4096x1000 runs {:?}",
            ctx.strategy(4096, 1000)
        );
    });
}

/// llvmpipe and lavapipe silently stop an invocation after 65535 loop iterations in total; a
/// tuning that would give one invocation longer loops must still produce the right answer (the
/// plan escalates to shorter-looping strategies on software adapters).
#[test]
fn long_loops_stay_within_the_software_loop_limit() {
    with_gpu(|base| {
        let tunings = [
            Tuning {
                thread_max_cols: u32::MAX,
                ..Tuning::GPU
            },
            Tuning {
                thread_max_cols: 0,
                row_workgroup: 1,
                row_workgroup_without_subgroups: 1,
                max_items: 1,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ];
        for tuning in tunings {
            let ctx = Context::from_device_with_tuning(
                base.device().clone(),
                base.queue().clone(),
                tuning,
            )
            .expect("adopt device");
            for cols in [30_000, 100_000] {
                let x = logits(2, cols, 3.0, 1);
                check_softmax(&ctx, &x, cols, &format!("{tuning:?} {cols}"));
            }
        }
    });
}

/// Where an adapter exists, `Engine` picks it, and each of its operations is the context's own
/// (bit for bit, errors included): every op, forward and training, on a short and a long row.
#[test]
fn engine_runs_the_context_where_there_is_one() {
    with_gpu(|ctx| {
        let picked = Engine::new_blocking().expect("an engine");
        assert!(
            picked.context().is_some(),
            "an adapter exists, yet the engine is {}",
            picked.describe()
        );
        let engine = Engine::from(ctx.clone());
        assert_eq!(engine.describe(), ctx.describe());
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (rows, cols) in [(9, 37), (3, 5000)] {
            let x = logits(rows, cols, 3.0, cols as u64);
            let dy = logits(rows, cols, 1.0, 1 + cols as u64);
            let y = ctx.softmax(&x, cols).unwrap();
            assert_eq!(bits(engine.softmax(&x, cols).unwrap()), bits(y.clone()));
            assert_eq!(
                bits(engine.log_softmax(&x, cols).unwrap()),
                bits(ctx.log_softmax(&x, cols).unwrap())
            );
            assert_eq!(
                bits(engine.softmax_backward(&y, &dy, cols).unwrap()),
                bits(ctx.softmax_backward(&y, &dy, cols).unwrap())
            );
            assert_eq!(
                bits(engine.log_softmax_backward(&y, &dy, cols).unwrap()),
                bits(ctx.log_softmax_backward(&y, &dy, cols).unwrap())
            );
            if cols <= 1024 {
                assert_eq!(
                    bits(engine.softmax_jacobian(&x, cols).unwrap()),
                    bits(ctx.softmax_jacobian(&x, cols).unwrap())
                );
            }
            let targets: Vec<i64> = (0..rows as i64).map(|r| r * 7 % cols as i64).collect();
            let targets = Targets::Indices(&targets);
            let options = CrossEntropyOptions {
                label_smoothing: 0.1,
                ..Default::default()
            };
            assert_eq!(
                bits(engine.cross_entropy(&x, cols, targets, &options).unwrap()),
                bits(ctx.cross_entropy(&x, cols, targets, &options).unwrap())
            );
            let got = engine
                .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::Scalar(0.5))
                .unwrap();
            let want = ctx
                .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::Scalar(0.5))
                .unwrap();
            assert_eq!(bits(got.loss), bits(want.loss));
            assert_eq!(bits(got.grad), bits(want.grad));
        }
        assert!(matches!(
            engine.softmax(&[1.0; 4], 3),
            Err(Error::LengthNotMultiple { .. })
        ));
    });
}

/// The `_into` host forms write what the allocating ones return, into a buffer the caller
/// reuses (filled with NaN first, so an element left unwritten shows), through `Engine` too; a
/// buffer of the wrong length is refused by name and left untouched.
#[test]
fn into_forms_write_what_the_allocating_forms_return() {
    with_gpu(|ctx| {
        let engine = Engine::from(ctx.clone());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (rows, cols) in [(9, 37), (3, 5000), (0, 4)] {
            let x = logits(rows, cols, 3.0, 7 + cols as u64);
            let dy = logits(rows, cols, 1.0, 8 + cols as u64);
            let y = ctx.softmax(&x, cols).unwrap();
            let targets: Vec<i64> = (0..rows as i64).map(|r| r * 5 % cols as i64).collect();
            let targets = Targets::Indices(&targets);
            let options = CrossEntropyOptions::default();
            let g = GradOutput::Scalar(2.0);
            let want_loss = ctx
                .cross_entropy_with_grad(&x, cols, targets, &options, g)
                .unwrap();
            let want: [Vec<f32>; 4] = [
                y.clone(),
                ctx.log_softmax(&x, cols).unwrap(),
                ctx.softmax_backward(&y, &dy, cols).unwrap(),
                ctx.log_softmax_backward(&y, &dy, cols).unwrap(),
            ];
            for via_engine in [false, true] {
                let what = format!("{rows}x{cols}, through the engine: {via_engine}");
                let mut out = vec![f32::NAN; x.len()];
                for (op, want) in want.iter().enumerate() {
                    out.fill(f32::NAN);
                    match (op, via_engine) {
                        (0, false) => ctx.softmax_into(&x, cols, &mut out),
                        (0, true) => engine.softmax_into(&x, cols, &mut out),
                        (1, false) => ctx.log_softmax_into(&x, cols, &mut out),
                        (1, true) => engine.log_softmax_into(&x, cols, &mut out),
                        (2, false) => ctx.softmax_backward_into(&y, &dy, cols, &mut out),
                        (2, true) => engine.softmax_backward_into(&y, &dy, cols, &mut out),
                        (_, false) => ctx.log_softmax_backward_into(&y, &dy, cols, &mut out),
                        (_, true) => engine.log_softmax_backward_into(&y, &dy, cols, &mut out),
                    }
                    .unwrap();
                    assert_eq!(bits(&out), bits(want), "op {op}, {what}");
                }
                if cols <= 1024 {
                    let mut jac = vec![f32::NAN; rows * cols * cols];
                    if via_engine {
                        engine.softmax_jacobian_into(&x, cols, &mut jac).unwrap();
                    } else {
                        ctx.softmax_jacobian_into(&x, cols, &mut jac).unwrap();
                    }
                    let want = ctx.softmax_jacobian(&x, cols).unwrap();
                    assert_eq!(bits(&jac), bits(&want), "jacobian, {what}");
                }
                out.fill(f32::NAN);
                let loss = if via_engine {
                    engine.cross_entropy_into(&x, cols, targets, &options, g, &mut out)
                } else {
                    ctx.cross_entropy_into(&x, cols, targets, &options, g, &mut out)
                }
                .unwrap();
                assert_eq!(bits(&loss), bits(&want_loss.loss), "loss, {what}");
                assert_eq!(bits(&out), bits(&want_loss.grad), "gradient, {what}");
            }
        }
        let x = logits(2, 8, 1.0, 1);
        let mut short = vec![f32::NAN; 15];
        for error in [
            ctx.softmax_into(&x, 8, &mut short),
            ctx.log_softmax_backward_into(&x, &x, 8, &mut short),
            ctx.softmax_jacobian_into(&x, 8, &mut short),
            engine.softmax_backward_into(&x, &x, 8, &mut short),
        ] {
            assert!(
                matches!(error, Err(Error::LengthMismatch { what: "out", .. })),
                "{error:?}"
            );
        }
        let error = ctx.cross_entropy_into(
            &x,
            8,
            Targets::Indices(&[0, 1]),
            &CrossEntropyOptions::default(),
            GradOutput::One,
            &mut short,
        );
        assert!(
            matches!(error, Err(Error::LengthMismatch { what: "grad", .. })),
            "{error:?}"
        );
        assert!(
            short.iter().all(|v| v.is_nan()),
            "a refused call wrote {short:?}"
        );
    });
}

/// With `Tuning::unaligned_items`, rows that are not a multiple of 4 columns are planned as
/// aligned rows of the vec4s that hold them (up to 3 more columns); without, as scalar rows.
#[test]
fn unaligned_rows_are_planned_by_what_holds_them() {
    with_gpu(|base| {
        let caps = base.capabilities();
        for unaligned_items in [0, 1] {
            let ctx = tuned(
                base,
                Tuning {
                    unaligned_items,
                    ..base.tuning()
                },
            );
            let tuning = ctx.tuning();
            for (rows, cols) in [(70_000, 10), (65_536, 127), (16_384, 1023)] {
                let want = if unaligned_items == 1 && tuning.vector == 4 {
                    tuning.choose(rows, cols + 3, &caps, 4)
                } else {
                    tuning.choose(rows, cols, &caps, 1)
                };
                assert_eq!(ctx.strategy(rows, cols), want, "{rows}x{cols}");
            }
        }
    });
}
