// Cross-entropy loss and its fused gradient with respect to the logits (common.wgsl is
// prepended), with PyTorch's F.cross_entropy semantics.
//
// Per row with logits x, target distribution q (see target_mass), M = max x, S = sum exp(x - M):
//   A = sum_c q_c (x_c - M),  B = sum_c q_c
//   loss_row = B ln S - A                               (= -sum_c q_c log_softmax(x)_c)
//   grad_c   = scale_row * (exp(x_c - M) / S * B - q_c)  (= d loss_row / d x_c, scaled)
// Each logit is read once when the row fits in registers (ITEMS > 0), and twice when it is
// streamed: each lane keeps a running (m, S, A, B), rescaled when a block raises its maximum
// (`lane_stats`), and the lanes' are combined by the online-normalizer rule; a split row keeps
// (m_i, s_i, a_i, b_i) per chunk and combines them by the same rule. Without DENSE mass only S
// is accumulated per element (A and B follow from the target class).
//
// Rows: an index target equal to ignore_index gives loss 0 and a zero gradient row; an index
// outside [0, C) gives NaN for its row; a row holding NaN or +inf, or only -inf, gives NaN.
//
// Passes: the batch passes with DIVISOR (mean only, unless the host knows the divisor:
// DIVISOR_GIVEN) write the sum of target weights over rows not ignored to stats[0]; a row kernel
// writes loss_rows and the gradient; the batch passes without DIVISOR write the reduced loss to
// the caller's loss buffer (LOSS_OUT) or to stats[1].

@group(0) @binding(1) var<storage, read> logits: array<f32>;
// Class indices (i32 bit patterns, one per row) or probabilities (f32 bits, cols per row).
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read> grad_output: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss_rows: array<f32>;
// With IN_PLACE the logits are read from here too, and overwritten by the gradient.
@group(0) @binding(6) var<storage, read_write> grad: array<f32>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;
@group(0) @binding(8) var<storage, read_write> partials: array<vec4<f32>>;
// Logits and gradient seen as vec4, used only by the *4 and *_unaligned4 entry points (see "vec4
// forms"). Targets and weights stay scalar: an index target is one word per row, a class-weight
// binding may be a one-word stand-in, and probability targets need not share the logits' place
// within a vec4.
@group(0) @binding(1) var<storage, read> logits4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> grad4: array<vec4<f32>>;

override PROBS: bool = false;       // probability targets instead of class indices
override WEIGHTED: bool = false;    // per-class weights in `weight`
override REDUCTION: u32 = 1u;       // 0 none, 1 mean, 2 sum
override GRAD: bool = true;         // write the gradient (false: the loss alone)
override IN_PLACE: bool = false;    // logits live in `grad`
override GRAD_PER_ROW: bool = false; // grad_output holds the multiplier (one per row for None)
// Whether classes other than the target can have mass (probability targets, label smoothing).
// Without (index targets, no smoothing), B is w_t and A is w_t (x_t - M), taken from the target
// logit once per row: the per-element work is that of softmax.
override DENSE: bool = true;

// The divisor of the mean came from the host, in p.extra (f32 bits), and no divisor pass
// ran: rows not ignored, or the weighted sum, found when the targets were uploaded.
override DIVISOR_GIVEN: bool = false;

// Rows are lines along an axis that is not the last (the scalar `rows` entry, or the split pair,
// one invocation per line or per chunk of one): logits [outer, C, inner] with p.spin = inner
// (no line's pass waits on another), row r the line (r / inner, r % inner), whose class c lies
// at (r / inner) C inner + c inner + r % inner, as in probability targets and the gradient;
// index targets, row losses and per-row upstream gradients stay one per row, in the lines'
// order. Neighbouring invocations take neighbouring lines (of the same chunk, where lines are
// split), so that each load of a workgroup reads one contiguous run.
override LINES: bool = false;

// The most logits `rows` holds per invocation: MAX_ITEMS, and for lines (one invocation each)
// twice as many, so that the 19 or 21 classes of a segmentation map are read once.
const ROW_ITEMS: u32 = 2u * MAX_ITEMS;

// Where class 0 of row `row` lies in a logits-shaped operand, from the operand's base.
fn row_start(row: u32) -> u32 {
    if (LINES) {
        let inner = p.spin;
        return (row / inner) * p.cols * inner + row % inner;
    }
    return row * p.cols;
}

// The distance between neighbouring classes of a row in a logits-shaped operand.
fn class_step() -> u32 {
    return select(1u, p.spin, LINES);
}

fn mean_divisor() -> f32 {
    if (DIVISOR_GIVEN) {
        return bitcast<f32>(p.extra);
    }
    return stats[base(6u)];
}

// words: x = ignore_index (i32 bits), y = label smoothing (f32 bits), z = scalar grad_output,
// w = the sum of the class weights (C when unweighted).
fn ignore_index() -> i32 {
    return bitcast<i32>(p.words.x);
}

fn smoothing() -> f32 {
    return bitcast<f32>(p.words.y);
}

fn logit(i: u32) -> f32 {
    if (IN_PLACE) {
        return grad[i];
    }
    return logits[i];
}

fn class_weight(c: u32) -> f32 {
    if (WEIGHTED) {
        return weight[base(2u) + c];
    }
    return 1.0;
}

// What a row's index target says: 0 a valid class, 1 ignored, 2 out of range.
struct RowTarget {
    index: u32,
    kind: u32,
}

fn row_target(row: u32) -> RowTarget {
    if (PROBS) {
        return RowTarget(0u, 0u);
    }
    let t = bitcast<i32>(targets[base(1u) + row]);
    if (t == ignore_index()) {
        return RowTarget(0u, 1u);
    }
    if (t < 0 || u32(t) >= p.cols) {
        return RowTarget(0u, 2u);
    }
    return RowTarget(u32(t), 0u);
}

// q_c: the target mass of class c in row `row`, label smoothing and class weights applied.
fn target_mass(row: u32, c: u32, t: RowTarget) -> f32 {
    if (!DENSE) {
        return select(0.0, class_weight(t.index), c == t.index);
    }
    let e = smoothing();
    let uniform = e / f32(p.cols);
    if (PROBS) {
        let prob = bitcast<f32>(targets[base(1u) + row_start(row) + c * class_step()]);
        return class_weight(c) * ((1.0 - e) * prob + uniform);
    }
    var q = uniform * class_weight(c);
    if (c == t.index) {
        q += (1.0 - e) * class_weight(c);
    }
    return q;
}

// q_c (x_c - m) with a zero-mass term contributing exactly 0, whatever x_c is.
fn mass_term(q: f32, x: f32, m: f32) -> f32 {
    return select(q * (x - m), 0.0, q == 0.0);
}

// One class's (exp term, mass term, mass, _) to be summed over the row, from its logit x and
// e = exp_shifted(x, m); only the exp term without DENSE mass.
fn terms(e: f32, x: f32, q: f32, m: f32) -> vec4<f32> {
    if (!DENSE) {
        return vec4<f32>(e, 0.0, 0.0, 0.0);
    }
    return vec4<f32>(e, mass_term(q, x, m), q, 0.0);
}

// Row statistics acc = (S, A, B, _) completed without DENSE mass, where A was not accumulated:
// A = w_t (x_t - m) from the target logit x_t (exactly 0 when w_t = 0; -inf for x_t = -inf).
// Rows without a valid target have no loss terms to complete.
fn complete_stats(acc: vec4<f32>, m: f32, x_t: f32, t: RowTarget) -> vec4<f32> {
    if (DENSE || t.kind != 0u) {
        return acc;
    }
    return vec4<f32>(acc.x, mass_term(class_weight(t.index), x_t, m), acc.z, acc.w);
}

// Whether a chunk of columns [bounds.x, bounds.y) holds the target whose terms `target_partial`
// adds (index targets without DENSE mass).
fn holds_target(t: RowTarget, bounds: vec2<u32>) -> bool {
    return !DENSE && t.kind == 0u && t.index >= bounds.x && t.index < bounds.y;
}

// A chunk's partial (s, a, b, _) with the target's terms, relative to the chunk's max m:
// a = w_t (x_t - m) and b = w_t, so that combining chunks gives A = w_t (x_t - M). A chunk of
// -inf only still carries them (a = -inf where w_t > 0).
fn target_partial(acc: vec4<f32>, m: f32, x_t: f32, t: RowTarget) -> vec4<f32> {
    let w = class_weight(t.index);
    let a = select(select(0.0, neg_inf(), w != 0.0), mass_term(w, x_t, m), is_finite(m));
    return vec4<f32>(acc.x, a, w, acc.w);
}

// The target class's logit in a row whose logits start at x0 (meaningless when DENSE or for a
// row without a valid target, whose index is 0: still a logit of the row).
fn target_logit(x0: u32, t: RowTarget) -> f32 {
    return logit(x0 + t.index * class_step());
}

// The gradient multiplier of a row: grad_output, divided by the weight total for the mean.
fn row_scale(row: u32) -> f32 {
    var g = bitcast<f32>(p.words.z);
    if (GRAD_PER_ROW) {
        // A reduced loss has one upstream gradient, whatever the row.
        g = grad_output[base(3u) + select(row, 0u, REDUCTION != 0u)];
    }
    if (REDUCTION == 1u) {
        g = g / mean_divisor();
    }
    return g;
}

// B = sum_c q_c. For index targets it is known in closed form, (1 - e) w_t + e/C sum_c w_c,
// which is exact where an f32 sum of C small terms would not be; probabilities need the sum.
fn mass_total(accumulated: f32, t: RowTarget) -> f32 {
    if (PROBS) {
        return accumulated;
    }
    let e = smoothing();
    return (1.0 - e) * class_weight(t.index) + e / f32(p.cols) * bitcast<f32>(p.words.w);
}

// Row results from the row's statistics: stats4 = (S, A, B, _), max m.
fn row_loss(m: f32, stats4: vec4<f32>, t: RowTarget) -> f32 {
    if (t.kind == 1u) {
        return 0.0;
    }
    if (t.kind == 2u || !is_finite(m)) {
        return quiet_nan();
    }
    return mass_total(stats4.z, t) * log(stats4.x) - stats4.y;
}

// A row's gradient, worked out once per row: grad_c = scale (e_c k - q_c) with e_c =
// exp_shifted(x_c, m) and k = B / S where `plain`; otherwise every class gets `fill`, 0 for an
// ignored row and NaN for a row without a valid target or with a maximum that is not finite.
struct GradRow {
    k: f32,
    scale: f32,
    plain: bool,
    fill: f32,
}

fn grad_row(row: u32, m: f32, stats4: vec4<f32>, t: RowTarget) -> GradRow {
    let plain = t.kind == 0u && is_finite(m);
    let fill = select(quiet_nan(), 0.0, t.kind == 1u);
    return GradRow(mass_total(stats4.z, t) / stats4.x, row_scale(row), plain, fill);
}

fn grad_value(e: f32, q: f32, g: GradRow) -> f32 {
    return select(g.fill, g.scale * (e * g.k - q), g.plain);
}

// Whether the row kernels add up the reduced loss themselves (`Tuning::loss_tally`), through the
// tally (`tally_rows`), instead of storing each row's loss in loss_rows for a batch sum; the
// total goes to loss_rows[0], bound to the caller's loss buffer. Only for calls of one block of
// rows, none of them split.
override ROW_TALLY: bool = false;

// A row's loss, as its team's first lane has it: stored in loss_rows, or (ROW_TALLY) returned
// for the tally, 0 in every other lane.
fn keep_loss(team: Team, row: u32, loss: f32) -> f32 {
    if (team.lane != 0u) {
        return 0.0;
    }
    if (ROW_TALLY) {
        return loss;
    }
    loss_rows[base(4u) + row] = loss;
    return 0.0;
}

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let loss = row_pass(wid, lid);
    if (ROW_TALLY) {
        tally_rows(wid, lid, loss);
    }
}

// `rows` but for the tally: writes the gradient and returns what `keep_loss` does.
fn row_pass(wid: vec3<u32>, lid: u32) -> f32 {
    let team = team_of(wid, lid);
    // A whole team leaves together, so its reductions stay uniform.
    if (team.row >= p.rows) {
        return 0.0;
    }
    let row = team.row;
    let x0 = select(base(0u), base(5u), IN_PLACE) + row_start(row);
    let t = row_target(row);
    // Read before the team's first reduction: in place, another member may store the target
    // class's gradient over it once the reductions are done.
    let x_t = target_logit(x0, t);
    var xs: array<f32, ROW_ITEMS>;
    var m = neg_inf();
    var acc = vec4<f32>(0.0);
    if (ITEMS > 0u) {
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            var x = neg_inf();
            if (c < p.cols) {
                x = logit(x0 + c * class_step());
            }
            xs[k] = x;
            m = max(m, max_key(x));
        }
        m = team_max(m, lid);
        if (is_finite(m)) {
            for (var k = 0u; k < ITEMS; k++) {
                let c = team.lane + k * team.size;
                if (c < p.cols) {
                    let e = exp_shifted(xs[k], m);
                    acc += terms(e, xs[k], target_mass(row, c, t), m);
                    // The exponential replaces the logit: the gradient needs only it.
                    xs[k] = e;
                }
            }
        }
        acc = team_sum4(acc, lid);
    } else {
        // A streamed row is read twice: its statistics in one pass, then its gradient.
        let st = team_stats(lane_stats(row, x0, 0u, p.cols, team.lane, team.size, t), lid);
        m = st.m;
        acc = st.acc;
    }
    acc = complete_stats(acc, m, x_t, t);
    let loss = keep_loss(team, row, row_loss(m, acc, t));
    if (GRAD) {
        let g = grad_row(row, m, acc, t);
        let g0 = base(5u) + row_start(row);
        if (ITEMS > 0u) {
            for (var k = 0u; k < ITEMS; k++) {
                let c = team.lane + k * team.size;
                if (c < p.cols) {
                    grad[g0 + c * class_step()] = grad_value(xs[k], target_mass(row, c, t), g);
                }
            }
        } else {
            for (var c = team.lane; c < p.cols; c += team.size) {
                let e = exp_shifted(logit(x0 + c * class_step()), m);
                grad[g0 + c * class_step()] = grad_value(e, target_mass(row, c, t), g);
            }
        }
    }
    return loss;
}

// A row's statistics: max m and acc = (S, A, B, _).
struct RowStats {
    m: f32,
    acc: vec4<f32>,
}

// What a chunk's partial (m_i, s_i, a_i, b_i) adds to its row's (S, A, B, _) for the row's max m:
// S = sum_i s_i exp(m_i - M), A = sum_i a_i + (m_i - M) b_i (a chunk without mass adds nothing
// to A), B = sum_i b_i.
fn combined_partial(part: vec4<f32>, m: f32) -> vec4<f32> {
    let shift = select((part.x - m) * part.w, 0.0, part.w == 0.0);
    return vec4<f32>(part.y * rescale(part.x, m), part.z + shift, part.w, 0.0);
}

// A lane's statistics (m, S, A, B) over the classes start + lane, start + lane + size, ... below
// stop of the row whose class 0 is at x0, from one read of the logits, as `lane_stats4` reads
// vec4s: blocks of SUM_BLOCK classes are loaded, and S and A, relative to the lane's running
// maximum m, are rescaled (S by exp(m_old - m_new)) or shifted (A by (m_old - m_new) B) when a
// block raises it. A -inf logit with target mass gives A = -inf exactly.
fn lane_stats(row: u32, x0: u32, start: u32, stop: u32, lane: u32, size: u32, t: RowTarget) -> vec4<f32> {
    var st = vec4<f32>(neg_inf(), 0.0, 0.0, 0.0);
    for (var c0 = start + lane; c0 < stop; c0 += size * SUM_BLOCK) {
        var block: array<f32, SUM_BLOCK>;
        var bm = neg_inf();
        for (var k = 0u; k < SUM_BLOCK; k++) {
            let c = c0 + k * size;
            var x = neg_inf();
            if (c < stop) {
                x = logit(x0 + c * class_step());
            }
            block[k] = x;
            bm = max(bm, max_key(x));
        }
        let m = max(st.x, bm);
        let shift = select((st.x - m) * st.w, 0.0, st.w == 0.0 || st.x == m);
        st = vec4<f32>(m, st.y * rescale(st.x, m), st.z + shift, st.w);
        var part = vec3<f32>(0.0);
        for (var k = 0u; k < SUM_BLOCK; k++) {
            let c = c0 + k * size;
            if (c < stop) {
                let x = block[k];
                part.x += exp_shifted(x, m);
                if (DENSE) {
                    let q = target_mass(row, c, t);
                    let mass = select(q * (x - m), neg_inf(), is_neg_inf(x));
                    part.y += select(mass, 0.0, q == 0.0);
                    part.z += q;
                }
            }
        }
        st += vec4<f32>(0.0, part);
    }
    return st;
}

// A split row's statistics combined over the team from its chunks' partials (m_i, s_i, a_i, b_i);
// the team of the row's first chunk also writes the row's loss. Without DENSE mass, the chunk
// holding the target gave its (a_i, b_i) (`target_partial`): the finishing pass cannot read the
// target logit itself, which another chunk's team may already have overwritten in place.
fn split_row_stats(ch: Chunk, t: RowTarget, lid: u32) -> RowStats {
    var m = neg_inf();
    for (var i = ch.team.lane; i < p.chunks; i += ch.team.size) {
        m = max(m, partials[partial_slot(ch.row, i)].x);
    }
    m = team_max(m, lid);
    var acc = vec4<f32>(0.0);
    if (is_finite(m)) {
        let step = ch.team.size;
        for (var g = ch.team.lane; g < p.chunks; g += SUM_BLOCK * step) {
            var block = vec4<f32>(0.0);
            for (var i = g; i < min(p.chunks, g + SUM_BLOCK * step); i += step) {
                block += combined_partial(partials[partial_slot(ch.row, i)], m);
            }
            acc += block;
        }
    }
    acc = team_sum4(acc, lid);
    if (ch.within == 0u && ch.team.lane == 0u) {
        loss_rows[base(4u) + ch.row] = row_loss(m, acc, t);
    }
    return RowStats(m, acc);
}

// Where chunk i of row `row` keeps its partial: a row's chunks side by side, or for lines a
// chunk's lines side by side (as `split_chunk` orders them).
fn partial_slot(row: u32, i: u32) -> u32 {
    if (LINES) {
        return i * p.rows + row;
    }
    return row * p.chunks + i;
}

// The chunk a team takes (`chunk_of`); for lines, neighbouring invocations take the same chunk
// of neighbouring lines, its partial at `partial_slot`.
fn split_chunk(wid: vec3<u32>, lid: u32) -> Chunk {
    var ch = chunk_of(wid, lid);
    if (LINES) {
        ch.row = ch.index % p.rows;
        ch.within = ch.index / p.rows;
    }
    return ch;
}

@compute @workgroup_size(WG)
fn split_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = split_chunk(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let bounds = chunk_bounds(ch.within);
    let x0 = select(base(0u), base(5u), IN_PLACE) + row_start(ch.row);
    let t = row_target(ch.row);
    // One read of the chunk; an all -inf chunk still carries its target mass (and -inf mass
    // terms).
    let lane = ch.team.lane;
    let st = team_stats(lane_stats(ch.row, x0, bounds.x, bounds.y, lane, ch.team.size, t), lid);
    let m = st.m;
    var acc = st.acc;
    if (holds_target(t, bounds)) {
        acc = target_partial(acc, m, target_logit(x0, t), t);
    }
    if (ch.team.lane == 0u) {
        partials[ch.index] = vec4<f32>(m, acc.x, acc.y, acc.z);
    }
}

@compute @workgroup_size(WG)
fn split_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = split_chunk(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let t = row_target(ch.row);
    let x0 = select(base(0u), base(5u), IN_PLACE) + row_start(ch.row);
    let st = split_row_stats(ch, t, lid);
    let m = st.m;
    let acc = st.acc;
    if (GRAD) {
        let g = grad_row(ch.row, m, acc, t);
        let bounds = chunk_bounds(ch.within);
        let g0 = base(5u) + row_start(ch.row);
        for (var c = bounds.x + ch.team.lane; c < bounds.y; c += ch.team.size) {
            let e = exp_shifted(logit(x0 + c * class_step()), m);
            grad[g0 + c * class_step()] = grad_value(e, target_mass(ch.row, c, t), g);
        }
    }
}

// ---- vec4 forms ----
//
// Rows of a multiple of 4 columns at multiples of 16 bytes are read and written four classes at
// a time (*4). So are rows that are not a multiple of 4 columns (in registers, streamed or
// split) where the logits and gradient start at the same place within a vec4 (*_unaligned4,
// softmax.wgsl's rows_unaligned4 has the scheme): a row (a chunk) is then the vec4s that hold any
// of its classes, the others' logits masked to -inf and their mass to 0, and the first and last
// vec4's gradient written class by class. Class weights and probability targets are read as
// scalars at each class.

fn logit4(i: u32) -> vec4<f32> {
    if (IN_PLACE) {
        return grad4[i];
    }
    return logits4[i];
}

// Where class 0 of row `row` lies in the logits' view (in place, the gradient's).
fn logits_start(row: u32) -> u32 {
    return select(base(0u), base(5u), IN_PLACE) + row * p.cols;
}

// target_logit for a row whose class 0 is element x0 of the logits' view.
fn target_logit4(x0: u32, t: RowTarget) -> f32 {
    let i = x0 + t.index;
    return logit4(i / 4u)[i % 4u];
}

// q for the four classes c of `row`.
fn target_mass_of4(row: u32, c: vec4<u32>, t: RowTarget) -> vec4<f32> {
    let hit = c == vec4<u32>(t.index);
    if (!DENSE) {
        return select(vec4<f32>(0.0), vec4<f32>(class_weight(t.index)), hit);
    }
    let e = smoothing();
    let uniform = e / f32(p.cols);
    let w = vec4<f32>(class_weight(c.x), class_weight(c.y), class_weight(c.z), class_weight(c.w));
    if (PROBS) {
        let t0 = base(1u) + row * p.cols;
        let prob = bitcast<vec4<f32>>(
            vec4<u32>(targets[t0 + c.x], targets[t0 + c.y], targets[t0 + c.z], targets[t0 + c.w])
        );
        return w * ((1.0 - e) * prob + uniform);
    }
    return uniform * w + select(vec4<f32>(0.0), (1.0 - e) * w, hit);
}

// (exp terms, mass terms, masses) of four classes, each summed, as in `rows`; e =
// exp_shifted4(x, m).
fn terms4(e: vec4<f32>, x: vec4<f32>, q: vec4<f32>, m: f32) -> vec4<f32> {
    if (!DENSE) {
        return vec4<f32>(sum_of(e), 0.0, 0.0, 0.0);
    }
    let mass = select(q * (x - m), vec4<f32>(0.0), q == vec4<f32>(0.0));
    return vec4<f32>(sum_of(e), sum_of(mass), sum_of(q), 0.0);
}

// The gradients of four classes, as grad_value.
fn grad_value4(e: vec4<f32>, q: vec4<f32>, g: GradRow) -> vec4<f32> {
    return select(vec4<f32>(g.fill), g.scale * (e * g.k - q), g.plain);
}

// A streamed run of a row's classes, classes.x .. classes.y, as the loops over vec4s see it:
// loop index i in start .. stop is the logits' vec4 x0 + i and the gradient's g0 + i, and holds
// the classes 4 i - lead .. 4 i - lead + 3 (u32 arithmetic wraps: an element before the row
// has a class past its end). Where `masked` (the unaligned entry points; a constant at each
// use, folded once the calls are inlined), the vec4s also hold classes outside the run, which
// do not count: their logits read as -inf, their mass as 0, and their gradient is not written.
struct Run4 {
    x0: u32,
    g0: u32,
    lead: u32,
    start: u32,
    stop: u32,
    classes: vec2<u32>,
    masked: bool,
}

// The run of classes b.x .. b.y of a row whose class 0 is element x of the logits' view and
// element g of the gradient's, at the same place within a vec4.
fn run_of(x: u32, g: u32, b: vec2<u32>, masked: bool) -> Run4 {
    let lead = x % 4u;
    return Run4(x / 4u, g / 4u, lead, (lead + b.x) / 4u, (lead + b.y + 3u) / 4u, b, masked);
}

// Which of vec4 i's classes belong to the run.
fn run_inside(run: Run4, i: u32) -> vec4<bool> {
    return in_span4(i, run.lead + run.classes.x, run.lead + run.classes.y);
}

fn run_logits(run: Run4, i: u32) -> vec4<f32> {
    let x = logit4(run.x0 + i);
    if (run.masked) {
        return select(vec4<f32>(neg_inf()), x, run_inside(run, i));
    }
    return x;
}

fn run_mass(row: u32, run: Run4, i: u32, t: RowTarget) -> vec4<f32> {
    let c = vec4<u32>(4u * i - run.lead) + vec4<u32>(0u, 1u, 2u, 3u);
    if (run.masked) {
        // Classes outside read class 0's weight and target, in bounds, and count as 0.
        let inside = run_inside(run, i);
        return select(vec4<f32>(0.0), target_mass_of4(row, select(vec4<u32>(0u), c, inside), t), inside);
    }
    return target_mass_of4(row, c, t);
}

// A lane's statistics (m, S, A, B) over the run's vec4s start + lane, start + lane + size, ...,
// from one read of the logits: S and A are relative to the lane's running maximum m, and are
// rescaled (S by exp(m_old - m_new)) or shifted (A by (m_old - m_new) B) when a block of BLOCK4
// vec4s raises it. A -inf logit with target mass gives A = -inf exactly, as in the row kernels,
// whether or not a finite maximum has been seen yet.
fn lane_stats4(row: u32, run: Run4, lane: u32, size: u32, t: RowTarget) -> vec4<f32> {
    var st = vec4<f32>(neg_inf(), 0.0, 0.0, 0.0);
    for (var c0 = run.start + lane; c0 < run.stop; c0 += size * BLOCK4) {
        var block: array<vec4<f32>, BLOCK4>;
        var bm = vec4<f32>(neg_inf());
        for (var k = 0u; k < BLOCK4; k++) {
            let c = c0 + k * size;
            var x = vec4<f32>(neg_inf());
            if (c < run.stop) {
                x = run_logits(run, c);
            }
            block[k] = x;
            bm = max(bm, max_key4(x));
        }
        let m = max(st.x, max_of(bm));
        let shift = select((st.x - m) * st.w, 0.0, st.w == 0.0 || st.x == m);
        st = vec4<f32>(m, st.y * rescale(st.x, m), st.z + shift, st.w);
        // Per-component sums over the block; one horizontal sum each at its end.
        var s4 = vec4<f32>(0.0);
        var a4 = vec4<f32>(0.0);
        var b4 = vec4<f32>(0.0);
        for (var k = 0u; k < BLOCK4; k++) {
            let c = c0 + k * size;
            if (c < run.stop) {
                let x = block[k];
                s4 += exp_shifted4(x, m);
                if (DENSE) {
                    let q = run_mass(row, run, c, t);
                    let mass = select(q * (x - m), vec4<f32>(neg_inf()), is_neg_inf4(x));
                    a4 += select(mass, vec4<f32>(0.0), q == vec4<f32>(0.0));
                    b4 += q;
                }
            }
        }
        st += vec4<f32>(0.0, sum_of(s4), sum_of(a4), sum_of(b4));
    }
    return st;
}

// Writes the gradient of the run's classes, read a second time, given the row's max m.
fn store_run4(row: u32, run: Run4, lane: u32, size: u32, t: RowTarget, m: f32, g: GradRow) {
    for (var i = run.start + lane; i < run.stop; i += size) {
        let v = grad_value4(exp_shifted4(run_logits(run, i), m), run_mass(row, run, i, t), g);
        store_run_grad4(run, i, v);
    }
}

// Stores the gradient v of the run's vec4 i: where the run is masked, only the components of its
// classes (a binding is seen either as f32 or as vec4 by one entry point, never both).
fn store_run_grad4(run: Run4, i: u32, v: vec4<f32>) {
    let d = run.g0 + i;
    let inside = run_inside(run, i);
    if (!run.masked || all(inside)) {
        grad4[d] = v;
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (inside[j]) {
                grad4[d][j] = v[j];
            }
        }
    }
}

// Combines the lanes' (m_i, S_i, A_i, B_i) over the team: M = max m_i, S = sum S_i exp(m_i - M),
// A = sum A_i + (m_i - M) B_i, B = sum B_i. Returns M and (S, A, B, _).
fn team_stats(st: vec4<f32>, lid: u32) -> RowStats {
    let m = team_max(st.x, lid);
    let shift = select((st.x - m) * st.w, 0.0, st.w == 0.0 || st.x == m);
    let mine = vec4<f32>(st.y * rescale(st.x, m), st.z + shift, st.w, 0.0);
    return RowStats(m, team_sum4(mine, lid));
}

// A row held in registers by rows4, as in softmax.wgsl: up to 2 * MAX_ITEMS vec4s per invocation
// in two arrays indexed only by loop counters with constant bounds, so that compilers keep them
// in registers.
alias Items4 = array<vec4<f32>, MAX_ITEMS>;

// Loads the team's vec4s first .. first + count of the run (-inf past it) into `v`; returns
// their max keys.
fn load_items4(v: ptr<function, Items4>, first: u32, count: u32, run: Run4, team: Team) -> vec4<f32> {
    var mv = vec4<f32>(neg_inf());
    for (var k = 0u; k < count; k++) {
        let i = run.start + team.lane + (first + k) * team.size;
        var x = vec4<f32>(neg_inf());
        if (i < run.stop) {
            x = run_logits(run, i);
        }
        (*v)[k] = x;
        mv = max(mv, max_key4(x));
    }
    return mv;
}

// The items' summed (exp terms, mass terms, masses) relative to m. The exponentials replace the
// logits in `v`: the gradient needs only them, so each is computed once.
fn exp_items4(v: ptr<function, Items4>, first: u32, count: u32, row: u32, run: Run4, team: Team, t: RowTarget, m: f32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < count; k++) {
        let i = run.start + team.lane + (first + k) * team.size;
        if (i < run.stop) {
            let x = (*v)[k];
            let e = exp_shifted4(x, m);
            acc += terms4(e, x, run_mass(row, run, i, t), m);
            (*v)[k] = e;
        }
    }
    return acc;
}

// Writes the gradients of the items after exp_items4 (for a row that is not `plain`, the items
// are not read).
fn store_grad4(v: ptr<function, Items4>, first: u32, count: u32, run: Run4, team: Team, row: u32, t: RowTarget, g: GradRow) {
    for (var k = 0u; k < count; k++) {
        let i = run.start + team.lane + (first + k) * team.size;
        if (i < run.stop) {
            store_run_grad4(run, i, grad_value4((*v)[k], run_mass(row, run, i, t), g));
        }
    }
}

@compute @workgroup_size(WG)
fn rows4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let loss = row_pass4(wid, lid, false);
    if (ROW_TALLY) {
        tally_rows(wid, lid, loss);
    }
}

// A row of any length, over the vec4s that hold it.
@compute @workgroup_size(WG)
fn rows_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let loss = row_pass4(wid, lid, true);
    if (ROW_TALLY) {
        tally_rows(wid, lid, loss);
    }
}

// `rows4` (`masked`: `rows_unaligned4`) but for the tally, as `row_pass`.
fn row_pass4(wid: vec3<u32>, lid: u32, masked: bool) -> f32 {
    let team = team_of(wid, lid);
    if (team.row >= p.rows) {
        return 0.0;
    }
    let row = team.row;
    let xs = logits_start(row);
    let t = row_target(row);
    // Read before the team's first reduction, as in `rows`.
    let x_t = target_logit4(xs, t);
    let run = run_of(xs, base(5u) + row * p.cols, vec2<u32>(0u, p.cols), masked);
    // Up to MAX_ITEMS vec4s in `lo`, the rest in `hi` (when ITEMS > 0).
    var lo: Items4;
    var hi: Items4;
    let n_lo = min(ITEMS, MAX_ITEMS);
    let n_hi = ITEMS - n_lo;
    var m = neg_inf();
    var acc = vec4<f32>(0.0);
    if (ITEMS > 0u) {
        let mv = max(load_items4(&lo, 0u, n_lo, run, team), load_items4(&hi, MAX_ITEMS, n_hi, run, team));
        m = team_max(max_of(mv), lid);
        if (is_finite(m)) {
            acc = exp_items4(&lo, 0u, n_lo, row, run, team, t, m) + exp_items4(&hi, MAX_ITEMS, n_hi, row, run, team, t, m);
        }
        acc = team_sum4(acc, lid);
    } else {
        let st = team_stats(lane_stats4(row, run, team.lane, team.size, t), lid);
        m = st.m;
        acc = st.acc;
    }
    acc = complete_stats(acc, m, x_t, t);
    let loss = keep_loss(team, row, row_loss(m, acc, t));
    if (GRAD) {
        let g = grad_row(row, m, acc, t);
        if (ITEMS > 0u) {
            store_grad4(&lo, 0u, n_lo, run, team, row, t, g);
            store_grad4(&hi, MAX_ITEMS, n_hi, run, team, row, t, g);
        } else {
            store_run4(row, run, team.lane, team.size, t, m, g);
        }
    }
    return loss;
}

// The run of a split row's chunk.
fn chunk_run(ch: Chunk, masked: bool) -> Run4 {
    let row = ch.row * p.cols;
    return run_of(logits_start(ch.row), base(5u) + row, chunk_bounds(ch.within), masked);
}

@compute @workgroup_size(WG)
fn split_partials4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn split_partials_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, true);
}

fn chunk_partials4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let run = chunk_run(ch, masked);
    let t = row_target(ch.row);
    let st = team_stats(lane_stats4(ch.row, run, ch.team.lane, ch.team.size, t), lid);
    let m = st.m;
    var acc = st.acc;
    if (holds_target(t, run.classes)) {
        acc = target_partial(acc, m, target_logit4(logits_start(ch.row), t), t);
    }
    if (ch.team.lane == 0u) {
        partials[ch.index] = vec4<f32>(m, acc.x, acc.y, acc.z);
    }
}

@compute @workgroup_size(WG)
fn split_finish4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_finish4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn split_finish_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_finish4(wid, lid, true);
}

fn chunk_finish4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let t = row_target(ch.row);
    let st = split_row_stats(ch, t, lid);
    if (GRAD) {
        let g = grad_row(ch.row, st.m, st.acc, t);
        store_run4(ch.row, chunk_run(ch, masked), ch.team.lane, ch.team.size, t, st.m, g);
    }
}

// Split rows in one pass over the logits (`Tuning::loss_split_wait`; one_pass.wgsl has the
// scheme): a chunk's partial is its (m_i, s_i, a_i, b_i), and the row's first chunk also writes
// the row's loss. In place, the finishing pass reads the logits of the chunks it works out, which
// no chunk has overwritten: only done chunks have written their gradient.
const SYNC_WORDS: u32 = 5u;

// A row's statistics from its chunks' words, all of which have been stored. Called in uniform
// control flow by the whole workgroup.
fn synced_row_stats(row: u32, lid: u32) -> RowStats {
    let m = synced_max(row, lid);
    var acc = vec4<f32>(0.0);
    if (is_finite(m)) {
        for (var g = lid; g < p.chunks; g += SUM_BLOCK * WG) {
            var block = vec4<f32>(0.0);
            for (var i = g; i < min(p.chunks, g + SUM_BLOCK * WG); i += WG) {
                block += combined_partial(stored_partial(row, i), m);
            }
            acc += block;
        }
    }
    return RowStats(m, workgroup_sum4(acc, lid));
}

// One chunk of a split row, held in registers (ITEMS vec4s per invocation). The one pass
// (`publish`) stores its partial, counts itself in and waits at most `spin` loads for the row's
// other chunks; the finishing pass finds them all. Writes the chunk's gradient (and, for the
// row's first chunk, the row's loss) and returns true if the row's partials are all there.
fn fused_chunk(ch: Chunk, lid: u32, spin: u32, publish: bool) -> bool {
    let t = row_target(ch.row);
    let run = chunk_run(ch, false);
    // The target logit, where this chunk holds it, is read before anything is written.
    let has_target = holds_target(t, run.classes);
    var x_t = 0.0;
    if (has_target) {
        x_t = target_logit4(logits_start(ch.row), t);
    }
    var lo: Items4;
    var hi: Items4;
    let n_lo = min(ITEMS, MAX_ITEMS);
    let n_hi = ITEMS - n_lo;
    let mv = max(load_items4(&lo, 0u, n_lo, run, ch.team), load_items4(&hi, MAX_ITEMS, n_hi, run, ch.team));
    let m = team_max(max_of(mv), lid);
    var acc = vec4<f32>(0.0);
    if (is_finite(m) || is_neg_inf(m)) {
        // A chunk of -inf only takes its terms relative to 0: exponentials 0, as its gradient's
        // softmax part, and a mass term of -inf for every class with mass (m_i stays -inf).
        let shift = select(m, 0.0, is_neg_inf(m));
        acc = exp_items4(&lo, 0u, n_lo, ch.row, run, ch.team, t, shift) + exp_items4(&hi, MAX_ITEMS, n_hi, ch.row, run, ch.team, t, shift);
    }
    acc = team_sum4(acc, lid);
    if (has_target) {
        acc = target_partial(acc, m, x_t, t);
    }
    if (publish && !arrive(ch, lid, spin, vec4<f32>(m, acc.x, acc.y, acc.z))) {
        return false;
    }
    let row = synced_row_stats(ch.row, lid);
    if (ch.within == 0u && lid == 0u) {
        loss_rows[base(4u) + ch.row] = row_loss(row.m, row.acc, t);
    }
    if (GRAD) {
        // The items hold exp(x - m_i): exp(x - M) / S is that times exp(m_i - M) / S.
        var g = grad_row(ch.row, row.m, row.acc, t);
        g.k *= rescale(m, row.m);
        store_grad4(&lo, 0u, n_lo, run, ch.team, ch.row, t, g);
        store_grad4(&hi, MAX_ITEMS, n_hi, run, ch.team, ch.row, t, g);
    }
    return true;
}

// The batch reductions of Mean and Sum. A batch of more than one block of p.chunk rows is summed
// by the whole device rather than one workgroup, in one of two ways (`Tuning::batch_tally`):
//
// - Two passes. In the first (`batch_partials`), each workgroup g sums one block, with TEAM = 0
//   each invocation writing its own sum to partials[g * WG + lid] (no barrier), otherwise the
//   workgroup's sum going to partials[g]; the second (`batch_finish`: one workgroup) adds the
//   p.chunks partials. The partials are free between passes: the split-row kernels write their
//   own only after the divisor's `batch_finish` has read these.
// - One pass (`batch_tally`): each of the p.chunks workgroups sums its block, stores the sum in
//   its slot of the tally (`zeroed`) and takes a ticket from the tally's counter; the workgroup that takes
//   the last ticket adds the slots and writes the result (see `tally_blocks`).
//
// A batch of one block takes `batch_finish` alone, which then sums the rows themselves
// (p.chunks = 0). DIVISOR says which sum it is.

// What row `row` adds: to the mean's divisor (`divisor`), w[target] for a row not ignored with
// index targets and 1 with probability targets; otherwise its loss.
fn batch_term(row: u32, divisor: bool) -> f32 {
    if (!divisor) {
        return loss_rows[base(4u) + row];
    }
    if (PROBS) {
        return 1.0;
    }
    let t = row_target(row);
    return select(0.0, class_weight(t.index), t.kind == 0u);
}

// Invocation lid's share of the sum of block g's rows.
fn block_share(g: u32, lid: u32, divisor: bool) -> f32 {
    let start = g * p.chunk;
    let end = min(start + p.chunk, p.rows);
    var total = 0.0;
    for (var first = start + lid; first < end; first += SUM_BLOCK * WG) {
        var block = 0.0;
        for (var row = first; row < min(end, first + SUM_BLOCK * WG); row += WG) {
            block += batch_term(row, divisor);
        }
        total += block;
    }
    return total;
}

fn sum_block(wid: vec3<u32>, lid: u32, divisor: bool) {
    let g = linear_group(wid);
    let share = block_share(g, lid, divisor);
    if (TEAM == 0u) {
        partials[g * WG + lid] = vec4<f32>(share, 0.0, 0.0, 0.0);
        return;
    }
    let total = workgroup_sum4(vec4<f32>(share, 0.0, 0.0, 0.0), lid).x;
    if (lid == 0u) {
        partials[g] = vec4<f32>(total, 0.0, 0.0, 0.0);
    }
}

// The batch's sum, in one workgroup: of the partials, or of the rows when there are none.
fn batch_sum(lid: u32, divisor: bool) -> f32 {
    var total = 0.0;
    if (p.chunks == 0u) {
        for (var g = lid; g < p.rows; g += SUM_BLOCK * WG) {
            var block = 0.0;
            for (var row = g; row < min(p.rows, g + SUM_BLOCK * WG); row += WG) {
                block += batch_term(row, divisor);
            }
            total += block;
        }
    } else {
        for (var g = lid; g < p.chunks; g += SUM_BLOCK * WG) {
            var block = 0.0;
            for (var i = g; i < min(p.chunks, g + SUM_BLOCK * WG); i += WG) {
                block += partials[i].x;
            }
            total += block;
        }
    }
    return workgroup_sum4(vec4<f32>(total, 0.0, 0.0, 0.0), lid).x;
}

// The words kept 0 between dispatches: a one-pass split's sync words (one_pass.wgsl), or the
// one-pass sums' words, where zeroed[0] counts the workgroups that have stored their sum and
// zeroed[1 + g] is workgroup g's sum; the last workgroup sets back what the others set.
@group(0) @binding(8) var<storage, read_write> zeroed: array<atomic<u32>>;

var<workgroup> tally_last: u32;

// The sum over the p.chunks blocks, in the one workgroup that finishes last (`last`). Its
// invocations read the slots with atomic loads, each until it holds a value (`stored_value`):
// its writer took its ticket after storing it, so the store is at most not yet visible, and no
// workgroup waits on one that has not run. Slot i goes to invocation i % WG, so the adding order, and the result,
// does not depend on which workgroup finishes last. Surplus workgroups of a 2-D grid leave at
// once.
struct Tally {
    last: bool,
    total: f32,
}

fn tally_blocks(wid: vec3<u32>, lid: u32, divisor: bool) -> Tally {
    let g = linear_group(wid);
    if (g >= p.chunks) {
        return Tally(false, 0.0);
    }
    let share = block_share(g, lid, divisor);
    return tally_add(g, p.chunks, workgroup_sum4(vec4<f32>(share, 0.0, 0.0, 0.0), lid).x, lid);
}

// Adds `total` (workgroup g's sum, needed in invocation 0) over `blocks` workgroups, as
// `tally_blocks` says. Every invocation of the workgroup calls it, in uniform control flow.
fn tally_add(g: u32, blocks: u32, total: f32, lid: u32) -> Tally {
    if (lid == 0u) {
        atomicStore(&zeroed[1u + g], word_of(total));
        let ticket = atomicAdd(&zeroed[0], 1u);
        tally_last = u32(ticket + 1u == blocks);
    }
    if (workgroupUniformLoad(&tally_last) == 0u) {
        return Tally(false, 0.0);
    }
    var mine = 0.0;
    for (var i = lid; i < blocks; i += WG) {
        mine += stored_value(1u + i);
        atomicStore(&zeroed[1u + i], 0u);
    }
    if (lid == 0u) {
        atomicStore(&zeroed[0], 0u);
    }
    return Tally(true, workgroup_sum4(vec4<f32>(mine, 0.0, 0.0, 0.0), lid).x);
}

// stats[0] = the divisor of the mean: the sum of w[target] over rows not ignored (index
// targets), or the row count (probability targets).
fn write_denominator(d: f32) {
    stats[base(6u)] = d;
}

// Whether the reduced loss goes straight to the caller's loss buffer, bound in the gradient's
// place (the batch passes write no gradient); otherwise to stats[1], copied from there.
override LOSS_OUT: bool = false;

// The reduced loss of the batch's `total`: itself, or divided by the divisor for the mean.
fn reduced_loss(total: f32) -> f32 {
    if (REDUCTION == 1u) {
        return total / mean_divisor();
    }
    return total;
}

fn write_loss(total: f32) {
    let loss = reduced_loss(total);
    if (LOSS_OUT) {
        grad[base(5u)] = loss;
    } else {
        stats[base(6u) + 1u] = loss;
    }
}

// The row kernels' ending with ROW_TALLY: `loss` (a row's loss in its team's first lane, 0
// elsewhere) is added over the workgroup, then over the p.groups workgroups through the tally;
// the last one writes the reduced loss to loss_rows[0].
fn tally_rows(wid: vec3<u32>, lid: u32, loss: f32) {
    let g = linear_group(wid);
    if (g >= p.groups) {
        return;
    }
    var total = loss;
    if (TEAM != 2u) {
        total = workgroup_sum4(vec4<f32>(loss, 0.0, 0.0, 0.0), lid).x;
    }
    let t = tally_add(g, p.groups, total, lid);
    if (t.last && lid == 0u) {
        loss_rows[base(4u)] = reduced_loss(t.total);
    }
}

// The batch passes sum the mean's divisor (`write_denominator`); otherwise the rows' losses
// (`write_loss`).
override DIVISOR: bool = false;

fn write_batch(total: f32) {
    if (DIVISOR) {
        write_denominator(total);
    } else {
        write_loss(total);
    }
}

@compute @workgroup_size(WG)
fn batch_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sum_block(wid, lid, DIVISOR);
}

@compute @workgroup_size(WG)
fn batch_finish(@builtin(local_invocation_index) lid: u32) {
    let total = batch_sum(lid, DIVISOR);
    if (lid == 0u) {
        write_batch(total);
    }
}

@compute @workgroup_size(WG)
fn batch_tally(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = tally_blocks(wid, lid, DIVISOR);
    if (t.last && lid == 0u) {
        write_batch(t.total);
    }
}
