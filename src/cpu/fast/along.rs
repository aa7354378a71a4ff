//! Softmax, log-softmax and their backward along an axis that is not the last, in place: the
//! lines of a slab `[len, inner]` lie side by side, so a task takes a block of neighbouring
//! lines and walks down the axis a row of the slab at a time, each step a contiguous run that
//! vectorises across lines. Nothing is transposed, and a block of lines is read from cache on
//! its second and third pass. Lines too long for that are streamed in chunks of steps instead
//! (see [`streamed`]).

use rayon::prelude::*;

mod streamed;

use super::Separate;
use super::{
    exp, exp_nonpositive, isa, larger, ln_normal, max_key, Isa, MulAdd, LANES, SERIAL_ELEMS,
    TASK_ELEMS,
};
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
use super::{Fused, Fused512};
use crate::layout::AxisLayout;
use crate::validate::{CrossEntropyPlan, IGNORED_ROW};

/// The fewest lines a block takes side by side: four AVX-512 vectors.
const COLUMNS: usize = 64;
/// The most lines a block takes side by side (see [`block_width`]).
const MAX_COLUMNS: usize = 1024;
/// What one array of a block (its lines' elements) may span, so that a block's second and third
/// passes read it from the core's own cache (see [`block_width`]).
const BLOCK_BYTES: usize = 128 << 10;
/// Terms a line sums in f32 before they join its f64 total, so that the rounding of a sum over
/// a long axis stays that of a block.
const SUM_BLOCK: usize = 32;
/// Slabs of fewer lines than this may take [`narrow`] (see [`takes_narrow`]).
const NARROW: usize = COLUMNS;
/// The fewest elements of a period of [`narrow`]: enough whole vectors for a loop to pay.
const MIN_PERIOD: usize = 128;
/// The longest period of [`narrow`]: `lcm(inner, LANES)` for `inner < NARROW`.
const MAX_PERIOD: usize = LANES * (NARROW - 1);

/// What a call along an axis computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AlongOp {
    Softmax,
    LogSoftmax,
    SoftmaxBackward,
    LogSoftmaxBackward,
}

/// An output of a whole call (the result, the per-line losses, partial statistics), written by
/// tasks through disjoint parts.
#[derive(Clone, Copy)]
struct Out<T = f32>(*mut T);

// SAFETY: tasks write disjoint elements of the output (their own lines of their own slab), and
// the output outlives the parallel loop that shares the pointer.
unsafe impl<T> Send for Out<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    fn new(out: &mut [T]) -> Self {
        Out(out.as_mut_ptr())
    }

    /// The output `n` elements on (a method, so that closures capture the whole `Out`).
    ///
    /// # Safety
    /// `n` lies within the output.
    unsafe fn add(self, n: usize) -> Self {
        // SAFETY: the caller's contract.
        Out(unsafe { self.0.add(n) })
    }

    /// Elements `first..first + n`.
    ///
    /// # Safety
    /// They lie within the output, and no other live reference covers them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice<'a>(self, first: usize, n: usize) -> &'a mut [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(first), n) }
    }
}

/// Runs `op` over `layout` (whose `inner` is more than 1): `x` is the input (`y` of the
/// backward ops), `dy` the upstream gradient of the backward ops (empty otherwise), and `out`
/// as long as `x`. Lengths have been validated.
pub(super) fn run(op: AlongOp, layout: AxisLayout, x: &[f32], dy: &[f32], out: &mut [f32]) {
    run_on(isa(), op, layout, x, dy, out);
}

/// [`run`] with the kernels built for `isa`.
fn run_on(isa: Isa, op: AlongOp, layout: AxisLayout, x: &[f32], dy: &[f32], out: &mut [f32]) {
    if layout.is_empty() {
        return;
    }
    let (len, inner) = (layout.len(), layout.inner());
    let slab = len * inner;
    if takes_narrow(op, inner) && streamed::takes_narrow(layout, rayon::current_num_threads()) {
        streamed::run_narrow_on(isa, op, layout, x, dy, out);
        return;
    }
    if takes_narrow(op, inner) {
        let dy_slabs = |o: usize| {
            if dy.is_empty() {
                dy
            } else {
                &dy[o * slab..][..slab]
            }
        };
        let task = |(o, (x, out)): (usize, (&[f32], &mut [f32]))| {
            narrow_on(isa, op, x, dy_slabs(o), out, len, inner);
        };
        let slabs = x.chunks(slab).zip(out.chunks_mut(slab)).enumerate();
        if layout.numel() <= SERIAL_ELEMS {
            slabs.for_each(task);
        } else {
            x.par_chunks(slab)
                .zip(out.par_chunks_mut(slab))
                .enumerate()
                .with_min_len((TASK_ELEMS / slab).max(1))
                .for_each(task);
        }
        return;
    }
    if streamed::takes(op, layout, rayon::current_num_threads()) {
        streamed::run_on(isa, op, layout, x, dy, out);
        return;
    }
    let out = Out::new(out);
    for_each_block(layout, |o, block| {
        let slabs = o * slab..(o + 1) * slab;
        let dy = if dy.is_empty() {
            dy
        } else {
            &dy[slabs.clone()]
        };
        // SAFETY: slab `o` lies within `out`, which is as long as `x`.
        let out = unsafe { out.add(slabs.start) };
        columns_on(isa, op, &x[slabs], dy, out, block);
    });
}

/// How many neighbouring lines a block of a slab of `inner` lines `len` long takes: as many as
/// keep one array of the block within [`BLOCK_BYTES`], between [`COLUMNS`] and [`MAX_COLUMNS`]
/// and a whole number of vectors, the slab cut into blocks of even width, and at least
/// `4 threads` blocks in all where `outer` slabs allow. Each step down the axis is then a
/// contiguous run of the slab as long as the cache allows, which the hardware prefetches well:
/// on 2 threads with AVX-512 (medians of 6 interleaved rounds), blocks of 64 lines ran the
/// softmax backward at 15.0 GB/s on `256x32x256` and 13.4 on `16x21x16384`, and blocks of up
/// to 128 KiB at 30.8 and 23.0; softmax 10.8 and 10.7 against 16.6 and 13.4. Blocks of 256 and
/// 512 KiB ran no faster.
fn block_width(outer: usize, len: usize, inner: usize, threads: usize) -> usize {
    let fit = BLOCK_BYTES / (len * size_of::<f32>()).max(1);
    let share = (outer * inner)
        .div_ceil(4 * threads)
        .next_multiple_of(COLUMNS);
    let cap = (fit / COLUMNS * COLUMNS)
        .min(share)
        .clamp(COLUMNS, MAX_COLUMNS);
    let blocks = inner.div_ceil(cap);
    inner.div_ceil(blocks).next_multiple_of(LANES)
}

/// Runs `task(o, block)` for every block of neighbouring lines (see [`block_width`]) of every
/// slab `o` of `layout`, on rayon's threads where the call is large enough.
fn for_each_block(layout: AxisLayout, task: impl Fn(usize, Block) + Send + Sync) {
    let (len, inner) = (layout.len(), layout.inner());
    let width = block_width(layout.outer(), len, inner, rayon::current_num_threads());
    let blocks_per_slab = inner.div_ceil(width);
    let tasks = layout.outer() * blocks_per_slab;
    let run = |t: usize| {
        let (o, b) = (t / blocks_per_slab, t % blocks_per_slab);
        let first = b * width;
        let block = Block::whole(len, inner, first, width.min(inner - first));
        task(o, block);
    };
    if layout.numel() <= SERIAL_ELEMS {
        (0..tasks).for_each(run);
    } else {
        let per_task = (TASK_ELEMS / (len * width)).max(1);
        (0..tasks)
            .into_par_iter()
            .with_min_len(per_task)
            .for_each(run);
    }
}

/// A block of neighbouring lines of one slab of `len` steps down the axis: lines
/// `first..first + width` of `inner`, at steps `start..end` (the whole axis but where lines are
/// streamed in chunks).
#[derive(Clone, Copy)]
struct Block {
    len: usize,
    inner: usize,
    first: usize,
    width: usize,
    start: usize,
    end: usize,
}

impl Block {
    /// Lines `first..first + width` of a slab of `inner` lines, over the whole axis of `len`.
    fn whole(len: usize, inner: usize, first: usize, width: usize) -> Self {
        Block {
            len,
            inner,
            first,
            width,
            start: 0,
            end: len,
        }
    }

    /// The block's steps down the axis.
    fn steps(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }

    /// Step `k` down the axis of the block's lines in `data` (a slab).
    fn row<'a>(&self, data: &'a [f32], k: usize) -> &'a [f32] {
        &data[k * self.inner + self.first..][..self.width]
    }

    /// The same step of the output.
    ///
    /// # Safety
    /// `out` points at the slab's output, and no other live reference covers the block's lines.
    #[allow(clippy::mut_from_ref)]
    unsafe fn out_row(&self, out: Out, k: usize) -> &mut [f32] {
        // SAFETY: the caller's contract; the range lies within the slab.
        unsafe {
            std::slice::from_raw_parts_mut(out.0.add(k * self.inner + self.first), self.width)
        }
    }
}

/// Sums `term(k, j)` over the block's steps for each line `j` of the block: f32 blocks of
/// [`SUM_BLOCK`] steps, added up in f64.
#[inline(always)]
fn line_sums(block: Block, add: impl FnMut(usize, &mut [f32])) -> [f64; MAX_COLUMNS] {
    let mut total = [0f64; MAX_COLUMNS];
    line_sums_into(block, &mut total, add);
    total
}

/// [`line_sums`] into `total` (its first `block.width` elements).
#[inline(always)]
fn line_sums_into(block: Block, total: &mut [f64], mut add: impl FnMut(usize, &mut [f32])) {
    let total = &mut total[..block.width];
    total.fill(0.0);
    let mut part = [0f32; MAX_COLUMNS];
    for k in block.steps() {
        add(k, &mut part[..block.width]);
        if (k + 1 - block.start).is_multiple_of(SUM_BLOCK) || k + 1 == block.end {
            for (t, p) in total.iter_mut().zip(part.iter_mut()) {
                *t += f64::from(*p);
                *p = 0.0;
            }
        }
    }
}

#[inline(always)]
fn columns<M: MulAdd>(op: AlongOp, x: &[f32], dy: &[f32], out: Out, block: Block) {
    match op {
        AlongOp::Softmax if block.end - block.start <= KEPT_EXPS_MAX_STEPS => {
            let (max, sums) = block_exps::<M>(x, out, block);
            let mut scale = [0f32; MAX_COLUMNS];
            line_scales(&mut scale, &max[..block.width], &sums, false);
            scale_block(out, block, &scale);
        }
        AlongOp::Softmax | AlongOp::LogSoftmax => {
            let log = op == AlongOp::LogSoftmax;
            let (max, sums) = block_stats::<M>(x, block);
            let mut scale = [0f32; MAX_COLUMNS];
            line_scales(&mut scale, &max[..block.width], &sums, log);
            normalize_block::<M>(out, x, block, &max, &scale, log);
        }
        AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward => {
            let log = op == AlongOp::LogSoftmaxBackward;
            let sums = block_dots(x, dy, block, log);
            let mut r = [0f32; MAX_COLUMNS];
            for (r, &s) in r.iter_mut().zip(&sums) {
                *r = s as f32;
            }
            backward_block::<M>(out, [x, dy], block, &r, log);
        }
    }
}

/// Each line's maximum over the block's steps (of its `max_key`s: +inf for a NaN or +inf) into
/// `max`, which starts at -inf.
#[inline(always)]
fn block_max(x: &[f32], block: Block, max: &mut [f32]) {
    for k in block.steps() {
        for (m, &v) in max.iter_mut().zip(block.row(x, k)) {
            *m = larger(*m, max_key(v));
        }
    }
}

/// Each line's maximum over the block's steps (its `max_key`s': +inf for a NaN or +inf) and its
/// sum of `exp(x - max)` there.
#[inline(always)]
fn block_stats<M: MulAdd>(x: &[f32], block: Block) -> ([f32; MAX_COLUMNS], [f64; MAX_COLUMNS]) {
    let mut max = [f32::NEG_INFINITY; MAX_COLUMNS];
    let m = &mut max[..block.width];
    block_max(x, block, m);
    let m = &*m;
    let sums = line_sums(block, |k, part| {
        for ((p, &v), &m) in part.iter_mut().zip(block.row(x, k)).zip(m) {
            *p += exp_nonpositive::<M>(v - m);
        }
    });
    (max, sums)
}

/// Softmax blocks of at most this many steps keep their exponentials in the output between
/// the sum and the output pass ([`block_exps`], [`scale_block`]); longer ones evaluate `exp`
/// again. 2 threads, medians of 5-6 interleaved rounds against `exp` twice, over four runs:
/// 1.06-1.23x at 10 to 32 steps (`32x10x8192`, `256x32x256`; `128x21x1000` 0.95-1.13x and
/// `16x21x16384` 0.98-1.14x), 0.95-1.05x at 48 and 64, 1.00x at 96, but 0.97x at 128 and
/// 0.86x at 256 (`8x256x4096`), where a block's output rows, a power-of-two stride apart,
/// compete with its input rows for the same cache sets. Cross-entropy's gradient pass taking
/// its exponentials the same way measured 0.99-1.08x (6 and 8 rounds) and was left out, as was
/// prefetching the next steps' rows in a block's first pass (0.85-1.13x, no trend).
const KEPT_EXPS_MAX_STEPS: usize = 32;

/// As [`block_stats`], leaving each `exp(x - max)` in the block's output, where
/// [`scale_block`] makes it softmax: `exp` runs once per element.
#[inline(always)]
fn block_exps<M: MulAdd>(
    x: &[f32],
    out: Out,
    block: Block,
) -> ([f32; MAX_COLUMNS], [f64; MAX_COLUMNS]) {
    let mut max = [f32::NEG_INFINITY; MAX_COLUMNS];
    let m = &mut max[..block.width];
    block_max(x, block, m);
    let m = &*m;
    let sums = line_sums(block, |k, part| {
        // SAFETY: this task's lines alone (see `Out`).
        let e = unsafe { block.out_row(out, k) };
        for (((p, e), &v), &m) in part.iter_mut().zip(e).zip(block.row(x, k)).zip(m) {
            *e = exp_nonpositive::<M>(v - m);
            *p += *e;
        }
    });
    (max, sums)
}

/// Multiplies the block's exponentials (from [`block_exps`]) by each line's `1 / S`.
#[inline(always)]
fn scale_block(out: Out, block: Block, scale: &[f32]) {
    let scale = &scale[..block.width];
    for k in block.steps() {
        // SAFETY: this task's lines alone (see `Out`).
        let y = unsafe { block.out_row(out, k) };
        for (y, &s) in y.iter_mut().zip(scale) {
            *y *= s;
        }
    }
}

/// Writes the block's steps of softmax or log-softmax (see [`normalized`]).
#[inline(always)]
fn normalize_block<M: MulAdd>(
    out: Out,
    x: &[f32],
    block: Block,
    max: &[f32],
    scale: &[f32],
    log: bool,
) {
    let (max, scale) = (&max[..block.width], &scale[..block.width]);
    for k in block.steps() {
        // SAFETY: this task's lines alone (see `Out`).
        let y = unsafe { block.out_row(out, k) };
        normalized::<M>(y, block.row(x, k), max, scale, log);
    }
}

/// Each line's backward sum `r` over the block's steps (see [`add_terms`]).
#[inline(always)]
fn block_dots(y: &[f32], dy: &[f32], block: Block, log: bool) -> [f64; MAX_COLUMNS] {
    // Marked to inline: left out of line, it was compiled without the instruction set of the
    // build that calls it and ran at SSE width.
    line_sums(
        block,
        #[inline(always)]
        |k, part| add_terms(part, block.row(y, k), block.row(dy, k), log),
    )
}

/// Writes the block's steps of the backward (see [`backward_step`]).
#[inline(always)]
fn backward_block<M: MulAdd>(out: Out, [y, dy]: [&[f32]; 2], block: Block, r: &[f32], log: bool) {
    let r = &r[..block.width];
    for k in block.steps() {
        // SAFETY: this task's lines alone (see `Out`).
        let dx = unsafe { block.out_row(out, k) };
        backward_step::<M>(dx, block.row(y, k), block.row(dy, k), r, log);
    }
}

/// Each line's `scale` for [`normalized`] from its maximum `max` and its sum of exponentials:
/// `1 / S`, or `ln S` through [`ln_normal`], which vectorises across the lines (`f64::ln`, a
/// library call per line, took about a third of log-softmax's time on `16x21x16384`). A line
/// with a NaN or +inf, or only -inf, has no finite maximum: NaN throughout. Otherwise `S` is at
/// least 1, the maximum's own term.
#[inline(always)]
fn line_scales<S: Copy + Into<f64>>(scale: &mut [f32], max: &[f32], sums: &[S], log: bool) {
    for ((s, &m), &sum) in scale.iter_mut().zip(max).zip(sums) {
        let sum: f64 = sum.into();
        let v = if log {
            ln_normal((sum as f32).max(1.0))
        } else {
            (1.0 / sum) as f32
        };
        *s = if m.is_infinite() { f32::NAN } else { v };
    }
}

/// One step of softmax (`scale` = 1 / S) or log-softmax (`scale` = ln S) over neighbouring
/// lines: `y = exp(x - m) scale` or `(x - m) - scale`, each line with its own `m` and `scale`.
#[inline(always)]
fn normalized<M: MulAdd>(y: &mut [f32], x: &[f32], max: &[f32], scale: &[f32], log: bool) {
    let lines = y.iter_mut().zip(x).zip(max).zip(scale);
    if log {
        for (((y, &v), &m), &s) in lines {
            *y = (v - m) - s;
        }
    } else {
        for (((y, &v), &m), &s) in lines {
            *y = exp_nonpositive::<M>(v - m) * s;
        }
    }
}

/// Adds one step's terms of the backward's sum `r` over neighbouring lines into `part`:
/// `dy y` for softmax, `dy` for log-softmax.
#[inline(always)]
fn add_terms(part: &mut [f32], y: &[f32], dy: &[f32], log: bool) {
    if log {
        for (p, &g) in part.iter_mut().zip(dy) {
            *p += g;
        }
    } else {
        for ((p, &y), &g) in part.iter_mut().zip(y).zip(dy) {
            *p += g * y;
        }
    }
}

/// One step of the backward over neighbouring lines, each with its own `r`: softmax's
/// `y (dy - r)` or log-softmax's `dy - exp(y) r`.
#[inline(always)]
fn backward_step<M: MulAdd>(dx: &mut [f32], y: &[f32], dy: &[f32], r: &[f32], log: bool) {
    let lines = dx.iter_mut().zip(y).zip(dy).zip(r);
    if log {
        for (((dx, &y), &g), &r) in lines {
            *dx = g - exp::<M>(y) * r;
        }
    } else {
        for (((dx, &y), &g), &r) in lines {
            *dx = y * (g - r);
        }
    }
}

/// Whether slabs of `inner` lines take [`narrow`] rather than [`columns`]: where a block of so
/// few lines makes each step down the axis a vector or two, or a vector and a ragged tail, too
/// short a loop to pay for itself. The exps of softmax gain from whole vectors below 32 lines and
/// at widths not a multiple of a vector below 64; the backward, a multiply-add per element, only
/// below one vector (measured on 2 threads with AVX-512: softmax at 24 lines 5.9 -> 16.7 GB/s,
/// at 32 lines 19.1 against 16.8; backward at 24 lines 32.1 against 30.1).
fn takes_narrow(op: AlongOp, inner: usize) -> bool {
    match op {
        AlongOp::Softmax | AlongOp::LogSoftmax => {
            inner < 2 * LANES || (inner < NARROW && !inner.is_multiple_of(LANES))
        }
        AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward => inner < LANES,
    }
}

/// One slab of fewer than [`NARROW`] lines, flat: a period of `lcm(inner, LANES)` elements,
/// doubled up to at least [`MIN_PERIOD`], holds `period / inner` steps of every line, and the
/// statistics are kept per position of a period (position `j` belongs to line `j % inner`) and
/// folded per line at the end, so that every pass runs over contiguous elements whole vectors
/// at a time. A slab's last elements, short of a whole period, continue the pattern.
#[inline(always)]
fn narrow<M: MulAdd>(
    op: AlongOp,
    x: &[f32],
    dy: &[f32],
    out: &mut [f32],
    len: usize,
    inner: usize,
) {
    let period = period_of(inner);
    let elements = len * inner;
    match op {
        AlongOp::Softmax | AlongOp::LogSoftmax => {
            let max = &period_max(x, period, inner);
            let sums = period_sums(
                elements,
                period,
                inner,
                #[inline(always)]
                |start, part: &mut [f32]| {
                    for ((p, &v), &m) in part.iter_mut().zip(&x[start..]).zip(max) {
                        *p += exp_nonpositive::<M>(v - m);
                    }
                },
            );
            let log = op == AlongOp::LogSoftmax;
            let mut scale = [0f32; MAX_PERIOD];
            line_scales(&mut scale, max, &sums, log);
            for (y, x) in out.chunks_mut(period).zip(x.chunks(period)) {
                normalized::<M>(y, x, max, &scale, log);
            }
        }
        AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward => {
            let log = op == AlongOp::LogSoftmaxBackward;
            let r = period_sums(
                elements,
                period,
                inner,
                #[inline(always)]
                |start, part: &mut [f32]| {
                    add_terms(part, &x[start..], &dy[start..], log);
                },
            );
            for ((dx, y), g) in out
                .chunks_mut(period)
                .zip(x.chunks(period))
                .zip(dy.chunks(period))
            {
                backward_step::<M>(dx, y, g, &r, log);
            }
        }
    }
}

/// The period of [`narrow`] for slabs of `inner` lines: `lcm(inner, LANES)` doubled up to at
/// least [`MIN_PERIOD`].
fn period_of(inner: usize) -> usize {
    let mut period = lcm(inner, LANES);
    while period < MIN_PERIOD {
        period *= 2;
    }
    period
}

/// Per position of a period, the maximum ([`max_key`]) of its line over the slab `x`.
#[inline(always)]
fn period_max(x: &[f32], period: usize, inner: usize) -> [f32; MAX_PERIOD] {
    let mut max = [f32::NEG_INFINITY; MAX_PERIOD];
    for chunk in x.chunks(period) {
        for (m, &v) in max.iter_mut().zip(chunk) {
            *m = larger(*m, max_key(v));
        }
    }
    let mut lines = [f32::NEG_INFINITY; NARROW];
    for (j, &m) in max[..period].iter().enumerate() {
        lines[j % inner] = larger(lines[j % inner], m);
    }
    for (j, m) in max[..period].iter_mut().enumerate() {
        *m = lines[j % inner];
    }
    max
}

/// Per position of a period, the sum over the slab's periods of what `add(start, part)` adds
/// into `part` for the period at element `start`: f32 blocks of [`SUM_BLOCK`] periods added in
/// f64, then folded per line (position `j` is line `j % inner`) and spread back over the
/// positions.
#[inline(always)]
fn period_sums(
    elements: usize,
    period: usize,
    inner: usize,
    mut add: impl FnMut(usize, &mut [f32]),
) -> [f32; MAX_PERIOD] {
    let mut total = [0f64; MAX_PERIOD];
    let mut part = [0f32; MAX_PERIOD];
    let periods = elements.div_ceil(period);
    for p in 0..periods {
        let start = p * period;
        add(start, &mut part[..period.min(elements - start)]);
        if (p + 1) % SUM_BLOCK == 0 || p + 1 == periods {
            for (t, part) in total.iter_mut().zip(part.iter_mut()) {
                *t += f64::from(*part);
                *part = 0.0;
            }
        }
    }
    let mut lines = [0f64; NARROW];
    for (j, t) in total[..period].iter().enumerate() {
        lines[j % inner] += t;
    }
    let mut spread = [0f32; MAX_PERIOD];
    for (j, s) in spread[..period].iter_mut().enumerate() {
        *s = lines[j % inner] as f32;
    }
    spread
}

/// The least common multiple of `a` and `b`.
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// Cross-entropy with the classes along an axis whose `inner` is more than 1: what a block of
/// lines needs besides its logits.
pub(super) struct LossLines<'a> {
    pub plan: &'a CrossEntropyPlan<'a>,
    /// One class per line ([`IGNORED_ROW`] for ignored lines), or `None` for probabilities.
    pub indices: Option<&'a [i32]>,
    /// Probability targets, laid out like the logits.
    pub probabilities: Option<&'a [f32]>,
    /// `e / C`.
    pub smooth: f32,
    /// `1 - e`.
    pub keep: f32,
    /// `sum_c w_c`.
    pub weight_sum: f64,
}

impl LossLines<'_> {
    fn weight(&self, class: usize) -> f32 {
        self.plan.weight.map_or(1.0, |w| w[class])
    }
}

/// What the index targets say of up to [`MAX_COLUMNS`] neighbouring lines: each line's target
/// class, the target's weight, and whether the line is ignored (for probability targets, no
/// line is ignored and nothing else is used).
/// `N` lines at most, as [`LossStats`].
struct LineTargets<const N: usize = MAX_COLUMNS> {
    class: [usize; N],
    weight: [f32; N],
    ignored: [bool; N],
}

impl<const N: usize> LineTargets<N> {
    /// Lines `first..first + n`.
    fn new(lines: &LossLines<'_>, first: usize, n: usize) -> Self {
        let mut targets = LineTargets {
            class: [0; N],
            weight: [0.0; N],
            ignored: [false; N],
        };
        if let Some(t) = lines.indices {
            for (j, &t) in t[first..][..n].iter().enumerate() {
                targets.ignored[j] = t == IGNORED_ROW;
                targets.class[j] = if targets.ignored[j] { 0 } else { t as usize };
                targets.weight[j] = lines.weight(targets.class[j]);
            }
        }
        targets
    }

    /// Line `j`'s target terms (index targets): `(1 - e) w_t (x_t - m)` added to its `A`, and
    /// its `B = (1 - e) w_t + e/C sum_c w_c`; `x_t` its target logit, `m` its maximum.
    fn target_terms(&self, lines: &LossLines<'_>, j: usize, x_t: f32, m: f32) -> (f64, f64) {
        let q_t = lines.keep * self.weight[j];
        let a = if q_t != 0.0 {
            f64::from(q_t) * (f64::from(x_t) - f64::from(m))
        } else {
            0.0
        };
        (
            a,
            f64::from(q_t) + f64::from(lines.smooth) * lines.weight_sum,
        )
    }

    /// What fills line `j`'s gradient in place of the formula: 0 for an ignored line, NaN for a
    /// line whose maximum `m` is not finite; `None` where the formula holds.
    fn fill(&self, j: usize, m: f32) -> Option<f32> {
        if self.ignored[j] {
            Some(0.0)
        } else if !m.is_finite() {
            Some(f32::NAN)
        } else {
            None
        }
    }

    /// Line `j`'s loss, `B ln S - A`, or its fill.
    fn loss(&self, j: usize, m: f32, ln_sum: f32, a: f64, b: f64) -> f64 {
        match self.fill(j, m) {
            Some(fill) => f64::from(fill),
            None => b * f64::from(ln_sum) - a,
        }
    }
}

/// The per-line losses (f64, in the lines' order) of cross-entropy along `layout`, and with
/// `grad` its gradient, scaled as the plan says, with the kernels built for `isa`: blocks of
/// neighbouring lines of a slab walked down the axis, as the softmax along an axis is, so that
/// nothing is transposed.
pub(super) fn cross_entropy(
    isa: Isa,
    lines: &LossLines<'_>,
    layout: AxisLayout,
    x: &[f32],
    grad: Option<&mut [f32]>,
) -> Vec<f64> {
    let (len, inner) = (layout.len(), layout.inner());
    let mut losses = vec![0f64; layout.lines()];
    if layout.is_empty() {
        return losses;
    }
    let slab = len * inner;
    if takes_narrow(AlongOp::Softmax, inner)
        && streamed::takes_narrow(layout, rayon::current_num_threads())
    {
        streamed::cross_entropy_narrow(isa, lines, layout, x, grad, &mut losses);
        return losses;
    }
    if takes_narrow(AlongOp::Softmax, inner) {
        // Slabs in turn, each walked flat; as the softmax's narrow slabs.
        let task = |(o, (x, losses)): (usize, (&[f32], &mut [f64])), grad: Option<&mut [f32]>| {
            loss_narrow_on(isa, lines, x, o * inner, grad, (len, inner), losses);
        };
        let slabs = x.chunks(slab).zip(losses.chunks_mut(inner)).enumerate();
        match grad {
            Some(grad) if layout.numel() > SERIAL_ELEMS => {
                x.par_chunks(slab)
                    .zip(losses.par_chunks_mut(inner))
                    .enumerate()
                    .zip(grad.par_chunks_mut(slab))
                    .with_min_len((TASK_ELEMS / slab).max(1))
                    .for_each(|(t, g)| task(t, Some(g)));
            }
            Some(grad) => slabs
                .zip(grad.chunks_mut(slab))
                .for_each(|(t, g)| task(t, Some(g))),
            None if layout.numel() > SERIAL_ELEMS => {
                x.par_chunks(slab)
                    .zip(losses.par_chunks_mut(inner))
                    .enumerate()
                    .with_min_len((TASK_ELEMS / slab).max(1))
                    .for_each(|t| task(t, None));
            }
            None => slabs.for_each(|t| task(t, None)),
        }
        return losses;
    }
    if streamed::takes_loss(layout, rayon::current_num_threads()) {
        streamed::cross_entropy(isa, lines, layout, x, grad, &mut losses);
        return losses;
    }
    let grad = grad.map(Out::new);
    let loss_out = Out::new(&mut losses);
    for_each_block(layout, |o, block| {
        let slabs = o * slab..(o + 1) * slab;
        // SAFETY: slab `o` lies within the gradient, which is as long as `x`.
        let grad = grad.map(|g| unsafe { g.add(slabs.start) });
        let mut block_losses = [0f64; MAX_COLUMNS];
        loss_columns_on(
            isa,
            lines,
            &x[slabs],
            o * inner,
            grad,
            block,
            &mut block_losses,
        );
        let first_line = o * inner + block.first;
        // SAFETY: this task's lines alone, within the losses.
        let out = unsafe { loss_out.slice(first_line, block.width) };
        out.copy_from_slice(&block_losses[..block.width]);
    });
    losses
}

/// What a block's lines gather over its steps for cross-entropy, each relative to the line's
/// `shift` there (its maximum where finite, else 0: a line or chunk of only -inf, or one of a
/// NaN or +inf, whose loss is the fill anyway): its maximum (of `max_key`s), `sum exp(x -
/// shift)`, and of the terms other than an index target's (probability targets; smoothing's
/// share of index targets) `a = sum q (x - shift)` (a term 0 where `q` is) and `q = sum q`.
///
/// `N` lines at most: [`MAX_COLUMNS`] for a block, fewer where fewer lines are ever asked for
/// (a narrow slab, a run of the streamed combine), whose setting to zero then costs less.
struct LossStats<const N: usize = MAX_COLUMNS> {
    max: [f32; N],
    sum: [f64; N],
    a: [f64; N],
    q: [f64; N],
}

impl<const N: usize> LossStats<N> {
    fn new() -> Self {
        LossStats {
            max: [f32::NEG_INFINITY; N],
            sum: [0.0; N],
            a: [0.0; N],
            q: [0.0; N],
        }
    }
}

impl LossStats {
    fn shift(max: f32) -> f32 {
        if max.is_finite() {
            max
        } else {
            0.0
        }
    }
}

/// Cross-entropy's [`LossStats`] of a block of lines of the slab `x` (`line0` its first line)
/// over the block's steps. Every loop over a step runs across the block's lines alike, so that
/// it vectorises.
#[inline(always)]
fn loss_stats<M: MulAdd>(
    lines: &LossLines<'_>,
    x: &[f32],
    line0: usize,
    block: Block,
    stats: &mut LossStats,
) {
    let w = block.width;
    let max = &mut stats.max[..w];
    max.fill(f32::NEG_INFINITY);
    block_max(x, block, max);
    let mut shift = [0f32; MAX_COLUMNS];
    for (s, &m) in shift.iter_mut().zip(&*max) {
        *s = LossStats::shift(m);
    }
    let shift = &shift[..w];
    // A q (x - shift) term, exactly 0 where q is 0 whatever x is.
    let term = |q: f32, v: f32, m: f32| if q != 0.0 { q * (v - m) } else { 0.0 };
    line_sums_into(block, &mut stats.sum, |k, part| {
        for ((p, &v), &m) in part.iter_mut().zip(block.row(x, k)).zip(shift) {
            *p += exp_nonpositive::<M>(v - m);
        }
    });
    let (smooth, keep) = (lines.smooth, lines.keep);
    match lines.probabilities {
        Some(p) => {
            let probs = &p[line0 * block.len..][..block.len * block.inner];
            line_sums_into(block, &mut stats.a, |k, part| {
                let w_k = lines.weight(k);
                let lines = part.iter_mut().zip(block.row(x, k)).zip(shift);
                for (((p, &v), &m), &prob) in lines.zip(block.row(probs, k)) {
                    *p += term(w_k * (keep * prob + smooth), v, m);
                }
            });
            line_sums_into(block, &mut stats.q, |k, part| {
                let w_k = lines.weight(k);
                for (p, &prob) in part.iter_mut().zip(block.row(probs, k)) {
                    *p += w_k * (keep * prob + smooth);
                }
            });
        }
        None if smooth != 0.0 => {
            // The smoothing's share, e/C sum_c w_c (x_c - shift), and its e/C sum_c w_c over
            // the steps (the same for every line).
            line_sums_into(block, &mut stats.a, |k, part| {
                let w_k = lines.weight(k);
                for ((p, &v), &m) in part.iter_mut().zip(block.row(x, k)).zip(shift) {
                    *p += term(w_k, v, m);
                }
            });
            let weights: f64 = block.steps().map(|k| f64::from(lines.weight(k))).sum();
            for (a, q) in stats.a[..w].iter_mut().zip(&mut stats.q[..w]) {
                *a *= f64::from(smooth);
                *q = f64::from(smooth) * weights;
            }
        }
        None => {
            stats.a[..w].fill(0.0);
            stats.q[..w].fill(0.0);
        }
    }
}

/// Each line's loss into `losses`, and with `grad` its gradient factors, from its
/// [`LossStats`] over the whole axis (`stats`, relative to its maximum): with `A` the line's
/// `a` and its target's `(1 - e) w_t (x_t - m)`, and `B` its `q` (probability targets) or `(1 -
/// e) w_t + e/C sum_c w_c` (index targets), the loss `B ln S - A` (or the line's fill), the
/// gradient's `factor = scale B / S` and its `scale`. `x` is the slab, `line0` its first line.
#[inline(always)]
fn loss_finish<const N: usize>(
    lines: &LossLines<'_>,
    (x, line0): (&[f32], usize),
    block: Block,
    targets: &LineTargets<N>,
    stats: &LossStats<N>,
    losses: &mut [f64],
    grad: Option<[&mut [f32]; 2]>,
) {
    let w = block.width;
    // ln S of every line in one loop that vectorises (S is at least 1 where the maximum is
    // finite, the only lines whose loss uses it).
    let mut ln_sums = [0f32; N];
    for (l, &s) in ln_sums[..w].iter_mut().zip(&stats.sum) {
        *l = ln_normal((s as f32).max(1.0));
    }
    let mut scale64 = [0f64; N];
    if grad.is_some() {
        lines
            .plan
            .grad_scales(line0 + block.first, &mut scale64[..w]);
    }
    let mut grad = grad;
    for j in 0..w {
        let (m, mut a, mut b) = (stats.max[j], stats.a[j], stats.q[j]);
        if lines.probabilities.is_none() {
            let x_t = block.row(x, targets.class[j])[j];
            let (a_t, b_j) = targets.target_terms(lines, j, x_t, m);
            a += a_t;
            b = b_j;
        }
        losses[j] = targets.loss(j, m, ln_sums[j], a, b);
        if let Some([factor, scale]) = &mut grad {
            scale[j] = scale64[j] as f32;
            factor[j] = scale[j] * (b / stats.sum[j]) as f32;
        }
    }
}

/// Writes the gradient of a block's lines over the block's steps, from each line's maximum
/// `max`, `factor` and `scale` ([`loss_finish`]): `grad_c = exp(x_c - m) factor - scale q_c`,
/// the `q_c` of every class but the target's in the walk, then the target's own mass where the
/// target lies within the steps, and the fills of ignored lines and lines without a finite
/// maximum.
#[inline(always)]
fn loss_grad<M: MulAdd>(
    lines: &LossLines<'_>,
    (x, line0): (&[f32], usize),
    grad: Out,
    block: Block,
    targets: &LineTargets,
    [max, factor, scale]: [&[f32]; 3],
) {
    let w = block.width;
    let (max, factor, scale) = (&max[..w], &factor[..w], &scale[..w]);
    let (smooth, keep) = (lines.smooth, lines.keep);
    let probs = lines
        .probabilities
        .map(|p| &p[line0 * block.len..][..block.len * block.inner]);
    for k in block.steps() {
        // SAFETY: this task's lines alone (see `Out`).
        let g = unsafe { block.out_row(grad, k) };
        let w_k = lines.weight(k);
        let lines = g
            .iter_mut()
            .zip(block.row(x, k))
            .zip(max.iter().zip(factor));
        match probs {
            Some(probs) => {
                let row = block.row(probs, k).iter().zip(scale);
                for (((g, &v), (&m, &f)), (&prob, &s)) in lines.zip(row) {
                    *g = exp_nonpositive::<M>(v - m) * f - s * (w_k * (keep * prob + smooth));
                }
            }
            None if smooth != 0.0 => {
                let spread = smooth * w_k;
                for (((g, &v), (&m, &f)), &s) in lines.zip(scale) {
                    *g = exp_nonpositive::<M>(v - m) * f - s * spread;
                }
            }
            None => {
                for ((g, &v), (&m, &f)) in lines {
                    *g = exp_nonpositive::<M>(v - m) * f;
                }
            }
        }
    }
    for j in 0..w {
        let Some(fill) = targets.fill(j, max[j]) else {
            let class = targets.class[j];
            if probs.is_none() && block.steps().contains(&class) {
                // The target's own mass, (1 - e) w_t.
                // SAFETY: this task's lines alone (see `Out`).
                let g = unsafe { block.out_row(grad, class) };
                g[j] -= scale[j] * (keep * targets.weight[j]);
            }
            continue;
        };
        for k in block.steps() {
            // SAFETY: this task's lines alone (see `Out`).
            let g = unsafe { block.out_row(grad, k) };
            g[j] = fill;
        }
    }
}

/// One block of lines of cross-entropy walked whole: `x` is the slab, `line0` the index of its
/// line 0, and `losses` receives the block's lines' losses. Per line with max `m` and `S = sum
/// exp(x - m)`: `A = sum q_c (x_c - m)`, `B = sum q_c`, loss `B ln S - A`, gradient `scale
/// (exp(x_c - m) B / S - q_c)`; an ignored line has loss 0 and gradient 0, a line without a
/// finite maximum NaN.
#[inline(always)]
fn loss_columns<M: MulAdd>(
    lines: &LossLines<'_>,
    x: &[f32],
    line0: usize,
    grad: Option<Out>,
    block: Block,
    losses: &mut [f64; MAX_COLUMNS],
) {
    let mut stats = LossStats::new();
    loss_stats::<M>(lines, x, line0, block, &mut stats);
    let targets = LineTargets::new(lines, line0 + block.first, block.width);
    let (mut factor, mut scale) = ([0f32; MAX_COLUMNS], [0f32; MAX_COLUMNS]);
    let factors = grad.map(|_| [&mut factor[..], &mut scale[..]]);
    loss_finish(lines, (x, line0), block, &targets, &stats, losses, factors);
    if let Some(grad) = grad {
        let factors = [&stats.max[..], &factor, &scale];
        loss_grad::<M>(lines, (x, line0), grad, block, &targets, factors);
    }
}

/// [`loss_columns`] over one whole slab `x` of fewer lines than [`NARROW`], walked flat as
/// [`narrow`] walks it: statistics per position of a period, folded per line (position `j` is
/// line `j % inner`, its class `(start + j) / inner` in the period at element `start`); `line0`
/// is the slab's first line, `(len, inner)` its shape, and `losses` and `grad` (the slab's, when
/// asked for) receive its lines'.
#[inline(always)]
fn loss_narrow<M: MulAdd>(
    lines: &LossLines<'_>,
    x: &[f32],
    line0: usize,
    grad: Option<&mut [f32]>,
    (len, inner): (usize, usize),
    losses: &mut [f64],
) {
    let chunk = NarrowChunk {
        off: 0,
        n: len * inner,
        period: period_of(inner),
        inner,
    };
    let mut stats = LossStats::new();
    narrow_loss_stats::<M>(lines, (x, line0), chunk, &mut stats);
    let targets = LineTargets::new(lines, line0, inner);
    let block = Block::whole(len, inner, 0, inner);
    let (mut factor, mut scale) = ([0f32; NARROW], [0f32; NARROW]);
    let factors = grad.is_some().then(|| [&mut factor[..], &mut scale[..]]);
    loss_finish(lines, (x, line0), block, &targets, &stats, losses, factors);
    if let Some(g) = grad {
        let factors = [&stats.max[..inner], &factor[..inner], &scale[..inner]];
        narrow_loss_grad::<M>(lines, (x, line0), chunk, g, &targets, factors);
    }
}

/// A chunk of a narrow slab of `inner` lines: `n` elements from element `off` of the slab, whole
/// periods of `period` (see [`NarrowCut`]).
#[derive(Clone, Copy)]
struct NarrowChunk {
    off: usize,
    n: usize,
    period: usize,
    inner: usize,
}

impl NarrowChunk {
    /// The class of position `j` of the period at chunk element `start`.
    fn class(&self, start: usize, j: usize) -> usize {
        (self.off + start + j) / self.inner
    }

    /// The steps (classes) the chunk holds.
    fn steps(&self) -> std::ops::Range<usize> {
        self.off / self.inner..(self.off + self.n) / self.inner
    }

    /// Into `w`, the class weights of the period at chunk element `start` (left as they are
    /// without weights).
    fn class_weights(&self, lines: &LossLines<'_>, start: usize, w: &mut [f32]) {
        if lines.plan.weight.is_some() {
            for (j, w) in w.iter_mut().enumerate() {
                *w = lines.weight(self.class(start, j));
            }
        }
    }
}

/// Phase 1 of cross-entropy on a narrow chunk of the slab `x` (`line0` its first line): each
/// of the slab's lines' [`LossStats`] over the chunk's steps, walked flat as
/// [`super::loss_narrow`] walks a slab (statistics per position of a period, folded per line).
#[inline(always)]
fn narrow_loss_stats<M: MulAdd>(
    lines: &LossLines<'_>,
    (x, line0): (&[f32], usize),
    chunk: NarrowChunk,
    stats: &mut LossStats<NARROW>,
) {
    let NarrowChunk {
        off,
        n,
        period,
        inner,
    } = chunk;
    let xs = &x[off..][..n];
    let max = period_max(xs, period, inner);
    let mut shift = [0f32; MAX_PERIOD];
    for (s, &m) in shift.iter_mut().zip(&max[..period]) {
        *s = LossStats::shift(m);
    }
    let sums = period_sums(
        n,
        period,
        inner,
        #[inline(always)]
        |start, part: &mut [f32]| {
            for ((p, &v), &m) in part.iter_mut().zip(&xs[start..]).zip(&shift) {
                *p += exp_nonpositive::<M>(v - m);
            }
        },
    );
    let (smooth, keep) = (lines.smooth, lines.keep);
    let term = |q: f32, v: f32, m: f32| if q != 0.0 { q * (v - m) } else { 0.0 };
    let mut w_buf = [1f32; MAX_PERIOD];
    let (mut a, mut q) = ([0f32; MAX_PERIOD], [0f32; MAX_PERIOD]);
    match lines.probabilities {
        Some(p) => {
            let probs = &p[line0 * (x.len() / inner)..][..x.len()][off..][..n];
            a = period_sums(
                n,
                period,
                inner,
                #[inline(always)]
                |start, part: &mut [f32]| {
                    let w = &mut w_buf[..part.len()];
                    chunk.class_weights(lines, start, w);
                    let values = xs[start..]
                        .iter()
                        .zip(&shift)
                        .zip(w.iter())
                        .zip(&probs[start..]);
                    for (p, (((&v, &m), &w), &prob)) in part.iter_mut().zip(values) {
                        *p += term(w * (keep * prob + smooth), v, m);
                    }
                },
            );
            q = period_sums(
                n,
                period,
                inner,
                #[inline(always)]
                |start, part: &mut [f32]| {
                    let w = &mut w_buf[..part.len()];
                    chunk.class_weights(lines, start, w);
                    for ((p, &w), &prob) in part.iter_mut().zip(w.iter()).zip(&probs[start..]) {
                        *p += w * (keep * prob + smooth);
                    }
                },
            );
        }
        None if smooth != 0.0 => {
            let spread = period_sums(
                n,
                period,
                inner,
                #[inline(always)]
                |start, part: &mut [f32]| {
                    let w = &mut w_buf[..part.len()];
                    chunk.class_weights(lines, start, w);
                    for (p, ((&v, &m), &w)) in part
                        .iter_mut()
                        .zip(xs[start..].iter().zip(&shift).zip(w.iter()))
                    {
                        *p += term(w, v, m);
                    }
                },
            );
            a = spread;
        }
        None => {}
    }
    // Index targets: the smoothing's share e/C sum_c w_c over the chunk's classes, the same for
    // every line (0 without smoothing).
    let smoothing = match lines.probabilities {
        Some(_) => None,
        None if smooth == 0.0 => Some(0.0),
        None => {
            let weights: f64 = chunk.steps().map(|k| f64::from(lines.weight(k))).sum();
            Some(f64::from(smooth) * weights)
        }
    };
    for i in 0..inner {
        stats.max[i] = max[i];
        stats.sum[i] = f64::from(sums[i]);
        match smoothing {
            Some(share) => {
                stats.a[i] = f64::from(smooth) * f64::from(a[i]);
                stats.q[i] = share;
            }
            None => {
                stats.a[i] = f64::from(a[i]);
                stats.q[i] = f64::from(q[i]);
            }
        }
    }
}

/// Phase 3 of cross-entropy on a narrow chunk of the slab `x` (`line0` its first line): its
/// gradient into `g`, from each line's maximum, gradient factor and scale (`factors`), as
/// [`super::loss_narrow`] writes a slab's; then the target's own mass where the target class
/// lies within the chunk, and the fills.
#[inline(always)]
fn narrow_loss_grad<M: MulAdd>(
    lines: &LossLines<'_>,
    (x, line0): (&[f32], usize),
    chunk: NarrowChunk,
    g: &mut [f32],
    targets: &LineTargets<NARROW>,
    [max, factor, scale]: [&[f32]; 3],
) {
    let NarrowChunk {
        off,
        n,
        period,
        inner,
    } = chunk;
    let xs = &x[off..][..n];
    let probs = lines
        .probabilities
        .map(|p| &p[line0 * (x.len() / inner)..][..x.len()][off..][..n]);
    let (smooth, keep) = (lines.smooth, lines.keep);
    let (mut m, mut f, mut s) = ([0f32; MAX_PERIOD], [0f32; MAX_PERIOD], [0f32; MAX_PERIOD]);
    for j in 0..period {
        (m[j], f[j], s[j]) = (max[j % inner], factor[j % inner], scale[j % inner]);
    }
    let mut w_buf = [1f32; MAX_PERIOD];
    for (p, (g, xs)) in g.chunks_mut(period).zip(xs.chunks(period)).enumerate() {
        let start = p * period;
        let w = &mut w_buf[..g.len()];
        chunk.class_weights(lines, start, w);
        let values = g.iter_mut().zip(xs).zip(m.iter().zip(&f));
        match probs {
            Some(probs) => {
                let rest = s.iter().zip(w.iter()).zip(&probs[start..]);
                for (((g, &v), (&m, &f)), ((&s, &w), &prob)) in values.zip(rest) {
                    *g = exp_nonpositive::<M>(v - m) * f - s * (w * (keep * prob + smooth));
                }
            }
            None if smooth != 0.0 => {
                for (((g, &v), (&m, &f)), (&s, &w)) in values.zip(s.iter().zip(w.iter())) {
                    *g = exp_nonpositive::<M>(v - m) * f - s * (smooth * w);
                }
            }
            None => {
                for ((g, &v), (&m, &f)) in values {
                    *g = exp_nonpositive::<M>(v - m) * f;
                }
            }
        }
    }
    for i in 0..inner {
        let Some(fill) = targets.fill(i, max[i]) else {
            let class = targets.class[i];
            if probs.is_none() && chunk.steps().contains(&class) {
                g[class * inner + i - off] -= scale[i] * (keep * targets.weight[i]);
            }
            continue;
        };
        for g in g[i..].iter_mut().step_by(inner) {
            *g = fill;
        }
    }
}

multiversion!(loss_narrow_on => loss_narrow(
    lines: &LossLines<'_>, x: &[f32], line0: usize, grad: Option<&mut [f32]>,
    dims: (usize, usize), losses: &mut [f64]
));
multiversion!(narrow_loss_stats_on => narrow_loss_stats(
    lines: &LossLines<'_>,
    slab: (&[f32], usize),
    chunk: NarrowChunk,
    stats: &mut LossStats<NARROW>,
));
multiversion!(narrow_loss_grad_on => narrow_loss_grad(
    lines: &LossLines<'_>,
    slab: (&[f32], usize),
    chunk: NarrowChunk,
    g: &mut [f32],
    targets: &LineTargets<NARROW>,
    factors: [&[f32]; 3],
));

multiversion!(loss_columns_on => loss_columns(
    lines: &LossLines<'_>, x: &[f32], line0: usize, grad: Option<Out>, block: Block,
    losses: &mut [f64; MAX_COLUMNS]
));

multiversion!(columns_on => columns(op: AlongOp, x: &[f32], dy: &[f32], out: Out, block: Block));
multiversion!(narrow_on => narrow(
    op: AlongOp, x: &[f32], dy: &[f32], out: &mut [f32], len: usize, inner: usize
));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::Rng;
    use crate::Tolerance;

    #[test]
    fn blocks_span_what_the_cache_holds_in_whole_vectors() {
        // One block per slab where a slab fits; the widest blocks for short axes; four vectors
        // for long axes; blocks shared out for few slabs.
        assert_eq!(block_width(256, 32, 256, 2), 256);
        assert_eq!(block_width(16, 21, 16384, 2), MAX_COLUMNS);
        assert_eq!(block_width(4, 1024, 1024, 2), COLUMNS);
        assert_eq!(block_width(1, 8, 2048, 16), COLUMNS);
        for outer in [1, 3, 64] {
            for len in [1, 2, 21, 300, 5000, 1 << 20] {
                for inner in [2, 17, 64, 100, 1000, 4097, 1 << 16] {
                    for threads in [1, 2, 16] {
                        let w = block_width(outer, len, inner, threads);
                        assert!(w <= MAX_COLUMNS && w.is_multiple_of(LANES));
                        assert!(w >= inner.min(COLUMNS), "{outer}x{len}x{inner}: {w}");
                        // Even blocks: the last is no narrower than a block less a vector.
                        let last = inner - (inner.div_ceil(w) - 1) * w;
                        assert!(last + LANES * inner.div_ceil(w) > w.min(inner));
                    }
                }
            }
        }
    }

    #[test]
    fn long_lines_stream_in_chunks_of_steps() {
        // The layouts the tests stream (cross-entropy's 1x2100x64), on any number of threads.
        let ops = [
            AlongOp::Softmax,
            AlongOp::LogSoftmax,
            AlongOp::SoftmaxBackward,
            AlongOp::LogSoftmaxBackward,
        ];
        let takes = |op, (outer, len, inner), threads| {
            streamed::takes(
                op,
                AxisLayout::from_parts(outer, len, inner).unwrap(),
                threads,
            )
        };
        for op in ops {
            for shape in [(1, 3000, 70), (1, 2100, 1000), (9, 2100, 64)] {
                for threads in [1, 2, 16, 64] {
                    assert!(takes(op, shape, threads), "{op:?} {shape:?}");
                    // Cross-entropy's test streams 1x2100x64.
                    let layout = AxisLayout::from_parts(1, 2100, 64).unwrap();
                    assert!(streamed::takes_loss(layout, threads));
                }
            }
            // Blocks within 128 KiB of whole slab rows walk, whatever the op.
            assert!(!takes(op, (256, 32, 256), 2));
            assert!(!takes(op, (16, 21, 16384), 2));
            assert!(!takes(op, (64, 512, 64), 2));
        }
        // Narrow slabs of more than 128 KiB, where whole slabs leave threads idle.
        let narrow = |(outer, len, inner), threads| {
            streamed::takes_narrow(AxisLayout::from_parts(outer, len, inner).unwrap(), threads)
        };
        assert!(narrow((1, 5000, 15), 2) && narrow((3, 20000, 5), 2));
        assert!(narrow((2, 20000, 5), 16) && narrow((12, 20000, 5), 16));
        assert!(!narrow((2, 20000, 5), 2) && !narrow((16, 20000, 5), 16));
        assert!(!narrow((1, 5000, 15), 1) && !narrow((1, 2000, 15), 2));
        // Blocks within 128 KiB of 64 lines, where a chunk takes more, stream for the backward
        // ops; of 128 lines or more they walk.
        for (op, streams) in [(AlongOp::Softmax, false), (AlongOp::SoftmaxBackward, true)] {
            assert_eq!(takes(op, (16, 300, 512), 2), streams);
            assert_eq!(takes(op, (4, 512, 2048), 2), streams);
            assert!(!takes(op, (8, 256, 4096), 2));
            assert!(!takes(op, (32, 128, 1024), 2));
        }
    }

    /// The reference of a row op along `layout`: lines moved last and back.
    fn along_reference(
        layout: AxisLayout,
        [x, dy]: [&[f32]; 2],
        op: impl Fn(&[f32], &[f32], usize) -> Vec<f64>,
    ) -> Vec<f64> {
        let (x, dy) = (layout.to_rows(x).unwrap(), layout.to_rows(dy).unwrap());
        layout.from_rows(&op(&x, &dy, layout.len())).unwrap()
    }

    /// Every op, with every instruction set this CPU runs, on blocks narrower than, as wide as
    /// and wider than a task's lines, on slabs flat over periods (`lcm(inner, 16)` doubled to
    /// 128, with a tail, shorter than a period too; softmax there and its backward not), in one
    /// task and in parallel, with long axes summed in blocks; special values line by line.
    #[test]
    fn every_op_along_an_axis_matches_the_reference() {
        let mut rng = Rng::new(5);
        for &(outer, len, inner) in &[
            (2, 5, 3),
            (3, 21, 64),
            (2, 33, 130),
            (1, 3000, 70),
            (5, 1, 7),
            (40, 40, 40),
            (4, 1000, 4),
            (1, 5000, 15),
            (3, 77, 8),
            (64, 300, 6),
            (6, 50, 48),
            (2, 9, 63),
            (3, 40, 24),
            (2, 7, 2500),
            (1, 3, 1100),
            // Streamed (see the test below): chunks of 32 steps of 1000 lines; of 512 steps of
            // 64 lines, in 9 slabs; narrow slabs (also 1x5000x15) in chunks of whole periods.
            (1, 2100, 1000),
            (9, 2100, 64),
            (2, 20000, 5),
        ] {
            let layout = AxisLayout::from_parts(outer, len, inner).unwrap();
            let n = layout.numel();
            let mut x = rng.normals(n, 3.0);
            if n > 60 {
                // Line (0, 0): a -inf entry; (0, 1): all -inf; (0, 2): NaN; (0, 3): +inf.
                x[inner] = f32::NEG_INFINITY;
                for k in 0..len {
                    x[k * inner + 1] = f32::NEG_INFINITY;
                }
                x[2] = f32::NAN;
                x[(len - 1) * inner + 3] = f32::INFINITY;
                // Line (0, 4): -inf for its first half, whole chunks of a streamed line.
                if inner > 4 {
                    for k in 0..len / 2 {
                        x[k * inner + 4] = f32::NEG_INFINITY;
                    }
                }
            }
            let dy = rng.normals(n, 1.0);
            let y: Vec<f32> = along_reference(layout, [&x, &dy], |x, _, c| {
                reference::softmax(x, c).unwrap()
            })
            .iter()
            .map(|&v| v as f32)
            .collect();
            let ly: Vec<f32> = along_reference(layout, [&x, &dy], |x, _, c| {
                reference::log_softmax(x, c).unwrap()
            })
            .iter()
            .map(|&v| v as f32)
            .collect();
            let cases: [(AlongOp, &[f32], Vec<f64>, Tolerance); 4] = [
                (
                    AlongOp::Softmax,
                    &x,
                    along_reference(layout, [&x, &dy], |x, _, c| {
                        reference::softmax(x, c).unwrap()
                    }),
                    Tolerance::SOFTMAX,
                ),
                (
                    AlongOp::LogSoftmax,
                    &x,
                    along_reference(layout, [&x, &dy], |x, _, c| {
                        reference::log_softmax(x, c).unwrap()
                    }),
                    Tolerance::LOG_SOFTMAX,
                ),
                (
                    AlongOp::SoftmaxBackward,
                    &y,
                    along_reference(layout, [&y, &dy], |y, g, c| {
                        reference::softmax_backward(y, g, c).unwrap()
                    }),
                    Tolerance::SOFTMAX,
                ),
                (
                    AlongOp::LogSoftmaxBackward,
                    &ly,
                    along_reference(layout, [&ly, &dy], |y, g, c| {
                        reference::log_softmax_backward(y, g, c).unwrap()
                    }),
                    Tolerance::LOG_SOFTMAX,
                ),
            ];
            for (op, input, want, tolerance) in cases {
                let backward = matches!(op, AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward);
                let dy = if backward { &dy[..] } else { &[] };
                // The call as it chooses its walk, and every layout streamed too whatever the
                // thread count (narrow slabs as narrow slabs).
                type Walk = fn(Isa, AlongOp, AxisLayout, &[f32], &[f32], &mut [f32]);
                let streamed: Walk = if takes_narrow(op, inner) {
                    streamed::run_narrow_on
                } else {
                    streamed::run_on
                };
                for (walk, name) in [(run_on as Walk, "chosen"), (streamed, "streamed")] {
                    for isa in super::super::supported_isas() {
                        let mut out = vec![0.5; n];
                        walk(isa, op, layout, input, dy, &mut out);
                        let cmp = tolerance.compare(&out, &want);
                        assert!(
                            cmp.passed(),
                            "{op:?} {outer}x{len}x{inner} {isa:?} {name}: {cmp:?}"
                        );
                    }
                }
            }
        }
    }
}
