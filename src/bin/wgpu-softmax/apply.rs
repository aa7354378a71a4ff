//! `wgpu-softmax apply OP ...`: an op applied to `.npy` files. Every failure is one line on
//! stderr and exit code 2, and no output file is written unless the whole op succeeded.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use wgpu_softmax::{AxisLayout, CrossEntropyOptions, Engine, GradOutput, Reduction, Targets};

use crate::npy::{self, NpyData};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApplyOp {
    /// softmax over --axis (the last by default)
    Softmax,
    /// log-softmax over --axis
    LogSoftmax,
    /// dx from y = softmax(x) (--input) and dy (--grad), over --axis
    SoftmaxBackward,
    /// dx from y = log_softmax(x) (--input) and dy (--grad), over --axis
    LogSoftmaxBackward,
    /// cross-entropy of logits [N, C] or [N, C, d1, ...] (classes on --axis, 1 by default) and
    /// --targets
    CrossEntropy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReductionArg {
    None,
    Mean,
    Sum,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The operation.
    #[arg(value_enum)]
    op: ApplyOp,
    /// Input `.npy` (float32): x, y for the backward ops, logits for cross-entropy.
    #[arg(long)]
    input: PathBuf,
    /// Output `.npy` (float32): the result, or the loss for cross-entropy (0-d for mean and sum,
    /// shaped like the targets for none).
    #[arg(long)]
    output: PathBuf,
    /// Backward ops: dL/dy (float32, shaped like --input).
    #[arg(long)]
    grad: Option<PathBuf>,
    /// The axis the op runs along, negative from the end as PyTorch's dim [default: -1];
    /// cross-entropy: the class axis [default: 1, as PyTorch's F.cross_entropy].
    #[arg(long, allow_hyphen_values = true)]
    axis: Option<isize>,
    /// Cross-entropy: class indices (int64 or int32) shaped [N, d1, ...], or float32
    /// probabilities shaped like the logits.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Cross-entropy: a float32 weight per class, shape [C].
    #[arg(long)]
    weight: Option<PathBuf>,
    /// Cross-entropy: targets equal to this are ignored [default: -100].
    #[arg(long, allow_hyphen_values = true)]
    ignore_index: Option<i64>,
    /// Cross-entropy: how per-sample losses are combined [default: mean].
    #[arg(long, value_enum)]
    reduction: Option<ReductionArg>,
    /// Cross-entropy: label smoothing in [0, 1] [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    label_smoothing: Option<f32>,
    /// Cross-entropy: also write dLoss/dLogits (float32, shaped like the logits) here.
    #[arg(long)]
    grad_output: Option<PathBuf>,
}

pub fn run(engine: &Engine, args: &ApplyArgs) -> ExitCode {
    match apply(engine, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wgpu-softmax apply: {}", one_line(&message));
            ExitCode::from(2)
        }
    }
}

/// wgpu's validation and device messages span several lines ("Caused by:" chains); the runner
/// promises one line per failure, so scripts can read it as a single record.
pub fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A float32 array read from a file, with its shape.
struct Array {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_f32(path: &Path) -> Result<Array, String> {
    let array = npy::read_as(path, npy::Expected::FLOAT32).map_err(|e| e.to_string())?;
    let shape = array.shape.clone();
    let data = array.into_f32().map_err(|e| e.to_string())?;
    Ok(Array { shape, data })
}

fn required<'a>(path: &'a Option<PathBuf>, flag: &str, op: &str) -> Result<&'a Path, String> {
    path.as_deref()
        .ok_or_else(|| format!("{op} needs --{flag}"))
}

fn apply(engine: &Engine, args: &ApplyArgs) -> Result<(), String> {
    let name = args
        .op
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    check_options_apply(args, &name)?;
    check_distinct_outputs(args)?;
    check_label_smoothing(args.label_smoothing.unwrap_or_default())?;
    let input = read_f32(&args.input)?;
    let axis = args.axis.unwrap_or(-1);
    let located = |e| explain(e, args, &Blame::Axis(axis));
    // An empty array of any shape is its own result; otherwise the axis must exist and have
    // a length (a 0-d array is one element).
    let layout = match AxisLayout::new(&input.shape, axis) {
        Err(wgpu_softmax::Error::ZeroCols) if input.data.is_empty() => None,
        Ok(_) if input.data.is_empty() => None,
        layout => Some(layout.map_err(located)?),
    };
    match args.op {
        ApplyOp::Softmax | ApplyOp::LogSoftmax => {
            let out = match layout {
                None => Vec::new(),
                Some(layout) if args.op == ApplyOp::Softmax => {
                    engine.softmax_along(&input.data, layout).map_err(located)?
                }
                Some(layout) => engine
                    .log_softmax_along(&input.data, layout)
                    .map_err(located)?,
            };
            npy::write_f32(&args.output, &input.shape, &out).map_err(|e| e.to_string())
        }
        ApplyOp::SoftmaxBackward | ApplyOp::LogSoftmaxBackward => {
            let grad_path = required(&args.grad, "grad", &name)?;
            let grad = read_f32(grad_path)?;
            if grad.shape != input.shape {
                return Err(format!(
                    "{} has shape {:?} but {} has shape {:?}; they must match",
                    grad_path.display(),
                    grad.shape,
                    args.input.display(),
                    input.shape
                ));
            }
            let out = match layout {
                None => Vec::new(),
                Some(layout) if args.op == ApplyOp::SoftmaxBackward => engine
                    .softmax_backward_along(&input.data, &grad.data, layout)
                    .map_err(located)?,
                Some(layout) => engine
                    .log_softmax_backward_along(&input.data, &grad.data, layout)
                    .map_err(located)?,
            };
            npy::write_f32(&args.output, &input.shape, &out).map_err(|e| e.to_string())
        }
        ApplyOp::CrossEntropy => cross_entropy(engine, args, input),
    }
}

/// What the rows the library sees are, in the user's terms.
enum Blame<'a> {
    /// Lines along `--axis` of `--input`.
    Axis(isize),
    /// Lines of the classes (`axis`) of `--input`, one per element of `--targets`.
    Classes {
        axis: isize,
        targets: &'a Path,
        target_shape: &'a [usize],
    },
}

/// The library's error in the terms of the command line: the flag or file at fault, and
/// positions and axes of the user's arrays rather than the flat rows the library sees.
fn explain(error: wgpu_softmax::Error, args: &ApplyArgs, blame: &Blame) -> String {
    use wgpu_softmax::Error;
    let input = args.input.display();
    let axis = match blame {
        Blame::Axis(-1) => "the last axis".to_string(),
        Blame::Axis(axis) => format!("axis {axis}"),
        Blame::Classes { axis, .. } => format!("the class axis (axis {axis})"),
    };
    match (error, blame) {
        (Error::LabelSmoothing(value), _) => label_smoothing_message(value),
        (
            Error::TargetOutOfRange {
                row,
                value,
                classes,
                ignore_index,
            },
            Blame::Classes {
                targets,
                target_shape,
                ..
            },
        ) => format!(
            "{}: target {value} at index {} is outside [0, {classes}) for {classes} classes and is not --ignore-index {ignore_index}",
            targets.display(),
            index_in(target_shape, row)
        ),
        (Error::ZeroCols, _) => format!("{input}: {axis} has length 0; at least 1 is needed"),
        (Error::AxisOutOfRange { axis, rank }, _) => {
            format!("{input}: --axis {axis} is out of range for an array of rank {rank}")
        }
        (
            Error::ShapeTooLarge {
                what: "cols",
                value,
                max,
            },
            _,
        ) => format!("{input}: {axis} has length {value}, more than the supported {max}"),
        (
            Error::RowTooLong {
                cols,
                bytes,
                max_binding,
            },
            _,
        ) => format!(
            "{input}: {axis} has length {cols} ({bytes} bytes), more than the device's storage binding limit of {max_binding} bytes"
        ),
        // Faults of the device, not of the file.
        (
            error @ (Error::Validation(_)
            | Error::Internal(_)
            | Error::OutOfMemory(_)
            | Error::DeviceLost(_)
            | Error::Map(_)),
            _,
        ) => error.to_string(),
        (error, _) => format!("{input}: {error}"),
    }
}

/// Element `flat` (in C order) of an array of `shape`, as numpy writes an index: `4` or
/// `(1, 4)`.
fn index_in(shape: &[usize], flat: usize) -> String {
    let mut index = vec![0; shape.len()];
    let mut rest = flat;
    for (i, &dim) in shape.iter().enumerate().rev() {
        if dim > 0 {
            index[i] = rest % dim;
            rest /= dim;
        }
    }
    match index.as_slice() {
        [only] => only.to_string(),
        _ => format!(
            "({})",
            index
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn label_smoothing_message(value: f32) -> String {
    format!("--label-smoothing must lie in [0, 1], got {value}")
}

/// Refuses a label smoothing outside [0, 1] (NaN included) before any file is read.
fn check_label_smoothing(value: f32) -> Result<(), String> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(label_smoothing_message(value))
    }
}

fn cross_entropy(engine: &Engine, args: &ApplyArgs, logits: Array) -> Result<(), String> {
    let targets_path = required(&args.targets, "targets", "cross-entropy")?;
    if logits.shape.len() < 2 {
        return Err(format!(
            "{}: cross-entropy logits must be [N, C] or [N, C, d1, ...], got shape {:?}",
            args.input.display(),
            logits.shape
        ));
    }
    // The class axis, from the end where negative; the targets drop it.
    let axis = args.axis.unwrap_or(1);
    let rank = logits.shape.len();
    let index = if axis < 0 { axis + rank as isize } else { axis };
    if !(0..rank as isize).contains(&index) {
        let error = wgpu_softmax::Error::AxisOutOfRange { axis, rank };
        return Err(explain(error, args, &Blame::Axis(axis)));
    }
    let targets = npy::read_as(targets_path, npy::Expected::TARGETS).map_err(|e| e.to_string())?;
    let mut target_shape = logits.shape.clone();
    target_shape.remove(index as usize);
    let is_indices = !matches!(targets.data, NpyData::F32(_));
    if is_indices && targets.shape != target_shape {
        return Err(format!(
            "{}: class-index targets must have shape {target_shape:?} (the logits without axis {axis}), got {:?}",
            targets_path.display(),
            targets.shape
        ));
    }
    if !is_indices && targets.shape != logits.shape {
        return Err(format!(
            "{}: probability targets must be shaped like the logits {:?}, got {:?}",
            targets_path.display(),
            logits.shape,
            targets.shape
        ));
    }
    let located = |e| {
        explain(
            e,
            args,
            &Blame::Classes {
                axis,
                targets: targets_path,
                target_shape: &target_shape,
            },
        )
    };
    let layout = AxisLayout::new(&logits.shape, axis).map_err(located)?;
    let classes = layout.len();
    let targets = match &targets.data {
        NpyData::F32(p) => Targets::Probabilities(p),
        NpyData::I64(t) => Targets::Indices(t),
        NpyData::I32(t) => Targets::IndicesI32(t),
    };
    let weight = match &args.weight {
        Some(path) => Some(read_f32(path)?),
        None => None,
    };
    if let Some(w) = &weight {
        if w.shape != [classes] {
            return Err(format!(
                "{}: weight must have shape [{}], got {:?}",
                args.weight.as_deref().unwrap_or(Path::new("")).display(),
                classes,
                w.shape
            ));
        }
    }
    let reduction = match args.reduction.unwrap_or(ReductionArg::Mean) {
        ReductionArg::None => Reduction::None,
        ReductionArg::Mean => Reduction::Mean,
        ReductionArg::Sum => Reduction::Sum,
    };
    let defaults = CrossEntropyOptions::default();
    let options = CrossEntropyOptions {
        weight: weight.as_ref().map(|w| &w.data[..]),
        ignore_index: args.ignore_index.unwrap_or(defaults.ignore_index),
        reduction,
        label_smoothing: args.label_smoothing.unwrap_or(defaults.label_smoothing),
    };
    // The classes are read in place along their axis, whatever follows it.
    let (loss, grad) = if args.grad_output.is_some() {
        let out = engine
            .cross_entropy_with_grad_along(&logits.data, layout, targets, &options, GradOutput::One)
            .map_err(located)?;
        (out.loss, Some(out.grad))
    } else {
        let loss = engine
            .cross_entropy_along(&logits.data, layout, targets, &options)
            .map_err(located)?;
        (loss, None)
    };
    let loss_shape: &[usize] = match reduction {
        Reduction::None => &target_shape,
        Reduction::Mean | Reduction::Sum => &[],
    };
    // Both files are complete before either is put in place, so a failure (a full disk, a
    // directory in the way) leaves every old file as it was.
    let loss_file = npy::stage_f32(&args.output, loss_shape, &loss).map_err(|e| e.to_string())?;
    let grad_file = match (&args.grad_output, &grad) {
        (Some(path), Some(grad)) => {
            Some(npy::stage_f32(path, &logits.shape, grad).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    npy::commit_all(std::iter::once(loss_file).chain(grad_file)).map_err(|e| e.to_string())
}

/// Refuses an option the op does not use, which would otherwise be ignored without a word.
fn check_options_apply(args: &ApplyArgs, name: &str) -> Result<(), String> {
    const BACKWARD: &str = "softmax-backward and log-softmax-backward";
    const CROSS_ENTROPY: &str = "cross-entropy";
    let backward = matches!(
        args.op,
        ApplyOp::SoftmaxBackward | ApplyOp::LogSoftmaxBackward
    );
    let cross_entropy = args.op == ApplyOp::CrossEntropy;
    // The options only some ops use: (those ops, whether this is one, the options given).
    type Group<'a> = (&'a str, bool, &'a [(&'a str, bool)]);
    let groups: [Group; 2] = [
        (BACKWARD, backward, &[("--grad", args.grad.is_some())]),
        (
            CROSS_ENTROPY,
            cross_entropy,
            &[
                ("--targets", args.targets.is_some()),
                ("--weight", args.weight.is_some()),
                ("--ignore-index", args.ignore_index.is_some()),
                ("--reduction", args.reduction.is_some()),
                ("--label-smoothing", args.label_smoothing.is_some()),
                ("--grad-output", args.grad_output.is_some()),
            ],
        ),
    ];
    for (ops, applies, options) in groups {
        if let Some((flag, _)) = options.iter().find(|(_, given)| *given && !applies) {
            return Err(format!("{flag} does not apply to {name} (only to {ops})"));
        }
    }
    Ok(())
}

/// Refuses `--output` and `--grad-output` naming one file (through links or different
/// spellings): the gradient would replace the loss.
fn check_distinct_outputs(args: &ApplyArgs) -> Result<(), String> {
    let Some(grad_output) = &args.grad_output else {
        return Ok(());
    };
    if npy::same_file(&args.output, grad_output) {
        return Err(format!(
            "--output {} and --grad-output {} name the same file",
            args.output.display(),
            grad_output.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{index_in, one_line};

    #[test]
    fn flat_rows_become_indices_of_the_targets() {
        assert_eq!(index_in(&[2, 5], 9), "(1, 4)");
        assert_eq!(index_in(&[4], 3), "3");
        assert_eq!(index_in(&[2, 3, 4], 23), "(1, 2, 3)");
    }

    #[test]
    fn messages_become_one_line() {
        assert_eq!(
            one_line("Validation Error\n\nCaused by:\n    In a submit\r\n  bad\t buffer"),
            "Validation Error Caused by: In a submit bad buffer"
        );
    }
}
