// A plain copy, the bandwidth limit the row-wise kernels are measured against: each element is
// read once and written once, four at a time, by a 2-D grid of 256-wide workgroups. `copy` gives
// each invocation one vec4 (neighbouring invocations touch neighbouring addresses, as GPUs like);
// `copy_runs` gives each invocation a run of `per` consecutive vec4s (as CPU-based adapters like).

struct CopyParams {
    len4: u32,   // vec4 elements to copy
    grid_x: u32, // workgroups along x
    per: u32,    // copy_runs: vec4s per invocation
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> cp: CopyParams;
@group(0) @binding(1) var<storage, read> copy_src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> copy_dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn copy(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * cp.grid_x) * 256u + lid;
    if (i < cp.len4) {
        copy_dst[i] = copy_src[i];
    }
}

@compute @workgroup_size(256)
fn copy_runs(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let start = ((wid.x + wid.y * cp.grid_x) * 256u + lid) * cp.per;
    let stop = min(start + cp.per, cp.len4);
    for (var i = start; i < stop; i++) {
        copy_dst[i] = copy_src[i];
    }
}
