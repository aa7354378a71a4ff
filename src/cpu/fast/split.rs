//! Rows split across threads by columns.
//!
//! Whole rows per task leave threads idle where a batch has fewer long rows than the machine has
//! threads, or a count that does not divide among them: one row of 4M columns ran on one of two
//! threads, three rows took two rounds. Such rows are cut into chunks of columns, as the GPU
//! path's split kernel cuts them across workgroups:
//!
//! 1. each chunk in parallel: its maximum and its sum of `exp(x - chunk max)` (or the partial
//!    sums of a backward reduction), softmax and cross-entropy storing the exponentials;
//! 2. each row: the chunks combined by the online-normalizer rule, `S = sum_c s_c exp(m_c - M)`;
//! 3. each chunk in parallel: the output, rescaling stored exponentials by `exp(m_c - M) / S`.

use rayon::prelude::*;

use super::{
    dot, exp_nonpositive, exp_store_sum, index_row_grad, index_scalars, larger, log_softmax_grad,
    prob_target_grad, prob_target_sums, scan, softmax_grad, store_fence, store_map, sum, sum_exp,
    weighted_lsm_sum, CeContext, CrossEntropyTargets, Fused, Fused512, Isa, MulAdd, Separate,
    LANES,
};

/// The fewest columns a split row has (3 MiB). A row that fits in its core's L2 (2 MiB here)
/// stays there between passes; cut across cores, its chunks move from one core's cache to
/// another's between phases 1 and 3. On two threads, paired runs of one row cut against whole
/// measured 0.7-1.2x for 128k and 256k columns, 0.75-1.9x for 512k, 1.3-1.4x for 768k and
/// 1.3-1.5x for 1M (cross-entropy, softmax and their backward ops alike).
const MIN_COLS: usize = 3 << 18;

/// The fewest columns a chunk has (64 KiB), so that each task amortises its scheduling.
const MIN_CHUNK: usize = 1 << 14;

/// Chunks per thread that a split aims at, so that rayon can even out uneven threads.
const CHUNKS_PER_THREAD: usize = 4;

/// How a row is cut: `per_row` chunks of `chunk` columns (the last one shorter).
#[derive(Clone, Copy, Debug)]
pub(super) struct Split {
    pub(super) chunk: usize,
    pub(super) per_row: usize,
}

impl Split {
    /// The split of `rows` rows of `cols` columns over `threads` threads, or `None` where whole
    /// rows keep three quarters of the threads' time busy or the rows are too short to cut.
    /// (Two rows of 256k columns on two threads measured 0.7-0.9x as fast cut as whole.)
    pub(super) fn plan(rows: usize, cols: usize, threads: usize) -> Option<Self> {
        let rounds = rows.div_ceil(threads.max(1));
        if rows == 0 || threads < 2 || 4 * rows > 3 * rounds * threads || cols < MIN_COLS {
            return None;
        }
        let wanted = (CHUNKS_PER_THREAD * threads).div_ceil(rows.max(1));
        Self::with_chunk(
            cols,
            cols.div_ceil(wanted).next_multiple_of(LANES).max(MIN_CHUNK),
        )
    }

    /// Chunks of `chunk` columns; `None` where that leaves one chunk per row.
    pub(super) fn with_chunk(cols: usize, chunk: usize) -> Option<Self> {
        let per_row = cols.div_ceil(chunk.max(1));
        (per_row > 1).then_some(Self { chunk, per_row })
    }

    /// [`Self::plan`] on rayon's threads.
    pub(super) fn for_batch(rows: usize, cols: usize) -> Option<Self> {
        Self::plan(rows, cols, rayon::current_num_threads())
    }
}

/// What phase 1 finds in one chunk.
#[derive(Clone, Copy, Debug, Default)]
struct Part {
    /// The chunk's largest `max_key`: `+inf` for a NaN or `+inf` entry, `-inf` when every entry
    /// is `-inf`. Unused by the backward ops.
    max: f32,
    /// `sum exp(x - max)` over the chunk (0 where `max` is not finite), or the chunk's share of
    /// a backward reduction.
    sum: f64,
    /// Cross-entropy with label smoothing or probability targets: `sum [v != 0] v (x - shift)`
    /// and `sum v` over the chunk, `v` the class weight (index targets) or the target's share
    /// `q` (probability targets), `shift` the chunk's [`Part::shift`].
    terms: [f64; 2],
}

impl Part {
    /// What the chunk's exponentials and terms are taken relative to: its maximum, or 0 where
    /// that is not finite (which keeps `x - shift` from being `-inf - -inf`).
    fn shift(&self) -> f32 {
        if self.max.is_finite() {
            self.max
        } else {
            0.0
        }
    }

    /// The chunk's share of `sum [v != 0] v ((x - max) - log_sum)` over its row.
    fn term_share(&self, max: f32, log_sum: f32) -> f64 {
        let [vx, v] = self.terms;
        let offset = f64::from(self.shift()) - f64::from(max) - f64::from(log_sum);
        vx + if v != 0.0 { offset * v } else { 0.0 }
    }
}

/// A row's chunks combined.
#[derive(Clone, Copy, Debug)]
struct Row {
    /// The row's maximum, NaN for a degenerate row (a NaN or `+inf` entry, or all `-inf`).
    max: f32,
    /// `sum_j exp(x_j - max)`.
    sum: f64,
}

impl Row {
    fn combine(parts: &[Part]) -> Self {
        let max = parts
            .iter()
            .fold(f32::NEG_INFINITY, |m, p| larger(m, p.max));
        if max.is_infinite() {
            return Self {
                max: f32::NAN,
                sum: f64::NAN,
            };
        }
        let sum = parts
            .iter()
            .map(|p| p.sum * self::rescale(p.max, max))
            .sum();
        Self { max, sum }
    }
}

/// `exp(chunk_max - row_max)`, the factor that takes a chunk's exponentials to the row's; 0 for
/// a chunk of `-inf` only.
fn rescale(chunk_max: f32, row_max: f32) -> f64 {
    if chunk_max == f32::NEG_INFINITY {
        0.0
    } else {
        (f64::from(chunk_max) - f64::from(row_max)).exp()
    }
}

/// Runs the three phases over `out`, rows of `cols` columns: `first(row, column, out chunk)`
/// returns the chunk's [`Part`]; `combine(row, its parts)` the row's summary; `then(row, column,
/// out chunk, its part, the row's summary)` writes the chunk's output. Returns the summaries.
fn run<R: Copy + Send + Sync>(
    split: Split,
    out: &mut [f32],
    cols: usize,
    first: impl Fn(usize, usize, &mut [f32]) -> Part + Sync,
    combine: impl Fn(usize, &[Part]) -> R,
    then: impl Fn(usize, usize, &mut [f32], Part, R) + Sync,
) -> Vec<R> {
    let Split { chunk, per_row } = split;
    let mut pieces: Vec<&mut [f32]> = out
        .chunks_exact_mut(cols)
        .flat_map(|row| row.chunks_mut(chunk))
        .collect();
    let parts: Vec<Part> = pieces
        .par_iter_mut()
        .enumerate()
        .map(|(i, y)| first(i / per_row, i % per_row * chunk, y))
        .collect();
    let rows: Vec<R> = parts
        .chunks_exact(per_row)
        .enumerate()
        .map(|(r, p)| combine(r, p))
        .collect();
    pieces.par_iter_mut().enumerate().for_each(|(i, y)| {
        let r = i / per_row;
        then(r, i % per_row * chunk, y, parts[i], rows[r]);
    });
    rows
}

// ---------------------------------------------------------------------------------------------
// Chunk kernels, built for each instruction set by `multiversion!`.

/// Phase 1 of softmax and log-softmax: the chunk's maximum and sum of exponentials, which go to
/// `e` (as long as `x`) unless it is empty.
#[inline(always)]
fn exp_part<M: MulAdd>(x: &[f32], e: &mut [f32], part: &mut Part) {
    let max = scan(x).max;
    *part = Part {
        max,
        ..Part::default()
    };
    if !max.is_finite() {
        // Zeros where rescaling is to make the chunk's output 0 (all -inf); a degenerate row's
        // output is overwritten anyway.
        e.fill(0.0);
        return;
    }
    part.sum = if e.is_empty() {
        sum_exp::<M>(x, max)
    } else {
        exp_store_sum::<M>(x, max, e)
    };
}

/// Phase 3 of softmax: `y = e * k` where the exponentials are stored in `y`, otherwise `y_j =
/// exp(x_j - max) * k` with non-temporal stores where `stream` is set.
#[inline(always)]
fn softmax_out<M: MulAdd>(x: &[f32], y: &mut [f32], stored: bool, max: f32, k: f32, stream: bool) {
    if stored {
        for v in y.iter_mut() {
            *v *= k;
        }
    } else {
        store_map::<M>(y, x, x, stream, |v, _| exp_nonpositive::<M>(v - max) * k);
        store_fence(stream);
    }
}

/// Phase 3 of log-softmax: `y_j = (x_j - max) - log_sum`.
#[inline(always)]
fn log_softmax_out<M: MulAdd>(x: &[f32], y: &mut [f32], max: f32, log_sum: f32, stream: bool) {
    store_map::<M>(y, x, x, stream, |v, _| (v - max) - log_sum);
    store_fence(stream);
}

/// Phase 1 of the backward ops: `sum_j y_j dy_j` (softmax) or `sum_j dy_j` (log-softmax).
#[inline(always)]
fn backward_part<M: MulAdd>(y: &[f32], dy: &[f32], log: bool, part: &mut Part) {
    let sum = if log { sum(dy) } else { dot(y, dy) };
    *part = Part {
        sum,
        ..Part::default()
    };
}

/// Phase 3 of the backward ops, with the row's reduction `r`.
#[inline(always)]
fn backward_out<M: MulAdd>(y: &[f32], dy: &[f32], dx: &mut [f32], log: bool, r: f32, stream: bool) {
    if log {
        store_map::<M>(dx, y, dy, stream, |y, g| log_softmax_grad::<M>(y, g, r));
    } else {
        store_map::<M>(dx, y, dy, stream, |y, g| softmax_grad(y, g, r));
    }
    store_fence(stream);
}

multiversion!(exp_part_on => exp_part(x: &[f32], e: &mut [f32], part: &mut Part));
multiversion!(softmax_out_on => softmax_out(
    x: &[f32], y: &mut [f32], stored: bool, max: f32, k: f32, stream: bool
));
multiversion!(log_softmax_out_on => log_softmax_out(
    x: &[f32], y: &mut [f32], max: f32, log_sum: f32, stream: bool
));
multiversion!(backward_part_on => backward_part(y: &[f32], dy: &[f32], log: bool, part: &mut Part));
multiversion!(backward_out_on => backward_out(
    y: &[f32], dy: &[f32], dx: &mut [f32], log: bool, r: f32, stream: bool
));

// ---------------------------------------------------------------------------------------------
// Operations.

/// Softmax and log-softmax of `x` (rows of `cols` columns) into `y`, cut by `split`, built for
/// `isa`: phase 1 by [`exp_part`], storing the exponentials in `y` with `store`; then
/// `out(x chunk, y chunk, its part, its row)` for each chunk of a row that is not degenerate.
fn exp_rows(
    x: &[f32],
    y: &mut [f32],
    cols: usize,
    split: Split,
    store: bool,
    isa: Isa,
    out: impl Fn(&[f32], &mut [f32], Part, Row) + Sync,
) {
    let chunk = |r: usize, c: usize, len: usize| &x[r * cols + c..][..len];
    let _ = run(
        split,
        y,
        cols,
        |r, c, y| {
            let mut part = Part::default();
            exp_part_on(
                isa,
                chunk(r, c, y.len()),
                if store { y } else { &mut [] },
                &mut part,
            );
            part
        },
        |_, parts| Row::combine(parts),
        |r, c, y, part, row| {
            if row.max.is_nan() {
                y.fill(f32::NAN);
            } else {
                out(chunk(r, c, y.len()), y, part, row);
            }
        },
    );
}

/// Softmax of `x` (rows of `cols` columns) into `y`, cut by `split`, built for `isa`.
pub(super) fn softmax(x: &[f32], y: &mut [f32], cols: usize, split: Split, stream: bool, isa: Isa) {
    // Without streaming the exponentials wait in `y` for their factor; streamed output is
    // written once, from exponentials evaluated again.
    let stored = !stream;
    exp_rows(x, y, cols, split, stored, isa, |x, y, part, row| {
        if stored {
            let k = (rescale(part.max, row.max) / row.sum) as f32;
            softmax_out_on(isa, x, y, true, row.max, k, false);
        } else {
            let k = (1.0 / row.sum) as f32;
            softmax_out_on(isa, x, y, false, row.max, k, stream);
        }
    });
}

/// Log-softmax of `x` into `y`, cut by `split`, built for `isa`.
pub(super) fn log_softmax(
    x: &[f32],
    y: &mut [f32],
    cols: usize,
    split: Split,
    stream: bool,
    isa: Isa,
) {
    exp_rows(x, y, cols, split, false, isa, |x, y, _, row| {
        log_softmax_out_on(isa, x, y, row.max, row.sum.ln() as f32, stream);
    });
}

/// Softmax backward (or log-softmax backward with `log`) into `dx`, cut by `split`, built for
/// `isa`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    cols: usize,
    log: bool,
    split: Split,
    stream: bool,
    isa: Isa,
) {
    let at = |r: usize, c: usize, len: usize| r * cols + c..r * cols + c + len;
    let _ = run(
        split,
        dx,
        cols,
        |r, c, dx| {
            let range = at(r, c, dx.len());
            let mut part = Part::default();
            backward_part_on(isa, &y[range.clone()], &dy[range], log, &mut part);
            part
        },
        |_, parts| parts.iter().map(|p| p.sum).sum::<f64>(),
        |r, c, dx, _, total| {
            let range = at(r, c, dx.len());
            backward_out_on(
                isa,
                &y[range.clone()],
                &dy[range],
                dx,
                log,
                total as f32,
                stream,
            );
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// What the cross-entropy kernels read of a chunk beside its logits and gradient.
struct CeChunk<'a> {
    /// The chunk's class weights; empty without weights, smoothing or probability targets.
    w: &'a [f32],
    /// The chunk's probability targets; empty for index targets.
    p: &'a [f32],
    /// `1 - e` and `e / C` of label smoothing `e`.
    keep: f32,
    smooth: f32,
}

/// Phase 1 of cross-entropy: [`exp_part`] into `g`, and with `terms` the chunk's
/// [`Part::terms`].
#[inline(always)]
fn ce_part<M: MulAdd>(x: &[f32], g: &mut [f32], terms: bool, chunk: &CeChunk<'_>, part: &mut Part) {
    exp_part::<M>(x, g, part);
    if !terms {
        return;
    }
    let shift = part.shift();
    let CeChunk { w, p, keep, smooth } = *chunk;
    part.terms = if p.is_empty() {
        [weighted_lsm_sum(x, w, shift, 0.0), sum(w)]
    } else {
        let (q, qx) = prob_target_sums(x, p, w, keep, smooth, shift, 0.0);
        [qx, q]
    };
}

/// Phase 3 of cross-entropy: the gradient from the exponentials in `g`, by
/// [`index_row_grad`] (index targets) or [`prob_target_grad`].
#[inline(always)]
fn ce_out<M: MulAdd>(g: &mut [f32], chunk: &CeChunk<'_>, a: f32, b: f32) {
    let CeChunk { w, p, keep, smooth } = *chunk;
    if p.is_empty() {
        index_row_grad::<M>(g, w, a, b);
    } else {
        prob_target_grad::<M>(g, p, w, keep, smooth, a, b);
    }
}

multiversion!(ce_part_on => ce_part(
    x: &[f32], g: &mut [f32], terms: bool, chunk: &CeChunk<'_>, part: &mut Part
));
multiversion!(ce_out_on => ce_out(g: &mut [f32], chunk: &CeChunk<'_>, a: f32, b: f32));

/// A cross-entropy row's loss and the scalars of its gradient `a' e_j - b v_j` (see
/// [`ce_out`]), where `a'` is `a` times the chunk's rescaling factor.
#[derive(Clone, Copy)]
enum CeRow {
    /// An ignored row: loss 0 and a zero gradient.
    Ignored,
    /// A degenerate row: NaN throughout.
    Degenerate,
    Live {
        loss: f64,
        max: f32,
        a: f64,
        b: f32,
        /// The target class and its gradient entry (index targets).
        target: Option<(usize, f32)>,
    },
}

/// Row `r`'s [`CeRow`] from its chunks' parts.
fn ce_row(ctx: &CeContext<'_>, r: usize, parts: &[Part]) -> CeRow {
    if ctx.plan.is_ignored(r) {
        return CeRow::Ignored;
    }
    let row = Row::combine(parts);
    if row.max.is_nan() {
        return CeRow::Degenerate;
    }
    let (max, log_sum) = (row.max, row.sum.ln() as f32);
    let inv = 1.0 / row.sum;
    let scale = ctx.plan.grad_scale(r);
    let terms = || -> f64 { parts.iter().map(|p| p.term_share(max, log_sum)).sum() };
    match ctx.plan.target(r) {
        Some(t) => {
            let cols = ctx.plan.cols;
            let x_t = ctx.logits[r * cols + t];
            let w_t = ctx.weight.get(t).copied().unwrap_or(1.0);
            let e_t = (f64::from(x_t) - f64::from(max)).exp() as f32;
            let s = index_scalars(ctx, w_t, x_t, e_t, max, inv as f32, log_sum, scale);
            let mut loss = s.loss;
            if ctx.smooth != 0.0 {
                // The other classes' terms: all of them but the target's, which `s.loss`
                // holds. Where the target's is infinite, so is the loss, whatever the others.
                let own = if w_t != 0.0 {
                    f64::from(w_t) * f64::from((x_t - max) - log_sum)
                } else {
                    0.0
                };
                let all = terms();
                let others = if own.is_finite() { all - own } else { all };
                loss -= f64::from(ctx.smooth) * others;
            }
            CeRow::Live {
                loss,
                max,
                a: f64::from(s.a),
                b: s.b,
                target: Some((t, s.g_t)),
            }
        }
        None => {
            // Probability targets: `terms` has `sum q` in its second entry.
            let sum_q: f64 = parts.iter().map(|p| p.terms[1]).sum();
            CeRow::Live {
                loss: -terms(),
                max,
                a: scale * sum_q * inv,
                b: scale as f32,
                target: None,
            }
        }
    }
}

/// Cross-entropy of the logits in `ctx` cut by `split`, each row's gradient written to `grad`;
/// returns each row's loss. The exponentials wait in `grad` for their factor (no streaming).
pub(super) fn cross_entropy(
    ctx: &CeContext<'_>,
    grad: &mut [f32],
    split: Split,
    isa: Isa,
) -> Vec<f64> {
    let cols = ctx.plan.cols;
    let probs = match &ctx.plan.targets {
        CrossEntropyTargets::Probabilities(p) => Some(*p),
        CrossEntropyTargets::Indices(_) => None,
    };
    let terms = ctx.smooth != 0.0 || probs.is_some();
    let range = |r: usize, c: usize, len: usize| r * cols + c..r * cols + c + len;
    let chunk = |r: usize, c: usize, len: usize| CeChunk {
        w: ctx.weight.get(c..c + len).unwrap_or(&[]),
        p: probs.map_or(&[][..], |p| &p[range(r, c, len)]),
        keep: ctx.keep,
        smooth: ctx.smooth,
    };
    let rows = run(
        split,
        grad,
        cols,
        |r, c, g| {
            let mut part = Part::default();
            if ctx.plan.is_ignored(r) {
                return part;
            }
            let (x, chunk) = (&ctx.logits[range(r, c, g.len())], chunk(r, c, g.len()));
            ce_part_on(isa, x, g, terms, &chunk, &mut part);
            part
        },
        |r, parts| ce_row(ctx, r, parts),
        |r, c, g, part, row| match row {
            CeRow::Ignored => g.fill(0.0),
            CeRow::Degenerate => g.fill(f32::NAN),
            CeRow::Live {
                max, a, b, target, ..
            } => {
                let a = (a * rescale(part.max, max)) as f32;
                ce_out_on(isa, g, &chunk(r, c, g.len()), a, b);
                if let Some((t, g_t)) = target {
                    if let Some(g) = t.checked_sub(c).and_then(|i| g.get_mut(i)) {
                        *g = g_t;
                    }
                }
            }
        },
    );
    rows.iter()
        .map(|row| match *row {
            CeRow::Ignored => 0.0,
            CeRow::Degenerate => f64::NAN,
            CeRow::Live { loss, .. } => loss,
        })
        .collect()
}
