//! Small, named types that parametrise the operations.

/// How per-row losses are combined, as in PyTorch's `reduction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Reduction {
    /// One loss per row.
    None,
    /// The (weighted) mean over rows that are not ignored.
    #[default]
    Mean,
    /// The sum over rows.
    Sum,
}

/// Targets of a cross-entropy loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Targets<'a> {
    /// One class index per row (`rows` values); `ignore_index` marks rows to skip.
    Indices(&'a [i64]),
    /// One class index per row, 32-bit.
    IndicesI32(&'a [i32]),
    /// A probability distribution per row, shaped like the logits (`rows * cols` values).
    Probabilities(&'a [f32]),
}

/// The options of [`cross_entropy`](crate::Context::cross_entropy), with PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOptions<'a> {
    /// A weight per class (`cols` values), or `None` for all ones.
    pub weight: Option<&'a [f32]>,
    /// Rows whose index target equals this are ignored (index targets only).
    pub ignore_index: i64,
    /// How the per-row losses are combined.
    pub reduction: Reduction,
    /// Label smoothing `e` in `[0, 1]`: the target becomes `(1 - e) * q + e / C`.
    pub label_smoothing: f32,
}

impl Default for CrossEntropyOptions<'_> {
    fn default() -> Self {
        Self {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
        }
    }
}

/// The upstream gradient of a loss (`dL/dloss`), as a loss's backward receives it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GradOutput<'a> {
    /// `1.0`: the gradient of the loss itself.
    #[default]
    One,
    /// A scalar multiplier, for [`Reduction::Mean`] and [`Reduction::Sum`].
    Scalar(f32),
    /// One multiplier per row, for [`Reduction::None`].
    PerRow(&'a [f32]),
}
