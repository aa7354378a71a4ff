//! Where the softmax axis lies in a row-major tensor of any rank.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// A row-major tensor seen as `[outer, len, inner]` around its softmax axis: `len` is the axis'
/// length, `outer` the product of the dimensions before it, `inner` the product of those after
/// it. Element `k` of line `(o, i)` lies at `o * len * inner + k * inner + i`.
///
/// The last axis (`inner == 1`) is the row layout every op takes as `cols`; the `*_along` forms
/// also take any other axis, such as the classes of `[N, C, H, W]` (axis 1), on the device,
/// without a transpose.
///
/// ```
/// use wgpu_softmax::AxisLayout;
/// let layout = AxisLayout::new(&[8, 21, 64, 64], 1)?; // [N, C, H, W], softmax over C
/// assert_eq!((layout.outer(), layout.len(), layout.inner()), (8, 21, 64 * 64));
/// assert_eq!(AxisLayout::new(&[8, 21, 64, 64], -3)?, layout); // counted from the end
/// # Ok::<(), wgpu_softmax::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AxisLayout {
    outer: usize,
    len: usize,
    inner: usize,
}

impl AxisLayout {
    /// The layout of axis `axis` of a tensor of shape `shape`; a negative `axis` counts from the
    /// end, as PyTorch's `dim` does (-1 is the last axis). A 0-d tensor (`shape = []`) is one
    /// element, with axis 0 or -1.
    ///
    /// # Errors
    /// [`Error::AxisOutOfRange`] for an axis the shape does not have, [`Error::ZeroCols`] when
    /// the axis has length 0, [`Error::ShapeTooLarge`] when the element count overflows.
    pub fn new(shape: &[usize], axis: isize) -> Result<Self> {
        let rank = shape.len();
        let out_of_range = || Error::AxisOutOfRange { axis, rank };
        let signed_rank = isize::try_from(rank.max(1)).map_err(|_| out_of_range())?;
        let index = if axis < 0 { axis + signed_rank } else { axis };
        if !(0..signed_rank).contains(&index) {
            return Err(out_of_range());
        }
        if rank == 0 {
            return Self::from_parts(1, 1, 1);
        }
        let index = index as usize;
        let product = |dims: &[usize]| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or(Error::ShapeTooLarge {
                    what: "shape",
                    value: usize::MAX,
                    max: usize::MAX,
                })
        };
        Self::from_parts(
            product(&shape[..index])?,
            shape[index],
            product(&shape[index + 1..])?,
        )
    }

    /// `[outer, len, inner]` directly.
    ///
    /// # Errors
    /// [`Error::ZeroCols`] when `len` is 0, [`Error::ShapeTooLarge`] when the element count
    /// overflows.
    pub fn from_parts(outer: usize, len: usize, inner: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::ZeroCols);
        }
        let layout = Self { outer, len, inner };
        match outer.checked_mul(len).and_then(|n| n.checked_mul(inner)) {
            Some(_) => Ok(layout),
            None => Err(Error::ShapeTooLarge {
                what: "outer",
                value: outer,
                max: usize::MAX / len / inner.max(1),
            }),
        }
    }

    /// `rows` rows of `cols` columns: the softmax axis last.
    pub(crate) fn rows(rows: usize, cols: usize) -> Result<Self> {
        Self::from_parts(rows, cols, 1)
    }

    /// The product of the dimensions before the axis.
    pub fn outer(&self) -> usize {
        self.outer
    }

    /// The axis' length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The product of the dimensions after the axis (1 for the last axis).
    pub fn inner(&self) -> usize {
        self.inner
    }

    /// The number of elements, `outer * len * inner`.
    pub fn numel(&self) -> usize {
        self.outer * self.len * self.inner
    }

    /// The number of lines along the axis, `outer * inner`: the rows of [`AxisLayout::to_rows`].
    pub fn lines(&self) -> usize {
        self.outer * self.inner
    }

    /// Whether the tensor has no elements (`outer` or `inner` is 0; `len` never is).
    pub fn is_empty(&self) -> bool {
        self.numel() == 0
    }

    /// Elements of one outer slab, `len * inner`.
    pub(crate) fn slab(&self) -> usize {
        self.len * self.inner
    }

    /// `data` with the axis moved last: `[outer * inner, len]` rows, line `(o, i)` at row
    /// `o * inner + i`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] unless `data` holds [`AxisLayout::numel`] elements.
    pub fn to_rows<T: Copy + Default + Send + Sync>(&self, data: &[T]) -> Result<Vec<T>> {
        crate::validate::same_len("data", self.numel(), data.len())?;
        if self.inner == 1 || self.is_empty() {
            return Ok(data.to_vec());
        }
        let mut rows = vec![T::default(); data.len()];
        // Each slab `[len, inner]` becomes `[inner, len]`, transposed in tiles that stay in
        // cache, slabs in parallel.
        let (len, inner) = (self.len, self.inner);
        data.par_chunks_exact(self.slab())
            .zip(rows.par_chunks_exact_mut(self.slab()))
            .for_each(|(slab, rows)| transpose::transpose(slab, rows, inner, len));
        Ok(rows)
    }

    /// The inverse of [`AxisLayout::to_rows`]: rows `[outer * inner, len]` back into the
    /// layout, written into `out`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] unless `rows` and `out` hold [`AxisLayout::numel`] elements;
    /// `out` is then untouched.
    pub fn rows_into<T: Copy + Send + Sync>(&self, rows: &[T], out: &mut [T]) -> Result<()> {
        crate::validate::same_len("rows", self.numel(), rows.len())?;
        crate::validate::same_len("out", self.numel(), out.len())?;
        if self.inner == 1 || self.is_empty() {
            out.copy_from_slice(rows);
            return Ok(());
        }
        let (len, inner) = (self.len, self.inner);
        rows.par_chunks_exact(self.slab())
            .zip(out.par_chunks_exact_mut(self.slab()))
            .for_each(|(rows, slab)| transpose::transpose(rows, slab, len, inner));
        Ok(())
    }

    /// [`AxisLayout::rows_into`] into a new vector.
    ///
    /// # Errors
    /// As [`AxisLayout::rows_into`].
    pub fn from_rows<T: Copy + Default + Send + Sync>(&self, rows: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); rows.len()];
        self.rows_into(rows, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_count_from_either_end() {
        let l = AxisLayout::new(&[2, 3, 4, 5], 1).unwrap();
        assert_eq!((l.outer(), l.len(), l.inner()), (2, 3, 20));
        assert_eq!(AxisLayout::new(&[2, 3, 4, 5], -3).unwrap(), l);
        let last = AxisLayout::new(&[2, 3, 4, 5], -1).unwrap();
        assert_eq!((last.outer(), last.len(), last.inner()), (24, 5, 1));
        let first = AxisLayout::new(&[2, 3, 4, 5], 0).unwrap();
        assert_eq!((first.outer(), first.len(), first.inner()), (1, 2, 60));
        let scalar = AxisLayout::new(&[], -1).unwrap();
        assert_eq!((scalar.outer(), scalar.len(), scalar.inner()), (1, 1, 1));
        assert_eq!(AxisLayout::new(&[], 0).unwrap(), scalar);
        let empty = AxisLayout::new(&[0, 3, 4], 1).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.lines(), 0);
    }

    #[test]
    fn bad_axes_and_shapes_are_typed_errors() {
        for (shape, axis, rank) in [(&[2, 3][..], 2, 2), (&[2, 3], -3, 2), (&[], 1, 0)] {
            assert!(matches!(
                AxisLayout::new(shape, axis),
                Err(Error::AxisOutOfRange { axis: a, rank: r }) if a == axis && r == rank
            ));
        }
        assert!(matches!(
            AxisLayout::new(&[2, 0, 3], 1),
            Err(Error::ZeroCols)
        ));
        assert!(matches!(
            AxisLayout::new(&[usize::MAX, 2, 2], 1),
            Err(Error::ShapeTooLarge { .. })
        ));
        assert!(matches!(
            AxisLayout::new(&[2, 2, usize::MAX, 2], 1),
            Err(Error::ShapeTooLarge { .. })
        ));
    }

    #[test]
    fn rows_move_the_axis_last_and_back() {
        // [2, 3, 2]: element (o, k, i) holds 100 o + 10 k + i.
        let layout = AxisLayout::new(&[2, 3, 2], 1).unwrap();
        let data: Vec<u32> = (0..2)
            .flat_map(|o| (0..3).flat_map(move |k| (0..2).map(move |i| 100 * o + 10 * k + i)))
            .collect();
        let rows = layout.to_rows(&data).unwrap();
        assert_eq!(rows, [0, 10, 20, 1, 11, 21, 100, 110, 120, 101, 111, 121]);
        assert_eq!(layout.from_rows(&rows).unwrap(), data);
        let last = AxisLayout::new(&[2, 3, 2], -1).unwrap();
        assert_eq!(last.to_rows(&data).unwrap(), data);
        assert!(matches!(
            layout.to_rows(&data[1..]),
            Err(Error::LengthMismatch {
                what: "data",
                expected: 12,
                actual: 11
            })
        ));
    }
}
