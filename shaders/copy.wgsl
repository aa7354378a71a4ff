// A plain copy, the bandwidth limit the row-wise kernels are measured against: each element is
// read once and written once, four at a time, by a 2-D grid of 256-wide workgroups.

struct CopyParams {
    len4: u32,   // vec4 elements to copy
    grid_x: u32, // workgroups along x
    _pad0: u32,
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
