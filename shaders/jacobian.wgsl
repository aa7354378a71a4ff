// Per-row softmax Jacobian J_ij = s_i (delta_ij - s_j) from the row's probabilities s
// (common.wgsl is prepended). Rows are at most 1024 classes wide; one team (an invocation, a
// subgroup or the workgroup) writes a row's C x C block.

@group(0) @binding(1) var<storage, read> probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> jac: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;

fn write_block(row: u32, first: u32, step: u32) {
    let n = p.cols * p.cols;
    let s0 = base(0u) + row * p.cols;
    let j0 = base(1u) + row * n;
    for (var k = first; k < n; k += step) {
        let i = k / p.cols;
        let j = k % p.cols;
        let si = probs[s0 + i];
        jac[j0 + k] = select(0.0, si, i == j) - si * probs[s0 + j];
    }
}

@compute @workgroup_size(WG)
fn rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let team = team_of(wid, lid);
    if (team.row < p.rows) {
        write_block(team.row, team.lane, team.size);
    }
}
