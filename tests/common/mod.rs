//! Shared test support: one context per test binary, generated batches, shape tables.
#![allow(dead_code)]

pub mod arena;
pub mod files;

use std::sync::OnceLock;

use rand::{rngs::StdRng, Rng, SeedableRng};
use wgpu_softmax::cpu::CrossEntropyOutput;
use wgpu_softmax::{
    Context, CrossEntropyOptions, GradOutput, Reduction, Targets, Tolerance, Tuning,
};

/// Whether this run is CI, where a missing adapter is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The shared context, or `None` (with a message on stderr) when the machine has no adapter and
/// this is not CI.
pub fn context() -> Option<&'static Context> {
    static CONTEXT: OnceLock<Option<Context>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| match Context::new_blocking() {
            Ok(ctx) => {
                eprintln!("adapter: {}", ctx.describe());
                check_subgroup_size(&ctx);
                Some(ctx)
            }
            Err(error) if in_ci() => panic!("CI=true and no usable GPU adapter: {error}"),
            Err(error) => {
                eprintln!(
                    "SKIPPED: no GPU adapter on this machine ({error}); CI=true fails instead"
                );
                None
            }
        })
        .as_ref()
}

/// The variable that names the subgroup size a run must have, e.g. `4` when CI runs lavapipe with
/// `LP_NATIVE_VECTOR_WIDTH=128`: the kernels must work for any subgroup size, and a driver that
/// ignored the request would otherwise retest the default size without a word.
pub const SUBGROUP_SIZE_VAR: &str = "WGPU_SOFTMAX_TEST_SUBGROUP_SIZE";

/// Panics unless the adapter's subgroup size is the one [`SUBGROUP_SIZE_VAR`] names (when set).
fn check_subgroup_size(ctx: &Context) {
    let Ok(wanted) = std::env::var(SUBGROUP_SIZE_VAR) else {
        return;
    };
    let wanted: u32 = wanted
        .parse()
        .unwrap_or_else(|_| panic!("{SUBGROUP_SIZE_VAR}={wanted:?} is not a subgroup size"));
    let actual = ctx.capabilities().subgroup_size;
    assert_eq!(
        actual,
        Some(wanted),
        "{SUBGROUP_SIZE_VAR}={wanted}, but the adapter's fixed subgroup size is {actual:?}"
    );
}

/// Runs `body` with the shared context, or reports the skip.
pub fn with_gpu(body: impl FnOnce(&Context)) {
    if let Some(ctx) = context() {
        body(ctx);
    }
}

/// The cross-entropy options the tests sweep, with an upstream gradient for each: no class
/// weights and `weight`, no label smoothing and 0.1, each reduction (`per_row` upstream for
/// `None`, 0.5 otherwise).
pub fn cross_entropy_options<'a>(
    weight: &'a [f32],
    per_row: &'a [f32],
) -> Vec<(CrossEntropyOptions<'a>, GradOutput<'a>)> {
    let mut cases = Vec::new();
    for w in [None, Some(weight)] {
        for label_smoothing in [0.0, 0.1] {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let options = CrossEntropyOptions {
                    weight: w,
                    label_smoothing,
                    reduction,
                    ..Default::default()
                };
                let grad_output = match reduction {
                    Reduction::None => GradOutput::PerRow(per_row),
                    _ => GradOutput::Scalar(0.5),
                };
                cases.push((options, grad_output));
            }
        }
    }
    cases
}

/// Normally distributed logits with standard deviation `scale`, reproducible from `seed`.
pub fn logits(rows: usize, cols: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, scale).expect("valid normal");
    (0..rows * cols).map(|_| rng.sample(normal)).collect()
}

/// Cross-entropy losses: f32 accumulation over up to 50 000 classes and 70 000 rows.
pub const LOSS_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 2e-5,
};

/// Checks the host form of cross-entropy of `(logits, cols, targets, grad_output)` against the
/// f64 reference `want`, then the in-place device form: where `same_bits`, against the host
/// form (the same gradient bits, and the same row losses; a reduced loss, which the device form
/// may sum in another order, within tolerance), else against the reference alone (where the two
/// forms cut a batch into row blocks differently). Returns the host form's output.
pub fn check_host_and_in_place(
    ctx: &Context,
    (x, cols, targets, grad_output): (&[f32], usize, Targets<'_>, GradOutput<'_>),
    options: &CrossEntropyOptions<'_>,
    (want, same_bits): (&CrossEntropyOutput<f64>, bool),
    what: &str,
) -> CrossEntropyOutput<f32> {
    let got = ctx
        .cross_entropy_with_grad(x, cols, targets, options, grad_output)
        .unwrap();
    let cmp = LOSS_TOLERANCE.compare(&got.loss, &want.loss);
    assert!(cmp.passed(), "{what}: loss {cmp:?}");
    assert_grad_close(&got.grad, &want.grad, what);
    let loss_fn = ctx.cross_entropy_loss(cols, options).unwrap();
    let targets_t = loss_fn.upload_targets(targets).unwrap();
    let mut t = ctx.upload(x, cols).unwrap();
    let loss = loss_fn
        .loss_and_grad_in_place(&mut t, &targets_t, grad_output)
        .unwrap()
        .to_vec()
        .unwrap();
    let grad = t.to_vec().unwrap();
    if !same_bits {
        let cmp = LOSS_TOLERANCE.compare(&loss, &want.loss);
        assert!(cmp.passed(), "{what}: loss in place {cmp:?}");
        assert_grad_close(&grad, &want.grad, &format!("{what}: in place"));
        return got;
    }
    if options.reduction == Reduction::None {
        assert_bits_eq(&loss, &got.loss, &format!("{what}: loss in place"));
    } else {
        let cmp = LOSS_TOLERANCE.compare(&loss, &want.loss);
        assert!(cmp.passed(), "{what}: loss in place {cmp:?}");
    }
    assert_bits_eq(&grad, &got.grad, &format!("{what}: in place"));
    got
}

/// Asserts that `got` and `want` hold the same bits, naming the first element that differs.
pub fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let differs = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    if let Some(i) = differs {
        panic!("{what}: element {i} is {:e}, not {:e}", got[i], want[i]);
    }
}

/// Class indices for `rows` rows of `cols` classes from `seed`, every `ignore_every`-th row
/// (from row 1) ignored (-100); 0: none.
pub fn index_targets(rows: usize, cols: usize, seed: u64, ignore_every: usize) -> Vec<i64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|r| {
            if ignore_every > 0 && r % ignore_every == 1 {
                -100
            } else {
                rng.random_range(0..cols as i64)
            }
        })
        .collect()
}

/// Probability targets for `rows` rows of `cols` classes: a softmax of random values.
pub fn probability_targets(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let raw = logits(rows, cols, 1.0, seed);
    wgpu_softmax::cpu::reference::softmax(&raw, cols)
        .unwrap()
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// The shapes every row-wise op is checked on: tiny, odd, wider than a workgroup, register-cached
/// and streamed rows, more rows than one dispatch dimension, long split rows.
pub const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (0, 10),
    (3, 7),
    (32, 20),
    (31, 23),
    (2, 2),
    (5, 1),
    (33, 2049),
    (16, 5000),
    (64, 4096),
    (257, 130),
    (70_000, 10),
    (4, 300_000),
    (3, 70_001),
];

/// A second device on the shared context's adapter whose storage bindings hold 1 MiB and whose
/// buffers hold 4 MiB, so every splitting path runs on megabytes instead of gigabytes.
pub fn small_limits_context(base: &Context) -> Context {
    let (device, queue) = device_on_same_adapter(base, |limits| wgpu::Limits {
        max_storage_buffer_binding_size: 1 << 20,
        max_buffer_size: 4 << 20,
        ..limits
    });
    Context::from_device(device, queue).expect("adopt a device with small limits")
}

/// A context with `tuning` on a device of its own on `base`'s adapter, whose storage bindings
/// hold `binding` bytes and whose buffers hold `buffer` bytes: batches run in blocks, and
/// planners meet partials that a binding barely holds.
pub fn bounded_context(base: &Context, tuning: Tuning, binding: u64, buffer: u64) -> Context {
    let (device, queue) = device_on_same_adapter(base, |limits| wgpu::Limits {
        max_storage_buffer_binding_size: binding,
        max_buffer_size: buffer,
        ..limits
    });
    Context::from_device_with_tuning(device, queue, tuning).expect("adopt a bounded device")
}

/// A fresh device on the adapter `base` runs on, with the limits `adjust` makes of the adapter's.
pub fn device_on_same_adapter(
    base: &Context,
    adjust: impl FnOnce(wgpu::Limits) -> wgpu::Limits,
) -> (wgpu::Device, wgpu::Queue) {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let info = base.adapter_info();
    let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .find(|a| a.get_info().name == info.name && a.get_info().backend == info.backend)
        .unwrap_or_else(|| panic!("the adapter {} is listed again", info.name));
    let limits = adjust(adapter.limits());
    pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .expect("a second device on the same adapter")
}

/// Softmax and log-softmax backward of `y = softmax(x)` (and its log) with upstream `dy`, on
/// the GPU against the f64 reference.
pub fn check_backward(ctx: &Context, x: &[f32], dy: &[f32], cols: usize, what: &str) {
    use wgpu_softmax::{cpu::reference, Tolerance};
    let y = ctx.softmax(x, cols).unwrap();
    let got = ctx.softmax_backward(&y, dy, cols).unwrap();
    let want = reference::softmax_backward(&y, dy, cols).unwrap();
    let cmp = Tolerance::SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "softmax_backward {what}: {cmp:?}");
    let ly = ctx.log_softmax(x, cols).unwrap();
    let got = ctx.log_softmax_backward(&ly, dy, cols).unwrap();
    let want = reference::log_softmax_backward(&ly, dy, cols).unwrap();
    let cmp = Tolerance::LOG_SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "log_softmax_backward {what}: {cmp:?}");
}

/// Compares gradients after dividing by the largest reference magnitude, so one bound
/// (`Tolerance::SOFTMAX`) serves every reduction (the mean scales gradients by 1/D).
pub fn assert_grad_close(got: &[f32], want: &[f64], what: &str) {
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let got: Vec<f32> = got.iter().map(|&v| (f64::from(v) / scale) as f32).collect();
    let want: Vec<f64> = want.iter().map(|v| v / scale).collect();
    let cmp = wgpu_softmax::Tolerance::SOFTMAX.compare(&got, &want);
    assert!(cmp.passed(), "{what}: grad {cmp:?}");
}

/// Kernel-choice tables that force every strategy (thread, subgroup, workgroup, cached or
/// streamed, split by workgroup or by invocation, vec4 or scalar), so that each kernel runs on
/// every backend whatever the adapter's defaults are.
pub fn strategy_tunings() -> Vec<(&'static str, Tuning)> {
    vec![
        (
            "thread",
            Tuning {
                thread_max_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            "streamed",
            Tuning {
                max_items: 1,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            "cached",
            Tuning {
                thread_max_cols: 0,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            // Every family takes one pass where a row's chunks meet.
            "split",
            Tuning {
                thread_max_cols: 0,
                split_min_cols: 1,
                split_max_rows: u32::MAX,
                split_chunk: 300,
                loss_split_wait: 4096,
                backward_split_wait: 4096,
                ..Tuning::GPU
            },
        ),
        (
            "subgroup",
            Tuning {
                thread_max_cols: 0,
                subgroup_max_cols: u32::MAX,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            "subgroup streamed",
            Tuning {
                thread_max_cols: 0,
                subgroup_max_cols: u32::MAX,
                max_items: 1,
                split_min_cols: u32::MAX,
                subgroup_workgroup: 32,
                ..Tuning::GPU
            },
        ),
        ("software", Tuning::SOFTWARE),
        (
            "scalar",
            Tuning {
                vector: 1,
                ..Tuning::SOFTWARE
            },
        ),
        (
            "split per invocation",
            Tuning {
                thread_max_cols: 0,
                split_min_cols: 1,
                split_max_rows: u32::MAX,
                split_chunk: 300,
                split_team: 0,
                ..Tuning::GPU
            },
        ),
        (
            // Workgroups per chunk, in groups of 16 KiB of rows: 32 rows of 128 columns, two of
            // 2049 and one of 4097 (some groups shorter than the rest).
            "split in row groups",
            Tuning {
                thread_max_cols: 0,
                split_min_cols: 1,
                split_max_rows: u32::MAX,
                split_chunk: 1000,
                split_group_bytes: 16384,
                ..Tuning::GPU
            },
        ),
        (
            // Not a multiple of lavapipe's subgroup size of 8: a partial last subgroup.
            "workgroups of 12",
            Tuning {
                row_workgroup: 12,
                row_workgroup_without_subgroups: 12,
                thread_max_cols: 0,
                subgroup_max_cols: 0,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            // Rows of 17 to 32 vec4s per invocation: two register arrays in the vec4 softmax
            // kernel (the other kernels stream such rows).
            "thread, 32 items",
            Tuning {
                thread_max_cols: u32::MAX,
                max_items: 32,
                ..Tuning::GPU
            },
        ),
        (
            "workgroup, 32 items",
            Tuning {
                thread_max_cols: 0,
                subgroup_max_cols: 0,
                row_workgroup: 32,
                row_workgroup_without_subgroups: 32,
                max_items: 32,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            // A workgroup per row reduced through workgroup memory alone, on a device that has
            // subgroup operations: what devices whose subgroup size varies run.
            "workgroup, no subgroup operations",
            Tuning {
                thread_max_cols: 0,
                subgroups: 0,
                split_min_cols: u32::MAX,
                ..Tuning::GPU
            },
        ),
        (
            "split, no subgroup operations",
            Tuning {
                thread_max_cols: 0,
                split_min_cols: 1,
                split_max_rows: u32::MAX,
                split_chunk: 300,
                subgroups: 0,
                ..Tuning::GPU
            },
        ),
        (
            // Rows that are not a multiple of 4 columns held in registers as the vec4s that
            // hold them: an invocation per row, and a workgroup per row with two register
            // arrays (softmax and cross-entropy).
            "unaligned rows in registers, thread",
            Tuning {
                thread_max_cols: u32::MAX,
                unaligned_items: 1,
                ..Tuning::GPU
            },
        ),
        (
            "unaligned rows in registers, workgroup",
            Tuning {
                thread_max_cols: 0,
                subgroup_max_cols: 0,
                max_items: 32,
                split_min_cols: u32::MAX,
                unaligned_items: 1,
                ..Tuning::GPU
            },
        ),
        (
            "small workgroups",
            Tuning {
                row_workgroup: 8,
                row_workgroup_without_subgroups: 8,
                thread_workgroup: 8,
                thread_max_cols: 4,
                thread_max_cols_without_subgroups: 4,
                workgroup_per_row: 1,
                ..Tuning::SOFTWARE
            },
        ),
    ]
}

/// Contexts whose split rows take one pass where a family's wait (set by `wait`) allows: a wait
/// of 1 load (most chunks left to the finishing pass), of 2000, of 2000 with rows in groups of
/// 1 KiB (several blocks, each of which must leave the sync words clean), all in chunks of 300
/// columns, and of 2000 in chunks of 4096; then the first and third again with no finishing
/// pass (`split_alone`: a row's last chunk works out the chunks left). All but the fourth
/// chunk rows alike, so their results must be the same bits: [`ONE_PASS_OTHER_CHUNKS`] names
/// the fourth.
pub fn one_pass_contexts(
    base: &Context,
    wait: fn(&mut Tuning, u32),
) -> Vec<(&'static str, Context)> {
    let one_pass = |name, bound, split_chunk, split_group_bytes, split_alone| {
        let mut tuning = Tuning {
            thread_max_cols: 0,
            split_min_cols: 1,
            split_max_rows: u32::MAX,
            split_chunk,
            split_group_bytes,
            split_alone,
            ..Tuning::GPU
        };
        wait(&mut tuning, bound);
        (name, tuned(base, tuning))
    };
    vec![
        one_pass("wait 1", 1, 300, 0, 0),
        one_pass("wait 2000", 2000, 300, 0, 0),
        one_pass("wait 2000, 1 KiB row groups", 2000, 300, 1024, 0),
        one_pass(ONE_PASS_OTHER_CHUNKS, 2000, 4096, 0, 0),
        one_pass("wait 1, no finishing pass", 1, 300, 0, 1),
        one_pass(
            "wait 2000, 1 KiB row groups, no finishing pass",
            2000,
            300,
            1024,
            1,
        ),
    ]
}

/// The context of [`one_pass_contexts`] with other chunks than the rest.
pub const ONE_PASS_OTHER_CHUNKS: &str = "wait 2000, chunks of 4096";

/// The values' bits, for comparisons that must be exact (NaN included).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Shapes for [`one_pass_contexts`]: one chunk (never waits), several, a row group's worth,
/// many rows of many chunks, long rows, and unaligned rows (scalar kernels, two passes).
pub const ONE_PASS_SHAPES: [(usize, usize); 6] = [
    (1, 4),
    (5, 300),
    (3, 1200),
    (65, 4096),
    (2, 20_000),
    (3, 1201),
];

/// Outputs that must be the same bits in every context: the first context's are kept in
/// `first`, and every later context's are compared with them.
pub fn assert_same_bits(first: &mut Option<Vec<Vec<f32>>>, outputs: Vec<Vec<f32>>, what: &str) {
    match first {
        None => *first = Some(outputs),
        Some(kept) => {
            for (i, (a, b)) in kept.iter().zip(&outputs).enumerate() {
                assert_eq!(bits(a), bits(b), "{what}: output {i}");
            }
        }
    }
}

/// A context with `tuning` on `base`'s adapter, on a device of its own.
///
/// Software adapters compile one pipeline at a time per device, and a cold shader cache makes
/// compiling the suite's specialisations most of its time: tests that run at once on one shared
/// device would wait on each other's compiles (the training tests took 231 s on lavapipe that
/// way, 162 s with a device each).
pub fn tuned(base: &Context, tuning: Tuning) -> Context {
    let options = wgpu_softmax::ContextOptions {
        backends: Some(base.backend().into()),
        adapter_name: Some(base.adapter_info().name.clone()),
        tuning: Some(tuning),
    };
    pollster::block_on(Context::with_options(options)).expect("a device on the same adapter")
}

/// The device-resident chain softmax then backward: `y = softmax(x)` and `dx` for upstream
/// gradient `dy`, each read back.
pub fn device_softmax_and_backward(
    ctx: &Context,
    x: &wgpu_softmax::Tensor,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let y = x.softmax().unwrap();
    let dx = y
        .softmax_backward(&ctx.upload(dy, x.cols()).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    (y.to_vec().unwrap(), dx)
}

/// The first `len` f32 of `buffer` (which needs `COPY_SRC`), after everything submitted.
pub fn read_buffer(ctx: &Context, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
    let device = ctx.device();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (len * 4) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, (len * 4) as u64);
    ctx.queue().submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let view = staging.slice(..).get_mapped_range().expect("mapped");
    bytemuck::cast_slice(&view).to_vec()
}
