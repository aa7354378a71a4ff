//! Lines too long for a block of them to stay in cache between its passes: softmax over dim 0
//! of a `[16384, 1024]` matrix, say, whose narrowest block (64 lines of 16 384 steps) spans
//! 4 MiB of each operand. Walked whole, such blocks read every element from memory three times
//! (max, sum, output), in runs of 256 bytes a page apart, which the hardware does not prefetch.
//!
//! Streamed instead, as the split rows are:
//!
//! 1. the steps down the axis are cut into chunks, and each chunk of a block of up to
//!    [`MAX_COLUMNS`] lines (a step a run of up to 4 KiB) is small enough for its two passes to
//!    share the cache: its lines' maxima and sums of exponentials, or their backward sums;
//! 2. each line's chunks combined, by the online-normalizer rule for the forward ops;
//! 3. each chunk again: the output.
//!
//! Every element is read twice from memory and written once, and consecutive tasks take
//! neighbouring blocks of the same steps, so that a thread reads runs of whole rows of a slab.

use rayon::prelude::*;

use super::{
    backward_block, block_dots, block_stats, block_width, line_scales, normalize_block, AlongOp,
    Block, Out, BLOCK_BYTES, COLUMNS, MAX_COLUMNS,
};
use crate::cpu::fast::Separate;
use crate::cpu::fast::{exp_nonpositive, larger, Isa, MulAdd, LANES, SERIAL_ELEMS};
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
use crate::cpu::fast::{Fused, Fused512};
use crate::layout::AxisLayout;

/// Whether `op`'s lines along `layout` are streamed: where the block that the walk would take
/// spans more than [`BLOCK_BYTES`] of an operand (it can be no narrower than [`COLUMNS`]
/// lines), and for the backward ops also where it is that narrow and a chunk would be wider:
/// runs of 256 bytes a page apart cost the backward, a multiply-add per element, more than a
/// second read of its operands does.
///
/// On 2 threads with AVX-512 (medians of 3 to 5 interleaved rounds), streamed against walked:
/// softmax 1.2-3.8x on blocks of 196 KiB to 4 MiB (`2x768x1024` to `1x16384x1024`), and
/// 0.63-1.05x on blocks within 128 KiB (`16x21x16384`, `256x32x256`, `8x256x4096`); the
/// backward ops 1.1-3.4x on the former, 1.4-1.8x on blocks of 64 lines within 128 KiB
/// (`16x300x512`), 1.0-1.15x on `4x512x2048`, but 0.75-0.98x on blocks of 128 lines
/// (`8x256x4096`, `16x256x2048`, `32x256x1024`) and 0.78-0.85x where the walk takes whole slab
/// rows (`16x21x16384`, `256x32x256`). Calls small enough to run on one thread never stream.
pub(super) fn takes(op: AlongOp, layout: AxisLayout, threads: usize) -> bool {
    let (len, inner) = (layout.len(), layout.inner());
    let width = block_width(layout.outer(), len, inner, threads);
    let backward = matches!(op, AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward);
    layout.numel() > SERIAL_ELEMS
        && (len * width.min(inner) * size_of::<f32>() > BLOCK_BYTES
            || backward && width <= COLUMNS && inner.div_ceil(width) > inner.div_ceil(MAX_COLUMNS))
}

/// How a layout is cut: blocks of `width` lines (the last narrower), chunks of `steps` steps
/// (the last shorter).
#[derive(Clone, Copy, Debug)]
struct Cut {
    outer: usize,
    len: usize,
    inner: usize,
    width: usize,
    blocks: usize,
    steps: usize,
    chunks: usize,
}

impl Cut {
    fn new(layout: AxisLayout) -> Self {
        let (len, inner) = (layout.len(), layout.inner());
        let blocks = inner.div_ceil(MAX_COLUMNS);
        let width = inner.div_ceil(blocks).next_multiple_of(LANES);
        let steps = (BLOCK_BYTES / (width * size_of::<f32>())).max(1);
        Self {
            outer: layout.outer(),
            len,
            inner,
            width,
            blocks,
            steps,
            chunks: len.div_ceil(steps),
        }
    }

    /// Tasks of phases 1 and 3: one per block of one chunk of one slab.
    fn tasks(&self) -> usize {
        self.outer * self.chunks * self.blocks
    }

    /// Task `t`'s slab and block: blocks of the same chunk of a slab are neighbouring tasks.
    fn task(&self, t: usize) -> (usize, Block) {
        let b = t % self.blocks;
        let c = t / self.blocks % self.chunks;
        let o = t / (self.blocks * self.chunks);
        let first = b * self.width;
        let start = c * self.steps;
        let block = Block {
            len: self.len,
            inner: self.inner,
            first,
            width: self.width.min(self.inner - first),
            start,
            end: (start + self.steps).min(self.len),
        };
        (o, block)
    }

    /// Where the partial statistics of a block's chunk start, in `[outer][chunks][inner]`.
    fn slot(&self, o: usize, block: &Block) -> usize {
        (o * self.chunks + block.start / self.steps) * self.inner + block.first
    }
}

/// Runs `op` over `layout` (see [`takes`]), as [`super::run_on`].
pub(super) fn run_on(
    isa: Isa,
    op: AlongOp,
    layout: AxisLayout,
    x: &[f32],
    dy: &[f32],
    out: &mut [f32],
) {
    let cut = Cut::new(layout);
    let slab = cut.len * cut.inner;
    let dy_slab = |o: usize| {
        if dy.is_empty() {
            dy
        } else {
            &dy[o * slab..][..slab]
        }
    };
    let forward = matches!(op, AlongOp::Softmax | AlongOp::LogSoftmax);
    let parts = cut.outer * cut.chunks * cut.inner;
    let mut part_max = vec![0f32; if forward { parts } else { 0 }];
    let mut part_sum = vec![0f64; parts];
    let (max_out, sum_out) = (Out::new(&mut part_max), Out::new(&mut part_sum));
    (0..cut.tasks()).into_par_iter().for_each(|t| {
        let (o, block) = cut.task(t);
        let slot = cut.slot(o, &block);
        let x = &x[o * slab..][..slab];
        // SAFETY: each task's slots are its own chunk's lines, within the partials.
        let sums = unsafe { sum_out.slice(slot, block.width) };
        if forward {
            // SAFETY: as above.
            let max = unsafe { max_out.slice(slot, block.width) };
            stats_on(isa, x, block, max, sums);
        } else {
            let log = op == AlongOp::LogSoftmaxBackward;
            dots_on(isa, [x, dy_slab(o)], block, sums, log);
        }
    });
    // Each line's statistics from its chunks, in runs of neighbouring lines.
    let lines = cut.outer * cut.inner;
    let (mut line_max, mut line_scale) = (vec![0f32; lines], vec![0f32; lines]);
    let runs = cut.inner.div_ceil(COLUMNS);
    let (max_at, scale_at) = (Out::new(&mut line_max), Out::new(&mut line_scale));
    (0..cut.outer * runs).into_par_iter().for_each(|t| {
        let (o, first) = (t / runs, t % runs * COLUMNS);
        let run = Run {
            chunks: cut.chunks,
            first: o * cut.chunks * cut.inner + first,
            stride: cut.inner,
            n: COLUMNS.min(cut.inner - first),
        };
        // SAFETY: each task's lines are its own, within the line statistics.
        let (max, scale) = unsafe {
            (
                max_at.slice(o * cut.inner + first, run.n),
                scale_at.slice(o * cut.inner + first, run.n),
            )
        };
        if forward {
            let log = op == AlongOp::LogSoftmax;
            combine_on(isa, &part_max, &part_sum, run, max, scale, log);
        } else {
            let mut r = [0f64; COLUMNS];
            for c in 0..run.chunks {
                for (r, &s) in r.iter_mut().zip(run.chunk(&part_sum, c)) {
                    *r += s;
                }
            }
            for (s, &r) in scale.iter_mut().zip(&r) {
                *s = r as f32;
            }
        }
    });
    let out = Out::new(out);
    (0..cut.tasks()).into_par_iter().for_each(|t| {
        let (o, block) = cut.task(t);
        let lines = o * cut.inner + block.first..;
        let (x, scale) = (&x[o * slab..][..slab], &line_scale[lines.clone()]);
        // SAFETY: slab `o` lies within `out`, which is as long as `x`.
        let out = unsafe { out.add(o * slab) };
        if forward {
            let log = op == AlongOp::LogSoftmax;
            normalize_on(isa, out, x, block, &line_max[lines], scale, log);
        } else {
            let log = op == AlongOp::LogSoftmaxBackward;
            backward_on(isa, out, [x, dy_slab(o)], block, scale, log);
        }
    });
}

/// Phase 1 of the forward ops: the chunk's maxima and sums into `max` and `sums`.
#[inline(always)]
fn stats<M: MulAdd>(x: &[f32], block: Block, max: &mut [f32], sums: &mut [f64]) {
    let (m, s) = block_stats::<M>(x, block);
    max.copy_from_slice(&m[..block.width]);
    sums.copy_from_slice(&s[..block.width]);
}

/// `n` neighbouring lines' partials over `chunks` chunks: the first chunk's at `first`, each
/// next one `stride` on.
#[derive(Clone, Copy)]
struct Run {
    chunks: usize,
    first: usize,
    stride: usize,
    n: usize,
}

impl Run {
    /// The lines' partials of chunk `c` in `parts`.
    fn chunk<T>(self, parts: &[T], c: usize) -> &[T] {
        &parts[self.first + c * self.stride..][..self.n]
    }
}

/// Phase 2 of the forward ops over a run of lines: each line's maximum `M` and its
/// [`line_scales`] of `S = sum_c s_c exp(m_c - M)`. A chunk where a line is only -inf adds
/// nothing (its own sum is NaN, `exp(-inf - -inf)`, and of no concern of its own).
#[inline(always)]
fn combine<M: MulAdd>(
    part_max: &[f32],
    part_sum: &[f64],
    run: Run,
    max: &mut [f32],
    scale: &mut [f32],
    log: bool,
) {
    max.fill(f32::NEG_INFINITY);
    for c in 0..run.chunks {
        for (m, &p) in max.iter_mut().zip(run.chunk(part_max, c)) {
            *m = larger(*m, p);
        }
    }
    let mut sums = [0f64; COLUMNS];
    for c in 0..run.chunks {
        let parts = run.chunk(part_max, c).iter().zip(run.chunk(part_sum, c));
        for ((s, (&p, &ps)), &m) in sums.iter_mut().zip(parts).zip(&*max) {
            let share = ps * f64::from(exp_nonpositive::<M>(p - m));
            *s += if p == f32::NEG_INFINITY { 0.0 } else { share };
        }
    }
    line_scales(scale, max, &sums[..run.n], log);
}

/// Phase 1 of the backward ops: the chunk's backward sums into `sums`.
#[inline(always)]
fn dots<M: MulAdd>(operands: [&[f32]; 2], block: Block, sums: &mut [f64], log: bool) {
    let [y, dy] = operands;
    sums.copy_from_slice(&block_dots(y, dy, block, log)[..block.width]);
}

multiversion!(stats_on => stats(x: &[f32], block: Block, max: &mut [f32], sums: &mut [f64]));
multiversion!(combine_on => combine(
    part_max: &[f32],
    part_sum: &[f64],
    run: Run,
    max: &mut [f32],
    scale: &mut [f32],
    log: bool,
));
multiversion!(dots_on => dots(operands: [&[f32]; 2], block: Block, sums: &mut [f64], log: bool));
multiversion!(normalize_on => normalize_block(
    out: Out,
    x: &[f32],
    block: Block,
    max: &[f32],
    scale: &[f32],
    log: bool,
));
multiversion!(backward_on => backward_block(
    out: Out,
    operands: [&[f32]; 2],
    block: Block,
    r: &[f32],
    log: bool,
));
