//! Softmax regression trained by full-batch gradient descent, twice: on the GPU (the example's
//! kernels around the library's fused cross-entropy, all recorded into one encoder) and on the
//! host in f64 through the library's reference cross-entropy, from the same initial parameters.
//!
//! Parameters are one `INPUTS x CLASSES` matrix: the weights, then the biases as the last row,
//! because every design matrix ends in a constant-1 column. The loss is the mean cross-entropy, so
//! one step is `params -= lr * x^T (softmax(x params) - onehot) / rows`.

use std::error::Error;

use wgpu_softmax::cpu::reference::cross_entropy_f64;
use wgpu_softmax::{
    wgpu, Context, CrossEntropyBuffers, CrossEntropyLoss, CrossEntropyOptions, GradDestination,
    GradOutput, TargetEncoding, Targets,
};

use crate::data::{Split, CLASSES, INPUTS};

pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The update kernel loops over every row in one invocation; software adapters end an invocation
/// silently after 65535 loop iterations, so the batch stays well below that.
pub const MAX_ROWS: usize = 32_768;

const WORKGROUP: usize = 64;

/// Small uniform weights in `[-0.01, 0.01)` from `seed` (SplitMix64, so the values are the same
/// on every platform and version), zero biases.
pub fn initial_params(seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut params: Vec<f32> = (0..(INPUTS - 1) * CLASSES)
        .map(|_| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02)
        .collect();
    params.resize(INPUTS * CLASSES, 0.0);
    params
}

/// The share of rows whose largest logit is at their label, with logits computed in f64.
pub fn accuracy(params: &[f64], split: &Split) -> f64 {
    let x: Vec<f64> = split.x.iter().map(|&v| f64::from(v)).collect();
    let logits = matmul(&x, params, split.rows(), INPUTS, CLASSES);
    let correct = logits
        .chunks_exact(CLASSES)
        .zip(&split.labels)
        .filter(|(row, &label)| {
            let best = (0..CLASSES)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .expect("at least one class");
            best as i32 == label
        })
        .count();
    correct as f64 / split.rows() as f64
}

/// `a (m x k) * b (k x n)`, row-major.
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for (a_row, out_row) in a.chunks_exact(k).zip(out.chunks_exact_mut(n)).take(m) {
        for (&a, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
            for (o, &b) in out_row.iter_mut().zip(b_row) {
                *o += a * b;
            }
        }
    }
    out
}

/// The host model: f64 parameters, f64 products, the library's f64 reference cross-entropy.
pub struct CpuModel {
    x: Vec<f64>,
    labels: Vec<i32>,
    params: Vec<f64>,
    learning_rate: f64,
}

impl CpuModel {
    pub fn new(split: &Split, initial: &[f32], learning_rate: f32) -> Self {
        assert_eq!(initial.len(), INPUTS * CLASSES, "parameter count");
        Self {
            x: split.x.iter().map(|&v| f64::from(v)).collect(),
            labels: split.labels.clone(),
            params: initial.iter().map(|&v| f64::from(v)).collect(),
            learning_rate: f64::from(learning_rate),
        }
    }

    fn rows(&self) -> usize {
        self.labels.len()
    }

    /// One gradient-descent step; returns the loss of the parameters before it.
    pub fn step(&mut self) -> Result<f64> {
        let rows = self.rows();
        let logits = matmul(&self.x, &self.params, rows, INPUTS, CLASSES);
        let out = cross_entropy_f64(
            &logits,
            CLASSES,
            Targets::IndicesI32(&self.labels),
            &CrossEntropyOptions::default(),
            GradOutput::One,
        )?;
        // out.grad is already divided by the row count (Reduction::Mean).
        let mut grad = vec![0.0; INPUTS * CLASSES];
        for (x_row, g_row) in self
            .x
            .chunks_exact(INPUTS)
            .zip(out.grad.chunks_exact(CLASSES))
        {
            for (&x, grad_row) in x_row.iter().zip(grad.chunks_exact_mut(CLASSES)) {
                for (d, &g) in grad_row.iter_mut().zip(g_row) {
                    *d += x * g;
                }
            }
        }
        for (p, d) in self.params.iter_mut().zip(grad) {
            *p -= self.learning_rate * d;
        }
        Ok(out.loss[0])
    }

    /// The loss of the current parameters.
    pub fn loss(&self) -> Result<f64> {
        let logits = matmul(&self.x, &self.params, self.rows(), INPUTS, CLASSES);
        let out = cross_entropy_f64(
            &logits,
            CLASSES,
            Targets::IndicesI32(&self.labels),
            &CrossEntropyOptions::default(),
            GradOutput::One,
        )?;
        Ok(out.loss[0])
    }

    pub fn params(&self) -> &[f64] {
        &self.params
    }
}

/// The GPU model. Every buffer, pipeline and bind group is made here, once; a step records three
/// passes into the caller's encoder and reads nothing back. Each step's loss is copied on the GPU
/// into a history buffer that is read only when asked for.
pub struct GpuModel {
    device: wgpu::Device,
    queue: wgpu::Queue,
    loss_fn: CrossEntropyLoss,
    rows: usize,
    labels: wgpu::Buffer,
    params: wgpu::Buffer,
    logits: wgpu::Buffer,
    loss: wgpu::Buffer,
    history: wgpu::Buffer,
    staging: wgpu::Buffer,
    forward: wgpu::ComputePipeline,
    update: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    steps: usize,
    max_steps: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Shape {
    rows: u32,
    inputs: u32,
    classes: u32,
    learning_rate: f32,
}

impl GpuModel {
    /// Uploads `split` and `initial`, and builds everything the steps use. At most `max_steps`
    /// steps can be taken (the size of the loss history).
    pub fn new(
        ctx: &Context,
        split: &Split,
        initial: &[f32],
        learning_rate: f32,
        max_steps: usize,
    ) -> Result<Self> {
        let rows = split.rows();
        if rows == 0 || rows > MAX_ROWS {
            return Err(format!("{rows} rows; the GPU model takes 1 to {MAX_ROWS}").into());
        }
        if initial.len() != INPUTS * CLASSES {
            return Err(format!("{} initial parameters", initial.len()).into());
        }
        let device = ctx.device().clone();
        let queue = ctx.queue().clone();
        let loss_fn = ctx.cross_entropy_loss(CLASSES, &CrossEntropyOptions::default())?;
        checked(&device, || {
            use wgpu::BufferUsages as U;
            let buffer = |label: &str, size: usize, usage: U| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size as u64,
                    usage,
                    mapped_at_creation: false,
                })
            };
            let filled = |label: &str, bytes: &[u8], usage: U| {
                let b = buffer(label, bytes.len(), usage | U::COPY_DST);
                queue.write_buffer(&b, 0, bytes);
                b
            };
            let shape = Shape {
                rows: rows as u32,
                inputs: INPUTS as u32,
                classes: CLASSES as u32,
                learning_rate,
            };
            let shape = filled("shape", bytemuck::bytes_of(&shape), U::UNIFORM);
            let x = filled("x", bytemuck::cast_slice(&split.x), U::STORAGE);
            let labels = filled("labels", bytemuck::cast_slice(&split.labels), U::STORAGE);
            let params = filled(
                "params",
                bytemuck::cast_slice(initial),
                U::STORAGE | U::COPY_SRC,
            );
            let logits = buffer("logits", rows * CLASSES * 4, U::STORAGE);
            // The library copies the reduced loss into it, hence COPY_DST.
            let loss = buffer("loss", 4, U::STORAGE | U::COPY_DST | U::COPY_SRC);
            let history = buffer(
                "loss history",
                max_steps.max(1) * 4,
                U::COPY_DST | U::COPY_SRC,
            );
            let staging_size = (max_steps.max(1) * 4).max(INPUTS * CLASSES * 4);
            let staging = buffer("readback", staging_size, U::MAP_READ | U::COPY_DST);

            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("softmax regression"),
                source: wgpu::ShaderSource::Wgsl(include_str!("regression.wgsl").into()),
            });
            let entry = |binding, ty| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty,
                count: None,
            };
            let storage = |read_only| wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            };
            let uniform = wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            };
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("softmax regression"),
                entries: &[
                    entry(0, uniform),
                    entry(1, storage(true)),
                    entry(2, storage(false)),
                    entry(3, storage(false)),
                ],
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("softmax regression"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = |entry_point| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry_point),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry_point),
                    compilation_options: Default::default(),
                    cache: None,
                })
            };
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("softmax regression"),
                layout: &layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: shape.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: x.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: params.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 3,
                        resource: logits.as_entire_binding(),
                    },
                ],
            });
            Ok(Self {
                forward: pipeline("forward"),
                update: pipeline("update"),
                device: device.clone(),
                queue: queue.clone(),
                loss_fn,
                rows,
                labels,
                params,
                logits,
                loss,
                history,
                staging,
                bind_group,
                steps: 0,
                max_steps,
            })
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Records `count` steps into one encoder and submits it; returns without waiting.
    pub fn train(&mut self, count: usize) -> Result<()> {
        if self.steps + count > self.max_steps {
            return Err(format!("more than {} steps", self.max_steps).into());
        }
        let device = self.device.clone();
        checked(&device, || {
            let mut encoder = device.create_command_encoder(&Default::default());
            for step in self.steps..self.steps + count {
                self.record_step(&mut encoder, step)?;
            }
            self.queue.submit([encoder.finish()]);
            Ok(())
        })?;
        self.steps += count;
        Ok(())
    }

    /// One step: logits = x params; the fused loss and dLoss/dLogits over the logits; the update;
    /// the loss appended to the history.
    fn record_step(&self, encoder: &mut wgpu::CommandEncoder, step: usize) -> Result<()> {
        self.record_forward(encoder);
        self.loss_fn
            .encode(encoder, self.loss_buffers(GradDestination::InPlace), 1.0)?;
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.update);
            pass.set_bind_group(0, &self.bind_group, &[]);
            pass.dispatch_workgroups(workgroups(INPUTS * CLASSES), 1, 1);
        }
        let offset = (step * 4) as u64;
        encoder.copy_buffer_to_buffer(&self.loss, 0, &self.history, offset, 4);
        Ok(())
    }

    fn record_forward(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.forward);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(workgroups(self.rows * CLASSES), 1, 1);
    }

    fn loss_buffers<'a>(&'a self, grad: GradDestination<'a>) -> CrossEntropyBuffers<'a> {
        CrossEntropyBuffers {
            logits: (&self.logits).into(),
            targets: (&self.labels).into(),
            target_encoding: TargetEncoding::Indices,
            loss: (&self.loss).into(),
            grad,
            rows: self.rows,
        }
    }

    /// The loss before the latest step (waits for the GPU).
    pub fn last_loss(&self) -> Result<f32> {
        let last = self.steps.checked_sub(1).ok_or("no step taken yet")?;
        Ok(self.read(&self.history, last, 1)?[0])
    }

    /// The loss before each step taken so far.
    pub fn loss_history(&self) -> Result<Vec<f32>> {
        self.read(&self.history, 0, self.steps)
    }

    /// The loss of the current parameters, without a step.
    pub fn loss(&self) -> Result<f32> {
        let device = self.device.clone();
        checked(&device, || {
            let mut encoder = device.create_command_encoder(&Default::default());
            self.record_forward(&mut encoder);
            self.loss_fn
                .encode(&mut encoder, self.loss_buffers(GradDestination::None), 1.0)?;
            self.queue.submit([encoder.finish()]);
            Ok(())
        })?;
        Ok(self.read(&self.loss, 0, 1)?[0])
    }

    /// The current parameters, `INPUTS x CLASSES`.
    pub fn params(&self) -> Result<Vec<f32>> {
        self.read(&self.params, 0, INPUTS * CLASSES)
    }

    /// Copies `len` f32 from `source`, starting at element `first`, and waits for them.
    fn read(&self, source: &wgpu::Buffer, first: usize, len: usize) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let bytes = (len * 4) as u64;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(source, (first * 4) as u64, &self.staging, 0, bytes);
        let submission = self.queue.submit([encoder.finish()]);
        let slice = self.staging.slice(..bytes);
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        })?;
        receiver.recv()??;
        let values = bytemuck::cast_slice::<u8, f32>(&slice.get_mapped_range()?).to_vec();
        self.staging.unmap();
        Ok(values)
    }
}

fn workgroups(invocations: usize) -> u32 {
    invocations.div_ceil(WORKGROUP) as u32
}

/// Runs `work` with wgpu's validation and out-of-memory errors returned rather than left to the
/// default handler, which panics.
fn checked<T>(device: &wgpu::Device, work: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = work();
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    if let Some(error) = validation.or(oom) {
        return Err(error.to_string().into());
    }
    result
}
