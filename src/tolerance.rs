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

impl Tolerance {
    /// [`Tolerance::compare`] for a backward op over rows of `cols`, whose
    /// `dx_j = y_j (dy_j - r)` (softmax) or `dy_j - exp(y_j) r` (log-softmax) subtracts
    /// `p_j r` with `r = sum_k t_k` summed in f32 (`p_j = y_j` and `t_k = dy_k y_k`, or
    /// `p_j = exp(y_j)` and `t_k = dy_k`; both given per element). An element outside the
    /// tolerance still passes within `4 eps_f32 p_j sum_k |t_k|`, the rounding the kernels'
    /// blocked f32 sums leave where the terms' roundings fall either way: on long rows the
    /// cancellation in `r` can leave a correct sum's rounding past the tolerance, while a wrong
    /// formula or a lost block of terms fails either way. Terms built to round the same way at
    /// every addition can exceed it (see the README's accuracy notes).
    pub fn compare_backward(
        &self,
        got: &[f32],
        want: &[f64],
        [p, t]: [&[f64]; 2],
        cols: usize,
    ) -> Comparison {
        let mut cmp = self.compare(got, want);
        cmp.len_mismatch |= p.len() != want.len() || t.len() != want.len();
        if cmp.failures == 0 || cmp.len_mismatch || cols == 0 {
            return cmp;
        }
        let row_terms: Vec<f64> = t
            .chunks(cols)
            .map(|row| row.iter().map(|v| v.abs()).sum())
            .collect();
        cmp.failures = 0;
        cmp.first_failure = None;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let g = f64::from(g);
            let bound = 4.0 * f64::from(f32::EPSILON) * p[i].abs() * row_terms[i / cols];
            let within_summation = g.is_finite() && w.is_finite() && (g - w).abs() <= bound;
            if !self.accepts(g, w) && !within_summation {
                cmp.failures += 1;
                cmp.first_failure.get_or_insert((i, g, w));
            }
        }
        cmp
    }

    /// [`Tolerance::compare_backward`] with each `p_j` and `t_k` worked out from the backward
    /// op's inputs, rows of `cols`: `y` (softmax's output, or log-softmax's where `log`) and
    /// its upstream gradient `dy`.
    pub fn compare_backward_of(
        &self,
        got: &[f32],
        want: &[f64],
        [y, dy]: [&[f32]; 2],
        cols: usize,
        log: bool,
    ) -> Comparison {
        let p: Vec<f64> = y
            .iter()
            .map(|&y| {
                if log {
                    f64::from(y).exp()
                } else {
                    f64::from(y)
                }
            })
            .collect();
        let t: Vec<f64> = y
            .iter()
            .zip(dy)
            .map(|(&y, &dy)| {
                if log {
                    f64::from(dy)
                } else {
                    f64::from(dy) * f64::from(y)
                }
            })
            .collect();
        let mut cmp = self.compare_backward(got, want, [&p, &t], cols);
        cmp.len_mismatch |= dy.len() != y.len();
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

    #[test]
    fn backward_elements_may_err_by_what_f32_summation_allows() {
        let t = Tolerance::SOFTMAX;
        // Rows of 2: p = 0.5, sum |t| = 1000 allows 4 eps 0.5 1000 = 2.4e-4.
        let (p, terms) = ([0.5; 4], [500.0, -500.0, 1.0, 1.0]);
        let want = [0.3, 0.4, 0.3, 0.4];
        let cmp = t.compare_backward(&[0.3002, 0.4, 0.3002, 0.4], &want, [&p, &terms], 2);
        assert_eq!(cmp.failures, 1, "only the row whose terms are small fails");
        assert_eq!(cmp.first_failure.map(|f| f.0), Some(2));
        assert!(
            t.compare_backward(&[0.3, 0.4005, 0.3, 0.4], &want, [&p, &terms], 2)
                .failures
                == 1
        );
        assert!(
            t.compare_backward(&[f32::NAN, 0.4, 0.3, 0.4], &want, [&p, &terms], 2)
                .failures
                == 1
        );
    }

    #[test]
    fn backward_bounds_follow_from_the_ops_inputs() {
        let t = Tolerance::SOFTMAX;
        // Softmax: p = y = 0.5, t = dy y, sum |t| = 1000 in the first row, 1 in the second.
        let (y, dy) = ([0.5; 4], [1000.0, -1000.0, 1.0, 1.0]);
        let want = [0.3, 0.4, 0.3, 0.4];
        let got = [0.3002, 0.4, 0.3002, 0.4];
        let cmp = t.compare_backward_of(&got, &want, [&y, &dy], 2, false);
        assert_eq!(cmp.first_failure.map(|f| f.0), Some(2));
        assert_eq!(cmp.failures, 1);
        // Log-softmax: p = exp(y) = 0.5, t = dy.
        let log_y = [0.5f32.ln(); 4];
        let dy = [500.0, -500.0, 1.0, 1.0];
        let cmp = t.compare_backward_of(&got, &want, [&log_y, &dy], 2, true);
        assert_eq!(cmp.first_failure.map(|f| f.0), Some(2));
        assert_eq!(cmp.failures, 1);
        assert!(
            t.compare_backward_of(&got, &want, [&log_y, &dy[..3]], 2, true)
                .len_mismatch
        );
    }
}
