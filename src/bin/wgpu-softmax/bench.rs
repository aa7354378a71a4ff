//! `wgpu-softmax bench`: time, GB/s and the share of an in-run bandwidth limit for each op and
//! shape, on the GPU (kernel time) and on the CPU fast path.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use thiserror::Error;
use wgpu_softmax::bench::{BenchOp, CpuBench, DispatchTime, GpuBench, Timing, SHAPES};
use wgpu_softmax::{AxisLayout, Context, Result, Tuning};

use crate::apply::one_line;

/// vec4s per invocation of the run-wise copy kernel (the GPU limit is the faster of that and one
/// vec4 per invocation).
const COPY_RUN: u32 = 1024;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Ops to run (repeatable): softmax, log-softmax, softmax-backward, log-softmax-backward,
    /// cross-entropy. Default: all. (The copy kernel is not an op here: its bandwidth is every
    /// record's limit.)
    #[arg(long = "op", value_parser = parse_op)]
    ops: Vec<BenchOp>,
    /// Shapes `ROWSxCOLS` (repeatable), or `NxCxS` for the ops along axis 1 of `[N, C, S]`
    /// (over C, as the classes of a segmentation map, with one target per line for
    /// cross-entropy). Default: 4096x4096, 16384x1024, 65536x128, 64x262144, 4x524288, 32x10.
    #[arg(long = "shape", value_parser = parse_shape, allow_hyphen_values = true)]
    shapes: Vec<Shape>,
    /// Timed repetitions per case, at least 1 (the median is reported), after one warm-up.
    #[arg(
        long,
        default_value_t = 7,
        value_parser = parse_repeats,
        allow_negative_numbers = true
    )]
    repeats: usize,
    /// Print a JSON array of records instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time the GPU host-slice form end to end (upload, kernels, readback).
    #[arg(long, conflicts_with = "no_gpu")]
    end_to_end: bool,
    /// Skip the CPU fast path.
    #[arg(long, conflicts_with = "no_gpu")]
    no_cpu: bool,
    /// Also time each dispatch of a GPU op in a compute pass of its own, with timestamp
    /// queries (an adapter without them is an error): where a run's time goes, such as the
    /// two passes of a split row.
    #[arg(long, conflicts_with = "no_gpu")]
    dispatches: bool,
    /// Skip the GPU.
    #[arg(long)]
    no_gpu: bool,
    /// Override the kernel-choice table: `FIELD=VALUE` (repeatable), FIELD one of
    /// thread_workgroup, thread_max_cols, thread_max_cols_without_subgroups, subgroup_workgroup,
    /// subgroup_max_cols, streamed_thread_max_cols, row_workgroup,
    /// row_workgroup_without_subgroups, max_items, split_min_cols,
    /// split_max_rows, split_chunk, workgroup_per_row, split_team, batch_team, batch_tally,
    /// loss_tally, batch_rows, split_reverse, split_group_bytes, split_wait, loss_split_wait,
    /// backward_split_wait, split_alone, vector, unaligned_items, subgroups, axis_workgroup,
    /// axis_lines, axis_min_chunk, axis_vec4_max_inner. Workgroup
    /// sizes, split_chunk, batch_rows and axis_min_chunk must be at least 1, max_items a power of two up to 32,
    /// vector 1 or 4, subgroups, workgroup_per_row, batch_tally, split_reverse, split_alone and
    /// unaligned_items 0 or 1
    /// (loss_tally is a workgroup count, 0 for never); a value the device's limits change is reported on stderr.
    #[arg(long = "tune", value_parser = parse_tune, conflicts_with = "no_gpu")]
    tune: Vec<(&'static str, u32)>,
}

/// What a `--tune` field accepts, as `Tuning`'s documentation says.
#[derive(Debug, Clone, Copy)]
enum Accepts {
    Any,
    AtLeastOne,
    PowerOfTwoUpTo(u32),
    OneOf(&'static [u32]),
}

/// The fields of `Tuning` that `--tune` sets.
const TUNE_FIELDS: [(&str, Accepts); 31] = [
    ("thread_workgroup", Accepts::AtLeastOne),
    ("thread_max_cols", Accepts::Any),
    ("thread_max_cols_without_subgroups", Accepts::Any),
    ("subgroup_workgroup", Accepts::AtLeastOne),
    ("subgroup_max_cols", Accepts::Any),
    ("streamed_thread_max_cols", Accepts::Any),
    ("row_workgroup", Accepts::AtLeastOne),
    ("row_workgroup_without_subgroups", Accepts::AtLeastOne),
    ("max_items", Accepts::PowerOfTwoUpTo(MAX_ITEMS)),
    ("split_min_cols", Accepts::Any),
    ("split_max_rows", Accepts::Any),
    ("split_chunk", Accepts::AtLeastOne),
    ("workgroup_per_row", Accepts::OneOf(&[0, 1])),
    ("split_team", Accepts::Any),
    ("batch_team", Accepts::Any),
    ("batch_tally", Accepts::OneOf(&[0, 1])),
    ("loss_tally", Accepts::Any),
    ("batch_rows", Accepts::AtLeastOne),
    ("split_reverse", Accepts::OneOf(&[0, 1])),
    ("split_group_bytes", Accepts::Any),
    ("split_wait", Accepts::Any),
    ("loss_split_wait", Accepts::Any),
    ("backward_split_wait", Accepts::Any),
    ("split_alone", Accepts::OneOf(&[0, 1])),
    ("vector", Accepts::OneOf(&[1, 4])),
    ("unaligned_items", Accepts::OneOf(&[0, 1])),
    ("subgroups", Accepts::OneOf(&[0, 1])),
    ("axis_workgroup", Accepts::AtLeastOne),
    ("axis_lines", Accepts::Any),
    ("axis_min_chunk", Accepts::AtLeastOne),
    ("axis_vec4_max_inner", Accepts::Any),
];

/// The most loads an invocation keeps in registers (`Tuning::max_items`).
const MAX_ITEMS: u32 = 32;

/// The field of `tuning` named `name` (one of [`TUNE_FIELDS`]).
fn field<'a>(tuning: &'a mut Tuning, name: &str) -> Option<&'a mut u32> {
    Some(match name {
        "thread_workgroup" => &mut tuning.thread_workgroup,
        "thread_max_cols" => &mut tuning.thread_max_cols,
        "thread_max_cols_without_subgroups" => &mut tuning.thread_max_cols_without_subgroups,
        "subgroup_workgroup" => &mut tuning.subgroup_workgroup,
        "subgroup_max_cols" => &mut tuning.subgroup_max_cols,
        "streamed_thread_max_cols" => &mut tuning.streamed_thread_max_cols,
        "row_workgroup" => &mut tuning.row_workgroup,
        "row_workgroup_without_subgroups" => &mut tuning.row_workgroup_without_subgroups,
        "max_items" => &mut tuning.max_items,
        "split_min_cols" => &mut tuning.split_min_cols,
        "split_max_rows" => &mut tuning.split_max_rows,
        "split_chunk" => &mut tuning.split_chunk,
        "workgroup_per_row" => &mut tuning.workgroup_per_row,
        "split_team" => &mut tuning.split_team,
        "batch_team" => &mut tuning.batch_team,
        "batch_tally" => &mut tuning.batch_tally,
        "loss_tally" => &mut tuning.loss_tally,
        "batch_rows" => &mut tuning.batch_rows,
        "split_reverse" => &mut tuning.split_reverse,
        "split_group_bytes" => &mut tuning.split_group_bytes,
        "split_wait" => &mut tuning.split_wait,
        "loss_split_wait" => &mut tuning.loss_split_wait,
        "backward_split_wait" => &mut tuning.backward_split_wait,
        "split_alone" => &mut tuning.split_alone,
        "vector" => &mut tuning.vector,
        "unaligned_items" => &mut tuning.unaligned_items,
        "subgroups" => &mut tuning.subgroups,
        "axis_workgroup" => &mut tuning.axis_workgroup,
        "axis_lines" => &mut tuning.axis_lines,
        "axis_min_chunk" => &mut tuning.axis_min_chunk,
        "axis_vec4_max_inner" => &mut tuning.axis_vec4_max_inner,
        _ => return None,
    })
}

/// `FIELD=VALUE`, checked against what the field accepts.
fn parse_tune(text: &str) -> Result<(&'static str, u32), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not FIELD=VALUE"))?;
    let Some(&(name, accepts)) = TUNE_FIELDS.iter().find(|(name, _)| *name == key) else {
        let names: Vec<_> = TUNE_FIELDS.iter().map(|(name, _)| *name).collect();
        return Err(format!(
            "unknown tuning field {key:?}; one of {}",
            names.join(", ")
        ));
    };
    let value: u32 = value.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let valid = match accepts {
        Accepts::Any => true,
        Accepts::AtLeastOne => value >= 1,
        Accepts::PowerOfTwoUpTo(max) => value.is_power_of_two() && value <= max,
        Accepts::OneOf(values) => values.contains(&value),
    };
    if !valid {
        let wanted = match accepts {
            Accepts::Any => unreachable!("every value is valid"),
            Accepts::AtLeastOne => "at least 1".to_owned(),
            Accepts::PowerOfTwoUpTo(max) => format!("a power of two up to {max}"),
            Accepts::OneOf(values) => values
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
        };
        return Err(format!("{name} must be {wanted}, got {value}"));
    }
    Ok((name, value))
}

/// The context with the overrides applied; a value the kernels' or the device's limits changed
/// is reported on stderr.
fn tuned(ctx: &Context, overrides: &[(&'static str, u32)]) -> Result<Context> {
    if overrides.is_empty() {
        return Ok(ctx.clone());
    }
    let mut wanted = ctx.tuning();
    for &(name, value) in overrides {
        if let Some(slot) = field(&mut wanted, name) {
            *slot = value;
        }
    }
    let tuned =
        Context::from_device_with_tuning(ctx.device().clone(), ctx.queue().clone(), wanted)?;
    let mut in_effect = tuned.tuning();
    for &(name, value) in overrides {
        match field(&mut in_effect, name) {
            Some(&mut actual) if actual != value => eprintln!(
                "wgpu-softmax bench: --tune {name}={value} is clamped to {actual} by the limits of the kernels or of this device"
            ),
            _ => {}
        }
    }
    Ok(tuned)
}

/// The tuning as `FIELD: VALUE` pairs, for JSON records.
fn tuning_fields(tuning: Tuning) -> BTreeMap<&'static str, u32> {
    let mut tuning = tuning;
    TUNE_FIELDS
        .iter()
        .filter_map(|&(name, _)| Some((name, *field(&mut tuning, name)?)))
        .collect()
}

fn parse_repeats(text: &str) -> Result<usize, String> {
    match text.trim().parse::<i64>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|e| e.to_string()),
        Ok(n) => Err(format!("must be at least 1, got {n}")),
        Err(e) => Err(e.to_string()),
    }
}

/// An op of the library; `copy`, the limit every record is measured against, is not one.
fn parse_op(name: &str) -> Result<BenchOp, String> {
    BenchOp::OPS
        .into_iter()
        .find(|op| op.name() == name)
        .ok_or_else(|| {
            let names: Vec<_> = BenchOp::OPS.iter().map(|op| op.name()).collect();
            format!("unknown op {name:?}; one of {}", names.join(", "))
        })
}

/// A shape of the bench: `rows` lines of `cols` elements along the softmax axis, `inner`
/// apart (1: rows, `RxC`; more: axis 1 of `[rows / inner, cols, inner]`, `NxCxS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    rows: usize,
    cols: usize,
    inner: usize,
}

impl Shape {
    fn rows(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            inner: 1,
        }
    }

    /// The layout the softmax-family ops run along.
    fn layout(self) -> Result<AxisLayout> {
        AxisLayout::from_parts(self.rows / self.inner, self.cols, self.inner)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inner {
            1 => write!(f, "{}x{}", self.rows, self.cols),
            inner => write!(f, "{}x{}x{inner}", self.rows / inner, self.cols),
        }
    }
}

fn parse_shape(text: &str) -> Result<Shape, String> {
    let parts: Vec<&str> = text.split(['x', 'X']).collect();
    let parse = |v: &str| match v.trim() {
        negative if negative.starts_with('-') => {
            Err(format!("shape {text:?} must have every dimension >= 1"))
        }
        v => v
            .parse::<usize>()
            .map_err(|e| format!("shape {text:?}: {e}")),
    };
    let (outer, cols, inner) = match parts[..] {
        [rows, cols] => (parse(rows)?, parse(cols)?, 1),
        [n, c, s] => (parse(n)?, parse(c)?, parse(s)?),
        _ => return Err(format!("shape {text:?} is not ROWSxCOLS or NxCxS")),
    };
    if outer == 0 || cols == 0 || inner == 0 {
        return Err(format!("shape {text:?} must have every dimension >= 1"));
    }
    let rows = outer
        .checked_mul(inner)
        .ok_or_else(|| format!("shape {text:?} is too large: its element count overflows"))?;
    // The bytes an op moves (`BenchOp::bytes`) must be countable: three matrices of f32 plus
    // a target and a loss per row.
    let bytes = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .and_then(|m| u64::try_from(m).ok())
        .and_then(|m| m.checked_mul(3))
        .and_then(|b| b.checked_add((rows as u64).checked_mul(8)?.checked_add(4)?));
    if bytes.is_none() {
        return Err(format!(
            "shape {text:?} is too large: {rows} x {cols} float32 values overflow a 64-bit byte count"
        ));
    }
    // The bench draws class indices below `cols` as int32.
    if cols > i32::MAX as usize {
        return Err(format!("shape {text:?}: cols must be at most {}", i32::MAX));
    }
    Ok(Shape { rows, cols, inner })
}

/// Host memory the bench of one shape holds at once, in bytes: random inputs (logits, an
/// upstream gradient, int32 targets) for each GPU bench (the op and two copy kernels) and
/// each CPU bench (the op and memcpy), which also hold an output; an output for end-to-end
/// runs.
fn host_bytes(args: &BenchArgs, rows: usize, cols: usize) -> Option<usize> {
    let matrix = rows.checked_mul(cols)?.checked_mul(4)?;
    let targets = rows.checked_mul(4)?;
    let inputs = matrix.checked_mul(2)?.checked_add(targets)?;
    let gpu = if args.no_gpu {
        0
    } else {
        let end_to_end = if args.end_to_end { matrix } else { 0 };
        inputs.checked_mul(3)?.checked_add(end_to_end)?
    };
    let cpu = if args.no_cpu {
        0
    } else {
        inputs.checked_add(matrix)?.checked_mul(2)?
    };
    gpu.checked_add(cpu)
}

/// One line of the results.
#[derive(Debug, Serialize)]
struct Record {
    op: &'static str,
    /// Lines along the softmax axis (rows), and their length.
    rows: usize,
    cols: usize,
    /// The distance between a line's elements: 1 for rows, `S` for axis 1 of `[N, C, S]`.
    inner: usize,
    device: &'static str,
    /// Median seconds.
    seconds: f64,
    /// Bytes read plus written per second / 1e9.
    gb_per_s: f64,
    /// The in-run limit: the copy kernel (gpu) or a multi-threaded memcpy (cpu), same bytes.
    limit_gb_per_s: f64,
    pct_of_limit: f64,
    timing: &'static str,
    /// Runs back to back in each timed sample (the time is per run): GPU samples are batched
    /// on hardware GPUs, see `Pace`.
    runs_per_sample: u32,
    /// The GPU adapter, when one was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    adapter: Option<String>,
    /// What ran: the GPU kernel's team, registers and loads, or the CPU path's instruction set.
    kernel: String,
    /// GPU records: the kernel-choice table in effect (defaults, `--tune` overrides, the device's
    /// limits applied).
    #[serde(skip_serializing_if = "Option::is_none")]
    tuning: Option<BTreeMap<&'static str, u32>>,
    /// With `--dispatches`, GPU kernel records: each dispatch of a run, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    dispatches: Option<Vec<DispatchRecord>>,
}

/// One dispatch of a run, timed in a compute pass of its own (`--dispatches`).
#[derive(Debug, Serialize)]
struct DispatchRecord {
    /// The kernel's entry point.
    entry: &'static str,
    /// Median seconds per run, over the repetitions.
    seconds: f64,
    /// The share of the op's median time (`seconds` of its record).
    pct_of_op: f64,
}

/// The median time of each dispatch over `samples`, each a run's dispatches in order, as records
/// against the op's time `op`.
fn dispatch_records(samples: &[Vec<DispatchTime>], op: Duration) -> Vec<DispatchRecord> {
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(k, dispatch)| {
            let mut times: Vec<Duration> = samples.iter().map(|s| s[k].time).collect();
            let time = middle(&mut times);
            DispatchRecord {
                entry: dispatch.entry,
                seconds: time.as_secs_f64(),
                pct_of_op: 100.0 * time.as_secs_f64() / op.as_secs_f64().max(1e-12),
            }
        })
        .collect()
}

fn median(mut run: impl FnMut() -> Result<Duration>, repeats: usize) -> Result<Duration> {
    run()?;
    let mut times = (0..repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>>>()?;
    Ok(middle(&mut times))
}

fn middle(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// How a case is warmed up and how many runs back to back make one timed sample.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Warm-up wall time before the first timed sample (at least one run).
    warm_up: Duration,
    /// The time a sample aims at: runs are batched until a batch takes about this long.
    sample: Duration,
}

impl Pace {
    /// One warm-up run, one run per sample: the CPU fast path, and software adapters.
    const SINGLE: Pace = Pace {
        warm_up: Duration::ZERO,
        sample: Duration::ZERO,
    };

    /// A hardware GPU drops its clocks within seconds of running short, lone dispatches (an
    /// H100 went from 1980 to 345 MHz while the bench waited on 30 us kernels one at a time,
    /// and the copy limit from 2.7 to 1.2 TB/s). A tenth of a second of back-to-back work
    /// before each case and samples of 2 ms or more keep it at work, as in a training loop.
    const BUSY_GPU: Pace = Pace {
        warm_up: Duration::from_millis(100),
        sample: Duration::from_millis(2),
    };

    /// The pace for a GPU context.
    fn for_gpu(ctx: &Context) -> Pace {
        if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu {
            Pace::SINGLE
        } else {
            Pace::BUSY_GPU
        }
    }

    /// Runs per sample for a run of `one`.
    fn runs(self, one: Duration) -> u32 {
        let runs = self.sample.as_secs_f64() / one.as_secs_f64().max(1e-9);
        runs.ceil().clamp(1.0, f64::from(MAX_RUNS)) as u32
    }

    /// Warms `batch` up and returns the runs per sample.
    fn calibrate(self, batch: &mut dyn FnMut(u32) -> Result<Duration>) -> Result<u32> {
        let start = Instant::now();
        let mut runs = self.runs(batch(1)?);
        while start.elapsed() < self.warm_up {
            runs = self.runs(batch(runs)?);
        }
        Ok(runs)
    }
}

/// The most runs in one sample.
const MAX_RUNS: u32 = 1000;

/// A case timed in batches: `batch(runs)` runs it `runs` times back to back and returns the
/// mean time of one run.
type Batch<'a> = dyn FnMut(u32) -> Result<Duration> + 'a;

/// Medians of `op` and of each of `limits`, timed in turn within every repetition, after
/// `op`'s warm-up as `pace` says and one warm-up run of each limit: the machine's bandwidth
/// drifts over seconds on shared hosts, and interleaving keeps an op and its limit measured
/// under the same conditions. Also returns the op's runs per sample.
fn interleaved(
    pace: Pace,
    op: &mut Batch<'_>,
    limits: &mut [&mut Batch<'_>],
    repeats: usize,
) -> Result<(Duration, Vec<Duration>, u32)> {
    let op_runs = pace.calibrate(op)?;
    let limit_runs = limits
        .iter_mut()
        .map(|limit| {
            let warm = Pace {
                warm_up: Duration::ZERO,
                ..pace
            };
            warm.calibrate(*limit)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut op_times = Vec::new();
    let mut limit_times = vec![Vec::new(); limits.len()];
    for _ in 0..repeats.max(1) {
        for ((limit, times), &runs) in limits.iter_mut().zip(&mut limit_times).zip(&limit_runs) {
            times.push(limit(runs)?);
        }
        op_times.push(op(op_runs)?);
    }
    let limits = limit_times.iter_mut().map(|t| middle(t)).collect();
    Ok((middle(&mut op_times), limits, op_runs))
}

impl BenchArgs {
    /// Whether the bench needs a GPU context (without `--no-gpu` no adapter is looked for).
    pub fn needs_gpu(&self) -> bool {
        !self.no_gpu
    }
}

/// Runs the bench: on the GPU of `ctx`, when there is one, and on the CPU unless `--no-cpu`.
pub fn run(ctx: Option<&Context>, args: &BenchArgs) -> ExitCode {
    let tuned = match ctx.map(|ctx| tuned(ctx, &args.tune)).transpose() {
        Ok(tuned) => tuned,
        Err(error) => {
            eprintln!("wgpu-softmax bench: {}", one_line(&error.to_string()));
            return ExitCode::from(2);
        }
    };
    let ctx = tuned.as_ref();
    if let (true, Some(ctx)) = (args.dispatches, ctx) {
        if !ctx
            .device()
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            eprintln!(
                "wgpu-softmax bench: --dispatches needs timestamp queries, which {} lacks",
                ctx.describe()
            );
            return ExitCode::from(2);
        }
    }
    let ops = if args.ops.is_empty() {
        BenchOp::OPS.to_vec()
    } else {
        args.ops.clone()
    };
    let shapes = if args.shapes.is_empty() {
        SHAPES.map(|(rows, cols)| Shape::rows(rows, cols)).to_vec()
    } else {
        args.shapes.clone()
    };
    match measure(ctx, args, &ops, &shapes) {
        Ok(records) => {
            if args.json {
                match serde_json::to_string_pretty(&records) {
                    Ok(text) => println!("{text}"),
                    Err(error) => {
                        eprintln!("wgpu-softmax bench: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_table(ctx, &records);
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("wgpu-softmax bench: {}", one_line(&error.to_string()));
            ExitCode::from(2)
        }
    }
}

/// Why a bench could not run.
#[derive(Debug, Error)]
enum BenchError {
    #[error("shape {shape} needs {} of host memory, which cannot be allocated", amount(*.bytes))]
    HostMemory {
        shape: Shape,
        /// `None`: more than a `usize` counts.
        bytes: Option<usize>,
    },
    #[error("shape {shape}: {source}")]
    Shape {
        shape: Shape,
        source: wgpu_softmax::Error,
    },
}

fn amount(bytes: Option<usize>) -> String {
    match bytes {
        Some(b) => format!("{:.1} GB", b as f64 / 1e9),
        None => "more than the address space".to_owned(),
    }
}

fn measure(
    ctx: Option<&Context>,
    args: &BenchArgs,
    ops: &[BenchOp],
    shapes: &[Shape],
) -> std::result::Result<Vec<Record>, BenchError> {
    let bar = ProgressBar::new((ops.len() * shapes.len()) as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let mut records = Vec::new();
    let result = shapes.iter().try_for_each(|&shape| {
        let (rows, cols) = (shape.rows, shape.cols);
        // Checked before any host buffer is filled for the upload.
        if let Some(ctx) = ctx {
            let bytes = (rows * cols * 4) as u64;
            let max = ctx.device().limits().max_buffer_size;
            if bytes > max {
                let source = wgpu_softmax::Error::TensorTooLarge { bytes, max };
                return Err(BenchError::Shape { shape, source });
            }
        }
        // The benches allocate their host buffers infallibly: the whole amount is reserved once
        // (and freed) first, so that a shape too large for memory is an error, not an abort.
        let bytes = host_bytes(args, rows, cols);
        if bytes.is_none_or(|b| Vec::<u8>::new().try_reserve_exact(b).is_err()) {
            return Err(BenchError::HostMemory { shape, bytes });
        }
        measure_shape(ctx, args, ops, shape, &bar, &mut records)
            .map_err(|source| BenchError::Shape { shape, source })
    });
    bar.finish_and_clear();
    result.map(|()| records)
}

/// Every op of `ops` on one shape, on the devices selected.
fn measure_shape(
    ctx: Option<&Context>,
    args: &BenchArgs,
    ops: &[BenchOp],
    shape: Shape,
    bar: &ProgressBar,
    records: &mut Vec<Record>,
) -> Result<()> {
    let (rows, cols) = (shape.rows, shape.cols);
    let layout = shape.layout()?;
    let adapter = ctx.map(Context::describe);
    let tuning = ctx.map(|ctx| tuning_fields(ctx.tuning()));
    bar.set_message(format!("copy {shape}"));
    let copy_bytes = BenchOp::Copy.bytes(rows, cols) as f64;
    // The GPU limit is the faster of two access patterns on this adapter.
    let gpu_copies = if let Some(ctx) = ctx {
        [0, COPY_RUN]
            .into_iter()
            .map(|run| Ok(GpuBench::new(ctx, BenchOp::Copy, rows, cols)?.copy_in_runs(run)))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let mut cpu_copy = (!args.no_cpu).then(|| CpuBench::new(BenchOp::Copy, rows, cols));
    let gb_per_s = |bytes: f64, time: Duration| bytes / time.as_secs_f64() / 1e9;
    for &op in ops {
        bar.set_message(format!("{} {shape}", op.name()));
        let bytes = op.bytes(rows, cols) as f64;
        let record = |device, time: Duration, limit: f64, timing: Timing, kernel: &str, runs| {
            let gb_per_s = gb_per_s(bytes, time);
            Record {
                op: op.name(),
                rows,
                cols,
                inner: shape.inner,
                device,
                seconds: time.as_secs_f64(),
                gb_per_s,
                limit_gb_per_s: limit,
                pct_of_limit: 100.0 * gb_per_s / limit,
                timing: timing.name(),
                runs_per_sample: runs,
                adapter: adapter.clone(),
                kernel: kernel.to_string(),
                tuning: tuning.clone().filter(|_| device == "gpu"),
                dispatches: None,
            }
        };
        if let Some(ctx) = ctx {
            let gpu = GpuBench::new(ctx, op, rows, cols)?.along(layout)?;
            let mut runs: Vec<_> = gpu_copies
                .iter()
                .map(|c| move |runs| c.run_batch(runs))
                .collect();
            let mut limits: Vec<&mut Batch<'_>> =
                runs.iter_mut().map(|r| r as &mut Batch<'_>).collect();
            let pace = Pace::for_gpu(ctx);
            let (time, copies, runs) = interleaved(
                pace,
                &mut |runs| gpu.run_batch(runs),
                &mut limits,
                args.repeats,
            )?;
            let limit = copies
                .iter()
                .map(|&t| gb_per_s(copy_bytes, t))
                .fold(0.0, f64::max);
            let kernel = gpu.kernel();
            let mut kernel_record = record("gpu", time, limit, gpu.timing(), &kernel, runs);
            if args.dispatches {
                // As many runs per sample as the op's own samples, as far as the queries allow.
                let per_run = gpu.run_dispatches(1)?.len().max(1) as u32;
                let runs = runs.min(GpuBench::MAX_TIMED_DISPATCHES / per_run).max(1);
                let samples = (0..args.repeats.max(1))
                    .map(|_| gpu.run_dispatches(runs))
                    .collect::<Result<Vec<_>>>()?;
                kernel_record.dispatches = Some(dispatch_records(&samples, time));
            }
            records.push(kernel_record);
            if args.end_to_end {
                let time = median(|| gpu.run_end_to_end(), args.repeats)?;
                let timing = Timing::WallEndToEnd;
                records.push(record("gpu", time, limit, timing, &kernel, 1));
            }
        }
        if let Some(cpu_copy) = &mut cpu_copy {
            let mut cpu = CpuBench::new(op, rows, cols).along(layout)?;
            let (time, copies, _) = interleaved(
                Pace::SINGLE,
                &mut |_| cpu.run(),
                &mut [&mut |_| cpu_copy.run()],
                args.repeats,
            )?;
            let limit = gb_per_s(copy_bytes, copies[0]);
            let kernel = cpu.kernel();
            records.push(record("cpu", time, limit, Timing::WallCpu, &kernel, 1));
        }
        bar.inc(1);
    }
    Ok(())
}

fn print_table(ctx: Option<&Context>, records: &[Record]) {
    if let Some(ctx) = ctx {
        println!("adapter: {}", ctx.describe());
        println!("tuning: {:?}", ctx.tuning());
    }
    println!(
        "{:<21} {:>13} {:>6} {:>11} {:>8} {:>8} {:>7}  {:<25}  kernel",
        "op", "shape", "device", "ms", "GB/s", "limit", "% lim", "timing"
    );
    for r in records {
        println!(
            "{:<21} {:>13} {:>6} {:>11.3} {:>8.2} {:>8.2} {:>6.1}%  {:<25}  {}",
            r.op,
            Shape {
                rows: r.rows,
                cols: r.cols,
                inner: r.inner,
            }
            .to_string(),
            r.device,
            r.seconds * 1e3,
            r.gb_per_s,
            r.limit_gb_per_s,
            r.pct_of_limit,
            r.timing,
            r.kernel
        );
        for d in r.dispatches.iter().flatten() {
            println!(
                "  {:<40} {:>11.3} {:>17} {:>6.1}%  of the op, in a pass of its own",
                d.entry,
                d.seconds * 1e3,
                "",
                d.pct_of_op
            );
        }
    }
    println!(
        "GB/s: bytes read + written per second; limit: the faster of two copy kernels of the same bytes on this adapter (gpu), a multi-threaded memcpy (cpu), timed in turn with each op; medians."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_batched_to_the_pace() {
        let us = Duration::from_micros;
        assert_eq!(Pace::SINGLE.runs(us(1)), 1);
        assert_eq!(Pace::SINGLE.runs(Duration::ZERO), 1);
        // 2 ms samples: 30 us runs 67 to a sample, runs of 2 ms or more one each.
        assert_eq!(Pace::BUSY_GPU.runs(us(30)), 67);
        assert_eq!(Pace::BUSY_GPU.runs(us(2000)), 1);
        assert_eq!(Pace::BUSY_GPU.runs(us(50_000)), 1);
        // A run too short to measure is capped.
        assert_eq!(Pace::BUSY_GPU.runs(Duration::ZERO), MAX_RUNS);
        assert_eq!(Pace::BUSY_GPU.runs(Duration::from_nanos(10)), MAX_RUNS);
    }

    #[test]
    fn calibration_warms_up_for_the_pace_and_sizes_the_batches() {
        // A fake case whose runs take 250 us each, sleeping for each batch.
        let mut batches = Vec::new();
        let mut batch = |runs: u32| -> Result<Duration> {
            batches.push(runs);
            std::thread::sleep(Duration::from_micros(250) * runs);
            Ok(Duration::from_micros(250))
        };
        let pace = Pace {
            warm_up: Duration::from_millis(30),
            sample: Duration::from_millis(2),
        };
        let start = Instant::now();
        assert_eq!(pace.calibrate(&mut batch).unwrap(), 8);
        assert!(start.elapsed() >= pace.warm_up);
        // One run first, then batches of 8 until the warm-up has passed.
        assert_eq!(batches[0], 1);
        assert!(batches.len() >= 3, "{batches:?}");
        assert!(batches[1..].iter().all(|&b| b == 8), "{batches:?}");

        // No warm-up: the one run alone.
        let mut calls = 0;
        let runs = Pace::SINGLE
            .calibrate(&mut |_| {
                calls += 1;
                Ok(Duration::from_micros(250))
            })
            .unwrap();
        assert_eq!((runs, calls), (1, 1));
    }
}
