// Softmax regression's own kernels: the forward product and the parameter update. The bias is the
// weight of a constant-1 input column, so both are plain matrix products.
//
// One invocation per output element and no workgroup memory: on software adapters barriers are
// costly, and each invocation's loop (over `inputs` or over `rows`) stays far below the 65535
// iterations after which those drivers silently end an invocation.

struct Shape {
    rows: u32,
    inputs: u32,
    classes: u32,
    learning_rate: f32,
}

@group(0) @binding(0) var<uniform> shape: Shape;
// rows x inputs
@group(0) @binding(1) var<storage, read> x: array<f32>;
// inputs x classes: the weights, then the biases as the last row
@group(0) @binding(2) var<storage, read_write> params: array<f32>;
// rows x classes: the logits, then, after the fused cross-entropy, dLoss/dLogits
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

// logits = x params
@compute @workgroup_size(64)
fn forward(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i >= shape.rows * shape.classes {
        return;
    }
    let r = i / shape.classes;
    let c = i % shape.classes;
    var acc = 0.0;
    for (var k = 0u; k < shape.inputs; k++) {
        acc += x[r * shape.inputs + k] * params[k * shape.classes + c];
    }
    logits[i] = acc;
}

// params -= learning_rate * x^T g, with g (in `logits`) already divided by the row count. Each
// invocation owns one parameter, so the step is taken in place without a gradient buffer.
@compute @workgroup_size(64)
fn update(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if i >= shape.inputs * shape.classes {
        return;
    }
    let k = i / shape.classes;
    let c = i % shape.classes;
    var acc = 0.0;
    for (var r = 0u; r < shape.rows; r++) {
        acc += x[r * shape.inputs + k] * logits[r * shape.classes + c];
    }
    params[i] -= shape.learning_rate * acc;
}
