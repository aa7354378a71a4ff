//! Softmax, log-softmax and their backward along an axis that is not the last
//! (`shaders/axis.wgsl`): an invocation per line of the axis, or per chunk of a line.

use std::sync::Mutex;

use super::rowwise::{partials_buffer, Params, COMMON, SUBGROUP_ABSENT};
use super::{Access, Dispatch, Normalization, PipelineKey, ShaderFamily, Timestamps, Window};
use crate::context::{cached_buffer, Gpu};
use crate::error::{Error, Result};
use crate::layout::AxisLayout;
use crate::region::BufferRegion;

impl AxisFamily {
    /// Lines of at most this many elements, in one chunk, are held in registers (the shader's
    /// `SUM_BLOCK`): read once, and `exp` once per element.
    pub(crate) const REGISTER_LEN: usize = 32;
}

/// What a call along an axis computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AxisOp {
    /// `output = softmax(input)` or log-softmax.
    Normalize(Normalization),
    /// `output = backward(y = input, dy = grad)` of softmax or log-softmax.
    Backward(Normalization),
}

impl AxisOp {
    /// Words of partials a chunk of a line leaves: (max, sum) forward, the sum `r` backward.
    pub(crate) fn partial_words(self) -> usize {
        self.entries(false).1
    }

    /// The entry points of a split line (partials, then output), scalar or four lines per
    /// invocation (`vec4`), and the words of a line's partial.
    fn entries(self, vec4: bool) -> ([&'static str; 2], usize, Normalization) {
        match (self, vec4) {
            (AxisOp::Normalize(n), false) => (["stats", "normalize"], 2, n),
            (AxisOp::Normalize(n), true) => (["stats4", "normalize4"], 2, n),
            (AxisOp::Backward(n), false) => (["dot", "backward"], 1, n),
            (AxisOp::Backward(n), true) => (["dot4", "backward4"], 1, n),
        }
    }
}

/// One call along an axis whose `inner` is not 1, on validated regions.
pub(crate) struct AxisCall<'a> {
    pub op: AxisOp,
    pub layout: AxisLayout,
    pub input: BufferRegion<'a>,
    /// `dy` of the backward; `None` for the forward.
    pub grad: Option<BufferRegion<'a>>,
    pub output: BufferRegion<'a>,
}

/// The compiled kernels along an axis.
pub(crate) struct AxisFamily {
    shader: ShaderFamily,
    /// Per-chunk partials of split lines, grown on demand and shared by all calls: each call's
    /// partials pass is followed at once by its output pass, which wgpu orders after it.
    partials: Mutex<wgpu::Buffer>,
}

impl AxisFamily {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        let source = format!(
            "{COMMON}\n{SUBGROUP_ABSENT}\n{}",
            include_str!("../../shaders/axis.wgsl")
        );
        let bindings = [
            Access::Uniform,
            Access::Read,
            Access::Read,
            Access::ReadWrite,
            Access::ReadWrite,
        ];
        Self {
            shader: ShaderFamily::new(device, "axis", &source, &bindings),
            partials: Mutex::new(partials_buffer(device, 64)),
        }
    }

    /// How `layout`'s lines are cut, where an invocation takes `lines_per_invocation` of them
    /// (4 as `vec4`s, else 1) and a chunk leaves `partial_words` words of partials per line:
    /// (chunks per line, elements per chunk).
    ///
    /// Whatever the table asks, a line has no more chunks than keeps its partials within its
    /// own elements' words, so that blocks of slabs sized by the operands bind their partials
    /// too (chunks of 1 element once left a block's partials past a 64 KiB binding, and its
    /// later slabs wrong). The loop budget's chunks ([`Tuning::axis_chunks`]) are never more
    /// than that: they keep a quarter of the budget's elements each.
    ///
    /// [`Tuning::axis_chunks`]: super::plan::Tuning::axis_chunks
    pub(crate) fn chunks(
        gpu: &Gpu,
        layout: AxisLayout,
        lines_per_invocation: usize,
        partial_words: usize,
    ) -> (usize, usize) {
        let len = layout.len();
        let invocations = layout.lines().div_ceil(lines_per_invocation);
        let chunks = gpu.tuning.axis_chunks(invocations, len, &gpu.caps);
        let chunks = chunks.min(len / partial_words.max(1)).max(1);
        let chunk = len.div_ceil(chunks);
        // Rounding the chunk up can leave fewer chunks than asked for; none is empty.
        (len.div_ceil(chunk), chunk)
    }

    /// Whether `call` runs four neighbouring lines per invocation as `vec4`s: the tuning allows
    /// vec4 loads and `inner` ([`Tuning::axis_vec4_max_inner`](crate::Tuning)), `inner` is a
    /// multiple of 4 and every operand starts on 16 bytes (so that each block of slabs does
    /// too).
    pub(crate) fn vec4(gpu: &Gpu, call: &AxisCall<'_>) -> bool {
        let aligned = [Some(call.input), call.grad, Some(call.output)]
            .into_iter()
            .flatten()
            .all(|region| region.offset().is_multiple_of(16));
        Self::vec4_for(gpu, call.layout, aligned)
    }

    /// [`AxisFamily::vec4`] for `layout` on operands that start on 16 bytes (`aligned`) or not.
    pub(crate) fn vec4_for(gpu: &Gpu, layout: AxisLayout, aligned: bool) -> bool {
        let inner = layout.inner();
        let tuning = &gpu.tuning;
        tuning.vector == 4
            && inner.is_multiple_of(4)
            && inner <= tuning.axis_vec4_max_inner as usize
            && aligned
    }

    /// The dispatches computing `call`, in blocks of outer slabs that fit one binding.
    pub(crate) fn plan(&self, gpu: &Gpu, call: &AxisCall<'_>) -> Result<Vec<Dispatch>> {
        let layout = call.layout;
        if layout.is_empty() {
            return Ok(Vec::new());
        }
        let (len, inner, slab) = (layout.len(), layout.inner(), layout.slab());
        let (align, max_binding) = (gpu.storage_align(), gpu.max_binding());
        let blocks = super::row_blocks(layout.outer(), slab, max_binding, align, usize::MAX)
            .map_err(|e| match e {
                Error::RowTooLong {
                    bytes, max_binding, ..
                } => Error::SlabTooLarge {
                    len,
                    inner,
                    bytes,
                    max_binding,
                },
                other => other,
            })?;
        let vec4 = Self::vec4(gpu, call);
        let (entries, partial_words, normalization) = call.op.entries(vec4);
        // An invocation takes one line, or four neighbouring ones.
        let lines_per_invocation = if vec4 { 4 } else { 1 };
        let (chunks, chunk) = Self::chunks(gpu, layout, lines_per_invocation, partial_words);
        let entries = if chunks > 1 {
            &entries[..]
        } else {
            &entries[1..]
        };
        let items = if chunks == 1 && len <= Self::REGISTER_LEN {
            len
        } else {
            0
        };
        let wg = gpu.tuning.axis_workgroup;
        let constants = vec![
            ("WG", wg),
            ("ITEMS", items as u32),
            normalization.constant(),
        ];
        let pipelines: Vec<_> = entries
            .iter()
            .map(|&entry| {
                let key = PipelineKey {
                    entry,
                    constants: constants.clone(),
                };
                (entry, self.shader.pipeline(&gpu.device, &key))
            })
            .collect();

        let max_slabs = blocks.iter().map(|b| b.1).max().unwrap_or(0);
        let partial_bytes = if chunks > 1 {
            (max_slabs * chunks * inner * partial_words * 4) as u64
        } else {
            0
        };
        let partials = cached_buffer(&gpu.device, &self.partials, partial_bytes, || {
            partials_buffer(&gpu.device, partial_bytes)
        })?;
        let max_dim = gpu.limits.max_compute_workgroups_per_dimension;
        let mut dispatches = Vec::new();
        for (first, n) in blocks {
            let start = (first * slab * 4) as u64;
            let elements = (n * slab) as u64;
            let window = |region: BufferRegion<'_>| {
                Window::new(
                    region.buffer(),
                    region.offset() + start,
                    elements,
                    align,
                    max_binding,
                )
            };
            let grad = match call.grad {
                Some(region) => window(region),
                None => Window::new(&gpu.unused_read, 0, 4, align, max_binding),
            };
            // A block's invocations, one per (slab, chunk, line or four), are at most its
            // elements, which one binding (at most 2^29 f32) holds: u32 throughout.
            let invocations = n * chunks * inner / lines_per_invocation;
            let partial_len = if chunks > 1 {
                invocations * lines_per_invocation * partial_words
            } else {
                // vec4 kernels declare the binding as vec4s.
                4
            };
            let windows = vec![
                window(call.input),
                grad,
                window(call.output),
                Window::new(&partials, 0, partial_len as u64, align, max_binding),
            ];
            let groups = invocations.div_ceil(wg as usize) as u32;
            let mut base = [0u32; 8];
            for (slot, window) in base.iter_mut().zip(&windows) {
                *slot = window.base;
            }
            let params = Params {
                rows: n as u32,
                cols: len as u32,
                grid_x: super::grid(groups, max_dim).0,
                chunk: chunk as u32,
                chunks: chunks as u32,
                spin: 0,
                extra: inner as u32,
                groups,
                base,
                words: [0; 4],
            };
            for (entry, pipeline) in &pipelines {
                dispatches.push(Dispatch {
                    entry,
                    pipeline: pipeline.clone(),
                    params: bytemuck::bytes_of(&params).to_vec(),
                    windows: windows.clone(),
                    workgroups: groups,
                });
            }
        }
        Ok(dispatches)
    }

    /// Records `call` into `encoder`.
    pub(crate) fn encode(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        call: &AxisCall<'_>,
        timestamps: Option<Timestamps<'_>>,
    ) -> Result<()> {
        let dispatches = self.plan(gpu, call)?;
        super::record(&gpu.device, &self.shader, encoder, &dispatches, timestamps)
    }
}
