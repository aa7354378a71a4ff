//! The caller's memory in the `encode_*` forms: a whole buffer or a byte range of one, and the
//! checks every such argument goes through.

use crate::error::{Error, Result};
use crate::kernels::rowwise::Operand;
use crate::ops::Tensor;

/// Where an `encode_*` form reads or writes a matrix: the whole of one of the caller's buffers
/// (`&buffer`) or a byte range of it (`buffer.slice(offset..)`, any [`wgpu::BufferSlice`]), so
/// that data sub-allocated from a larger buffer needs no copy.
///
/// The data starts at the region's first byte, which must be a multiple of 4 bytes into the
/// buffer (an f32 or `i32`); the storage-offset alignment of the device does not apply, since
/// the kernels bind the aligned offset below and index from there. Regions of one buffer may be
/// read by several arguments of a call, but a buffer an op writes must be no other argument's,
/// whatever the ranges: wgpu tracks a storage buffer's use per buffer, not per range.
#[derive(Debug, Clone, Copy)]
pub struct BufferRegion<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl<'a> BufferRegion<'a> {
    /// The buffer the region lies in.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }

    /// The region's first byte in [`BufferRegion::buffer`].
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The region's length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The region as `width` 32-bit elements per row, rows contiguous.
    pub(crate) fn rows(self, width: usize) -> Operand<'a> {
        Operand::Rows {
            buffer: self.buffer,
            offset: self.offset,
            width,
        }
    }

    /// The region's first `len` words, the same for every row.
    pub(crate) fn shared(self, len: usize) -> Operand<'a> {
        Operand::Shared {
            buffer: self.buffer,
            offset: self.offset,
            len,
        }
    }

    /// Whether both regions lie in the same buffer.
    pub(crate) fn same_buffer(&self, other: &BufferRegion<'_>) -> bool {
        self.buffer == other.buffer
    }
}

impl<'a> From<&'a wgpu::Buffer> for BufferRegion<'a> {
    /// The whole buffer.
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Self {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }
}

impl<'a> From<wgpu::BufferSlice<'a>> for BufferRegion<'a> {
    /// The slice's bytes.
    fn from(slice: wgpu::BufferSlice<'a>) -> Self {
        Self {
            buffer: slice.buffer(),
            offset: slice.offset(),
            size: slice.size(),
        }
    }
}

impl<'a> From<&'a Tensor> for BufferRegion<'a> {
    /// The tensor's buffer.
    fn from(tensor: &'a Tensor) -> Self {
        tensor.buffer().into()
    }
}

/// Checks a caller's region: it has `usage`, starts on a word and holds `needed` bytes.
pub(crate) fn validate_region(
    what: &'static str,
    region: BufferRegion<'_>,
    needed: u64,
    usage: wgpu::BufferUsages,
) -> Result<()> {
    let missing = usage - region.buffer.usage();
    if !missing.is_empty() {
        return Err(Error::MissingUsage { what, missing });
    }
    if !region.offset.is_multiple_of(4) {
        return Err(Error::Misaligned {
            what,
            offset: region.offset,
            align: 4,
        });
    }
    if region.size < needed {
        return Err(Error::BufferTooSmall {
            what,
            size: region.size,
            needed,
        });
    }
    Ok(())
}

/// Checks the caller's regions of an encode form: each `(name, region, bytes)` needs `STORAGE`
/// and `bytes`, and the `written` one must not lie in the buffer of one of the `read` ones.
pub(crate) fn validate_encode(
    read: &[(&'static str, BufferRegion<'_>, u64)],
    written: (&'static str, BufferRegion<'_>, u64),
) -> Result<()> {
    let storage = wgpu::BufferUsages::STORAGE;
    for &(what, region, bytes) in read.iter().chain([&written]) {
        validate_region(what, region, bytes, storage)?;
    }
    let others: Vec<_> = read
        .iter()
        .map(|&(what, region, _)| (what, region))
        .collect();
    check_not_aliased(&others, (written.0, written.1))
}

/// [`Error::Aliased`] when the `written` region lies in the buffer of one of the `others`.
pub(crate) fn check_not_aliased(
    others: &[(&'static str, BufferRegion<'_>)],
    written: (&'static str, BufferRegion<'_>),
) -> Result<()> {
    match others
        .iter()
        .find(|(_, region)| region.same_buffer(&written.1))
    {
        Some(&(first, _)) => Err(Error::Aliased {
            first,
            second: written.0,
        }),
        None => Ok(()),
    }
}
