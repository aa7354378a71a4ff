//! Softmax, log-softmax and their backward along an axis that is not the last, in place: the
//! lines of a slab `[len, inner]` lie side by side, so a task takes a block of neighbouring
//! lines and walks down the axis a row of the slab at a time, each step a contiguous run that
//! vectorises across lines. Nothing is transposed, and a block of lines is read from cache on
//! its second and third pass.

use rayon::prelude::*;

use super::Separate;
use super::{
    exp, exp_nonpositive, isa, larger, max_key, Isa, MulAdd, LANES, SERIAL_ELEMS, TASK_ELEMS,
};
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
use super::{Fused, Fused512};
use crate::layout::AxisLayout;

/// Lines a task takes side by side: four AVX-512 vectors.
const COLUMNS: usize = 64;
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

/// The output of a whole call, written by tasks through disjoint blocks of lines.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: tasks write disjoint elements of the output (their own lines of their own slab), and
// the output outlives the parallel loop that shares the pointer.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The output `n` elements on (a method, so that closures capture the whole `Out`).
    ///
    /// # Safety
    /// `n` lies within the output.
    unsafe fn add(self, n: usize) -> Out {
        // SAFETY: the caller's contract.
        Out(unsafe { self.0.add(n) })
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
    let blocks_per_slab = inner.div_ceil(COLUMNS);
    let tasks = layout.outer() * blocks_per_slab;
    let out = Out(out.as_mut_ptr());
    let task = |t: usize| {
        let (o, b) = (t / blocks_per_slab, t % blocks_per_slab);
        let first = b * COLUMNS;
        let block = Block {
            len,
            inner,
            first,
            width: COLUMNS.min(inner - first),
        };
        let slabs = o * slab..(o + 1) * slab;
        let dy = if dy.is_empty() {
            dy
        } else {
            &dy[slabs.clone()]
        };
        // SAFETY: slab `o` lies within `out`, which is as long as `x`.
        let out = unsafe { out.add(slabs.start) };
        columns_on(isa, op, &x[slabs], dy, out, block);
    };
    if layout.numel() <= SERIAL_ELEMS {
        (0..tasks).for_each(task);
    } else {
        let per_task = (TASK_ELEMS / (len * COLUMNS)).max(1);
        (0..tasks)
            .into_par_iter()
            .with_min_len(per_task)
            .for_each(task);
    }
}

/// A block of neighbouring lines of one slab: lines `first..first + width` of `inner`, each
/// `len` long.
#[derive(Clone, Copy)]
struct Block {
    len: usize,
    inner: usize,
    first: usize,
    width: usize,
}

impl Block {
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

/// Sums `term(k, j)` down the axis for each line `j` of the block: f32 blocks of
/// [`SUM_BLOCK`] steps, added up in f64.
#[inline(always)]
fn line_sums(block: Block, mut add: impl FnMut(usize, &mut [f32])) -> [f64; COLUMNS] {
    let mut total = [0f64; COLUMNS];
    let mut part = [0f32; COLUMNS];
    for k in 0..block.len {
        add(k, &mut part[..block.width]);
        if (k + 1) % SUM_BLOCK == 0 || k + 1 == block.len {
            for (t, p) in total.iter_mut().zip(part.iter_mut()) {
                *t += f64::from(*p);
                *p = 0.0;
            }
        }
    }
    total
}

#[inline(always)]
fn columns<M: MulAdd>(op: AlongOp, x: &[f32], dy: &[f32], out: Out, block: Block) {
    let w = block.width;
    match op {
        AlongOp::Softmax | AlongOp::LogSoftmax => {
            let mut max = [f32::NEG_INFINITY; COLUMNS];
            let max = &mut max[..w];
            for k in 0..block.len {
                for (m, &v) in max.iter_mut().zip(block.row(x, k)) {
                    *m = larger(*m, max_key(v));
                }
            }
            let max = &*max;
            let sums = line_sums(block, |k, part| {
                for ((p, &v), &m) in part.iter_mut().zip(block.row(x, k)).zip(max) {
                    *p += exp_nonpositive::<M>(v - m);
                }
            });
            // A line with a NaN or +inf, or only -inf, has no finite maximum: NaN throughout.
            let log = op == AlongOp::LogSoftmax;
            let mut scale = [0f32; COLUMNS];
            for ((s, &m), &sum) in scale.iter_mut().zip(max).zip(&sums) {
                *s = match (m.is_infinite(), log) {
                    (true, _) => f32::NAN,
                    (false, true) => sum.ln() as f32,
                    (false, false) => (1.0 / sum) as f32,
                };
            }
            for k in 0..block.len {
                // SAFETY: this task's lines alone (see `Out`).
                let y = unsafe { block.out_row(out, k) };
                let lines = y.iter_mut().zip(block.row(x, k)).zip(max).zip(&scale);
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
        }
        AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward => {
            let log = op == AlongOp::LogSoftmaxBackward;
            let sums = line_sums(block, |k, part| {
                let (y, g) = (block.row(x, k), block.row(dy, k));
                if log {
                    for (p, &g) in part.iter_mut().zip(g) {
                        *p += g;
                    }
                } else {
                    for ((p, &y), &g) in part.iter_mut().zip(y).zip(g) {
                        *p += g * y;
                    }
                }
            });
            let mut r = [0f32; COLUMNS];
            for (r, &s) in r.iter_mut().zip(&sums) {
                *r = s as f32;
            }
            for k in 0..block.len {
                // SAFETY: this task's lines alone (see `Out`).
                let dx = unsafe { block.out_row(out, k) };
                let lines = dx
                    .iter_mut()
                    .zip(block.row(x, k))
                    .zip(block.row(dy, k))
                    .zip(&r);
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
/// doubled up to at least [`MIN_PERIOD`], holds `period / inner` steps of every line, and the statistics are kept per position of a
/// period (position `j` belongs to line `j % inner`) and folded per line at the end, so that
/// every pass runs over contiguous elements whole vectors at a time. A slab's last elements,
/// short of a whole period, continue the pattern.
#[inline(always)]
fn narrow<M: MulAdd>(
    op: AlongOp,
    x: &[f32],
    dy: &[f32],
    out: &mut [f32],
    len: usize,
    inner: usize,
) {
    let mut period = lcm(inner, LANES);
    while period < MIN_PERIOD {
        period *= 2;
    }
    let elements = len * inner;
    match op {
        AlongOp::Softmax | AlongOp::LogSoftmax => {
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
            let max = &max;
            let sums = period_sums(elements, period, inner, &mut |start, part: &mut [f32]| {
                for ((p, &v), &m) in part.iter_mut().zip(&x[start..]).zip(max) {
                    *p += exp_nonpositive::<M>(v - m);
                }
            });
            let log = op == AlongOp::LogSoftmax;
            let mut scale = [0f32; MAX_PERIOD];
            for ((s, &m), &sum) in scale.iter_mut().zip(max).zip(&sums) {
                *s = match (m.is_infinite(), log) {
                    (true, _) => f32::NAN,
                    (false, true) => f64::from(sum).ln() as f32,
                    (false, false) => (1.0 / f64::from(sum)) as f32,
                };
            }
            for (y, x) in out.chunks_mut(period).zip(x.chunks(period)) {
                let lines = y.iter_mut().zip(x).zip(max).zip(&scale);
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
        }
        AlongOp::SoftmaxBackward | AlongOp::LogSoftmaxBackward => {
            let log = op == AlongOp::LogSoftmaxBackward;
            let r = period_sums(elements, period, inner, &mut |start, part: &mut [f32]| {
                let (y, g) = (&x[start..], &dy[start..]);
                if log {
                    for (p, &g) in part.iter_mut().zip(g) {
                        *p += g;
                    }
                } else {
                    for ((p, &y), &g) in part.iter_mut().zip(y).zip(g) {
                        *p += g * y;
                    }
                }
            });
            for ((dx, y), g) in out
                .chunks_mut(period)
                .zip(x.chunks(period))
                .zip(dy.chunks(period))
            {
                let lines = dx.iter_mut().zip(y).zip(g).zip(&r);
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
        }
    }
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
    add: &mut impl FnMut(usize, &mut [f32]),
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
    /// 128, with a tail, shorter than a period too; softmax there and its backward not), in one task and in parallel, with long axes summed in
    /// blocks; special values line by line.
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
                for isa in super::super::supported_isas() {
                    let mut out = vec![0.5; n];
                    run_on(isa, op, layout, input, dy, &mut out);
                    let cmp = tolerance.compare(&out, &want);
                    assert!(
                        cmp.passed(),
                        "{op:?} {outer}x{len}x{inner} {isa:?}: {cmp:?}"
                    );
                }
            }
        }
    }
}
