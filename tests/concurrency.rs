//! One context shared by eight threads, each running several kinds of op at once; every result
//! is checked against the reference.

mod common;

use std::sync::Barrier;

use common::{device_softmax_and_backward, logits, with_gpu};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{Context, CrossEntropyOptions, GradOutput, Reduction, Targets, Tolerance};

const THREADS: usize = 8;
const ROUNDS: usize = 6;

fn check(got: &[f32], want: &[f64], tolerance: Tolerance, what: &str) {
    let cmp = tolerance.compare(got, want);
    assert!(cmp.passed(), "{what}: {cmp:?}");
}

/// The work of thread `t` in round `round`: its own shape and data, so a result delivered to the
/// wrong caller, or computed from another caller's staging, cannot pass.
fn work(ctx: &Context, t: usize, round: usize) {
    let seed = (t * 100 + round) as u64;
    let cols = [3, 17, 300, 1025, 5000, 70_001][(t + round) % 6];
    let rows = 1 + (t * 7 + round * 3) % 11;
    let x = logits(rows, cols, 2.0, seed);
    let what = format!("thread {t} round {round} {rows}x{cols}");
    match (t + round) % 4 {
        0 => check(
            &ctx.softmax(&x, cols).unwrap(),
            &reference::softmax(&x, cols).unwrap(),
            Tolerance::SOFTMAX,
            &format!("softmax {what}"),
        ),
        1 => {
            let y = ctx.log_softmax(&x, cols).unwrap();
            check(
                &y,
                &reference::log_softmax(&x, cols).unwrap(),
                Tolerance::LOG_SOFTMAX,
                &format!("log_softmax {what}"),
            );
            let dy = logits(rows, cols, 1.0, seed + 1);
            check(
                &ctx.log_softmax_backward(&y, &dy, cols).unwrap(),
                &reference::log_softmax_backward(&y, &dy, cols).unwrap(),
                Tolerance::LOG_SOFTMAX,
                &format!("log_softmax_backward {what}"),
            );
        }
        2 => {
            // Device-resident chain: upload, softmax, backward, readback.
            let dy = logits(rows, cols, 1.0, seed + 2);
            let (y, dx) = device_softmax_and_backward(ctx, &ctx.upload(&x, cols).unwrap(), &dy);
            check(
                &y,
                &reference::softmax(&x, cols).unwrap(),
                Tolerance::SOFTMAX,
                &format!("tensor softmax {what}"),
            );
            check(
                &dx,
                &reference::softmax_backward(&y, &dy, cols).unwrap(),
                Tolerance::SOFTMAX,
                &format!("tensor softmax_backward {what}"),
            );
        }
        _ => {
            let idx: Vec<i64> = (0..rows).map(|r| ((r * 31 + t) % cols) as i64).collect();
            let reduction = [Reduction::Mean, Reduction::Sum, Reduction::None][round % 3];
            let options = CrossEntropyOptions {
                reduction,
                label_smoothing: 0.05,
                ..Default::default()
            };
            let targets = Targets::Indices(&idx);
            let got = ctx
                .cross_entropy_with_grad(&x, cols, targets, &options, GradOutput::One)
                .unwrap();
            let want =
                reference::cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
            let loss_tolerance = Tolerance {
                abs: 1e-5,
                rel: 2e-5,
            };
            check(
                &got.loss,
                &want.loss,
                loss_tolerance,
                &format!("loss {what}"),
            );
            check(
                &got.grad,
                &want.grad,
                Tolerance::SOFTMAX,
                &format!("grad {what}"),
            );
            // The device form, whose loss shares the loss object's statistics buffer.
            let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
            let t = loss_fn.upload_targets(targets).unwrap();
            let out = loss_fn
                .loss_and_grad(&ctx.upload(&x, cols).unwrap(), &t, GradOutput::One)
                .unwrap();
            check(
                &out.loss.to_vec().unwrap(),
                &want.loss,
                loss_tolerance,
                &format!("device loss {what}"),
            );
        }
    }
}

#[test]
fn eight_threads_share_one_context() {
    with_gpu(|ctx| {
        let start = Barrier::new(THREADS);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        for round in 0..ROUNDS {
                            work(ctx, t, round);
                        }
                    })
                })
                .collect();
            for (t, handle) in handles.into_iter().enumerate() {
                if let Err(panic) = handle.join() {
                    std::panic::resume_unwind(Box::new(format!("thread {t}: {panic:?}")));
                }
            }
        });
    });
}

/// One `CrossEntropyLoss` and one set of device targets used by all threads at once: its
/// statistics and row-loss buffers are shared, so each call's result must still be its own.
#[test]
fn one_loss_object_shared_by_eight_threads() {
    with_gpu(|ctx| {
        let cols = 50;
        let rows = 40;
        let options = CrossEntropyOptions::default();
        let loss_fn = ctx.cross_entropy_loss(cols, &options).unwrap();
        let idx: Vec<i64> = (0..rows).map(|r| (r % cols) as i64).collect();
        let targets = loss_fn.upload_targets(Targets::Indices(&idx)).unwrap();
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (loss_fn, targets, idx) = (&loss_fn, &targets, &idx);
                scope.spawn(move || {
                    for round in 0..ROUNDS {
                        let x = logits(rows, cols, 1.0 + t as f32, (t * 10 + round) as u64);
                        let logits_t = ctx.upload(&x, cols).unwrap();
                        let loss = loss_fn.loss(&logits_t, targets).unwrap().to_vec().unwrap();
                        let want = reference::cross_entropy_loss_f64(
                            &x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                            cols,
                            Targets::Indices(idx),
                            &options,
                        )
                        .unwrap();
                        check(
                            &loss,
                            &want,
                            Tolerance {
                                abs: 1e-5,
                                rel: 2e-5,
                            },
                            &format!("thread {t} round {round}"),
                        );
                    }
                });
            }
        });
    });
}
