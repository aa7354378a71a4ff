//! The crate's one error type.

/// Everything that can go wrong on the public path. Each variant names what was wrong and carries
/// the values involved, so a caller (or the runner) can print a one-line diagnosis.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter is available for the requested backends.
    #[error("no GPU adapter is available (backends: {backends})")]
    NoAdapter {
        /// The backends that were searched, as wgpu names them.
        backends: String,
    },
    /// `WGPU_ADAPTER_NAME` (or [`ContextOptions::adapter_name`](crate::ContextOptions)) names no
    /// adapter that exists.
    #[error("no adapter name contains {wanted:?}; available adapters: {available}")]
    AdapterNotFound {
        /// The requested (sub)string.
        wanted: String,
        /// The adapters that do exist.
        available: String,
    },
    /// The adapter refused the device request.
    #[error("requesting a device failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    /// A device (possibly the caller's) lacks a limit the kernels need.
    #[error("the device's limit {limit} is {actual}, but at least {needed} is needed")]
    InsufficientLimit {
        /// The limit's name as in [`wgpu::Limits`].
        limit: &'static str,
        /// What the kernels need.
        needed: u64,
        /// What the device offers.
        actual: u64,
    },
    /// `cols` (the softmax axis' length) was zero.
    #[error("cols (the softmax axis' length) must be at least 1")]
    ZeroCols,
    /// An axis the tensor's shape does not have ([`AxisLayout::new`](crate::AxisLayout::new)).
    #[error("axis {axis} is out of range for a tensor of rank {rank}")]
    AxisOutOfRange {
        /// The axis asked for (negative counts from the end).
        axis: isize,
        /// The tensor's rank.
        rank: usize,
    },
    /// A flat batch whose length is not a multiple of `cols`.
    #[error("{what} has {len} elements, which is not a multiple of cols = {cols}")]
    LengthNotMultiple {
        /// Which argument.
        what: &'static str,
        /// Its length in elements.
        len: usize,
        /// The row length.
        cols: usize,
    },
    /// An argument whose length must equal another's.
    #[error("{what} has {actual} elements, but {expected} are expected")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        actual: usize,
    },
    /// A buffer (or a region of one) smaller than the shape it is used with.
    #[error("buffer {what} holds {size} bytes, but {needed} are needed")]
    BufferTooSmall {
        /// Which argument.
        what: &'static str,
        /// Its size in bytes (the region's, for a [`BufferRegion`](crate::BufferRegion)).
        size: u64,
        /// The bytes the operation touches.
        needed: u64,
    },
    /// A buffer without a usage flag the operation needs.
    #[error("buffer {what} lacks the usage {missing:?}")]
    MissingUsage {
        /// Which argument.
        what: &'static str,
        /// The flags it lacks.
        missing: wgpu::BufferUsages,
    },
    /// Two arguments that must be distinct buffers are the same buffer (for regions: lie in the
    /// same buffer, whatever their ranges).
    #[error("{first} and {second} must be different buffers")]
    Aliased {
        /// The first argument.
        first: &'static str,
        /// The second argument.
        second: &'static str,
    },
    /// A region of a caller's buffer that does not start on an element boundary.
    #[error("{what} starts at byte {offset} of its buffer, which is not a multiple of {align}")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// The region's offset in bytes.
        offset: u64,
        /// The alignment it needs in bytes.
        align: u64,
    },
    /// A single row does not fit in one storage binding of the device.
    #[error("a row of {cols} columns ({bytes} bytes) exceeds the device's storage binding limit of {max_binding} bytes")]
    RowTooLong {
        /// The row length.
        cols: usize,
        /// The row's size in bytes.
        bytes: u64,
        /// The device's `max_storage_buffer_binding_size`.
        max_binding: u64,
    },
    /// One outer slab (`len x inner` elements) of an [`AxisLayout`](crate::AxisLayout) whose axis
    /// is not the last does not fit in one storage binding: the kernels bind every line of a
    /// slab at once.
    #[error("a slab of {len} x {inner} elements ({bytes} bytes) around the softmax axis exceeds the device's storage binding limit of {max_binding} bytes")]
    SlabTooLarge {
        /// The axis' length.
        len: usize,
        /// The product of the dimensions after the axis.
        inner: usize,
        /// The slab's size in bytes.
        bytes: u64,
        /// The largest storage binding the kernels use.
        max_binding: u64,
    },
    /// A device-resident tensor larger than one buffer may be.
    #[error("a tensor of {bytes} bytes exceeds the device's max_buffer_size of {max} bytes")]
    TensorTooLarge {
        /// The tensor's size in bytes.
        bytes: u64,
        /// The device's limit.
        max: u64,
    },
    /// The shape does not fit the 32-bit indexing of the kernels.
    #[error("{what} = {value} exceeds the supported maximum {max}")]
    ShapeTooLarge {
        /// Which dimension.
        what: &'static str,
        /// Its value.
        value: usize,
        /// The largest value supported.
        max: usize,
    },
    /// A class-index target outside `[0, classes)` that is not the ignore index.
    #[error("target {value} in row {row} is outside [0, {classes}) and is not ignore_index {ignore_index}")]
    TargetOutOfRange {
        /// The row holding the target.
        row: usize,
        /// The offending value.
        value: i64,
        /// The number of classes.
        classes: usize,
        /// The ignore index in force.
        ignore_index: i64,
    },
    /// `label_smoothing` outside `[0, 1]`.
    #[error("label_smoothing must lie in [0, 1], got {0}")]
    LabelSmoothing(f32),
    /// The softmax Jacobian was asked for more classes than its cap.
    #[error("softmax_jacobian supports at most {max} classes, got {cols}")]
    JacobianTooWide {
        /// The requested class count.
        cols: usize,
        /// The cap.
        max: usize,
    },
    /// A validation error raised by wgpu while running an operation.
    #[error("GPU validation error: {0}")]
    Validation(String),
    /// An internal error of wgpu or the driver (e.g. a shader the driver failed to compile).
    #[error("GPU internal error: {0}")]
    Internal(String),
    /// The device ran out of memory.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost; the context cannot be used any more.
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    /// Mapping a buffer for readback failed.
    #[error("reading back from the GPU failed: {0}")]
    Map(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
