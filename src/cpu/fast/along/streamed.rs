//! Lines too long for a block of them to stay in cache between its passes: softmax over dim 0
//! of a `[16384, 1024]` matrix, say, whose narrowest block (64 lines of 16 384 steps) spans
//! 4 MiB of each operand. Walked whole, such blocks read every element from memory three times
//! (max, sum, output), in runs of 256 bytes a page apart, which the hardware does not prefetch.
//!
//! Streamed instead, as the split rows are:
//!
//! 1. the steps down the axis are cut into chunks, and each chunk of a block of up to
//!    [`MAX_COLUMNS`] lines (a step a run of up to 4 KiB) is small enough for its passes to
//!    share the cache: its lines' maxima and sums of exponentials (and cross-entropy's other
//!    terms), or their backward sums;
//! 2. each line's chunks combined, by the online-normalizer rule for the forward ops and
//!    cross-entropy, whose losses are then final;
//! 3. each chunk again: the output or gradient.
//!
//! Every element is read twice from memory and written once, and consecutive tasks take
//! neighbouring blocks of the same steps, so that a thread reads runs of whole rows of a slab.

use rayon::prelude::*;

use super::{
    add_terms, backward_block, backward_step, block_dots, block_stats, block_width, line_scales,
    loss_finish, loss_grad, loss_stats, narrow_loss_grad_on, narrow_loss_stats_on, normalize_block,
    normalized, period_max, period_of, period_sums, AlongOp, Block, LineTargets, LossLines,
    LossStats, NarrowChunk, Out, BLOCK_BYTES, COLUMNS, MAX_COLUMNS, MAX_PERIOD,
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
    let log = matches!(op, AlongOp::LogSoftmax | AlongOp::LogSoftmaxBackward);
    let mut parts = Partials::new(op, cut.outer * cut.chunks * cut.inner);
    let (max_out, sum_out) = parts.outs();
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
        parts.combine(isa, run, max, scale, log);
    });
    let out = Out::new(out);
    (0..cut.tasks()).into_par_iter().for_each(|t| {
        let (o, block) = cut.task(t);
        let lines = o * cut.inner + block.first..;
        let (x, scale) = (&x[o * slab..][..slab], &line_scale[lines.clone()]);
        // SAFETY: slab `o` lies within `out`, which is as long as `x`.
        let out = unsafe { out.add(o * slab) };
        if forward {
            normalize_on(isa, out, x, block, &line_max[lines], scale, log);
        } else {
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

    /// Each line's partial sums added over its chunks (the backward ops' `r`), into `out`.
    fn totals(self, parts: &[f64], out: &mut [f32]) {
        let mut total = [0f64; COLUMNS];
        for c in 0..self.chunks {
            for (t, &s) in total.iter_mut().zip(self.chunk(parts, c)) {
                *t += s;
            }
        }
        for (o, &t) in out.iter_mut().zip(&total) {
            *o = t as f32;
        }
    }
}

/// The chunks' partials of a streamed softmax-family call: each chunk's per-line maxima and
/// sums of exponentials (forward ops), or backward sums (the maxima then unused), filled by
/// tasks that each own their chunk's slots.
struct Partials {
    forward: bool,
    max: Vec<f32>,
    sum: Vec<f64>,
}

impl Partials {
    fn new(op: AlongOp, parts: usize) -> Self {
        let forward = matches!(op, AlongOp::Softmax | AlongOp::LogSoftmax);
        Partials {
            forward,
            max: vec![0f32; if forward { parts } else { 0 }],
            sum: vec![0f64; parts],
        }
    }

    /// Shared pointers for the tasks of phase 1.
    fn outs(&mut self) -> (Out, Out<f64>) {
        (Out::new(&mut self.max), Out::new(&mut self.sum))
    }

    /// Phase 2 over a run of lines: each line's maximum and scale (forward ops, see
    /// [`combine`]), or backward sum into `scale` (`max` untouched).
    fn combine(&self, isa: Isa, run: Run, max: &mut [f32], scale: &mut [f32], log: bool) {
        if self.forward {
            combine_on(isa, &self.max, &self.sum, run, max, scale, log);
        } else {
            run.totals(&self.sum, scale);
        }
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

/// Whether cross-entropy's lines along `layout` are streamed: as the forward ops' (see
/// [`takes`]).
pub(super) fn takes_loss(layout: AxisLayout, threads: usize) -> bool {
    takes(AlongOp::Softmax, layout, threads)
}

/// Every chunk's [`LossStats`] of its lines, each field in `[outer][chunks][inner]`.
struct LossParts {
    max: Vec<f32>,
    sum: Vec<f64>,
    a: Vec<f64>,
    q: Vec<f64>,
}

impl LossParts {
    fn new(n: usize) -> Self {
        LossParts {
            max: vec![0.0; n],
            sum: vec![0.0; n],
            a: vec![0.0; n],
            q: vec![0.0; n],
        }
    }

    /// Where the tasks of phase 1 write their chunks' statistics.
    fn outs(&mut self) -> PartOuts {
        PartOuts {
            max: Out::new(&mut self.max),
            sum: Out::new(&mut self.sum),
            a: Out::new(&mut self.a),
            q: Out::new(&mut self.q),
        }
    }
}

/// [`LossParts`] as the tasks of phase 1 write them.
#[derive(Clone, Copy)]
struct PartOuts {
    max: Out<f32>,
    sum: Out<f64>,
    a: Out<f64>,
    q: Out<f64>,
}

impl PartOuts {
    /// Stores the first `n` lines of `stats` at `slot`.
    ///
    /// # Safety
    /// The slots lie within the parts, and no other task writes them.
    unsafe fn store<const N: usize>(self, slot: usize, n: usize, stats: &LossStats<N>) {
        // SAFETY: the caller's contract.
        unsafe {
            self.max.slice(slot, n).copy_from_slice(&stats.max[..n]);
            self.sum.slice(slot, n).copy_from_slice(&stats.sum[..n]);
            self.a.slice(slot, n).copy_from_slice(&stats.a[..n]);
            self.q.slice(slot, n).copy_from_slice(&stats.q[..n]);
        }
    }
}

/// Cross-entropy along `layout` (see [`takes_loss`]), as [`super::cross_entropy`]: the per-line
/// losses into `losses`, and the gradient into `grad` where asked for.
pub(super) fn cross_entropy(
    isa: Isa,
    lines: &LossLines<'_>,
    layout: AxisLayout,
    x: &[f32],
    grad: Option<&mut [f32]>,
    losses: &mut [f64],
) {
    let cut = Cut::new(layout);
    let slab = cut.len * cut.inner;
    let parts = cut.outer * cut.chunks * cut.inner;
    let mut part = LossParts::new(parts);
    let outs = part.outs();
    (0..cut.tasks()).into_par_iter().for_each(|t| {
        let (o, block) = cut.task(t);
        let (slot, w) = (cut.slot(o, &block), block.width);
        let mut stats = LossStats::new();
        loss_stats_on(
            isa,
            lines,
            &x[o * slab..][..slab],
            o * cut.inner,
            block,
            &mut stats,
        );
        // SAFETY: each task's slots are its own chunk's lines, within the partials.
        unsafe { outs.store(slot, w, &stats) };
    });
    // Each line's loss and gradient factors from its chunks, in runs of neighbouring lines.
    let lines_n = if grad.is_some() {
        cut.outer * cut.inner
    } else {
        0
    };
    let mut factors = [
        vec![0f32; lines_n],
        vec![0f32; lines_n],
        vec![0f32; lines_n],
    ];
    let [max_at, factor_at, scale_at] = factors.each_mut().map(|f| Out::new(f));
    let loss_at = Out::new(losses);
    let runs = cut.inner.div_ceil(COLUMNS);
    let with_grad = grad.is_some();
    (0..cut.outer * runs).into_par_iter().for_each(|t| {
        let (o, first) = (t / runs, t % runs * COLUMNS);
        let run = Run {
            chunks: cut.chunks,
            first: o * cut.chunks * cut.inner + first,
            stride: cut.inner,
            n: COLUMNS.min(cut.inner - first),
        };
        let line = o * cut.inner + first;
        // SAFETY: each task's lines are its own, within the losses and the line factors.
        let (losses, outs) = unsafe {
            let outs =
                with_grad.then(|| [max_at, factor_at, scale_at].map(|f| f.slice(line, run.n)));
            (loss_at.slice(line, run.n), outs)
        };
        let block = Block::whole(cut.len, cut.inner, first, run.n);
        let x = &x[o * slab..][..slab];
        loss_combine_on(
            isa,
            lines,
            (x, o * cut.inner),
            block,
            (&part, run),
            losses,
            outs,
        );
    });
    let Some(grad) = grad else {
        return;
    };
    let grad = Out::new(grad);
    let [max, factor, scale] = &factors;
    (0..cut.tasks()).into_par_iter().for_each(|t| {
        let (o, block) = cut.task(t);
        let at = o * cut.inner + block.first..;
        // SAFETY: slab `o` lies within the gradient, which is as long as `x`.
        let grad = unsafe { grad.add(o * slab) };
        let targets = LineTargets::new(lines, o * cut.inner + block.first, block.width);
        let factors = [&max[at.clone()], &factor[at.clone()], &scale[at]];
        let x = &x[o * slab..][..slab];
        loss_grad_on(
            isa,
            lines,
            (x, o * cut.inner),
            grad,
            block,
            &targets,
            factors,
        );
    });
}

/// Phase 2 of cross-entropy over a run of lines of the slab `x` (`line0` its first line; the
/// run is `block`'s lines over the whole axis): each line's [`LossStats`] over the whole axis
/// from its chunks', each chunk's terms moved from its shift to the line's maximum `M` (`S =
/// sum_c s_c exp(shift_c - M)`, `A = sum_c a_c + q_c (shift_c - M)`), then its loss into
/// `losses` and, where asked for, its maximum, gradient factor and scale into `grad`.
#[inline(always)]
fn loss_combine<M: MulAdd>(
    lines: &LossLines<'_>,
    (x, line0): (&[f32], usize),
    block: Block,
    (part, run): (&LossParts, Run),
    losses: &mut [f64],
    grad: Option<[&mut [f32]; 3]>,
) {
    let n = run.n;
    let mut stats = LossStats::<COLUMNS>::new();
    for c in 0..run.chunks {
        for (m, &p) in stats.max.iter_mut().zip(run.chunk(&part.max, c)) {
            *m = larger(*m, p);
        }
    }
    for c in 0..run.chunks {
        let maxima = run.chunk(&part.max, c).iter().zip(&stats.max);
        let terms = run.chunk(&part.sum, c).iter().zip(run.chunk(&part.a, c));
        let sums = stats.sum.iter_mut().zip(&mut stats.a);
        for (((s, a), (&p, &m)), (&ps, &pa)) in sums.zip(maxima).zip(terms) {
            let shift = LossStats::shift(p);
            let share = ps * f64::from(exp_nonpositive::<M>(shift - m));
            *s += if p == f32::NEG_INFINITY { 0.0 } else { share };
            *a += pa;
        }
        let offsets = run.chunk(&part.max, c).iter().zip(&stats.max);
        let moved = stats
            .a
            .iter_mut()
            .zip(&mut stats.q)
            .zip(run.chunk(&part.q, c));
        for (((a, q), &pq), (&p, &m)) in moved.zip(offsets) {
            let offset = f64::from(LossStats::shift(p)) - f64::from(m);
            *a += if pq != 0.0 { pq * offset } else { 0.0 };
            *q += pq;
        }
    }
    let targets = LineTargets::<COLUMNS>::new(lines, line0 + block.first, n);
    let factors = grad.map(|[max, factor, scale]| {
        max.copy_from_slice(&stats.max[..n]);
        [factor, scale]
    });
    loss_finish(lines, (x, line0), block, &targets, &stats, losses, factors);
}

multiversion!(loss_stats_on => loss_stats(
    lines: &LossLines<'_>, x: &[f32], line0: usize, block: Block, stats: &mut LossStats
));
multiversion!(loss_combine_on => loss_combine(
    lines: &LossLines<'_>,
    slab: (&[f32], usize),
    block: Block,
    parts: (&LossParts, Run),
    losses: &mut [f64],
    grad: Option<[&mut [f32]; 3]>,
));
multiversion!(loss_grad_on => loss_grad(
    lines: &LossLines<'_>,
    slab: (&[f32], usize),
    grad: Out,
    block: Block,
    targets: &LineTargets,
    factors: [&[f32]; 3],
));

/// Whether the narrow slabs along `layout` (those [`super::narrow`] walks flat, one slab per
/// task) are streamed: where whole slabs would leave a quarter or more of the `threads`' time
/// idle (fewer slabs than threads, or a count that does not divide among them) and a slab
/// spans more than [`BLOCK_BYTES`]. On 2 threads (medians of 3 interleaved rounds), streamed
/// against whole: 1.34-1.9x on `1x1048576x4`, 1.08-1.23x on `2x131072x24`, but 0.79-0.96x on
/// `16x65536x4` and 0.81-0.93x on `8x65536x12`, whose slabs keep both threads busy.
pub(super) fn takes_narrow(layout: AxisLayout, threads: usize) -> bool {
    let outer = layout.outer();
    let rounds = outer.div_ceil(threads.max(1));
    layout.numel() > SERIAL_ELEMS
        && layout.len() * layout.inner() * size_of::<f32>() > BLOCK_BYTES
        && 4 * outer <= 3 * rounds * threads
}

/// How narrow slabs are cut: chunks of `chunk` elements, whole periods of `period` (the last
/// chunk of a slab shorter), `chunks` per slab.
#[derive(Clone, Copy, Debug)]
struct NarrowCut {
    outer: usize,
    inner: usize,
    slab: usize,
    period: usize,
    chunk: usize,
    chunks: usize,
}

impl NarrowCut {
    fn new(layout: AxisLayout) -> Self {
        let (inner, slab) = (layout.inner(), layout.len() * layout.inner());
        let period = period_of(inner);
        let chunk = (BLOCK_BYTES / size_of::<f32>() / period).max(1) * period;
        Self {
            outer: layout.outer(),
            inner,
            slab,
            period,
            chunk,
            chunks: slab.div_ceil(chunk),
        }
    }

    /// Task `t`'s slab and the range of its chunk's elements over the whole call.
    fn task(&self, t: usize) -> (usize, std::ops::Range<usize>) {
        let (o, c) = (t / self.chunks, t % self.chunks);
        let start = o * self.slab + c * self.chunk;
        (o, start..start + self.chunk.min(self.slab - c * self.chunk))
    }

    /// Where chunk `t`'s per-line partials start, in `[outer][chunks][inner]`.
    fn slot(&self, t: usize) -> usize {
        t * self.inner
    }

    /// The chunk of slab `o` that `range` (from [`Self::task`]) covers.
    fn chunk(&self, o: usize, range: &std::ops::Range<usize>) -> NarrowChunk {
        NarrowChunk {
            off: range.start - o * self.slab,
            n: range.len(),
            period: self.period,
            inner: self.inner,
        }
    }
}

/// Runs `op` over `layout`'s narrow slabs (see [`takes_narrow`]), as [`super::run_on`]: each
/// slab cut into chunks of whole periods, each chunk's per-line statistics (or backward sums)
/// from a flat walk, combined per line, then each chunk's output.
pub(super) fn run_narrow_on(
    isa: Isa,
    op: AlongOp,
    layout: AxisLayout,
    x: &[f32],
    dy: &[f32],
    out: &mut [f32],
) {
    let cut = NarrowCut::new(layout);
    let tasks = cut.outer * cut.chunks;
    let forward = matches!(op, AlongOp::Softmax | AlongOp::LogSoftmax);
    let log = matches!(op, AlongOp::LogSoftmax | AlongOp::LogSoftmaxBackward);
    let dy_of = |r: &std::ops::Range<usize>| if dy.is_empty() { dy } else { &dy[r.clone()] };
    let mut parts = Partials::new(op, tasks * cut.inner);
    let (max_out, sum_out) = parts.outs();
    (0..tasks).into_par_iter().for_each(|t| {
        let (_, range) = cut.task(t);
        let n = cut.inner;
        // SAFETY: each task's slots are its own chunk's lines, within the partials.
        let (max, sums) = unsafe {
            let max = if forward {
                max_out.slice(cut.slot(t), n)
            } else {
                &mut []
            };
            (max, sum_out.slice(cut.slot(t), n))
        };
        let operands = [&x[range.clone()], dy_of(&range)];
        narrow_stats_on(isa, forward, operands, (cut.period, n), max, sums, log);
    });
    // Each line's statistics from its chunks.
    let lines = cut.outer * cut.inner;
    let (mut line_max, mut line_scale) = (vec![0f32; lines], vec![0f32; lines]);
    for (o, (max, scale)) in line_max
        .chunks_mut(cut.inner)
        .zip(line_scale.chunks_mut(cut.inner))
        .enumerate()
    {
        let run = Run {
            chunks: cut.chunks,
            first: o * cut.chunks * cut.inner,
            stride: cut.inner,
            n: cut.inner,
        };
        parts.combine(isa, run, max, scale, log);
    }
    let out = Out::new(out);
    (0..tasks).into_par_iter().for_each(|t| {
        let (o, range) = cut.task(t);
        // SAFETY: each task writes its own chunk, within `out`, which is as long as `x`.
        let out = unsafe { out.slice(range.start, range.len()) };
        let lines = o * cut.inner..(o + 1) * cut.inner;
        let stats = [&line_max[lines.clone()], &line_scale[lines]];
        let operands = [&x[range.clone()], dy_of(&range)];
        narrow_out_on(isa, forward, operands, out, cut.period, stats, log);
    });
}

/// Phase 1 of a narrow chunk (`x` and, for the backward ops, `dy`, whole periods of
/// `period`): each of its `inner` lines' maximum and sum of exponentials, or backward sum.
#[inline(always)]
fn narrow_stats<M: MulAdd>(
    forward: bool,
    [x, dy]: [&[f32]; 2],
    (period, inner): (usize, usize),
    max: &mut [f32],
    sums: &mut [f64],
    log: bool,
) {
    if forward {
        let m = period_max(x, period, inner);
        let s = period_sums(
            x.len(),
            period,
            inner,
            #[inline(always)]
            |start, part: &mut [f32]| {
                for ((p, &v), &m) in part.iter_mut().zip(&x[start..]).zip(&m) {
                    *p += exp_nonpositive::<M>(v - m);
                }
            },
        );
        max.copy_from_slice(&m[..inner]);
        for (sum, &s) in sums.iter_mut().zip(&s) {
            *sum = f64::from(s);
        }
    } else {
        let r = period_sums(
            x.len(),
            period,
            inner,
            #[inline(always)]
            |start, part: &mut [f32]| {
                add_terms(part, &x[start..], &dy[start..], log);
            },
        );
        for (sum, &r) in sums.iter_mut().zip(&r) {
            *sum = f64::from(r);
        }
    }
}

/// Phase 3 of a narrow chunk: its output from each line's maximum and scale (`[max, scale]`),
/// or backward sum (`scale`; `max` unused), spread over the positions of a period.
#[inline(always)]
fn narrow_out<M: MulAdd>(
    forward: bool,
    [x, dy]: [&[f32]; 2],
    out: &mut [f32],
    period: usize,
    [max, scale]: [&[f32]; 2],
    log: bool,
) {
    let inner = scale.len();
    let (mut m, mut s) = ([0f32; MAX_PERIOD], [0f32; MAX_PERIOD]);
    for j in 0..period {
        m[j] = max[j % inner];
        s[j] = scale[j % inner];
    }
    let (m, s) = (&m[..period], &s[..period]);
    if forward {
        for (y, x) in out.chunks_mut(period).zip(x.chunks(period)) {
            normalized::<M>(y, x, m, s, log);
        }
    } else {
        for ((dx, y), g) in out
            .chunks_mut(period)
            .zip(x.chunks(period))
            .zip(dy.chunks(period))
        {
            backward_step::<M>(dx, y, g, s, log);
        }
    }
}

multiversion!(narrow_stats_on => narrow_stats(
    forward: bool,
    operands: [&[f32]; 2],
    shape: (usize, usize),
    max: &mut [f32],
    sums: &mut [f64],
    log: bool,
));
multiversion!(narrow_out_on => narrow_out(
    forward: bool,
    operands: [&[f32]; 2],
    out: &mut [f32],
    period: usize,
    stats: [&[f32]; 2],
    log: bool,
));

/// Cross-entropy over `layout`'s narrow slabs (see [`takes_narrow`]), as
/// [`super::cross_entropy`]: each slab cut into chunks of whole periods, each chunk's per-line
/// [`LossStats`] from a flat walk, combined per line as [`cross_entropy`] combines them, then
/// each chunk's gradient.
pub(super) fn cross_entropy_narrow(
    isa: Isa,
    lines: &LossLines<'_>,
    layout: AxisLayout,
    x: &[f32],
    grad: Option<&mut [f32]>,
    losses: &mut [f64],
) {
    let cut = NarrowCut::new(layout);
    let (len, inner, slab) = (layout.len(), cut.inner, cut.slab);
    let tasks = cut.outer * cut.chunks;
    let parts = tasks * inner;
    let mut part = LossParts::new(parts);
    let outs = part.outs();
    (0..tasks).into_par_iter().for_each(|t| {
        let (o, range) = cut.task(t);
        let chunk = cut.chunk(o, &range);
        let mut stats = LossStats::new();
        let slab_x = (&x[o * slab..][..slab], o * inner);
        narrow_loss_stats_on(isa, lines, slab_x, chunk, &mut stats);
        let slot = cut.slot(t);
        // SAFETY: each task's slots are its own chunk's lines, within the partials.
        unsafe { outs.store(slot, inner, &stats) };
    });
    // Each line's loss and gradient factors from its chunks, a slab at a time (there are few).
    let n_lines = if grad.is_some() { cut.outer * inner } else { 0 };
    let mut factors = [
        vec![0f32; n_lines],
        vec![0f32; n_lines],
        vec![0f32; n_lines],
    ];
    for o in 0..cut.outer {
        let run = Run {
            chunks: cut.chunks,
            first: o * cut.chunks * inner,
            stride: inner,
            n: inner,
        };
        let block = Block::whole(len, inner, 0, inner);
        let [max, factor, scale] = &mut factors;
        let outs = grad
            .is_some()
            .then(|| [max, factor, scale].map(|f| &mut f[o * inner..][..inner]));
        let slab_x = (&x[o * slab..][..slab], o * inner);
        let losses = &mut losses[o * inner..][..inner];
        loss_combine_on(isa, lines, slab_x, block, (&part, run), losses, outs);
    }
    let Some(grad) = grad else {
        return;
    };
    let grad = Out::new(grad);
    let [max, factor, scale] = &factors;
    (0..tasks).into_par_iter().for_each(|t| {
        let (o, range) = cut.task(t);
        let chunk = cut.chunk(o, &range);
        // SAFETY: each task writes its own chunk, within the gradient, as long as `x`.
        let g = unsafe { grad.slice(range.start, range.len()) };
        let at = o * inner..(o + 1) * inner;
        let targets = LineTargets::new(lines, o * inner, inner);
        let factors = [&max[at.clone()], &factor[at.clone()], &scale[at]];
        let slab_x = (&x[o * slab..][..slab], o * inner);
        narrow_loss_grad_on(isa, lines, slab_x, chunk, g, &targets, factors);
    });
}
