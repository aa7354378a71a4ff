// Subgroup reductions, included only on devices with subgroup operations.

fn subgroup_max(v: f32) -> f32 {
    return subgroupMax(v);
}

fn subgroup_sum4(v: vec4<f32>) -> vec4<f32> {
    return subgroupAdd(v);
}
