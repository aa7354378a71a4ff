// Backward of softmax and log-softmax (common.wgsl is prepended).
//
//   softmax:      dx_j = y_j * (dy_j - r),       r = sum_k dy_k * y_k
//   log-softmax:  dx_j = dy_j - exp(y_j) * r,    r = sum_k dy_k
//
// One reduction per row; the entry points are those of softmax.wgsl. Values are not special-cased:
// NaN in y or dy propagates through r to its row, and exp(-inf) is 0 by the explicit select.

@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;

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

@compute @workgroup_size(WG)
fn split_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let team = team_of(wid, lid);
    let g = team.row;
    if (g >= p.rows * p.chunks) {
        return;
    }
    let row = g / p.chunks;
    let bounds = chunk_bounds(g % p.chunks);
    let y0 = base(0u) + row * p.cols;
    let g0 = base(1u) + row * p.cols;
    var r = 0.0;
    for (var c0 = bounds.x + team.lane; c0 < bounds.y; c0 += team.size * SUM_BLOCK) {
        let stop = min(bounds.y, c0 + team.size * SUM_BLOCK);
        var part = 0.0;
        for (var c = c0; c < stop; c += team.size) {
            part += term(y[y0 + c], dy[g0 + c]);
        }
        r += part;
    }
    r = team_sum(r, lid);
    if (team.lane == 0u) {
        partials[g] = r;
    }
}

@compute @workgroup_size(WG)
fn split_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let team = team_of(wid, lid);
    let g = team.row;
    if (g >= p.rows * p.chunks) {
        return;
    }
    let row = g / p.chunks;
    let first = row * p.chunks;
    var r = 0.0;
    for (var i = team.lane; i < p.chunks; i += team.size) {
        r += partials[first + i];
    }
    r = team_sum(r, lid);
    let bounds = chunk_bounds(g % p.chunks);
    let y0 = base(0u) + row * p.cols;
    let g0 = base(1u) + row * p.cols;
    let d0 = base(2u) + row * p.cols;
    for (var c = bounds.x + team.lane; c < bounds.y; c += team.size) {
        dx[d0 + c] = grad(y[y0 + c], dy[g0 + c], r);
    }
}
