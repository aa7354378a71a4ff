//! GPU against CPU for every op over the shapes of the benchmark table: `cargo bench`.
//!
//! GPU figures are wall clock from submission to completion of the op on device-resident inputs
//! (criterion times the host); `wgpu-softmax bench` reports kernel time from timestamp queries.
//! Throughput counts the bytes an op must read plus write.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wgpu_softmax::bench::{BenchOp, CpuBench, GpuBench, AXIS_SHAPES, SHAPES};
use wgpu_softmax::{AxisLayout, Context};

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
        // Along axis 1 of [N, C, S]: N * S lines of C elements, S apart.
        for (n, c, s) in AXIS_SHAPES.into_iter().filter(|_| op.runs_along_any_axis()) {
            let shape = format!("{n}x{c}x{s}");
            let layout = AxisLayout::new(&[n, c, s], 1).expect("a valid layout");
            group.throughput(Throughput::Bytes(op.bytes(n * s, c)));
            if let Some(ctx) = &ctx {
                let gpu = GpuBench::new(ctx, op, n * s, c)
                    .and_then(|g| g.along(layout))
                    .expect("GPU inputs");
                group.bench_function(BenchmarkId::new("gpu", &shape), |b| {
                    b.iter(|| gpu.run_wall().expect("GPU run"))
                });
            }
            let mut cpu = CpuBench::new(op, n * s, c)
                .along(layout)
                .expect("CPU inputs");
            group.bench_function(BenchmarkId::new("cpu", &shape), |b| {
                b.iter(|| cpu.run().expect("CPU run"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
