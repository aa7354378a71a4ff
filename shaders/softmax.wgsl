// Row-wise softmax and log-softmax (common.wgsl is prepended).
//
// Entry points, chosen on the host by row length and adapter (src/kernels/plan.rs):
//   rows        one team per row (TEAM: an invocation, a subgroup, or the workgroup); each lane
//               strides over the row and the row's (max, sum) is combined over the team. With
//               ITEMS > 0 the row is held in registers between the phases: one read, one write.
//   split_*     a row spread over several workgroups: split_partials writes one (max, sum) pair
//               per chunk, split_normalize combines a row's pairs with the online-normalizer rule
//               and writes its chunk. Keeps the GPU busy on 4 rows.

@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<vec2<f32>>;

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
    } else {
        for (var c = team.lane; c < p.cols; c += team.size) {
            m = max(m, max_key(src[s0 + c]));
        }
    }
    m = team_max(m, lid);

    var sum = 0.0;
    if (is_finite(m)) {
        if (ITEMS > 0u) {
            for (var k = 0u; k < ITEMS; k++) {
                let e = exp_shifted(vals[k], m);
                sum += e;
                if (!LOG) {
                    vals[k] = e;
                }
            }
        } else {
            for (var c0 = team.lane; c0 < p.cols; c0 += team.size * SUM_BLOCK) {
                let stop = min(p.cols, c0 + team.size * SUM_BLOCK);
                var part = 0.0;
                for (var c = c0; c < stop; c += team.size) {
                    part += exp_shifted(src[s0 + c], m);
                }
                sum += part;
            }
        }
    }
    sum = team_sum(sum, lid);
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

@compute @workgroup_size(WG)
fn split_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = linear_group(wid);
    if (g >= p.rows * p.chunks) {
        return;
    }
    let row = g / p.chunks;
    let bounds = chunk_bounds(g % p.chunks);
    let s0 = base(0u) + row * p.cols;

    var m = neg_inf();
    for (var c = bounds.x + lid; c < bounds.y; c += WG) {
        m = max(m, max_key(src[s0 + c]));
    }
    m = workgroup_max(m, lid);
    var sum = 0.0;
    if (is_finite(m)) {
        for (var c0 = bounds.x + lid; c0 < bounds.y; c0 += WG * SUM_BLOCK) {
            let stop = min(bounds.y, c0 + WG * SUM_BLOCK);
            var part = 0.0;
            for (var c = c0; c < stop; c += WG) {
                part += exp_shifted(src[s0 + c], m);
            }
            sum += part;
        }
    }
    sum = workgroup_sum4(vec4<f32>(sum, 0.0, 0.0, 0.0), lid).x;
    if (lid == 0u) {
        partials[g] = vec2<f32>(m, sum);
    }
}

@compute @workgroup_size(WG)
fn split_normalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = linear_group(wid);
    if (g >= p.rows * p.chunks) {
        return;
    }
    let row = g / p.chunks;
    let first = row * p.chunks;

    // Combine the row's chunk partials: M = max m_i, S = sum s_i * exp(m_i - M).
    var m = neg_inf();
    for (var i = lid; i < p.chunks; i += WG) {
        m = max(m, partials[first + i].x);
    }
    m = workgroup_max(m, lid);
    var sum = 0.0;
    if (is_finite(m)) {
        for (var i = lid; i < p.chunks; i += WG) {
            let part = partials[first + i];
            sum += part.y * rescale(part.x, m);
        }
    }
    sum = workgroup_sum4(vec4<f32>(sum, 0.0, 0.0, 0.0), lid).x;
    let scale = normaliser(sum);

    let bounds = chunk_bounds(g % p.chunks);
    let s0 = base(0u) + row * p.cols;
    let d0 = base(1u) + row * p.cols;
    for (var c = bounds.x + lid; c < bounds.y; c += WG) {
        dst[d0 + c] = finish(src[s0 + c], m, scale);
    }
}
