//! Timing of the GPU kernels and of the CPU fast path, shared by `wgpu-softmax bench` and
//! `cargo bench`. Every figure says how it was timed ([`Timing`]); throughput counts the bytes an
//! op must read plus write ([`BenchOp::bytes`]).

use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use crate::context::Context;
use crate::cpu::fast;
use crate::error::{Error, Result};
use crate::kernels::axis::{AxisFamily, AxisOp};
use crate::kernels::{Dispatch, DispatchTimes, Normalization, PipelineKey, Timestamps, Window};
use crate::layout::AxisLayout;
use crate::ops::{record_normalize, Tensor};
use crate::options::{CrossEntropyOptions, GradOutput, Targets};
use crate::training::{record_backward, CrossEntropyLoss, GradDestination};
use crate::TargetTensor;

/// The shapes of the benchmark table: square, many medium rows, many short rows, few long rows,
/// very few very long rows, and a latency-bound tiny batch.
pub const SHAPES: [(usize, usize); 6] = [
    (4096, 4096),
    (16384, 1024),
    (65536, 128),
    (64, 262_144),
    (4, 524_288),
    (32, 10),
];

/// Shapes `[N, C, S]` whose softmax-family ops the benchmarks run along axis 1 (over `C`): the
/// classes of a batch of 128 x 128 segmentation maps, a square's columns, and dim 0 of a 4096 x
/// 4096 matrix (as a contrastive loss takes it; lines the CPU path streams).
pub const AXIS_SHAPES: [(usize, usize, usize); 3] =
    [(16, 21, 16_384), (4, 1024, 1024), (1, 4096, 4096)];

/// An operation as benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BenchOp {
    /// Softmax.
    Softmax,
    /// Log-softmax.
    LogSoftmax,
    /// Softmax backward.
    SoftmaxBackward,
    /// Log-softmax backward.
    LogSoftmaxBackward,
    /// Cross-entropy loss and gradient, fused (mean reduction, index targets uploaded with
    /// `upload_targets`, recorded with `encode_tensors`).
    CrossEntropy,
    /// A plain copy of the logits: the bandwidth limit.
    Copy,
}

impl BenchOp {
    /// The operations of the library (not [`BenchOp::Copy`]).
    pub const OPS: [BenchOp; 5] = [
        BenchOp::Softmax,
        BenchOp::LogSoftmax,
        BenchOp::SoftmaxBackward,
        BenchOp::LogSoftmaxBackward,
        BenchOp::CrossEntropy,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::Softmax => "softmax",
            BenchOp::LogSoftmax => "log-softmax",
            BenchOp::SoftmaxBackward => "softmax-backward",
            BenchOp::LogSoftmaxBackward => "log-softmax-backward",
            BenchOp::CrossEntropy => "cross-entropy",
            BenchOp::Copy => "copy",
        }
    }

    /// The op named `name`.
    pub fn from_name(name: &str) -> Option<BenchOp> {
        Self::OPS
            .into_iter()
            .chain([BenchOp::Copy])
            .find(|op| op.name() == name)
    }

    /// Whether the op runs along any axis (the softmax family and cross-entropy, whose classes
    /// may lie on any axis), not only the last.
    pub fn runs_along_any_axis(self) -> bool {
        self != BenchOp::Copy
    }

    /// The softmax-family op's normalization and whether it is a backward op; `None` for
    /// cross-entropy and the copy.
    fn normalization(self) -> Option<(Normalization, bool)> {
        match self {
            BenchOp::Softmax => Some((Normalization::Softmax, false)),
            BenchOp::LogSoftmax => Some((Normalization::LogSoftmax, false)),
            BenchOp::SoftmaxBackward => Some((Normalization::Softmax, true)),
            BenchOp::LogSoftmaxBackward => Some((Normalization::LogSoftmax, true)),
            BenchOp::CrossEntropy | BenchOp::Copy => None,
        }
    }

    /// Bytes the op must read plus write for `rows x cols`: each input element read once, each
    /// output element written once (targets and per-row losses included for cross-entropy).
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let matrix = (rows * cols * 4) as u64;
        match self {
            BenchOp::Softmax | BenchOp::LogSoftmax | BenchOp::Copy => 2 * matrix,
            BenchOp::SoftmaxBackward | BenchOp::LogSoftmaxBackward => 3 * matrix,
            BenchOp::CrossEntropy => 2 * matrix + 8 * rows as u64 + 4,
        }
    }
}

/// How a duration was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// GPU timestamps written at the start and end of the op's compute pass (of the first and
    /// the last of a batch of runs back to back, divided by the runs).
    TimestampQuery,
    /// Wall clock from submission to completion (the adapter has no timestamp queries), of one
    /// run or a batch of runs divided by the runs.
    WallSubmitToCompletion,
    /// Wall clock of a host-slice call: upload, kernels and readback.
    WallEndToEnd,
    /// Wall clock of the CPU fast path.
    WallCpu,
}

impl Timing {
    /// A short name for tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Timing::TimestampQuery => "gpu-timestamps",
            Timing::WallSubmitToCompletion => "wall-submit-to-completion",
            Timing::WallEndToEnd => "wall-end-to-end",
            Timing::WallCpu => "wall-cpu",
        }
    }
}

/// Random inputs for one op and shape, on the host.
struct HostInputs {
    logits: Vec<f32>,
    dy: Vec<f32>,
    targets: Vec<i32>,
}

impl HostInputs {
    fn new(rows: usize, cols: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let logits = (0..rows * cols)
            .map(|_| rng.random_range(-8.0..8.0))
            .collect();
        let dy = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let targets = (0..rows)
            .map(|_| rng.random_range(0..cols as i32))
            .collect();
        Self {
            logits,
            dy,
            targets,
        }
    }
}

/// The layout a bench of `op` on `rows x cols` runs along: `layout`, which must hold the same
/// elements, for the softmax-family ops; the rows themselves otherwise.
fn bench_layout(op: BenchOp, rows: usize, cols: usize, layout: AxisLayout) -> Result<AxisLayout> {
    crate::validate::same_len("layout", rows * cols, layout.numel())?;
    if layout.inner() > 1 && !op.runs_along_any_axis() {
        return Err(Error::Internal(format!(
            "{} is benchmarked along the last axis only",
            op.name()
        )));
    }
    Ok(layout)
}

/// One op and shape set up on the GPU, run repeatedly.
pub struct GpuBench {
    ctx: Context,
    op: BenchOp,
    rows: usize,
    cols: usize,
    /// The axis the softmax-family ops run along: the rows unless [`GpuBench::along`] says.
    layout: AxisLayout,
    host: HostInputs,
    x: Tensor,
    dy: Tensor,
    out: Tensor,
    loss: Tensor,
    loss_fn: CrossEntropyLoss,
    targets: TargetTensor,
    timer: Option<Timer>,
    /// Timestamps of each dispatch for [`GpuBench::run_dispatches`], made at its first call.
    dispatch_timer: std::sync::OnceLock<DispatchTimer>,
    /// [`BenchOp::Copy`]: vec4s per invocation (0: one).
    copy_run: u32,
}

/// One dispatch's share of a run, from [`GpuBench::run_dispatches`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DispatchTime {
    /// The kernel's entry point in its WGSL source.
    pub entry: &'static str,
    /// The dispatch's mean duration per run, its own compute pass timed by timestamp queries.
    pub time: Duration,
}

/// Timestamp queries around each dispatch, and the buffers that read them back.
struct DispatchTimer {
    times: DispatchTimes,
    readback: Readback,
}

/// Timestamp queries around one compute pass.
struct Timer {
    queries: wgpu::QuerySet,
    readback: Readback,
}

/// The buffers that timestamp queries are resolved into and read back from.
struct Readback {
    resolved: wgpu::Buffer,
    mapped: wgpu::Buffer,
}

impl GpuBench {
    /// Uploads random inputs for `op` on `rows x cols`.
    ///
    /// # Errors
    /// Shape and device errors, as the ops themselves.
    pub fn new(ctx: &Context, op: BenchOp, rows: usize, cols: usize) -> Result<Self> {
        let host = HostInputs::new(rows, cols, (rows * 31 + cols) as u64);
        let x = ctx.upload(&host.logits, cols)?;
        let dy = ctx.upload(&host.dy, cols)?;
        let out = ctx.empty(rows, cols)?;
        let loss = ctx.empty(1, 1)?;
        let loss_fn = ctx.cross_entropy_loss(cols, &CrossEntropyOptions::default())?;
        let targets = loss_fn.upload_targets(Targets::IndicesI32(&host.targets))?;
        let timer = ctx
            .device()
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| Timer::new(ctx.device()));
        Ok(Self {
            ctx: ctx.clone(),
            op,
            rows,
            cols,
            layout: AxisLayout::rows(rows, cols)?,
            host,
            x,
            dy,
            out,
            loss,
            loss_fn,
            targets,
            timer,
            dispatch_timer: std::sync::OnceLock::new(),
            copy_run: 0,
        })
    }

    /// The op along `layout`'s axis instead of along the rows, over the same elements (`rows *
    /// cols` of them, the bytes counted alike): e.g. the classes of `[N, C, H * W]`, for a bench
    /// made with `rows = N * H * W` and `cols = C` (cross-entropy: one target per line).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `layout` holds another number of elements;
    /// [`Error::Internal`] for the copy along an axis that is not the last.
    pub fn along(mut self, layout: AxisLayout) -> Result<Self> {
        self.layout = bench_layout(self.op, self.rows, self.cols, layout)?;
        Ok(self)
    }

    /// For [`BenchOp::Copy`]: each invocation copies `vec4s` consecutive vec4s instead of one.
    /// Software adapters copy fastest this way; GPUs with one vec4 per invocation.
    pub fn copy_in_runs(mut self, vec4s: u32) -> Self {
        self.copy_run = vec4s;
        self
    }

    /// What runs the op on this shape, e.g. `workgroup per row, 4 loads in registers, vec4`: the
    /// kernel of its row-wise pass (cross-entropy adds passes over the batch for the reduction
    /// unless the row kernel adds up the loss itself), or the access pattern of
    /// [`BenchOp::Copy`].
    pub fn kernel(&self) -> String {
        let gpu = &self.ctx.gpu;
        let kernels = &gpu.kernels;
        if self.layout.inner() > 1 && self.op == BenchOp::CrossEntropy {
            // Lines are cut as the softmax along an axis cuts them.
            let partial_words = kernels.cross_entropy.partial_words();
            return match (
                AxisFamily::chunks(gpu, self.layout, 1, partial_words),
                self.cols,
            ) {
                ((1, _), cols) if cols <= crate::kernels::rowwise::LINE_ITEMS => {
                    format!("invocation per line, {cols} in registers, scalar")
                }
                ((1, _), _) => "invocation per line, streamed, scalar".to_string(),
                ((chunks, chunk), _) => format!(
                    "invocation per chunk of a line, {chunks} chunks of {chunk} per line, scalar"
                ),
            };
        }
        if self.layout.inner() > 1 && self.op != BenchOp::Copy {
            // The bench's tensors start at offset 0.
            let vec4 = AxisFamily::vec4_for(gpu, self.layout, true);
            let (lines, loads) = if vec4 {
                ("4 lines", "vec4")
            } else {
                ("line", "scalar")
            };
            let op = match self.op {
                BenchOp::Softmax => AxisOp::Normalize(Normalization::Softmax),
                BenchOp::LogSoftmax => AxisOp::Normalize(Normalization::LogSoftmax),
                BenchOp::SoftmaxBackward => AxisOp::Backward(Normalization::Softmax),
                BenchOp::LogSoftmaxBackward => AxisOp::Backward(Normalization::LogSoftmax),
                BenchOp::CrossEntropy | BenchOp::Copy => unreachable!("described above or below"),
            };
            let per_invocation = if vec4 { 4 } else { 1 };
            let (chunks, chunk) =
                AxisFamily::chunks(gpu, self.layout, per_invocation, op.partial_words());
            return match chunks {
                1 if chunk <= AxisFamily::REGISTER_LEN => {
                    format!("invocation per {lines}, {chunk} in registers, {loads}")
                }
                1 => format!("invocation per {lines}, streamed, {loads}"),
                _ => format!(
                    "invocation per chunk of {lines}, {chunks} chunks of {chunk} per line, {loads}"
                ),
            };
        }
        let family = match self.op {
            BenchOp::Softmax | BenchOp::LogSoftmax => &kernels.softmax,
            BenchOp::SoftmaxBackward | BenchOp::LogSoftmaxBackward => &kernels.backward,
            BenchOp::CrossEntropy => &kernels.cross_entropy,
            BenchOp::Copy => {
                return match self.copy_run {
                    0 => "copy, 1 vec4 per invocation".to_string(),
                    n => format!("copy, {n} vec4s per invocation"),
                };
            }
        };
        // The bench's tensors start at offset 0, so rows of a multiple of 4 columns are aligned.
        // Its tensors' buffers end on a whole vec4.
        let (strategy, vector) = family.choose(gpu, self.rows, self.cols, self.cols, true, true);
        let loads = match vector {
            4 if self.cols.is_multiple_of(4) => "vec4",
            4 => "vec4 over unaligned rows",
            _ => "scalar",
        };
        match family.one_pass(gpu, strategy, vector, self.cols) {
            Some(_) if gpu.tuning.split_alone != 0 => format!(
                "{strategy}, {loads}, one pass where the chunks meet, the last finishing the row"
            ),
            Some(_) => format!("{strategy}, {loads}, one pass where the chunks meet"),
            None => format!("{strategy}, {loads}"),
        }
    }

    /// How [`GpuBench::run`] times.
    pub fn timing(&self) -> Timing {
        if self.timer.is_some() {
            Timing::TimestampQuery
        } else {
            Timing::WallSubmitToCompletion
        }
    }

    /// Runs the op once on the device-resident inputs and returns its duration, timed as
    /// [`GpuBench::timing`] says.
    ///
    /// # Errors
    /// Device errors.
    pub fn run(&self) -> Result<Duration> {
        self.run_batch(1)
    }

    /// Runs the op `runs` times back to back in one submission (at least once) and returns the
    /// mean duration of one run, timed as [`GpuBench::timing`] says: the timestamps are written
    /// at the start of the first run's compute pass and the end of the last one's. Batches keep
    /// the GPU busy between the host's waits, so that the figures hold for a GPU at work rather
    /// than one whose clocks fall between short, lone dispatches.
    ///
    /// # Errors
    /// Device errors.
    pub fn run_batch(&self, runs: u32) -> Result<Duration> {
        self.submit(true, runs.max(1))
    }

    /// Runs the op once on the device-resident inputs and returns the wall time from submission
    /// to completion, without timestamp queries.
    ///
    /// # Errors
    /// Device errors.
    pub fn run_wall(&self) -> Result<Duration> {
        self.submit(false, 1)
    }

    /// The most dispatches [`GpuBench::run_dispatches`] times in one call, over all its runs.
    pub const MAX_TIMED_DISPATCHES: u32 = 1024;

    /// Runs the op `runs` times back to back in one submission (at least once), each of its
    /// dispatches in a compute pass of its own with timestamp queries at its start and end, and
    /// returns each dispatch of one run with its mean duration per run, in order. A pass of its
    /// own puts a full barrier where the op's one pass has a dependency between dispatches, and
    /// leaves out the gaps between passes: the times tell where a run's time goes, and their
    /// sum can differ from [`GpuBench::run_batch`]'s.
    ///
    /// # Errors
    /// [`Error::Internal`] when the adapter has no timestamp queries or the runs would record
    /// more than [`GpuBench::MAX_TIMED_DISPATCHES`] dispatches; device errors.
    pub fn run_dispatches(&self, runs: u32) -> Result<Vec<DispatchTime>> {
        if self.timer.is_none() {
            return Err(Error::Internal(
                "timing each dispatch needs timestamp queries, which the adapter lacks".into(),
            ));
        }
        let gpu = &self.ctx.gpu;
        let timer = self
            .dispatch_timer
            .get_or_init(|| DispatchTimer::new(&gpu.device, Self::MAX_TIMED_DISPATCHES));
        let runs = runs.max(1);
        timer.times.clear();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        for _ in 0..runs {
            gpu.scoped(|| self.encode(&mut encoder, Some(Timestamps::EachDispatch(&timer.times))))?;
        }
        let entries = timer.times.entries();
        let queries = 2 * entries.len() as u32;
        timer
            .readback
            .resolve(&mut encoder, &timer.times.queries, queries);
        submit_and_wait(&self.ctx, encoder)?;
        let ticks = timer.readback.ticks(&self.ctx, queries)?;
        let per_run = entries.len() / runs as usize;
        Ok((0..per_run)
            .map(|k| {
                let total: u64 = (0..runs as usize)
                    .map(|run| {
                        let i = run * per_run + k;
                        ticks[2 * i + 1].saturating_sub(ticks[2 * i])
                    })
                    .sum();
                DispatchTime {
                    entry: entries[k],
                    time: ticks_to_time(&self.ctx, total as f64 / f64::from(runs)),
                }
            })
            .collect())
    }

    fn submit(&self, timed: bool, runs: u32) -> Result<Duration> {
        let gpu = &self.ctx.gpu;
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let timer = self.timer.as_ref().filter(|_| timed);
        for run in 0..runs {
            let (first, last) = (run == 0, run + 1 == runs);
            let timestamps =
                timer
                    .filter(|_| first || last)
                    .map(|t| wgpu::ComputePassTimestampWrites {
                        query_set: &t.queries,
                        beginning_of_pass_write_index: first.then_some(0),
                        end_of_pass_write_index: last.then_some(1),
                    });
            gpu.scoped(|| self.encode(&mut encoder, timestamps.map(Timestamps::Pass)))?;
        }
        if let Some(timer) = timer {
            timer.readback.resolve(&mut encoder, &timer.queries, 2);
        }
        let start = Instant::now();
        submit_and_wait(&self.ctx, encoder)?;
        let total = match timer {
            None => start.elapsed(),
            Some(timer) => timer.read(&self.ctx)?,
        };
        Ok(total / runs)
    }

    /// Runs the op's host-slice form once (upload, kernels, readback) and returns its wall time.
    ///
    /// # Errors
    /// Device errors.
    pub fn run_end_to_end(&self) -> Result<Duration> {
        let (ctx, host) = (&self.ctx, &self.host);
        let along = ctx.along(self.layout);
        let start = Instant::now();
        match self.op {
            BenchOp::Softmax | BenchOp::Copy => along.softmax(&host.logits).map(drop),
            BenchOp::LogSoftmax => along.log_softmax(&host.logits).map(drop),
            BenchOp::SoftmaxBackward => along.softmax_backward(&host.logits, &host.dy).map(drop),
            BenchOp::LogSoftmaxBackward => {
                along.log_softmax_backward(&host.logits, &host.dy).map(drop)
            }
            BenchOp::CrossEntropy => along
                .cross_entropy_with_grad(
                    &host.logits,
                    Targets::IndicesI32(&host.targets),
                    &CrossEntropyOptions::default(),
                    GradOutput::One,
                )
                .map(drop),
        }?;
        Ok(start.elapsed())
    }

    fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        timestamps: Option<Timestamps<'_>>,
    ) -> Result<()> {
        let gpu = &self.ctx.gpu;
        let (rows, cols) = (self.rows, self.cols);
        if let Some((op, backward)) = self.op.normalization() {
            let (x, dy, out) = (&self.x, &self.dy, &self.out);
            return if backward {
                let regions = [x, dy, out].map(Into::into);
                record_backward(gpu, encoder, op, regions, self.layout, timestamps)
            } else {
                let regions = [x, out].map(Into::into);
                record_normalize(gpu, encoder, op, regions, self.layout, timestamps)
            };
        }
        match self.op {
            BenchOp::CrossEntropy => self.loss_fn.encode_tensors_timed(
                encoder,
                (&self.x, &self.targets, &self.loss),
                Some(self.layout),
                GradDestination::Buffer((&self.out).into()),
                1.0.into(),
                timestamps,
            ),
            BenchOp::Softmax
            | BenchOp::LogSoftmax
            | BenchOp::SoftmaxBackward
            | BenchOp::LogSoftmaxBackward => unreachable!("recorded above"),
            BenchOp::Copy => {
                let len4 = (rows * cols / 4) as u32;
                let per = self.copy_run.max(1);
                let groups = len4.div_ceil(per).div_ceil(256);
                let max_dim = gpu.limits.max_compute_workgroups_per_dimension;
                let params: [u32; 4] = [len4, crate::kernels::grid(groups, max_dim).0, per, 0];
                let window = |t: &Tensor| {
                    Window::new(
                        &t.buffer,
                        0,
                        u64::from(len4) * 4,
                        gpu.storage_align(),
                        gpu.max_binding(),
                    )
                };
                let family = &gpu.kernels.copy;
                let key = PipelineKey {
                    entry: if self.copy_run == 0 {
                        "copy"
                    } else {
                        "copy_runs"
                    },
                    constants: Vec::new(),
                };
                let dispatch = Dispatch {
                    entry: key.entry,
                    pipeline: family.pipeline(&gpu.device, &key),
                    params: bytemuck::cast_slice(&params).to_vec(),
                    windows: vec![window(&self.x), window(&self.out)],
                    workgroups: groups,
                };
                crate::kernels::record(&gpu.device, family, encoder, &[dispatch], timestamps)
            }
        }
    }
}

impl Timer {
    fn new(device: &wgpu::Device) -> Self {
        Self {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("wgpu-softmax timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            readback: Readback::new(device, 2),
        }
    }

    fn read(&self, ctx: &Context) -> Result<Duration> {
        let ticks = self.readback.ticks(ctx, 2)?;
        Ok(ticks_to_time(ctx, ticks[1].saturating_sub(ticks[0]) as f64))
    }
}

impl DispatchTimer {
    fn new(device: &wgpu::Device, capacity: u32) -> Self {
        Self {
            times: DispatchTimes::new(device, capacity),
            readback: Readback::new(device, 2 * capacity),
        }
    }
}

impl Readback {
    /// Room for `queries` timestamps.
    fn new(device: &wgpu::Device, queries: u32) -> Self {
        let buffer = |usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-softmax timestamps"),
                size: u64::from(queries) * 8,
                usage,
                mapped_at_creation: false,
            })
        };
        Self {
            resolved: buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
            mapped: buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
        }
    }

    /// Records the resolution of the first `count` queries of `queries` and their copy to the
    /// mapped buffer.
    fn resolve(&self, encoder: &mut wgpu::CommandEncoder, queries: &wgpu::QuerySet, count: u32) {
        if count == 0 {
            return;
        }
        encoder.resolve_query_set(queries, 0..count, &self.resolved, 0);
        encoder.copy_buffer_to_buffer(&self.resolved, 0, &self.mapped, 0, u64::from(count) * 8);
    }

    /// The first `count` timestamps, once the submission that resolved them has completed.
    fn ticks(&self, ctx: &Context, count: u32) -> Result<Vec<u64>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let slice = self.mapped.slice(..u64::from(count) * 8);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        ctx.device()
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(e.to_string()))?;
        let ticks = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Map(e.to_string()))?;
            bytemuck::pod_collect_to_vec(&view[..])
        };
        self.mapped.unmap();
        Ok(ticks)
    }
}

/// A span of `ticks` timestamp ticks as a duration.
fn ticks_to_time(ctx: &Context, ticks: f64) -> Duration {
    let period = f64::from(ctx.queue().get_timestamp_period());
    Duration::from_nanos((ticks * period) as u64)
}

/// Submits `encoder` and waits for it to complete.
fn submit_and_wait(ctx: &Context, encoder: wgpu::CommandEncoder) -> Result<()> {
    let submission = ctx.queue().submit([encoder.finish()]);
    ctx.device()
        .poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        })
        .map_err(|e| Error::DeviceLost(e.to_string()))?;
    Ok(())
}

/// One op and shape set up for the CPU fast path.
pub struct CpuBench {
    op: BenchOp,
    rows: usize,
    cols: usize,
    /// The axis the softmax-family ops run along: the rows unless [`CpuBench::along`] says.
    layout: Option<AxisLayout>,
    host: HostInputs,
    out: Vec<f32>,
}

impl CpuBench {
    /// Random inputs for `op` on `rows x cols`.
    pub fn new(op: BenchOp, rows: usize, cols: usize) -> Self {
        Self {
            op,
            rows,
            cols,
            layout: None,
            host: HostInputs::new(rows, cols, (rows * 31 + cols) as u64),
            out: vec![0.0; rows * cols],
        }
    }

    /// The op along `layout`'s axis, as [`GpuBench::along`] ([`fast::softmax_along_into`] and
    /// the others, and [`fast::cross_entropy_along_into`]).
    ///
    /// # Errors
    /// As [`GpuBench::along`].
    pub fn along(mut self, layout: AxisLayout) -> Result<Self> {
        let layout = bench_layout(self.op, self.rows, self.cols, layout)?;
        self.layout = Some(layout).filter(|l| l.inner() > 1);
        Ok(self)
    }

    /// What runs the op: the f32 fast path's instruction set and rayon's thread count (memcpy
    /// for [`BenchOp::Copy`]).
    pub fn kernel(&self) -> String {
        let threads = rayon::current_num_threads();
        match self.op {
            BenchOp::Copy => format!("memcpy, {threads} threads"),
            _ if self.layout.is_some() => format!(
                "f32 {}, {threads} threads, lines side by side",
                fast::instruction_set()
            ),
            _ => format!("f32 {}, {threads} threads", fast::instruction_set()),
        }
    }

    /// Runs the op once into a preallocated output and returns its wall time. For
    /// [`BenchOp::Copy`], a multi-threaded memcpy: the CPU's bandwidth limit.
    ///
    /// # Errors
    /// Shape errors, as the ops themselves.
    pub fn run(&mut self) -> Result<Duration> {
        let (cols, host) = (self.cols, &self.host);
        let out = &mut self.out;
        let start = Instant::now();
        if let Some(layout) = self.layout {
            let (x, dy) = (&host.logits, &host.dy);
            match self.op {
                BenchOp::Softmax => fast::softmax_along_into(x, layout, out),
                BenchOp::LogSoftmax => fast::log_softmax_along_into(x, layout, out),
                BenchOp::SoftmaxBackward => fast::softmax_backward_along_into(x, dy, layout, out),
                BenchOp::CrossEntropy => fast::cross_entropy_along_into(
                    x,
                    layout,
                    Targets::IndicesI32(&host.targets),
                    &CrossEntropyOptions::default(),
                    GradOutput::One,
                    out,
                )
                .map(drop),
                _ => fast::log_softmax_backward_along_into(x, dy, layout, out),
            }?;
            return Ok(start.elapsed());
        }
        match self.op {
            BenchOp::Softmax => fast::softmax_into(&host.logits, cols, out)?,
            BenchOp::LogSoftmax => fast::log_softmax_into(&host.logits, cols, out)?,
            BenchOp::SoftmaxBackward => {
                fast::softmax_backward_into(&host.logits, &host.dy, cols, out)?
            }
            BenchOp::LogSoftmaxBackward => {
                fast::log_softmax_backward_into(&host.logits, &host.dy, cols, out)?
            }
            BenchOp::CrossEntropy => {
                fast::cross_entropy_into(
                    &host.logits,
                    cols,
                    Targets::IndicesI32(&host.targets),
                    &CrossEntropyOptions::default(),
                    GradOutput::One,
                    out,
                )?;
            }
            BenchOp::Copy => out
                .par_chunks_mut(1 << 16)
                .zip(host.logits.par_chunks(1 << 16))
                .for_each(|(dst, src)| dst.copy_from_slice(src)),
        }
        Ok(start.elapsed())
    }
}
