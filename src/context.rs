//! Adapter and device selection, or adoption of the caller's device; the state every operation
//! shares (kernels, limits, scratch buffers); error capture and readback.

use std::sync::{Arc, Condvar, Mutex, Weak};

use crate::error::{Error, Result};
use crate::kernels::plan::{Capabilities, Tuning};
use crate::kernels::Kernels;

/// The most bytes one kernel binding covers (2 GiB, 2^29 f32). Larger batches are split into
/// blocks of rows like batches past a device's own binding limit; indices and loop counters in
/// the shaders then stay far below 2^32 and cannot wrap.
pub(crate) const MAX_BINDING_BYTES: u64 = 1 << 31;

/// How to pick the adapter. The defaults follow wgpu's environment variables.
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// Backends to search; `None` reads `WGPU_BACKEND` (all backends when unset).
    pub backends: Option<wgpu::Backends>,
    /// A case-insensitive substring of the adapter's name; `None` reads `WGPU_ADAPTER_NAME`.
    pub adapter_name: Option<String>,
    /// Kernel-choice table; `None` picks the default for the adapter's type.
    pub tuning: Option<Tuning>,
}

/// A wgpu device and queue with the softmax kernels compiled for them.
///
/// Cheap to clone (it is a handle) and `Send + Sync`: operations may run from several threads at
/// once. Pipelines are compiled once per context, on first use of each specialisation.
#[derive(Clone)]
pub struct Context {
    pub(crate) gpu: Arc<Gpu>,
}

pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub tuning: Tuning,
    /// What the kernel choice depends on: subgroups, the loop budget of software adapters.
    pub caps: Capabilities,
    pub kernels: Kernels,
    /// Stand-ins bound where a kernel variant neither reads nor writes a binding (read-only and
    /// read-write uses need distinct buffers).
    pub unused_read: wgpu::Buffer,
    pub unused_write: wgpu::Buffer,
    /// Why the device was lost, once it has been.
    lost: LostSlot,
    /// Host-form staging buffers, reused across calls; one set per concurrent call.
    pub scratch: Mutex<Vec<crate::ops::Scratch>>,
    /// The softmax the Jacobian kernel reads, regrown when a call needs more; each Jacobian's
    /// softmax pass is followed at once by its Jacobian pass, so calls recorded one after
    /// another share it.
    pub jacobian_probabilities: Mutex<wgpu::Buffer>,
    /// Polls the device for the async forms' readbacks.
    poller: Poller,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("adapter", &self.gpu.info.name)
            .field("backend", &self.gpu.info.backend)
            .finish_non_exhaustive()
    }
}

/// The limits the kernels cannot do without. Every WebGPU device meets them; GL ES downlevel
/// devices, and devices a caller requested with lowered limits, may not. Checking them up front
/// turns what would be a validation failure deep inside pipeline creation into a typed error that
/// names the limit.
const NEEDED_INVOCATIONS: u32 = 64;
/// `red_max` and `red_sum` in `shaders/common.wgsl`: 256 f32 plus 256 vec4<f32>.
const NEEDED_WORKGROUP_STORAGE: u32 = 256 * 4 + 256 * 16;

/// Storage buffers the widest kernel family binds: its operands plus the split-row partials.
fn needed_storage_buffers() -> u32 {
    use crate::kernels::rowwise::{BACKWARD, CROSS_ENTROPY, JACOBIAN, SOFTMAX};
    [&SOFTMAX, &BACKWARD, &CROSS_ENTROPY, &JACOBIAN]
        .iter()
        .map(|family| family.operands.len() as u32 + 1)
        .max()
        .unwrap_or(0)
}

// Operations run from several threads on one context; losing either bound would be a breaking
// change, so it is checked at compile time.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Context>();
    shareable::<crate::ops::Tensor>();
    shareable::<crate::training::CrossEntropyLoss>();
    shareable::<crate::training::TargetTensor>();
};

impl Context {
    /// Picks an adapter as `WGPU_BACKEND` and `WGPU_ADAPTER_NAME` say and creates a device on it.
    ///
    /// Without `WGPU_ADAPTER_NAME` a hardware adapter is preferred (discrete, then integrated,
    /// then virtual) and a software adapter (lavapipe, llvmpipe, WARP) is used when there is none.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter exists, [`Error::AdapterNotFound`] when the name
    /// matches none, [`Error::RequestDevice`] when the device request fails.
    pub async fn new() -> Result<Self> {
        Self::with_options(ContextOptions::default()).await
    }

    /// Blocking form of [`Context::new`].
    pub fn new_blocking() -> Result<Self> {
        pollster::block_on(Self::new())
    }

    /// Like [`Context::new`], with explicit options.
    pub async fn with_options(options: ContextOptions) -> Result<Self> {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(backends) = options.backends {
            descriptor.backends = backends;
        }
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        let adapter = select_adapter(&instance, backends, options.adapter_name).await?;

        let wanted =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-softmax"),
                required_features: wanted,
                // Large batches want the largest buffers and bindings the adapter has.
                required_limits: adapter.limits(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await?;
        // wgpu's default handler panics. Errors of our own operations are caught by error
        // scopes; anything else (e.g. a fault in a caller's submission on our device) must not
        // abort the caller's process.
        device.on_uncaptured_error(Arc::new(|error| {
            eprintln!("wgpu-softmax: uncaptured GPU error: {error}");
        }));
        Self::build(device, queue, options.tuning)
    }

    /// Adopts a device and queue the caller created, so operations run where the caller's own
    /// buffers live.
    ///
    /// The context installs the device's lost callback (wgpu keeps one per device), to report
    /// [`Error::DeviceLost`] from later calls. A callback the caller set before is replaced; one
    /// the caller sets afterwards replaces the contexts'. Several contexts on one device all
    /// learn of a loss: each one's callback takes over the contexts of the one it replaces.
    ///
    /// # Errors
    /// [`Error::InsufficientLimit`] when the device lacks a limit the kernels need.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        Self::build(device, queue, None)
    }

    /// Like [`Context::from_device`] with an explicit kernel-choice table.
    pub fn from_device_with_tuning(
        device: wgpu::Device,
        queue: wgpu::Queue,
        tuning: Tuning,
    ) -> Result<Self> {
        Self::build(device, queue, Some(tuning))
    }

    fn build(device: wgpu::Device, queue: wgpu::Queue, tuning: Option<Tuning>) -> Result<Self> {
        let limits = device.limits();
        let storage_buffers = needed_storage_buffers();
        check_limit(
            "max_storage_buffers_per_shader_stage",
            storage_buffers,
            limits.max_storage_buffers_per_shader_stage,
        )?;
        // The parameter block, the storage buffers, one group.
        check_limit(
            "max_bindings_per_bind_group",
            storage_buffers + 1,
            limits.max_bindings_per_bind_group,
        )?;
        check_limit(
            "max_uniform_buffers_per_shader_stage",
            1,
            limits.max_uniform_buffers_per_shader_stage,
        )?;
        check_limit("max_bind_groups", 1, limits.max_bind_groups)?;
        check_limit(
            "max_compute_workgroup_storage_size",
            NEEDED_WORKGROUP_STORAGE,
            limits.max_compute_workgroup_storage_size,
        )?;
        check_limit(
            "max_compute_workgroups_per_dimension",
            1,
            limits.max_compute_workgroups_per_dimension,
        )?;
        check_limit(
            "max_compute_invocations_per_workgroup",
            NEEDED_INVOCATIONS,
            limits.max_compute_invocations_per_workgroup,
        )?;
        check_limit(
            "max_compute_workgroup_size_x",
            NEEDED_INVOCATIONS,
            limits.max_compute_workgroup_size_x,
        )?;
        let info = device.adapter_info();
        let tuning = tuning.unwrap_or_else(|| Tuning::for_device_type(info.device_type));
        let caps = Capabilities {
            // The kernels need the size: a subgroup per row to plan the dispatch, and workgroup
            // reductions to know which invocations hold a subgroup's result. Devices whose
            // subgroup size varies (from pipeline to pipeline) run kernels without subgroup
            // operations.
            subgroup_size: (tuning.subgroups != 0
                && device.features().contains(wgpu::Features::SUBGROUP)
                && info.subgroup_min_size == info.subgroup_max_size
                && info.subgroup_min_size >= 1)
                .then_some(info.subgroup_min_size),
            loop_budget: (info.device_type == wgpu::DeviceType::Cpu)
                .then_some(crate::kernels::plan::SOFTWARE_LOOP_BUDGET),
        };
        let tuning = tuning.clamped(&limits, caps.subgroup_size);
        let lost = Arc::new(Mutex::new(None));
        watch_for_loss(&device, &lost);
        // A device that cannot compile the kernels (missing limits, a driver fault) must be an
        // error here, not a panic in wgpu's default handler on the caller's device.
        let (kernels, unused_read, unused_write, jacobian_probabilities) =
            capture(&device, || {
                let storage = |label| {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(label),
                        size: 16,
                        usage: wgpu::BufferUsages::STORAGE,
                        mapped_at_creation: false,
                    })
                };
                Ok((
                    Kernels::new(&device, &caps),
                    storage("wgpu-softmax unused binding"),
                    storage("wgpu-softmax unused binding"),
                    storage("wgpu-softmax jacobian probabilities"),
                ))
            })?;
        Ok(Self {
            gpu: Arc::new(Gpu {
                device,
                queue,
                info,
                limits,
                tuning,
                caps,
                kernels,
                unused_read,
                unused_write,
                lost,
                scratch: Mutex::new(Vec::new()),
                jacobian_probabilities: Mutex::new(jacobian_probabilities),
                poller: Poller::default(),
            }),
        })
    }

    /// The adapter in use: its name, type, driver and backend.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    /// The backend in use (Vulkan, Metal, Dx12, Gl).
    pub fn backend(&self) -> wgpu::Backend {
        self.gpu.info.backend
    }

    /// The device the kernels run on.
    pub fn device(&self) -> &wgpu::Device {
        &self.gpu.device
    }

    /// The queue operations are submitted to.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.gpu.queue
    }

    /// The kernel-choice table in force.
    pub fn tuning(&self) -> Tuning {
        self.gpu.tuning
    }

    /// What the kernel choice depends on: the subgroup size (when fixed) and the loop budget of
    /// software adapters.
    pub fn capabilities(&self) -> Capabilities {
        self.gpu.caps
    }

    /// The strategy the softmax kernels use for `rows x cols` (host forms and tensors, whose
    /// rows start at a multiple of 16 bytes when `cols` is a multiple of 4, and whose buffers
    /// end on a whole `vec4`). With [`Tuning::unaligned_items`](crate::Tuning::unaligned_items),
    /// rows that are not a multiple of 4 columns are planned as the aligned rows of the `vec4`s
    /// that hold them, up to 3 columns more.
    pub fn strategy(&self, rows: usize, cols: usize) -> crate::Strategy {
        let gpu = &self.gpu;
        gpu.kernels
            .softmax
            .choose(gpu, rows, cols, cols, true, true)
            .0
    }

    /// Elements per load and store in the kernels for rows of `cols` columns in host forms and
    /// tensors: 4 (`vec4`) when `cols` is a multiple of 4 and the tuning allows it, else 1.
    /// (Rows of other widths that the softmax-family, backward and cross-entropy kernels stream
    /// or split, as [`Context::strategy`] says, or hold in registers with
    /// [`Tuning::unaligned_items`](crate::Tuning::unaligned_items), are read as the `vec4`s that
    /// hold them, their ends masked, where the tuning allows `vec4`s.)
    pub fn vector_width(&self, cols: usize) -> u32 {
        self.gpu.tuning.vector_for(cols, true)
    }

    /// A one-line description of the adapter, e.g. for logs.
    pub fn describe(&self) -> String {
        let info = &self.gpu.info;
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            info.name, info.backend, info.device_type, info.driver, info.driver_info
        )
    }
}

fn check_limit(limit: &'static str, needed: u32, actual: u32) -> Result<()> {
    if actual < needed {
        return Err(Error::InsufficientLimit {
            limit,
            needed: u64::from(needed),
            actual: u64::from(actual),
        });
    }
    Ok(())
}

/// Every adapter of `backends`, for `info` listings.
pub async fn enumerate_adapters(backends: Option<wgpu::Backends>) -> Vec<wgpu::AdapterInfo> {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if let Some(backends) = backends {
        descriptor.backends = backends;
    }
    let backends = descriptor.backends;
    let instance = wgpu::Instance::new(descriptor);
    instance
        .enumerate_adapters(backends)
        .await
        .iter()
        .map(wgpu::Adapter::get_info)
        .collect()
}

/// Hardware before software; wgpu's own `initialize_adapter_from_env` panics when
/// `WGPU_ADAPTER_NAME` matches nothing, so the name is matched here.
async fn select_adapter(
    instance: &wgpu::Instance,
    backends: wgpu::Backends,
    name: Option<String>,
) -> Result<wgpu::Adapter> {
    let adapters = instance.enumerate_adapters(backends).await;
    let name = name.or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok());
    if let Some(wanted) = name.filter(|n| !n.is_empty()) {
        let lower = wanted.to_lowercase();
        let available = adapters
            .iter()
            .map(|a| {
                let info = a.get_info();
                format!("{} ({:?})", info.name, info.backend)
            })
            .collect::<Vec<_>>();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&lower))
            .ok_or_else(|| Error::AdapterNotFound {
                wanted,
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            });
    }
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    adapters
        .into_iter()
        .min_by_key(rank)
        .ok_or_else(|| Error::NoAdapter {
            backends: format!("{backends:?}"),
        })
}

/// Why a device was lost, once it has been.
type LostReason = Mutex<Option<String>>;

/// Where a context learns why its device was lost.
type LostSlot = Arc<LostReason>;

/// Records `reason` in `slot` unless a reason is there already.
fn record_loss(slot: &LostReason, reason: &str) {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| reason.to_string());
}

/// The contexts a device's lost callback reports to.
///
/// wgpu keeps one lost callback per device, so a second context on a device replaces the
/// first's. The replaced callback is dropped inside that `set_device_lost_callback` call, on the
/// same thread: its `Drop` hands its contexts over to the callback replacing it (through
/// [`HANDOVER`]), so every context on the device learns of a loss. A callback dropped any other
/// way (the caller set their own, or the device is gone) hands nothing over.
struct LossSubscribers(Arc<Mutex<Vec<Weak<LostReason>>>>);

thread_local! {
    /// The subscribers handed over by a callback replaced on this thread, while a context
    /// installs its own.
    static HANDOVER: std::cell::RefCell<Option<Vec<Weak<LostReason>>>> =
        const { std::cell::RefCell::new(None) };
}

impl LossSubscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<LostReason>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every context still alive why the device was lost.
    fn notify(&self, reason: &str) {
        for slot in self.lock().drain(..) {
            if let Some(slot) = slot.upgrade() {
                record_loss(&slot, reason);
            }
        }
    }
}

impl Drop for LossSubscribers {
    fn drop(&mut self) {
        let mut subscribers = std::mem::take(&mut *self.lock());
        // `try_with`: a callback dropped while this thread exits has no one to hand over to.
        let _ = HANDOVER.try_with(|handover| {
            if let Some(list) = handover.borrow_mut().as_mut() {
                list.append(&mut subscribers);
            }
        });
    }
}

/// Installs the device's lost callback so that it records the loss in `slot`, and in the slots
/// of the contexts whose callback it replaces.
fn watch_for_loss(device: &wgpu::Device, slot: &LostSlot) {
    let subscribers = Arc::new(Mutex::new(vec![Arc::downgrade(slot)]));
    let callback = LossSubscribers(subscribers.clone());
    HANDOVER.with(|handover| *handover.borrow_mut() = Some(Vec::new()));
    device.set_device_lost_callback(move |reason, message| {
        callback.notify(&format!("{reason:?}: {message}"));
    });
    let handed_over = HANDOVER
        .with(|handover| handover.borrow_mut().take())
        .unwrap_or_default();
    let mut list = subscribers.lock().unwrap_or_else(|p| p.into_inner());
    list.extend(handed_over.into_iter().filter(|s| s.strong_count() > 0));
    // A loss reported between installing the callback and the handover reached `slot` alone.
    let reported = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(reason) = reported {
        for other in list.iter().filter_map(Weak::upgrade) {
            record_loss(&other, &reason);
        }
    }
}

impl Gpu {
    /// Fails if the device has been lost.
    pub fn check_alive(&self) -> Result<()> {
        // wgpu reports a destroyed device through the lost callback only from its maintenance,
        // and silently ignores work on it until then; a non-blocking poll runs that maintenance
        // so a device destroyed since the last call is seen here, not as a hang or garbage later.
        let _ = self.device.poll(wgpu::PollType::Poll);
        match &*self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => Err(Error::DeviceLost(reason.clone())),
            None => Ok(()),
        }
    }

    /// The alignment of storage-binding offsets.
    pub fn storage_align(&self) -> u64 {
        u64::from(self.limits.min_storage_buffer_offset_alignment)
    }

    /// The largest storage binding, in bytes: the device's limit, and never more than
    /// [`MAX_BINDING_BYTES`] so that every element index inside a binding fits the shaders' u32
    /// arithmetic with room to spare.
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            .min(MAX_BINDING_BYTES)
    }

    /// [`capture`] for an operation of this context: fails at once if the device was lost.
    pub fn scoped<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_alive()?;
        // A lost device explains a validation error that follows it better than the error.
        capture(&self.device, work).map_err(|error| match self.check_alive() {
            Err(lost) if matches!(error, Error::Validation(_) | Error::Internal(_)) => lost,
            _ => error,
        })
    }

    /// Waits for `buffer` (MAP_READ) to be mapped after `submission` and copies its first
    /// `len` f32 into `out`. `wait` says whether the calling thread may block on the device.
    pub async fn read_mapped(
        &self,
        buffer: &wgpu::Buffer,
        submission: wgpu::SubmissionIndex,
        out: &mut [f32],
        wait: Wait,
    ) -> Result<()> {
        self.read_mapped_parts(buffer, submission, &mut [(0, out)], wait)
            .await
    }

    /// [`Gpu::read_mapped`] for several pieces of one buffer at once: each `(byte offset, out)`
    /// receives `out.len()` f32 from that offset. One mapping serves them all.
    pub async fn read_mapped_parts(
        &self,
        buffer: &wgpu::Buffer,
        submission: wgpu::SubmissionIndex,
        parts: &mut [(u64, &mut [f32])],
        wait: Wait,
    ) -> Result<()> {
        let bytes = parts
            .iter()
            .map(|(offset, out)| offset + (out.len() * 4) as u64)
            .max()
            .unwrap_or(0);
        if bytes == 0 {
            return Ok(());
        }
        let slice = buffer.slice(..bytes);
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        // The receiver is only dropped if the caller's future was; nothing to report then.
        match wait {
            Wait::Block => {
                slice.map_async(wgpu::MapMode::Read, move |result| {
                    let _ = sender.send(result);
                });
                let poll = wgpu::PollType::Wait {
                    submission_index: Some(submission),
                    timeout: None,
                };
                self.device.poll(poll).map_err(|e| self.poll_error(e))?;
            }
            Wait::Background => {
                // The mapping callback only fires while the device is polled: the context's
                // polling thread does that, so the caller's executor is never blocked.
                let ticket = self.poller.ticket(&self.device)?;
                slice.map_async(wgpu::MapMode::Read, move |result| {
                    let _ = sender.send(result);
                    drop(ticket);
                });
            }
        }
        let mapped = receiver
            .receive()
            .await
            .ok_or_else(|| Error::Map("the mapping callback was dropped".into()))?;
        if let Err(error) = mapped {
            self.check_alive()?;
            return Err(Error::Map(error.to_string()));
        }
        {
            // A device destroyed while the readback waited destroys the buffer too.
            let view = match slice.get_mapped_range() {
                Ok(view) => view,
                Err(error) => {
                    self.check_alive()?;
                    return Err(Error::Map(error.to_string()));
                }
            };
            for (offset, out) in parts.iter_mut() {
                let start = *offset as usize;
                let end = start + out.len() * 4;
                out.copy_from_slice(bytemuck::cast_slice(&view[start..end]));
            }
        }
        buffer.unmap();
        Ok(())
    }

    fn poll_error(&self, error: wgpu::PollError) -> Error {
        match self.check_alive() {
            Err(lost) => lost,
            Ok(()) => Error::DeviceLost(error.to_string()),
        }
    }
}

/// The buffer cached in `slot`, first replaced by `make()` when it holds fewer than `needed`
/// bytes. `make` runs in an error scope of its own, so that a buffer the device refuses never
/// takes the slot (its size would still say it is big enough, failing every later call). A
/// replaced buffer lives on while the recordings that bind it do.
pub(crate) fn cached_buffer(
    device: &wgpu::Device,
    slot: &Mutex<wgpu::Buffer>,
    needed: u64,
    make: impl FnOnce() -> wgpu::Buffer,
) -> Result<wgpu::Buffer> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    if slot.size() < needed {
        *slot = capture(device, || Ok(make()))?;
    }
    Ok(slot.clone())
}

/// Runs `work` inside validation and out-of-memory error scopes of `device` and turns a captured
/// error into [`Error`]. wgpu-core reports errors when the call is made, so the scopes resolve
/// immediately.
pub(crate) fn capture<T>(device: &wgpu::Device, work: impl FnOnce() -> Result<T>) -> Result<T> {
    // An error no scope catches goes to the device's handler, which for a caller's device is
    // wgpu's default: a panic. So every filter there is gets a scope.
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    // A few wgpu helpers (e.g. `create_buffer_init`, which the kernel recorder uses for its
    // parameter blocks) panic instead of reporting when the device is lost between our check
    // and the call. That must not unwind through the caller's code: it is contained here and
    // reported as the device loss it is (`scoped` maps it once the lost callback has run).
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a wgpu call panicked");
            Err(Error::Internal(message.to_string()))
        });
    let validation = pollster::block_on(validation.pop());
    let oom = pollster::block_on(oom.pop());
    let internal = pollster::block_on(internal.pop());
    if let Some(error) = oom {
        return Err(Error::OutOfMemory(error.to_string()));
    }
    if let Some(error) = validation {
        return Err(Error::Validation(error.to_string()));
    }
    if let Some(error) = internal {
        return Err(Error::Internal(error.to_string()));
    }
    result
}

/// One thread per context that polls the device while async readbacks wait for their mapping
/// callbacks (which wgpu runs only from a poll). It starts at the first async readback, sleeps
/// while none is waiting, and ends when the context is dropped. A thread per readback would cost
/// a spawn per call and, with many calls in flight, as many threads.
#[derive(Default)]
struct Poller {
    shared: Arc<PollerShared>,
    /// Whether the thread runs (it is started on first use).
    started: Mutex<bool>,
}

#[derive(Default)]
struct PollerShared {
    state: Mutex<PollerState>,
    wake: Condvar,
}

#[derive(Default)]
struct PollerState {
    /// Readbacks whose mapping callback has not run yet.
    waiting: usize,
    /// Set when the context is dropped.
    closed: bool,
}

/// A readback the polling thread waits for; dropped by its mapping callback.
pub(crate) struct PollTicket(Arc<PollerShared>);

impl Drop for PollTicket {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl PollerShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, PollerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Poller {
    /// Registers a readback and makes sure the thread polls `device` until its ticket is dropped.
    fn ticket(&self, device: &wgpu::Device) -> Result<PollTicket> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if !*started {
            let shared = self.shared.clone();
            let device = device.clone();
            std::thread::Builder::new()
                .name("wgpu-softmax poll".into())
                .spawn(move || Self::run(&shared, &device))
                .map_err(|e| Error::Internal(format!("cannot start the polling thread: {e}")))?;
            *started = true;
        }
        drop(started);
        self.shared.lock().waiting += 1;
        self.shared.wake.notify_one();
        Ok(PollTicket(self.shared.clone()))
    }

    fn run(shared: &PollerShared, device: &wgpu::Device) {
        loop {
            {
                let mut state = shared.lock();
                while state.waiting == 0 && !state.closed {
                    state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.closed {
                    return;
                }
            }
            // Waits for everything submitted so far, then runs the callbacks of the mappings
            // it completed. A mapping requested after this poll began is served by the next
            // round. A poll that fails (a lost device) has run the callbacks with errors; the
            // pause only keeps a waiter that is not answered from spinning.
            if device.poll(wgpu::PollType::wait_indefinitely()).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// Whether a readback may block the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Poll the device on this thread (the blocking API).
    Block,
    /// Let the context's polling thread poll, and await (the async API).
    Background,
}
