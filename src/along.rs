//! The softmax-family ops along any axis of a tensor: [`Context::along`].

use crate::context::{Context, Wait};
use crate::cpu::CrossEntropyOutput;
use crate::error::Result;
use crate::kernels::Normalization;
use crate::layout::AxisLayout;
use crate::ops::{record_normalize, Tensor};
use crate::options::{CrossEntropyOptions, GradOutput, Targets};
use crate::region::BufferRegion;
use crate::training::{record_backward, submit};
use crate::validate;

/// Softmax, log-softmax, their backward and cross-entropy along one axis of a row-major tensor
/// of any rank, such as the classes of `[N, C, H, W]`: made by [`Context::along`].
///
/// Every form of the row ops is here (host slices, blocking, `_into` and async, and `encode_*`
/// on the caller's buffers or regions of them; on tensors that stay on the device,
/// [`Tensor::softmax_along`] and the others), with the same semantics, special values and
/// accuracy, each line along the axis taking the place of a row. The last axis runs the row
/// kernels; any other runs kernels that read the lines in place, neighbouring invocations
/// taking neighbouring lines so that memory is read in contiguous runs: no transpose, on the
/// host or on the device.
///
/// ```no_run
/// use wgpu_softmax::{AxisLayout, Context};
/// let ctx = Context::new_blocking()?;
/// let (n, c, h, w) = (2, 21, 16, 16);
/// let logits = vec![0.5f32; n * c * h * w];
/// let probs = ctx.along(AxisLayout::new(&[n, c, h, w], 1)?).softmax(&logits)?;
/// assert!((probs[0] - 1.0 / 21.0).abs() < 1e-6);
/// # Ok::<(), wgpu_softmax::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Along<'a> {
    ctx: &'a Context,
    layout: AxisLayout,
}

impl Context {
    /// The softmax-family ops and cross-entropy along `layout`'s axis ([`Along`]).
    pub fn along(&self, layout: AxisLayout) -> Along<'_> {
        Along { ctx: self, layout }
    }
}

impl Along<'_> {
    /// The layout the ops run over.
    pub fn layout(&self) -> AxisLayout {
        self.layout
    }

    /// Softmax of every line along the axis; see [`Context::softmax`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `input` unless `x` holds
    /// the layout's elements, [`Error::SlabTooLarge`](crate::Error::SlabTooLarge) when one
    /// outer slab exceeds a storage binding, and device errors.
    pub fn softmax(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        pollster::block_on(self.forward(Normalization::Softmax, x, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Along::softmax`] into `out`, which must be as long as `x`.
    ///
    /// # Errors
    /// As [`Along::softmax`], and [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming
    /// `out`; `out` is untouched when the arguments are refused.
    pub fn softmax_into(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        pollster::block_on(self.forward(Normalization::Softmax, x, out, Wait::Block))
    }

    /// Async form of [`Along::softmax`].
    pub async fn softmax_async(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        self.forward(Normalization::Softmax, x, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Log-softmax of every line along the axis; see [`Context::log_softmax`].
    ///
    /// # Errors
    /// As [`Along::softmax`].
    pub fn log_softmax(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        pollster::block_on(self.forward(Normalization::LogSoftmax, x, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Along::log_softmax`] into `out`, which must be as long as `x`.
    ///
    /// # Errors
    /// As [`Along::softmax_into`].
    pub fn log_softmax_into(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        pollster::block_on(self.forward(Normalization::LogSoftmax, x, out, Wait::Block))
    }

    /// Async form of [`Along::log_softmax`].
    pub async fn log_softmax_async(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        self.forward(Normalization::LogSoftmax, x, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Softmax backward along the axis, from `y = softmax(x)` and `grad_output = dL/dy`; see
    /// [`Context::softmax_backward`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `y` or `grad_output`
    /// unless each holds the layout's elements, and as [`Along::softmax`].
    pub fn softmax_backward(&self, y: &[f32], grad_output: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::Softmax;
        pollster::block_on(self.backward(op, [y, grad_output], &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Along::softmax_backward`] into `out`, which must be as long as `y`.
    ///
    /// # Errors
    /// As [`Along::softmax_backward`], and
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `out`.
    pub fn softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let op = Normalization::Softmax;
        pollster::block_on(self.backward(op, [y, grad_output], out, Wait::Block))
    }

    /// Async form of [`Along::softmax_backward`].
    pub async fn softmax_backward_async(&self, y: &[f32], grad_output: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::Softmax;
        self.backward(op, [y, grad_output], &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Log-softmax backward along the axis; see [`Context::log_softmax_backward`].
    ///
    /// # Errors
    /// As [`Along::softmax_backward`].
    pub fn log_softmax_backward(&self, y: &[f32], grad_output: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.backward(op, [y, grad_output], &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Along::log_softmax_backward`] into `out`, which must be as long as `y`.
    ///
    /// # Errors
    /// As [`Along::softmax_backward_into`].
    pub fn log_softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.backward(op, [y, grad_output], out, Wait::Block))
    }

    /// Async form of [`Along::log_softmax_backward`].
    pub async fn log_softmax_backward_async(
        &self,
        y: &[f32],
        grad_output: &[f32],
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::LogSoftmax;
        self.backward(op, [y, grad_output], &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Records `output = softmax(input)` along the axis into the caller's `encoder`; see
    /// [`Context::encode_softmax`].
    ///
    /// # Errors
    /// As [`Context::encode_softmax`], with [`Error::SlabTooLarge`](crate::Error::SlabTooLarge)
    /// where it has [`Error::RowTooLong`](crate::Error::RowTooLong).
    pub fn encode_softmax<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: impl Into<BufferRegion<'a>>,
        output: impl Into<BufferRegion<'a>>,
    ) -> Result<()> {
        let regions = [input.into(), output.into()];
        let op = Normalization::Softmax;
        self.ctx
            .encode_normalize_along(op, encoder, regions, self.layout)
    }

    /// Records `output = log_softmax(input)` along the axis; see [`Along::encode_softmax`].
    ///
    /// # Errors
    /// As [`Along::encode_softmax`].
    pub fn encode_log_softmax<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: impl Into<BufferRegion<'a>>,
        output: impl Into<BufferRegion<'a>>,
    ) -> Result<()> {
        let regions = [input.into(), output.into()];
        let op = Normalization::LogSoftmax;
        self.ctx
            .encode_normalize_along(op, encoder, regions, self.layout)
    }

    /// Records `grad_input = softmax_backward(y, grad_output)` along the axis; see
    /// [`Context::encode_softmax_backward`].
    ///
    /// # Errors
    /// As [`Context::encode_softmax_backward`], with
    /// [`Error::SlabTooLarge`](crate::Error::SlabTooLarge) where it has
    /// [`Error::RowTooLong`](crate::Error::RowTooLong).
    pub fn encode_softmax_backward<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        y: impl Into<BufferRegion<'a>>,
        grad_output: impl Into<BufferRegion<'a>>,
        grad_input: impl Into<BufferRegion<'a>>,
    ) -> Result<()> {
        let regions = [y.into(), grad_output.into(), grad_input.into()];
        let op = Normalization::Softmax;
        self.ctx
            .encode_backward_along(op, encoder, regions, self.layout)
    }

    /// Records `grad_input = log_softmax_backward(y, grad_output)` along the axis; see
    /// [`Along::encode_softmax_backward`].
    ///
    /// # Errors
    /// As [`Along::encode_softmax_backward`].
    pub fn encode_log_softmax_backward<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        y: impl Into<BufferRegion<'a>>,
        grad_output: impl Into<BufferRegion<'a>>,
        grad_input: impl Into<BufferRegion<'a>>,
    ) -> Result<()> {
        let regions = [y.into(), grad_output.into(), grad_input.into()];
        let op = Normalization::LogSoftmax;
        self.ctx
            .encode_backward_along(op, encoder, regions, self.layout)
    }

    /// The cross-entropy loss with the classes along the axis (`C = layout.len()`), as PyTorch's
    /// `F.cross_entropy` over logits `[N, C, d1, ...]` with the classes on axis 1: one value for
    /// `Mean` and `Sum`, one per line for `None` (`N d1 ...`, row-major over the other axes).
    /// Index targets hold one class per line in that order; probability targets are shaped like
    /// the logits. Lines are read in place on the GPU (no transpose), an invocation per line;
    /// otherwise as [`Context::cross_entropy`], whose errors' "row" is here a line. Where the
    /// lines are few and long, or longer than a software adapter lets one invocation loop over,
    /// each is cut into chunks, a partials pass and a finishing pass, as rows are.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `logits` unless it holds
    /// the layout's elements, and as [`Context::cross_entropy`];
    /// [`Error::SlabTooLarge`](crate::Error::SlabTooLarge) when one outer slab exceeds a storage
    /// binding.
    ///
    /// ```no_run
    /// use wgpu_softmax::{AxisLayout, Context, CrossEntropyOptions, GradOutput, Targets};
    /// let ctx = Context::new_blocking()?;
    /// // Two images of 3 classes over 2x2 pixels, and a class per pixel.
    /// let along = ctx.along(AxisLayout::new(&[2, 3, 2, 2], 1)?);
    /// let logits = vec![0.25f32; 2 * 3 * 2 * 2];
    /// let targets = [0i64, 1, 2, 0, 1, 1, 2, 2];
    /// let out = along.cross_entropy_with_grad(&logits, Targets::Indices(&targets),
    ///     &CrossEntropyOptions::default(), GradOutput::One)?;
    /// assert!((out.loss[0] - 3f32.ln()).abs() < 1e-6);
    /// # Ok::<(), wgpu_softmax::Error>(())
    /// ```
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.host_cross_entropy(logits, targets, options, None, Wait::Block))
    }

    /// Async form of [`Along::cross_entropy`].
    pub async fn cross_entropy_async(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        self.host_cross_entropy(logits, targets, options, None, Wait::Background)
            .await
    }

    /// The loss and, in the same kernel, `dLoss/dLogits * grad_output`, shaped like the logits;
    /// see [`Context::cross_entropy_with_grad`]. `grad_output` is a scalar for `Mean` and
    /// `Sum`, one value per line for `None`.
    ///
    /// # Errors
    /// As [`Along::cross_entropy`], and [`Error::LengthMismatch`](crate::Error::LengthMismatch)
    /// for a `grad_output` of the wrong shape.
    pub fn cross_entropy_with_grad(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        let mut grad = vec![0f32; logits.len()];
        let loss = self.cross_entropy_into(logits, targets, options, grad_output, &mut grad)?;
        Ok(CrossEntropyOutput { loss, grad })
    }

    /// [`Along::cross_entropy_with_grad`] writing the gradient into `grad` (as long as
    /// `logits`); returns the loss.
    ///
    /// # Errors
    /// As [`Along::cross_entropy_with_grad`], and
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `grad`; `grad` is
    /// untouched when the arguments are refused.
    pub fn cross_entropy_into(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        let grad = Some((grad_output, grad));
        pollster::block_on(self.host_cross_entropy(logits, targets, options, grad, Wait::Block))
    }

    /// Async form of [`Along::cross_entropy_with_grad`].
    pub async fn cross_entropy_with_grad_async(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        let mut grad = vec![0f32; logits.len()];
        let loss = self
            .host_cross_entropy(
                logits,
                targets,
                options,
                Some((grad_output, &mut grad)),
                Wait::Background,
            )
            .await?;
        Ok(CrossEntropyOutput { loss, grad })
    }

    async fn host_cross_entropy(
        &self,
        logits: &[f32],
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad: Option<(GradOutput<'_>, &mut [f32])>,
        wait: Wait,
    ) -> Result<Vec<f32>> {
        let layout = self.layout;
        validate::same_len("logits", layout.numel(), logits.len())?;
        self.ctx
            .host_cross_entropy(
                logits,
                layout.len(),
                layout.inner(),
                targets,
                options,
                grad,
                wait,
            )
            .await
    }

    async fn forward(
        &self,
        op: Normalization,
        x: &[f32],
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        validate::same_len("input", self.layout.numel(), x.len())?;
        self.ctx.host_normalize(op, x, self.layout, out, wait).await
    }

    async fn backward(
        &self,
        op: Normalization,
        [y, grad_output]: [&[f32]; 2],
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        validate::same_len("y", self.layout.numel(), y.len())?;
        self.ctx
            .host_backward_along(op, [y, grad_output], self.layout, out, wait)
            .await
    }
}

/// The softmax-family ops along an axis on tensors that stay on the device, as the row ops'
/// tensor forms ([`Tensor::softmax`] and the others) are to rows: a tensor's elements are seen
/// as `layout`, whatever rows and columns it was made with, and the result has the input's rows
/// and columns.
///
/// ```no_run
/// use wgpu_softmax::{AxisLayout, Context};
/// let ctx = Context::new_blocking()?;
/// let (n, c, h, w) = (2, 21, 16, 16);
/// let classes = AxisLayout::new(&[n, c, h, w], 1)?;
/// let logits = ctx.upload(&vec![0.5f32; n * c * h * w], w)?; // any rows x cols of n c h w
/// let probs = logits.softmax_along(classes)?; // stays on the GPU
/// let grad = probs.softmax_backward_along(&ctx.upload(&vec![1.0; n * c * h * w], w)?, classes)?;
/// assert!(grad.to_vec()?.iter().all(|g| g.abs() < 1e-6));
/// # Ok::<(), wgpu_softmax::Error>(())
/// ```
impl Tensor {
    /// Softmax of every line along `layout`'s axis, into a new tensor; see [`Along::softmax`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `input` unless the
    /// tensor holds the layout's elements, [`Error::SlabTooLarge`](crate::Error::SlabTooLarge)
    /// when one outer slab exceeds a storage binding, and device errors.
    pub fn softmax_along(&self, layout: AxisLayout) -> Result<Tensor> {
        self.normalize_along(Normalization::Softmax, layout)
    }

    /// Log-softmax of every line along `layout`'s axis, into a new tensor; see
    /// [`Along::log_softmax`].
    ///
    /// # Errors
    /// As [`Tensor::softmax_along`].
    pub fn log_softmax_along(&self, layout: AxisLayout) -> Result<Tensor> {
        self.normalize_along(Normalization::LogSoftmax, layout)
    }

    /// Softmax backward along `layout`'s axis with `self` as `y = softmax(x)`: `dL/dx` for
    /// `grad_output = dL/dy`, into a new tensor; see [`Along::softmax_backward`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `y` or `grad_output`
    /// unless each holds the layout's elements, and otherwise as [`Tensor::softmax_along`].
    pub fn softmax_backward_along(
        &self,
        grad_output: &Tensor,
        layout: AxisLayout,
    ) -> Result<Tensor> {
        self.backward_along(Normalization::Softmax, grad_output, layout)
    }

    /// Log-softmax backward along `layout`'s axis with `self` as `y = log_softmax(x)`; see
    /// [`Along::log_softmax_backward`].
    ///
    /// # Errors
    /// As [`Tensor::softmax_backward_along`].
    pub fn log_softmax_backward_along(
        &self,
        grad_output: &Tensor,
        layout: AxisLayout,
    ) -> Result<Tensor> {
        self.backward_along(Normalization::LogSoftmax, grad_output, layout)
    }

    fn normalize_along(&self, op: Normalization, layout: AxisLayout) -> Result<Tensor> {
        validate::same_len("input", layout.numel(), self.len())?;
        let out = self.ctx.empty(self.rows, self.cols)?;
        let gpu = &self.ctx.gpu;
        gpu.scoped(|| {
            let regions = [self.into(), (&out).into()];
            submit(gpu, |encoder| {
                record_normalize(gpu, encoder, op, regions, layout, None)
            })
        })?;
        Ok(out)
    }

    fn backward_along(
        &self,
        op: Normalization,
        grad_output: &Tensor,
        layout: AxisLayout,
    ) -> Result<Tensor> {
        validate::same_len("y", layout.numel(), self.len())?;
        validate::same_len("grad_output", layout.numel(), grad_output.len())?;
        let out = self.ctx.empty(self.rows, self.cols)?;
        let gpu = &self.ctx.gpu;
        gpu.scoped(|| {
            let regions = [self.into(), grad_output.into(), (&out).into()];
            submit(gpu, |encoder| {
                record_backward(gpu, encoder, op, regions, layout, None)
            })
        })?;
        Ok(out)
    }
}
