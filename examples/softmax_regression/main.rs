//! Softmax regression on the UCI handwritten digits, trained on the GPU with the library's fused
//! cross-entropy gradient, and again on the host with the f64 reference, from the same start.
//!
//! ```sh
//! cargo run --release --example softmax_regression -- [--epochs 300] [--learning-rate 0.5]
//! ```

mod data;
mod model;

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use wgpu_softmax::Context;

use data::{CLASSES, INPUTS};
use model::{accuracy, initial_params, CpuModel, GpuModel, Result};

/// Full-batch gradient descent: every epoch is one step over all training rows.
#[derive(Parser)]
struct Args {
    /// Epochs (= gradient-descent steps).
    #[arg(long, default_value_t = 300)]
    epochs: usize,
    /// Step size of plain gradient descent.
    #[arg(long, default_value_t = 0.5)]
    learning_rate: f32,
    /// Read the GPU's loss back (for the progress bar) every this many epochs.
    #[arg(long, default_value_t = 25)]
    report_every: usize,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where the loss curves go, as SVG.
    #[arg(long, default_value_os_t = default_plot())]
    plot: PathBuf,
}

/// Under `target/`, so a run leaves the source tree untouched.
fn default_plot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("softmax_regression_loss.svg")
}

fn main() {
    if let Err(error) = run(Args::parse()) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.epochs == 0 || args.report_every == 0 {
        return Err("--epochs and --report-every must be at least 1".into());
    }
    let digits = data::load()?;
    let (train, test) = (&digits.train, &digits.test);
    println!(
        "digits: {} training rows, {} test rows, {} features, {} classes",
        train.rows(),
        test.rows(),
        INPUTS - 1,
        CLASSES
    );
    let initial = initial_params(args.seed);

    let ctx = Context::new_blocking()?;
    println!("adapter: {}", ctx.describe());
    let mut gpu = GpuModel::new(&ctx, train, &initial, args.learning_rate, args.epochs)?;
    let bar = ProgressBar::new(args.epochs as u64).with_style(ProgressStyle::with_template(
        "GPU {bar:40} {pos}/{len} epochs  loss {msg}  {elapsed_precise}",
    )?);
    let start = Instant::now();
    while gpu.steps() < args.epochs {
        let count = args.report_every.min(args.epochs - gpu.steps());
        gpu.train(count)?;
        bar.set_message(format!("{:.5}", gpu.last_loss()?));
        bar.inc(count as u64);
    }
    let gpu_seconds = start.elapsed().as_secs_f64();
    bar.finish();
    let gpu_curve = gpu.loss_history()?;
    let gpu_loss = f64::from(gpu.loss()?);
    let gpu_params: Vec<f64> = gpu.params()?.into_iter().map(f64::from).collect();

    let mut cpu = CpuModel::new(train, &initial, args.learning_rate);
    let bar = ProgressBar::new(args.epochs as u64).with_style(ProgressStyle::with_template(
        "CPU {bar:40} {pos}/{len} epochs  loss {msg}  {elapsed_precise}",
    )?);
    let start = Instant::now();
    let mut cpu_curve = Vec::with_capacity(args.epochs);
    for epoch in 0..args.epochs {
        cpu_curve.push(cpu.step()?);
        if (epoch + 1) % args.report_every == 0 {
            bar.set_message(format!("{:.5}", cpu_curve[epoch]));
        }
        bar.inc(1);
    }
    let cpu_seconds = start.elapsed().as_secs_f64();
    bar.finish();
    let cpu_loss = cpu.loss()?;

    let per_epoch = |seconds: f64| seconds * 1e3 / args.epochs as f64;
    println!(
        "{} epochs of full-batch gradient descent, learning rate {}",
        args.epochs, args.learning_rate
    );
    println!(
        "GPU f32: final training loss {gpu_loss:.6}, test accuracy {:.2}%, {:.3} ms/epoch",
        100.0 * accuracy(&gpu_params, test),
        per_epoch(gpu_seconds)
    );
    println!(
        "CPU f64: final training loss {cpu_loss:.6}, test accuracy {:.2}%, {:.3} ms/epoch",
        100.0 * accuracy(cpu.params(), test),
        per_epoch(cpu_seconds)
    );
    let param_gap = gpu_params
        .iter()
        .zip(cpu.params())
        .map(|(g, c)| (g - c).abs())
        .fold(0.0, f64::max);
    println!(
        "GPU - CPU: loss {:.2e}, largest parameter difference {param_gap:.2e}",
        gpu_loss - cpu_loss
    );

    let gpu_curve: Vec<f64> = gpu_curve.into_iter().map(f64::from).collect();
    plot(
        &args.plot,
        &[gpu_curve, vec![gpu_loss]].concat(),
        &[cpu_curve, vec![cpu_loss]].concat(),
    )?;
    println!("loss curves: {}", args.plot.display());
    Ok(())
}

/// Both curves, loss (log scale) against epoch; point `i` is the loss after `i` steps.
fn plot(path: &Path, gpu: &[f64], cpu: &[f64]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let (low, high) = gpu
        .iter()
        .chain(cpu)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Softmax regression on UCI digits: training loss",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            0..gpu.len().max(cpu.len()),
            (low * 0.9..high * 1.1).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("mean cross-entropy")
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()?;
    // The curves coincide at this scale: a wide light line under a thin dark one shows both.
    let wide = RGBColor(240, 120, 120).stroke_width(5);
    chart
        .draw_series(LineSeries::new(gpu.iter().copied().enumerate(), wide))?
        .label("GPU (f32)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], wide));
    chart
        .draw_series(LineSeries::new(cpu.iter().copied().enumerate(), &BLUE))?
        .label("CPU reference (f64)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
