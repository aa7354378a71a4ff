//! The async forms with many calls in flight at once: every result is right, one polling thread
//! serves them all, a call dropped half-way leaves nothing waiting, and the thread ends with its
//! context. This file holds one test so that no other test's threads are counted.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use common::{logits, with_gpu};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{Context, Error, Tolerance};

type Call<'a> = Pin<Box<dyn Future<Output = Result<Vec<f32>, Error>> + 'a>>;

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives all `calls` on this thread at once, as an executor running them concurrently would.
fn join_all(mut calls: Vec<Call<'_>>) -> Vec<Result<Vec<f32>, Error>> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut results: Vec<Option<Result<Vec<f32>, Error>>> = calls.iter().map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while results.iter().any(Option::is_none) {
        for (call, result) in calls.iter_mut().zip(&mut results) {
            if result.is_none() {
                if let Poll::Ready(r) = call.as_mut().poll(&mut cx) {
                    *result = Some(r);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "async calls still waiting after 120 s"
        );
        std::thread::park_timeout(Duration::from_millis(10));
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// The threads of this process that are polling threads of a context.
fn polling_threads() -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    Some(
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            // Linux keeps the first 15 bytes of a thread's name.
            .filter(|name| name.trim_end() == "wgpu-softmax po")
            .count(),
    )
}

#[test]
fn many_async_calls_share_one_polling_thread() {
    with_gpu(|base| {
        let ctx = Context::from_device(base.device().clone(), base.queue().clone()).unwrap();
        let inputs: Vec<(Vec<f32>, usize)> = (0..48)
            .map(|i| {
                let cols = [1, 10, 257, 3000][i % 4];
                let rows = 1 + i % 5;
                (logits(rows, cols, 3.0, i as u64), cols)
            })
            .collect();

        // One call started (its readback is waiting on the device) and then abandoned.
        {
            let (x, cols) = &inputs[0];
            let mut abandoned: Call<'_> = Box::pin(ctx.softmax_async(x, *cols));
            let _ = abandoned
                .as_mut()
                .poll(&mut std::task::Context::from_waker(Waker::noop()));
        }

        let calls: Vec<Call<'_>> = inputs
            .iter()
            .enumerate()
            .map(|(i, (x, cols))| -> Call<'_> {
                if i % 2 == 0 {
                    Box::pin(ctx.softmax_async(x, *cols))
                } else {
                    Box::pin(ctx.log_softmax_async(x, *cols))
                }
            })
            .collect();
        for (i, (result, (x, cols))) in join_all(calls).into_iter().zip(&inputs).enumerate() {
            let got = result.unwrap_or_else(|e| panic!("call {i}: {e}"));
            let cmp = if i % 2 == 0 {
                Tolerance::SOFTMAX.compare(&got, &reference::softmax(x, *cols).unwrap())
            } else {
                Tolerance::LOG_SOFTMAX.compare(&got, &reference::log_softmax(x, *cols).unwrap())
            };
            assert!(
                cmp.passed(),
                "call {i} ({} x {cols}): {cmp:?}",
                x.len() / cols
            );
        }

        // A blocking call after them all: nothing is left holding the device's mappings.
        let (x, cols) = &inputs[3];
        assert!(Tolerance::SOFTMAX
            .compare(
                &ctx.softmax(x, *cols).unwrap(),
                &reference::softmax(x, *cols).unwrap()
            )
            .passed());

        let Some(threads) = polling_threads() else {
            eprintln!("no /proc/self/task: polling threads not counted");
            return;
        };
        assert_eq!(threads, 1, "polling threads while the context lives");
        drop(ctx);
        let deadline = Instant::now() + Duration::from_secs(10);
        while polling_threads() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "the polling thread outlived its context by 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}
