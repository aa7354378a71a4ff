//! GPU against CPU for every op over the shapes of the benchmark table: `cargo bench`.
//!
//! GPU figures are wall clock from submission to completion of the op on device-resident inputs
//! (criterion times the host); `wgpu-softmax bench` reports kernel time from timestamp queries.
//! Throughput counts the bytes an op must read plus write.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgpu_softmax::bench::{BenchOp, CpuBench, GpuBench, SHAPES};
use wgpu_softmax::Context;

fn ops(c: &mut Criterion) {
    let ctx = match Context::new_blocking() {
        Ok(ctx) => Some(ctx),
        Err(error) => {
            eprintln!("no GPU adapter ({error}): benchmarking the CPU path only");
            None
        }
    };
    for op in BenchOp::OPS {
        let mut group = c.benchmark_group(op.name());
        group.sample_size(10);
        for (rows, cols) in SHAPES {
            let shape = format!("{rows}x{cols}");
            group.throughput(Throughput::Bytes(op.bytes(rows, cols)));
            if let Some(ctx) = &ctx {
                let gpu = GpuBench::new(ctx, op, rows, cols).expect("GPU inputs");
                group.bench_function(BenchmarkId::new("gpu", &shape), |b| {
                    b.iter(|| gpu.run_wall().expect("GPU run"))
                });
            }
            let mut cpu = CpuBench::new(op, rows, cols);
            group.bench_function(BenchmarkId::new("cpu", &shape), |b| {
                b.iter(|| cpu.run().expect("CPU run"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
