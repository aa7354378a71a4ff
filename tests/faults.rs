//! Device faults: out-of-memory and validation errors come back as errors, and a lost device is
//! `Error::DeviceLost` on the next call, never a panic or a hang.

mod common;

use std::future::Future;

use common::{device_on_same_adapter, logits, with_gpu};
use wgpu_softmax::cpu::reference;
use wgpu_softmax::{Context, CrossEntropyOptions, Error, GradOutput, Targets, Tolerance};

fn fresh_context(base: &Context) -> Context {
    let (device, queue) = device_on_same_adapter(base, |limits| limits);
    Context::from_device(device, queue).expect("adopt a fresh device")
}

#[test]
fn a_destroyed_device_is_reported_as_lost_on_every_later_call() {
    with_gpu(|base| {
        let ctx = fresh_context(base);
        let x = logits(4, 10, 1.0, 1);
        let tensor = ctx.upload(&x, 10).unwrap();
        let loss_fn = ctx
            .cross_entropy_loss(10, &CrossEntropyOptions::default())
            .unwrap();
        let targets = loss_fn
            .upload_targets(Targets::Indices(&[0, 1, 2, 3]))
            .unwrap();
        assert!(Tolerance::SOFTMAX
            .compare(
                &ctx.softmax(&x, 10).unwrap(),
                &reference::softmax(&x, 10).unwrap()
            )
            .passed());

        ctx.device().destroy();

        let lost = |what: &str, result: Result<(), Error>| match result {
            Err(Error::DeviceLost(_)) => {}
            other => panic!("{what}: expected DeviceLost, got {other:?}"),
        };
        lost("softmax", ctx.softmax(&x, 10).map(drop));
        lost("log_softmax", ctx.log_softmax(&x, 10).map(drop));
        lost(
            "async softmax",
            pollster::block_on(ctx.softmax_async(&x, 10)).map(drop),
        );
        lost(
            "softmax_backward",
            ctx.softmax_backward(&x, &x, 10).map(drop),
        );
        lost(
            "log_softmax_backward",
            ctx.log_softmax_backward(&x, &x, 10).map(drop),
        );
        lost(
            "cross_entropy",
            ctx.cross_entropy_with_grad(
                &x,
                10,
                Targets::Indices(&[0, 1, 2, 3]),
                &Default::default(),
                GradOutput::One,
            )
            .map(drop),
        );
        lost("jacobian", ctx.softmax_jacobian(&x, 10).map(drop));
        lost("upload", ctx.upload(&x, 10).map(drop));
        lost("empty", ctx.empty(2, 2).map(drop));
        lost("tensor softmax", tensor.softmax().map(drop));
        lost("to_vec", tensor.to_vec().map(drop));
        lost("loss", loss_fn.loss(&tensor, &targets).map(drop));
        lost(
            "cross_entropy_loss",
            ctx.cross_entropy_loss(10, &Default::default()).map(drop),
        );
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        lost(
            "encode",
            ctx.encode_softmax(&mut encoder, tensor.buffer(), tensor.buffer(), 0, 10)
                .or_else(|e| match e {
                    // Argument checks come first and need no device.
                    Error::Aliased { .. } => {
                        let out = ctx.empty(4, 10)?;
                        ctx.encode_softmax(&mut encoder, tensor.buffer(), out.buffer(), 4, 10)
                    }
                    other => Err(other),
                }),
        );
        // The shared context on the same adapter is unaffected.
        assert!(base.softmax(&x, 10).is_ok());
    });
}

/// A device destroyed while a large batch is in flight: the call in progress and the next one
/// end with an error (or, for the one in flight, its result), never a hang.
#[test]
fn a_device_destroyed_from_another_thread_mid_batch_ends_calls_cleanly() {
    with_gpu(|base| {
        let ctx = fresh_context(base);
        let x = logits(2000, 2000, 1.0, 2);
        let worker = {
            let ctx = ctx.clone();
            let x = x.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| ctx.softmax(&x, 2000).map(drop))
                    .collect::<Vec<_>>()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        ctx.device().destroy();
        let results = worker.join().expect("no panic in the worker");
        for result in &results {
            assert!(
                matches!(result, Ok(()) | Err(Error::DeviceLost(_))),
                "{result:?}"
            );
        }
        assert!(matches!(ctx.softmax(&x, 2000), Err(Error::DeviceLost(_))));
    });
}

/// A device destroyed while an async call waits for its readback: the call ends with
/// `DeviceLost` (its readback buffer went with the device), or with its result if it finished
/// first; never a hang or a mapping error.
#[test]
fn a_device_destroyed_while_an_async_call_waits_ends_it_as_lost() {
    with_gpu(|base| {
        let ctx = fresh_context(base);
        let x = logits(2048, 4096, 1.0, 3);
        let mut call = Box::pin(ctx.softmax_async(&x, 4096));
        // One poll submits the work and requests the readback's mapping.
        let waker = std::task::Waker::noop();
        let first = call
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert!(first.is_pending(), "a 2048 x 4096 batch finished at once");
        ctx.device().destroy();
        match pollster::block_on(call) {
            Err(Error::DeviceLost(_)) => {}
            Ok(y) => assert!(Tolerance::SOFTMAX
                .compare(&y, &reference::softmax(&x, 4096).unwrap())
                .passed()),
            Err(other) => panic!("expected DeviceLost, got {other:?}"),
        }
        assert!(matches!(ctx.softmax(&x, 4096), Err(Error::DeviceLost(_))));
    });
}

/// A buffer the caller destroyed makes the submission invalid: wgpu's validation error comes
/// back as `Error::Validation`, where wgpu's default handler would have panicked.
#[test]
fn validation_errors_are_returned_not_raised() {
    with_gpu(|base| {
        let ctx = fresh_context(base);
        let t = ctx.upload(&[1.0, 2.0, 3.0, 4.0], 2).unwrap();
        t.buffer().destroy();
        match t.softmax() {
            Err(Error::Validation(message)) => assert!(!message.is_empty()),
            other => panic!("expected Validation, got {other:?}"),
        }
        let dy = ctx.upload(&[1.0; 4], 2).unwrap();
        assert!(matches!(dy.softmax_backward(&t), Err(Error::Validation(_))));
        // The context stays usable.
        assert!(ctx.softmax(&[1.0, 2.0], 2).is_ok());
    });
}

/// Asking for more memory than the device has is an error, not an abort. Beyond
/// `max_buffer_size` the library refuses before wgpu is involved (`TensorTooLarge`). Below it,
/// what happens depends on the driver: lavapipe and llvmpipe commit memory lazily, so creating
/// buffers of the largest size never fails (four of 2 GiB succeed on an 8 GiB-free machine)
/// and nothing touches them here; a driver that does refuse gets its out-of-memory error
/// captured and returned. Either way the context must remain usable.
#[test]
fn allocations_beyond_the_device_memory_are_errors() {
    with_gpu(|base| {
        let ctx = fresh_context(base);
        let max = ctx.device().limits().max_buffer_size;
        let cols = 1 << 16;
        let rows = (max / (cols as u64 * 4)) as usize;
        assert!(matches!(
            ctx.empty(rows + 1, cols),
            Err(Error::TensorTooLarge { .. })
        ));
        let mut held = Vec::new();
        let mut failure = None;
        for _ in 0..4 {
            match ctx.empty(rows, cols) {
                Ok(t) => held.push(t),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        match failure {
            Some(Error::OutOfMemory(_)) | Some(Error::Validation(_)) | None => {}
            Some(other) => panic!("unexpected error {other:?}"),
        }
        eprintln!(
            "held {} tensors of {} MiB; failure: {failure:?}",
            held.len(),
            (rows * cols * 4) >> 20
        );
        drop(held);
        assert!(ctx.softmax(&[0.0, 1.0], 2).is_ok());
    });
}

/// wgpu keeps one lost callback per device; every context adopted on the device still learns
/// of its loss, the first as well as the last.
#[test]
fn every_context_on_a_destroyed_device_reports_it_lost() {
    with_gpu(|base| {
        let (device, queue) = device_on_same_adapter(base, |limits| limits);
        let first = Context::from_device(device.clone(), queue.clone()).unwrap();
        let second = Context::from_device(device.clone(), queue.clone()).unwrap();
        let third = Context::from_device(device.clone(), queue).unwrap();
        drop(second);
        let x = logits(4, 10, 1.0, 4);
        assert!(first.softmax(&x, 10).is_ok());
        device.destroy();
        for (name, ctx) in [("first", &first), ("third", &third)] {
            let lost = |what: &str, result: Result<(), Error>| match result {
                Err(Error::DeviceLost(reason)) => {
                    assert!(reason.starts_with("Destroyed"), "{name} {what}: {reason}")
                }
                other => panic!("{name} context, {what}: expected DeviceLost, got {other:?}"),
            };
            lost("upload", ctx.upload(&x, 10).map(drop));
            lost("empty", ctx.empty(4, 10).map(drop));
            lost("softmax", ctx.softmax(&x, 10).map(drop));
            lost(
                "cross_entropy_loss",
                ctx.cross_entropy_loss(10, &Default::default()).map(drop),
            );
            let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 160,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let out = device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 160,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            let mut encoder = device.create_command_encoder(&Default::default());
            lost(
                "encode",
                ctx.encode_softmax(&mut encoder, &buffer, &out, 4, 10),
            );
        }
    });
}
