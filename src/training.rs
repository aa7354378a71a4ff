//! Training-side operations: softmax and log-softmax backward, the softmax Jacobian, and
//! cross-entropy with its fused gradient, in host-slice, device-resident and encode forms.

use std::sync::Mutex;

use crate::context::{cached_buffer, Context, Gpu, Wait};
use crate::cpu::CrossEntropyOutput;
use crate::error::{Error, Result};
use crate::kernels::axis::{AxisCall, AxisOp};
use crate::kernels::rowwise::{Operand, RowCall};
use crate::kernels::{Normalization, Timestamps};
use crate::layout::AxisLayout;
use crate::ops::{
    host_blocks, host_slab_blocks, layout_bytes, matrix_bytes, Tensor, TENSOR_USAGES,
};
use crate::options::{CrossEntropyOptions, GradOutput, Reduction, Targets};
use crate::region::{check_not_aliased, validate_encode, validate_region, BufferRegion};
use crate::validate::{self, CrossEntropyTargets, UpstreamGrad, IGNORED_ROW};

// ------------------------------------------------------------------------------------------------
// Softmax backward

impl Context {
    /// Backward of softmax: from `y = softmax(x)` and `grad_output = dL/dy`, returns
    /// `dL/dx = y * (dy - sum_k dy_k * y_k)` per row.
    ///
    /// # Errors
    /// [`Error::ZeroCols`], [`Error::LengthNotMultiple`], [`Error::LengthMismatch`] when
    /// `grad_output` is not shaped like `y`, and device errors.
    pub fn softmax_backward(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::Softmax;
        pollster::block_on(self.host_backward(op, y, grad_output, cols, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Context::softmax_backward`] into `out`, which must be as long as `y`.
    ///
    /// # Errors
    /// As [`Context::softmax_backward`], and [`Error::LengthMismatch`] naming `out`; `out` is
    /// untouched when the arguments are refused.
    pub fn softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let op = Normalization::Softmax;
        pollster::block_on(self.host_backward(op, y, grad_output, cols, out, Wait::Block))
    }

    /// Async form of [`Context::softmax_backward`].
    pub async fn softmax_backward_async(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::Softmax;
        self.host_backward(op, y, grad_output, cols, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Backward of log-softmax: from `y = log_softmax(x)` and `grad_output = dL/dy`, returns
    /// `dL/dx = dy - exp(y) * sum_k dy_k` per row.
    ///
    /// # Errors
    /// As [`Context::softmax_backward`].
    pub fn log_softmax_backward(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.host_backward(op, y, grad_output, cols, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Context::log_softmax_backward`] into `out`, which must be as long as `y`.
    ///
    /// # Errors
    /// As [`Context::softmax_backward_into`].
    pub fn log_softmax_backward_into(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.host_backward(op, y, grad_output, cols, out, Wait::Block))
    }

    /// Async form of [`Context::log_softmax_backward`].
    pub async fn log_softmax_backward_async(
        &self,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; y.len()];
        let op = Normalization::LogSoftmax;
        self.host_backward(op, y, grad_output, cols, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    async fn host_backward(
        &self,
        op: Normalization,
        y: &[f32],
        grad_output: &[f32],
        cols: usize,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        let rows = validate::batch_rows("y", y.len(), cols)?;
        let layout = AxisLayout::rows(rows, cols)?;
        self.host_backward_along(op, [y, grad_output], layout, out, wait)
            .await
    }

    /// The host forms of the backward ops over `layout`, whose element count `y` has been
    /// checked to hold.
    pub(crate) async fn host_backward_along(
        &self,
        op: Normalization,
        [y, grad_output]: [&[f32]; 2],
        layout: AxisLayout,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        validate::same_len("grad_output", y.len(), grad_output.len())?;
        validate::same_len("out", y.len(), out.len())?;
        let gpu = &self.gpu;
        gpu.check_alive()?;
        if layout.is_empty() {
            return Ok(());
        }
        // Blocks of rows (or outer slabs), like the forward host forms, so a batch larger than
        // one binding or one buffer still runs.
        let slab = layout.slab();
        let blocks = host_slab_blocks(gpu, layout)?;
        let bytes = (blocks[0].1 * slab * 4) as u64;
        // Pooled staging buffers, shared with the forward host forms.
        let mut scratch = self.take_scratch(bytes)?;
        let dy_buf = gpu.scoped(|| Ok(scratch.second_input(&gpu.device)))?;
        let (y_buf, dx_buf, readback) = (&scratch.input, &scratch.output, &scratch.readback);
        for (first, n) in blocks {
            let range = first * slab..(first + n) * slab;
            let block = AxisLayout::from_parts(n, layout.len(), layout.inner())?;
            let submission = gpu.scoped(|| {
                gpu.queue
                    .write_buffer(y_buf, 0, bytemuck::cast_slice(&y[range.clone()]));
                gpu.queue.write_buffer(
                    &dy_buf,
                    0,
                    bytemuck::cast_slice(&grad_output[range.clone()]),
                );
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                let regions = [y_buf, &dy_buf, dx_buf].map(Into::into);
                record_backward(gpu, &mut encoder, op, regions, block, None)?;
                encoder.copy_buffer_to_buffer(dx_buf, 0, readback, 0, (range.len() * 4) as u64);
                Ok(gpu.queue.submit([encoder.finish()]))
            })?;
            gpu.read_mapped(readback, submission, &mut out[range], wait)
                .await?;
        }
        self.give_scratch(scratch);
        Ok(())
    }

    /// Records `grad_input = softmax_backward(y, grad_output)` for `rows x cols` into the caller's
    /// `encoder`. All three buffers need `STORAGE`; `grad_input` must differ from the others.
    /// Each is a whole buffer or a region of one ([`BufferRegion`]); `y` and `grad_output` may
    /// be regions of one buffer.
    ///
    /// # Errors
    /// [`Error::MissingUsage`], [`Error::BufferTooSmall`], [`Error::Misaligned`],
    /// [`Error::Aliased`], [`Error::ZeroCols`], [`Error::RowTooLong`].
    pub fn encode_softmax_backward<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        y: impl Into<BufferRegion<'a>>,
        grad_output: impl Into<BufferRegion<'a>>,
        grad_input: impl Into<BufferRegion<'a>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let regions = [y.into(), grad_output.into(), grad_input.into()];
        self.encode_backward(Normalization::Softmax, encoder, regions, rows, cols)
    }

    /// Records `grad_input = log_softmax_backward(y, grad_output)`; see
    /// [`Context::encode_softmax_backward`].
    ///
    /// # Errors
    /// As [`Context::encode_softmax_backward`].
    pub fn encode_log_softmax_backward<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        y: impl Into<BufferRegion<'a>>,
        grad_output: impl Into<BufferRegion<'a>>,
        grad_input: impl Into<BufferRegion<'a>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let regions = [y.into(), grad_output.into(), grad_input.into()];
        self.encode_backward(Normalization::LogSoftmax, encoder, regions, rows, cols)
    }

    fn encode_backward(
        &self,
        op: Normalization,
        encoder: &mut wgpu::CommandEncoder,
        [y, dy, dx]: [BufferRegion<'_>; 3],
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if cols == 0 {
            return Err(Error::ZeroCols);
        }
        let bytes = matrix_bytes(rows, cols);
        validate_encode(
            &[("y", y, bytes), ("grad_output", dy, bytes)],
            ("grad_input", dx, bytes),
        )?;
        // The regions hold the shape's bytes, so its element count fits.
        let layout = AxisLayout::rows(rows, cols)?;
        let gpu = &self.gpu;
        gpu.scoped(|| record_backward(gpu, encoder, op, [y, dy, dx], layout, None))
    }

    /// [`Context::encode_softmax_backward`] and the log form along any axis.
    pub(crate) fn encode_backward_along(
        &self,
        op: Normalization,
        encoder: &mut wgpu::CommandEncoder,
        [y, dy, dx]: [BufferRegion<'_>; 3],
        layout: AxisLayout,
    ) -> Result<()> {
        let bytes = layout_bytes(layout);
        validate_encode(
            &[("y", y, bytes), ("grad_output", dy, bytes)],
            ("grad_input", dx, bytes),
        )?;
        let gpu = &self.gpu;
        gpu.scoped(|| record_backward(gpu, encoder, op, [y, dy, dx], layout, None))
    }
}

/// Records `dx = backward(y, dy)` over `layout` on validated regions: the row-wise kernels where
/// the axis is the last, the kernels along an axis otherwise.
pub(crate) fn record_backward(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    op: Normalization,
    [y, dy, dx]: [BufferRegion<'_>; 3],
    layout: AxisLayout,
    timestamps: Option<Timestamps<'_>>,
) -> Result<()> {
    if layout.inner() == 1 {
        let call = backward_call(op, [y, dy, dx], layout.outer(), layout.len());
        return gpu.kernels.backward.encode(gpu, encoder, &call, timestamps);
    }
    let call = AxisCall {
        op: AxisOp::Backward(op),
        layout,
        input: y,
        grad: Some(dy),
        output: dx,
    };
    gpu.kernels.axis.encode(gpu, encoder, &call, timestamps)
}

pub(crate) fn backward_call<'a>(
    op: Normalization,
    [y, dy, dx]: [BufferRegion<'a>; 3],
    rows: usize,
    cols: usize,
) -> RowCall<'a> {
    RowCall {
        rows,
        cols,
        inner: 1,
        operands: vec![y.rows(cols), dy.rows(cols), dx.rows(cols)],
        constants: vec![op.constant()],
        words: [0; 4],
        extra: 0,
        tally: false,
    }
}

impl Tensor {
    /// Softmax backward with `self` as `y = softmax(x)`: returns `dL/dx` for `grad_output = dL/dy`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `grad_output` is shaped differently, and device errors.
    pub fn softmax_backward(&self, grad_output: &Tensor) -> Result<Tensor> {
        self.backward(Normalization::Softmax, grad_output)
    }

    /// Log-softmax backward with `self` as `y = log_softmax(x)`.
    ///
    /// # Errors
    /// As [`Tensor::softmax_backward`].
    pub fn log_softmax_backward(&self, grad_output: &Tensor) -> Result<Tensor> {
        self.backward(Normalization::LogSoftmax, grad_output)
    }

    fn backward(&self, op: Normalization, grad_output: &Tensor) -> Result<Tensor> {
        validate::same_len("grad_output", self.len(), grad_output.len())?;
        validate::same_len("grad_output cols", self.cols, grad_output.cols)?;
        let ctx = &self.ctx;
        let out = ctx.empty(self.rows, self.cols)?;
        let gpu = &ctx.gpu;
        gpu.scoped(|| {
            let tensors = [self, grad_output, &out].map(Into::into);
            let call = backward_call(op, tensors, self.rows, self.cols);
            submit(gpu, |encoder| {
                gpu.kernels.backward.encode(gpu, encoder, &call, None)
            })
        })?;
        Ok(out)
    }

    /// The softmax Jacobian of every row: a `rows x (cols * cols)` tensor whose row `r` is the
    /// row-major `C x C` matrix `J_ij = s_i (delta_ij - s_j)`, `s = softmax(x_r)`.
    ///
    /// # Errors
    /// [`Error::JacobianTooWide`] above [`JACOBIAN_MAX_COLS`](crate::cpu::JACOBIAN_MAX_COLS)
    /// classes, and device errors.
    pub fn softmax_jacobian(&self) -> Result<Tensor> {
        validate::jacobian_rows("x", self.len(), self.cols)?;
        let ctx = &self.ctx;
        let out = ctx.empty(self.rows, self.cols * self.cols)?;
        let gpu = &ctx.gpu;
        gpu.scoped(|| {
            submit(gpu, |encoder| {
                let (x, out) = (self.into(), (&out).into());
                encode_jacobian(gpu, encoder, x, out, self.rows, self.cols)
            })
        })?;
        Ok(out)
    }
}

/// Records the softmax of `x` into the context's probabilities buffer, then the Jacobian blocks
/// from it.
fn encode_jacobian(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    x: BufferRegion<'_>,
    out: BufferRegion<'_>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let bytes = matrix_bytes(rows, cols);
    let probs = cached_buffer(&gpu.device, &gpu.jacobian_probabilities, bytes, || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wgpu-softmax jacobian probabilities"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    })?;
    let softmax = crate::ops::normalize_call(
        Normalization::Softmax,
        x.rows(cols),
        Operand::matrix(&probs, cols),
        rows,
        cols,
    );
    gpu.kernels.softmax.encode(gpu, encoder, &softmax, None)?;
    let call = RowCall {
        rows,
        cols,
        inner: 1,
        operands: vec![Operand::matrix(&probs, cols), out.rows(cols * cols)],
        constants: Vec::new(),
        words: [0; 4],
        extra: 0,
        tally: false,
    };
    gpu.kernels.jacobian.encode(gpu, encoder, &call, None)
}

/// The length of the Jacobians of a batch of `len` values in rows of `cols`, once the batch has
/// been checked (its errors are the host forms').
fn jacobian_len(len: usize, cols: usize) -> Result<usize> {
    Ok(validate::jacobian_rows("x", len, cols)? * cols * cols)
}

impl Context {
    /// The softmax Jacobian of every row of `x`: `rows * cols * cols` values, row `r`'s `C x C`
    /// matrix `J_ij = s_i (delta_ij - s_j)` row-major. For small class counts only.
    ///
    /// # Errors
    /// [`Error::JacobianTooWide`] above [`JACOBIAN_MAX_COLS`](crate::cpu::JACOBIAN_MAX_COLS)
    /// classes, shape errors as for [`Context::softmax`], and device errors.
    pub fn softmax_jacobian(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; jacobian_len(x.len(), cols)?];
        pollster::block_on(self.host_jacobian(x, cols, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Context::softmax_jacobian`] into `out`, which must hold `rows * cols * cols` values.
    ///
    /// # Errors
    /// As [`Context::softmax_jacobian`], and [`Error::LengthMismatch`] naming `out`; `out` is
    /// untouched when the arguments are refused.
    pub fn softmax_jacobian_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        pollster::block_on(self.host_jacobian(x, cols, out, Wait::Block))
    }

    /// Async form of [`Context::softmax_jacobian`].
    pub async fn softmax_jacobian_async(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; jacobian_len(x.len(), cols)?];
        self.host_jacobian(x, cols, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// The host forms of the Jacobian, in row blocks whose output fits the staging size (or one
    /// binding, for a single row), so that the result may exceed any one GPU buffer.
    async fn host_jacobian(
        &self,
        x: &[f32],
        cols: usize,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        let rows = validate::jacobian_rows("x", x.len(), cols)?;
        let out_cols = cols * cols;
        validate::same_len("out", rows * out_cols, out.len())?;
        let gpu = &self.gpu;
        gpu.check_alive()?;
        if rows == 0 {
            return Ok(());
        }
        let blocks = host_blocks(gpu, rows, out_cols)?;
        // Input, output and readback of the largest output block; the input uses a part.
        let scratch = self.take_scratch(matrix_bytes(blocks[0].1, out_cols))?;
        for (first, n) in blocks {
            let submission = gpu.scoped(|| {
                let rows_in = &x[first * cols..(first + n) * cols];
                gpu.queue
                    .write_buffer(&scratch.input, 0, bytemuck::cast_slice(rows_in));
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                let (x, out) = ((&scratch.input).into(), (&scratch.output).into());
                encode_jacobian(gpu, &mut encoder, x, out, n, cols)?;
                encoder.copy_buffer_to_buffer(
                    &scratch.output,
                    0,
                    &scratch.readback,
                    0,
                    matrix_bytes(n, out_cols),
                );
                Ok(gpu.queue.submit([encoder.finish()]))
            })?;
            let range = first * out_cols..(first + n) * out_cols;
            gpu.read_mapped(&scratch.readback, submission, &mut out[range], wait)
                .await?;
        }
        self.give_scratch(scratch);
        Ok(())
    }

    /// Records `output = softmax_jacobian(input)` for `rows x cols` into the caller's `encoder`:
    /// `output` holds `rows * cols * cols` f32. Both buffers need `STORAGE`; each is a whole
    /// buffer or a region of one ([`BufferRegion`]).
    ///
    /// # Errors
    /// [`Error::JacobianTooWide`], [`Error::MissingUsage`], [`Error::BufferTooSmall`],
    /// [`Error::Misaligned`], [`Error::Aliased`], [`Error::ZeroCols`].
    pub fn encode_softmax_jacobian<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: impl Into<BufferRegion<'a>>,
        output: impl Into<BufferRegion<'a>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        let len = rows.checked_mul(cols).ok_or(Error::ShapeTooLarge {
            what: "rows",
            value: rows,
            max: usize::MAX / cols.max(1),
        })?;
        validate::jacobian_rows("input", len, cols)?;
        validate_encode(
            &[("input", input, len as u64 * 4)],
            ("output", output, (len * cols) as u64 * 4),
        )?;
        let gpu = &self.gpu;
        gpu.scoped(|| encode_jacobian(gpu, encoder, input, output, rows, cols))
    }
}

/// Records with `body` into a new encoder and submits it.
pub(crate) fn submit(
    gpu: &Gpu,
    body: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<()> {
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    body(&mut encoder)?;
    gpu.queue.submit([encoder.finish()]);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Cross-entropy

/// Cross-entropy targets resident on the GPU, checked when they were uploaded: class indices
/// (one `i32` per row, ignored rows marked) or probabilities (`rows x cols` f32). They carry the
/// divisor of a `Mean`, found on the host at upload, so that the loss that uploaded them (or any
/// unweighted loss) takes no pass over them to find it.
pub struct TargetTensor {
    buffer: wgpu::Buffer,
    rows: usize,
    cols: usize,
    probabilities: bool,
    /// The divisor of a `Mean` over these targets, found on the host when they were uploaded.
    divisor: MeanDivisor,
}

/// The divisor of a `Mean` as far as the host knows it: the rows not ignored (the divisor of
/// every unweighted loss), and the weighted sum for the weights of the loss that uploaded them.
#[derive(Debug, Clone, Copy)]
struct MeanDivisor {
    kept_rows: usize,
    /// ([`CrossEntropyLoss::id`], the sum of its `w[target]` over rows not ignored).
    weighted: Option<(u64, f64)>,
}

impl std::fmt::Debug for TargetTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetTensor")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("probabilities", &self.probabilities)
            .finish_non_exhaustive()
    }
}

impl TargetTensor {
    /// Rows (samples) the targets cover.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the targets are probabilities rather than class indices.
    pub fn is_probabilities(&self) -> bool {
        self.probabilities
    }

    /// The underlying buffer: `i32` class indices (ignored rows are -1) or f32 probabilities.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

/// How the targets in a caller's buffer are encoded, for [`CrossEntropyLoss::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetEncoding {
    /// One `i32` class index per row; rows equal to the loss's `ignore_index` are ignored, values
    /// outside `[0, cols)` give NaN for their row.
    Indices,
    /// `rows x cols` f32 probabilities.
    Probabilities,
}

/// The buffers of one [`CrossEntropyLoss::encode`] call, all of the caller's: each a whole
/// buffer (`(&buffer).into()`) or a region of one (`buffer.slice(offset..).into()`, see
/// [`BufferRegion`]).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyBuffers<'a> {
    /// `rows x cols` f32 logits (`STORAGE`).
    pub logits: BufferRegion<'a>,
    /// The targets (`STORAGE`), encoded as `target_encoding` says.
    pub targets: BufferRegion<'a>,
    /// How `targets` is encoded.
    pub target_encoding: TargetEncoding,
    /// Receives the loss: one f32 for `Mean` and `Sum`, `rows` for `None` (`STORAGE`; for `Mean`
    /// and `Sum`, `STORAGE` to have the loss written into it, or else `COPY_DST` to have it
    /// copied into it, one more command).
    pub loss: BufferRegion<'a>,
    /// Where the gradient goes.
    pub grad: GradDestination<'a>,
    /// Rows of the batch.
    pub rows: usize,
}

/// Where [`CrossEntropyLoss::encode`] writes `dLoss/dLogits`.
#[derive(Debug, Clone, Copy)]
pub enum GradDestination<'a> {
    /// No gradient: the loss alone.
    None,
    /// Into this `rows x cols` buffer or region (`STORAGE`).
    Buffer(BufferRegion<'a>),
    /// Over the logits.
    InPlace,
}

/// The upstream gradient of [`CrossEntropyLoss::encode`] and
/// [`CrossEntropyLoss::encode_tensors`]: `dOut/dLoss` for whatever the caller computes from the
/// loss. A plain `f32` converts into [`DeviceGradOutput::Scalar`].
#[derive(Debug, Clone, Copy)]
pub enum DeviceGradOutput<'a> {
    /// One multiplier, known when the call is recorded.
    Scalar(f32),
    /// Multipliers in a buffer (`STORAGE`), read when the commands run: one f32 per row for
    /// `Reduction::None`, one for all rows for `Mean` and `Sum` (a loss scale kept on the GPU).
    Region(BufferRegion<'a>),
}

impl From<f32> for DeviceGradOutput<'_> {
    fn from(g: f32) -> Self {
        DeviceGradOutput::Scalar(g)
    }
}

/// A configured cross-entropy loss, with PyTorch's `F.cross_entropy` semantics, whose class
/// weights live on the GPU. Made by [`Context::cross_entropy_loss`]; reuse it every step.
///
/// For logits `x` (a row), target distribution `q` and `s = softmax(x)`:
/// `loss_row = -sum_c q_c log_softmax(x)_c` and `dloss_row/dx = s * sum(q) - q`, where for a
/// class-index target `t`, `q_c = (1 - e) w_t [c = t] + e/C w_c` (label smoothing `e`, class
/// weights `w`), and for probability targets `p`, `q_c = w_c ((1 - e) p_c + e/C)`. A term with
/// `q_c = 0` contributes exactly 0. `Mean` divides by the sum of `w_t` over rows that are not
/// ignored (index targets) or by the row count (probabilities); all rows ignored gives NaN for
/// `Mean` and 0 for `Sum`. Ignored rows have loss 0 and a gradient of exactly 0. A row holding NaN
/// or +inf, or only -inf, has a NaN loss and gradient.
pub struct CrossEntropyLoss {
    ctx: Context,
    cols: usize,
    weight: Option<wgpu::Buffer>,
    ignore_index: i64,
    reduction: Reduction,
    label_smoothing: f32,
    /// The sum of the class weights (`cols` when unweighted), in f64 then rounded once.
    weight_total: f32,
    /// `[mean denominator, reduced loss]`, reused by every call (calls are ordered on the queue).
    stats: wgpu::Buffer,
    /// The class weights as given, to find the divisor of a `Mean` when targets are uploaded.
    host_weight: Option<Vec<f32>>,
    /// Tells this loss's weights apart from any other loss's (process-wide).
    id: u64,
    /// Per-row losses of `Mean` and `Sum`, grown on demand.
    loss_rows: Mutex<wgpu::Buffer>,
}

impl std::fmt::Debug for CrossEntropyLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossEntropyLoss")
            .field("cols", &self.cols)
            .field("weighted", &self.weight.is_some())
            .field("ignore_index", &self.ignore_index)
            .field("reduction", &self.reduction)
            .field("label_smoothing", &self.label_smoothing)
            .finish_non_exhaustive()
    }
}

/// The loss and the gradient of a fused call.
#[derive(Debug)]
pub struct LossAndGrad {
    /// One value for `Mean` and `Sum`, `rows` for `None`.
    pub loss: Tensor,
    /// `dLoss/dLogits`, shaped like the logits.
    pub grad: Tensor,
}

impl Context {
    /// A cross-entropy loss over `cols` classes with these options; class weights are uploaded
    /// once.
    ///
    /// # Errors
    /// [`Error::ZeroCols`], [`Error::LabelSmoothing`] outside `[0, 1]`, [`Error::LengthMismatch`]
    /// when the weight is not `cols` long, and device errors.
    pub fn cross_entropy_loss(
        &self,
        cols: usize,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<CrossEntropyLoss> {
        validate::cross_entropy(0, cols, Targets::Indices(&[]), options, GradOutput::One)?;
        let gpu = &self.gpu;
        let storage = |label, size, usage| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        gpu.scoped(|| {
            let weight = options.weight.map(|w| {
                let buffer = storage(
                    "wgpu-softmax class weights",
                    (w.len() * 4) as u64,
                    TENSOR_USAGES,
                );
                gpu.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(w));
                buffer
            });
            Ok(CrossEntropyLoss {
                ctx: self.clone(),
                cols,
                weight,
                ignore_index: options.ignore_index,
                reduction: options.reduction,
                label_smoothing: options.label_smoothing,
                weight_total: options
                    .weight
                    .map_or(cols as f64, |w| w.iter().map(|&v| f64::from(v)).sum())
                    as f32,
                stats: storage("wgpu-softmax loss stats", 16, TENSOR_USAGES),
                host_weight: options.weight.map(<[f32]>::to_vec),
                id: NEXT_LOSS_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                loss_rows: Mutex::new(storage("wgpu-softmax row losses", 256, TENSOR_USAGES)),
            })
        })
    }

    /// The cross-entropy loss of `logits` (`rows x cols`): one value for `Mean` and `Sum`,
    /// `rows` values for `None`. See [`CrossEntropyLoss`] for the formula.
    ///
    /// # Errors
    /// Shape errors as for [`Context::softmax`]; [`Error::TargetOutOfRange`] naming the row and
    /// value; [`Error::LengthMismatch`] for targets or weight of the wrong length;
    /// [`Error::LabelSmoothing`]; device errors.
    ///
    /// ```no_run
    /// use wgpu_softmax::{Context, CrossEntropyOptions, Targets};
    /// let ctx = Context::new_blocking()?;
    /// let loss = ctx.cross_entropy(&[2.0, 0.5, 0.1, 0.3, 1.5, 0.2], 3, Targets::Indices(&[0, 1]),
    ///     &CrossEntropyOptions::default())?;
    /// assert_eq!(loss.len(), 1);
    /// # Ok::<(), wgpu_softmax::Error>(())
    /// ```
    pub fn cross_entropy(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.host_cross_entropy(
            logits,
            cols,
            1,
            targets,
            options,
            None,
            Wait::Block,
        ))
    }

    /// Async form of [`Context::cross_entropy`].
    pub async fn cross_entropy_async(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
    ) -> Result<Vec<f32>> {
        self.host_cross_entropy(logits, cols, 1, targets, options, None, Wait::Background)
            .await
    }

    /// The loss and, in the same kernel, `dLoss/dLogits * grad_output` (one fused pass over the
    /// logits). `grad_output` is a scalar for `Mean` and `Sum`, one value per row for `None`.
    ///
    /// # Errors
    /// As [`Context::cross_entropy`], and [`Error::LengthMismatch`] for a `grad_output` of the
    /// wrong shape.
    pub fn cross_entropy_with_grad(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        let mut grad = vec![0f32; logits.len()];
        let loss =
            self.cross_entropy_into(logits, cols, targets, options, grad_output, &mut grad)?;
        Ok(CrossEntropyOutput { loss, grad })
    }

    /// [`Context::cross_entropy_with_grad`] writing the gradient into `grad` (as long as
    /// `logits`); returns the loss.
    ///
    /// # Errors
    /// As [`Context::cross_entropy_with_grad`], and [`Error::LengthMismatch`] naming `grad`;
    /// `grad` is untouched when the arguments are refused.
    pub fn cross_entropy_into(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
        grad: &mut [f32],
    ) -> Result<Vec<f32>> {
        pollster::block_on(self.host_cross_entropy(
            logits,
            cols,
            1,
            targets,
            options,
            Some((grad_output, grad)),
            Wait::Block,
        ))
    }

    /// Async form of [`Context::cross_entropy_with_grad`].
    pub async fn cross_entropy_with_grad_async(
        &self,
        logits: &[f32],
        cols: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        grad_output: GradOutput<'_>,
    ) -> Result<CrossEntropyOutput<f32>> {
        let mut grad = vec![0f32; logits.len()];
        let loss = self
            .host_cross_entropy(
                logits,
                cols,
                1,
                targets,
                options,
                Some((grad_output, &mut grad)),
                Wait::Background,
            )
            .await?;
        Ok(CrossEntropyOutput { loss, grad })
    }

    /// The host forms of cross-entropy; `inner` > 1: the rows are the lines of `[rows / inner,
    /// cols, inner]` along its middle axis ([`Along::cross_entropy`](crate::Along)).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn host_cross_entropy(
        &self,
        logits: &[f32],
        cols: usize,
        inner: usize,
        targets: Targets<'_>,
        options: &CrossEntropyOptions<'_>,
        mut grad: Option<(GradOutput<'_>, &mut [f32])>,
        wait: Wait,
    ) -> Result<Vec<f32>> {
        let grad_output = grad.as_ref().map(|&(g, _)| g);
        let plan = validate::cross_entropy(
            logits.len(),
            cols,
            targets,
            options,
            grad_output.unwrap_or_default(),
        )?;
        if let Some((_, g)) = &grad {
            validate::same_len("grad", logits.len(), g.len())?;
        }
        // Every row block runs unreduced with its rows' own gradient factor (g, or g / D for the
        // mean, D resolved from all targets up front); the blocks' losses are then reduced here
        // in f64. So a batch of any size gives the result one pass over it would, and the
        // device's batch sums never see more rows than one binding holds.
        let per_row = CrossEntropyOptions {
            reduction: Reduction::None,
            ..*options
        };
        let loss_fn = self.cross_entropy_loss(cols, &per_row)?;
        let gpu = &self.gpu;
        gpu.check_alive()?;
        let (rows, want_grad) = (plan.rows, grad.is_some());
        let mut row_losses = vec![0f32; rows];
        if rows > 0 {
            // Blocks of whole slabs, in rows (lines).
            let layout = AxisLayout::from_parts(rows / inner, cols, inner)?;
            let blocks: Vec<_> = host_slab_blocks(gpu, layout)?
                .into_iter()
                .map(|(first, n)| (first * inner, n * inner))
                .collect();
            let most = blocks[0].1;
            let (matrix, vector) = (matrix_bytes(most, cols), matrix_bytes(most, 1));
            let probabilities = matches!(plan.targets, CrossEntropyTargets::Probabilities(_));
            // Pooled staging buffers, shared with the other host forms and sized for a block
            // plus one value per row: the logits in `input`, the gradient in `output`, the row
            // losses followed by the gradient in `readback`. Probability targets go in the
            // second input; index targets, upstream factors and losses in the row staging.
            let mut scratch = self.take_scratch(matrix + vector)?;
            let (row_bufs, probs_buf) = gpu.scoped(|| {
                let probs = probabilities.then(|| scratch.second_input(&gpu.device));
                Ok((scratch.row_staging(&gpu.device, vector), probs))
            })?;
            let (x_buf, grad_buf, readback) = (&scratch.input, &scratch.output, &scratch.readback);
            let t_buf = probs_buf.as_ref().unwrap_or(&row_bufs.targets);
            let (g_buf, loss_buf) = (&row_bufs.upstream, &row_bufs.loss);
            for (first, n) in blocks {
                let row_range = first..first + n;
                let range = first * cols..(first + n) * cols;
                let scales: Vec<f32> = row_range
                    .clone()
                    .map(|row| plan.grad_scale(row) as f32)
                    .collect();
                let submission = gpu.scoped(|| {
                    let queue = &gpu.queue;
                    queue.write_buffer(x_buf, 0, bytemuck::cast_slice(&logits[range.clone()]));
                    let target_words: &[u8] = match &plan.targets {
                        CrossEntropyTargets::Indices(t) => {
                            bytemuck::cast_slice(&t[row_range.clone()])
                        }
                        CrossEntropyTargets::Probabilities(p) => {
                            bytemuck::cast_slice(&p[range.clone()])
                        }
                    };
                    queue.write_buffer(t_buf, 0, target_words);
                    if want_grad {
                        queue.write_buffer(g_buf, 0, bytemuck::cast_slice(&scales));
                    }
                    let job = Job {
                        rows: n,
                        inner,
                        logits: x_buf.into(),
                        targets: t_buf.into(),
                        probabilities,
                        divisor: None,
                        loss: loss_buf.into(),
                        grad: if want_grad {
                            GradTarget::Buffer(grad_buf.into())
                        } else {
                            GradTarget::None
                        },
                        upstream: if want_grad {
                            Upstream::Region(g_buf.into())
                        } else {
                            Upstream::Scalar(1.0)
                        },
                        ignore: IGNORED_ROW,
                    };
                    let mut encoder = gpu.device.create_command_encoder(&Default::default());
                    loss_fn.record(gpu, &mut encoder, &job, None)?;
                    let n_bytes = matrix_bytes(n, 1);
                    encoder.copy_buffer_to_buffer(loss_buf, 0, readback, 0, n_bytes);
                    if want_grad {
                        let bytes = matrix_bytes(n, cols);
                        encoder.copy_buffer_to_buffer(grad_buf, 0, readback, n_bytes, bytes);
                    }
                    Ok(gpu.queue.submit([encoder.finish()]))
                })?;
                let n_bytes = matrix_bytes(n, 1);
                let grad_part: &mut [f32] = match &mut grad {
                    Some((_, g)) => &mut g[range],
                    None => &mut [],
                };
                let mut parts = [(0, &mut row_losses[row_range]), (n_bytes, grad_part)];
                gpu.read_mapped_parts(readback, submission, &mut parts, wait)
                    .await?;
            }
            self.give_scratch(scratch);
        }
        // From +0: the sum over no rows is 0, where `Iterator::sum` would give -0.
        let total = || {
            row_losses
                .iter()
                .fold(0.0, |sum: f64, &l| sum + f64::from(l))
        };
        Ok(match options.reduction {
            Reduction::None => row_losses,
            Reduction::Sum => vec![total() as f32],
            Reduction::Mean => vec![(total() / plan.mean_denominator) as f32],
        })
    }
}

impl CrossEntropyLoss {
    /// Classes per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The reduction in force.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }

    /// Checks targets against the class count and `ignore_index` and uploads them.
    ///
    /// # Errors
    /// [`Error::TargetOutOfRange`] naming the row and value, [`Error::LengthNotMultiple`] for
    /// probabilities not a multiple of `cols` long, and device errors.
    pub fn upload_targets(&self, targets: Targets<'_>) -> Result<TargetTensor> {
        let options = CrossEntropyOptions {
            ignore_index: self.ignore_index,
            weight: self.host_weight.as_deref(),
            ..Default::default()
        };
        let shaped = |rows: usize| {
            rows.checked_mul(self.cols).ok_or(Error::ShapeTooLarge {
                what: "targets",
                value: rows,
                max: usize::MAX / self.cols,
            })
        };
        let len = match targets {
            Targets::Indices(t) => shaped(t.len())?,
            Targets::IndicesI32(t) => shaped(t.len())?,
            Targets::Probabilities(p) => {
                validate::batch_rows("targets", p.len(), self.cols)?;
                p.len()
            }
        };
        let plan = validate::cross_entropy(len, self.cols, targets, &options, GradOutput::One)?;
        let divisor = MeanDivisor {
            kept_rows: plan.kept_rows,
            weighted: self
                .host_weight
                .is_some()
                .then_some((self.id, plan.mean_denominator)),
        };
        self.upload_resolved(&plan.targets, plan.rows, divisor)
    }

    fn upload_resolved(
        &self,
        targets: &CrossEntropyTargets<'_>,
        rows: usize,
        divisor: MeanDivisor,
    ) -> Result<TargetTensor> {
        let (bytes, probabilities): (&[u8], bool) = match targets {
            CrossEntropyTargets::Indices(t) => (bytemuck::cast_slice(t), false),
            CrossEntropyTargets::Probabilities(p) => (bytemuck::cast_slice(p), true),
        };
        let gpu = &self.ctx.gpu;
        let buffer = gpu.scoped(|| {
            let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-softmax targets"),
                size: (bytes.len() as u64).max(4),
                usage: TENSOR_USAGES,
                mapped_at_creation: false,
            });
            gpu.queue.write_buffer(&buffer, 0, bytes);
            Ok(buffer)
        })?;
        Ok(TargetTensor {
            buffer,
            rows,
            cols: self.cols,
            probabilities,
            divisor,
        })
    }

    /// The loss alone.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when logits and targets disagree in shape,
    /// [`Error::ShapeTooLarge`] for `Mean` and `Sum` over more rows than one storage binding
    /// holds one word each for (the host forms have no such bound), and device errors.
    pub fn loss(&self, logits: &Tensor, targets: &TargetTensor) -> Result<Tensor> {
        self.loss_on(None, logits, targets)
    }

    /// [`CrossEntropyLoss::loss`] with the classes along `layout`'s axis, as
    /// [`CrossEntropyLoss::encode_tensors_along`] takes them: `logits` holds the layout's
    /// elements (whatever its rows and columns), `targets` one class per line or probabilities
    /// shaped like the logits, and the loss is one value per line for `None`.
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::loss`], with [`Error::LengthMismatch`] naming `classes` when the
    /// axis is not the loss's class count, `logits` unless it holds the layout's elements and
    /// `target rows` unless the targets have one row per line.
    pub fn loss_along(
        &self,
        layout: AxisLayout,
        logits: &Tensor,
        targets: &TargetTensor,
    ) -> Result<Tensor> {
        self.loss_on(Some(layout), logits, targets)
    }

    fn loss_on(
        &self,
        layout: Option<AxisLayout>,
        logits: &Tensor,
        targets: &TargetTensor,
    ) -> Result<Tensor> {
        let shape = self.shape_of(logits, targets, layout)?;
        let loss = self.loss_tensor(shape.0)?;
        let upstream = UpstreamGrad::Uniform(1.0);
        self.run(shape, logits, targets, &loss, GradTarget::None, upstream)?;
        Ok(loss)
    }

    /// The loss and `dLoss/dLogits * grad_output`, from one fused pass over the logits.
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::loss`], and [`Error::LengthMismatch`] for a `grad_output` of the
    /// wrong shape (a scalar for `Mean` and `Sum`, one value per row for `None`).
    pub fn loss_and_grad(
        &self,
        logits: &Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<LossAndGrad> {
        self.loss_and_grad_on(None, logits, targets, grad_output)
    }

    /// [`CrossEntropyLoss::loss_and_grad`] with the classes along `layout`'s axis (see
    /// [`CrossEntropyLoss::loss_along`]): the gradient has the logits' rows and columns, and a
    /// per-line `grad_output` (for `None`) one value per line.
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::loss_along`], and [`Error::LengthMismatch`] for a `grad_output` of
    /// the wrong shape.
    pub fn loss_and_grad_along(
        &self,
        layout: AxisLayout,
        logits: &Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<LossAndGrad> {
        self.loss_and_grad_on(Some(layout), logits, targets, grad_output)
    }

    fn loss_and_grad_on(
        &self,
        layout: Option<AxisLayout>,
        logits: &Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<LossAndGrad> {
        let shape = self.shape_of(logits, targets, layout)?;
        let upstream = validate::upstream_grad(self.reduction, shape.0, grad_output)?;
        let loss = self.loss_tensor(shape.0)?;
        let grad = self.ctx.empty(logits.rows, logits.cols)?;
        let target = GradTarget::Buffer((&grad).into());
        self.run(shape, logits, targets, &loss, target, upstream)?;
        Ok(LossAndGrad { loss, grad })
    }

    /// As [`CrossEntropyLoss::loss_and_grad`], writing the gradient over `logits`, so a training
    /// step needs no second logits-sized buffer. Returns the loss.
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::loss_and_grad`].
    pub fn loss_and_grad_in_place(
        &self,
        logits: &mut Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<Tensor> {
        self.loss_and_grad_in_place_on(None, logits, targets, grad_output)
    }

    /// [`CrossEntropyLoss::loss_and_grad_in_place`] with the classes along `layout`'s axis
    /// (see [`CrossEntropyLoss::loss_and_grad_along`]).
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::loss_and_grad_along`].
    pub fn loss_and_grad_in_place_along(
        &self,
        layout: AxisLayout,
        logits: &mut Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<Tensor> {
        self.loss_and_grad_in_place_on(Some(layout), logits, targets, grad_output)
    }

    fn loss_and_grad_in_place_on(
        &self,
        layout: Option<AxisLayout>,
        logits: &mut Tensor,
        targets: &TargetTensor,
        grad_output: GradOutput<'_>,
    ) -> Result<Tensor> {
        let shape = self.shape_of(logits, targets, layout)?;
        let upstream = validate::upstream_grad(self.reduction, shape.0, grad_output)?;
        let loss = self.loss_tensor(shape.0)?;
        self.run(shape, logits, targets, &loss, GradTarget::InPlace, upstream)?;
        Ok(loss)
    }

    /// Records the loss (and gradient) of the caller's buffers into the caller's `encoder`.
    /// The upstream gradient is `grad_output`: a scalar (`1.0`), or f32 on the device that the
    /// commands read when they run ([`DeviceGradOutput::Region`]). The loss's `ignore_index`
    /// must fit in `i32` for index targets.
    ///
    /// # Errors
    /// [`Error::MissingUsage`], [`Error::BufferTooSmall`], [`Error::Misaligned`],
    /// [`Error::Aliased`] for an operand the call writes (the gradient, the loss, the logits
    /// when in place) in the buffer of any other operand (regions of one buffer count as the
    /// same buffer), [`Error::ShapeTooLarge`] for an `ignore_index` outside `i32`,
    /// [`Error::RowTooLong`].
    pub fn encode<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: CrossEntropyBuffers<'a>,
        grad_output: impl Into<DeviceGradOutput<'a>>,
    ) -> Result<()> {
        self.encode_buffers(encoder, buffers, 1, grad_output.into(), None, None)
    }

    /// [`CrossEntropyLoss::encode`] with the classes along `layout`'s axis, which need not be
    /// the last: logits (and probability targets, and the gradient) shaped `[N, C, d1, ...]`
    /// with the classes on axis 1, as PyTorch's `F.cross_entropy` takes them, read in place.
    /// `buffers.rows` counts the lines along the axis (`layout.lines()`, `N d1 ...`), which index
    /// targets, per-line losses (`Reduction::None`) and a per-line `grad_output` hold one value
    /// each of, in row-major order over the other axes.
    ///
    /// # Errors
    /// As [`CrossEntropyLoss::encode`]; [`Error::LengthMismatch`] naming `classes` when the
    /// axis is not [`CrossEntropyLoss::cols`] long and `rows` when `buffers.rows` is not the
    /// layout's line count; [`Error::SlabTooLarge`] when one outer slab exceeds a storage
    /// binding.
    ///
    /// ```no_run
    /// use wgpu_softmax::{AxisLayout, Context, CrossEntropyBuffers, CrossEntropyOptions};
    /// use wgpu_softmax::{GradDestination, TargetEncoding};
    /// # fn demo(ctx: &Context, logits: &wgpu::Buffer, targets: &wgpu::Buffer,
    /// #         loss: &wgpu::Buffer, grad: &wgpu::Buffer) -> Result<(), wgpu_softmax::Error> {
    /// // Per-pixel classes of a segmentation map: logits [8, 21, 64, 64], targets [8, 64, 64].
    /// let layout = AxisLayout::new(&[8, 21, 64, 64], 1)?;
    /// let ce = ctx.cross_entropy_loss(21, &CrossEntropyOptions::default())?;
    /// let mut encoder = ctx.device().create_command_encoder(&Default::default());
    /// ce.encode_along(&mut encoder, layout, CrossEntropyBuffers {
    ///     logits: logits.into(),
    ///     targets: targets.into(),
    ///     target_encoding: TargetEncoding::Indices,
    ///     loss: loss.into(),
    ///     grad: GradDestination::Buffer(grad.into()),
    ///     rows: layout.lines(),
    /// }, 1.0)?;
    /// ctx.queue().submit([encoder.finish()]);
    /// # Ok(()) }
    /// ```
    pub fn encode_along<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        layout: AxisLayout,
        buffers: CrossEntropyBuffers<'a>,
        grad_output: impl Into<DeviceGradOutput<'a>>,
    ) -> Result<()> {
        validate::same_len("classes", self.cols, layout.len())?;
        validate::same_len("rows", layout.lines(), buffers.rows)?;
        let inner = layout.inner();
        self.encode_buffers(encoder, buffers, inner, grad_output.into(), None, None)
    }

    /// Records the loss (and gradient) of device-resident logits and uploaded targets into the
    /// caller's `encoder`, the loss into `loss` (one value for `Mean` and `Sum`, `rows` for
    /// `None`). As [`CrossEntropyLoss::loss_and_grad`], with no buffer made: the targets'
    /// ignored rows are recognised as uploaded, and a `Mean` takes the divisor found at upload
    /// (see [`TargetTensor`]), where [`CrossEntropyLoss::encode`] over the targets' buffer
    /// would look for `ignore_index` in it and find the divisor on the device.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when logits, targets or loss disagree in shape, and as
    /// [`CrossEntropyLoss::encode`] for the gradient buffer.
    pub fn encode_tensors<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: &Tensor,
        targets: &TargetTensor,
        loss: &Tensor,
        grad: GradDestination<'a>,
        grad_output: impl Into<DeviceGradOutput<'a>>,
    ) -> Result<()> {
        let tensors = (logits, targets, loss);
        self.encode_tensors_timed(encoder, tensors, None, grad, grad_output.into(), None)
    }

    /// [`CrossEntropyLoss::encode_tensors`] with the classes along `layout`'s axis (see
    /// [`CrossEntropyLoss::encode_along`]): `logits` holds the layout's elements whatever its
    /// rows and columns, and `targets`, uploaded by [`CrossEntropyLoss::upload_targets`], one
    /// class per line or probabilities laid out like the logits. A `TargetTensor`'s buffer
    /// marks ignored lines in its own way, so pass the tensor here rather than its buffer to
    /// [`CrossEntropyLoss::encode_along`].
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] naming `classes` when the axis is not
    /// [`CrossEntropyLoss::cols`] long, `logits` when it does not hold the layout's elements,
    /// `target rows` when the targets are not one per line, and `loss`; as
    /// [`CrossEntropyLoss::encode_along`] otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_tensors_along<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        layout: AxisLayout,
        logits: &Tensor,
        targets: &TargetTensor,
        loss: &Tensor,
        grad: GradDestination<'a>,
        grad_output: impl Into<DeviceGradOutput<'a>>,
    ) -> Result<()> {
        let tensors = (logits, targets, loss);
        let grad_output = grad_output.into();
        self.encode_tensors_timed(encoder, tensors, Some(layout), grad, grad_output, None)
    }

    /// [`CrossEntropyLoss::encode_tensors`] (logits, targets and loss in `tensors`) with
    /// timestamps written at the start and end of its pass; with a `layout`, the classes along
    /// its axis (as [`CrossEntropyLoss::encode_tensors_along`]).
    pub(crate) fn encode_tensors_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        (logits, targets, loss): (&Tensor, &TargetTensor, &Tensor),
        layout: Option<AxisLayout>,
        grad: GradDestination<'_>,
        grad_output: DeviceGradOutput<'_>,
        timestamps: Option<crate::kernels::Timestamps<'_>>,
    ) -> Result<()> {
        let (rows, inner) = self.shape_of(logits, targets, layout)?;
        let loss_rows = match self.reduction {
            Reduction::None => rows,
            Reduction::Mean | Reduction::Sum => 1,
        };
        validate::same_len("loss", loss_rows, loss.rows * loss.cols)?;
        let buffers = CrossEntropyBuffers {
            logits: logits.into(),
            targets: (&targets.buffer).into(),
            target_encoding: if targets.probabilities {
                TargetEncoding::Probabilities
            } else {
                TargetEncoding::Indices
            },
            loss: loss.into(),
            grad,
            rows,
        };
        let uploaded = Uploaded {
            divisor: self.divisor_of(targets),
        };
        self.encode_buffers(
            encoder,
            buffers,
            inner,
            grad_output,
            timestamps,
            Some(uploaded),
        )
    }

    /// Checks `buffers` and records the call; `inner`: as [`Job::inner`]; `uploaded`: the
    /// targets are a [`TargetTensor`]'s (`None`: the caller's own).
    fn encode_buffers(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        buffers: CrossEntropyBuffers<'_>,
        inner: usize,
        grad_output: DeviceGradOutput<'_>,
        timestamps: Option<crate::kernels::Timestamps<'_>>,
        uploaded: Option<Uploaded>,
    ) -> Result<()> {
        let rows = buffers.rows;
        let vector_bytes = matrix_bytes(rows, 1);
        let logits_bytes = matrix_bytes(rows, self.cols);
        let storage = wgpu::BufferUsages::STORAGE;
        let grad_usage = if matches!(buffers.grad, GradDestination::InPlace) {
            storage
        } else {
            wgpu::BufferUsages::empty()
        };
        validate_region("logits", buffers.logits, logits_bytes, storage | grad_usage)?;
        let (target_bytes, probabilities) = match buffers.target_encoding {
            TargetEncoding::Indices => (vector_bytes, false),
            TargetEncoding::Probabilities => (logits_bytes, true),
        };
        validate_region("targets", buffers.targets, target_bytes, storage)?;
        // A reduced loss is written into a buffer bound for storage, or else copied into it.
        let loss_usage = if self.reduction == Reduction::None
            || !buffers
                .loss
                .buffer()
                .usage()
                .contains(wgpu::BufferUsages::COPY_DST)
        {
            storage
        } else {
            wgpu::BufferUsages::COPY_DST
        };
        let loss_bytes = match self.reduction {
            Reduction::None => vector_bytes,
            _ => 4,
        };
        validate_region("loss", buffers.loss, loss_bytes, loss_usage)?;
        let upstream = match grad_output {
            DeviceGradOutput::Scalar(g) => Upstream::Scalar(g),
            DeviceGradOutput::Region(region) => {
                let words = match self.reduction {
                    Reduction::None => rows,
                    Reduction::Mean | Reduction::Sum => 1,
                };
                validate_region("grad_output", region, matrix_bytes(words, 1), storage)?;
                Upstream::Region(region)
            }
        };
        // Each operand the call writes (the logits in place, the gradient, the loss) must lie in
        // a buffer no other operand uses: `others` grows by each one checked.
        let mut others = vec![("targets", buffers.targets)];
        if let Upstream::Region(region) = upstream {
            others.push(("grad_output", region));
        }
        if matches!(buffers.grad, GradDestination::InPlace) {
            check_not_aliased(&others, ("logits", buffers.logits))?;
        }
        others.insert(0, ("logits", buffers.logits));
        let grad = match buffers.grad {
            GradDestination::None => GradTarget::None,
            GradDestination::InPlace => GradTarget::InPlace,
            GradDestination::Buffer(grad) => {
                validate_region("grad", grad, logits_bytes, storage)?;
                check_not_aliased(&others, ("grad", grad))?;
                others.push(("grad", grad));
                GradTarget::Buffer(grad)
            }
        };
        check_not_aliased(&others, ("loss", buffers.loss))?;
        let (ignore, divisor) = match uploaded {
            Some(uploaded) => (IGNORED_ROW, uploaded.divisor),
            // Probability targets: the row count, whatever they hold.
            None if probabilities => (0, Some(rows as f64)),
            None => (
                i32::try_from(self.ignore_index).map_err(|_| Error::ShapeTooLarge {
                    what: "ignore_index",
                    value: self.ignore_index.unsigned_abs() as usize,
                    max: i32::MAX as usize,
                })?,
                None,
            ),
        };
        let job = Job {
            rows,
            inner,
            logits: buffers.logits,
            targets: buffers.targets,
            probabilities,
            divisor,
            loss: buffers.loss,
            grad,
            upstream,
            ignore,
        };
        let gpu = &self.ctx.gpu;
        gpu.scoped(|| self.record(gpu, encoder, &job, timestamps))
    }

    /// The rows (lines, with a `layout`) of a call on `logits` and `targets` and their `inner`
    /// ([`Job::inner`]), once their shapes are checked against each other and the loss.
    fn shape_of(
        &self,
        logits: &Tensor,
        targets: &TargetTensor,
        layout: Option<AxisLayout>,
    ) -> Result<(usize, usize)> {
        match layout {
            None => {
                validate::same_len("logits cols", self.cols, logits.cols)?;
                validate::same_len("target rows", logits.rows, targets.rows)?;
                validate::same_len("target cols", self.cols, targets.cols)?;
                Ok((logits.rows, 1))
            }
            Some(layout) => {
                validate::same_len("classes", self.cols, layout.len())?;
                validate::same_len("logits", layout.numel(), logits.rows * logits.cols)?;
                validate::same_len("target rows", layout.lines(), targets.rows)?;
                validate::same_len("target cols", self.cols, targets.cols)?;
                Ok((layout.lines(), layout.inner()))
            }
        }
    }

    /// The divisor of a `Mean` over `targets`, where the host knows it: the rows not ignored
    /// for an unweighted loss or probability targets (every row), the weighted sum found at
    /// upload when this loss uploaded them.
    fn divisor_of(&self, targets: &TargetTensor) -> Option<f64> {
        let divisor = targets.divisor;
        if self.host_weight.is_none() || targets.probabilities {
            return Some(divisor.kept_rows as f64);
        }
        match divisor.weighted {
            Some((id, sum)) if id == self.id => Some(sum),
            _ => None,
        }
    }

    fn loss_tensor(&self, rows: usize) -> Result<Tensor> {
        match self.reduction {
            Reduction::None => self.ctx.empty(rows, 1),
            Reduction::Mean | Reduction::Sum => self.ctx.empty(1, 1),
        }
    }

    /// Records and submits one call on tensors of `(rows, inner)` ([`Job`]).
    fn run(
        &self,
        (rows, inner): (usize, usize),
        logits: &Tensor,
        targets: &TargetTensor,
        loss: &Tensor,
        grad: GradTarget<'_>,
        upstream: UpstreamGrad<'_>,
    ) -> Result<()> {
        let gpu = &self.ctx.gpu;
        gpu.scoped(|| {
            // A per-row upstream gradient travels in a small buffer made for this call.
            let per_row = match upstream {
                UpstreamGrad::PerRow(g) => Some(upload_words(gpu, bytemuck::cast_slice(g))),
                UpstreamGrad::Uniform(_) => None,
            };
            let job = Job {
                rows,
                inner,
                logits: logits.into(),
                targets: (&targets.buffer).into(),
                probabilities: targets.probabilities,
                divisor: self.divisor_of(targets),
                loss: loss.into(),
                grad,
                upstream: match (&per_row, upstream) {
                    (Some(buffer), _) => Upstream::Region(buffer.into()),
                    (None, UpstreamGrad::Uniform(g)) => Upstream::Scalar(g),
                    (None, UpstreamGrad::PerRow(_)) => unreachable!("uploaded above"),
                },
                ignore: IGNORED_ROW,
            };
            submit(gpu, |encoder| self.record(gpu, encoder, &job, None))
        })
    }

    /// Records the passes of one call: the mean's denominator, the fused row kernel, and the
    /// reduction of the per-row losses, in one compute pass.
    fn record(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        job: &Job<'_>,
        timestamps: Option<crate::kernels::Timestamps<'_>>,
    ) -> Result<()> {
        let cols = self.cols;
        let reduced = self.reduction != Reduction::None;
        // The mean's divisor, when the host knows it (rounded once from f64).
        let given = job
            .divisor
            .filter(|_| self.reduction == Reduction::Mean)
            .map(|d| d as f32);
        if reduced {
            check_reducible_rows(gpu, job.rows)?;
        }
        // A reduced loss's per-row losses go into a buffer of the loss's own.
        let cached_rows;
        let loss_rows = if reduced {
            let needed = matrix_bytes(job.rows, 1);
            cached_rows = cached_buffer(&gpu.device, &self.loss_rows, needed, || {
                gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgpu-softmax row losses"),
                    size: needed
                        .next_power_of_two()
                        .min(gpu.limits.max_buffer_size)
                        .max(needed),
                    usage: TENSOR_USAGES,
                    mapped_at_creation: false,
                })
            })?;
            (&cached_rows).into()
        } else {
            job.loss
        };
        // Four words: vec4 kernels declare the logits and gradient bindings as vec4 arrays.
        let unused_read = || Operand::shared(&gpu.unused_read, 4);
        let (logits, grad, in_place, want_grad) = match job.grad {
            GradTarget::None => (
                job.logits.rows(cols),
                Operand::shared(&gpu.unused_write, 4),
                false,
                false,
            ),
            GradTarget::Buffer(grad) => (job.logits.rows(cols), grad.rows(cols), false, true),
            GradTarget::InPlace => (unused_read(), job.logits.rows(cols), true, true),
        };
        let (grad_output, per_row, scalar) = match &job.upstream {
            Upstream::Scalar(g) => (unused_read(), false, *g),
            // A reduced loss's one multiplier serves every block of rows.
            Upstream::Region(region) if reduced => (region.shared(1), true, 1.0),
            Upstream::Region(region) => (region.rows(1), true, 1.0),
        };
        let call = RowCall {
            rows: job.rows,
            cols,
            inner: job.inner,
            operands: vec![
                logits,
                job.targets.rows(if job.probabilities { cols } else { 1 }),
                match &self.weight {
                    Some(w) => Operand::shared(w, cols),
                    None => unused_read(),
                },
                grad_output,
                loss_rows.rows(1),
                grad,
                Operand::shared(&self.stats, 2),
            ],
            constants: vec![
                ("PROBS", u32::from(job.probabilities)),
                ("WEIGHTED", u32::from(self.weight.is_some())),
                (
                    "REDUCTION",
                    match self.reduction {
                        Reduction::None => 0,
                        Reduction::Mean => 1,
                        Reduction::Sum => 2,
                    },
                ),
                ("GRAD", u32::from(want_grad)),
                ("IN_PLACE", u32::from(in_place)),
                ("GRAD_PER_ROW", u32::from(per_row)),
                ("DIVISOR_GIVEN", u32::from(given.is_some())),
                // Mass on classes other than the target: probabilities or label smoothing.
                (
                    "DENSE",
                    u32::from(job.probabilities || self.label_smoothing != 0.0),
                ),
            ],
            words: [
                job.ignore as u32,
                self.label_smoothing.to_bits(),
                scalar.to_bits(),
                self.weight_total.to_bits(),
            ],
            extra: given.map_or(0, f32::to_bits),
            tally: false,
        };
        let family = &gpu.kernels.cross_entropy;
        // The batch passes see one word per row, in the lines' order too: they run as over rows.
        let mut batch_call = call.clone();
        batch_call.inner = 1;
        let mut call = call;
        if job.inner > 1 {
            call.constants.push(("LINES", 1));
        }
        // The reduced loss goes straight into a loss buffer that can be bound for storage; into
        // `stats` and copied from there otherwise. It is added up by the row kernel itself
        // (`Tuning::loss_tally`) where one dispatch of it covers the call and its workgroups are
        // few enough (`loss_tally` at most) for one to read all their sums, and by a batch sum
        // over the rows' stored losses otherwise.
        let direct = job
            .loss
            .buffer()
            .usage()
            .contains(wgpu::BufferUsages::STORAGE);
        let row_tally = reduced
            && direct
            && gpu.tuning.loss_tally != 0
            && family.can_tally(gpu, &call, gpu.tuning.loss_tally)?;
        if row_tally {
            call.operands[LOSS_ROWS_OPERAND] = job.loss.shared(1);
            call.tally = true;
        }
        let mut dispatches = Vec::new();
        if self.reduction == Reduction::Mean && given.is_none() {
            dispatches.extend(family.batch_sum(
                gpu,
                &batch_call,
                BATCH_ENTRIES,
                &[("DIVISOR", 1)],
            )?);
        }
        dispatches.extend(family.plan(gpu, &call)?);
        // A batch sum writes the loss in the gradient's place (it writes no gradient).
        if reduced && !row_tally {
            let mut sum = batch_call;
            if direct {
                sum.operands[GRAD_OPERAND] = job.loss.shared(1);
            }
            dispatches.extend(family.batch_sum(
                gpu,
                &sum,
                BATCH_ENTRIES,
                &[("LOSS_OUT", u32::from(direct))],
            )?);
        }
        family.record(gpu, encoder, &dispatches, timestamps)?;
        if reduced && !direct {
            let loss = job.loss;
            encoder.copy_buffer_to_buffer(&self.stats, 4, loss.buffer(), loss.offset(), 4);
        }
        Ok(())
    }
}

/// Numbers every [`CrossEntropyLoss`] made in this process, to tell their weights apart.
static NEXT_LOSS_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The cross-entropy family's batch passes (`DIVISOR` picks the mean's divisor or the loss): a
/// block's sum, the sum of those (or of one block's rows), and the one-pass tally.
const BATCH_ENTRIES: [&str; 3] = ["batch_partials", "batch_finish", "batch_tally"];

/// The row losses' place among the cross-entropy family's operands.
const LOSS_ROWS_OPERAND: usize = 4;

/// The gradient's place among the cross-entropy family's operands.
const GRAD_OPERAND: usize = 5;

/// The batch sums of `Mean` and `Sum` read one word per row through a single binding: more rows
/// than that binding holds would be summed in part (the binding is clamped), a wrong answer, so
/// they are refused; the host forms and `Reduction::None` have no such bound.
fn check_reducible_rows(gpu: &Gpu, rows: usize) -> Result<()> {
    let max = gpu.max_binding().saturating_sub(gpu.storage_align()) / 4;
    if rows as u64 > max {
        return Err(Error::ShapeTooLarge {
            what: "rows of a reduced device-resident cross-entropy",
            value: rows,
            max: max as usize,
        });
    }
    Ok(())
}

/// Where a call's gradient goes.
#[derive(Clone, Copy)]
enum GradTarget<'a> {
    None,
    Buffer(BufferRegion<'a>),
    InPlace,
}

/// The upstream gradient as the kernel receives it: a uniform word, or words in a buffer (one
/// per row for `Reduction::None`, one for all rows otherwise).
#[derive(Clone, Copy)]
enum Upstream<'a> {
    Scalar(f32),
    Region(BufferRegion<'a>),
}

/// What targets uploaded by [`CrossEntropyLoss::upload_targets`] bring to a call besides their
/// buffer (whose ignored rows are [`IGNORED_ROW`]): the mean's divisor where the host knows it.
#[derive(Clone, Copy)]
struct Uploaded {
    divisor: Option<f64>,
}

/// Everything one recorded cross-entropy call needs, whoever owns the buffers.
struct Job<'a> {
    rows: usize,
    /// 1: rows of `cols` contiguous logits. More: the rows are the lines of `[rows / inner, cols,
    /// inner]` along its middle axis, in the lines' order (see [`RowCall::inner`]).
    inner: usize,
    logits: BufferRegion<'a>,
    targets: BufferRegion<'a>,
    probabilities: bool,
    /// The divisor of a `Mean`, where the host knows it: no pass then finds it on the device.
    divisor: Option<f64>,
    loss: BufferRegion<'a>,
    grad: GradTarget<'a>,
    upstream: Upstream<'a>,
    /// Index targets equal to this are ignored.
    ignore: i32,
}

fn upload_words(gpu: &Gpu, bytes: &[u8]) -> wgpu::Buffer {
    let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-softmax grad_output"),
        size: (bytes.len() as u64).max(4),
        usage: TENSOR_USAGES,
        mapped_at_creation: false,
    });
    gpu.queue.write_buffer(&buffer, 0, bytes);
    buffer
}
