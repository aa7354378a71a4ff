//! The host runner: checks every GPU op against the f64 reference (the default), lists adapters,
//! applies ops to `.npy` files.

mod apply;
mod bench;
mod check;
mod npy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgpu_softmax::Context;

#[derive(Parser)]
#[command(
    name = "wgpu-softmax",
    version,
    about = "Batched softmax, log-softmax, cross-entropy and their gradients on the GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every op on generated logits over a spread of shapes and compare with the f64 CPU
    /// reference (the default). Exits 1 if any comparison fails.
    Check,
    /// List the adapters, the one chosen, its features and limits.
    Info {
        /// Print only the chosen adapter, on one line.
        #[arg(long)]
        short: bool,
    },
    /// Apply an op over the last axis of a float32 `.npy` file.
    Apply(apply::ApplyArgs),
    /// Time each op on the GPU and the CPU fast path: ms, GB/s and % of an in-run copy limit.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Check) {
        Command::Check => with_context(check::run),
        Command::Info { short } => info(short),
        Command::Apply(args) => with_context(|ctx| apply::run(ctx, &args)),
        Command::Bench(args) => with_context(|ctx| bench::run(ctx, &args)),
    }
}

/// Creates the context or explains, in one line, why there is none (exit code 2).
fn with_context(body: impl FnOnce(&Context) -> ExitCode) -> ExitCode {
    match Context::new_blocking() {
        Ok(ctx) => body(&ctx),
        Err(error) => {
            eprintln!("wgpu-softmax: {error}");
            ExitCode::from(2)
        }
    }
}

fn info(short: bool) -> ExitCode {
    let ctx = match Context::new_blocking() {
        Ok(ctx) => ctx,
        Err(error) => {
            eprintln!("wgpu-softmax: {error}");
            return ExitCode::from(2);
        }
    };
    if short {
        println!("adapter: {}", ctx.describe());
        return ExitCode::SUCCESS;
    }
    println!("adapters:");
    for info in pollster::block_on(wgpu_softmax::enumerate_adapters(None)) {
        println!(
            "  {} ({:?}, {:?}, driver {} {})",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        );
    }
    println!("chosen: {}", ctx.describe());
    println!("features: {:?}", ctx.device().features());
    let info = ctx.adapter_info();
    println!(
        "subgroup size: {}..={}",
        info.subgroup_min_size, info.subgroup_max_size
    );
    println!("tuning: {:?}", ctx.tuning());
    println!("softmax kernels for the benchmark shapes:");
    for (rows, cols) in wgpu_softmax::bench::SHAPES {
        let loads = if ctx.vector_width(cols) == 4 {
            "vec4"
        } else {
            "scalar"
        };
        println!("  {rows}x{cols}: {}, {loads}", ctx.strategy(rows, cols));
    }
    println!("limits: {:#?}", ctx.device().limits());
    ExitCode::SUCCESS
}
