// Softmax, log-softmax and their backward along an axis that is not the last one: dim 1 of
// [N, C, H, W], say (common.wgsl is prepended, for its parameters and special-value tests).
//
// The tensor is seen as [outer, len, inner], row-major, with inner > 1 (inner = 1 is a row, which
// the row-wise families take): element k of line (o, i) lies at o * len * inner + k * inner + i.
// In `Params`, `rows` counts the dispatch's outer slabs, `cols` is `len` and `extra` is `inner`.
//
// One invocation takes one chunk of one line, and neighbouring invocations take neighbouring
// lines (i, i + 1), so every load of a workgroup reads one contiguous run of memory: the lines
// of a [N, C, H, W] softmax over C are read as coalesced as rows are. A line of one chunk
// (`chunks` = 1) is finished by its invocation alone; a line is split into chunks where it is
// longer than a software adapter lets an invocation loop, or where there are too few lines to
// fill the device. Then `stats` (`dot` for the backward) leaves each chunk's partial in
// `partials`, and `normalize` (`backward`) combines the line's partials, in the same order for
// every chunk of the line, before writing its chunk.
//
// No barrier and no subgroup operation is used: an invocation that has no chunk simply leaves.

@group(0) @binding(1) var<storage, read> src: array<f32>; // x, or y for the backward
@group(0) @binding(2) var<storage, read> grad: array<f32>; // dy (backward only)
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;

override LOG: bool = false;

// The chunk of a line an invocation takes.
struct Piece {
    valid: bool,
    // The element offset of the line's element 0 from each operand's base.
    first: u32,
    // Its chunk along the axis: [start, end).
    start: u32,
    end: u32,
    // The partial slot of the line's chunk 0; chunk c's is `slot0 + c * inner`, and this
    // invocation's is its own index over the dispatch.
    slot0: u32,
    slot: u32,
}

fn piece_of(wid: vec3<u32>, lid: u32) -> Piece {
    let t = linear_group(wid) * WG + lid;
    let inner = p.extra;
    let i = t % inner;
    let q = t / inner;
    let c = q % p.chunks;
    let slab = q / p.chunks;
    let bounds = chunk_bounds(c);
    return Piece(
        slab < p.rows,
        slab * p.cols * inner + i,
        bounds.x,
        bounds.y,
        slab * p.chunks * inner + i,
        t,
    );
}

fn at(piece: Piece, k: u32) -> u32 {
    return piece.first + k * p.extra;
}

// ------------------------------------------------------------------------------------------------
// Forward

// Folds `n` <= SUM_BLOCK elements of a line, from element k, into its running (max, sum of
// exp(x - max)): one rescale per block, and the block's exponentials summed apart before they
// join the running sum (as the row kernels' streamed sums). A NaN or +inf makes the max +inf.
fn fold_block(stats: vec2<f32>, piece: Piece, k: u32, n: u32) -> vec2<f32> {
    var v: array<f32, SUM_BLOCK>;
    var block_max = neg_inf();
    for (var j = 0u; j < n; j++) {
        let x = src[base(0u) + at(piece, k + j)];
        v[j] = x;
        block_max = max(block_max, max_key(x));
    }
    let m = max(stats.x, block_max);
    var s = stats.y;
    // Until the line's max is finite the sum stays 0 (only -inf so far) or no longer matters.
    if (is_finite(m)) {
        var block_sum = 0.0;
        for (var j = 0u; j < n; j++) {
            block_sum += exp_shifted(v[j], m);
        }
        s = s * rescale(stats.x, m) + block_sum;
    }
    return vec2<f32>(m, s);
}

// `fold_block` of a whole block, SUM_BLOCK elements: its loops have a constant trip count, which
// lets a compiler unroll them and keep the block in registers.
fn fold_full_block(stats: vec2<f32>, piece: Piece, k: u32) -> vec2<f32> {
    var v: array<f32, SUM_BLOCK>;
    var block_max = neg_inf();
    let first = base(0u) + at(piece, k);
    for (var j = 0u; j < SUM_BLOCK; j++) {
        let x = src[first + j * p.extra];
        v[j] = x;
        block_max = max(block_max, max_key(x));
    }
    let m = max(stats.x, block_max);
    var s = stats.y;
    if (is_finite(m)) {
        var block_sum = 0.0;
        for (var j = 0u; j < SUM_BLOCK; j++) {
            block_sum += exp_shifted(v[j], m);
        }
        s = s * rescale(stats.x, m) + block_sum;
    }
    return vec2<f32>(m, s);
}

// Two statistics (max, sum of exp(x - max)) of parts of a line as one, by the
// online-normalizer rule.
fn combine(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    if (!is_finite(m)) {
        return vec2<f32>(m, 0.0);
    }
    return vec2<f32>(m, a.y * rescale(a.x, m) + b.y * rescale(b.x, m));
}

// Elements a line's statistics gather in blocks before they join its running statistics: with
// blocks of SUM_BLOCK, the f32 rounding of a sum grows with about 2 SUM_BLOCK + n / GROUP terms
// rather than n (lines of 70 000 elements, summed by one invocation, stay within the 1e-5
// bounds).
const GROUP: u32 = SUM_BLOCK * SUM_BLOCK;

// (max, sum of exp(x - max)) over the piece's chunk.
fn chunk_stats(piece: Piece) -> vec2<f32> {
    var stats = vec2<f32>(neg_inf(), 0.0);
    for (var g = piece.start; g < piece.end; g += GROUP) {
        let group_end = min(g + GROUP, piece.end);
        var group = vec2<f32>(neg_inf(), 0.0);
        var k = g;
        for (; k + SUM_BLOCK <= group_end; k += SUM_BLOCK) {
            group = fold_full_block(group, piece, k);
        }
        if (k < group_end) {
            group = fold_block(group, piece, k, group_end - k);
        }
        stats = combine(stats, group);
    }
    return stats;
}

// The line's (max, sum) from its chunks' partials, combined by the online-normalizer rule.
fn line_stats(piece: Piece) -> vec2<f32> {
    let b = base(3u);
    var m = neg_inf();
    for (var c = 0u; c < p.chunks; c++) {
        m = max(m, partials[b + 2u * (piece.slot0 + c * p.extra)]);
    }
    var s = 0.0;
    if (is_finite(m)) {
        for (var g = 0u; g < p.chunks; g += SUM_BLOCK) {
            var block = 0.0;
            for (var c = g; c < min(p.chunks, g + SUM_BLOCK); c++) {
                let slot = b + 2u * (piece.slot0 + c * p.extra);
                block += partials[slot + 1u] * rescale(partials[slot], m);
            }
            s += block;
        }
    }
    return vec2<f32>(m, s);
}

// The output of element x of a line whose stats are (m, s); `scale` is 1 / s for softmax and
// ln(s) for log-softmax. A line whose max is not finite (NaN, +inf, or -inf only) is NaN.
fn normalized(x: f32, m: f32, scale: f32) -> f32 {
    if (!is_finite(m)) {
        return quiet_nan();
    }
    if (LOG) {
        return select((x - m) - scale, neg_inf(), is_neg_inf(x));
    }
    return exp_shifted(x, m) * scale;
}

fn scale_of(s: f32) -> f32 {
    if (LOG) {
        return log(s);
    }
    return 1.0 / s;
}

// Partials pass of split lines: each chunk's (max, sum).
@compute @workgroup_size(WG)
fn stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = piece_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    let st = chunk_stats(piece);
    let slot = base(3u) + 2u * piece.slot;
    partials[slot] = st.x;
    partials[slot + 1u] = st.y;
}

// Writes the piece's chunk. A line of one chunk with ITEMS > 0 (ITEMS = len <= SUM_BLOCK) is
// read once into registers and `exp` runs once per element; otherwise the chunk is read again
// after its line's stats.
@compute @workgroup_size(WG)
fn normalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = piece_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    if (ITEMS > 0u) {
        var v: array<f32, SUM_BLOCK>;
        var m = neg_inf();
        for (var j = 0u; j < ITEMS; j++) {
            v[j] = src[base(0u) + at(piece, j)];
            m = max(m, max_key(v[j]));
        }
        var s = 0.0;
        for (var j = 0u; j < ITEMS; j++) {
            let e = exp_shifted(v[j], m);
            s += e;
            if (!LOG) {
                v[j] = e;
            }
        }
        let scale = scale_of(s);
        for (var j = 0u; j < ITEMS; j++) {
            var y: f32;
            if (!is_finite(m)) {
                y = quiet_nan();
            } else if (LOG) {
                y = select((v[j] - m) - scale, neg_inf(), is_neg_inf(v[j]));
            } else {
                y = v[j] * scale;
            }
            dst[base(2u) + at(piece, j)] = y;
        }
        return;
    }
    var st: vec2<f32>;
    if (p.chunks == 1u) {
        st = chunk_stats(piece);
    } else {
        st = line_stats(piece);
    }
    let scale = scale_of(st.y);
    // Four steps at a time where they fit: fewer loop iterations, whose control costs a
    // software adapter as much as the loads.
    var k = piece.start;
    for (; k + 4u <= piece.end; k += 4u) {
        let i0 = at(piece, k);
        let i1 = i0 + p.extra;
        let i2 = i1 + p.extra;
        let i3 = i2 + p.extra;
        let x0 = src[base(0u) + i0];
        let x1 = src[base(0u) + i1];
        let x2 = src[base(0u) + i2];
        let x3 = src[base(0u) + i3];
        dst[base(2u) + i0] = normalized(x0, st.x, scale);
        dst[base(2u) + i1] = normalized(x1, st.x, scale);
        dst[base(2u) + i2] = normalized(x2, st.x, scale);
        dst[base(2u) + i3] = normalized(x3, st.x, scale);
    }
    for (; k < piece.end; k++) {
        let i = at(piece, k);
        dst[base(2u) + i] = normalized(src[base(0u) + i], st.x, scale);
    }
}

// ------------------------------------------------------------------------------------------------
// Backward, as backward.wgsl: softmax dx = y (dy - r), r = sum dy y; log-softmax
// dx = dy - exp(y) r, r = sum dy. Values are not special-cased beyond exp(-inf) = 0.

fn term(y: f32, g: f32) -> f32 {
    if (LOG) {
        return g;
    }
    return g * y;
}

fn grad_of(y: f32, g: f32, r: f32) -> f32 {
    if (LOG) {
        return g - select(exp(y), 0.0, is_neg_inf(y)) * r;
    }
    return y * (g - r);
}

// The piece's chunk's part of r, its terms summed in blocks and groups as `chunk_stats` sums.
fn chunk_dot(piece: Piece) -> f32 {
    var r = 0.0;
    for (var g = piece.start; g < piece.end; g += GROUP) {
        let group_end = min(g + GROUP, piece.end);
        var group = 0.0;
        for (var k = g; k < group_end; k += SUM_BLOCK) {
            let stop = min(k + SUM_BLOCK, group_end);
            var block = 0.0;
            for (var j = k; j < stop; j++) {
                let i = at(piece, j);
                block += term(src[base(0u) + i], grad[base(1u) + i]);
            }
            group += block;
        }
        r += group;
    }
    return r;
}

// Partials pass of split lines: each chunk's part of r.
@compute @workgroup_size(WG)
fn dot(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = piece_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    partials[base(3u) + piece.slot] = chunk_dot(piece);
}

@compute @workgroup_size(WG)
fn backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = piece_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    if (ITEMS > 0u) {
        var ys: array<f32, SUM_BLOCK>;
        var gs: array<f32, SUM_BLOCK>;
        var r = 0.0;
        for (var j = 0u; j < ITEMS; j++) {
            let i = at(piece, j);
            ys[j] = src[base(0u) + i];
            gs[j] = grad[base(1u) + i];
            r += term(ys[j], gs[j]);
        }
        for (var j = 0u; j < ITEMS; j++) {
            dst[base(2u) + at(piece, j)] = grad_of(ys[j], gs[j], r);
        }
        return;
    }
    var r = 0.0;
    if (p.chunks == 1u) {
        r = chunk_dot(piece);
    } else {
        for (var g = 0u; g < p.chunks; g += SUM_BLOCK) {
            var block = 0.0;
            for (var c = g; c < min(p.chunks, g + SUM_BLOCK); c++) {
                block += partials[base(3u) + piece.slot0 + c * p.extra];
            }
            r += block;
        }
    }
    for (var k = piece.start; k < piece.end; k++) {
        let i = at(piece, k);
        dst[base(2u) + i] = grad_of(src[base(0u) + i], grad[base(1u) + i], r);
    }
}

// ------------------------------------------------------------------------------------------------
// Four neighbouring lines per invocation, loaded and stored as vec4: the `*4` entry points, for
// layouts whose `inner` is a multiple of 4 with every operand starting on 16 bytes. The same
// passes as above, each lane of a vec4 a line; an invocation's loads are a quarter as many.

@group(0) @binding(1) var<storage, read> src4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dst4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> partials4: array<vec4<f32>>;

// Four lines' (max, sum of exp(x - max)).
struct Stats4 {
    m: vec4<f32>,
    s: vec4<f32>,
}

fn is_finite4(x: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(x) & vec4<u32>(ABS_MASK)) < vec4<u32>(INF_BITS);
}

// exp(x - m) per line, exactly 0 for -inf entries.
fn exp_lines4(x: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return select(exp(x - m), vec4<f32>(0.0), is_neg_inf4(x));
}

// Lines whose max is not finite keep a sum of 0 (only -inf so far, or poisoned).
fn finite_sum4(m: vec4<f32>, s: vec4<f32>) -> Stats4 {
    return Stats4(m, select(vec4<f32>(0.0), s, is_finite4(m)));
}

fn combine4(a: Stats4, b: Stats4) -> Stats4 {
    let m = max(a.m, b.m);
    return finite_sum4(m, a.s * exp_lines4(a.m, m) + b.s * exp_lines4(b.m, m));
}

// The quad of lines an invocation takes: as `Piece`, with offsets in vec4s.
fn quad_of(wid: vec3<u32>, lid: u32) -> Piece {
    let t = linear_group(wid) * WG + lid;
    let inner4 = p.extra / 4u;
    let i = t % inner4;
    let q = t / inner4;
    let c = q % p.chunks;
    let slab = q / p.chunks;
    let bounds = chunk_bounds(c);
    return Piece(
        slab < p.rows,
        slab * p.cols * inner4 + i,
        bounds.x,
        bounds.y,
        slab * p.chunks * inner4 + i,
        t,
    );
}

fn at4(piece: Piece, k: u32) -> u32 {
    return piece.first + k * (p.extra / 4u);
}

fn fold_block4(stats: Stats4, piece: Piece, k: u32, n: u32) -> Stats4 {
    var v: array<vec4<f32>, SUM_BLOCK>;
    var block_max = vec4<f32>(neg_inf());
    let b = base(0u) / 4u;
    for (var j = 0u; j < n; j++) {
        let x = src4[b + at4(piece, k + j)];
        v[j] = x;
        block_max = max(block_max, max_key4(x));
    }
    let m = max(stats.m, block_max);
    var block_sum = vec4<f32>(0.0);
    for (var j = 0u; j < n; j++) {
        block_sum += exp_lines4(v[j], m);
    }
    return finite_sum4(m, stats.s * exp_lines4(stats.m, m) + block_sum);
}

fn chunk_stats4(piece: Piece) -> Stats4 {
    var stats = Stats4(vec4<f32>(neg_inf()), vec4<f32>(0.0));
    for (var g = piece.start; g < piece.end; g += GROUP) {
        let group_end = min(g + GROUP, piece.end);
        var group = Stats4(vec4<f32>(neg_inf()), vec4<f32>(0.0));
        var k = g;
        for (; k + SUM_BLOCK <= group_end; k += SUM_BLOCK) {
            group = fold_block4(group, piece, k, SUM_BLOCK);
        }
        if (k < group_end) {
            group = fold_block4(group, piece, k, group_end - k);
        }
        stats = combine4(stats, group);
    }
    return stats;
}

fn line_stats4(piece: Piece) -> Stats4 {
    let inner4 = p.extra / 4u;
    var m = vec4<f32>(neg_inf());
    for (var c = 0u; c < p.chunks; c++) {
        m = max(m, partials4[base(3u) / 4u + 2u * (piece.slot0 + c * inner4)]);
    }
    var s = vec4<f32>(0.0);
    for (var g = 0u; g < p.chunks; g += SUM_BLOCK) {
        var block = vec4<f32>(0.0);
        for (var c = g; c < min(p.chunks, g + SUM_BLOCK); c++) {
            let slot = base(3u) / 4u + 2u * (piece.slot0 + c * inner4);
            block += partials4[slot + 1u] * exp_lines4(partials4[slot], m);
        }
        s += block;
    }
    return finite_sum4(m, s);
}

fn scale_of4(s: vec4<f32>) -> vec4<f32> {
    if (LOG) {
        return log(s);
    }
    return 1.0 / s;
}

fn normalized4(x: vec4<f32>, m: vec4<f32>, scale: vec4<f32>) -> vec4<f32> {
    var y: vec4<f32>;
    if (LOG) {
        y = select((x - m) - scale, vec4<f32>(neg_inf()), is_neg_inf4(x));
    } else {
        y = exp_lines4(x, m) * scale;
    }
    return select(vec4<f32>(quiet_nan()), y, is_finite4(m));
}

@compute @workgroup_size(WG)
fn stats4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = quad_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    let st = chunk_stats4(piece);
    let slot = base(3u) / 4u + 2u * piece.slot;
    partials4[slot] = st.m;
    partials4[slot + 1u] = st.s;
}

@compute @workgroup_size(WG)
fn normalize4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = quad_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    let b_in = base(0u) / 4u;
    let b_out = base(2u) / 4u;
    if (ITEMS > 0u) {
        var v: array<vec4<f32>, SUM_BLOCK>;
        var m = vec4<f32>(neg_inf());
        for (var j = 0u; j < ITEMS; j++) {
            v[j] = src4[b_in + at4(piece, j)];
            m = max(m, max_key4(v[j]));
        }
        var s = vec4<f32>(0.0);
        for (var j = 0u; j < ITEMS; j++) {
            let e = exp_lines4(v[j], m);
            s += e;
            if (!LOG) {
                v[j] = e;
            }
        }
        let scale = scale_of4(s);
        let finite = is_finite4(m);
        for (var j = 0u; j < ITEMS; j++) {
            var y: vec4<f32>;
            if (LOG) {
                y = select((v[j] - m) - scale, vec4<f32>(neg_inf()), is_neg_inf4(v[j]));
            } else {
                y = v[j] * scale;
            }
            dst4[b_out + at4(piece, j)] = select(vec4<f32>(quiet_nan()), y, finite);
        }
        return;
    }
    var st: Stats4;
    if (p.chunks == 1u) {
        st = chunk_stats4(piece);
    } else {
        st = line_stats4(piece);
    }
    let scale = scale_of4(st.s);
    for (var k = piece.start; k < piece.end; k++) {
        let i = at4(piece, k);
        dst4[b_out + i] = normalized4(src4[b_in + i], st.m, scale);
    }
}

fn term4(y: vec4<f32>, g: vec4<f32>) -> vec4<f32> {
    if (LOG) {
        return g;
    }
    return g * y;
}

fn grad_of4(y: vec4<f32>, g: vec4<f32>, r: vec4<f32>) -> vec4<f32> {
    if (LOG) {
        return g - select(exp(y), vec4<f32>(0.0), is_neg_inf4(y)) * r;
    }
    return y * (g - r);
}

fn chunk_dot4(piece: Piece) -> vec4<f32> {
    let b_y = base(0u) / 4u;
    let b_g = base(1u) / 4u;
    var r = vec4<f32>(0.0);
    for (var g = piece.start; g < piece.end; g += GROUP) {
        let group_end = min(g + GROUP, piece.end);
        var group = vec4<f32>(0.0);
        for (var k = g; k < group_end; k += SUM_BLOCK) {
            let stop = min(k + SUM_BLOCK, group_end);
            var block = vec4<f32>(0.0);
            for (var j = k; j < stop; j++) {
                let i = at4(piece, j);
                block += term4(src4[b_y + i], grad4[b_g + i]);
            }
            group += block;
        }
        r += group;
    }
    return r;
}

@compute @workgroup_size(WG)
fn dot4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = quad_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    partials4[base(3u) / 4u + piece.slot] = chunk_dot4(piece);
}

@compute @workgroup_size(WG)
fn backward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let piece = quad_of(wid, lid);
    if (!piece.valid) {
        return;
    }
    let b_y = base(0u) / 4u;
    let b_g = base(1u) / 4u;
    let b_out = base(2u) / 4u;
    if (ITEMS > 0u) {
        var ys: array<vec4<f32>, SUM_BLOCK>;
        var gs: array<vec4<f32>, SUM_BLOCK>;
        var r = vec4<f32>(0.0);
        for (var j = 0u; j < ITEMS; j++) {
            let i = at4(piece, j);
            ys[j] = src4[b_y + i];
            gs[j] = grad4[b_g + i];
            r += term4(ys[j], gs[j]);
        }
        for (var j = 0u; j < ITEMS; j++) {
            dst4[b_out + at4(piece, j)] = grad_of4(ys[j], gs[j], r);
        }
        return;
    }
    var r = vec4<f32>(0.0);
    if (p.chunks == 1u) {
        r = chunk_dot4(piece);
    } else {
        let inner4 = p.extra / 4u;
        for (var g = 0u; g < p.chunks; g += SUM_BLOCK) {
            var block = vec4<f32>(0.0);
            for (var c = g; c < min(p.chunks, g + SUM_BLOCK); c++) {
                block += partials4[base(3u) / 4u + piece.slot0 + c * inner4];
            }
            r += block;
        }
    }
    for (var k = piece.start; k < piece.end; k++) {
        let i = at4(piece, k);
        dst4[b_out + i] = grad_of4(src4[b_y + i], grad4[b_g + i], r);
    }
}
