// Backward of softmax and log-softmax (common.wgsl is prepended).
//
//   softmax:      dx_j = y_j * (dy_j - r),       r = sum_k dy_k * y_k
//   log-softmax:  dx_j = dy_j - exp(y_j) * r,    r = sum_k dy_k
//
// One reduction per row; the entry points are those of softmax.wgsl, *4 and *_unaligned4
// included (the latter read y, dy and dx at the same place within a vec4). Values are not
// special-cased: NaN in y or dy propagates through r to its row, and exp(-inf) is 0 by the
// explicit select.

@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
// The same bindings seen as vec4, used only by the *4 entry points (aligned rows, as in
// softmax.wgsl).
@group(0) @binding(1) var<storage, read> y4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dx4: array<vec4<f32>>;

override LOG: bool = false;

fn term(yv: f32, g: f32) -> f32 {
    if (LOG) {
        return g;
    }
    return g * yv;
}

fn grad(yv: f32, g: f32, r: f32) -> f32 {
    if (LOG) {
        return g - select(exp(yv), 0.0, is_neg_inf(yv)) * r;
    }
    return yv * (g - r);
}

fn term4(yv: vec4<f32>, g: vec4<f32>) -> vec4<f32> {
    if (LOG) {
        return g;
    }
    return g * yv;
}

fn grad4(yv: vec4<f32>, g: vec4<f32>, r: f32) -> vec4<f32> {
    if (LOG) {
        return g - select(exp(yv), vec4<f32>(0.0), is_neg_inf4(yv)) * r;
    }
    return yv * (g - r);
}

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let team = team_of(wid, lid);
    // A whole team leaves together, so its reductions stay uniform.
    if (team.row >= p.rows) {
        return;
    }
    let y0 = base(0u) + team.row * p.cols;
    let g0 = base(1u) + team.row * p.cols;
    let d0 = base(2u) + team.row * p.cols;
    var ys: array<f32, MAX_ITEMS>;
    var gs: array<f32, MAX_ITEMS>;
    var r = 0.0;
    if (ITEMS > 0u) {
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            if (c < p.cols) {
                ys[k] = y[y0 + c];
                gs[k] = dy[g0 + c];
                r += term(ys[k], gs[k]);
            }
        }
    } else {
        for (var c0 = team.lane; c0 < p.cols; c0 += team.size * SUM_BLOCK) {
            let stop = min(p.cols, c0 + team.size * SUM_BLOCK);
            var part = 0.0;
            for (var c = c0; c < stop; c += team.size) {
                part += term(y[y0 + c], dy[g0 + c]);
            }
            r += part;
        }
    }
    r = team_sum(r, lid);
    if (ITEMS > 0u) {
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            if (c < p.cols) {
                dx[d0 + c] = grad(ys[k], gs[k], r);
            }
        }
    } else {
        for (var c = team.lane; c < p.cols; c += team.size) {
            dx[d0 + c] = grad(y[y0 + c], dy[g0 + c], r);
        }
    }
}

// r of a split row: the sum of its chunks' partials, over the team.
fn row_total(ch: Chunk, lid: u32) -> f32 {
    let first = ch.row * p.chunks;
    var r = 0.0;
    let step = ch.team.size;
    for (var g = ch.team.lane; g < p.chunks; g += SUM_BLOCK * step) {
        var block = 0.0;
        for (var i = g; i < min(p.chunks, g + SUM_BLOCK * step); i += step) {
            block += partials[first + i];
        }
        r += block;
    }
    return team_sum(r, lid);
}

@compute @workgroup_size(WG)
fn split_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let bounds = chunk_bounds(ch.within);
    let y0 = base(0u) + ch.row * p.cols;
    let g0 = base(1u) + ch.row * p.cols;
    var r = 0.0;
    for (var c0 = bounds.x + ch.team.lane; c0 < bounds.y; c0 += ch.team.size * SUM_BLOCK) {
        let stop = min(bounds.y, c0 + ch.team.size * SUM_BLOCK);
        var part = 0.0;
        for (var c = c0; c < stop; c += ch.team.size) {
            part += term(y[y0 + c], dy[g0 + c]);
        }
        r += part;
    }
    r = team_sum(r, lid);
    if (ch.team.lane == 0u) {
        partials[ch.index] = r;
    }
}

@compute @workgroup_size(WG)
fn split_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let r = row_total(ch, lid);
    let bounds = chunk_bounds(ch.within);
    let y0 = base(0u) + ch.row * p.cols;
    let g0 = base(1u) + ch.row * p.cols;
    let d0 = base(2u) + ch.row * p.cols;
    for (var c = bounds.x + ch.team.lane; c < bounds.y; c += ch.team.size) {
        dx[d0 + c] = grad(y[y0 + c], dy[g0 + c], r);
    }
}

// A lane's share of r over y's elements lo .. hi, read as the vec4s that hold them from y's vec4
// ys, with dy's row starting at vec4 gs at the same place within a vec4, summed in blocks of
// BLOCK4 terms per component. Where `masked` (rows not a multiple of 4 columns; a constant at
// each call, folded once the call is inlined), y's elements outside lo .. hi add nothing;
// otherwise lo and hi are multiples of 4.
fn span_sum4(lo: u32, hi: u32, ys: u32, gs: u32, lane: u32, size: u32, masked: bool) -> f32 {
    // y's vec4 q is dy's q - ys + gs (u32 arithmetic wraps, so gs - ys may stand for a negative
    // step).
    let stop = (hi + 3u) / 4u;
    var r = 0.0;
    for (var q0 = lo / 4u + lane; q0 < stop; q0 += size * BLOCK4) {
        let end = min(stop, q0 + size * BLOCK4);
        var part = vec4<f32>(0.0);
        for (var q = q0; q < end; q += size) {
            let t = term4(y4[q], dy4[q - ys + gs]);
            if (masked) {
                part += select(vec4<f32>(0.0), t, in_span4(q, lo, hi));
            } else {
                part += t;
            }
        }
        r += sum_of(part);
    }
    return r;
}

// Writes dx for y's elements lo .. hi (as span_sum4; dx's row at vec4 ds); where `masked`, only
// those.
fn write_span4(lo: u32, hi: u32, ys: u32, gs: u32, ds: u32, lane: u32, size: u32, r: f32, masked: bool) {
    for (var q = lo / 4u + lane; q < (hi + 3u) / 4u; q += size) {
        store4(q - ys + ds, grad4(y4[q], dy4[q - ys + gs], r), in_span4(q, lo, hi), masked);
    }
}

// Stores v at dx's vec4 d; where `masked`, only its components `inside` (as softmax.wgsl's
// store4).
fn store4(d: u32, v: vec4<f32>, inside: vec4<bool>, masked: bool) {
    if (!masked || all(inside)) {
        dx4[d] = v;
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (inside[j]) {
                dx4[d][j] = v[j];
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
// 4 elements and is read as the n4 vec4s that hold them, masked (softmax.wgsl's row_pass4).
fn row_pass4(wid: vec3<u32>, lid: u32, masked: bool) {
    let team = team_of(wid, lid);
    if (team.row >= p.rows) {
        return;
    }
    let start = base(0u) + team.row * p.cols;
    let span = vec2<u32>(start, start + p.cols);
    let y0 = start / 4u;
    let n4 = (span.y + 3u) / 4u - y0;
    let g0 = (base(1u) + team.row * p.cols) / 4u;
    let d0 = (base(2u) + team.row * p.cols) / 4u;
    if (ITEMS > 0u) {
        var ys: array<vec4<f32>, MAX_ITEMS>;
        var gs: array<vec4<f32>, MAX_ITEMS>;
        var part = vec4<f32>(0.0);
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            if (c < n4) {
                ys[k] = y4[y0 + c];
                gs[k] = dy4[g0 + c];
                let t = term4(ys[k], gs[k]);
                if (masked) {
                    part += select(vec4<f32>(0.0), t, in_span4(y0 + c, span.x, span.y));
                } else {
                    part += t;
                }
            }
        }
        let r = team_sum(sum_of(part), lid);
        for (var k = 0u; k < ITEMS; k++) {
            let c = team.lane + k * team.size;
            if (c < n4) {
                store4(d0 + c, grad4(ys[k], gs[k], r), in_span4(y0 + c, span.x, span.y), masked);
            }
        }
    } else {
        let r = team_sum(span_sum4(span.x, span.y, y0, g0, team.lane, team.size, masked), lid);
        write_span4(span.x, span.y, y0, g0, d0, team.lane, team.size, r, masked);
    }
}

// The split pair over the vec4 views (split_partials4, split_finish4; `masked`: the
// *_unaligned4 pair, as in softmax.wgsl).
fn chunk_partials4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let bounds = chunk_bounds(ch.within);
    let y0 = base(0u) + ch.row * p.cols;
    let gs = (base(1u) + ch.row * p.cols) / 4u;
    let r = team_sum(span_sum4(y0 + bounds.x, y0 + bounds.y, y0 / 4u, gs, ch.team.lane, ch.team.size, masked), lid);
    if (ch.team.lane == 0u) {
        partials[ch.index] = r;
    }
}

fn chunk_finish4(wid: vec3<u32>, lid: u32, masked: bool) {
    let ch = chunk_of(wid, lid);
    if (ch.index >= p.rows * p.chunks) {
        return;
    }
    let r = row_total(ch, lid);
    let bounds = chunk_bounds(ch.within);
    let y0 = base(0u) + ch.row * p.cols;
    let gs = (base(1u) + ch.row * p.cols) / 4u;
    let ds = (base(2u) + ch.row * p.cols) / 4u;
    write_span4(y0 + bounds.x, y0 + bounds.y, y0 / 4u, gs, ds, ch.team.lane, ch.team.size, r, masked);
}

@compute @workgroup_size(WG)
fn split_partials4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn split_finish4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_finish4(wid, lid, false);
}

@compute @workgroup_size(WG)
fn split_partials_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_partials4(wid, lid, true);
}

@compute @workgroup_size(WG)
fn split_finish_unaligned4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_finish4(wid, lid, true);
}

// Split rows in one pass over y and dy (`Tuning::backward_split_wait`; one_pass.wgsl has the
// scheme): a chunk's partial is its share of r (NaN stays NaN).
@group(0) @binding(4) var<storage, read_write> zeroed: array<atomic<u32>>;

const SYNC_WORDS: u32 = 2u;

// r of a row from its chunks' words, all of which have been stored. Called in uniform control
// flow by the whole workgroup.
fn synced_total(row: u32, lid: u32) -> f32 {
    var r = 0.0;
    for (var g = lid; g < p.chunks; g += SUM_BLOCK * WG) {
        var block = 0.0;
        for (var i = g; i < min(p.chunks, g + SUM_BLOCK * WG); i += WG) {
            block += stored_partial(row, i).x;
        }
        r += block;
    }
    return workgroup_sum4(vec4<f32>(r, 0.0, 0.0, 0.0), lid).x;
}

// One chunk of a split row, its y and dy held in registers (ITEMS vec4s of each per invocation).
// The one pass (`publish`) stores its share of r, counts itself in and waits at most `spin`
// loads for the row's other chunks; the finishing pass finds them all. Writes the chunk's
// output and returns true if the row's shares are all there.
fn fused_chunk(ch: Chunk, lid: u32, spin: u32, publish: bool) -> bool {
    let bounds = chunk_bounds4(ch.within);
    let n4 = bounds.y - bounds.x;
    let row4 = ch.row * (p.cols / 4u) + bounds.x;
    let y0 = base(0u) / 4u + row4;
    let g0 = base(1u) / 4u + row4;
    var ys: array<vec4<f32>, MAX_ITEMS>;
    var gs: array<vec4<f32>, MAX_ITEMS>;
    var part = vec4<f32>(0.0);
    for (var k = 0u; k < ITEMS; k++) {
        let c = ch.team.lane + k * ch.team.size;
        if (c < n4) {
            ys[k] = y4[y0 + c];
            gs[k] = dy4[g0 + c];
            part += term4(ys[k], gs[k]);
        }
    }
    let share = team_sum(sum_of(part), lid);
    if (publish && !arrive(ch, lid, spin, vec4<f32>(share, 0.0, 0.0, 0.0))) {
        return false;
    }
    let r = synced_total(ch.row, lid);
    let d0 = base(2u) / 4u + row4;
    for (var k = 0u; k < ITEMS; k++) {
        let c = ch.team.lane + k * ch.team.size;
        if (c < n4) {
            dx4[d0 + c] = grad4(ys[k], gs[k], r);
        }
    }
    return true;
}
