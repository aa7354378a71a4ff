//! Softmax, log-softmax and their backward along an axis that is not the last
//! ([`Context::along`]), against the f64 reference run on the same lines moved last.

mod common;

use common::{bits, logits, read_buffer, small_limits_context, tuned, with_gpu};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{AxisLayout, Context, Engine, Error, Tolerance, Tuning, TENSOR_USAGES};

/// (shape, axis): lines held in registers (5 and 21 long), streamed lines with a partial block
/// (33) and many blocks (1000), lines split into chunks for the loop budget of software
/// adapters (70 000, 40 000) and for occupancy (16 384 over 2 lines), neighbouring lines in
/// fours (`inner` a multiple of 4), the first axis, the last axis (the row kernels), and empty
/// tensors.
const LAYOUTS: &[(&[usize], isize)] = &[
    (&[2, 5, 3], 1),
    (&[3, 21, 8, 8], 1),
    (&[3, 33, 17], 1),
    (&[2, 1000, 5], -2),
    (&[1, 70_000, 3], 1),
    (&[1, 16_384, 2], 1),
    (&[1, 40_000, 4], 1),
    (&[2, 7, 12], 1),
    (&[5, 7], 0),
    (&[3, 4, 5], -1),
    (&[0, 4, 5], 1),
    (&[2, 3, 0], 1),
];

/// The f64 reference of a row op (on rows of `cols`) applied along `layout`.
fn along_reference(
    layout: AxisLayout,
    inputs: &[&[f32]],
    op: impl Fn(&[Vec<f32>], usize) -> Vec<f64>,
) -> Vec<f64> {
    let rows: Vec<Vec<f32>> = inputs.iter().map(|x| layout.to_rows(x).unwrap()).collect();
    layout.from_rows(&op(&rows, layout.len())).unwrap()
}

fn softmax_ref(layout: AxisLayout, x: &[f32]) -> Vec<f64> {
    along_reference(layout, &[x], |r, c| reference::softmax(&r[0], c).unwrap())
}

fn log_softmax_ref(layout: AxisLayout, x: &[f32]) -> Vec<f64> {
    along_reference(layout, &[x], |r, c| {
        reference::log_softmax(&r[0], c).unwrap()
    })
}

fn backward_ref(layout: AxisLayout, y: &[f32], dy: &[f32], log: bool) -> Vec<f64> {
    along_reference(layout, &[y, dy], |r, c| {
        if log {
            reference::log_softmax_backward(&r[0], &r[1], c).unwrap()
        } else {
            reference::softmax_backward(&r[0], &r[1], c).unwrap()
        }
    })
}

fn assert_close(tolerance: Tolerance, got: &[f32], want: &[f64], what: &str) {
    let cmp = tolerance.compare(got, want);
    assert!(cmp.passed(), "{what}: {cmp:?}");
}

/// Every op along `layout` on the GPU (and on the CPU engine) against the reference.
fn check_layout(ctx: &Context, layout: AxisLayout, x: &[f32], dy: &[f32], what: &str) {
    let along = ctx.along(layout);
    let y = along.softmax(x).unwrap();
    assert_close(
        Tolerance::SOFTMAX,
        &y,
        &softmax_ref(layout, x),
        &format!("softmax {what}"),
    );
    let ly = along.log_softmax(x).unwrap();
    let want = log_softmax_ref(layout, x);
    assert_close(
        Tolerance::LOG_SOFTMAX,
        &ly,
        &want,
        &format!("log_softmax {what}"),
    );
    let dx = along.softmax_backward(&y, dy).unwrap();
    let want = backward_ref(layout, &y, dy, false);
    assert_close(
        Tolerance::SOFTMAX,
        &dx,
        &want,
        &format!("softmax_backward {what}"),
    );
    let dx = along.log_softmax_backward(&ly, dy).unwrap();
    let want = backward_ref(layout, &ly, dy, true);
    assert_close(
        Tolerance::LOG_SOFTMAX,
        &dx,
        &want,
        &format!("log_softmax_backward {what}"),
    );
}

#[test]
fn along_matches_the_reference_on_every_layout() {
    with_gpu(|base| {
        for (name, ctx) in line_contexts(base, false) {
            for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
                let layout = AxisLayout::new(shape, axis).unwrap();
                let x = logits(layout.numel(), 1, 3.0, i as u64);
                let dy = logits(layout.numel(), 1, 1.0, 100 + i as u64);
                check_layout(
                    &ctx,
                    layout,
                    &x,
                    &dy,
                    &format!("{shape:?} axis {axis}, {name}"),
                );
            }
        }
    });
}

/// The CPU engine moves the axis last around `cpu::fast`: the same reference, the same errors.
#[test]
fn the_cpu_engine_runs_along_any_axis() {
    let engine = Engine::Cpu;
    for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
        let layout = AxisLayout::new(shape, axis).unwrap();
        let x = logits(layout.numel(), 1, 3.0, i as u64);
        let dy = logits(layout.numel(), 1, 1.0, 100 + i as u64);
        let what = format!("{shape:?} axis {axis}");
        let y = engine.softmax_along(&x, layout).unwrap();
        assert_close(Tolerance::SOFTMAX, &y, &softmax_ref(layout, &x), &what);
        let ly = engine.log_softmax_along(&x, layout).unwrap();
        assert_close(
            Tolerance::LOG_SOFTMAX,
            &ly,
            &log_softmax_ref(layout, &x),
            &what,
        );
        let dx = engine.softmax_backward_along(&y, &dy, layout).unwrap();
        assert_close(
            Tolerance::SOFTMAX,
            &dx,
            &backward_ref(layout, &y, &dy, false),
            &what,
        );
        let dx = engine.log_softmax_backward_along(&ly, &dy, layout).unwrap();
        assert_close(
            Tolerance::LOG_SOFTMAX,
            &dx,
            &backward_ref(layout, &ly, &dy, true),
            &what,
        );
        // The _into forms write the same bits.
        let mut out = vec![f32::NAN; x.len()];
        engine.softmax_along_into(&x, layout, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&y), "{what}");
        engine.log_softmax_along_into(&x, layout, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&ly), "{what}");
        engine
            .log_softmax_backward_along_into(&ly, &dy, layout, &mut out)
            .unwrap();
        assert_eq!(bits(&out), bits(&dx), "{what}");
        engine
            .softmax_backward_along_into(&y, &dy, layout, &mut out)
            .unwrap();
        let dx = engine.softmax_backward_along(&y, &dy, layout).unwrap();
        assert_eq!(bits(&out), bits(&dx), "{what}");
    }
    let layout = AxisLayout::new(&[2, 3, 4], 1).unwrap();
    assert!(matches!(
        engine.softmax_along(&[0.0; 23], layout),
        Err(Error::LengthMismatch {
            what: "input",
            expected: 24,
            actual: 23
        })
    ));
    assert!(matches!(
        engine.softmax_backward_along(&[0.0; 24], &[0.0; 25], layout),
        Err(Error::LengthMismatch {
            what: "grad_output",
            expected: 24,
            actual: 25
        })
    ));
}

/// Contexts whose invocations take one line or four (`vec4`) whatever `inner` is, and with
/// `split`, the same with lines cut into chunks of 2 elements (two passes, partials combined).
fn line_contexts(base: &Context, split: bool) -> Vec<(&'static str, Context)> {
    let lines = |axis_vec4_max_inner| Tuning {
        axis_vec4_max_inner,
        ..base.tuning()
    };
    let chunks = |tuning: Tuning| Tuning {
        axis_lines: 1 << 20,
        axis_min_chunk: 2,
        ..tuning
    };
    let mut contexts = vec![
        ("one line each", tuned(base, lines(0))),
        ("four lines each", tuned(base, lines(u32::MAX))),
    ];
    if split {
        contexts.push(("one line each, split", tuned(base, chunks(lines(0)))));
        contexts.push((
            "four lines each, split",
            tuned(base, chunks(lines(u32::MAX))),
        ));
    }
    contexts
}

/// The row policy, line by line: a -inf entry gets 0, a line of only -inf, or with NaN or
/// +inf, is NaN, and the other lines are untouched; `[1000, 0, ...]` is exact; softmax is
/// invariant under translation. On lines in registers and on split lines alike.
#[test]
fn along_special_values_follow_the_row_policy() {
    with_gpu(|base| {
        // [2, 6, 8] over axis 1: line (o, i) holds x[o][k][i] for k in 0..6.
        let layout = AxisLayout::new(&[2, 6, 8], 1).unwrap();
        let at = |o: usize, k: usize, i: usize| o * 48 + k * 8 + i;
        let mut x = logits(96, 1, 2.0, 7);
        x[at(0, 2, 0)] = f32::NEG_INFINITY;
        for k in 0..6 {
            x[at(0, k, 1)] = f32::NEG_INFINITY;
            x[at(1, k, 0)] = if k == 0 { 1000.0 } else { 0.0 };
        }
        x[at(0, 4, 2)] = f32::NAN;
        x[at(0, 5, 3)] = f32::INFINITY;
        let dy = logits(96, 1, 1.0, 8);
        for (name, ctx) in line_contexts(base, true) {
            let along = ctx.along(layout);
            check_layout(&ctx, layout, &x, &dy, name);
            let y = along.softmax(&x).unwrap();
            let ly = along.log_softmax(&x).unwrap();
            assert_eq!(y[at(0, 2, 0)], 0.0, "{name}");
            assert_eq!(ly[at(0, 2, 0)], f32::NEG_INFINITY, "{name}");
            for k in 0..6 {
                for i in 1..4 {
                    assert!(y[at(0, k, i)].is_nan(), "{name}: line (0, {i})");
                }
                assert!(y[at(0, k, 4)].is_finite(), "{name}: line (0, 4)");
                let (want, want_log) = if k == 0 { (1.0, 0.0) } else { (0.0, -1000.0) };
                assert_eq!(y[at(1, k, 0)], want, "{name}");
                assert_eq!(ly[at(1, k, 0)], want_log, "{name}");
            }
            // Translation by an exactly representable shift leaves the bits unchanged.
            let small: Vec<f32> = (0..96).map(|j| (j % 7) as f32 * 0.5).collect();
            let shifted: Vec<f32> = small.iter().map(|v| v + 1024.0).collect();
            assert_eq!(
                bits(&along.softmax(&small).unwrap()),
                bits(&along.softmax(&shifted).unwrap()),
                "{name}"
            );
        }
    });
}

/// The last axis is the row layout, and runs the row kernels: the same bits as the row ops.
#[test]
fn the_last_axis_is_the_row_ops() {
    with_gpu(|ctx| {
        let x = logits(37 * 130, 1, 2.0, 3);
        let dy = logits(37 * 130, 1, 1.0, 4);
        let along = ctx.along(AxisLayout::new(&[37, 130], -1).unwrap());
        let y = ctx.softmax(&x, 130).unwrap();
        assert_eq!(bits(&along.softmax(&x).unwrap()), bits(&y));
        assert_eq!(
            bits(&along.log_softmax(&x).unwrap()),
            bits(&ctx.log_softmax(&x, 130).unwrap())
        );
        assert_eq!(
            bits(&along.softmax_backward(&y, &dy).unwrap()),
            bits(&ctx.softmax_backward(&y, &dy, 130).unwrap())
        );
    });
}

/// A context with invocation-sized workgroups: 70 000 lines need more workgroups than one
/// dispatch dimension holds, so the grid is 2-D.
#[test]
fn more_lines_than_one_grid_dimension() {
    with_gpu(|base| {
        let ctx = tuned(
            base,
            Tuning {
                axis_workgroup: 1,
                ..base.tuning()
            },
        );
        let layout = AxisLayout::new(&[2, 3, 35_000], 1).unwrap();
        let x = logits(layout.numel(), 1, 2.0, 11);
        let dy = logits(layout.numel(), 1, 1.0, 12);
        check_layout(&ctx, layout, &x, &dy, "2x3x35000, workgroups of 1");
    });
}

/// On a device whose storage bindings hold 1 MiB, a batch of several slabs runs in blocks of
/// slabs, and a slab larger than a binding is a typed error, never a wrong result.
#[test]
fn slabs_larger_than_a_binding_run_in_blocks_or_are_refused() {
    with_gpu(|base| {
        let ctx = small_limits_context(base);
        // Slabs of 300 x 300 f32 (360 KB): two per binding, six in all (2.2 MB).
        let layout = AxisLayout::new(&[6, 300, 300], 1).unwrap();
        let x = logits(layout.numel(), 1, 2.0, 21);
        let dy = logits(layout.numel(), 1, 1.0, 22);
        check_layout(&ctx, layout, &x, &dy, "6x300x300 on 1 MiB bindings");
        let too_large = AxisLayout::new(&[1, 1000, 300], 1).unwrap();
        let x = vec![0.0; too_large.numel()];
        assert!(matches!(
            ctx.along(too_large).softmax(&x),
            Err(Error::SlabTooLarge {
                len: 1000,
                inner: 300,
                bytes: 1_200_000,
                ..
            })
        ));
        assert!(matches!(
            ctx.along(too_large).log_softmax_backward(&x, &x),
            Err(Error::SlabTooLarge { .. })
        ));
        check_tensor_forms(&ctx, layout, 23, "6x300x300 on 1 MiB bindings");
        let t = ctx.upload(&x, 300).unwrap();
        assert!(matches!(
            t.softmax_along(too_large),
            Err(Error::SlabTooLarge { .. })
        ));
        assert!(matches!(
            t.softmax_backward_along(&t, too_large),
            Err(Error::SlabTooLarge { .. })
        ));
    });
}

/// The tensor forms (`Tensor::softmax_along` and the others) run the host forms' kernels on
/// tensors that stay on the device: the same bits, whatever rows and columns the tensor was
/// uploaded with, and the input's rows and columns on the result.
fn check_tensor_forms(ctx: &Context, layout: AxisLayout, seed: u64, what: &str) {
    let n = layout.numel();
    let x = logits(n, 1, 3.0, seed);
    let dy = logits(n, 1, 1.0, seed + 100);
    let cols = layout.inner().max(1);
    let (tx, tdy) = (
        ctx.upload(&x, cols).unwrap(),
        ctx.upload(&dy, cols).unwrap(),
    );
    let along = ctx.along(layout);
    let y = tx.softmax_along(layout).unwrap();
    assert_eq!((y.rows(), y.cols()), (tx.rows(), tx.cols()), "{what}");
    let ly = tx.log_softmax_along(layout).unwrap();
    // The backward ops take `y` and `ly` where the forward ops left them, on the device.
    let dx = y.softmax_backward_along(&tdy, layout).unwrap();
    let ldx = ly.log_softmax_backward_along(&tdy, layout).unwrap();
    let (y_host, ly_host) = (along.softmax(&x).unwrap(), along.log_softmax(&x).unwrap());
    assert_eq!(bits(&y.to_vec().unwrap()), bits(&y_host), "softmax {what}");
    assert_eq!(
        bits(&ly.to_vec().unwrap()),
        bits(&ly_host),
        "log_softmax {what}"
    );
    let dx_host = along.softmax_backward(&y_host, &dy).unwrap();
    assert_eq!(
        bits(&dx.to_vec().unwrap()),
        bits(&dx_host),
        "softmax_backward {what}"
    );
    let ldx_host = along.log_softmax_backward(&ly_host, &dy).unwrap();
    assert_eq!(
        bits(&ldx.to_vec().unwrap()),
        bits(&ldx_host),
        "log_softmax_backward {what}"
    );
}

#[test]
fn tensor_forms_match_the_host_forms_and_refuse_wrong_lengths() {
    with_gpu(|ctx| {
        for (i, &(shape, axis)) in LAYOUTS.iter().enumerate() {
            let layout = AxisLayout::new(shape, axis).unwrap();
            check_tensor_forms(
                ctx,
                layout,
                40 + i as u64,
                &format!("{shape:?} axis {axis}"),
            );
        }
        let layout = AxisLayout::new(&[3, 40, 7], 1).unwrap();
        let n = layout.numel();
        let x = ctx.upload(&logits(n, 1, 2.0, 33), 7).unwrap();
        let short = ctx.upload(&vec![0.0; n - 7], 7).unwrap();
        assert!(matches!(
            short.softmax_along(layout),
            Err(Error::LengthMismatch { what: "input", expected, actual }) if expected == n && actual == n - 7
        ));
        assert!(matches!(
            short.log_softmax_backward_along(&x, layout),
            Err(Error::LengthMismatch { what: "y", .. })
        ));
        assert!(matches!(
            x.softmax_backward_along(&short, layout),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
    });
}

/// The `_into` and async forms write what the allocating form returns; wrong lengths are
/// typed errors that leave `out` untouched.
#[test]
fn into_and_async_forms_agree_and_refuse_wrong_lengths() {
    with_gpu(|ctx| {
        let layout = AxisLayout::new(&[3, 40, 7], 1).unwrap();
        let along = ctx.along(layout);
        let x = logits(layout.numel(), 1, 2.0, 31);
        let dy = logits(layout.numel(), 1, 1.0, 32);
        let y = along.softmax(&x).unwrap();
        let mut out = vec![f32::NAN; x.len()];
        along.softmax_into(&x, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&y));
        let ly = pollster::block_on(along.log_softmax_async(&x)).unwrap();
        along.log_softmax_into(&x, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&ly));
        let dx = pollster::block_on(along.softmax_backward_async(&y, &dy)).unwrap();
        along.softmax_backward_into(&y, &dy, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&dx));
        let dx = pollster::block_on(along.log_softmax_backward_async(&ly, &dy)).unwrap();
        along.log_softmax_backward_into(&ly, &dy, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&dx));

        let n = layout.numel();
        let mut short = vec![7.0; n - 1];
        assert!(matches!(
            along.softmax(&x[1..]),
            Err(Error::LengthMismatch { what: "input", .. })
        ));
        assert!(matches!(
            along.softmax_into(&x, &mut short),
            Err(Error::LengthMismatch { what: "out", .. })
        ));
        assert!(short.iter().all(|&v| v == 7.0));
        assert!(matches!(
            along.softmax_backward(&y[1..], &dy),
            Err(Error::LengthMismatch { what: "y", .. })
        ));
        assert!(matches!(
            along.log_softmax_backward(&y, &dy[1..]),
            Err(Error::LengthMismatch {
                what: "grad_output",
                ..
            })
        ));
    });
}

fn region(buffer: &wgpu::Buffer, at: usize) -> wgpu::BufferSlice<'_> {
    buffer.slice((at * 4) as u64..)
}

fn storage_buffer(ctx: &Context, words: usize, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (words * 4) as u64,
        usage,
        mapped_at_creation: false,
    })
}

/// Every encode form on regions at word offsets `x_at` (inputs) and `y_at` (output): the host
/// form's results (its bits where both take the same kernels), and no word outside the output's
/// region written.
fn encode_on_regions(ctx: &Context, layout: AxisLayout, x_at: usize, y_at: usize) {
    let along = ctx.along(layout);
    let n = layout.numel();
    let same_kernels =
        !layout.inner().is_multiple_of(4) || (x_at.is_multiple_of(4) && y_at.is_multiple_of(4));
    let what = format!("{layout:?} at words {x_at} and {y_at}");
    let guard = f32::from_bits(0xDEAD_BEEF);
    let x = logits(n, 1, 2.0, 41);
    let dy = logits(n, 1, 1.0, 42);
    let filled = |data: &[f32], at: usize| {
        let mut all = vec![guard; n + 2 * at];
        all[at..at + n].copy_from_slice(data);
        let buffer = storage_buffer(ctx, all.len(), TENSOR_USAGES);
        ctx.queue()
            .write_buffer(&buffer, 0, bytemuck::cast_slice(&all));
        buffer
    };
    let (input_buf, grad_buf) = (filled(&x, x_at), filled(&dy, x_at));
    let out_buf = filled(&vec![guard; n], y_at);
    let run = |record: &dyn Fn(&mut wgpu::CommandEncoder) -> Result<(), Error>, want: Vec<f32>| {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        record(&mut encoder).unwrap();
        ctx.queue().submit([encoder.finish()]);
        let all = read_buffer(ctx, &out_buf, n + 2 * y_at);
        assert!(
            all[..y_at]
                .iter()
                .chain(&all[y_at + n..])
                .all(|v| v.to_bits() == 0xDEAD_BEEF),
            "{what}"
        );
        let got = &all[y_at..y_at + n];
        if same_kernels {
            assert_eq!(bits(got), bits(&want), "{what}");
        } else {
            let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
            assert_close(Tolerance::LOG_SOFTMAX, got, &want, &what);
        }
    };
    let (input, grad, output) = (
        || region(&input_buf, x_at),
        || region(&grad_buf, x_at),
        || region(&out_buf, y_at),
    );
    run(
        &|e| along.encode_softmax(e, input(), output()),
        along.softmax(&x).unwrap(),
    );
    run(
        &|e| along.encode_log_softmax(e, input(), output()),
        along.log_softmax(&x).unwrap(),
    );
    run(
        &|e| along.encode_softmax_backward(e, input(), grad(), output()),
        along.softmax_backward(&x, &dy).unwrap(),
    );
    run(
        &|e| along.encode_log_softmax_backward(e, input(), grad(), output()),
        along.log_softmax_backward(&x, &dy).unwrap(),
    );
}

/// The encode forms read and write regions of the caller's buffers at any word offset and no
/// other word; the checks of the row encode forms apply.
#[test]
fn encode_forms_work_on_regions_of_the_callers_buffers() {
    with_gpu(|ctx| {
        // Lines one per invocation (inner 13), and four per invocation (inner 16) on regions
        // starting on 16 bytes, or one per invocation where they do not.
        for (shape, x_at, y_at) in [([2, 9, 13], 3, 5), ([2, 9, 16], 4, 8), ([2, 9, 16], 3, 5)] {
            encode_on_regions(ctx, AxisLayout::new(&shape, 1).unwrap(), x_at, y_at);
        }
        let layout = AxisLayout::new(&[2, 9, 13], 1).unwrap();
        let along = ctx.along(layout);
        let n = layout.numel();
        let x_at = 3;
        let input_buf = storage_buffer(ctx, n + 2 * x_at, TENSOR_USAGES);
        let grad_buf = storage_buffer(ctx, n + 2 * x_at, TENSOR_USAGES);
        let out_buf = storage_buffer(ctx, n + 10, TENSOR_USAGES);

        // The row forms' checks: size, usage, alignment, aliasing.
        let e = &mut ctx.device().create_command_encoder(&Default::default());
        let needed = (n * 4) as u64;
        assert!(matches!(
            along.encode_softmax(e, region(&input_buf, 2 * x_at + 1), &out_buf),
            Err(Error::BufferTooSmall { what: "input", needed: nd, .. }) if nd == needed
        ));
        let copy_only = storage_buffer(ctx, n, wgpu::BufferUsages::COPY_DST);
        assert!(matches!(
            along.encode_softmax(e, &input_buf, &copy_only),
            Err(Error::MissingUsage { what: "output", .. })
        ));
        assert!(matches!(
            along.encode_log_softmax(e, input_buf.slice(2..), &out_buf),
            Err(Error::Misaligned { what: "input", .. })
        ));
        assert!(matches!(
            along.encode_softmax_backward(e, &input_buf, &grad_buf, region(&grad_buf, 1)),
            Err(Error::Aliased {
                first: "grad_output",
                second: "grad_input"
            })
        ));
    });
}

/// Lines cut into chunks of one or two elements (`axis_min_chunk` 1) in blocks of slabs on a
/// device whose bindings hold 64 KiB: a block's partials (2 words a chunk for softmax, 4 for
/// cross-entropy) bind with its slabs. They once outgrew the binding and every slab past the
/// first came out wrong (39 629 of 85 344 softmax outputs on `[12, 1016, 7]`); a line now has
/// no more chunks than keep its partials within its own elements' words.
#[test]
fn lines_of_many_short_chunks_keep_their_partials_within_a_binding() {
    with_gpu(|base| {
        let tuning = Tuning {
            axis_min_chunk: 1,
            axis_lines: 65536,
            axis_workgroup: 37,
            ..base.tuning()
        };
        let ctx = common::bounded_context(base, tuning, 64 << 10, 4 << 20);
        let layout = AxisLayout::from_parts(12, 1016, 7).unwrap();
        let x = logits(layout.numel(), 1, 3.0, 71);
        let dy = logits(layout.numel(), 1, 1.0, 72);
        check_layout(&ctx, layout, &x, &dy, "[12, 1016, 7], chunks of 1 or 2");
        let rows_x = layout.to_rows(&x).unwrap();
        let idx = common::index_targets(layout.lines(), 1016, 73, 0);
        let options = wgpu_softmax::CrossEntropyOptions {
            reduction: wgpu_softmax::Reduction::None,
            ..Default::default()
        };
        let targets = wgpu_softmax::Targets::Indices(&idx);
        let grad_output = wgpu_softmax::GradOutput::One;
        let got = ctx
            .along(layout)
            .cross_entropy_with_grad(&x, targets, &options, grad_output)
            .unwrap();
        let want = reference::cross_entropy(&rows_x, 1016, targets, &options, grad_output).unwrap();
        assert_close(
            common::LOSS_TOLERANCE,
            &got.loss,
            &want.loss,
            "cross-entropy loss",
        );
        let grad = layout.to_rows(&got.grad).unwrap();
        common::assert_grad_close(&grad, &want.grad, "cross-entropy along [12, 1016, 7]");
    });
}

/// Lines of 100 000 elements that the table would cut into 50 000 chunks of 2 (`axis_min_chunk`
/// 1, as many invocations as there are chunks): the invocation that finishes a chunk loops over
/// all of its line's partials, past a software adapter's loop budget, which ends it silently
/// (59 087 of 200 000 softmax outputs wrong on lavapipe). There a line now has no more chunks
/// than an eighth of the budget.
#[test]
fn lines_of_many_chunks_stay_within_the_loop_budget() {
    with_gpu(|base| {
        let tuning = Tuning {
            axis_min_chunk: 1,
            axis_lines: u32::MAX,
            ..base.tuning()
        };
        let ctx = tuned(base, tuning);
        let layout = AxisLayout::from_parts(1, 100_000, 2).unwrap();
        let x = logits(layout.numel(), 1, 3.0, 91);
        let y = ctx.along(layout).softmax(&x).unwrap();
        assert_close(
            Tolerance::SOFTMAX,
            &y,
            &softmax_ref(layout, &x),
            "softmax along [1, 100000, 2], chunks of 2 asked for",
        );
    });
}
