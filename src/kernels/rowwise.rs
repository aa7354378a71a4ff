//! The engine shared by every row-wise kernel family: strategy choice, row blocks that fit one
//! storage binding, operand windows, split-row partials, and the uniform parameter block.
//!
//! A family (one shader file) is described by a [`FamilyDesc`]: its operand bindings and the
//! entry point of each strategy. A call supplies operands, shape, specialisation constants and
//! op-specific words; [`RowwiseFamily::plan`] turns it into dispatches.

use std::sync::Mutex;

use super::plan::{Strategy, Tuning, MAX_ITEMS, MAX_ITEMS_VEC4, TALLY_MAX_SLOTS};
use super::{Access, Dispatch, PipelineKey, ShaderFamily, Window};
use crate::context::Gpu;
use crate::error::{Error, Result};
use crate::region::BufferRegion;

/// A kernel family: shader source (`common.wgsl`, the subgroup functions and, for a family with
/// [`OnePass`] kernels, `one_pass.wgsl` are prepended),
/// operand bindings (1.., before the partials binding), the entry points, and the 32-bit words of
/// split-row statistics per chunk.
pub(crate) struct FamilyDesc {
    pub name: &'static str,
    pub source: &'static str,
    pub operands: &'static [Access],
    /// One team per row (`TEAM` selects an invocation, a subgroup or the workgroup).
    pub rows: &'static str,
    /// The two passes of a split row, per-chunk statistics then the per-chunk output; `None`
    /// when the family cannot split rows (one workgroup per row stands in).
    pub split: Option<[&'static str; 2]>,
    /// The same over vec4, for aligned rows.
    pub vec4: Option<Vec4Kernels>,
    pub partial_words: usize,
}

/// A family's vec4 entry points: `rows`, then the split pair, and the most `ITEMS` (vec4s per
/// invocation) its `rows` holds in registers (the scalar `rows` holds at most [`MAX_ITEMS`]);
/// and the kernels of a split row taken in one pass over the input, where the family has them.
#[derive(Clone, Copy)]
pub(crate) struct Vec4Kernels {
    pub entries: [&'static str; 3],
    /// The operands (indices into [`FamilyDesc::operands`]) these entry points see as arrays
    /// of vec4; they read the others element by element.
    pub views: &'static [usize],
    pub max_items: u32,
    pub one_pass: Option<OnePass>,
    /// A streamed `rows` and the split pair over the vec4 views, for rows that are not a
    /// multiple of 4 columns ([`RowwiseFamily::unaligned_rows`]), where the family has them.
    pub unaligned_rows: Option<[&'static str; 3]>,
}

/// A split row taken in one pass over the input (`shaders/one_pass.wgsl`): the one pass, with
/// `ITEMS` vec4s of the chunk per invocation and the spin bound `p.spin`, then a workgroup per row
/// finishing the chunks it left and clearing the sync words (or, with [`Tuning::split_alone`],
/// the one pass alone, `ALONE`, its rows finished by their last chunk); `wait`, the field of
/// [`Tuning`] that bounds the spin (0: two passes instead). The sync words are a chunk's partial
/// and a done flag (a state, `ALONE`) per chunk, and two counts per row.
#[derive(Clone, Copy)]
pub(crate) struct OnePass {
    pub wait: fn(&Tuning) -> u32,
}

/// The entry points of [`OnePass`] kernels, the same in every family that has them.
const ONE_PASS_ENTRIES: [&str; 2] = ["split_fused4", "split_rest4"];

pub(crate) const COMMON: &str = include_str!("../../shaders/common.wgsl");
const SUBGROUP: &str = include_str!("../../shaders/subgroup.wgsl");
pub(crate) const SUBGROUP_ABSENT: &str = include_str!("../../shaders/subgroup_absent.wgsl");
const ONE_PASS: &str = include_str!("../../shaders/one_pass.wgsl");

pub(crate) const SOFTMAX: FamilyDesc = FamilyDesc {
    name: "softmax",
    source: include_str!("../../shaders/softmax.wgsl"),
    operands: &[Access::Read, Access::ReadWrite],
    rows: "rows",
    split: Some(["split_partials", "split_normalize"]),
    vec4: Some(Vec4Kernels {
        entries: ["rows4", "split_partials4", "split_normalize4"],
        views: &[0, 1],
        max_items: MAX_ITEMS_VEC4,
        one_pass: Some(OnePass {
            wait: |tuning| tuning.split_wait,
        }),
        unaligned_rows: Some([
            "rows_unaligned4",
            "split_partials_unaligned4",
            "split_normalize_unaligned4",
        ]),
    }),
    partial_words: 2,
};

pub(crate) const BACKWARD: FamilyDesc = FamilyDesc {
    name: "softmax_backward",
    source: include_str!("../../shaders/backward.wgsl"),
    operands: &[Access::Read, Access::Read, Access::ReadWrite],
    rows: "rows",
    split: Some(["split_partials", "split_finish"]),
    vec4: Some(Vec4Kernels {
        entries: ["rows4", "split_partials4", "split_finish4"],
        views: &[0, 1, 2],
        max_items: MAX_ITEMS,
        one_pass: Some(OnePass {
            wait: |tuning| tuning.backward_split_wait,
        }),
        unaligned_rows: Some([
            "rows_unaligned4",
            "split_partials_unaligned4",
            "split_finish_unaligned4",
        ]),
    }),
    partial_words: 1,
};

pub(crate) const CROSS_ENTROPY: FamilyDesc = FamilyDesc {
    name: "cross_entropy",
    source: include_str!("../../shaders/cross_entropy.wgsl"),
    // logits, targets, weight, grad_output, loss_rows, grad, stats
    operands: &[
        Access::Read,
        Access::Read,
        Access::Read,
        Access::Read,
        Access::ReadWrite,
        Access::ReadWrite,
        Access::ReadWrite,
    ],
    rows: "rows",
    split: Some(["split_partials", "split_finish"]),
    vec4: Some(Vec4Kernels {
        entries: ["rows4", "split_partials4", "split_finish4"],
        views: &[0, 5],
        max_items: MAX_ITEMS_VEC4,
        one_pass: Some(OnePass {
            wait: |tuning| tuning.loss_split_wait,
        }),
        unaligned_rows: Some([
            "rows_unaligned4",
            "split_partials_unaligned4",
            "split_finish_unaligned4",
        ]),
    }),
    partial_words: 4,
};

pub(crate) const JACOBIAN: FamilyDesc = FamilyDesc {
    name: "softmax_jacobian",
    source: include_str!("../../shaders/jacobian.wgsl"),
    operands: &[Access::Read, Access::ReadWrite],
    rows: "rows",
    split: None,
    vec4: None,
    partial_words: 1,
};

/// Workgroup size of the passes that sum over the batch: at most ...
const BATCH_MAX_WORKGROUP: u32 = 256;
/// ... at least ... (and otherwise enough for blocks of `Tuning::batch_rows` rows per
/// invocation).
const BATCH_MIN_WORKGROUP: u32 = 32;

/// Mirrors `Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub rows: u32,
    pub cols: u32,
    pub grid_x: u32,
    pub chunk: u32,
    pub chunks: u32,
    pub spin: u32,
    pub extra: u32,
    pub groups: u32,
    pub base: [u32; 8],
    pub words: [u32; 4],
}

/// Where an operand of a row-wise call lives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operand<'a> {
    /// `width` 32-bit elements per row, rows contiguous, starting at byte `offset`.
    Rows {
        buffer: &'a wgpu::Buffer,
        offset: u64,
        width: usize,
    },
    /// The same `len` 32-bit elements for every row (class weights, statistics), or a binding
    /// the kernel variant does not read.
    Shared {
        buffer: &'a wgpu::Buffer,
        offset: u64,
        len: usize,
    },
}

impl<'a> Operand<'a> {
    /// A `[rows x cols]` matrix at the start of `buffer`.
    pub(crate) fn matrix(buffer: &'a wgpu::Buffer, cols: usize) -> Self {
        BufferRegion::from(buffer).rows(cols)
    }

    /// `len` words at the start of `buffer`, the same for every row.
    pub(crate) fn shared(buffer: &'a wgpu::Buffer, len: usize) -> Self {
        BufferRegion::from(buffer).shared(len)
    }

    fn row_bytes(&self) -> u64 {
        match self {
            Operand::Rows { width, .. } => *width as u64 * 4,
            Operand::Shared { .. } => 0,
        }
    }

    /// The operand's window over rows `first_row ..` `+ rows`, ending on a whole vec4 of the
    /// buffer where its rows are `whole_vec4s` elements wide (the buffer must hold that vec4).
    fn window(
        &self,
        first_row: usize,
        rows: usize,
        gpu: &Gpu,
        whole_vec4s: Option<usize>,
    ) -> Window {
        let (align, max) = (gpu.storage_align(), gpu.max_binding());
        match *self {
            Operand::Rows {
                buffer,
                offset,
                width,
            } => {
                let start = offset + (first_row * width * 4) as u64;
                let mut end = start + (rows * width * 4) as u64;
                if whole_vec4s == Some(width) {
                    end = end.next_multiple_of(16);
                }
                Window::new(buffer, start, (end - start) / 4, align, max)
            }
            Operand::Shared {
                buffer,
                offset,
                len,
            } => Window::new(buffer, offset, len as u64, align, max),
        }
    }
}

/// How a call runs ([`RowwiseFamily::layout`]): its entry points (one, or a split's two),
/// workgroup size, `ITEMS`, `TEAM`, rows or chunks per workgroup, elements per chunk (0: rows
/// are not split), chunks per row, and row blocks (first row, rows).
struct Layout {
    entries: Vec<&'static str>,
    wg: u32,
    items: u32,
    team: u32,
    per_group: usize,
    chunk: u32,
    chunks: usize,
    blocks: Vec<(usize, usize)>,
    /// A split row in one pass: the spin bound of its first entry ([`RowwiseFamily::one_pass`]).
    spin: Option<u32>,
    /// The rows are not a multiple of 4 columns and the kernel reads them as the vec4s that
    /// hold them ([`RowwiseFamily::unaligned_rows`]): the windows of the operands seen as vec4
    /// end on a whole vec4.
    whole_vec4s: bool,
}

/// One call of a row-wise family.
#[derive(Clone)]
pub(crate) struct RowCall<'a> {
    pub rows: usize,
    pub cols: usize,
    /// 1: rows of `cols` contiguous elements. More: the rows are the lines of
    /// `[rows / inner, cols, inner]` along its middle axis (row `r` the line `(r / inner, r %
    /// inner)`), an invocation per line or per chunk of one, in blocks of whole slabs; the
    /// family's `rows` entry and split pair read them so with `LINES` among the constants and
    /// `inner` in `p.spin` (the cross-entropy family).
    pub inner: usize,
    /// Bindings 1.. in the family's order.
    pub operands: Vec<Operand<'a>>,
    /// Op-specific specialisation constants, besides WG and ITEMS.
    pub constants: Vec<(&'static str, u32)>,
    /// Op-specific uniform words.
    pub words: [u32; 4],
    /// One more op-specific word (cross-entropy: the mean's divisor, where the host knows it).
    pub extra: u32,
    /// The row kernel adds one word per row over the dispatch through the family's tally
    /// (`ROW_TALLY`, the tally at binding 8): only for a call [`RowwiseFamily::can_tally`]
    /// accepts.
    pub tally: bool,
}

/// A compiled kernel family whose kernels run over rows.
pub(crate) struct RowwiseFamily {
    shader: ShaderFamily,
    desc: &'static FamilyDesc,
    /// Per-chunk statistics of split rows; grown on demand and shared by all calls, which is
    /// safe because wgpu orders the dispatches that touch it and the queue runs each call's
    /// passes back to back.
    partials: Mutex<wgpu::Buffer>,
    /// The counter and slots of the tallies (one-pass batch sums, [`RowwiseFamily::batch_sum`],
    /// and row kernels with [`RowCall::tally`]), and the sync words of split rows taken in one
    /// pass ([`OnePass`]); all 0 between calls (each call's last pass leaves it
    /// as its first found it), and grown on demand (a new buffer is zeroed).
    zeroed: Mutex<wgpu::Buffer>,
}

impl RowwiseFamily {
    /// Compiles the family; `subgroups`: with subgroup operations, for a device whose fixed
    /// subgroup size the pipelines get as `SG` (without them, `SG` is 1 and a "subgroup" is one
    /// invocation).
    pub(crate) fn new(device: &wgpu::Device, desc: &'static FamilyDesc, subgroups: bool) -> Self {
        let mut bindings = vec![Access::Uniform];
        bindings.extend_from_slice(desc.operands);
        bindings.push(Access::ReadWrite);
        let subgroup = if subgroups { SUBGROUP } else { SUBGROUP_ABSENT };
        let one_pass = match desc.vec4.and_then(|v| v.one_pass) {
            Some(_) => ONE_PASS,
            None => "",
        };
        let source = format!("{COMMON}\n{subgroup}\n{one_pass}\n{}", desc.source);
        Self {
            shader: ShaderFamily::new(device, desc.name, &source, &bindings),
            desc,
            partials: Mutex::new(partials_buffer(device, 64)),
            zeroed: Mutex::new(zeroed_buffer(device, 64)),
        }
    }

    /// Whether the row kernel can add up one word per row of `call` through the tally: the call
    /// runs as one dispatch of it (one block of rows, at least one, none of them split) of at
    /// most `max_groups` workgroups (and at most [`TALLY_MAX_SLOTS`]). Only such a call may ask
    /// for [`RowCall::tally`].
    pub(crate) fn can_tally(&self, gpu: &Gpu, call: &RowCall<'_>, max_groups: u32) -> Result<bool> {
        let layout = self.layout(gpu, call)?;
        let max_groups = max_groups.min(TALLY_MAX_SLOTS) as usize;
        Ok(match layout.blocks[..] {
            [(_, rows)] if rows > 0 && layout.chunk == 0 => {
                rows.div_ceil(layout.per_group) <= max_groups
            }
            _ => false,
        })
    }

    /// How `call` runs: the kernels, their shape, and the row blocks.
    fn layout(&self, gpu: &Gpu, call: &RowCall<'_>) -> Result<Layout> {
        if call.inner > 1 {
            return self.lines_layout(gpu, call);
        }
        let tuning = &gpu.tuning;
        let (rows, cols) = (call.rows, call.cols);
        let row_bytes = call
            .operands
            .iter()
            .map(Operand::row_bytes)
            .max()
            .unwrap_or(0);
        // The widest operand row is the work of one row (C * C for the Jacobian).
        let width = (row_bytes as usize / 4).max(cols);
        let desc = self.desc;
        // vec4 kernels read and write the operands they see as vec4 (`Vec4Kernels::views`)
        // with a row of `cols` elements four at a time, so those must start at a multiple of
        // 16 bytes.
        let aligned = self.vec4_rows(call).all(|operand| match operand {
            Operand::Rows { offset, .. } => offset.is_multiple_of(16),
            Operand::Shared { .. } => true,
        });
        // Rows that are not a multiple of 4 columns are read as the vec4s that hold them only
        // where every operand seen as vec4 holds its last row's last vec4 whole.
        let room = self.vec4_rows(call).all(|operand| match *operand {
            Operand::Rows {
                buffer,
                offset,
                width,
            } => (offset + (rows * width * 4) as u64).next_multiple_of(16) <= buffer.size(),
            Operand::Shared { .. } => true,
        });
        let (strategy, vector) = self.choose(gpu, rows, cols, width, aligned, room);
        let vec4 = desc.vec4.filter(|_| vector == 4);
        let unaligned = vec4
            .and_then(|v| v.unaligned_rows)
            .filter(|_| !cols.is_multiple_of(4));
        let (rows_entry, split_entries) = match (vec4, unaligned, desc.split) {
            (_, Some([rows, partials, finish]), _) => (rows, Some([partials, finish])),
            (Some(v), None, _) => {
                let [rows, partials, finish] = v.entries;
                (rows, Some([partials, finish]))
            }
            (None, _, split) => (desc.rows, split),
        };
        let sg = gpu.caps.subgroup_size.unwrap_or(1);
        let mut spin = None;
        // (entry points, workgroup size, items, team, rows or chunks per workgroup, chunk)
        let (entries, wg, items, team, per_group, chunk): (
            Vec<&'static str>,
            u32,
            u32,
            u32,
            usize,
            u32,
        ) = match (strategy, &split_entries) {
            (Strategy::RowPerThread { items }, _) => {
                // A streamed row is long work for one invocation: smaller workgroups spread a
                // batch of a few hundred rows over every core of a software adapter.
                let wg = if items == 0 {
                    tuning.row_workgroup_on(&gpu.caps)
                } else {
                    tuning.thread_workgroup
                };
                (vec![rows_entry], wg, items, 0, wg as usize, 0)
            }
            (Strategy::RowPerSubgroup { items }, _) => {
                let wg = tuning.subgroup_workgroup;
                (vec![rows_entry], wg, items, 1, (wg / sg) as usize, 0)
            }
            (Strategy::RowPerWorkgroup { items }, _) => {
                let wg = tuning.row_workgroup_on(&gpu.caps);
                (vec![rows_entry], wg, items, 2, 1, 0)
            }
            (
                Strategy::SplitRow {
                    chunk,
                    per_invocation,
                },
                Some(split),
            ) => {
                // vec4 kernels take chunks of whole vec4s, but for unaligned rows, whose chunks
                // start anywhere within a vec4 anyway.
                let chunk = match unaligned {
                    Some(_) => chunk,
                    None => chunk.next_multiple_of(vector),
                };
                let wg = tuning.row_workgroup_on(&gpu.caps);
                if let Some((one_pass, items)) = self.one_pass(gpu, strategy, vector, cols) {
                    spin = Some(self.spin(gpu, one_pass));
                    let passes = if tuning.split_alone != 0 { 1 } else { 2 };
                    (ONE_PASS_ENTRIES[..passes].to_vec(), wg, items, 2, 1, chunk)
                } else if per_invocation {
                    (split.to_vec(), wg, 0, 0, wg as usize, chunk)
                } else {
                    (split.to_vec(), wg, 0, 2, 1, chunk)
                }
            }
            (Strategy::SplitRow { .. }, None) => unreachable!("replaced above"),
        };
        let chunks = if chunk == 0 {
            1
        } else {
            cols.div_ceil(chunk as usize)
        };
        // Split rows may run in groups of rows (`Tuning::split_group_bytes`), each group a block.
        let group_rows = match (chunk, tuning.split_group_bytes) {
            (0, _) | (_, 0) => usize::MAX,
            (_, group_bytes) => (u64::from(group_bytes) / row_bytes.max(1)).max(1) as usize,
        };
        // A window that ends on a whole vec4 may take up to 12 bytes more.
        let slack = if unaligned.is_some() { 16 } else { 0 };
        // A block binds its rows' partials (or a one-pass split's sync words, see `plan`) as
        // it binds their operands: with chunks of a few elements they outgrow the rows.
        let partial_words = match (chunk, spin) {
            (0, _) => 0,
            (_, None) => chunks * desc.partial_words,
            (_, Some(_)) => chunks * (desc.partial_words + 1) + 2,
        };
        let blocks = super::row_blocks(
            rows,
            (row_bytes as usize / 4).max(partial_words).max(1),
            gpu.max_binding().saturating_sub(slack),
            gpu.storage_align(),
            group_rows,
        )
        .map_err(|e| match e {
            Error::RowTooLong {
                bytes, max_binding, ..
            } => Error::RowTooLong {
                cols,
                bytes,
                max_binding,
            },
            other => other,
        })?;
        Ok(Layout {
            entries,
            wg,
            items,
            team,
            per_group,
            chunk,
            chunks,
            blocks,
            spin,
            whole_vec4s: unaligned.is_some(),
        })
    }

    /// Words of partials a chunk of a split row (or line) leaves.
    pub(crate) fn partial_words(&self) -> usize {
        self.desc.partial_words
    }

    /// [`RowwiseFamily::layout`] of rows that are lines along an axis ([`RowCall::inner`]): the
    /// scalar `rows` entry, an invocation per line (`Tuning::axis_workgroup` of them per
    /// workgroup, as the kernels along an axis), the line in registers up to [`LINE_ITEMS`]
    /// elements and streamed beyond; or, where the lines are few and long or longer than a
    /// software adapter lets an invocation loop over, the split pair with an invocation per
    /// chunk of a line, cut as the softmax along an axis cuts them
    /// ([`AxisFamily::chunks`](super::axis::AxisFamily::chunks)); in blocks of whole slabs that
    /// fit a binding.
    ///
    /// # Errors
    /// [`Error::SlabTooLarge`] for a slab larger than a binding.
    fn lines_layout(&self, gpu: &Gpu, call: &RowCall<'_>) -> Result<Layout> {
        let (rows, cols, inner) = (call.rows, call.cols, call.inner);
        let wg = gpu.tuning.axis_workgroup;
        let layout = crate::layout::AxisLayout::from_parts(rows / inner, cols, inner)?;
        let (entries, items, chunk, chunks) = match (
            super::axis::AxisFamily::chunks(gpu, layout, 1, self.desc.partial_words),
            self.desc.split,
        ) {
            ((chunks @ 2.., chunk), Some(split)) => (split.to_vec(), 0, chunk as u32, chunks),
            _ if cols <= LINE_ITEMS => (vec![self.desc.rows], cols as u32, 0, 1),
            _ => (vec![self.desc.rows], 0, 0, 1),
        };
        // A block's slabs bind every operand, and the partials of its lines' chunks, at once.
        let line_words = call
            .operands
            .iter()
            .map(|operand| operand.row_bytes() as usize / 4)
            .chain([if chunk > 0 {
                chunks * self.desc.partial_words
            } else {
                0
            }])
            .max()
            .unwrap_or(0);
        let blocks = super::row_blocks(
            rows / inner,
            line_words.max(1) * inner,
            gpu.max_binding(),
            gpu.storage_align(),
            usize::MAX,
        )
        .map_err(|e| match e {
            Error::RowTooLong {
                bytes, max_binding, ..
            } => Error::SlabTooLarge {
                len: cols,
                inner,
                bytes,
                max_binding,
            },
            other => other,
        })?
        .into_iter()
        .map(|(first, n)| (first * inner, n * inner))
        .collect();
        Ok(Layout {
            entries,
            wg,
            items,
            team: 0,
            per_group: wg as usize,
            chunk,
            chunks,
            blocks,
            spin: None,
            whole_vec4s: false,
        })
    }

    /// The kernels of a split row taken in one pass and the vec4s each invocation holds, where
    /// `strategy` (loading `vector` elements at a time) can be: the family has such kernels,
    /// their wait ([`OnePass::wait`]) is not 0, the rows of `cols` columns are aligned vec4
    /// rows, a workgroup takes each chunk, the chunk fits in its registers
    /// ([`Vec4Kernels::max_items`] vec4s per invocation), and on a device with a loop budget
    /// the pass that works out the chunks left keeps within it.
    pub(crate) fn one_pass(
        &self,
        gpu: &Gpu,
        strategy: Strategy,
        vector: u32,
        cols: usize,
    ) -> Option<(OnePass, u32)> {
        let Strategy::SplitRow {
            chunk,
            per_invocation: false,
        } = strategy
        else {
            return None;
        };
        let vec4 = self.desc.vec4?;
        let one_pass = vec4.one_pass?;
        if vector != 4 || !cols.is_multiple_of(4) || (one_pass.wait)(&gpu.tuning) == 0 {
            return None;
        }
        let wg = gpu.tuning.row_workgroup_on(&gpu.caps);
        let items = chunk.div_ceil(4).div_ceil(wg);
        if items > vec4.max_items {
            return None;
        }
        // Where a row's chunks do not run at once, one workgroup works them out one after
        // another (`split_rest4`, or the row's last chunk with `split_alone`), each combining
        // the row's partials: chunks x chunks / WG iterations, after up to a spin. A software
        // adapter ends an invocation past its loop budget, silently; two passes keep within it.
        // llvmpipe measured about 8 iterations per chunk and partial (softmax, a team of one:
        // wrong from 90 chunks a row, right at 80); lavapipe fewer.
        if let Some(budget) = gpu.caps.loop_budget {
            let chunks = (cols as u64).div_ceil(u64::from(chunk.max(1)));
            let per_chunk = 10 * chunks.div_ceil(u64::from(wg)) + 4 * u64::from(items) + 32;
            let rest = chunks * per_chunk + 2 * chunks.div_ceil(u64::from(wg));
            if u64::from(self.spin(gpu, one_pass)) + rest > budget {
                return None;
            }
        }
        Some((one_pass, items))
    }

    /// The spin bound of a one-pass split: its wait, kept to a quarter of the loop iterations a
    /// software adapter lets an invocation run.
    fn spin(&self, gpu: &Gpu, one_pass: OnePass) -> u32 {
        let budget = gpu.caps.loop_budget.map_or(u64::MAX, |b| b / 4);
        let wait = (one_pass.wait)(&gpu.tuning);
        u32::try_from(u64::from(wait).min(budget)).unwrap_or(u32::MAX)
    }

    /// The dispatches computing `call` over all its rows, in row blocks that fit one binding.
    /// Shapes and buffers have been validated by the caller.
    pub(crate) fn plan(&self, gpu: &Gpu, call: &RowCall<'_>) -> Result<Vec<Dispatch>> {
        let layout = self.layout(gpu, call)?;
        let (wg, items, team, chunk, chunks) = (
            layout.wg,
            layout.items,
            layout.team,
            layout.chunk,
            layout.chunks,
        );
        let (per_group, blocks) = (layout.per_group, &layout.blocks);
        let tuning = &gpu.tuning;
        let desc = self.desc;
        let sg = gpu.caps.subgroup_size.unwrap_or(1);
        let tally = call.tally;
        debug_assert!(
            !tally || self.can_tally(gpu, call, TALLY_MAX_SLOTS).unwrap_or(false),
            "a tally asked of a call that cannot have one"
        );
        let pipelines: Vec<_> = layout
            .entries
            .iter()
            .enumerate()
            .map(|(i, &entry)| {
                // The second entry of a split is its finishing pass; the others keep the
                // shader's default order (and the same pipeline key as without the field).
                let reverse = chunk > 0
                    && i == 1
                    && tuning.split_reverse != 0
                    && layout.spin.is_none()
                    && call.inner == 1;
                let extra: &[_] = match (reverse, tally, layout.spin) {
                    (true, _, _) => &[("REVERSE", 1)],
                    (_, true, _) => &[("ROW_TALLY", 1)],
                    (_, _, Some(_)) if i == 0 && layout.entries.len() == 1 => &[("ALONE", 1)],
                    _ => &[],
                };
                (
                    entry,
                    self.pipeline(gpu, call, entry, [wg, items, team, sg], extra),
                )
            })
            .collect();

        let max_rows = blocks.iter().map(|b| b.1).max().unwrap_or(0);
        let partial_bytes = (max_rows * chunks * desc.partial_words * 4) as u64;
        let (binding8, binding8_len) = if tally {
            // A counter and a slot per workgroup.
            let words = blocks[0].1.div_ceil(per_group) + 1;
            (self.zeroed(gpu, words)?, Some(words))
        } else if layout.spin.is_some() {
            // The sync words of the largest block (0 at rest, as the tallies' words): per chunk
            // its partial and a done flag, per row two counts (in and out).
            let words = max_rows * (chunks * (desc.partial_words + 1) + 2);
            (self.zeroed(gpu, words)?, Some(words))
        } else {
            let needed = if chunk == 0 { 0 } else { partial_bytes };
            let buffer =
                crate::context::cached_buffer(&gpu.device, &self.partials, needed, || {
                    partials_buffer(&gpu.device, partial_bytes)
                })?;
            (buffer, None)
        };

        let mut dispatches = Vec::new();
        for &(first, n) in blocks {
            let groups = if chunk == 0 { n } else { n * chunks }.div_ceil(per_group) as u32;
            let partial_len = match binding8_len {
                Some(words) => words,
                None if chunk == 0 => 1,
                None => n * chunks * desc.partial_words,
            };
            let windows = self.windows(
                gpu,
                call,
                (first, n),
                &binding8,
                partial_len,
                layout.whole_vec4s,
            );
            // Lines along an axis take `inner` in the spin bound's place (no pass of theirs
            // waits).
            let split = if call.inner > 1 {
                [chunk, chunks as u32, call.inner as u32]
            } else {
                [chunk, chunks as u32, layout.spin.unwrap_or(0)]
            };
            let block_params = |groups| params(gpu, call, n, &windows, groups, split);
            let params_all = block_params(groups);
            for (i, (entry, pipeline)) in pipelines.iter().enumerate() {
                // A one-pass split finishes with a workgroup per row.
                let (params, groups) = match layout.spin {
                    Some(_) if i == 1 => (block_params(n as u32), n as u32),
                    _ => (params_all.clone(), groups),
                };
                dispatches.push(Dispatch {
                    entry,
                    pipeline: pipeline.clone(),
                    params,
                    windows: windows.clone(),
                    workgroups: groups,
                });
            }
        }
        Ok(dispatches)
    }

    /// The operands of `call` with rows of its `cols` elements that the family's vec4 entry
    /// points see as vec4 ([`Vec4Kernels::views`]).
    fn vec4_rows<'c>(&self, call: &'c RowCall<'_>) -> impl Iterator<Item = &'c Operand<'c>> {
        let views = self.desc.vec4.map_or(&[][..], |v| v.views);
        views
            .iter()
            .filter_map(|&i| call.operands.get(i))
            .filter(move |operand| match operand {
                Operand::Rows { width, .. } => *width == call.cols,
                Operand::Shared { .. } => true,
            })
    }

    /// The entry points (`rows`, then the split pair) that take rows of `cols` columns, not a
    /// multiple of 4, over the vec4 views of the operands: `None` unless the family has them,
    /// the tuning allows vec4 loads, and the operands seen as vec4 ([`Vec4Kernels::views`])
    /// start at a multiple of 16 bytes (`aligned`) in bindings that start at one too (so their
    /// rows start at the same place within a vec4). The caller also checks that each of their
    /// buffers holds its last row's last vec4.
    ///
    /// A row (a chunk) is then the vec4s that hold any of its elements, in registers, streamed
    /// or split as for aligned rows of up to 3 more columns: on lavapipe and llvmpipe a vec4
    /// load costs about what a scalar one does, and the streamed softmax of `4096x4095` and
    /// `1024x50257` ran 1.3x to 1.9x faster so.
    pub(crate) fn unaligned_rows(
        &self,
        gpu: &Gpu,
        cols: usize,
        width: usize,
        aligned: bool,
    ) -> Option<[&'static str; 3]> {
        let entries = self.desc.vec4.and_then(|v| v.unaligned_rows)?;
        (gpu.tuning.vector >= 4
            && aligned
            && width == cols
            && !cols.is_multiple_of(4)
            && gpu.storage_align().is_multiple_of(16))
        .then_some(entries)
    }

    /// The strategy and elements per load (1, or 4 for the `vec4` kernels, over unaligned rows
    /// too: [`RowwiseFamily::unaligned_rows`]) for `rows` rows of `cols` columns whose widest
    /// operand row holds `width` elements, `aligned` when the operands with rows of `cols`
    /// elements that the vec4 kernels see as vec4 ([`Vec4Kernels::views`]) start at a multiple
    /// of 16 bytes, `room` when their buffers hold their last row's last vec4.
    pub(crate) fn choose(
        &self,
        gpu: &Gpu,
        rows: usize,
        cols: usize,
        width: usize,
        aligned: bool,
        room: bool,
    ) -> (Strategy, u32) {
        let tuning = &gpu.tuning;
        let vec4 = self.desc.vec4.filter(|_| rows > 0 && width == cols);
        let scalar = self.strategy(gpu, rows, width, None);
        let Some(v) = vec4 else {
            return (scalar, 1);
        };
        if tuning.vector_for(cols, aligned) == 4 {
            return (self.strategy(gpu, rows, width, Some(v)), 4);
        }
        if !room || self.unaligned_rows(gpu, cols, width, aligned).is_none() {
            return (scalar, 1);
        }
        if tuning.unaligned_items != 0 {
            // As an aligned row of the vec4s that hold it: up to 3 elements more.
            return (self.strategy(gpu, rows, width + 3, Some(v)), 4);
        }
        // Held in registers as scalars; read as vec4s where streamed or split.
        let streamed = matches!(
            scalar,
            Strategy::RowPerThread { items: 0 }
                | Strategy::RowPerSubgroup { items: 0 }
                | Strategy::RowPerWorkgroup { items: 0 }
                | Strategy::SplitRow { .. }
        );
        (scalar, if streamed { 4 } else { 1 })
    }

    /// The tuning's strategy for rows of `width` elements loaded by the family's `vec4`
    /// kernels (`Some`), held to what they keep in registers, or by its scalar ones, held to
    /// [`MAX_ITEMS`] by the planner; a family that cannot split rows takes a workgroup per row
    /// instead.
    fn strategy(
        &self,
        gpu: &Gpu,
        rows: usize,
        width: usize,
        vec4: Option<Vec4Kernels>,
    ) -> Strategy {
        let tuning = super::plan::Tuning {
            max_items: vec4.map_or(gpu.tuning.max_items, |v| {
                gpu.tuning.max_items.min(v.max_items)
            }),
            ..gpu.tuning
        };
        let vector = if vec4.is_some() { 4 } else { 1 };
        match tuning.choose(rows, width, &gpu.caps, vector) {
            Strategy::SplitRow { .. } if self.desc.split.is_none() => {
                Strategy::RowPerWorkgroup { items: 0 }
            }
            Strategy::SplitRow {
                mut chunk,
                per_invocation,
            } => {
                // A row's partials (or a one-pass split's sync words, one more a chunk and two
                // a row) bind at once, as its operands do: where a binding cannot hold them,
                // whatever the table asks, the chunks lengthen until it can (chunks of 1 over a
                // 40 KB row left 160 KB of partials, and a row that fits was refused).
                let limit = gpu.max_binding().saturating_sub(gpu.storage_align()) / 4;
                let words = |chunk: u32| {
                    let chunks = width.div_ceil(chunk as usize);
                    (chunks * (self.desc.partial_words + 1) + 2) as u64
                };
                while words(chunk) > limit && (chunk as usize) < width {
                    chunk *= 2;
                }
                Strategy::SplitRow {
                    chunk,
                    per_invocation,
                }
            }
            strategy => strategy,
        }
    }

    /// A sum over all `call.rows` rows (a reduction over the batch). A batch of one block takes
    /// `entries[1]` alone, one workgroup over the rows (`chunks` = 0). A batch of more than one
    /// block takes, as [`Tuning::batch_tally`] says:
    /// - two passes: `entries[0]` with one workgroup per block, leaving the block's sum in the
    ///   partials (one per invocation or one per workgroup, as [`Tuning::batch_team`] says),
    ///   then `entries[1]`, one workgroup adding the `chunks` partials;
    /// - or one: `entries[2]`, one workgroup per block (`chunks` of them), over a tally buffer
    ///   of a counter and a slot per block, all 0 between dispatches.
    ///
    /// Every pass gets the rows per block as `chunk`, the team as `TEAM`, and the constants
    /// `extra`. Operands they read must be small enough for one binding; others are clamped.
    ///
    /// [`Tuning::batch_team`]: super::plan::Tuning::batch_team
    /// [`Tuning::batch_tally`]: super::plan::Tuning::batch_tally
    pub(crate) fn batch_sum(
        &self,
        gpu: &Gpu,
        call: &RowCall<'_>,
        [first, finish, tally]: [&'static str; 3],
        extra: &[(&'static str, u32)],
    ) -> Result<Vec<Dispatch>> {
        // As wide as the device allows up to BATCH_MAX_WORKGROUP, and no wider than a block of
        // `batch_rows` rows per invocation needs: a small batch then pays for a narrow
        // workgroup's barrier, which on software adapters costs in proportion to its width.
        let batch_rows = gpu.tuning.batch_rows.max(1) as usize;
        let widest = BATCH_MAX_WORKGROUP
            .min(gpu.limits.max_compute_invocations_per_workgroup)
            .min(gpu.limits.max_compute_workgroup_size_x);
        let wg = u32::try_from(call.rows.div_ceil(batch_rows))
            .unwrap_or(u32::MAX)
            .next_power_of_two()
            .clamp(BATCH_MIN_WORKGROUP.min(widest), widest);
        let block = wg as usize * batch_rows;
        let groups = call.rows.div_ceil(block);
        let tallied =
            groups > 1 && groups <= TALLY_MAX_SLOTS as usize && gpu.tuning.batch_tally != 0;
        let (team, partial_count) = match (groups, gpu.tuning.batch_team) {
            (0 | 1, _) => (2, 0),
            _ if tallied => (2, groups),
            (_, 0) => (0, groups * wg as usize),
            _ => (2, groups),
        };
        // Binding 8: the tally (a counter, then a slot per block), or the partials.
        let (buffer, words) = if tallied {
            let words = groups + 1;
            (self.zeroed(gpu, words)?, words)
        } else {
            let words = partial_count.max(1) * self.desc.partial_words;
            let bytes = words as u64 * 4;
            let buffer = crate::context::cached_buffer(&gpu.device, &self.partials, bytes, || {
                partials_buffer(&gpu.device, bytes)
            })?;
            (buffer, words)
        };
        let windows = self.windows(gpu, call, (0, call.rows), &buffer, words, false);
        let groups = u32::try_from(groups).unwrap_or(u32::MAX);
        let chunks = u32::try_from(partial_count).unwrap_or(u32::MAX);
        let split = [block as u32, chunks, 0];
        let params = params(gpu, call, call.rows, &windows, groups, split);
        let sg = gpu.caps.subgroup_size.unwrap_or(1);
        let passes = if tallied {
            vec![(tally, groups)]
        } else if partial_count == 0 {
            vec![(finish, 1)]
        } else {
            vec![(first, groups), (finish, 1)]
        };
        Ok(passes
            .into_iter()
            .map(|(entry, workgroups)| Dispatch {
                entry,
                pipeline: self.pipeline(gpu, call, entry, [wg, 0, team, sg], extra),
                params: params.clone(),
                windows: windows.clone(),
                workgroups,
            })
            .collect())
    }

    /// The buffer of words that are 0 between calls (tallies, sync words), at least `words`
    /// long.
    fn zeroed(&self, gpu: &Gpu, words: usize) -> Result<wgpu::Buffer> {
        let bytes = words as u64 * 4;
        crate::context::cached_buffer(&gpu.device, &self.zeroed, bytes, || {
            zeroed_buffer(&gpu.device, bytes.next_power_of_two())
        })
    }

    /// Records `dispatches` into `encoder` in one compute pass.
    pub(crate) fn record(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        dispatches: &[Dispatch],
        timestamps: Option<super::Timestamps<'_>>,
    ) -> Result<()> {
        super::record(&gpu.device, &self.shader, encoder, dispatches, timestamps)
    }

    /// Plans and records `call`.
    pub(crate) fn encode(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        call: &RowCall<'_>,
        timestamps: Option<super::Timestamps<'_>>,
    ) -> Result<()> {
        let dispatches = self.plan(gpu, call)?;
        self.record(gpu, encoder, &dispatches, timestamps)
    }

    /// The pipeline of `entry` specialised with `[WG, ITEMS, TEAM, SG]`, the call's constants
    /// and `extra`.
    fn pipeline(
        &self,
        gpu: &Gpu,
        call: &RowCall<'_>,
        entry: &'static str,
        [wg, items, team, sg]: [u32; 4],
        extra: &[(&'static str, u32)],
    ) -> std::sync::Arc<wgpu::ComputePipeline> {
        let mut constants = vec![("WG", wg), ("ITEMS", items), ("TEAM", team), ("SG", sg)];
        constants.extend_from_slice(&call.constants);
        constants.extend_from_slice(extra);
        self.shader
            .pipeline(&gpu.device, &PipelineKey { entry, constants })
    }

    fn windows(
        &self,
        gpu: &Gpu,
        call: &RowCall<'_>,
        (first, rows): (usize, usize),
        partials: &wgpu::Buffer,
        partial_len: usize,
        whole_vec4s: bool,
    ) -> Vec<Window> {
        let views = self.desc.vec4.map_or(&[][..], |v| v.views);
        let mut windows: Vec<Window> = call
            .operands
            .iter()
            .zip(self.desc.operands)
            .enumerate()
            .map(|(i, (operand, access))| {
                let whole = (whole_vec4s && views.contains(&i)).then_some(call.cols);
                let window = operand.window(first, rows, gpu, whole);
                if window.size > 0 {
                    return window;
                }
                // Only an empty buffer of a call over no rows gives an empty window, and no
                // binding may be empty: the stand-in of the same access takes its place.
                let stand_in = match access {
                    Access::ReadWrite => &gpu.unused_write,
                    Access::Read | Access::Uniform => &gpu.unused_read,
                };
                // Four words: vec4 kernels declare their bindings as arrays of vec4.
                Window::new(stand_in, 0, 4, gpu.storage_align(), gpu.max_binding())
            })
            .collect();
        windows.push(Window::new(
            partials,
            0,
            partial_len as u64,
            gpu.storage_align(),
            gpu.max_binding(),
        ));
        windows
    }
}

fn params(
    gpu: &Gpu,
    call: &RowCall<'_>,
    rows: usize,
    windows: &[Window],
    groups: u32,
    [chunk, chunks, spin]: [u32; 3],
) -> Vec<u8> {
    let mut base = [0u32; 8];
    for (slot, window) in base.iter_mut().zip(windows) {
        *slot = window.base;
    }
    let params = Params {
        rows: rows as u32,
        cols: call.cols as u32,
        grid_x: super::grid(groups, gpu.limits.max_compute_workgroups_per_dimension).0,
        chunk,
        chunks,
        spin,
        extra: call.extra,
        groups,
        base,
        words: call.words,
    };
    bytemuck::bytes_of(&params).to_vec()
}

/// The most elements of a line along an axis ([`RowCall::inner`]) that the cross-entropy
/// family's `rows` entry holds in registers (the shader's `ROW_ITEMS`): twice a row's, so that
/// the 19 or 21 classes of a segmentation map are read once (1.5-1.6x on lavapipe against
/// streaming them, `16x21x16384` and `256x32x256`).
pub(crate) const LINE_ITEMS: usize = 2 * MAX_ITEMS as usize;

pub(crate) fn partials_buffer(device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
    storage_buffer(device, "wgpu-softmax partials", bytes)
}

fn zeroed_buffer(device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
    storage_buffer(device, "wgpu-softmax tallies and sync words", bytes)
}

fn storage_buffer(device: &wgpu::Device, label: &str, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.max(64),
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}
