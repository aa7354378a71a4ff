//! A few epochs of the softmax-regression example: the GPU model (the example's kernels around
//! the fused cross-entropy, in place, in the caller's encoder) must lower the loss and follow the
//! f64 host model step for step.

mod common;

#[allow(dead_code)]
#[path = "../examples/softmax_regression/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/softmax_regression/model.rs"]
mod model;

use model::{initial_params, CpuModel, GpuModel};

const EPOCHS: usize = 20;
const LEARNING_RATE: f32 = 0.5;

/// f32 products and sums over 1437 rows against f64: the loss agrees to a few ulps of f32 after
/// 20 steps; parameters (of order 0.1) drift by accumulated rounding only.
const LOSS_TOLERANCE: f64 = 1e-5;
const PARAM_TOLERANCE: f64 = 1e-5;

#[test]
fn gpu_training_lowers_the_loss_and_matches_the_f64_reference() {
    common::with_gpu(|ctx| {
        let digits = data::load().expect("the bundled data set parses");
        let train = &digits.train;
        let initial = initial_params(7);

        let mut gpu = GpuModel::new(ctx, train, &initial, LEARNING_RATE, EPOCHS).expect("setup");
        // Two submissions, to cover recording several steps into one encoder and continuing.
        gpu.train(EPOCHS / 2).expect("GPU steps");
        gpu.train(EPOCHS - EPOCHS / 2).expect("GPU steps");
        let gpu_curve = gpu.loss_history().expect("loss history");
        let gpu_final = f64::from(gpu.loss().expect("final loss"));
        let gpu_params = gpu.params().expect("parameters");

        let mut cpu = CpuModel::new(train, &initial, LEARNING_RATE);
        let cpu_curve: Vec<f64> = (0..EPOCHS).map(|_| cpu.step().expect("CPU step")).collect();
        let cpu_final = cpu.loss().expect("CPU loss");

        assert_eq!(gpu_curve.len(), EPOCHS);
        for (epoch, (&g, &c)) in gpu_curve.iter().zip(&cpu_curve).enumerate() {
            assert!(
                (f64::from(g) - c).abs() <= LOSS_TOLERANCE,
                "epoch {epoch}: GPU loss {g}, CPU loss {c}"
            );
        }
        assert!(
            (gpu_final - cpu_final).abs() <= LOSS_TOLERANCE,
            "final: GPU {gpu_final}, CPU {cpu_final}"
        );
        for (i, (&g, &c)) in gpu_params.iter().zip(cpu.params()).enumerate() {
            assert!(
                (f64::from(g) - c).abs() <= PARAM_TOLERANCE,
                "parameter {i}: GPU {g}, CPU {c}"
            );
        }

        // From ln(10) with near-zero weights, full-batch descent lowers the loss every step.
        assert!(
            (f64::from(gpu_curve[0]) - 10f64.ln()).abs() < 0.05,
            "{}",
            gpu_curve[0]
        );
        for (epoch, pair) in gpu_curve.windows(2).enumerate() {
            assert!(
                pair[1] < pair[0],
                "epoch {}: loss rose {} -> {}",
                epoch + 1,
                pair[0],
                pair[1]
            );
        }
        assert!(
            gpu_final < 0.5 * f64::from(gpu_curve[0]),
            "loss only fell to {gpu_final}"
        );
    });
}
