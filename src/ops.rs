//! The public operations in their three forms: host slices (blocking and async), device-resident
//! [`Tensor`]s, and recording into the caller's own `CommandEncoder` on the caller's buffers.

use crate::context::{Context, Gpu, Wait};
use crate::error::{Error, Result};
use crate::kernels::axis::{AxisCall, AxisOp};
use crate::kernels::rowwise::Operand;
use crate::kernels::rowwise::RowCall;
use crate::kernels::{Normalization, Timestamps};
use crate::layout::AxisLayout;
use crate::region::{validate_encode, BufferRegion};
use crate::validate;

/// The host forms move data in pieces of at most this many bytes, so staging memory stays bounded
/// whatever the batch size.
pub(crate) const HOST_CHUNK_BYTES: u64 = 64 << 20;

/// The row blocks a host form moves through the GPU one at a time: each fits one storage binding
/// and, unless a single row is longer, the bounded staging size.
pub(crate) fn host_blocks(gpu: &Gpu, rows: usize, cols: usize) -> Result<Vec<(usize, usize)>> {
    let row_bytes = (cols as u64).saturating_mul(4);
    let limit = gpu
        .max_binding()
        .min(HOST_CHUNK_BYTES.max(row_bytes.saturating_add(gpu.storage_align())));
    crate::kernels::row_blocks(rows, cols, limit, gpu.storage_align(), usize::MAX)
}

/// The blocks of outer slabs a host form moves through the GPU one at a time, as
/// [`host_blocks`] moves rows; a slab too large for one binding is [`Error::SlabTooLarge`]
/// where the axis is not the last.
pub(crate) fn host_slab_blocks(gpu: &Gpu, layout: AxisLayout) -> Result<Vec<(usize, usize)>> {
    let blocks = host_blocks(gpu, layout.outer(), layout.slab());
    match blocks {
        Err(Error::RowTooLong {
            bytes, max_binding, ..
        }) if layout.inner() > 1 => Err(Error::SlabTooLarge {
            len: layout.len(),
            inner: layout.inner(),
            bytes,
            max_binding,
        }),
        other => other,
    }
}

/// The bytes of `layout`'s elements, saturating as [`matrix_bytes`].
pub(crate) fn layout_bytes(layout: AxisLayout) -> u64 {
    (layout.numel() as u64).saturating_mul(4)
}

/// Records `dst = op(src)` over `layout` on validated regions: the row-wise kernels where the
/// axis is the last, the kernels along an axis otherwise.
pub(crate) fn record_normalize(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    op: Normalization,
    [src, dst]: [BufferRegion<'_>; 2],
    layout: AxisLayout,
    timestamps: Option<Timestamps<'_>>,
) -> Result<()> {
    if layout.inner() == 1 {
        let (rows, cols) = (layout.outer(), layout.len());
        let call = normalize_call(op, src.rows(cols), dst.rows(cols), rows, cols);
        return gpu.kernels.softmax.encode(gpu, encoder, &call, timestamps);
    }
    let call = AxisCall {
        op: AxisOp::Normalize(op),
        layout,
        input: src,
        grad: None,
        output: dst,
    };
    gpu.kernels.axis.encode(gpu, encoder, &call, timestamps)
}

/// A `[rows x cols]` f32 matrix resident on the GPU, row-major in one buffer.
///
/// Produced by [`Context::upload`] and by the tensor forms of the operations; read back with
/// [`Tensor::to_vec`]. Operations on tensors submit their work and return at once; a readback
/// waits for everything submitted before it.
pub struct Tensor {
    pub(crate) ctx: Context,
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

/// Buffer usages a tensor's buffer has: kernels read and write it, and it can be copied from and
/// to (uploads, readbacks, the caller's own copies).
pub const TENSOR_USAGES: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Tensor {
    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix (the softmax axis).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying buffer (usages [`TENSOR_USAGES`]), for the caller's own passes: the
    /// elements from its start, in a size rounded up to whole 16-byte `vec4`s.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The context the tensor belongs to.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    fn matrix(&self) -> Operand<'_> {
        Operand::matrix(&self.buffer, self.cols)
    }

    /// Copies the tensor to the host, waiting for all work submitted before.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        pollster::block_on(self.read(Wait::Block))
    }

    /// Async form of [`Tensor::to_vec`]; the calling thread is not blocked while the GPU works.
    pub async fn to_vec_async(&self) -> Result<Vec<f32>> {
        self.read(Wait::Background).await
    }

    pub(crate) async fn read(&self, wait: Wait) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.len()];
        self.ctx.download(&self.buffer, 0, &mut out, wait).await?;
        Ok(out)
    }

    /// Softmax of every row, into a new tensor.
    pub fn softmax(&self) -> Result<Tensor> {
        self.rowwise(Normalization::Softmax)
    }

    /// Log-softmax of every row, into a new tensor.
    pub fn log_softmax(&self) -> Result<Tensor> {
        self.rowwise(Normalization::LogSoftmax)
    }

    /// Softmax of every row, written into `out` (same shape, a different tensor).
    pub fn softmax_into(&self, out: &Tensor) -> Result<()> {
        self.rowwise_into(Normalization::Softmax, out)
    }

    /// Log-softmax of every row, written into `out` (same shape, a different tensor).
    pub fn log_softmax_into(&self, out: &Tensor) -> Result<()> {
        self.rowwise_into(Normalization::LogSoftmax, out)
    }

    fn rowwise(&self, op: Normalization) -> Result<Tensor> {
        let out = self.ctx.empty(self.rows, self.cols)?;
        self.rowwise_into(op, &out)?;
        Ok(out)
    }

    fn rowwise_into(&self, op: Normalization, out: &Tensor) -> Result<()> {
        validate::same_len("output", self.len(), out.len())?;
        validate::same_len("output cols", self.cols, out.cols)?;
        if self.buffer == out.buffer {
            return Err(Error::Aliased {
                first: "input",
                second: "output",
            });
        }
        let gpu = &self.ctx.gpu;
        gpu.scoped(|| {
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            let call = normalize_call(op, self.matrix(), out.matrix(), self.rows, self.cols);
            gpu.kernels.softmax.encode(gpu, &mut encoder, &call, None)?;
            gpu.queue.submit([encoder.finish()]);
            Ok(())
        })
    }
}

/// Staging buffers of the host forms, kept by the context and reused across calls.
pub(crate) struct Scratch {
    pub(crate) input: wgpu::Buffer,
    /// A second input of the same size, made on first use (by the backward ops and the
    /// cross-entropy host forms' probability targets).
    second: Option<wgpu::Buffer>,
    pub(crate) output: wgpu::Buffer,
    pub(crate) readback: wgpu::Buffer,
    /// Per-row buffers of the cross-entropy host forms, made on first use and regrown when a
    /// call needs more.
    rows: Option<RowStaging>,
}

/// Per-row staging of the cross-entropy host forms: index targets, upstream gradient factors and
/// row losses, each one f32 or i32 per row.
#[derive(Clone)]
pub(crate) struct RowStaging {
    pub(crate) targets: wgpu::Buffer,
    pub(crate) upstream: wgpu::Buffer,
    pub(crate) loss: wgpu::Buffer,
}

impl Scratch {
    fn new(device: &wgpu::Device, bytes: u64) -> Self {
        let make = |label, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        Self {
            input: make("wgpu-softmax input", TENSOR_USAGES),
            second: None,
            rows: None,
            output: make("wgpu-softmax output", TENSOR_USAGES),
            readback: make(
                "wgpu-softmax readback",
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        }
    }
}

impl Scratch {
    /// The second input buffer, made the first time it is asked for; call inside
    /// [`Gpu::scoped`](crate::context::Gpu::scoped) so a failed allocation is an error.
    pub(crate) fn second_input(&mut self, device: &wgpu::Device) -> wgpu::Buffer {
        let size = self.input.size();
        self.second
            .get_or_insert_with(|| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wgpu-softmax second input"),
                    size,
                    usage: TENSOR_USAGES,
                    mapped_at_creation: false,
                })
            })
            .clone()
    }

    /// Per-row buffers of at least `bytes` each, made or regrown on demand; call inside
    /// [`Gpu::scoped`](crate::context::Gpu::scoped) so a failed allocation is an error.
    pub(crate) fn row_staging(&mut self, device: &wgpu::Device, bytes: u64) -> RowStaging {
        if let Some(rows) = self.rows.as_ref().filter(|r| r.loss.size() >= bytes) {
            return rows.clone();
        }
        let make = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(256),
                usage: TENSOR_USAGES,
                mapped_at_creation: false,
            })
        };
        self.rows
            .insert(RowStaging {
                targets: make("wgpu-softmax targets"),
                upstream: make("wgpu-softmax grad_output"),
                loss: make("wgpu-softmax row losses"),
            })
            .clone()
    }
}

/// The most scratch sets kept for reuse; further concurrent calls allocate and drop their own.
const SCRATCH_KEPT: usize = 4;

/// The largest scratch set kept for reuse, in bytes of each of its buffers: a block of
/// [`HOST_CHUNK_BYTES`] plus the per-row staging of a one-column cross-entropy block. A larger
/// set serves one row longer than a block (up to a whole binding) and is dropped after the call,
/// rather than holding gigabytes of device memory for the context's lifetime.
const SCRATCH_KEPT_BYTES: u64 = 2 * HOST_CHUNK_BYTES;

/// Whether a scratch set of `bytes` per buffer goes back to a pool holding `pooled` sets.
fn keeps_scratch(pooled: usize, bytes: u64) -> bool {
    pooled < SCRATCH_KEPT && bytes <= SCRATCH_KEPT_BYTES
}

impl Context {
    /// Softmax of each row of `x`, a row-major batch of rows of `cols` values.
    ///
    /// `softmax(x)_j = exp(x_j - max(x)) / sum_k exp(x_k - max(x))`. A row holding NaN or +inf,
    /// or only -inf, becomes NaN; a -inf entry gets exactly 0. An empty batch gives an empty
    /// result.
    ///
    /// # Errors
    /// [`Error::ZeroCols`], [`Error::LengthNotMultiple`], [`Error::RowTooLong`] for a row wider
    /// than one storage binding, and device errors.
    ///
    /// ```no_run
    /// let ctx = wgpu_softmax::Context::new_blocking()?;
    /// let probs = ctx.softmax(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], 3)?;
    /// assert!((probs[3] - 1.0 / 3.0).abs() < 1e-6);
    /// # Ok::<(), wgpu_softmax::Error>(())
    /// ```
    pub fn softmax(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        let op = Normalization::Softmax;
        pollster::block_on(self.host_rowwise(op, x, cols, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Context::softmax`] into `out`, which must be as long as `x`: a loop over batches that
    /// reuses its output spares the allocation and the operating system's first touch of a
    /// fresh one.
    ///
    /// # Errors
    /// As [`Context::softmax`], and [`Error::LengthMismatch`] naming `out`; `out` is untouched
    /// when the arguments are refused.
    pub fn softmax_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        let op = Normalization::Softmax;
        pollster::block_on(self.host_rowwise(op, x, cols, out, Wait::Block))
    }

    /// Async form of [`Context::softmax`]. Like every async form it never blocks the calling
    /// thread on the device: the context polls the device on a thread of its own, started at the
    /// first async call and shared by all calls in flight.
    pub async fn softmax_async(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        let op = Normalization::Softmax;
        self.host_rowwise(op, x, cols, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Log-softmax of each row: `x_j - max(x) - ln(sum_k exp(x_k - max(x)))`, computed in that
    /// form (never as `ln(softmax)`), so large negative log-probabilities stay exact. Special
    /// values as for [`Context::softmax`], a -inf entry giving -inf.
    ///
    /// # Errors
    /// As [`Context::softmax`].
    pub fn log_softmax(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.host_rowwise(op, x, cols, &mut out, Wait::Block))?;
        Ok(out)
    }

    /// [`Context::log_softmax`] into `out`, which must be as long as `x`.
    ///
    /// # Errors
    /// As [`Context::softmax_into`].
    pub fn log_softmax_into(&self, x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
        let op = Normalization::LogSoftmax;
        pollster::block_on(self.host_rowwise(op, x, cols, out, Wait::Block))
    }

    /// Async form of [`Context::log_softmax`].
    pub async fn log_softmax_async(&self, x: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; x.len()];
        let op = Normalization::LogSoftmax;
        self.host_rowwise(op, x, cols, &mut out, Wait::Background)
            .await?;
        Ok(out)
    }

    /// Uploads a row-major batch of rows of `cols` values into a new [`Tensor`].
    ///
    /// # Errors
    /// [`Error::ZeroCols`], [`Error::LengthNotMultiple`], [`Error::TensorTooLarge`] beyond the
    /// device's `max_buffer_size`, and device errors.
    pub fn upload(&self, data: &[f32], cols: usize) -> Result<Tensor> {
        let rows = validate::batch_rows("data", data.len(), cols)?;
        let tensor = self.empty(rows, cols)?;
        self.gpu.scoped(|| {
            self.gpu
                .queue
                .write_buffer(&tensor.buffer, 0, bytemuck::cast_slice(data));
            Ok(())
        })?;
        Ok(tensor)
    }

    /// A new tensor of `rows x cols` zeros.
    ///
    /// # Errors
    /// [`Error::ZeroCols`], [`Error::TensorTooLarge`], and device errors such as
    /// [`Error::OutOfMemory`].
    pub fn empty(&self, rows: usize, cols: usize) -> Result<Tensor> {
        if cols == 0 {
            return Err(Error::ZeroCols);
        }
        let bytes = (cols as u64)
            .checked_mul(4)
            .and_then(|row| row.checked_mul(rows as u64))
            .ok_or(Error::ShapeTooLarge {
                what: "rows",
                value: rows,
                max: usize::MAX / cols / 4,
            })?;
        if bytes > self.gpu.limits.max_buffer_size {
            return Err(Error::TensorTooLarge {
                bytes,
                max: self.gpu.limits.max_buffer_size,
            });
        }
        let buffer = self.gpu.scoped(|| {
            Ok(self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-softmax tensor"),
                // A zero-sized binding is invalid, so an empty tensor still owns a few words;
                // whole vec4s, so that the kernels over unaligned rows find room for the last
                // row's last vec4 (`RowwiseFamily::unaligned_rows`).
                size: bytes.next_multiple_of(16).max(16),
                usage: TENSOR_USAGES,
                mapped_at_creation: false,
            }))
        })?;
        Ok(Tensor {
            ctx: self.clone(),
            buffer,
            rows,
            cols,
        })
    }

    /// Records `output = softmax(input)` for `rows x cols` f32 into the caller's `encoder`.
    /// Nothing is submitted; the buffers must stay alive until the caller submits. `input` and
    /// `output` are whole buffers (`&buffer`) or regions of them (`buffer.slice(offset..)`, see
    /// [`BufferRegion`]).
    ///
    /// # Errors
    /// [`Error::MissingUsage`] unless both buffers have `STORAGE`, [`Error::BufferTooSmall`],
    /// [`Error::Misaligned`] for a region that does not start on a multiple of 4 bytes,
    /// [`Error::Aliased`] when they are the same buffer, [`Error::ZeroCols`],
    /// [`Error::RowTooLong`].
    pub fn encode_softmax<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: impl Into<BufferRegion<'a>>,
        output: impl Into<BufferRegion<'a>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        self.encode_rowwise(Normalization::Softmax, encoder, input, output, rows, cols)
    }

    /// Records `output = log_softmax(input)`; see [`Context::encode_softmax`].
    ///
    /// # Errors
    /// As [`Context::encode_softmax`].
    pub fn encode_log_softmax<'a>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        input: impl Into<BufferRegion<'a>>,
        output: impl Into<BufferRegion<'a>>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let (input, output) = (input.into(), output.into());
        let op = Normalization::LogSoftmax;
        self.encode_rowwise(op, encoder, input, output, rows, cols)
    }

    fn encode_rowwise(
        &self,
        op: Normalization,
        encoder: &mut wgpu::CommandEncoder,
        input: BufferRegion<'_>,
        output: BufferRegion<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if cols == 0 {
            return Err(Error::ZeroCols);
        }
        let bytes = matrix_bytes(rows, cols);
        validate_encode(&[("input", input, bytes)], ("output", output, bytes))?;
        // The regions hold the shape's bytes, so its element count fits.
        let layout = AxisLayout::rows(rows, cols)?;
        let gpu = &self.gpu;
        gpu.scoped(|| record_normalize(gpu, encoder, op, [input, output], layout, None))
    }

    /// [`Context::encode_softmax`] and the log form along any axis.
    pub(crate) fn encode_normalize_along(
        &self,
        op: Normalization,
        encoder: &mut wgpu::CommandEncoder,
        [input, output]: [BufferRegion<'_>; 2],
        layout: AxisLayout,
    ) -> Result<()> {
        let bytes = layout_bytes(layout);
        validate_encode(&[("input", input, bytes)], ("output", output, bytes))?;
        let gpu = &self.gpu;
        gpu.scoped(|| record_normalize(gpu, encoder, op, [input, output], layout, None))
    }

    async fn host_rowwise(
        &self,
        op: Normalization,
        x: &[f32],
        cols: usize,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        let rows = validate::batch_rows("input", x.len(), cols)?;
        let layout = AxisLayout::rows(rows, cols)?;
        self.host_normalize(op, x, layout, out, wait).await
    }

    /// The host forms of softmax and log-softmax over `layout`, whose element count `x` has
    /// been checked to hold.
    pub(crate) async fn host_normalize(
        &self,
        op: Normalization,
        x: &[f32],
        layout: AxisLayout,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        validate::same_len("out", x.len(), out.len())?;
        let gpu = &self.gpu;
        gpu.check_alive()?;
        if layout.is_empty() {
            return Ok(());
        }
        let slab = layout.slab();
        let blocks = host_slab_blocks(gpu, layout)?;
        let chunk_bytes = (blocks[0].1 * slab * 4) as u64;
        let scratch = self.take_scratch(chunk_bytes)?;
        for (first, n) in blocks {
            let range = first * slab..(first + n) * slab;
            let block = AxisLayout::from_parts(n, layout.len(), layout.inner())?;
            let submission = gpu.scoped(|| {
                gpu.queue
                    .write_buffer(&scratch.input, 0, bytemuck::cast_slice(&x[range.clone()]));
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                let regions = [(&scratch.input).into(), (&scratch.output).into()];
                record_normalize(gpu, &mut encoder, op, regions, block, None)?;
                encoder.copy_buffer_to_buffer(
                    &scratch.output,
                    0,
                    &scratch.readback,
                    0,
                    (range.len() * 4) as u64,
                );
                Ok(gpu.queue.submit([encoder.finish()]))
            })?;
            gpu.read_mapped(&scratch.readback, submission, &mut out[range], wait)
                .await?;
        }
        self.give_scratch(scratch);
        Ok(())
    }

    /// Copies `out.len()` f32 from `buffer` at byte `offset` to the host, in bounded pieces.
    pub(crate) async fn download(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let gpu = &self.gpu;
        let piece = (HOST_CHUNK_BYTES / 4) as usize;
        let scratch = self.take_scratch((out.len().min(piece) * 4) as u64)?;
        for (i, part) in out.chunks_mut(piece).enumerate() {
            let start = offset + (i * piece * 4) as u64;
            let submission = gpu.scoped(|| {
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                encoder.copy_buffer_to_buffer(
                    buffer,
                    start,
                    &scratch.readback,
                    0,
                    (part.len() * 4) as u64,
                );
                Ok(gpu.queue.submit([encoder.finish()]))
            })?;
            gpu.read_mapped(&scratch.readback, submission, part, wait)
                .await?;
        }
        self.give_scratch(scratch);
        Ok(())
    }

    pub(crate) fn take_scratch(&self, bytes: u64) -> Result<Scratch> {
        let reuse = {
            let mut pool = self.gpu.scratch.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter()
                .position(|s| s.input.size() >= bytes)
                .map(|i| pool.swap_remove(i))
        };
        match reuse {
            Some(scratch) => Ok(scratch),
            None => self
                .gpu
                // Whole vec4s, so that the kernels over unaligned rows find room for the last
                // row's last vec4 (`RowwiseFamily::unaligned_rows`).
                .scoped(|| {
                    Ok(Scratch::new(
                        &self.gpu.device,
                        bytes.next_multiple_of(16).max(256),
                    ))
                }),
        }
    }

    pub(crate) fn give_scratch(&self, scratch: Scratch) {
        let mut pool = self.gpu.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if keeps_scratch(pool.len(), scratch.input.size()) {
            pool.push(scratch);
        }
    }
}

/// The softmax-family call computing `dst = op(src)`.
pub(crate) fn normalize_call<'a>(
    op: Normalization,
    src: Operand<'a>,
    dst: Operand<'a>,
    rows: usize,
    cols: usize,
) -> RowCall<'a> {
    RowCall {
        rows,
        cols,
        inner: 1,
        operands: vec![src, dst],
        constants: vec![op.constant()],
        words: [0; 4],
        extra: 0,
        tally: false,
    }
}

/// The bytes of a `rows x cols` f32 matrix, saturating: a shape too large to exist then fails
/// the buffer-size check instead of overflowing.
pub(crate) fn matrix_bytes(rows: usize, cols: usize) -> u64 {
    (rows as u64).saturating_mul((cols as u64).saturating_mul(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_pool_keeps_a_few_sets_of_bounded_size() {
        // Every block-sized set is kept, up to the count.
        assert!(keeps_scratch(0, 256));
        assert!(keeps_scratch(SCRATCH_KEPT - 1, HOST_CHUNK_BYTES));
        assert!(!keeps_scratch(SCRATCH_KEPT, 256));
        // A one-column cross-entropy block: the matrix plus as many row words again.
        assert!(keeps_scratch(0, 2 * HOST_CHUNK_BYTES));
        // A set made for one row of 2^25 + 1 floats (about 128 MiB) goes.
        assert!(!keeps_scratch(0, ((1 << 25) + 1) * 4));
    }
}
