// Stand-ins on devices without subgroup operations, where SG = 1: a subgroup of one invocation.
// The planner never selects TEAM = 1 there.

fn subgroup_max(v: f32) -> f32 {
    return v;
}

fn subgroup_sum4(v: vec4<f32>) -> vec4<f32> {
    return v;
}
