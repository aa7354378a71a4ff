//! `wgpu-softmax check` (the default): every op over a spread of shapes, against the f64 reference.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use wgpu_softmax::cpu::{fast, reference};
use wgpu_softmax::{
    AxisLayout, Comparison, Context, CrossEntropyOptions, Engine, GradOutput, Reduction, Result,
    Targets, Tolerance,
};

/// The shapes of the default check: tiny, odd, wide, many rows past the dispatch limit, a few
/// rows far longer than a workgroup, and GPT-2's vocabulary (not a multiple of 4 columns). Each
/// shape's inputs are seeded by its place in the list.
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 7),
    (33, 2049),
    (4096, 1000),
    (70_000, 10),
    (4, 300_000),
    (8, 50_257),
];

/// Timed repetitions per case; the median is reported.
const REPEATS: usize = 3;

/// One op of the check: how to run it on the GPU and on the CPU fast path, and its reference.
struct OpCase {
    name: &'static str,
    tolerance: Tolerance,
    /// Rows wider than this are skipped (the Jacobian grows with cols²).
    max_cols: usize,
    gpu: fn(&Context, &Inputs) -> Result<Vec<f32>>,
    cpu: fn(&Inputs) -> Result<Vec<f32>>,
    reference: fn(&Inputs) -> Result<Vec<f64>>,
    /// Backward ops are also held to the f32 summation bound of their row sums
    /// ([`Tolerance::compare_backward`]).
    backward: Option<Backward>,
}

/// Which backward op a case is, and along which axis.
#[derive(Clone, Copy)]
struct Backward {
    log: bool,
    dim0: bool,
}

impl Backward {
    /// The comparison in row space: each line moved last, with its `p_j` and `t_k`.
    fn compare(
        self,
        tolerance: Tolerance,
        i: &Inputs,
        got: &[f32],
        want: &[f64],
    ) -> Result<Comparison> {
        let layout = if self.dim0 {
            i.dim0()
        } else {
            AxisLayout::new(&[i.rows, i.cols], -1)?
        };
        let y = match (self.log, self.dim0) {
            (false, false) => &i.probs,
            (true, false) => &i.log_probs,
            (false, true) => &i.probs_dim0,
            (true, true) => &i.log_probs_dim0,
        };
        let [y, dy, got] = [&y[..], &i.dy, got].map(|v| layout.to_rows(v));
        Ok(tolerance.compare_backward_of(
            &got?,
            &layout.to_rows(want)?,
            [&y?, &dy?],
            layout.len(),
            self.log,
        ))
    }
}

/// Generated inputs of one shape.
pub struct Inputs {
    pub rows: usize,
    pub cols: usize,
    pub logits: Vec<f32>,
    /// An upstream gradient shaped like the logits.
    pub dy: Vec<f32>,
    /// softmax and log_softmax of the logits (inputs of the backward ops).
    pub probs: Vec<f32>,
    pub log_probs: Vec<f32>,
    /// The same along axis 0 ([`Inputs::dim0`]).
    pub probs_dim0: Vec<f32>,
    pub log_probs_dim0: Vec<f32>,
    /// A class per row, every seventh row ignored (-100).
    pub targets: Vec<i64>,
    /// A weight per class.
    pub weight: Vec<f32>,
    /// With the classes along axis 0 ([`Inputs::dim0`]): a class per column, every seventh
    /// ignored, and a weight per class (row).
    pub targets_dim0: Vec<i64>,
    pub weight_dim0: Vec<f32>,
}

impl Inputs {
    /// The batch as `[rows, cols]` with the softmax along axis 0: `cols` lines of `rows`
    /// elements, neighbouring lines side by side in memory.
    fn dim0(&self) -> AxisLayout {
        AxisLayout::new(&[self.rows, self.cols], 0).expect("a validated shape")
    }

    fn targets(&self) -> Targets<'_> {
        Targets::Indices(&self.targets)
    }

    fn targets_dim0(&self) -> Targets<'_> {
        Targets::Indices(&self.targets_dim0)
    }

    /// Mean reduction, class weights, label smoothing 0.1 and ignored rows: every feature.
    fn loss_options(&self) -> CrossEntropyOptions<'_> {
        CrossEntropyOptions {
            weight: Some(&self.weight),
            label_smoothing: 0.1,
            ..Default::default()
        }
    }

    /// The gradient is checked under `Sum`, where it is O(1) whatever the batch size.
    fn grad_options(&self) -> CrossEntropyOptions<'_> {
        CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..self.loss_options()
        }
    }

    /// [`Inputs::loss_options`] with the classes along axis 0.
    fn loss_options_dim0(&self) -> CrossEntropyOptions<'_> {
        CrossEntropyOptions {
            weight: Some(&self.weight_dim0),
            ..self.loss_options()
        }
    }

    /// [`Inputs::grad_options`] with the classes along axis 0.
    fn grad_options_dim0(&self) -> CrossEntropyOptions<'_> {
        CrossEntropyOptions {
            reduction: Reduction::Sum,
            ..self.loss_options_dim0()
        }
    }

    /// The reference cross-entropy with the classes along axis 0: the lines moved last, the
    /// gradient moved back.
    fn cross_entropy_dim0_reference(
        &self,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<reference::CrossEntropyOutput<f64>> {
        let layout = self.dim0();
        let rows = layout.to_rows(&self.logits)?;
        let out = reference::cross_entropy(
            &rows,
            layout.len(),
            self.targets_dim0(),
            options,
            GradOutput::One,
        )?;
        Ok(reference::CrossEntropyOutput {
            loss: out.loss,
            grad: layout.from_rows(&out.grad)?,
        })
    }
}

/// Cross-entropy losses: f32 accumulation over whole rows and the batch.
const LOSS_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 2e-5,
};

/// A reference row op of two inputs (the forward ops ignore the second) and `cols`.
type RowReference = fn(&[f32], &[f32], usize) -> Result<Vec<f64>>;

/// The reference of a row op applied along `layout`: its lines moved last and back.
fn along_reference(layout: AxisLayout, inputs: [&[f32]; 2], op: RowReference) -> Result<Vec<f64>> {
    let [x, dy] = inputs.map(|data| layout.to_rows(data));
    layout.from_rows(&op(&x?, &dy?, layout.len())?)
}

fn ops() -> Vec<OpCase> {
    vec![
        OpCase {
            name: "softmax",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.softmax(&i.logits, i.cols),
            cpu: |i| fast::softmax(&i.logits, i.cols),
            reference: |i| reference::softmax(&i.logits, i.cols),
            backward: None,
        },
        OpCase {
            name: "log_softmax",
            tolerance: Tolerance::LOG_SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.log_softmax(&i.logits, i.cols),
            cpu: |i| fast::log_softmax(&i.logits, i.cols),
            reference: |i| reference::log_softmax(&i.logits, i.cols),
            backward: None,
        },
        OpCase {
            name: "softmax_bwd",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.softmax_backward(&i.probs, &i.dy, i.cols),
            cpu: |i| fast::softmax_backward(&i.probs, &i.dy, i.cols),
            reference: |i| reference::softmax_backward(&i.probs, &i.dy, i.cols),
            backward: Some(Backward {
                log: false,
                dim0: false,
            }),
        },
        OpCase {
            name: "log_softmax_bwd",
            tolerance: Tolerance::LOG_SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.log_softmax_backward(&i.log_probs, &i.dy, i.cols),
            cpu: |i| fast::log_softmax_backward(&i.log_probs, &i.dy, i.cols),
            reference: |i| reference::log_softmax_backward(&i.log_probs, &i.dy, i.cols),
            backward: Some(Backward {
                log: true,
                dim0: false,
            }),
        },
        OpCase {
            name: "softmax_dim0",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.along(i.dim0()).softmax(&i.logits),
            cpu: |i| Engine::Cpu.softmax_along(&i.logits, i.dim0()),
            reference: |i| {
                along_reference(i.dim0(), [&i.logits, &i.dy], |x, _, cols| {
                    reference::softmax(x, cols)
                })
            },
            backward: None,
        },
        OpCase {
            name: "log_softmax_dim0",
            tolerance: Tolerance::LOG_SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.along(i.dim0()).log_softmax(&i.logits),
            cpu: |i| Engine::Cpu.log_softmax_along(&i.logits, i.dim0()),
            reference: |i| {
                along_reference(i.dim0(), [&i.logits, &i.dy], |x, _, cols| {
                    reference::log_softmax(x, cols)
                })
            },
            backward: None,
        },
        OpCase {
            name: "softmax_bwd_dim0",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.along(i.dim0()).softmax_backward(&i.probs_dim0, &i.dy),
            cpu: |i| Engine::Cpu.softmax_backward_along(&i.probs_dim0, &i.dy, i.dim0()),
            reference: |i| {
                along_reference(
                    i.dim0(),
                    [&i.probs_dim0, &i.dy],
                    reference::softmax_backward,
                )
            },
            backward: Some(Backward {
                log: false,
                dim0: true,
            }),
        },
        OpCase {
            name: "log_softmax_bwd_dim0",
            tolerance: Tolerance::LOG_SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| {
                ctx.along(i.dim0())
                    .log_softmax_backward(&i.log_probs_dim0, &i.dy)
            },
            cpu: |i| Engine::Cpu.log_softmax_backward_along(&i.log_probs_dim0, &i.dy, i.dim0()),
            reference: |i| {
                along_reference(
                    i.dim0(),
                    [&i.log_probs_dim0, &i.dy],
                    reference::log_softmax_backward,
                )
            },
            backward: Some(Backward {
                log: true,
                dim0: true,
            }),
        },
        OpCase {
            name: "jacobian",
            tolerance: Tolerance::SOFTMAX,
            max_cols: 64,
            gpu: |ctx, i| ctx.softmax_jacobian(&i.logits, i.cols),
            cpu: |i| fast::softmax_jacobian(&i.logits, i.cols),
            reference: |i| reference::softmax_jacobian(&i.logits, i.cols),
            backward: None,
        },
        OpCase {
            name: "xent_loss",
            tolerance: LOSS_TOLERANCE,
            max_cols: usize::MAX,
            gpu: |ctx, i| ctx.cross_entropy(&i.logits, i.cols, i.targets(), &i.loss_options()),
            cpu: |i| {
                Ok(fast::cross_entropy(
                    &i.logits,
                    i.cols,
                    i.targets(),
                    &i.loss_options(),
                    GradOutput::One,
                )?
                .loss)
            },
            reference: |i| {
                Ok(reference::cross_entropy(
                    &i.logits,
                    i.cols,
                    i.targets(),
                    &i.loss_options(),
                    GradOutput::One,
                )?
                .loss)
            },
            backward: None,
        },
        OpCase {
            name: "xent_grad",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| {
                Ok(ctx
                    .cross_entropy_with_grad(
                        &i.logits,
                        i.cols,
                        i.targets(),
                        &i.grad_options(),
                        GradOutput::One,
                    )?
                    .grad)
            },
            cpu: |i| {
                Ok(fast::cross_entropy(
                    &i.logits,
                    i.cols,
                    i.targets(),
                    &i.grad_options(),
                    GradOutput::One,
                )?
                .grad)
            },
            reference: |i| {
                Ok(reference::cross_entropy(
                    &i.logits,
                    i.cols,
                    i.targets(),
                    &i.grad_options(),
                    GradOutput::One,
                )?
                .grad)
            },
            backward: None,
        },
        OpCase {
            name: "xent_loss_dim0",
            tolerance: LOSS_TOLERANCE,
            max_cols: usize::MAX,
            gpu: |ctx, i| {
                ctx.along(i.dim0()).cross_entropy(
                    &i.logits,
                    i.targets_dim0(),
                    &i.loss_options_dim0(),
                )
            },
            cpu: |i| {
                Engine::Cpu.cross_entropy_along(
                    &i.logits,
                    i.dim0(),
                    i.targets_dim0(),
                    &i.loss_options_dim0(),
                )
            },
            reference: |i| Ok(i.cross_entropy_dim0_reference(&i.loss_options_dim0())?.loss),
            backward: None,
        },
        OpCase {
            name: "xent_grad_dim0",
            tolerance: Tolerance::SOFTMAX,
            max_cols: usize::MAX,
            gpu: |ctx, i| {
                Ok(ctx
                    .along(i.dim0())
                    .cross_entropy_with_grad(
                        &i.logits,
                        i.targets_dim0(),
                        &i.grad_options_dim0(),
                        GradOutput::One,
                    )?
                    .grad)
            },
            cpu: |i| {
                Ok(Engine::Cpu
                    .cross_entropy_with_grad_along(
                        &i.logits,
                        i.dim0(),
                        i.targets_dim0(),
                        &i.grad_options_dim0(),
                        GradOutput::One,
                    )?
                    .grad)
            },
            reference: |i| Ok(i.cross_entropy_dim0_reference(&i.grad_options_dim0())?.grad),
            backward: None,
        },
    ]
}

fn inputs(rows: usize, cols: usize, seed: u64) -> Result<Inputs> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, 4.0).expect("valid normal");
    let logits: Vec<f32> = (0..rows * cols).map(|_| rng.sample(normal)).collect();
    let dy = (0..rows * cols).map(|_| rng.sample(normal) / 4.0).collect();
    let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let probs = as_f32(reference::softmax(&logits, cols)?);
    let log_probs = as_f32(reference::log_softmax(&logits, cols)?);
    let dim0 = AxisLayout::new(&[rows, cols], 0)?;
    let probs_dim0 = as_f32(along_reference(dim0, [&logits, &logits], |x, _, n| {
        reference::softmax(x, n)
    })?);
    let log_probs_dim0 = as_f32(along_reference(dim0, [&logits, &logits], |x, _, n| {
        reference::log_softmax(x, n)
    })?);
    let targets = (0..rows)
        .map(|r| {
            if r % 7 == 3 {
                -100
            } else {
                rng.random_range(0..cols as i64)
            }
        })
        .collect();
    let weight = (0..cols).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
    let targets_dim0 = (0..cols)
        .map(|c| {
            if c % 7 == 3 {
                -100
            } else {
                rng.random_range(0..rows as i64)
            }
        })
        .collect();
    let weight_dim0 = (0..rows).map(|r| 0.5 + (r % 5) as f32 * 0.25).collect();
    Ok(Inputs {
        rows,
        cols,
        logits,
        dy,
        probs,
        log_probs,
        probs_dim0,
        log_probs_dim0,
        targets,
        weight,
        targets_dim0,
        weight_dim0,
    })
}

fn median_time<T>(mut run: impl FnMut() -> Result<T>) -> Result<(T, Duration)> {
    let mut times = Vec::with_capacity(REPEATS);
    let mut last = None;
    for _ in 0..REPEATS {
        let start = Instant::now();
        last = Some(run()?);
        times.push(start.elapsed());
    }
    times.sort();
    Ok((last.expect("REPEATS > 0"), times[REPEATS / 2]))
}

/// Checks the GPU's results, or where the engine is the CPU (no adapter exists) the CPU path's,
/// which is then what callers of [`Engine`] get.
pub fn run(engine: &Engine) -> ExitCode {
    let gpu = engine.context();
    match gpu {
        Some(ctx) => println!("adapter: {}", ctx.describe()),
        None => println!("adapter: none; checking the {} instead", engine.describe()),
    }
    let ops = ops();
    let cases: usize = SHAPES
        .iter()
        .map(|&(_, cols)| ops.iter().filter(|op| cols <= op.max_cols).count())
        .sum();
    let bar = ProgressBar::new(cases as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    println!(
        "{:<20} {:>12} {:>11} {:>11} {:>12} {:>12}  result",
        "op", "shape", "max abs", "max rel", "GPU ms e2e", "CPU ms"
    );
    let mut failures = 0;
    for (seed, &(rows, cols)) in SHAPES.iter().enumerate() {
        let inputs = match inputs(rows, cols, seed as u64) {
            Ok(inputs) => inputs,
            Err(error) => {
                eprintln!("wgpu-softmax: generating {rows}x{cols}: {error}");
                return ExitCode::FAILURE;
            }
        };
        for op in ops.iter().filter(|op| cols <= op.max_cols) {
            bar.set_message(format!("{} {rows}x{cols}", op.name));
            let line = match check_case(gpu, op, &inputs) {
                Ok((cmp, gpu_ms, cpu)) => {
                    let verdict = if cmp.passed() {
                        "pass".to_string()
                    } else {
                        failures += 1;
                        format!(
                            "FAIL ({} elements, first {:?})",
                            cmp.failures, cmp.first_failure
                        )
                    };
                    format!(
                        "{:<20} {:>12} {:>11.2e} {:>11.2e} {:>12} {:>12.3}  {verdict}",
                        op.name,
                        format!("{rows}x{cols}"),
                        cmp.max_abs,
                        cmp.max_rel,
                        gpu_ms.map_or("-".into(), |t| format!("{:.3}", t.as_secs_f64() * 1e3)),
                        cpu.as_secs_f64() * 1e3,
                    )
                }
                Err(error) => {
                    failures += 1;
                    format!(
                        "{:<20} {:>12}  FAIL: {error}",
                        op.name,
                        format!("{rows}x{cols}")
                    )
                }
            };
            bar.suspend(|| println!("{line}"));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    if gpu.is_some() {
        println!(
            "GPU ms e2e: wall clock of the host-slice call, upload and readback included (median of {REPEATS}, after a warm-up); CPU ms: the f32 fast path (median of {REPEATS})."
        );
    } else {
        println!(
            "No GPU adapter: max abs and max rel are the f32 CPU path's errors; CPU ms: its time (median of {REPEATS})."
        );
    }
    println!(
        "*_dim0: along axis 0 of the rows x cols batch (cols lines of rows elements, side by side in memory)."
    );
    println!(
        "xent_loss: mean, class weights, label smoothing 0.1, every 7th row ignored; xent_grad: the same with sum (tolerance relative to O(1) values)."
    );
    if failures == 0 {
        println!("all {cases} cases passed");
        ExitCode::SUCCESS
    } else {
        println!("{failures} case(s) FAILED");
        ExitCode::FAILURE
    }
}

/// The comparison of the GPU's result (the CPU path's without a GPU) with the reference, and the
/// median times of the GPU (if any) and of the CPU path.
fn check_case(
    gpu: Option<&Context>,
    op: &OpCase,
    inputs: &Inputs,
) -> Result<(Comparison, Option<Duration>, Duration)> {
    let (cpu_out, cpu_time) = median_time(|| (op.cpu)(inputs))?;
    let (got, gpu_time) = match gpu {
        Some(ctx) => {
            // The first call compiles the pipeline; it is not what a steady-state caller sees.
            (op.gpu)(ctx, inputs)?;
            let (got, time) = median_time(|| (op.gpu)(ctx, inputs))?;
            (got, Some(time))
        }
        None => (cpu_out, None),
    };
    let want = (op.reference)(inputs)?;
    let cmp = match op.backward {
        Some(backward) => backward.compare(op.tolerance, inputs, &got, &want)?,
        None => op.tolerance.compare(&got, &want),
    };
    Ok((cmp, gpu_time, cpu_time))
}
