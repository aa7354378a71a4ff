//! The softmax-family ops along any axis of a tensor: [`Context::along`].

use crate::context::{Context, Wait};
use crate::error::Result;
use crate::kernels::Normalization;
use crate::layout::AxisLayout;
use crate::region::BufferRegion;
use crate::validate;

/// Softmax, log-softmax and their backward along one axis of a row-major tensor of any rank,
/// such as the classes of `[N, C, H, W]`: made by [`Context::along`].
///
/// Every form of the row ops is here (host slices, blocking, `_into` and async, and `encode_*`
/// on the caller's buffers or regions of them), with the same semantics, special values and
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
    /// The softmax-family ops along `layout`'s axis ([`Along`]).
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
