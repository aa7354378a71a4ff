//! The WGSL kernels and the machinery every kernel shares: bind-group layouts, a pipeline cache
//! keyed by specialisation constants, binding windows for batches larger than one storage binding,
//! and dispatch over a 2-D grid when a dispatch exceeds the per-dimension workgroup limit.
//!
//! Each kernel family (one shader file) lives in its own module and only describes *what* to
//! dispatch; recording is done here, once, for all of them.

pub(crate) mod axis;
pub(crate) mod plan;
pub(crate) mod rowwise;

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

/// How a kernel accesses one binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Uniform,
    Read,
    ReadWrite,
}

/// Creates a bind-group layout whose binding `i` has access `entries[i]`, visible to compute.
pub(crate) fn bind_group_layout(
    device: &wgpu::Device,
    label: &str,
    entries: &[Access],
) -> wgpu::BindGroupLayout {
    let entries: Vec<_> = entries
        .iter()
        .enumerate()
        .map(|(i, access)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match access {
                    Access::Uniform => wgpu::BufferBindingType::Uniform,
                    Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}

/// One shader file: its module, compiled once, and the pipelines specialised from it, compiled on
/// first use and kept for the context's lifetime.
pub(crate) struct ShaderFamily {
    name: &'static str,
    module: wgpu::ShaderModule,
    layout: wgpu::PipelineLayout,
    bind_group_layout: wgpu::BindGroupLayout,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

/// Which normalisation a softmax-family kernel computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Normalization {
    Softmax,
    LogSoftmax,
}

impl Normalization {
    /// The `LOG` specialisation constant.
    pub(crate) fn constant(self) -> (&'static str, u32) {
        ("LOG", u32::from(self == Normalization::LogSoftmax))
    }
}

/// Every kernel family of a context, compiled once per context.
pub(crate) struct Kernels {
    pub softmax: rowwise::RowwiseFamily,
    pub backward: rowwise::RowwiseFamily,
    pub cross_entropy: rowwise::RowwiseFamily,
    pub jacobian: rowwise::RowwiseFamily,
    /// Softmax and its backward along an axis that is not the last.
    pub axis: axis::AxisFamily,
    /// A plain copy, the bandwidth reference of the benchmarks.
    pub copy: ShaderFamily,
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, caps: &plan::Capabilities) -> Self {
        let subgroups = caps.subgroup_size.is_some();
        let family = |desc| rowwise::RowwiseFamily::new(device, desc, subgroups);
        Self {
            softmax: family(&rowwise::SOFTMAX),
            backward: family(&rowwise::BACKWARD),
            cross_entropy: family(&rowwise::CROSS_ENTROPY),
            jacobian: family(&rowwise::JACOBIAN),
            axis: axis::AxisFamily::new(device),
            copy: ShaderFamily::new(
                device,
                "copy",
                include_str!("../../shaders/copy.wgsl"),
                &[Access::Uniform, Access::Read, Access::ReadWrite],
            ),
        }
    }
}

/// An entry point and its specialisation constants (name, value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub entry: &'static str,
    pub constants: Vec<(&'static str, u32)>,
}

impl ShaderFamily {
    pub(crate) fn new(
        device: &wgpu::Device,
        name: &'static str,
        source: &str,
        bindings: &[Access],
    ) -> Self {
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        // SAFETY: `create_shader_module_trusted` asks that no shader loop run forever once the
        // loop-bounding counters are gone. Every loop in `shaders/` counts an unsigned index up
        // by a step of at least 1 (1, a constant, `team.size` >= 1 since `SG` >= 1, or `WG`) to
        // a bound the host derives from a validated shape, and no index can wrap: bounds are
        // element counts within one binding (at most 2^29 f32, `MAX_BINDING_BYTES`) and steps
        // are at most `WG * SUM_BLOCK`. Bounds checks on buffers and arrays and the
        // integer-division checks stay on. Dropping the counters lets the compiler unroll and
        // vectorise the streamed loops (lavapipe: softmax and cross-entropy 8-14% faster on
        // 4096x4096 and 64x262144).
        let module = unsafe {
            device.create_shader_module_trusted(
                desc,
                wgpu::ShaderRuntimeChecks {
                    force_loop_bounding: false,
                    ..wgpu::ShaderRuntimeChecks::checked()
                },
            )
        };
        let bind_group_layout = bind_group_layout(device, name, bindings);
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        Self {
            name,
            module,
            layout,
            bind_group_layout,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline for `key`, compiling it the first time it is asked for.
    pub(crate) fn pipeline(
        &self,
        device: &wgpu::Device,
        key: &PipelineKey,
    ) -> Arc<wgpu::ComputePipeline> {
        let mut cache = self
            .pipelines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(pipeline) = cache.get(key) {
            return pipeline.clone();
        }
        let constants: Vec<(&str, f64)> = key
            .constants
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let label = format!("{}::{} {:?}", self.name, key.entry, key.constants);
        let pipeline = Arc::new(
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(&self.layout),
                module: &self.module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel writes workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            }),
        );
        cache.insert(key.clone(), pipeline.clone());
        pipeline
    }
}

/// A window onto part of a buffer: the binding starts at an offset aligned to the device's
/// storage-offset alignment, and `base` is the element index, inside the binding, where the data
/// begins. This lets a kernel address any row range of any buffer.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
    pub base: u32,
}

impl Window {
    /// The window covering `len` 32-bit elements starting at byte `start` of `buffer`, clamped
    /// to `max_size` bytes (only operands a kernel does not read are ever clamped: row blocks
    /// keep every operand a kernel reads within one binding).
    pub(crate) fn new(
        buffer: &wgpu::Buffer,
        start: u64,
        len: u64,
        align: u64,
        max_size: u64,
    ) -> Self {
        let offset = start / align * align;
        // Bindings must be non-empty and a multiple of 4 bytes; an empty range still binds one word.
        let size = (start - offset + len.max(1) * 4)
            .min(buffer.size() - offset)
            .min(max_size / 4 * 4);
        Self {
            buffer: buffer.clone(),
            offset,
            size,
            base: ((start - offset) / 4) as u32,
        }
    }

    fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: NonZeroU64::new(self.size),
        })
    }
}

/// One dispatch, ready to record: the pipeline, its uniform parameters and its storage windows
/// (bindings 1.. in order), and the number of workgroups.
pub(crate) struct Dispatch {
    /// The pipeline's entry point, named by [`Timestamps::EachDispatch`].
    pub entry: &'static str,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub params: Vec<u8>,
    pub windows: Vec<Window>,
    pub workgroups: u32,
}

/// The 2-D grid covering `workgroups` groups when one dimension may hold at most `max_dim`; the
/// kernels linearise it as `x + y * grid_x` and skip the surplus groups of the last row.
pub(crate) fn grid(workgroups: u32, max_dim: u32) -> (u32, u32) {
    if workgroups <= max_dim {
        (workgroups, 1)
    } else {
        (max_dim, workgroups.div_ceil(max_dim))
    }
}

/// How a recording is timed by timestamp queries.
pub(crate) enum Timestamps<'a> {
    /// Written at the start and end of the recording's one compute pass (either may be absent).
    Pass(wgpu::ComputePassTimestampWrites<'a>),
    /// Each dispatch recorded in a compute pass of its own, timed at its start and end.
    EachDispatch(&'a DispatchTimes),
}

/// Timestamp queries for [`Timestamps::EachDispatch`]: dispatch `i` of the recordings into it,
/// counted from the last [`DispatchTimes::clear`], writes queries `2i` and `2i + 1`.
pub(crate) struct DispatchTimes {
    pub queries: wgpu::QuerySet,
    /// Pairs of queries in `queries`.
    pub capacity: u32,
    /// The entry point of each dispatch recorded so far, in order.
    entries: Mutex<Vec<&'static str>>,
}

impl DispatchTimes {
    /// Room for `capacity` dispatches.
    pub(crate) fn new(device: &wgpu::Device, capacity: u32) -> Self {
        Self {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("wgpu-softmax dispatch timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * capacity,
            }),
            capacity,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The entry points recorded so far.
    pub(crate) fn entries(&self) -> Vec<&'static str> {
        self.lock().clone()
    }

    /// Forgets the dispatches recorded so far: the next one writes queries 0 and 1.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<&'static str>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Records `dispatches` into `encoder`, in order, in one compute pass (or, timed by
/// [`Timestamps::EachDispatch`], one pass each). The uniform parameter blocks are created per
/// recording: the encoder may be submitted much later, and a shared parameter buffer rewritten
/// by the queue would be seen by every earlier recorded dispatch.
///
/// # Errors
/// [`Error::DeviceLost`](crate::Error::DeviceLost) when a parameter block cannot be written
/// (the device went away while recording); [`Error::Internal`](crate::Error::Internal) when
/// [`DispatchTimes`] has no room left for the dispatches, before anything is recorded.
pub(crate) fn record(
    device: &wgpu::Device,
    family: &ShaderFamily,
    encoder: &mut wgpu::CommandEncoder,
    dispatches: &[Dispatch],
    timestamps: Option<Timestamps<'_>>,
) -> crate::Result<()> {
    // Everything the pass binds is made first, in a scope of its own, so that a resource the
    // device refuses is an error before anything reaches the caller's encoder.
    let bind_groups = crate::context::capture(device, || {
        let mut bind_groups = Vec::with_capacity(dispatches.len());
        for dispatch in dispatches {
            let params = parameter_block(device, &dispatch.params)?;
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            }];
            entries.extend(dispatch.windows.iter().enumerate().map(|(i, window)| {
                wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: window.binding(),
                }
            }));
            bind_groups.push(device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(family.name),
                layout: &family.bind_group_layout,
                entries: &entries,
            }));
        }
        Ok(bind_groups)
    })?;

    let max_dim = device.limits().max_compute_workgroups_per_dimension;
    let run = |pass: &mut wgpu::ComputePass<'_>, dispatch: &Dispatch, bind_group| {
        let (x, y) = grid(dispatch.workgroups, max_dim);
        pass.set_pipeline(&dispatch.pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    };
    let recorded = dispatches
        .iter()
        .zip(&bind_groups)
        .filter(|(d, _)| d.workgroups > 0);
    match timestamps {
        Some(Timestamps::EachDispatch(times)) => {
            let mut entries = times.lock();
            let count = recorded.clone().count();
            if entries.len() + count > times.capacity as usize {
                return Err(crate::Error::Internal(format!(
                    "room for the timestamps of {} dispatches, {} asked for",
                    times.capacity,
                    entries.len() + count
                )));
            }
            for (dispatch, bind_group) in recorded {
                let first = 2 * entries.len() as u32;
                entries.push(dispatch.entry);
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(dispatch.entry),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &times.queries,
                        beginning_of_pass_write_index: Some(first),
                        end_of_pass_write_index: Some(first + 1),
                    }),
                });
                run(&mut pass, dispatch, bind_group);
            }
        }
        timestamps => {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(family.name),
                timestamp_writes: match timestamps {
                    Some(Timestamps::Pass(writes)) => Some(writes),
                    _ => None,
                },
            });
            for (dispatch, bind_group) in recorded {
                run(&mut pass, dispatch, bind_group);
            }
        }
    }
    Ok(())
}

/// A uniform buffer holding `bytes`, written through a mapping at creation. Unlike
/// `create_buffer_init`, a mapping that fails (a destroyed device) is an error, not a panic.
fn parameter_block(device: &wgpu::Device, bytes: &[u8]) -> crate::Result<wgpu::Buffer> {
    let size = (bytes.len() as u64)
        .next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
        .max(16);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("wgpu-softmax params"),
        size,
        usage: wgpu::BufferUsages::UNIFORM,
        mapped_at_creation: true,
    });
    {
        let mut view = buffer
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| crate::Error::DeviceLost(e.to_string()))?;
        view.slice(..bytes.len()).copy_from_slice(bytes);
    }
    buffer.unmap();
    Ok(buffer)
}

/// Row blocks `(first_row, rows)` covering `rows` rows such that each block, plus the slack of an
/// aligned binding offset, fits one storage binding of `max_binding` bytes, and holds at most
/// `max_rows` rows (at least one).
pub(crate) fn row_blocks(
    rows: usize,
    cols: usize,
    max_binding: u64,
    align: u64,
    max_rows: usize,
) -> crate::Result<Vec<(usize, usize)>> {
    let row_bytes = cols as u64 * 4;
    let per_block = max_binding.saturating_sub(align) / row_bytes.max(1);
    if per_block == 0 {
        return Err(crate::Error::RowTooLong {
            cols,
            bytes: row_bytes,
            max_binding,
        });
    }
    // Element indices inside a binding are u32, and so is the row count of one dispatch.
    let per_block = per_block
        .min(u64::from(u32::MAX) / row_bytes.max(1))
        .min(max_rows as u64)
        .max(1) as usize;
    Ok((0..rows)
        .step_by(per_block)
        .map(|first| (first, per_block.min(rows - first)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{grid, row_blocks};

    #[test]
    fn row_blocks_fit_the_binding_and_the_row_cap() {
        // 10 rows of 100 bytes: 4 per 512-byte binding (less 64 bytes of alignment slack).
        assert_eq!(
            row_blocks(10, 25, 512, 64, usize::MAX).unwrap(),
            [(0, 4), (4, 4), (8, 2)]
        );
        // A cap below the binding's count wins; one above it changes nothing; 0 means 1.
        assert_eq!(
            row_blocks(10, 25, 512, 64, 3).unwrap(),
            [(0, 3), (3, 3), (6, 3), (9, 1)]
        );
        assert_eq!(row_blocks(5, 25, 512, 64, 9).unwrap(), [(0, 4), (4, 1)]);
        assert_eq!(row_blocks(2, 25, 512, 64, 0).unwrap(), [(0, 1), (1, 1)]);
        assert!(row_blocks(2, 200, 512, 64, usize::MAX).is_err());
    }

    #[test]
    fn grid_covers_every_workgroup_without_exceeding_the_limit() {
        for (groups, max) in [(1, 65535), (65535, 65535), (65536, 65535), (200_000, 65535)] {
            let (x, y) = grid(groups, max);
            assert!(x <= max && y <= max);
            assert!(u64::from(x) * u64::from(y) >= u64::from(groups));
            assert!(u64::from(x) * u64::from(y - 1) < u64::from(groups));
        }
    }
}
