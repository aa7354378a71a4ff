//! Buffers of the caller's, filled with guard words around the operands, for the tests of the
//! encode forms on regions: an op must write its output regions and no other word.

use std::ops::Range;

use wgpu::util::DeviceExt;
use wgpu_softmax::{BufferRegion, Context};

use super::read_buffer;

/// The usage of an arena an op reads or writes through storage bindings (arenas can always be
/// copied from, to be read back).
pub fn usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST
}

/// What every word of an arena holds before an op runs, outside the operands.
pub const GUARD: u32 = 0xDEAD_BEEF;

/// One buffer of the caller's holding operands at given word offsets, [`GUARD`] elsewhere.
pub struct Arena {
    pub buffer: wgpu::Buffer,
    pub words: Vec<u32>,
}

impl Arena {
    /// An arena of `len` words with each `(offset, data)` placed at its word offset.
    pub fn new(
        ctx: &Context,
        len: usize,
        parts: &[(usize, &[u32])],
        usage: wgpu::BufferUsages,
    ) -> Self {
        let mut words = vec![GUARD; len];
        for &(offset, data) in parts {
            words[offset..offset + data.len()].copy_from_slice(data);
        }
        let buffer = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("arena"),
                contents: bytemuck::cast_slice(&words),
                usage: usage | wgpu::BufferUsages::COPY_SRC,
            });
        Self { buffer, words }
    }

    /// The region of `len` words at word `offset`.
    pub fn region(&self, offset: usize, len: usize) -> BufferRegion<'_> {
        self.buffer
            .slice((offset * 4) as u64..((offset + len) * 4) as u64)
            .into()
    }

    /// The region of bytes `range`, which need not start on a word.
    pub fn bytes(&self, range: Range<u64>) -> BufferRegion<'_> {
        self.buffer.slice(range).into()
    }

    /// Reads the arena back, asserts that no word outside `written` (word offset, length)
    /// changed, and returns the words of each of `written` as f32.
    pub fn written(&self, ctx: &Context, written: &[(usize, usize)], what: &str) -> Vec<Vec<f32>> {
        let written: Vec<Range<usize>> = written.iter().map(|&(at, len)| at..at + len).collect();
        let now: Vec<u32> = read_buffer(ctx, &self.buffer, self.words.len())
            .iter()
            .map(|v| v.to_bits())
            .collect();
        for (i, (&before, &after)) in self.words.iter().zip(&now).enumerate() {
            if !written.iter().any(|range| range.contains(&i)) {
                assert_eq!(
                    before, after,
                    "{what}: word {i} outside the regions changed"
                );
            }
        }
        written
            .iter()
            .map(|range| {
                now[range.clone()]
                    .iter()
                    .map(|&w| f32::from_bits(w))
                    .collect()
            })
            .collect()
    }
}
