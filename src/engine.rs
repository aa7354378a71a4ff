//! One handle for the host-slice operations that runs them on the GPU where there is one and on
//! the CPU's f32 path where there is none.

use crate::context::{Context, ContextOptions};
use crate::cpu::{fast, CrossEntropyOutput};
use crate::error::{Error, Result};
use crate::layout::AxisLayout;
use crate::options::{CrossEntropyOptions, GradOutput, Targets};

/// Where the host-slice operations run: a GPU [`Context`], or the multi-threaded f32 CPU path
/// ([`cpu::fast`](mod@crate::cpu::fast)).
///
/// [`Engine::new`] falls back to the CPU only when no adapter exists at all
/// ([`Error::NoAdapter`]); an adapter name that matches nothing, a failed device request or a
/// device below the kernels' limits stay errors, since they say that a GPU was meant. Each
/// operation has the signature, error variants and special-value policy of the [`Context`]
/// method of the same name, and results within the same accuracy table (the two paths round
/// differently, so not bit for bit). The `_into` forms write into the caller's buffer, which a
/// loop over batches can reuse.
///
/// ```no_run
/// use wgpu_softmax::Engine;
/// let engine = Engine::new_blocking()?; // a GPU if there is one, else the CPU
/// println!("running on {}", engine.describe());
/// let probs = engine.softmax(&[1.0, 2.0, 3.0, 1.0, 1.0, 1.0], 3)?;
/// # Ok::<(), wgpu_softmax::Error>(())
/// ```
///
/// Only the blocking host-slice forms are here: device-resident tensors, the `encode_*` forms
/// and the async forms need a [`Context`], which [`Engine::context`] gives where there is one.
#[derive(Debug, Clone)]
pub enum Engine {
    /// A GPU context; the operations are its host-slice forms.
    Gpu(Context),
    /// The CPU's f32 path, multi-threaded with rayon.
    Cpu,
}

impl Engine {
    /// A [`Context`] as [`Context::new`] picks it (`WGPU_BACKEND`, `WGPU_ADAPTER_NAME`), or the
    /// CPU when no adapter exists.
    ///
    /// # Errors
    /// As [`Context::new`], except [`Error::NoAdapter`], which gives [`Engine::Cpu`].
    pub async fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default()).await
    }

    /// Blocking form of [`Engine::new`].
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// Like [`Engine::new`], with explicit options.
    pub async fn with_options(options: ContextOptions) -> Result<Self> {
        Self::or_cpu(Context::with_options(options).await)
    }

    /// The engine of a context request's outcome: the context, the CPU where no adapter exists,
    /// the error otherwise.
    fn or_cpu(context: Result<Context>) -> Result<Self> {
        match context {
            Ok(ctx) => Ok(Self::Gpu(ctx)),
            Err(Error::NoAdapter { .. }) => Ok(Self::Cpu),
            Err(error) => Err(error),
        }
    }

    /// The GPU context, if the operations run on a GPU.
    pub fn context(&self) -> Option<&Context> {
        match self {
            Self::Gpu(ctx) => Some(ctx),
            Self::Cpu => None,
        }
    }

    /// The adapter ([`Context::describe`]), or the CPU path's instruction set and threads.
    pub fn describe(&self) -> String {
        match self {
            Self::Gpu(ctx) => ctx.describe(),
            Self::Cpu => format!(
                "CPU f32 path ({}, {} threads)",
                fast::instruction_set(),
                rayon::current_num_threads()
            ),
        }
    }

    /// Row-wise softmax; see [`Context::softmax`].
    ///
    /// # Errors
    /// As [`Context::softmax`].
    pub fn softmax(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.softmax(x, cols),
            Self::Cpu => fast::softmax(x, cols),
        }
    }

    /// [`Engine::softmax`] into `out`; see [`Context::softmax_into`].
    ///
    /// # Errors
    /// As [`Context::softmax_into`].
    pub fn softmax_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.softmax_into(x, cols, out),
            Self::Cpu => fast::softmax_into(x, cols, out),
        }
    }

    /// Row-wise log-softmax; see [`Context::log_softmax`].
    ///
    /// # Errors
    /// As [`Context::log_softmax`].
    pub fn log_softmax(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.log_softmax(x, cols),
            Self::Cpu => fast::log_softmax(x, cols),
        }
    }

    /// [`Engine::log_softmax`] into `out`; see [`Context::log_softmax_into`].
    ///
    /// # Errors
    /// As [`Context::log_softmax_into`].
    pub fn log_softmax_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.log_softmax_into(x, cols, out),
            Self::Cpu => fast::log_softmax_into(x, cols, out),
        }
    }

    /// Softmax along any axis; see [`Along::softmax`](crate::Along::softmax) and, on the CPU,
    /// [`fast::softmax_along`].
    ///
    /// # Errors
    /// As [`Along::softmax`](crate::Along::softmax).
    pub fn softmax_along(&self, x: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).softmax(x),
            Self::Cpu => fast::softmax_along(x, layout),
        }
    }

    /// [`Engine::softmax_along`] into `out`; see [`Along::softmax_into`](crate::Along::softmax_into).
    ///
    /// # Errors
    /// As [`Along::softmax_into`](crate::Along::softmax_into).
    pub fn softmax_along_into(&self, x: &[f32], layout: AxisLayout, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).softmax_into(x, out),
            Self::Cpu => fast::softmax_along_into(x, layout, out),
        }
    }

    /// Log-softmax along any axis; see [`Along::log_softmax`](crate::Along::log_softmax).
    ///
    /// # Errors
    /// As [`Along::log_softmax`](crate::Along::log_softmax).
    pub fn log_softmax_along(&self, x: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).log_softmax(x),
            Self::Cpu => fast::log_softmax_along(x, layout),
        }
    }

    /// [`Engine::log_softmax_along`] into `out`.
    ///
    /// # Errors
    /// As [`Along::log_softmax_into`](crate::Along::log_softmax_into).
    pub fn log_softmax_along_into(
        &self,
        x: &[f32],
        layout: AxisLayout,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).log_softmax_into(x, out),
            Self::Cpu => fast::log_softmax_along_into(x, layout, out),
        }
    }

    /// Softmax backward along any axis; see
    /// [`Along::softmax_backward`](crate::Along::softmax_backward).
    ///
    /// # Errors
    /// As [`Along::softmax_backward`](crate::Along::softmax_backward).
    pub fn softmax_backward_along(
        &self,
        y: &[f32],
        grad_output: &[f32],
        layout: AxisLayout,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).softmax_backward(y, grad_output),
            Self::Cpu => fast::softmax_backward_along(y, grad_output, layout),
        }
    }

    /// [`Engine::softmax_backward_along`] into `out`.
    ///
    /// # Errors
    /// As [`Along::softmax_backward_into`](crate::Along::softmax_backward_into).
    pub fn softmax_backward_along_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        layout: AxisLayout,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).softmax_backward_into(y, grad_output, out),
            Self::Cpu => fast::softmax_backward_along_into(y, grad_output, layout, out),
        }
    }

    /// Log-softmax backward along any axis; see
    /// [`Along::log_softmax_backward`](crate::Along::log_softmax_backward).
    ///
    /// # Errors
    /// As [`Along::log_softmax_backward`](crate::Along::log_softmax_backward).
    pub fn log_softmax_backward_along(
        &self,
        y: &[f32],
        grad_output: &[f32],
        layout: AxisLayout,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).log_softmax_backward(y, grad_output),
            Self::Cpu => fast::log_softmax_backward_along(y, grad_output, layout),
        }
    }

    /// [`Engine::log_softmax_backward_along`] into `out`.
    ///
    /// # Errors
    /// As [`Along::log_softmax_backward_into`](crate::Along::log_softmax_backward_into).
    pub fn log_softmax_backward_along_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        layout: AxisLayout,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx
                .along(layout)
                .log_softmax_backward_into(y, grad_output, out),
            Self::Cpu => fast::log_softmax_backward_along_into(y, grad_output, layout, out),
        }
    }

    /// The gradient through softmax; see [`Context::softmax_backward`].
    ///
    /// # Errors
    /// As [`Context::softmax_backward`].
    pub fn softmax_backward(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.softmax_backward(y, grad_output, cols),
            Self::Cpu => fast::softmax_backward(y, grad_output, cols),
        }
    }

    /// [`Engine::softmax_backward`] into `out`; see [`Context::softmax_backward_into`].
    ///
    /// # Errors
    /// As [`Context::softmax_backward_into`].
    pub fn softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.softmax_backward_into(y, grad_output, cols, out),
            Self::Cpu => fast::softmax_backward_into(y, grad_output, cols, out),
        }
    }

    /// The gradient through log-softmax; see [`Context::log_softmax_backward`].
    ///
    /// # Errors
    /// As [`Context::log_softmax_backward`].
    pub fn log_softmax_backward(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.log_softmax_backward(y, grad_output, cols),
            Self::Cpu => fast::log_softmax_backward(y, grad_output, cols),
        }
    }

    /// [`Engine::log_softmax_backward`] into `out`; see [`Context::log_softmax_backward_into`].
    ///
    /// # Errors
    /// As [`Context::log_softmax_backward_into`].
    pub fn log_softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.log_softmax_backward_into(y, grad_output, cols, out),
            Self::Cpu => fast::log_softmax_backward_into(y, grad_output, cols, out),
        }
    }

    /// Per row, the `cols x cols` softmax Jacobian; see [`Context::softmax_jacobian`].
    ///
    /// # Errors
    /// As [`Context::softmax_jacobian`].
    pub fn softmax_jacobian(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.softmax_jacobian(x, cols),
            Self::Cpu => fast::softmax_jacobian(x, cols),
        }
    }

    /// [`Engine::softmax_jacobian`] into `out`; see [`Context::softmax_jacobian_into`].
    ///
    /// # Errors
    /// As [`Context::softmax_jacobian_into`].
    pub fn softmax_jacobian_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Gpu(ctx) => ctx.softmax_jacobian_into(x, cols, out),
            Self::Cpu => fast::softmax_jacobian_into(x, cols, out),
        }
    }

    /// The cross-entropy loss; see [`Context::cross_entropy`]. On the CPU,
    /// [`fast::cross_entropy_loss`].
    ///
    /// # Errors
    /// As [`Context::cross_entropy`].
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.cross_entropy(logits, cols, targets, options),
            Self::Cpu => fast::cross_entropy_loss(logits, cols, targets, options),
        }
    }

    /// Cross-entropy with the classes along `layout`'s axis; see
    /// [`Along::cross_entropy`](crate::Along::cross_entropy) and, on the CPU,
    /// [`fast::cross_entropy_loss_along`].
    ///
    /// # Errors
    /// As [`Along::cross_entropy`](crate::Along::cross_entropy).
    pub fn cross_entropy_along(
        &self,
        logits: &[f32],
        layout: AxisLayout,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => ctx.along(layout).cross_entropy(logits, targets, options),
            Self::Cpu => fast::cross_entropy_loss_along(logits, layout, targets, options),
        }
    }

    /// The loss and its fused gradient with the classes along `layout`'s axis; see
    /// [`Along::cross_entropy_with_grad`](crate::Along::cross_entropy_with_grad) and, on the
    /// CPU, [`fast::cross_entropy_along`].
    ///
    /// # Errors
    /// As [`Along::cross_entropy_with_grad`](crate::Along::cross_entropy_with_grad).
    pub fn cross_entropy_with_grad_along(
        &self,
        logits: &[f32],
        layout: AxisLayout,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        match self {
            Self::Gpu(ctx) => {
                ctx.along(layout)
                    .cross_entropy_with_grad(logits, targets, options, grad_output)
            }
            Self::Cpu => fast::cross_entropy_along(logits, layout, targets, options, grad_output),
        }
    }

    /// [`Engine::cross_entropy_with_grad_along`] writing the gradient into `grad`; returns the
    /// loss. See [`Along::cross_entropy_into`](crate::Along::cross_entropy_into).
    ///
    /// # Errors
    /// As [`Along::cross_entropy_into`](crate::Along::cross_entropy_into).
    pub fn cross_entropy_along_into(
        &self,
        logits: &[f32],
        layout: AxisLayout,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => {
                ctx.along(layout)
                    .cross_entropy_into(logits, targets, options, grad_output, grad)
            }
            Self::Cpu => {
                fast::cross_entropy_along_into(logits, layout, targets, options, grad_output, grad)
            }
        }
    }

    /// The loss and its fused gradient; see [`Context::cross_entropy_with_grad`].
    ///
    /// # Errors
    /// As [`Context::cross_entropy_with_grad`].
    pub fn cross_entropy_with_grad(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        match self {
            Self::Gpu(ctx) => {
                ctx.cross_entropy_with_grad(logits, cols, targets, options, grad_output)
            }
            Self::Cpu => fast::cross_entropy(logits, cols, targets, options, grad_output),
        }
    }

    /// [`Engine::cross_entropy_with_grad`] writing the gradient into `grad`; returns the loss.
    /// See [`Context::cross_entropy_into`].
    ///
    /// # Errors
    /// As [`Context::cross_entropy_into`].
    pub fn cross_entropy_into(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        match self {
            Self::Gpu(ctx) => {
                ctx.cross_entropy_into(logits, cols, targets, options, grad_output, grad)
            }
            Self::Cpu => {
                fast::cross_entropy_into(logits, cols, targets, options, grad_output, grad)
            }
        }
    }
}

impl From<Context> for Engine {
    fn from(ctx: Context) -> Self {
        Self::Gpu(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::options::Reduction;
    use crate::tolerance::Tolerance;

    fn no_backends() -> ContextOptions {
        ContextOptions {
            backends: Some(wgpu::Backends::empty()),
            // An empty name searches by type, whatever WGPU_ADAPTER_NAME says.
            adapter_name: Some(String::new()),
            tuning: None,
        }
    }

    #[test]
    fn no_adapter_gives_the_cpu() {
        let engine = pollster::block_on(Engine::with_options(no_backends())).unwrap();
        assert!(matches!(engine, Engine::Cpu), "{engine:?}");
        assert!(engine.context().is_none());
        assert!(
            engine.describe().starts_with("CPU f32 path ("),
            "{}",
            engine.describe()
        );
    }

    #[test]
    fn other_context_errors_stay_errors() {
        let named = ContextOptions {
            adapter_name: Some("no adapter is called this".into()),
            ..no_backends()
        };
        let error = pollster::block_on(Engine::with_options(named)).unwrap_err();
        assert!(matches!(error, Error::AdapterNotFound { .. }), "{error:?}");
        let limit = Error::InsufficientLimit {
            limit: "max_storage_buffers_per_shader_stage",
            needed: 8,
            actual: 4,
        };
        assert!(matches!(
            Engine::or_cpu(Err(limit)),
            Err(Error::InsufficientLimit { .. })
        ));
    }

    /// Every operation on the CPU engine is the CPU path's, bit for bit, errors included.
    #[test]
    fn cpu_engine_runs_the_cpu_path() {
        let engine = Engine::Cpu;
        let cols = 37;
        let x: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 9.0 - 5.0)
            .collect();
        let dy: Vec<f32> = (0..5 * cols)
            .map(|i| ((i * 104_729) % 89) as f32 / 30.0 - 1.5)
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&engine.softmax(&x, cols).unwrap()),
            bits(&fast::softmax(&x, cols).unwrap())
        );
        assert_eq!(
            bits(&engine.log_softmax(&x, cols).unwrap()),
            bits(&fast::log_softmax(&x, cols).unwrap())
        );
        let y = fast::softmax(&x, cols).unwrap();
        assert_eq!(
            bits(&engine.softmax_backward(&y, &dy, cols).unwrap()),
            bits(&fast::softmax_backward(&y, &dy, cols).unwrap())
        );
        assert_eq!(
            bits(&engine.log_softmax_backward(&y, &dy, cols).unwrap()),
            bits(&fast::log_softmax_backward(&y, &dy, cols).unwrap())
        );
        assert_eq!(
            bits(&engine.softmax_jacobian(&x, cols).unwrap()),
            bits(&fast::softmax_jacobian(&x, cols).unwrap())
        );
        let targets = [3i64, -100, 36, 0, 5];
        for reduction in [Reduction::None, Reduction::Mean, Reduction::Sum] {
            let options = CrossEntropyOptions {
                reduction,
                label_smoothing: 0.1,
                ..Default::default()
            };
            let loss = engine
                .cross_entropy(&x, cols, Targets::Indices(&targets), &options)
                .unwrap();
            let want = reference::cross_entropy(
                &x,
                cols,
                Targets::Indices(&targets),
                &options,
                GradOutput::One,
            )
            .unwrap();
            // The accuracy table's bound for the loss.
            let tolerance = Tolerance {
                abs: 1e-5,
                rel: 2e-5,
            };
            let cmp = tolerance.compare(&loss, &want.loss);
            assert!(cmp.passed(), "{reduction:?}: {cmp:?}");
            let grad_output = match reduction {
                Reduction::None => GradOutput::PerRow(&[1.0, 2.0, 0.5, -1.0, 3.0]),
                _ => GradOutput::Scalar(0.25),
            };
            let got = engine
                .cross_entropy_with_grad(
                    &x,
                    cols,
                    Targets::Indices(&targets),
                    &options,
                    grad_output,
                )
                .unwrap();
            let fast =
                fast::cross_entropy(&x, cols, Targets::Indices(&targets), &options, grad_output)
                    .unwrap();
            assert_eq!(bits(&got.loss), bits(&fast.loss), "{reduction:?}");
            assert_eq!(bits(&got.grad), bits(&fast.grad), "{reduction:?}");
        }
        // The `_into` forms are the CPU path's too.
        let mut out = vec![f32::NAN; x.len()];
        engine.softmax_into(&x, cols, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&fast::softmax(&x, cols).unwrap()));
        engine.log_softmax_into(&x, cols, &mut out).unwrap();
        assert_eq!(bits(&out), bits(&fast::log_softmax(&x, cols).unwrap()));
        engine
            .softmax_backward_into(&y, &dy, cols, &mut out)
            .unwrap();
        let want = fast::softmax_backward(&y, &dy, cols).unwrap();
        assert_eq!(bits(&out), bits(&want));
        engine
            .log_softmax_backward_into(&y, &dy, cols, &mut out)
            .unwrap();
        let want = fast::log_softmax_backward(&y, &dy, cols).unwrap();
        assert_eq!(bits(&out), bits(&want));
        let mut jac = vec![f32::NAN; 5 * cols * cols];
        engine.softmax_jacobian_into(&x, cols, &mut jac).unwrap();
        assert_eq!(bits(&jac), bits(&fast::softmax_jacobian(&x, cols).unwrap()));
        let options = CrossEntropyOptions::default();
        let indices = Targets::Indices(&targets);
        let loss = engine
            .cross_entropy_into(&x, cols, indices, &options, GradOutput::One, &mut out)
            .unwrap();
        let want = fast::cross_entropy(&x, cols, indices, &options, GradOutput::One).unwrap();
        assert_eq!(bits(&loss), bits(&want.loss));
        assert_eq!(bits(&out), bits(&want.grad));
        assert!(matches!(
            engine.softmax_into(&x, cols, &mut out[1..]),
            Err(Error::LengthMismatch { what: "out", .. })
        ));
        assert!(matches!(engine.softmax(&x, 0), Err(Error::ZeroCols)));
        assert!(matches!(
            engine.softmax_backward(&y, &dy[1..], cols),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            engine.cross_entropy(
                &x,
                cols,
                Targets::Indices(&[0, 1, 2, 3, 37]),
                &Default::default()
            ),
            Err(Error::TargetOutOfRange { row: 4, .. })
        ));
    }
}
