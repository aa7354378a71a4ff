//! The host runner: checks every GPU op against the f64 reference (the default), lists adapters,
//! applies ops to `.npy` files.

mod apply;
mod bench;
mod check;
mod npy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgpu_softmax::{Context, Engine};

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
        Command::Check => with_engine(check::run),
        Command::Info { short } => info(short),
        Command::Apply(args) => with_engine(|engine| apply::run(engine, &args)),
        Command::Bench(args) if !args.needs_gpu() => bench::run(None, &args),
        Command::Bench(args) => with_context(|ctx| bench::run(Some(ctx), &args)),
    }
}

/// wgpu's names for `WGPU_BACKEND`, as `wgpu::Backends::from_comma_list` reads them.
const BACKEND_NAMES: [&str; 11] = [
    "vulkan", "vk", "dx12", "d3d12", "metal", "mtl", "opengl", "gles", "gl", "webgpu", "noop",
];

/// Refuses a `WGPU_BACKEND` with a name wgpu does not know: wgpu skips such names, so a typo
/// would otherwise search other backends than meant, or none at all.
fn check_backend_variable() -> Result<(), String> {
    let Ok(value) = std::env::var("WGPU_BACKEND") else {
        return Ok(());
    };
    let lower = value.to_lowercase();
    let names: Vec<&str> = lower
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| !BACKEND_NAMES.contains(name))
        .collect();
    let problem = match unknown.as_slice() {
        [] if names.is_empty() => "names no backend".to_owned(),
        [] => return Ok(()),
        [one] => format!("is not understood: {one:?} is not a backend"),
        many => format!("is not understood: {many:?} are not backends"),
    };
    Err(format!(
        "WGPU_BACKEND={value:?} {problem}; valid names, comma-separated: {}",
        BACKEND_NAMES.join(", ")
    ))
}

/// Checks `WGPU_BACKEND`, then runs `make`; a failure of either is explained in one line (exit
/// code 2).
fn create<T>(make: impl FnOnce() -> wgpu_softmax::Result<T>) -> Result<T, ExitCode> {
    let created = check_backend_variable().and_then(|()| make().map_err(|e| e.to_string()));
    created.map_err(|error| {
        eprintln!("wgpu-softmax: {error}");
        ExitCode::from(2)
    })
}

/// Creates the context or explains, in one line, why there is none (exit code 2).
fn new_context() -> Result<Context, ExitCode> {
    create(Context::new_blocking)
}

/// Runs `body` with a new context, or explains, in one line, why there is none (exit code 2).
fn with_context(body: impl FnOnce(&Context) -> ExitCode) -> ExitCode {
    match new_context() {
        Ok(ctx) => body(&ctx),
        Err(code) => code,
    }
}

/// Runs `body` on the GPU, or on the CPU path where no adapter exists (said on stderr); any
/// other failure to create the context is explained in one line (exit code 2).
fn with_engine(body: impl FnOnce(&Engine) -> ExitCode) -> ExitCode {
    let engine = match create(Engine::new_blocking) {
        Ok(engine) => engine,
        Err(code) => return code,
    };
    if engine.context().is_none() {
        eprintln!(
            "wgpu-softmax: no GPU adapter; running on the {}",
            engine.describe()
        );
    }
    body(&engine)
}

fn info(short: bool) -> ExitCode {
    let ctx = match new_context() {
        Ok(ctx) => ctx,
        Err(code) => return code,
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
