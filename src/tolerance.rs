//! Comparing GPU results with the f64 reference.

/// An accuracy bound: an element passes when it is within `abs` absolutely **or** within `rel`
/// relative to the larger magnitude (`approx::relative_eq`). Non-finite values must match
/// exactly: NaN where the reference is NaN, the same infinity where it is infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute bound.
    pub abs: f64,
    /// Relative bound.
    pub rel: f64,
}

impl Tolerance {
    /// Softmax and its backward: 1e-6 absolute or 1e-5 relative.
    pub const SOFTMAX: Tolerance = Tolerance {
        abs: 1e-6,
        rel: 1e-5,
    };
    /// Log-softmax: 1e-5 absolute or 1e-5 relative.
    pub const LOG_SOFTMAX: Tolerance = Tolerance {
        abs: 1e-5,
        rel: 1e-5,
    };

    /// Whether `got` is acceptable for `want`.
    pub fn accepts(&self, got: f64, want: f64) -> bool {
        if want.is_nan() || got.is_nan() {
            return want.is_nan() && got.is_nan();
        }
        if want.is_infinite() || got.is_infinite() {
            return got == want;
        }
        approx::relative_eq!(got, want, epsilon = self.abs, max_relative = self.rel)
    }

    /// Compares element-wise; see [`Comparison`].
    pub fn compare(&self, got: &[f32], want: &[f64]) -> Comparison {
        let mut cmp = Comparison {
            len_mismatch: got.len() != want.len(),
            ..Comparison::default()
        };
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let g = f64::from(g);
            if g.is_finite() && w.is_finite() {
                let abs = (g - w).abs();
                cmp.max_abs = cmp.max_abs.max(abs);
                // Where |want| < abs / rel the absolute bound governs, and a relative error there
                // says nothing (a log-probability near 0, a gradient entry near 0).
                if w.abs() * self.rel >= self.abs {
                    cmp.max_rel = cmp.max_rel.max(abs / w.abs());
                }
            }
            if !self.accepts(g, w) {
                cmp.failures += 1;
                cmp.first_failure.get_or_insert((i, g, w));
            }
        }
        cmp
    }
}

/// The outcome of [`Tolerance::compare`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Comparison {
    /// Largest absolute error over elements where both are finite.
    pub max_abs: f64,
    /// Largest relative error over elements where the relative bound governs
    /// (`|want| >= abs / rel`).
    pub max_rel: f64,
    /// Elements outside the tolerance.
    pub failures: usize,
    /// The first failing element: (index, got, want).
    pub first_failure: Option<(usize, f64, f64)>,
    /// The slices had different lengths.
    pub len_mismatch: bool,
}

impl Comparison {
    /// Whether every element passed and the lengths matched.
    pub fn passed(&self) -> bool {
        self.failures == 0 && !self.len_mismatch
    }
}

#[cfg(test)]
mod tests {
    use super::Tolerance;

    #[test]
    fn non_finite_values_must_match_exactly() {
        let t = Tolerance::SOFTMAX;
        assert!(t.accepts(f64::NAN, f64::NAN));
        assert!(!t.accepts(0.0, f64::NAN));
        assert!(!t.accepts(f64::NAN, 0.0));
        assert!(t.accepts(f64::NEG_INFINITY, f64::NEG_INFINITY));
        assert!(!t.accepts(-1e30, f64::NEG_INFINITY));
    }

    #[test]
    fn bounds_are_absolute_or_relative() {
        let t = Tolerance::SOFTMAX;
        assert!(t.accepts(0.5 + 4e-6, 0.5));
        assert!(!t.accepts(0.5 + 2e-5, 0.5));
        assert!(t.accepts(1e-9, 0.0));
        let cmp = t.compare(&[0.5, 0.25], &[0.5, 0.3]);
        assert_eq!(cmp.failures, 1);
        assert_eq!(cmp.first_failure.map(|f| f.0), Some(1));
        assert!(!cmp.passed());
    }
}
