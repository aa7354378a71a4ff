// Row-wise softmax and log-softmax (common.wgsl is prepended).
//
// Entry points, chosen on the host by row length and adapter (src/kernels/plan.rs):
//   rows        one team per row (TEAM: an invocation, a subgroup, or the workgroup); each lane
//               strides over the row and the row's (max, sum) is combined over the team. With
//               ITEMS > 0 the row is held in registers between the phases: one read, one write;
//               otherwise it is read twice, each lane's (max, sum) accumulated online, block by
//               block (`online_stats`).
//   split_*     a row spread over several teams: split_partials writes one (max, sum) pair per
//               chunk, split_normalize combines a row's pairs with the online-normalizer rule and
//               writes its chunk. Keeps the GPU busy on 4 rows.
//   split_fused4, split_rest4
//               split rows in one pass over the input where a row's chunks run at once
//               (one_pass.wgsl), the second pass finishing what the first left.
//   *4          the same over vec4: rows of a multiple of 4 columns whose operands start at a
//               multiple of 16 bytes are read and written four elements at a time.
//   rows_unaligned4, split_*_unaligned4
//               `rows` (in registers or streamed) and the split pair over the vec4 views where
//               the rows are not a multiple of 4 columns but the operands share their offset
//               within a vec4: a
//               row (a chunk) is the vec4s that hold any of its elements, its first and last
//               masked on load and written element by element, the rest read and written whole.

@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<vec2<f32>>;
// The same bindings seen as vec4, used only by the *4 entry points.
@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst4: array<vec4<f32>>;

override LOG: bool = false;

// The output for one element given the row's max m and `scale`: 1/sum for softmax, ln(sum) for
// log-softmax. A row whose max is not finite is NaN throughout.
fn finish(x: f32, m: f32, scale: f32) -> f32 {
    var y: f32;
    if (LOG) {
        y = select((x - m) - scale, neg_inf(), is_neg_inf(x));
    } else {
        y = exp_shifted(x, m) * scale;
    }
    return select(quiet_nan(), y, is_finite(m));
}

fn finish4(x: vec4<f32>, m: f32, scale: f32) -> vec4<f32> {
    var y: vec4<f32>;
    if (LOG) {
        y = select((x - m) - scale, vec4<f32>(neg_inf()), is_neg_inf4(x));
    } else {
        y = exp_shifted4(x, m) * scale;
    }
    return select(vec4<f32>(quiet_nan()), y, is_finite(m));
}

fn normaliser(sum: f32) -> f32 {
    if (LOG) {
        return log(sum);
    }
    return 1.0 / sum;
}

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let team = team_of(wid, lid);
    // A whole team leaves together, so its reductions stay uniform.
    if (team.row >= p.rows) {
        return;
    }
    let s0 = base(0u) + team.row * p.cols;
    let d0 = base(1u) + team.row * p.cols;
    var vals: array<f32, MAX_ITEMS>;

    var m = neg_inf();
    var sum = 0.0;
    if (ITEMS > 0u) {
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            var x = neg_inf();
            if (c < p.cols) {
                x = src[s0 + c];
            }
            vals[k] = x;
            m = max(m, max_key(x));
        }
        m = team_max(m, lid);
        if (is_finite(m)) {
            for (var k = 0u; k < ITEMS; k++) {
                let e = exp_shifted(vals[k], m);
                sum += e;
                if (!LOG) {
                    vals[k] = e;
                }
            }
        }
        sum = team_sum(sum, lid);
    } else {
        // A streamed row is read twice: its (max, sum) in one pass, then its output.
        let st = team_stats(online_stats(s0, s0 + p.cols, team.lane, team.size), lid);
        m = st.x;
        sum = st.y;
    }
    let scale = normaliser(sum);
    let ok = is_finite(m);

    if (ITEMS > 0u) {
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            if (c < p.cols) {
                var y: f32;
                if (LOG) {
                    y = finish(vals[k], m, scale);
                } else {
                    y = select(quiet_nan(), vals[k] * scale, ok);
                }
                dst[d0 + c] = y;
            }
        }
    } else {
        for (var c = team.lane; c < p.cols; c += team.size) {
            dst[d0 + c] = finish(src[s0 + c], m, scale);
        }
    }
}

// Elements lo .. hi of the vec4 view (element indices; `q` the vec4 holding 4q .. 4q + 3), -inf
// for those outside: the first and last vec4 of an unaligned row hold other rows' elements.
fn masked4(q: u32, lo: u32, hi: u32) -> vec4<f32> {
    return select(vec4<f32>(neg_inf()), src4[q], in_span4(q, lo, hi));
}

// A lane's (max, sum) over the input's elements lo .. hi, read as the vec4s that hold them
// (`block_stats4`). Where `masked` (rows not a multiple of 4 columns; a constant at each call)
// the elements outside lo .. hi count as -inf; otherwise lo and hi are multiples of 4.
fn span_stats4(lo: u32, hi: u32, lane: u32, size: u32, masked: bool) -> vec2<f32> {
    return block_stats4(lo / 4u, (hi + 3u) / 4u, lane, size, vec2<u32>(lo, hi), masked);
}

// Writes the outputs of input elements lo .. hi (of a row starting at vec4 `s0`, whose output
// starts at vec4 `d0`, at the same place within it) given the row's max m and `scale`; where
// `masked`, as span_stats4, only those of elements in lo .. hi.
fn write_span4(lo: u32, hi: u32, s0: u32, d0: u32, lane: u32, size: u32, m: f32, scale: f32, masked: bool) {
    for (var q = lo / 4u + lane; q < (hi + 3u) / 4u; q += size) {
        let inside = in_span4(q, lo, hi);
        var x = src4[q];
        if (masked) {
            x = select(vec4<f32>(neg_inf()), x, inside);
        }
        store4(q - s0 + d0, finish4(x, m, scale), inside, masked);
    }
}

// The split pair over the vec4 views (split_partials4, split_normalize4; `masked`: the
// *_unaligned4 pair, whose chunk is the vec4s that hold any of its elements, masked as a
// row's).
fn chunk_partials4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let bounds = chunk_bounds(ch.within);
    let s0 = base(0u) + ch.row * p.cols;
    let st = team_stats(span_stats4(s0 + bounds.x, s0 + bounds.y, ch.team.lane, ch.team.size, masked), lid);
    if (ch.team.lane == 0u) {
        partials[ch.index] = st;
    }
}

fn chunk_normalize4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let st = row_stats(ch, lid);
    let bounds = chunk_bounds(ch.within);
    let s0 = base(0u) + ch.row * p.cols;
    let d0 = base(1u) + ch.row * p.cols;
    write_span4(s0 + bounds.x, s0 + bounds.y, s0 / 4u, d0 / 4u, ch.team.lane, ch.team.size, st.x, normaliser(st.y), masked);
}

@compute @workgroup_size(WG)
fn split_partials_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, true);
}

@compute @workgroup_size(WG)
fn split_normalize_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_normalize4(wid, lid, true);
}

// A split row's (max, sum), combined over the team from its chunks' partials with the
// online-normalizer rule: M = max m_i, S = sum s_i * exp(m_i - M).
fn row_stats(ch: Chunk, lid: u32) -> vec2<f32> {
    let first = ch.row * p.chunks;
    var m = neg_inf();
    for (var i = ch.team.lane; i < p.chunks; i += ch.team.size) {
        m = max(m, partials[first + i].x);
    }
    m = team_max(m, lid);
    var sum = 0.0;
    if (is_finite(m)) {
        let step = ch.team.size;
        for (var g = ch.team.lane; g < p.chunks; g += SUM_BLOCK * step) {
            var block = 0.0;
            for (var i = g; i < min(p.chunks, g + SUM_BLOCK * step); i += step) {
                let part = partials[first + i];
                block += part.y * rescale(part.x, m);
            }
            sum += block;
        }
    }
    return vec2<f32>(m, team_sum(sum, lid));
}

@compute @workgroup_size(WG)
fn split_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let bounds = chunk_bounds(ch.within);
    let s0 = base(0u) + ch.row * p.cols;
    let st = team_stats(online_stats(s0 + bounds.x, s0 + bounds.y, ch.team.lane, ch.team.size), lid);
    if (ch.team.lane == 0u) {
        partials[ch.index] = st;
    }
}

@compute @workgroup_size(WG)
fn split_normalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let st = row_stats(ch, lid);
    let m = st.x;
    let sum = st.y;
    let scale = normaliser(sum);

    let bounds = chunk_bounds(ch.within);
    let s0 = base(0u) + ch.row * p.cols;
    let d0 = base(1u) + ch.row * p.cols;
    for (var c = bounds.x + ch.team.lane; c < bounds.y; c += ch.team.size) {
        dst[d0 + c] = finish(src[s0 + c], m, scale);
    }
}

// A lane's (max, sum of exp(x - max)) over the elements start + lane, start + lane + size, ...
// below stop, from one read, as `block_stats4` reads vec4s: blocks of SUM_BLOCK elements.
fn online_stats(start: u32, stop: u32, lane: u32, size: u32) -> vec2<f32> {
    var m = neg_inf();
    var s = 0.0;
    for (var i0 = start + lane; i0 < stop; i0 += size * SUM_BLOCK) {
        var block: array<f32, SUM_BLOCK>;
        var bm = neg_inf();
        for (var k = 0u; k < SUM_BLOCK; k++) {
            let i = i0 + k * size;
            var x = neg_inf();
            if (i < stop) {
                x = src[i];
            }
            block[k] = x;
            bm = max(bm, max_key(x));
        }
        let mn = max(m, bm);
        var acc = 0.0;
        for (var k = 0u; k < SUM_BLOCK; k++) {
            acc += exp_shifted(block[k], mn);
        }
        s = s * rescale(m, mn) + acc;
        m = mn;
    }
    return vec2<f32>(m, s);
}

// A lane's (max, sum of exp(x - max)) over the vec4s start + lane, start + lane +
// size, ... below stop, from one read: each block of BLOCK4 vec4s is loaded, its maximum taken,
// and the running sum rescaled when the maximum grows (one extra exp per block, not per
// element). Where `masked` (a constant at each call, folded once the call is inlined), elements
// outside span.x .. span.y count as -inf.
fn block_stats4(start: u32, stop: u32, lane: u32, size: u32, span: vec2<u32>, masked: bool) -> vec2<f32> {
    var m = neg_inf();
    var s = 0.0;
    for (var i0 = start + lane; i0 < stop; i0 += size * BLOCK4) {
        var block: array<vec4<f32>, BLOCK4>;
        var bm = vec4<f32>(neg_inf());
        for (var k = 0u; k < BLOCK4; k++) {
            let i = i0 + k * size;
            var x = vec4<f32>(neg_inf());
            if (i < stop) {
                if (masked) {
                    x = masked4(i, span.x, span.y);
                } else {
                    x = src4[i];
                }
            }
            block[k] = x;
            bm = max(bm, max_key4(x));
        }
        let mn = max(m, max_of(bm));
        var acc = vec4<f32>(0.0);
        for (var k = 0u; k < BLOCK4; k++) {
            acc += exp_shifted4(block[k], mn);
        }
        s = s * rescale(m, mn) + sum_of(acc);
        m = mn;
    }
    return vec2<f32>(m, s);
}

// Combines the lanes' (max, sum) pairs over the team. Lanes whose maximum is below the team's
// rescale their sums; a team maximum that is not finite leaves the sum meaningless (the outputs
// are NaN then).
fn team_stats(st: vec2<f32>, lid: u32) -> vec2<f32> {
    let m = team_max(st.x, lid);
    let part = select(0.0, st.y * rescale(st.x, m), is_finite(m));
    return vec2<f32>(m, team_sum(part, lid));
}

// A row held in registers by rows4: each invocation keeps up to 2 * MAX_ITEMS vec4s in two
// arrays of MAX_ITEMS, each indexed only by loop counters with constant bounds, so that shader
// compilers unroll the loops and keep the values in registers (llvmpipe leaves longer loops
// rolled, and a rolled loop's array lives in memory, each access made lane by lane).
alias Items4 = array<vec4<f32>, MAX_ITEMS>;

// Loads the team's vec4s first .. first + count of the n4 from vec4 s0 (-inf past them) into
// `v`; returns their max keys. Where `masked` (a constant at each call), elements outside
// span.x .. span.y read as -inf.
fn load_items4(v: ptr<function, Items4>, first: u32, count: u32, s0: u32, n4: u32, team: Team, span: vec2<u32>, masked: bool) -> vec4<f32> {
    var mv = vec4<f32>(neg_inf());
    for (var k = 0u; k < count; k++) {
        let c = team.lane + (first + k) * team.size;
        var x = vec4<f32>(neg_inf());
        if (c < n4) {
            if (masked) {
                x = masked4(s0 + c, span.x, span.y);
            } else {
                x = src4[s0 + c];
            }
        }
        (*v)[k] = x;
        mv = max(mv, max_key4(x));
    }
    return mv;
}

// The sum of exp(x - m) over the items; softmax keeps the exponentials in place of the inputs.
fn exp_items4(v: ptr<function, Items4>, count: u32, m: f32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < count; k++) {
        let e = exp_shifted4((*v)[k], m);
        acc += e;
        if (!LOG) {
            (*v)[k] = e;
        }
    }
    return acc;
}

// Writes the outputs of the items loaded by load_items4 (with exp_items4 applied for softmax)
// from vec4 s0 to the output's vec4 d0; where `masked`, only those of elements in span.x ..
// span.y.
fn store_items4(v: ptr<function, Items4>, first: u32, count: u32, s0: u32, d0: u32, n4: u32, team: Team, m: f32, scale: f32, span: vec2<u32>, masked: bool) {
    for (var k = 0u; k < count; k++) {
        let c = team.lane + (first + k) * team.size;
        if (c < n4) {
            var y: vec4<f32>;
            if (LOG) {
                y = finish4((*v)[k], m, scale);
            } else {
                y = select(vec4<f32>(quiet_nan()), (*v)[k] * scale, is_finite(m));
            }
            store4(d0 + c, y, in_span4(s0 + c, span.x, span.y), masked);
        }
    }
}

// Stores y at the output's vec4 d; where `masked`, only its components `inside`. A binding is
// seen either as f32 or as vec4 by one entry point, never both, so those are written as
// components of the vec4 view (4-byte stores, which neighbouring rows' teams make to the
// others).
fn store4(d: u32, y: vec4<f32>, inside: vec4<bool>, masked: bool) {
    if (!masked || all(inside)) {
        dst4[d] = y;
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (inside[j]) {
                dst4[d][j] = y[j];
            }
        }
    }
}

@compute @workgroup_size(WG)
fn rows4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    row_pass4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn rows_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    row_pass4(wid, lid, true);
}

// A row per team over the vec4 views; `masked` (rows_unaligned4): the row is not a multiple of
// 4 elements and is read as the n4 vec4s that hold them, masked.
fn row_pass4(wid: vec3<u32>, lid: u32, masked: bool) {
    let team = team_of(wid, lid);
    if (team.row >= p.rows) {
        return;
    }
    let start = base(0u) + team.row * p.cols;
    let span = vec2<u32>(start, start + p.cols);
    let s0 = start / 4u;
    let n4 = (span.y + 3u) / 4u - s0;
    // The operands' rows start at the same place within a vec4 (the host checks it), so vec4
    // s0 + c of the input is vec4 d0 + c of the output.
    let d0 = (base(1u) + team.row * p.cols) / 4u;
    if (ITEMS > 0u) {
        // Up to MAX_ITEMS vec4s in `lo`, the rest in `hi`.
        var lo: Items4;
        var hi: Items4;
        let n_lo = min(ITEMS, MAX_ITEMS);
        let n_hi = ITEMS - n_lo;
        let mv = max(load_items4(&lo, 0u, n_lo, s0, n4, team, span, masked), load_items4(&hi, MAX_ITEMS, n_hi, s0, n4, team, span, masked));
        let m = team_max(max_of(mv), lid);
        var acc = vec4<f32>(0.0);
        if (is_finite(m)) {
            acc = exp_items4(&lo, n_lo, m) + exp_items4(&hi, n_hi, m);
        }
        let scale = normaliser(team_sum(sum_of(acc), lid));
        store_items4(&lo, 0u, n_lo, s0, d0, n4, team, m, scale, span, masked);
        store_items4(&hi, MAX_ITEMS, n_hi, s0, d0, n4, team, m, scale, span, masked);
    } else {
        let st = team_stats(span_stats4(span.x, span.y, team.lane, team.size, masked), lid);
        write_span4(span.x, span.y, s0, d0, team.lane, team.size, st.x, normaliser(st.y), masked);
    }
}

@compute @workgroup_size(WG)
fn split_partials4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn split_normalize4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_normalize4(wid, lid, false);
}

// Split rows in one pass over the input (`Tuning::split_wait`; one_pass.wgsl has the scheme):
// a chunk's partial is its (max, sum).
@group(0) @binding(3) var<storage, read_write> zeroed: array<atomic<u32>>;

const SYNC_WORDS: u32 = 3u;

// A row's (max, sum) from its chunks' words, all of which have been stored. Called in uniform
// control flow by the whole workgroup.
fn synced_row_stats(row: u32, lid: u32) -> vec2<f32> {
    let m = synced_max(row, lid);
    var sum = 0.0;
    if (is_finite(m)) {
        for (var g = lid; g < p.chunks; g += SUM_BLOCK * WG) {
            var block = 0.0;
            for (var i = g; i < min(p.chunks, g + SUM_BLOCK * WG); i += WG) {
                let part = stored_partial(row, i);
                block += part.y * rescale(part.x, m);
            }
            sum += block;
        }
    }
    return vec2<f32>(m, workgroup_sum4(vec4<f32>(sum, 0.0, 0.0, 0.0), lid).x);
}

// One chunk of a split row, held in registers (ITEMS vec4s per invocation). The one pass
// (`publish`) stores its (max, sum), counts itself in and waits at most `spin` loads for the
// row's other chunks; the finishing pass finds them all. Writes the chunk's output and returns
// true if the row's pairs are all there.
fn fused_chunk(ch: Chunk, lid: u32, spin: u32, publish: bool) -> bool {
    let bounds = chunk_bounds4(ch.within);
    let n4 = bounds.y - bounds.x;
    let row4 = ch.row * (p.cols / 4u) + bounds.x;
    var lo: Items4;
    var hi: Items4;
    let n_lo = min(ITEMS, MAX_ITEMS);
    let n_hi = ITEMS - n_lo;
    let s0 = base(0u) / 4u + row4;
    let none = vec2<u32>(0u);
    let mv = max(load_items4(&lo, 0u, n_lo, s0, n4, ch.team, none, false), load_items4(&hi, MAX_ITEMS, n_hi, s0, n4, ch.team, none, false));
    let m = team_max(max_of(mv), lid);
    var acc = vec4<f32>(0.0);
    // A chunk of -inf only (m = -inf) takes exponentials too: they are 0, as its outputs.
    if (is_finite(m) || is_neg_inf(m)) {
        acc = exp_items4(&lo, n_lo, m) + exp_items4(&hi, n_hi, m);
    }
    let sum = team_sum(sum_of(acc), lid);
    if (publish && !arrive(ch, lid, spin, vec4<f32>(m, sum, 0.0, 0.0))) {
        return false;
    }
    let row = synced_row_stats(ch.row, lid);
    // Softmax scales the chunk's exp(x - m) by exp(m - M) / S; log-softmax takes x - M - ln S.
    var scale = normaliser(row.y);
    if (!LOG) {
        scale *= rescale(m, row.x);
    }
    let d0 = base(1u) / 4u + row4;
    store_items4(&lo, 0u, n_lo, s0, d0, n4, ch.team, row.x, scale, none, false);
    store_items4(&hi, MAX_ITEMS, n_hi, s0, d0, n4, ch.team, row.x, scale, none, false);
    return true;
}
