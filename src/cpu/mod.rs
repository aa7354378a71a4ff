//! CPU implementations of every operation.
//!
//! * [`reference`](mod@reference) is the f64 oracle: straightforward loops, all arithmetic in `f64`, used to
//!   judge everything else.
//! * [`fast`](mod@fast) is the production `f32` path: rayon over blocks of rows, loops shaped so that the
//!   compiler vectorises them (exp included), with an AVX2+FMA build chosen at run time.
//!
//! Both validate their arguments through `crate::validate` before producing any output, so
//! they fail with the same errors as the GPU operations, and both follow the same conventions for
//! special values: a row containing NaN or `+inf`, or made only of `-inf`, yields NaN throughout;
//! otherwise a `-inf` entry has probability exactly 0.

pub mod fast;
pub mod reference;

pub use crate::validate::JACOBIAN_MAX_COLS;
pub use reference::CrossEntropyOutput;

#[cfg(test)]
pub(crate) mod test_util {
    /// A small deterministic generator (SplitMix64), so tests need no extra dependency and every
    /// failure reproduces.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed)
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `[0, 1)`.
        pub(crate) fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.uniform() * n as f64) as usize
        }

        pub(crate) fn uniforms(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.uniform() as f32).collect()
        }

        /// Normal with standard deviation `sigma` (Box-Muller).
        pub(crate) fn normals(&mut self, n: usize, sigma: f64) -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u = 1.0 - self.uniform();
                    let v = self.uniform();
                    (sigma * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect()
        }
    }
}
