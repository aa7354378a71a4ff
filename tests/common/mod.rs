//! Shared test support: one context per test binary, generated batches, shape tables.
#![allow(dead_code)]

use std::sync::OnceLock;

use rand::{rngs::StdRng, Rng, SeedableRng};
use wgpu_softmax::Context;

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

/// Runs `body` with the shared context, or reports the skip.
pub fn with_gpu(body: impl FnOnce(&Context)) {
    if let Some(ctx) = context() {
        body(ctx);
    }
}

/// Normally distributed logits with standard deviation `scale`, reproducible from `seed`.
pub fn logits(rows: usize, cols: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0.0f32, scale).expect("valid normal");
    (0..rows * cols).map(|_| rng.sample(normal)).collect()
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
