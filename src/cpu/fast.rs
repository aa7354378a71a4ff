//! The production `f32` CPU path.
//!
//! Same operations, signatures and conventions as [`reference`](super::reference), returning
//! `f32`. Three things make it fast:
//!
//! * **Vectorisation without intrinsics.** Every inner loop works on fixed-width chunks with
//!   per-lane accumulators and branch-free selects, so LLVM turns it into SIMD code; `exp` is a
//!   range reduction, a polynomial and an exponent-bit splice, with no branches or calls, so it
//!   vectorises too. Sums accumulate in `f32` lanes over short blocks and in `f64` across blocks,
//!   which keeps wide rows accurate at no measurable cost.
//! * **Multiversioning.** The baseline x86-64 target only has SSE2; every kernel is also compiled
//!   with AVX2 and FMA enabled and picked at run time when the CPU has them.
//! * **Cache-friendly passes.** A row is scanned once for its maximum (the only pass that has to
//!   come from memory), then revisited while it is still in cache. Rows are handed to rayon in
//!   blocks of roughly `TASK_ELEMS` elements so that small rows do not drown in scheduling;
//!   a few long rows that would leave threads idle are cut into chunks of columns instead (see
//!   the `split` module).
//!
//! Accuracy against the f64 reference is tested in this module: softmax within `1e-6` absolute or
//! `1e-5` relative, log-softmax within `1e-5` absolute plus `1e-5` relative.

use std::marker::PhantomData;

use rayon::prelude::*;

#[cfg(test)]
use super::JACOBIAN_MAX_COLS;
use crate::error::Result;
use crate::layout::AxisLayout;
use crate::options::{CrossEntropyOptions, GradOutput, Reduction, Targets};
use crate::validate::{self, CrossEntropyPlan, CrossEntropyTargets, IGNORED_ROW};

pub use super::reference::CrossEntropyOutput;

/// Elements handed to one rayon task: enough to amortise scheduling, few enough that a
/// medium-sized batch still spreads over every core.
const TASK_ELEMS: usize = 1 << 15;

/// Below this much work a call runs on the calling thread; waking the pool costs more.
const SERIAL_ELEMS: usize = 1 << 14;

/// Width of the per-lane accumulators: two AVX2 vectors, so that consecutive iterations do not
/// wait on each other's additions.
const LANES: usize = 16;

/// The last-level cache assumed where the CPU does not report its L3 size.
const DEFAULT_L3_BYTES: usize = 32 << 20;

/// The most L3 a call counts on, whatever the CPU reports. A virtual machine reports the host's
/// whole L3, which the host's other cores and guests share: a 2-core guest reporting 480 MiB
/// measured non-temporal stores ahead from 48 MiB of operands (1.2-1.45x at 64 MiB) and behind
/// at 16 MiB, as if its L3 held some 48 MiB.
const MAX_L3_BYTES: usize = 48 << 20;

/// When streaming, rows of up to this many elements keep their exponentials in a per-thread
/// scratch row (which stays in L2) so exp runs once per element; longer rows evaluate exp a
/// second time instead of spilling the scratch row to memory.
const SCRATCH_COLS: usize = 1 << 18;

/// Elements summed in `f32` lanes before the partial sum moves into an `f64` accumulator.
const SUM_BLOCK: usize = 1024;

/// Softmax, log-softmax, cross-entropy and backward rows of fewer columns than this go through
/// the short-row kernels ([`short_row_blocks`], [`short_backward_rows`]), a sub-block of rows at
/// a time. Paired runs against the row kernels: ahead at 128 columns (1.05-1.3x), even or ahead
/// at 150, behind at 200 and 250 (0.83-0.98 for most ops) and at 512 (softmax 0.8x: the
/// short-row path rescales in place and then copies, where the row kernel rescales as it
/// streams).
const SHORT_COLS: usize = 160;

/// Elements of the sub-blocks of rows that the short-row kernels work through (in L1).
const SHORT_BLOCK: usize = 1024;

// ---------------------------------------------------------------------------------------------
// Arithmetic flavours and the vectorisable exp.

/// What differs between the builds of a kernel: how `a * b + c` is evaluated, and how wide a
/// streaming store is. Rust never contracts a multiply and an add on its own, and
/// `f32::mul_add` is a slow library call without hardware FMA, so the kernels are generic over
/// this and each build picks the right one.
trait MulAdd {
    /// Whether the build has hardware FMA, so that [`MulAdd::mul_add`] is one fused instruction.
    const FUSED: bool;

    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        if Self::FUSED {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    /// Writes `v` to `dst` with non-temporal stores, in the widest the build has: a whole
    /// cache line in one store where AVX-512 is there, rather than four 16-byte pieces.
    ///
    /// # Safety
    ///
    /// `dst` is 64-byte aligned and valid for `LANES` writes, and the build's instruction set
    /// is present.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn stream_line(dst: *mut f32, v: &[f32; LANES]) {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        for k in (0..LANES).step_by(4) {
            // SAFETY: `dst[k..k + 4]` is in bounds and 16-byte aligned (the caller's
            // promise); `v[k..k + 4]` is in bounds; SSE is part of the x86-64 baseline.
            unsafe { _mm_stream_ps(dst.add(k), _mm_loadu_ps(v.as_ptr().add(k))) };
        }
    }

    /// `src[lane[i]]` in each lane `i`: a variable permutation, which LLVM does not find in
    /// the loop below (it loaded the lanes one by one).
    ///
    /// # Safety
    ///
    /// Every `lane[i]` is below LANES, and the build's instruction set is present.
    #[inline(always)]
    unsafe fn permute(src: &[f32; LANES], lane: &[u32; LANES]) -> [f32; LANES] {
        std::array::from_fn(|i| src[lane[i] as usize % LANES])
    }

    /// `src[i * stride]` in each lane `i`.
    ///
    /// # Safety
    ///
    /// `src` is valid for reads at `i * stride` for every lane, `stride` is below 2^27, and
    /// the build's instruction set is present.
    #[inline(always)]
    unsafe fn gather(src: *const f32, stride: usize) -> [f32; LANES] {
        // SAFETY: the caller's promise.
        std::array::from_fn(|i| unsafe { *src.add(i * stride) })
    }

    /// `src[offset[i]]` in each lane `i`.
    ///
    /// # Safety
    ///
    /// `src` is valid for reads at every `offset[i]`, each below 2^31, and the build's
    /// instruction set is present.
    #[inline(always)]
    unsafe fn gather_at(src: *const f32, offset: &[u32; LANES]) -> [f32; LANES] {
        // SAFETY: the caller's promise.
        std::array::from_fn(|i| unsafe { *src.add(offset[i] as usize) })
    }
}

/// A separate multiply and add: the SSE2 baseline.
struct Separate;

/// A fused multiply-add: the AVX2+FMA build.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
struct Fused;

impl MulAdd for Separate {
    const FUSED: bool = false;
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl MulAdd for Fused {
    const FUSED: bool = true;

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn stream_line(dst: *mut f32, v: &[f32; LANES]) {
        use std::arch::x86_64::{_mm256_loadu_ps, _mm256_stream_ps};
        for k in (0..LANES).step_by(8) {
            // SAFETY: `dst[k..k + 8]` is in bounds and 32-byte aligned (the caller's
            // promise); `v[k..k + 8]` is in bounds; AVX is in the build (the caller's promise).
            unsafe { _mm256_stream_ps(dst.add(k), _mm256_loadu_ps(v.as_ptr().add(k))) };
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn permute(src: &[f32; LANES], lane: &[u32; LANES]) -> [f32; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: the loads stay within the arrays, two `__m256` are LANES floats, and AVX2 is
        // in the build (the caller's promise). Each half picks from both halves of `src` and
        // blends by whether the lane's index is past 7.
        unsafe {
            let (lo, hi) = (
                _mm256_loadu_ps(src.as_ptr()),
                _mm256_loadu_ps(src.as_ptr().add(8)),
            );
            let half = |k: usize| {
                let idx = _mm256_loadu_si256(lane.as_ptr().add(k).cast());
                let from_hi = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
                _mm256_blendv_ps(
                    _mm256_permutevar8x32_ps(lo, idx),
                    _mm256_permutevar8x32_ps(hi, idx),
                    _mm256_castsi256_ps(from_hi),
                )
            };
            std::mem::transmute::<[__m256; 2], [f32; LANES]>([half(0), half(8)])
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather(src: *const f32, stride: usize) -> [f32; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: every lane's element is readable and the offsets fit in i32 (the caller's
        // promise, as is AVX2); two `__m256` are LANES floats.
        unsafe {
            let stride = _mm256_set1_epi32(stride as i32);
            let first = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), stride);
            let second = _mm256_add_epi32(first, _mm256_slli_epi32::<3>(stride));
            std::mem::transmute::<[__m256; 2], [f32; LANES]>([
                _mm256_i32gather_ps::<4>(src, first),
                _mm256_i32gather_ps::<4>(src, second),
            ])
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather_at(src: *const f32, offset: &[u32; LANES]) -> [f32; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: every lane's element is readable and the offsets fit in i32 (the caller's
        // promise, as is AVX2); the index loads stay within `offset`; two `__m256` are LANES
        // floats.
        unsafe {
            let half = |k: usize| {
                let idx = _mm256_loadu_si256(offset.as_ptr().add(k).cast());
                _mm256_i32gather_ps::<4>(src, idx)
            };
            std::mem::transmute::<[__m256; 2], [f32; LANES]>([half(0), half(8)])
        }
    }
}

/// The AVX-512 build: fused multiply-adds as [`Fused`], and whole-line streaming stores.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
struct Fused512;

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
impl MulAdd for Fused512 {
    const FUSED: bool = true;

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn stream_line(dst: *mut f32, v: &[f32; LANES]) {
        use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
        // SAFETY: `dst` is 64-byte aligned and holds LANES floats, and AVX-512 is in the build
        // (the caller's promise).
        unsafe { _mm512_stream_ps(dst, _mm512_loadu_ps(v.as_ptr())) };
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn permute(src: &[f32; LANES], lane: &[u32; LANES]) -> [f32; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: the loads stay within the arrays, a `__m512` is LANES floats, and AVX-512 is
        // in the build (the caller's promise).
        unsafe {
            let idx = _mm512_loadu_si512(lane.as_ptr().cast());
            std::mem::transmute(_mm512_permutexvar_ps(idx, _mm512_loadu_ps(src.as_ptr())))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather(src: *const f32, stride: usize) -> [f32; LANES] {
        use std::arch::x86_64::*;
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride as i32));
        // SAFETY: every lane's element is readable and the offsets fit in i32 (the caller's
        // promise, as is AVX-512); a `__m512` is LANES floats.
        unsafe { std::mem::transmute(_mm512_i32gather_ps::<4>(offsets, src.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn gather_at(src: *const f32, offset: &[u32; LANES]) -> [f32; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: every lane's element is readable and the offsets fit in i32 (the caller's
        // promise, as is AVX-512); the index load stays within `offset`; a `__m512` is LANES
        // floats.
        unsafe {
            let idx = _mm512_loadu_si512(offset.as_ptr().cast());
            std::mem::transmute(_mm512_i32gather_ps::<4>(idx, src.cast()))
        }
    }
}

/// Inputs below this give exactly 0 from [`exp`]: the true values are under 3e-38, at the edge
/// of the normal range, and the exponent construction below needs `n >= -125`.
const EXP_LO: f32 = -86.5;
/// `ln(f32::MAX)`: above it [`exp`] is `+inf`.
const EXP_HI: f32 = 88.722_83;

/// `e^x` in `f32`, branch-free so that loops calling it vectorise.
///
/// `x = n ln 2 + r` with `n` an integer and `|r| <= ln 2 / 2`; `e^r` comes from a degree-5
/// minimax polynomial (error below 1e-7 relative) and `2^n` is built directly in the
/// exponent bits. Inputs below [`EXP_LO`] give exactly 0, `-inf` included; above [`EXP_HI`] the
/// result is `+inf`; NaN propagates.
#[inline(always)]
fn exp<M: MulAdd>(x: f32) -> f32 {
    // Written so that NaN falls through unchanged.
    let xc = if x > EXP_HI { EXP_HI } else { x };
    let y = exp_nonpositive::<M>(xc);
    if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// [`exp`] for arguments that are at most [`EXP_HI`] or NaN, such as `x - max` over a row whose
/// maximum is `max`: the two selects for overflow are not needed there.
#[inline(always)]
fn exp_nonpositive<M: MulAdd>(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits; the extra
    // 126 is the exponent bias minus one, so shifting those bits into the exponent field gives
    // 2^(n-1) for every n in [-125, 128]. The missing factor 2 lives in the polynomial.
    const SHIFT: f32 = 12_582_912.0 + 126.0;
    // ln 2 split so that n * LN2_HI is exact for |n| <= 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 2 e^r on |r| <= ln 2 / 2: the degree-5 polynomial of least maximum relative error
    // (9.2e-8 with these f32 coefficients) among those exact at r = 0, so that e^0 is 1.
    const C0: f32 = 2.0;
    const C1: f32 = 1.999_999_4;
    const C2: f32 = 0.999_982_95;
    const C3: f32 = 0.333_352_77;
    const C4: f32 = 0.083_796_13;
    const C5: f32 = 0.016_580_697;

    // Written so that NaN falls through unchanged.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let t = M::mul_add(xc, std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = M::mul_add(n, -LN2_HI, xc);
    let r = M::mul_add(n, -LN2_LO, r);
    let mut p = C5;
    p = M::mul_add(p, r, C4);
    p = M::mul_add(p, r, C3);
    p = M::mul_add(p, r, C2);
    p = M::mul_add(p, r, C1);
    p = M::mul_add(p, r, C0);
    let y = p * f32::from_bits(t.to_bits() << 23);
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// `ln x` for a finite `x` of normal magnitude above 0, such as the sum of a row's exponentials
/// (at least 1: the maximum's own term), in f32 arithmetic that vectorises across a loop, where
/// `f32::ln` is one library call per row (a third of the time of cross-entropy on 10 columns).
///
/// `x = m 2^k` with `m` in `[sqrt(1/2), sqrt 2)`, and `ln m = 2 atanh s`, `s = (m - 1) / (m + 1)`,
/// from its series to `s^9`: `|s| < 0.172`, so the first term left out is below 3e-9 of the
/// result; the rest is the rounding of a few f32 operations (within 2.5e-7 of the result, as
/// the test checks).
#[inline(always)]
fn ln_normal(x: f32) -> f32 {
    let bits = x.to_bits();
    let m = f32::from_bits(bits & 0x007f_ffff | 0x3f80_0000);
    let k = ((bits >> 23) as i32 - 127) as f32;
    let high = m > std::f32::consts::SQRT_2;
    let m = if high { 0.5 * m } else { m };
    let k = if high { k + 1.0 } else { k };
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 9.0;
    for c in [1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
        p = p * s2 + c;
    }
    k * std::f32::consts::LN_2 + 2.0 * s * p
}

// ---------------------------------------------------------------------------------------------
// Row reductions.

/// Folds the lanes with `f` as a halving tree, which vectorises (a scalar fold over the lanes
/// does not): short rows spend a noticeable share of their time here.
///
/// The lanes pass through [`std::hint::black_box`] first. Without it, LLVM's SLP vectoriser
/// planned the loop that filled them together with this tree and built both from two-lane
/// vectors: the accumulating loop ran on 8-byte loads instead of whole AVX-512 registers. The
/// barrier costs one store and a few reloads per row.
#[inline(always)]
fn fold_lanes<T: Copy>(w: [T; LANES], f: impl Fn(T, T) -> T) -> T {
    let mut w = std::hint::black_box(w);
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            w[i] = f(w[i], w[i + n]);
        }
    }
    w[0]
}

#[inline(always)]
fn lane_sum(acc: [f32; LANES]) -> f32 {
    fold_lanes(acc, |a, b| a + b)
}

/// What the first pass over a row finds out.
#[derive(Clone, Copy)]
struct Scan {
    max: f32,
    /// A NaN or `+inf` entry, or all entries `-inf`: the row's outputs are all NaN.
    degenerate: bool,
}

/// The value a row's maximum is taken over: NaN counts as `+inf`, so that one maximum tells
/// whether the row is degenerate (a NaN or `+inf` entry makes it `+inf`, all `-inf` leaves it
/// `-inf`). The NaN test is an integer comparison of the bits, which LLVM vectorises (the float
/// comparison became one scalar compare per element).
#[inline(always)]
fn max_key(v: f32) -> f32 {
    if v.to_bits() & 0x7fff_ffff > 0x7f80_0000 {
        f32::INFINITY
    } else {
        v
    }
}

/// The larger of two values, written as a select so that it vectorises.
#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// The largest [`max_key`] of a few values, one by one (a row's tail).
#[inline(always)]
fn scalar_max_key(x: &[f32]) -> f32 {
    // Two chains, so that each compare waits on the one two elements back.
    let pairs = x.chunks_exact(2);
    let odd = pairs
        .remainder()
        .first()
        .map_or(f32::NEG_INFINITY, |&v| max_key(v));
    let (a, b) = pairs.fold((odd, f32::NEG_INFINITY), |(a, b), p| {
        (larger(a, max_key(p[0])), larger(b, max_key(p[1])))
    });
    larger(a, b)
}

#[inline(always)]
fn scan(x: &[f32]) -> Scan {
    let mut max = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            max[i] = larger(max[i], max_key(c[i]));
        }
    }
    // The tail in scalars: indexing the lane array by a variable kept it in memory, for the
    // whole loop above.
    let m = larger(fold_lanes(max, larger), scalar_max_key(tail));
    Scan {
        max: m,
        degenerate: m.is_infinite(),
    }
}

/// `sum_j exp(x_j - max)`.
#[inline(always)]
fn sum_exp<M: MulAdd>(x: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in x.chunks(SUM_BLOCK) {
        let mut acc = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp_nonpositive::<M>(c[i] - max);
            }
        }
        let mut s = lane_sum(acc);
        for &v in tail {
            s += exp_nonpositive::<M>(v - max);
        }
        total += f64::from(s);
    }
    total
}

/// `y_j = exp(x_j - max)`, returning `sum_j y_j`.
///
/// Each block is summed after it is stored, while it is in L1: accumulating in the same loop as
/// the stores made LLVM keep the accumulators on the stack (it cannot rule out that the output
/// aliases them), a store-to-load dependency on every iteration.
#[inline(always)]
fn exp_store_sum<M: MulAdd>(x: &[f32], max: f32, y: &mut [f32]) -> f64 {
    let mut total = 0.0f64;
    for (xb, yb) in x.chunks(SUM_BLOCK).zip(y.chunks_mut(SUM_BLOCK)) {
        for (yv, &xv) in yb.iter_mut().zip(xb) {
            *yv = exp_nonpositive::<M>(xv - max);
        }
        total += block_sum(yb);
    }
    total
}

/// `sum_j a_j * b_j`.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (ab, bb) in a.chunks(SUM_BLOCK).zip(b.chunks(SUM_BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let ac = ab.chunks_exact(LANES);
        let bc = bb.chunks_exact(LANES);
        let mut s = 0.0f32;
        for (&x, &y) in ac.remainder().iter().zip(bc.remainder()) {
            s += x * y;
        }
        for (xs, ys) in ac.zip(bc) {
            for i in 0..LANES {
                acc[i] += xs[i] * ys[i];
            }
        }
        total += f64::from(lane_sum(acc) + s);
    }
    total
}

/// `sum_j a_j` in `f32` lanes, for at most [`SUM_BLOCK`] elements.
#[inline(always)]
fn block_sum(a: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let ac = a.chunks_exact(LANES);
    let mut s = 0.0f32;
    for &x in ac.remainder() {
        s += x;
    }
    for xs in ac {
        for i in 0..LANES {
            acc[i] += xs[i];
        }
    }
    f64::from(lane_sum(acc) + s)
}

/// `sum_j a_j`, in blocks of [`SUM_BLOCK`] added in `f64`. A loop rather than an iterator's
/// `sum`, which compiles to a generic `fold` that is not inlined into the instruction-set builds
/// (it ran at SSE width inside the AVX-512 kernels).
#[inline(always)]
fn sum(a: &[f32]) -> f64 {
    let mut total = 0.0;
    for block in a.chunks(SUM_BLOCK) {
        total += block_sum(block);
    }
    total
}

/// `dst_j = f(a_j, b_j)`, with non-temporal stores when `stream` is set (on x86-64; elsewhere
/// ordinary stores). A block that streams must end with [`store_fence`].
#[inline(always)]
fn store_map<M: MulAdd>(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    stream: bool,
    f: impl Fn(f32, f32) -> f32,
) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        // Whole, aligned cache lines let the write-combining buffers flush without a read.
        let head = dst.as_ptr().align_offset(64).min(dst.len());
        let (dst_head, dst_body) = dst.split_at_mut(head);
        for ((d, &a), &b) in dst_head.iter_mut().zip(a).zip(b) {
            *d = f(a, b);
        }
        let (a, b) = (&a[head..], &b[head..]);
        let mut dc = dst_body.chunks_exact_mut(LANES);
        let ac = a.chunks_exact(LANES);
        let bc = b.chunks_exact(LANES);
        let (a_tail, b_tail) = (ac.remainder(), bc.remainder());
        for ((d, a), b) in (&mut dc).zip(ac).zip(bc) {
            let mut v = [0.0f32; LANES];
            for i in 0..LANES {
                v[i] = f(a[i], b[i]);
            }
            // SAFETY: `d` starts 64-byte aligned and holds LANES floats; `M` is the build's.
            unsafe { M::stream_line(d.as_mut_ptr(), &v) };
        }
        for ((d, &a), &b) in dc.into_remainder().iter_mut().zip(a_tail).zip(b_tail) {
            *d = f(a, b);
        }
        return;
    }
    let _ = stream;
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

/// Orders this thread's non-temporal stores before whatever it does next (such as telling rayon
/// that its task is done); they are not ordered by the usual x86 memory model.
#[inline(always)]
fn store_fence(stream: bool) {
    #[cfg(target_arch = "x86_64")]
    if stream {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    let _ = stream;
}

thread_local! {
    /// The scratch row of [`softmax_row`], reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The per-row losses of a task of [`cross_entropy_planned`] with a reduction.
    static LOSSES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The gradient of a task of [`cross_entropy_planned`] whose gradient is dropped.
    static DROPPED_GRAD: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The buffers of the short-row kernels, reused across calls.
    static SHORT_SCRATCH: std::cell::Cell<Option<Box<ShortScratch>>> =
        const { std::cell::Cell::new(None) };
    static SHORT_CE_SCRATCH: std::cell::Cell<Option<Box<ShortCeScratch>>> =
        const { std::cell::Cell::new(None) };
}

// ---------------------------------------------------------------------------------------------
// Short rows. A row of a few columns leaves most of a vector's lanes idle in the row kernels
// below: 10 columns ran at a tenth of memcpy's speed. Rows of a few dozen columns pay for scalar
// tails and a partial cache line at each end of every row. The short-row kernels take a
// sub-block of rows at a time instead:
// - below LANES columns, every step is a flat pass over the whole sub-block that vectorises
//   across row boundaries: each row's maximum and sum come from doubling windows (see
//   [`doubling_windows`]), and per-row values reach the elements of their row through a table
//   of each element's row (gathers);
// - from LANES columns, each row in whole vectors, its last vector overlapping the one before
//   (masked where overlap matters, as in sums), so that no element goes through scalar code.
// Streamed output is built in a buffer in cache and leaves in one run of whole lines, where row
// by row it would leave partial lines. The buffers are the thread's, kept across calls.

/// A value per row of a sub-block, padded by LANES so that [`spread`] can read a whole vector
/// from any row.
type PerRow = [f32; SHORT_BLOCK + LANES];

const _: () =
    assert!(size_of::<PerRow>().is_multiple_of(64) && (SHORT_BLOCK * 4).is_multiple_of(64));

/// The per-row values of a sub-block of short rows and the buffers that find them, kept across
/// sub-blocks and calls (filling them anew for each sub-block showed up as a tenth of the time,
/// in `memset`).
///
/// Every buffer is a whole number of cache lines, and in this order starts on one (so that no
/// vector of it straddles two).
#[repr(C, align(64))]
struct ShortBlock {
    /// Each row's maximum; NaN for a degenerate row.
    maxes: PerRow,
    /// Each row's sum (of exponentials, or of the terms of a backward reduction), and what the
    /// kernels make of it.
    sums: PerRow,
    /// The two buffers of [`doubling_windows`], and the output of [`spread`].
    windows: [[f32; SHORT_BLOCK]; 2],
    /// Below LANES columns: how [`spread`] places per-row values beside their elements.
    spread: Spread,
    cols: usize,
}

impl ShortBlock {
    fn new(cols: usize) -> Self {
        Self {
            cols,
            maxes: [0.0; SHORT_BLOCK + LANES],
            sums: [0.0; SHORT_BLOCK + LANES],
            spread: Spread::new(cols),
            windows: [[0.0; SHORT_BLOCK]; 2],
        }
    }
}

/// What a short-row kernel works in: a [`ShortBlock`] and a sub-block of output to stream out.
#[repr(C, align(64))]
struct ShortScratch {
    block: ShortBlock,
    built: [f32; SHORT_BLOCK],
}

impl ShortScratch {
    /// This thread's scratch, set up for rows of `cols` columns.
    fn for_cols(cols: usize) -> Kept<Self> {
        let mut scratch = Kept::take(&SHORT_SCRATCH, || Self {
            block: ShortBlock::new(cols),
            built: [0.0; SHORT_BLOCK],
        });
        if scratch.block.cols != cols {
            scratch.block.spread = Spread::new(cols);
            scratch.block.cols = cols;
        }
        scratch
    }
}

/// A value kept by this thread in `key` across calls, taken out for one (a fresh one where the
/// thread keeps none, as in a nested call) and put back when dropped. Filling a short-row
/// kernel's buffers anew took three fifths of a cross-entropy call on 32 x 10, in `memset`.
struct Kept<T: 'static> {
    key: &'static std::thread::LocalKey<std::cell::Cell<Option<Box<T>>>>,
    value: Option<Box<T>>,
}

impl<T: 'static> Kept<T> {
    fn take(
        key: &'static std::thread::LocalKey<std::cell::Cell<Option<Box<T>>>>,
        fresh: impl FnOnce() -> T,
    ) -> Self {
        let value = key.try_with(|cell| cell.take()).ok().flatten();
        Self {
            key,
            value: Some(value.unwrap_or_else(|| Box::new(fresh()))),
        }
    }
}

impl<T: 'static> std::ops::Deref for Kept<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_deref().expect("kept until dropped")
    }
}

impl<T: 'static> std::ops::DerefMut for Kept<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_deref_mut().expect("kept until dropped")
    }
}

impl<T: 'static> Drop for Kept<T> {
    fn drop(&mut self) {
        let value = self.value.take();
        // During the thread's teardown the value is just dropped.
        let _ = self.key.try_with(|cell| cell.set(value));
    }
}

/// For rows of `cols < LANES` columns: vector `k` of a sub-block (elements `LANES k ..
/// LANES (k + 1)`) holds elements of the rows `first[k] + lane[k][i]`, at most LANES rows from
/// `first[k]`, so one permutation of a vector of per-row values places them beside their
/// elements (a gather per vector cost a sixth of softmax's time on 10 columns).
#[repr(C)]
struct Spread {
    first: [u16; SHORT_BLOCK / LANES],
    lane: [[u32; LANES]; SHORT_BLOCK / LANES],
}

impl Spread {
    fn new(cols: usize) -> Self {
        let mut spread = Self {
            first: [0; SHORT_BLOCK / LANES],
            lane: [[0; LANES]; SHORT_BLOCK / LANES],
        };
        if cols < LANES {
            // Element by element, counting columns: a division per element, in a table each
            // task builds anew, cost the short-row kernels 1-5% on rows of 4-15 columns.
            let (mut row, mut col) = (0u16, 0);
            for (first, lane) in spread.first.iter_mut().zip(&mut spread.lane) {
                *first = row;
                for l in lane.iter_mut() {
                    *l = u32::from(row - *first);
                    col += 1;
                    if col == cols {
                        (row, col) = (row + 1, 0);
                    }
                }
            }
        }
        spread
    }
}

/// `out[j] = per_row[row of j]` for the first `n` elements of a sub-block (and garbage up to the
/// next multiple of LANES).
#[inline(always)]
fn spread<M: MulAdd>(how: &Spread, per_row: &PerRow, out: &mut [f32; SHORT_BLOCK], n: usize) {
    let vectors = n.div_ceil(LANES);
    for ((o, &first), lane) in out
        .chunks_exact_mut(LANES)
        .zip(&how.first)
        .zip(&how.lane)
        .take(vectors)
    {
        let first = usize::from(first);
        let src: &[f32; LANES] = per_row[first..first + LANES].try_into().unwrap();
        // SAFETY: `Spread::new` keeps every lane below LANES; the build is `M`'s.
        let v = unsafe { M::permute(src, lane) };
        o.copy_from_slice(&v);
    }
}

/// Doubling windows over a sub-block `v` of rows of `cols < LANES` columns: calls `level(win,
/// w)` for `w = 1, 2, 4, ...` up to `cols`, where `win[j]` combines `v[j..j + w]` (with `first`
/// for the pairs of `v`, then `combine`), from `win = v` itself. Each level is one flat pass
/// over the sub-block that vectorises; a row's value is then read from a few windows at its
/// start (see [`strided`]).
#[inline(always)]
fn doubling_windows<L: WindowLevel>(
    v: &[f32],
    cols: usize,
    windows: &mut [[f32; SHORT_BLOCK]; 2],
    first: impl Fn(f32, f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
    level: &mut L,
) {
    let n = v.len();
    level.level(v, 1);
    let [a, b] = windows;
    let (mut w, mut src) = (1, 0);
    while 2 * w <= cols {
        let len = n + 1 - 2 * w;
        match src {
            0 => window_pairs(v, a, len, w, &first),
            1 => window_pairs(a, b, len, w, &combine),
            _ => window_pairs(b, a, len, w, &combine),
        }
        src = if src == 1 { 2 } else { 1 };
        w *= 2;
        level.level(if src == 1 { &a[..len] } else { &b[..len] }, w);
    }
}

/// `to[j] = f(from[j], from[j + w])` for `j < len`.
#[inline(always)]
fn window_pairs(from: &[f32], to: &mut [f32], len: usize, w: usize, f: impl Fn(f32, f32) -> f32) {
    for ((d, &p), &q) in to[..len]
        .iter_mut()
        .zip(&from[..len])
        .zip(&from[w..w + len])
    {
        *d = f(p, q);
    }
}

/// `out[r] = f(out[r], src[r * cols + at])` for each row `r` of a sub-block, LANES rows at a
/// time by gathers (one by one, the rows' values took a quarter of softmax's time on 10
/// columns).
#[inline(always)]
fn strided<M: MulAdd>(
    src: &[f32],
    at: usize,
    cols: usize,
    out: &mut [f32],
    f: impl Fn(f32, f32) -> f32,
) {
    let rows = out.len();
    if rows == 0 {
        return;
    }
    assert!((rows - 1) * cols + at < src.len() && cols < SHORT_BLOCK);
    let mut groups = out.chunks_exact_mut(LANES);
    for (g, o) in (&mut groups).enumerate() {
        // SAFETY: the lanes read `src[(LANES g + i) cols + at]` for rows below `rows`, in
        // bounds by the assertion; `cols` is far below 2^27; the build is `M`'s.
        let v = unsafe { M::gather(src.as_ptr().add(g * LANES * cols + at), cols) };
        for i in 0..LANES {
            o[i] = f(o[i], v[i]);
        }
    }
    let done = rows - rows % LANES;
    for (r, o) in groups.into_remainder().iter_mut().enumerate() {
        *o = f(*o, src[(done + r) * cols + at]);
    }
}

/// `out[i] = src[at[i]]`, LANES at a time by gathers.
#[inline(always)]
fn gather_rows<M: MulAdd>(src: &[f32], at: &[u32], out: &mut [f32]) {
    assert!(at.len() == out.len() && src.len() < 1 << 31);
    let mut groups = out.chunks_exact_mut(LANES);
    let mut offsets = at.chunks_exact(LANES);
    for (o, a) in (&mut groups).zip(&mut offsets) {
        let a: &[u32; LANES] = a.try_into().unwrap();
        assert!(a
            .iter()
            .fold(true, |ok, &a| ok & ((a as usize) < src.len())));
        // SAFETY: every offset is in bounds of `src`, by the assertions; the build is `M`'s.
        o.copy_from_slice(&unsafe { M::gather_at(src.as_ptr(), a) });
    }
    for (o, &a) in groups.into_remainder().iter_mut().zip(offsets.remainder()) {
        *o = src[a as usize];
    }
}

/// What [`doubling_windows`] does with each level of windows. (A trait with inlined methods
/// rather than a closure: in the cross-entropy kernel LLVM left such a closure out of line, where
/// it ran without the build's instruction set.)
trait WindowLevel {
    /// `win[j]` combines the `w` elements from `j`.
    fn level(&mut self, win: &[f32], w: usize);
}

/// Each row's largest key, from its first and last windows of the widest level.
struct MaxLevel<'a, M> {
    cols: usize,
    maxes: &'a mut [f32],
    build: PhantomData<M>,
}

impl<M: MulAdd> WindowLevel for MaxLevel<'_, M> {
    #[inline(always)]
    fn level(&mut self, win: &[f32], w: usize) {
        let cols = self.cols;
        if 2 * w > cols {
            strided::<M>(win, 0, cols, self.maxes, |_, v| max_key(v));
            strided::<M>(win, cols - w, cols, self.maxes, |m, v| {
                larger(m, max_key(v))
            });
        }
    }
}

/// Each row's sum, from one window of each width in `cols`'s binary digits.
struct SumLevel<'a, M> {
    cols: usize,
    sums: &'a mut [f32],
    /// Where the next window starts within a row.
    at: usize,
    build: PhantomData<M>,
}

impl<M: MulAdd> WindowLevel for SumLevel<'_, M> {
    #[inline(always)]
    fn level(&mut self, win: &[f32], w: usize) {
        if self.cols & w != 0 {
            strided::<M>(win, self.at, self.cols, self.sums, |s, part| s + part);
            self.at += w;
        }
    }
}

/// For a sub-block `x` of rows of `cols < LANES` columns: each row's largest [`max_key`], in
/// the front of `block.maxes`. A row's maximum is the larger of its first and its last window
/// of the largest power of two up to `cols`. Against each row's compares one by one: 1.1-1.3x
/// on 4 columns, within the noise on 10 and 15.
#[inline(always)]
fn short_max_keys<M: MulAdd>(x: &[f32], block: &mut ShortBlock) {
    let cols = block.cols;
    let maxes = &mut block.maxes[..x.len() / cols];
    // Keys from the first pass on (which is all that `x` itself sees, where `cols` is 1).
    let first = |p, q| larger(max_key(p), max_key(q));
    let mut level = MaxLevel::<M> {
        cols,
        maxes,
        build: PhantomData,
    };
    doubling_windows(x, cols, &mut block.windows, first, larger, &mut level);
}

/// Each row's sum of a sub-block `v` of rows, in the front of `block.sums`: below LANES columns
/// in f32 from doubling windows (a row of 10 columns is its window of 2 plus the window of 8
/// after it; every window a pairwise sum), otherwise [`short_sum`] per row.
#[inline(always)]
fn short_sums<M: MulAdd>(v: &[f32], block: &mut ShortBlock) {
    let cols = block.cols;
    let sums = &mut block.sums[..v.len() / cols];
    if cols >= LANES {
        for (s, row) in sums.iter_mut().zip(v.chunks_exact(cols)) {
            *s = short_sum(row) as f32;
        }
        return;
    }
    sums.fill(0.0);
    let mut level = SumLevel::<M> {
        cols,
        sums,
        at: 0,
        build: PhantomData,
    };
    let add = |p, q| p + q;
    doubling_windows(v, cols, &mut block.windows, add, add, &mut level);
}

/// How far from its row's shift a short row's elements may lie for the row to be shifted by
/// something other than its maximum (see [`shifted_exps`]): `e^(x - shift)` and a row's sum of
/// them are then normal f32 numbers (from 1.6e-28 to below 1e29).
const SHIFT_BOUND: f32 = 64.0;

/// For a sub-block `x` of rows of fewer than LANES columns, each row's shift in the front of
/// `block.maxes` (an element of the row): `e_j = exp(x_j - shift of its row)` where every
/// element of the sub-block lies within [`SHIFT_BOUND`] of its row's shift; false, and `e`
/// meaningless, where one does not.
///
/// Finding such rows' maxima costs a third of softmax's time on 4-15 columns. A shift that is
/// an element of the row moves with the row, so `x_j - shift` rounds alike for `x` and `x + c`:
/// the result stays invariant under translation. Softmax shifts by each row's first element
/// (`e_j / sum e` is as accurate as with the maximum); cross-entropy with index targets by the
/// target's logit (its loss, `ln sum e`, is as accurate near 0 as with the maximum, and where the
/// target is not the maximum the sum is at least 2). Not for log-softmax: `(x_j - x_0) - ln sum
/// e` loses the accuracy near 0 that the maximum keeps.
#[inline(always)]
fn shifted_exps<M: MulAdd>(x: &[f32], e: &mut [f32], block: &mut ShortBlock) -> bool {
    let shifts = &mut block.windows[0];
    spread::<M>(&block.spread, &block.maxes, shifts, x.len());
    // The widest `|x_j - shift|`, on the bits: NaN (whose bits lie above infinity's) counts as
    // out of bounds, and the loop vectorises.
    let mut widest = 0u32;
    for ((ev, &xv), &s) in e.iter_mut().zip(x).zip(shifts.iter()) {
        let d = xv - s;
        widest = widest.max(d.to_bits() & 0x7fff_ffff);
        *ev = exp_nonpositive::<M>(d);
    }
    widest < SHIFT_BOUND.to_bits()
}

/// Each row's first element as its shift, in the front of `block.maxes`, for [`shifted_exps`].
#[inline(always)]
fn first_element_shifts<M: MulAdd>(x: &[f32], block: &mut ShortBlock) {
    let rows = x.len() / block.cols;
    strided::<M>(x, 0, block.cols, &mut block.maxes[..rows], |_, v| v);
}

/// For a sub-block `x` of rows of `cols` columns: `e_j = exp(x_j - max of its row)`, with each
/// row's maximum in `block.maxes` (NaN for a degenerate row, whose `e` are meaningless).
#[inline(always)]
fn short_exps<M: MulAdd>(x: &[f32], e: &mut [f32], block: &mut ShortBlock) {
    let cols = block.cols;
    if cols >= LANES {
        // Whole vectors along each row; the last vector of a row overlaps the one before it
        // where `cols` is not a multiple of LANES, which neither the maximum nor exp minds.
        for ((xr, er), m) in x
            .chunks_exact(cols)
            .zip(e.chunks_exact_mut(cols))
            .zip(block.maxes.iter_mut())
        {
            let max = row_max_key(xr);
            *m = if max.is_infinite() { f32::NAN } else { max };
            let max = if max.is_infinite() { 0.0 } else { max };
            for (ec, xc) in er.chunks_exact_mut(LANES).zip(xr.chunks_exact(LANES)) {
                for i in 0..LANES {
                    ec[i] = exp_nonpositive::<M>(xc[i] - max);
                }
            }
            let (el, xl) = (last_lanes_mut(er), last_lanes(xr));
            for i in 0..LANES {
                el[i] = exp_nonpositive::<M>(xl[i] - max);
            }
        }
        return;
    }
    short_max_keys::<M>(x, block);
    let rows = x.len() / cols;
    // The shift of each row: its maximum, or 0 to keep a degenerate row's arithmetic quiet.
    for (m, s) in block.maxes[..rows].iter_mut().zip(&mut block.sums[..rows]) {
        let degenerate = m.is_infinite();
        *s = if degenerate { 0.0 } else { *m };
        *m = if degenerate { f32::NAN } else { *m };
    }
    let shifts = &mut block.windows[0];
    spread::<M>(&block.spread, &block.sums, shifts, x.len());
    for ((ev, &xv), &s) in e.iter_mut().zip(x).zip(shifts.iter()) {
        *ev = exp_nonpositive::<M>(xv - s);
    }
}

/// `TAIL_MASKS[r..][..LANES]` is all ones in its last `r` lanes and 0 in the others: the lanes
/// of a row's last vector that the whole vectors before it did not cover, where the row has `r`
/// elements beyond them. (A mask loaded from memory: one computed from the lane index was folded
/// into a branch per lane.)
static TAIL_MASKS: [u32; 2 * LANES] = {
    let mut m = [0; 2 * LANES];
    let mut i = LANES;
    while i < 2 * LANES {
        m[i] = u32::MAX;
        i += 1;
    }
    m
};

/// The mask of the lanes of a row's last vector (of a row of `len` elements, at least LANES)
/// that the whole vectors before it did not cover: all of them where `len` is a multiple of
/// LANES.
#[inline(always)]
fn tail_mask(len: usize) -> &'static [u32; LANES] {
    let fresh = len % LANES;
    let fresh = if fresh == 0 { LANES } else { fresh };
    TAIL_MASKS[fresh..fresh + LANES].try_into().unwrap()
}

/// `v` where `mask` is all ones, +0 where it is 0. (Bitwise: a select here became a branch per
/// lane.)
#[inline(always)]
fn masked(v: f32, mask: u32) -> f32 {
    f32::from_bits(v.to_bits() & mask)
}

/// The last LANES elements of a row of at least LANES.
#[inline(always)]
fn last_lanes(x: &[f32]) -> &[f32; LANES] {
    x[x.len() - LANES..].try_into().unwrap()
}

#[inline(always)]
fn last_lanes_mut(x: &mut [f32]) -> &mut [f32; LANES] {
    let n = x.len();
    (&mut x[n - LANES..]).try_into().unwrap()
}

/// The largest [`max_key`] of a row of at least LANES elements, in whole vectors.
#[inline(always)]
fn row_max_key(x: &[f32]) -> f32 {
    let mut max = [f32::NEG_INFINITY; LANES];
    for c in x.chunks_exact(LANES) {
        for i in 0..LANES {
            max[i] = larger(max[i], max_key(c[i]));
        }
    }
    let l = last_lanes(x);
    for i in 0..LANES {
        max[i] = larger(max[i], max_key(l[i]));
    }
    fold_lanes(max, larger)
}

/// `sum_j term(a_j, b_j)` over one row of at least LANES elements, in f32 lanes, whole vectors
/// (the last one masked where it overlaps the one before).
#[inline(always)]
fn short_fold(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let whole = a.len() - a.len() % LANES;
    for (ac, bc) in a[..whole].chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += term(ac[i], bc[i]);
        }
    }
    if whole < a.len() {
        let (al, bl, m) = (last_lanes(a), last_lanes(b), tail_mask(a.len()));
        for i in 0..LANES {
            acc[i] += masked(term(al[i], bl[i]), m[i]);
        }
    }
    f64::from(lane_sum(acc))
}

/// `sum_j e_j` of one row of at least LANES elements.
#[inline(always)]
fn short_sum(e: &[f32]) -> f64 {
    short_fold(e, e, |v, _| v)
}

/// `o_j = f(a_j, b_j)` over one short row, in whole vectors where it has at least LANES
/// elements (the last one overlapping the one before).
#[inline(always)]
fn short_map2(o: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    if o.len() < LANES {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
        return;
    }
    let whole = o.len() - o.len() % LANES;
    for ((o, &a), &b) in o[..whole].iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
    let (ol, al, bl) = (last_lanes_mut(o), last_lanes(a), last_lanes(b));
    for i in 0..LANES {
        ol[i] = f(al[i], bl[i]);
    }
}

/// `e_j *= k` over one row, in whole vectors where it has at least LANES elements.
#[inline(always)]
fn short_scale(e: &mut [f32], k: f32) {
    if e.len() < LANES {
        for v in e.iter_mut() {
            *v *= k;
        }
        return;
    }
    // A flat loop: written over whole vectors, LLVM vectorised it across them, with gathers.
    let whole = e.len() - e.len() % LANES;
    for v in e[..whole].iter_mut() {
        *v *= k;
    }
    if whole < e.len() {
        let m = tail_mask(e.len());
        for (v, &m) in last_lanes_mut(e).iter_mut().zip(m) {
            // k where the mask is set, 1 elsewhere.
            *v *= f32::from_bits(k.to_bits() & m | 1.0f32.to_bits() & !m);
        }
    }
}

/// The per-sub-block work of a short-row kernel, after [`short_exps`].
///
/// (A trait with inlined methods rather than a closure: a closure that large was not inlined,
/// and a closure gets no target features from the function it is defined in, so its body ran
/// in baseline code, where `f32::mul_add` is a library call: an eighth to a quarter of the
/// speed.)
trait ShortRowWork {
    /// For a sub-block `x` of rows of fewer than LANES columns whose rows start at `first_row`
    /// of the call: true where the work can do with each row shifted by one of its elements
    /// rather than its maximum (see [`shifted_exps`]), with the shifts put in the front of
    /// `block.maxes`; false where it needs the maxima.
    fn shifts<M: MulAdd>(&mut self, first_row: usize, x: &[f32], block: &mut ShortBlock) -> bool;

    /// Turns `e`, the exponentials of the sub-block `x` whose rows start at `first_row` of the
    /// call, into its output; `block.maxes` holds each row's maximum (NaN for a degenerate
    /// row), or its shift where [`shifted_exps`] shifted by it.
    fn finish<M: MulAdd>(
        &mut self,
        first_row: usize,
        x: &[f32],
        e: &mut [f32],
        block: &mut ShortBlock,
    );
}

/// Runs `work` over `x`, rows of fewer than [`SHORT_COLS`] columns, a sub-block of rows at a
/// time, its output going to `y`.
#[inline(always)]
fn short_row_blocks<M: MulAdd, W: ShortRowWork>(
    x: &[f32],
    y: &mut [f32],
    cols: usize,
    stream: bool,
    work: &mut W,
) {
    // From LANES columns the sub-block is written in place with ordinary stores: building it
    // in `built` and streaming it out measured 0.83-0.88x as fast (1M x 40, 256k x 128).
    let stream = stream && cols < LANES;
    let block_rows = (SHORT_BLOCK / cols).max(1);
    let per_block = block_rows * cols;
    let mut scratch = ShortScratch::for_cols(cols);
    let ShortScratch { block, built } = &mut *scratch;
    for (b, (xb, yb)) in x.chunks(per_block).zip(y.chunks_mut(per_block)).enumerate() {
        let out = if stream {
            &mut built[..xb.len()]
        } else {
            &mut *yb
        };
        let first_row = b * block_rows;
        if !(cols < LANES
            && work.shifts::<M>(first_row, xb, block)
            && shifted_exps::<M>(xb, out, block))
        {
            short_exps::<M>(xb, out, block);
        }
        work.finish::<M>(first_row, xb, out, block);
        if stream {
            let out = &built[..xb.len()];
            store_map::<M>(yb, out, out, true, |v, _| v);
        }
    }
}

/// Softmax, or log-softmax with `LOG`, of short rows.
struct ShortSoftmax<const LOG: bool>;

impl<const LOG: bool> ShortRowWork for ShortSoftmax<LOG> {
    #[inline(always)]
    fn shifts<M: MulAdd>(&mut self, _: usize, x: &[f32], block: &mut ShortBlock) -> bool {
        if !LOG {
            first_element_shifts::<M>(x, block);
        }
        !LOG
    }

    #[inline(always)]
    fn finish<M: MulAdd>(&mut self, _: usize, x: &[f32], e: &mut [f32], block: &mut ShortBlock) {
        let cols = block.cols;
        let rows = x.len() / cols;
        short_sums::<M>(e, block);
        let (sums, maxes) = (&mut block.sums, &block.maxes);
        if LOG {
            // The logarithms in one loop of `ln_normal` that vectorises.
            for s in sums[..rows].iter_mut() {
                *s = ln_normal(*s);
            }
            // The exponentials were needed only for their sum. NaN for a degenerate row (max
            // is NaN); a -inf entry stays exactly -inf, as in the row kernel.
            if cols < LANES {
                let [m, l] = &mut block.windows;
                spread::<M>(&block.spread, maxes, m, x.len());
                spread::<M>(&block.spread, sums, l, x.len());
                for (((o, &v), &max), &log_sum) in e.iter_mut().zip(x).zip(m.iter()).zip(l.iter()) {
                    *o = (v - max) - log_sum;
                }
            } else {
                for (((or, xr), &max), &log_sum) in e
                    .chunks_exact_mut(cols)
                    .zip(x.chunks_exact(cols))
                    .zip(maxes)
                    .zip(sums.iter())
                {
                    short_map2(or, xr, xr, |v, _| (v - max) - log_sum);
                }
            }
        } else {
            for (s, &max) in sums[..rows].iter_mut().zip(maxes) {
                *s = if max.is_nan() { f32::NAN } else { 1.0 / *s };
            }
            if cols < LANES {
                let inv = &mut block.windows[0];
                spread::<M>(&block.spread, sums, inv, x.len());
                for (o, &inv) in e.iter_mut().zip(inv.iter()) {
                    *o *= inv;
                }
            } else {
                for (or, &inv) in e.chunks_exact_mut(cols).zip(sums.iter()) {
                    short_scale(or, inv);
                }
            }
        }
    }
}

/// Softmax, or log-softmax with `LOG`, of rows of fewer than [`SHORT_COLS`] columns.
#[inline(always)]
fn short_rows<M: MulAdd, const LOG: bool>(x: &[f32], y: &mut [f32], cols: usize, stream: bool) {
    short_row_blocks::<M, _>(x, y, cols, stream, &mut ShortSoftmax::<LOG>);
}

// ---------------------------------------------------------------------------------------------
// Row kernels. Each processes a block of whole rows and is generic over the arithmetic flavour;
// `multiversion!` builds the dispatching entry point.

#[inline(always)]
fn softmax_row<M: MulAdd>(x: &[f32], y: &mut [f32], stream: bool, scratch: &mut Vec<f32>) {
    let s = scan(x);
    if s.degenerate {
        y.fill(f32::NAN);
        return;
    }
    let max = s.max;
    if !stream {
        // Storing the exponentials and rescaling them costs one pass over `y` while it is in
        // cache, far less than evaluating exp a second time.
        let total = exp_store_sum::<M>(x, max, y);
        let inv = (1.0 / total) as f32;
        for v in y.iter_mut() {
            *v *= inv;
        }
    } else if x.len() <= SCRATCH_COLS {
        scratch.resize(x.len(), 0.0);
        let total = exp_store_sum::<M>(x, max, scratch);
        let inv = (1.0 / total) as f32;
        store_map::<M>(y, scratch, scratch, true, |e, _| e * inv);
    } else {
        let inv = (1.0 / sum_exp::<M>(x, max)) as f32;
        store_map::<M>(y, x, x, true, |v, _| exp_nonpositive::<M>(v - max) * inv);
    }
}

#[inline(always)]
fn softmax_rows<M: MulAdd>(
    x: &[f32],
    y: &mut [f32],
    cols: usize,
    stream: bool,
    scratch: &mut Vec<f32>,
) {
    if cols < SHORT_COLS {
        short_rows::<M, false>(x, y, cols, stream);
    } else {
        for (x, y) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
            softmax_row::<M>(x, y, stream, scratch);
        }
    }
    store_fence(stream);
}

#[inline(always)]
fn log_softmax_rows<M: MulAdd>(x: &[f32], y: &mut [f32], cols: usize, stream: bool) {
    if cols < SHORT_COLS {
        short_rows::<M, true>(x, y, cols, stream);
    } else {
        for (x, y) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
            let s = scan(x);
            if s.degenerate {
                y.fill(f32::NAN);
                continue;
            }
            let max = s.max;
            let log_sum = sum_exp::<M>(x, max).ln() as f32;
            // A -inf entry stays exactly -inf: -inf minus finite values is -inf in IEEE
            // arithmetic.
            store_map::<M>(y, x, x, stream, |v, _| (v - max) - log_sum);
        }
    }
    store_fence(stream);
}

/// Backward of rows of fewer than [`SHORT_COLS`] columns, a sub-block of rows at a time: each
/// row's reduction `r = sum_j term(y_j, dy_j)`, then `dx_j = grad(y_j, dy_j, r)`. Below LANES
/// columns the terms are summed by [`short_sums`] and the gradient runs as one flat pass across
/// rows; from LANES columns each row runs in whole vectors (see [`short_map2`]). Streamed
/// output leaves in whole lines, as in [`short_row_blocks`].
#[inline(always)]
fn short_backward_rows<M: MulAdd>(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    cols: usize,
    stream: bool,
    term: impl Fn(f32, f32) -> f32,
    grad: impl Fn(f32, f32, f32) -> f32,
) {
    let per_block = (SHORT_BLOCK / cols).max(1) * cols;
    let mut scratch = ShortScratch::for_cols(cols);
    let ShortScratch { block, built } = &mut *scratch;
    for ((yb, gb), db) in y
        .chunks(per_block)
        .zip(dy.chunks(per_block))
        .zip(dx.chunks_mut(per_block))
    {
        let out = if stream {
            &mut built[..yb.len()]
        } else {
            &mut *db
        };
        if cols < LANES {
            for ((o, &y), &g) in out.iter_mut().zip(yb).zip(gb) {
                *o = term(y, g);
            }
            short_sums::<M>(out, block);
            let r = &mut block.windows[0];
            spread::<M>(&block.spread, &block.sums, r, yb.len());
            for (((o, &y), &g), &r) in out.iter_mut().zip(yb).zip(gb).zip(r.iter()) {
                *o = grad(y, g, r);
            }
        } else {
            let rows = yb.chunks_exact(cols).zip(gb.chunks_exact(cols));
            for ((yr, gr), or) in rows.zip(out.chunks_exact_mut(cols)) {
                let r = short_fold(yr, gr, &term) as f32;
                short_map2(or, yr, gr, |y, g| grad(y, g, r));
            }
        }
        if stream {
            let out = &built[..yb.len()];
            store_map::<M>(db, out, out, true, |v, _| v);
        }
    }
}

/// The backward kernels: each row's reduction `sum_j term(y_j, dy_j)` (`reduce` computes it on
/// rows of at least [`SHORT_COLS`]), then `dx_j = grad(y_j, dy_j, reduction)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows<M: MulAdd>(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    cols: usize,
    stream: bool,
    term: impl Fn(f32, f32) -> f32,
    reduce: impl Fn(&[f32], &[f32]) -> f64,
    grad: impl Fn(f32, f32, f32) -> f32,
) {
    if cols < SHORT_COLS {
        short_backward_rows::<M>(y, dy, dx, cols, stream, term, grad);
    } else {
        for ((y, dy), dx) in y
            .chunks_exact(cols)
            .zip(dy.chunks_exact(cols))
            .zip(dx.chunks_exact_mut(cols))
        {
            let r = reduce(y, dy) as f32;
            store_map::<M>(dx, y, dy, stream, |y, g| grad(y, g, r));
        }
    }
    store_fence(stream);
}

/// Softmax backward's `dx_j` from `y_j`, `dy_j` and the row's `sum_k y_k dy_k`.
#[inline(always)]
fn softmax_grad(y: f32, g: f32, dot: f32) -> f32 {
    y * (g - dot)
}

/// Log-softmax backward's `dx_j` from `y_j`, `dy_j` and the row's `sum_k dy_k`.
#[inline(always)]
fn log_softmax_grad<M: MulAdd>(y: f32, g: f32, total: f32) -> f32 {
    M::mul_add(-exp::<M>(y), total, g)
}

#[inline(always)]
#[allow(clippy::redundant_closure)] // `dot` itself would go through a `Fn::call` shim (below)
fn softmax_backward_rows<M: MulAdd>(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    cols: usize,
    stream: bool,
) {
    // Closures marked to inline: a function item passed as `impl Fn` goes through a `Fn::call`
    // shim that is compiled without the instruction set of the build that calls it.
    backward_rows::<M>(
        y,
        dy,
        dx,
        cols,
        stream,
        #[inline(always)]
        |y, g| y * g,
        #[inline(always)]
        |y, dy| dot(y, dy),
        softmax_grad,
    );
}

#[inline(always)]
fn log_softmax_backward_rows<M: MulAdd>(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    cols: usize,
    stream: bool,
) {
    let total = |_: &[f32], dy: &[f32]| sum(dy);
    backward_rows::<M>(
        y,
        dy,
        dx,
        cols,
        stream,
        #[inline(always)]
        |_, g| g,
        total,
        log_softmax_grad::<M>,
    );
}

#[inline(always)]
fn jacobian_rows<M: MulAdd>(x: &[f32], jac: &mut [f32], cols: usize) {
    let mut s = vec![0.0f32; cols];
    let mut unused = Vec::new();
    for (x, jac) in x.chunks_exact(cols).zip(jac.chunks_exact_mut(cols * cols)) {
        softmax_row::<M>(x, &mut s, false, &mut unused);
        for (i, row) in jac.chunks_exact_mut(cols).enumerate() {
            let si = s[i];
            for (o, &sj) in row.iter_mut().zip(&s) {
                *o = -si * sj;
            }
            row[i] = si * (1.0 - si);
        }
    }
}

/// Builds `$name`, which runs `$kernel` compiled for the best instruction set the CPU offers,
/// and `$name_on`, which runs the build for a given (supported) instruction set; without
/// `$name`, only the latter.
macro_rules! multiversion {
    ($name:ident, $name_on:ident => $kernel:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        fn $name($($arg: $ty),*) {
            $name_on(isa(), $($arg),*)
        }

        multiversion!($name_on => $kernel($($arg: $ty),*));
    };
    ($name_on:ident => $kernel:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        fn $name_on(isa: Isa, $($arg: $ty),*) {
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $kernel::<Fused512>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $kernel::<Fused>($($arg),*)
                }
                match isa {
                    // SAFETY: callers pass an instruction set that `isa()` found, or one that
                    // `supported_isas()` lists.
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            let _ = isa;
            $kernel::<Separate>($($arg),*)
        }
    };
}

/// The instruction sets the kernels are built for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    Avx2,
    /// AVX-512F (with AVX2 and FMA): twice the lanes and registers of AVX2.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    Avx512,
}

/// The best instruction set this CPU supports.
pub(crate) fn isa() -> Isa {
    // The detection macro caches its answers, so this is a few relaxed loads.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if avx2 && std::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// The instruction set the kernels run with on this CPU: `avx512f`, `avx2+fma` or `baseline`.
pub fn instruction_set() -> &'static str {
    match isa() {
        Isa::Baseline => "baseline",
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        Isa::Avx2 => "avx2+fma",
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        Isa::Avx512 => "avx512f",
    }
}

/// Every instruction set this CPU can run, best last.
#[cfg(test)]
fn supported_isas() -> Vec<Isa> {
    let best = isa();
    let mut all = vec![Isa::Baseline];
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if best != Isa::Baseline {
            all.push(Isa::Avx2);
        }
        if best == Isa::Avx512 {
            all.push(Isa::Avx512);
        }
    }
    all
}

multiversion!(softmax_block, softmax_block_on => softmax_rows(
    x: &[f32], y: &mut [f32], cols: usize, stream: bool, scratch: &mut Vec<f32>
));
multiversion!(log_softmax_block, log_softmax_block_on => log_softmax_rows(
    x: &[f32], y: &mut [f32], cols: usize, stream: bool
));
multiversion!(softmax_backward_block, softmax_backward_block_on => softmax_backward_rows(
    y: &[f32], dy: &[f32], dx: &mut [f32], cols: usize, stream: bool
));
multiversion!(log_softmax_backward_block, log_softmax_backward_block_on => log_softmax_backward_rows(
    y: &[f32], dy: &[f32], dx: &mut [f32], cols: usize, stream: bool
));
multiversion!(jacobian_block, jacobian_block_on => jacobian_rows(x: &[f32], jac: &mut [f32], cols: usize));

mod along;
mod split;
use along::AlongOp;
use split::Split;

// ---------------------------------------------------------------------------------------------
// Parallel driver.

/// Splits `out` (`rows` rows of `out_per_row` elements) into blocks of whole rows and runs
/// `f(first_row, block)` on each, in parallel when there is enough work. `work_per_row` is the
/// number of elements a row's computation touches.
fn for_row_blocks(
    out: &mut [f32],
    rows: usize,
    out_per_row: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if rows == 0 {
        return;
    }
    let work_per_row = work_per_row.max(1);
    if rows.saturating_mul(work_per_row) <= SERIAL_ELEMS {
        f(0, out);
        return;
    }
    let rows_per_task = (TASK_ELEMS / work_per_row).clamp(1, rows);
    out.par_chunks_mut(rows_per_task * out_per_row)
        .enumerate()
        .for_each(|(i, block)| f(i * rows_per_task, block));
}

// ---------------------------------------------------------------------------------------------
// Public operations.

/// Whether a call whose operands (inputs and output) span `operand_bytes` writes its output with
/// non-temporal stores. Streaming skips the read-for-ownership that an ordinary store pays (a
/// third of the memory traffic of softmax) but sends the output past the caches. That pays off
/// only when the operands cannot stay in the last-level cache anyway: from three quarters of the
/// L3 up (the L3 as reported, at most [`MAX_L3_BYTES`]). Below it, ordinary stores leave the
/// output in L3 for whatever reads it next (the next layer, or the next call on the same
/// buffers).
fn streams(operand_bytes: usize) -> bool {
    static THRESHOLD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threshold = *THRESHOLD.get_or_init(|| {
        cache_size::l3_cache_size()
            .filter(|&l3| l3 > 0)
            .unwrap_or(DEFAULT_L3_BYTES)
            .min(MAX_L3_BYTES)
            / 4
            * 3
    });
    operand_bytes >= threshold
}

/// Row-wise softmax of a `rows x cols` batch: `exp(x_j - m) / sum_k exp(x_k - m)`.
pub fn softmax(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    validate::batch_rows("x", x.len(), cols)?;
    let mut out = vec![0.0; x.len()];
    softmax_into(x, cols, &mut out)?;
    Ok(out)
}

/// [`softmax`] into `out`, which must be as long as `x`.
pub fn softmax_into(x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    let rows = validate::batch_rows("x", x.len(), cols)?;
    validate::same_len("out", x.len(), out.len())?;
    let stream = streams(2 * std::mem::size_of_val(out));
    if let Some(split) = Split::for_batch(rows, cols) {
        split::softmax(x, out, cols, split, stream, isa());
        return Ok(());
    }
    for_row_blocks(out, rows, cols, cols, |r, y| {
        SCRATCH.with_borrow_mut(|scratch| {
            softmax_block(&x[r * cols..r * cols + y.len()], y, cols, stream, scratch);
        });
    });
    Ok(())
}

/// Row-wise log-softmax: `(x_j - m) - ln(sum_k exp(x_k - m))`.
pub fn log_softmax(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    validate::batch_rows("x", x.len(), cols)?;
    let mut out = vec![0.0; x.len()];
    log_softmax_into(x, cols, &mut out)?;
    Ok(out)
}

/// [`log_softmax`] into `out`, which must be as long as `x`.
pub fn log_softmax_into(x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    let rows = validate::batch_rows("x", x.len(), cols)?;
    validate::same_len("out", x.len(), out.len())?;
    let stream = streams(2 * std::mem::size_of_val(out));
    if let Some(split) = Split::for_batch(rows, cols) {
        split::log_softmax(x, out, cols, split, stream, isa());
        return Ok(());
    }
    for_row_blocks(out, rows, cols, cols, |r, y| {
        log_softmax_block(&x[r * cols..r * cols + y.len()], y, cols, stream);
    });
    Ok(())
}

fn check_backward(y: &[f32], dy: &[f32], cols: usize, out: &[f32]) -> Result<usize> {
    let rows = validate::batch_rows("y", y.len(), cols)?;
    validate::same_len("grad_output", y.len(), dy.len())?;
    validate::same_len("out", y.len(), out.len())?;
    Ok(rows)
}

/// Gradient through softmax from its output `y`: `dx_j = y_j * (dy_j - sum_k dy_k * y_k)`.
pub fn softmax_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f32>> {
    validate::batch_rows("y", y.len(), cols)?;
    validate::same_len("grad_output", y.len(), dy.len())?;
    let mut out = vec![0.0; y.len()];
    softmax_backward_into(y, dy, cols, &mut out)?;
    Ok(out)
}

/// [`softmax_backward`] into `out`, which must be as long as `y`.
pub fn softmax_backward_into(y: &[f32], dy: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    let rows = check_backward(y, dy, cols, out)?;
    let stream = streams(3 * std::mem::size_of_val(out));
    if let Some(split) = Split::for_batch(rows, cols) {
        split::backward(y, dy, out, cols, false, split, stream, isa());
        return Ok(());
    }
    for_row_blocks(out, rows, cols, cols, |r, dx| {
        let range = r * cols..r * cols + dx.len();
        softmax_backward_block(&y[range.clone()], &dy[range], dx, cols, stream);
    });
    Ok(())
}

/// Gradient through log-softmax from its output `y`: `dx_j = dy_j - exp(y_j) * sum_k dy_k`.
pub fn log_softmax_backward(y: &[f32], dy: &[f32], cols: usize) -> Result<Vec<f32>> {
    validate::batch_rows("y", y.len(), cols)?;
    validate::same_len("grad_output", y.len(), dy.len())?;
    let mut out = vec![0.0; y.len()];
    log_softmax_backward_into(y, dy, cols, &mut out)?;
    Ok(out)
}

/// [`log_softmax_backward`] into `out`, which must be as long as `y`.
pub fn log_softmax_backward_into(
    y: &[f32],
    dy: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    let rows = check_backward(y, dy, cols, out)?;
    let stream = streams(3 * std::mem::size_of_val(out));
    if let Some(split) = Split::for_batch(rows, cols) {
        split::backward(y, dy, out, cols, true, split, stream, isa());
        return Ok(());
    }
    for_row_blocks(out, rows, cols, cols, |r, dx| {
        let range = r * cols..r * cols + dx.len();
        log_softmax_backward_block(&y[range.clone()], &dy[range], dx, cols, stream);
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Along any axis.

/// Runs `op` over `layout`'s lines: the row kernels where the axis is the last, the kernels
/// along an axis ([`along`]) otherwise. `dy` is the backward ops' upstream gradient.
fn along_into(
    op: AlongOp,
    layout: AxisLayout,
    x: &[f32],
    dy: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let backward = dy.is_some();
    validate::same_len(
        if backward { "y" } else { "input" },
        layout.numel(),
        x.len(),
    )?;
    if let Some(dy) = dy {
        validate::same_len("grad_output", layout.numel(), dy.len())?;
    }
    validate::same_len("out", layout.numel(), out.len())?;
    let dy = dy.unwrap_or(&[]);
    if layout.inner() > 1 {
        along::run(op, layout, x, dy, out);
        return Ok(());
    }
    let cols = layout.len();
    match op {
        AlongOp::Softmax => softmax_into(x, cols, out),
        AlongOp::LogSoftmax => log_softmax_into(x, cols, out),
        AlongOp::SoftmaxBackward => softmax_backward_into(x, dy, cols, out),
        AlongOp::LogSoftmaxBackward => log_softmax_backward_into(x, dy, cols, out),
    }
}

/// Softmax along any axis ([`AxisLayout`]): each line along it as a row of [`softmax`]. The
/// last axis runs the row kernels; any other is computed in place, a block of neighbouring
/// lines at a time, each step down the axis a contiguous run of memory: nothing is transposed.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `input` unless `x` holds the
/// layout's elements.
pub fn softmax_along(x: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
    let mut out = vec![0.0; layout.numel()];
    along_into(AlongOp::Softmax, layout, x, None, &mut out)?;
    Ok(out)
}

/// [`softmax_along`] into `out`, which must be as long as `x`.
///
/// # Errors
/// As [`softmax_along`], and [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming
/// `out`.
pub fn softmax_along_into(x: &[f32], layout: AxisLayout, out: &mut [f32]) -> Result<()> {
    along_into(AlongOp::Softmax, layout, x, None, out)
}

/// Log-softmax along any axis; see [`softmax_along`].
///
/// # Errors
/// As [`softmax_along`].
pub fn log_softmax_along(x: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
    let mut out = vec![0.0; layout.numel()];
    along_into(AlongOp::LogSoftmax, layout, x, None, &mut out)?;
    Ok(out)
}

/// [`log_softmax_along`] into `out`, which must be as long as `x`.
///
/// # Errors
/// As [`softmax_along_into`].
pub fn log_softmax_along_into(x: &[f32], layout: AxisLayout, out: &mut [f32]) -> Result<()> {
    along_into(AlongOp::LogSoftmax, layout, x, None, out)
}

/// Softmax backward along any axis; see [`softmax_along`] and [`softmax_backward`].
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `y` or `grad_output` unless
/// each holds the layout's elements.
pub fn softmax_backward_along(y: &[f32], dy: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
    let mut out = vec![0.0; layout.numel()];
    along_into(AlongOp::SoftmaxBackward, layout, y, Some(dy), &mut out)?;
    Ok(out)
}

/// [`softmax_backward_along`] into `out`, which must be as long as `y`.
///
/// # Errors
/// As [`softmax_backward_along`], and naming `out`.
pub fn softmax_backward_along_into(
    y: &[f32],
    dy: &[f32],
    layout: AxisLayout,
    out: &mut [f32],
) -> Result<()> {
    along_into(AlongOp::SoftmaxBackward, layout, y, Some(dy), out)
}

/// Log-softmax backward along any axis; see [`softmax_along`] and [`log_softmax_backward`].
///
/// # Errors
/// As [`softmax_backward_along`].
pub fn log_softmax_backward_along(y: &[f32], dy: &[f32], layout: AxisLayout) -> Result<Vec<f32>> {
    let mut out = vec![0.0; layout.numel()];
    along_into(AlongOp::LogSoftmaxBackward, layout, y, Some(dy), &mut out)?;
    Ok(out)
}

/// [`log_softmax_backward_along`] into `out`, which must be as long as `y`.
///
/// # Errors
/// As [`softmax_backward_along_into`].
pub fn log_softmax_backward_along_into(
    y: &[f32],
    dy: &[f32],
    layout: AxisLayout,
    out: &mut [f32],
) -> Result<()> {
    along_into(AlongOp::LogSoftmaxBackward, layout, y, Some(dy), out)
}

/// Per row the `cols x cols` softmax Jacobian `J[i][j] = s_i * (delta_ij - s_j)`;
/// `rows * cols * cols` values, at most [`JACOBIAN_MAX_COLS`](super::JACOBIAN_MAX_COLS) columns.
pub fn softmax_jacobian(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    let rows = validate::jacobian_rows("x", x.len(), cols)?;
    let mut out = vec![0.0; rows * cols * cols];
    softmax_jacobian_into(x, cols, &mut out)?;
    Ok(out)
}

/// [`softmax_jacobian`] into `out`, which must hold `rows * cols * cols` values.
pub fn softmax_jacobian_into(x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    let rows = validate::jacobian_rows("x", x.len(), cols)?;
    validate::same_len("out", rows * cols * cols, out.len())?;
    for_row_blocks(out, rows, cols * cols, cols * cols, |r, jac| {
        let n = jac.len() / (cols * cols);
        jacobian_block(&x[r * cols..(r + n) * cols], jac, cols);
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// The per-call constants of a cross-entropy row kernel.
struct CeContext<'a> {
    plan: &'a CrossEntropyPlan<'a>,
    logits: &'a [f32],
    /// The class weights. Without weights: ones where a loop reads one per class (label
    /// smoothing, probability targets), so one code path serves both; otherwise empty, and the
    /// target's weight is 1.
    weight: &'a [f32],
    /// `e / C`.
    smooth: f32,
    /// `1 - e`.
    keep: f32,
    /// `sum_c w_c`.
    weight_sum: f64,
}

/// `sum_c [w_c != 0] w_c * ((x_c - max) - log_sum)`: the smoothing part of an index-target
/// loss, without the factor `e / C`.
#[inline(always)]
fn weighted_lsm_sum(x: &[f32], w: &[f32], max: f32, log_sum: f32) -> f64 {
    let mut total = 0.0f64;
    for (xb, wb) in x.chunks(SUM_BLOCK).zip(w.chunks(SUM_BLOCK)) {
        let mut acc = [0.0f32; LANES];
        let xc = xb.chunks_exact(LANES);
        let wc = wb.chunks_exact(LANES);
        let mut s = 0.0f32;
        for (&x, &w) in xc.remainder().iter().zip(wc.remainder()) {
            s += if w != 0.0 {
                w * ((x - max) - log_sum)
            } else {
                0.0
            };
        }
        for (xs, ws) in xc.zip(wc) {
            for i in 0..LANES {
                let term = ws[i] * ((xs[i] - max) - log_sum);
                acc[i] += if ws[i] != 0.0 { term } else { 0.0 };
            }
        }
        total += f64::from(lane_sum(acc) + s);
    }
    total
}

/// `(sum_c q_c, sum_c [q_c != 0] q_c * lsm_c)` for a probability target,
/// `q_c = w_c * ((1 - e) p_c + e / C)`.
#[inline(always)]
fn prob_target_sums(
    x: &[f32],
    p: &[f32],
    w: &[f32],
    keep: f32,
    smooth: f32,
    max: f32,
    log_sum: f32,
) -> (f64, f64) {
    let mut total_q = 0.0f64;
    let mut total_ql = 0.0f64;
    let term = |x: f32, p: f32, w: f32| {
        let q = w * (keep * p + smooth);
        let ql = q * ((x - max) - log_sum);
        (q, if q != 0.0 { ql } else { 0.0 })
    };
    for ((xb, pb), wb) in x
        .chunks(SUM_BLOCK)
        .zip(p.chunks(SUM_BLOCK))
        .zip(w.chunks(SUM_BLOCK))
    {
        let mut acc_q = [0.0f32; LANES];
        let mut acc_ql = [0.0f32; LANES];
        let xc = xb.chunks_exact(LANES);
        let pc = pb.chunks_exact(LANES);
        let wc = wb.chunks_exact(LANES);
        let (mut sq, mut sql) = (0.0f32, 0.0f32);
        for ((&x, &p), &w) in xc
            .remainder()
            .iter()
            .zip(pc.remainder())
            .zip(wc.remainder())
        {
            let (q, ql) = term(x, p, w);
            sq += q;
            sql += ql;
        }
        for ((xs, ps), ws) in xc.zip(pc).zip(wc) {
            for i in 0..LANES {
                let (q, ql) = term(xs[i], ps[i], ws[i]);
                acc_q[i] += q;
                acc_ql[i] += ql;
            }
        }
        total_q += f64::from(lane_sum(acc_q) + sq);
        total_ql += f64::from(lane_sum(acc_ql) + sql);
    }
    (total_q, total_ql)
}

/// Loss and gradient of the rows `first..first + losses.len()`; ignored rows are written as 0.
///
/// When `stream` is set, rows of up to [`SCRATCH_COLS`] columns are built in `scratch` (in
/// cache) and written out with non-temporal stores, as softmax does; otherwise in place. Rows of
/// fewer than [`SHORT_COLS`] columns take the short-row path, a sub-block of rows at a time.
#[inline(always)]
fn cross_entropy_rows<M: MulAdd>(
    ctx: &CeContext<'_>,
    first: usize,
    grad: &mut [f32],
    losses: &mut [f64],
    stream: bool,
    scratch: &mut Vec<f32>,
) {
    let cols = ctx.plan.cols;
    if cols < SHORT_COLS {
        let logits = &ctx.logits[first * cols..first * cols + grad.len()];
        let mut scratch = ShortCeScratch::kept();
        let mut work = ShortCrossEntropy::new(ctx, first, losses, &mut scratch);
        short_row_blocks::<M, _>(logits, grad, cols, stream, &mut work);
        store_fence(stream);
        return;
    }
    let stream = stream && cols <= SCRATCH_COLS;
    if stream {
        scratch.resize(cols, 0.0);
    }
    for (i, (out, loss)) in grad
        .chunks_exact_mut(cols)
        .zip(losses.iter_mut())
        .enumerate()
    {
        let r = first + i;
        if stream {
            *loss = cross_entropy_row::<M>(ctx, r, scratch);
            store_map::<M>(out, scratch, scratch, true, |v, _| v);
        } else {
            *loss = cross_entropy_row::<M>(ctx, r, out);
        }
    }
    store_fence(stream);
}

/// Cross-entropy of short rows: each row's loss and gradient from its exponentials.
struct ShortCrossEntropy<'a, 'c> {
    ctx: &'a CeContext<'c>,
    /// The call's first row in the batch.
    first: usize,
    losses: &'a mut [f64],
    s: &'a mut ShortCeScratch,
}

/// The per-row values of [`ShortCrossEntropy`] over a sub-block.
///
/// Every buffer is a whole number of cache lines, and in this order starts on one.
#[repr(C, align(64))]
struct ShortCeScratch {
    /// Each row's `ln sum_j e_j`.
    log_sums: [f32; SHORT_BLOCK],
    /// Index targets: each row's gradient is `a e_j - b w_j`, but for its target class, whose
    /// entry is `g_t`.
    a: PerRow,
    b: PerRow,
    g_t: [f32; SHORT_BLOCK],
    /// Below LANES columns, with class weights: the weight of each element's class over a
    /// sub-block.
    weights: [f32; SHORT_BLOCK],
    /// Index targets without smoothing: each row's target logit, its exponential, its weight
    /// and the row's gradient scale.
    x_t: [f32; SHORT_BLOCK],
    e_t: [f32; SHORT_BLOCK],
    w_t: [f32; SHORT_BLOCK],
    scales: [f64; SHORT_BLOCK],
    /// Index targets: where each row's target entry lies in the sub-block (the row's first
    /// entry for an ignored row), and the target class itself (0 there).
    at: [u32; SHORT_BLOCK],
    class: [u32; SHORT_BLOCK],
    /// Whether `at` and `class` hold the current sub-block's, and whether one of its rows is
    /// ignored.
    located: bool,
    ignored: bool,
}

impl ShortCeScratch {
    /// This thread's scratch.
    fn kept() -> Kept<Self> {
        Kept::take(&SHORT_CE_SCRATCH, || Self {
            log_sums: [0.0; SHORT_BLOCK],
            a: [0.0; SHORT_BLOCK + LANES],
            b: [0.0; SHORT_BLOCK + LANES],
            g_t: [0.0; SHORT_BLOCK],
            weights: [0.0; SHORT_BLOCK],
            x_t: [0.0; SHORT_BLOCK],
            e_t: [0.0; SHORT_BLOCK],
            w_t: [0.0; SHORT_BLOCK],
            scales: [0.0; SHORT_BLOCK],
            at: [0; SHORT_BLOCK],
            class: [0; SHORT_BLOCK],
            located: false,
            ignored: false,
        })
    }
}

impl<'a, 'c> ShortCrossEntropy<'a, 'c> {
    fn new(
        ctx: &'a CeContext<'c>,
        first: usize,
        losses: &'a mut [f64],
        s: &'a mut ShortCeScratch,
    ) -> Self {
        let cols = ctx.plan.cols;
        if cols < LANES && !ctx.weight.is_empty() {
            for row in s.weights.chunks_exact_mut(cols) {
                row.copy_from_slice(ctx.weight);
            }
        }
        s.located = false;
        Self {
            ctx,
            first,
            losses,
            s,
        }
    }
}

impl ShortCrossEntropy<'_, '_> {
    /// `at` and `class` for the index targets of the sub-block of `rows` rows at `first_row`.
    #[inline(always)]
    fn locate(&mut self, targets: &[i32], first_row: usize, rows: usize) {
        let cols = self.ctx.plan.cols;
        let first = self.first + first_row;
        // Flags rather than an early exit, so that the loop vectorises.
        let mut ignored = false;
        for (i, ((&t, at), class)) in targets[first..first + rows]
            .iter()
            .zip(&mut self.s.at)
            .zip(&mut self.s.class)
            .enumerate()
        {
            ignored |= t == IGNORED_ROW;
            *class = if t == IGNORED_ROW { 0 } else { t as u32 };
            *at = (i * cols) as u32 + *class;
        }
        (self.s.located, self.s.ignored) = (true, ignored);
    }

    /// The scalars of the index-target rows of a sub-block without label smoothing (`b = 0`), in
    /// loops over the rows that vectorise: the target entries are gathered first, then the
    /// arithmetic of [`index_scalars`] runs across rows. Rows that are ignored or degenerate
    /// get meaningless values, which the caller overwrites.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn index_rows<M: MulAdd>(
        &mut self,
        first_row: usize,
        targets: &[i32],
        x: &[f32],
        e: &[f32],
        maxes: &[f32],
        sums: &[f32],
    ) {
        let ctx = self.ctx;
        let w = ctx.weight;
        let rows = targets.len();
        let losses = &mut self.losses[first_row..first_row + rows];
        gather_rows::<M>(x, &self.s.at[..rows], &mut self.s.x_t[..rows]);
        gather_rows::<M>(e, &self.s.at[..rows], &mut self.s.e_t[..rows]);
        if w.is_empty() {
            self.s.w_t[..rows].fill(1.0);
        } else {
            gather_rows::<M>(w, &self.s.class[..rows], &mut self.s.w_t[..rows]);
        }
        let scales = &mut self.s.scales[..rows];
        ctx.plan.grad_scales(self.first + first_row, scales);
        for (i, loss) in losses.iter_mut().enumerate().take(rows) {
            let r = index_scalars(
                ctx,
                self.s.w_t[i],
                self.s.x_t[i],
                self.s.e_t[i],
                maxes[i],
                1.0 / sums[i],
                self.s.log_sums[i],
                scales[i],
            );
            *loss = r.loss;
            (self.s.a[i], self.s.b[i], self.s.g_t[i]) = (r.a, r.b, r.g_t);
        }
    }
}

impl ShortRowWork for ShortCrossEntropy<'_, '_> {
    /// With index targets and no label smoothing, each row's target logit.
    #[inline(always)]
    fn shifts<M: MulAdd>(&mut self, first_row: usize, x: &[f32], block: &mut ShortBlock) -> bool {
        let ctx = self.ctx;
        let CrossEntropyTargets::Indices(targets) = &ctx.plan.targets else {
            return false;
        };
        if ctx.smooth != 0.0 {
            return false;
        }
        let rows = x.len() / ctx.plan.cols;
        self.locate(targets, first_row, rows);
        gather_rows::<M>(x, &self.s.at[..rows], &mut block.maxes[..rows]);
        true
    }

    #[inline(always)]
    fn finish<M: MulAdd>(
        &mut self,
        first_row: usize,
        x: &[f32],
        e: &mut [f32],
        block: &mut ShortBlock,
    ) {
        let ctx = self.ctx;
        let cols = ctx.plan.cols;
        let rows = x.len() / cols;
        short_sums::<M>(e, block);
        let sums = &block.sums[..rows];
        for (l, &s) in self.s.log_sums.iter_mut().zip(sums) {
            *l = ln_normal(s);
        }
        let maxes = &block.maxes[..rows];
        if let CrossEntropyTargets::Indices(targets) = &ctx.plan.targets {
            if !self.s.located {
                self.locate(targets, first_row, rows);
            }
            self.s.located = false;
        }
        let losses = &mut self.losses[first_row..first_row + rows];
        let first = self.first + first_row;
        if let CrossEntropyTargets::Indices(targets) = &ctx.plan.targets {
            let targets = &targets[first..first + rows];
            let special = self.s.ignored | maxes.iter().fold(false, |any, m| any | m.is_nan());
            // Each row's scalars; ignored and degenerate rows are written after the flat pass.
            if ctx.smooth == 0.0 {
                self.index_rows::<M>(first_row, targets, x, e, maxes, sums);
            } else {
                for (i, (((&t, &max), &sum), &log_sum)) in targets
                    .iter()
                    .zip(maxes)
                    .zip(sums)
                    .zip(&self.s.log_sums)
                    .enumerate()
                {
                    if t == IGNORED_ROW || max.is_nan() {
                        (self.s.a[i], self.s.b[i]) = (0.0, 0.0);
                        continue;
                    }
                    let t = t as usize;
                    let at = i * cols;
                    let r = index_row(
                        ctx,
                        first + i,
                        t,
                        &x[at..at + cols],
                        e[at + t],
                        max,
                        f64::from(sum),
                        log_sum,
                    );
                    losses[i] = r.loss;
                    (self.s.a[i], self.s.b[i], self.s.g_t[i]) = (r.a, r.b, r.g_t);
                }
            }
            let losses = &mut self.losses[first_row..first_row + rows];
            if cols < LANES {
                // One flat pass across the rows.
                let [a, b] = &mut block.windows;
                spread::<M>(&block.spread, &self.s.a, a, x.len());
                if ctx.weight.is_empty() {
                    for (g, &a) in e.iter_mut().zip(a.iter()) {
                        *g *= a;
                    }
                } else {
                    spread::<M>(&block.spread, &self.s.b, b, x.len());
                    for (((g, &w), &a), &b) in e
                        .iter_mut()
                        .zip(&self.s.weights)
                        .zip(a.iter())
                        .zip(b.iter())
                    {
                        *g = M::mul_add(a, *g, -b * w);
                    }
                }
            } else {
                for ((g, &a), &b) in e.chunks_exact_mut(cols).zip(&self.s.a).zip(&self.s.b) {
                    index_row_grad::<M>(g, ctx.weight, a, b);
                }
            }
            if !special {
                for (&at, &g_t) in self.s.at[..rows].iter().zip(&self.s.g_t) {
                    e[at as usize] = g_t;
                }
                return;
            }
            for (i, ((&t, &max), loss)) in targets.iter().zip(maxes).zip(losses).enumerate() {
                let g = &mut e[i * cols..(i + 1) * cols];
                if t == IGNORED_ROW {
                    g.fill(0.0);
                    *loss = 0.0;
                } else if max.is_nan() {
                    g.fill(f32::NAN);
                    *loss = f64::NAN;
                } else {
                    g[t as usize] = self.s.g_t[i];
                }
            }
            return;
        }
        for (i, ((((g, x), &max), loss), (&sum, &log_sum))) in e
            .chunks_exact_mut(cols)
            .zip(x.chunks_exact(cols))
            .zip(maxes)
            .zip(losses.iter_mut())
            .zip(sums.iter().zip(&self.s.log_sums))
            .enumerate()
        {
            let r = first + i;
            *loss = if ctx.plan.is_ignored(r) {
                g.fill(0.0);
                0.0
            } else if max.is_nan() {
                g.fill(f32::NAN);
                f64::NAN
            } else {
                cross_entropy_finish::<M>(ctx, r, x, g, max, f64::from(sum), log_sum)
            };
        }
    }
}

/// Row `r`'s loss, its gradient written to `g`.
#[inline(always)]
fn cross_entropy_row<M: MulAdd>(ctx: &CeContext<'_>, r: usize, g: &mut [f32]) -> f64 {
    let cols = ctx.plan.cols;
    let x = &ctx.logits[r * cols..(r + 1) * cols];
    if ctx.plan.is_ignored(r) {
        g.fill(0.0);
        return 0.0;
    }
    let s = scan(x);
    if s.degenerate {
        g.fill(f32::NAN);
        return f64::NAN;
    }
    // The exponentials go to `g`, which stays in cache, and are reused below rather than
    // evaluated a second time.
    let total = exp_store_sum::<M>(x, s.max, g);
    cross_entropy_finish::<M>(ctx, r, x, g, s.max, total, total.ln() as f32)
}

/// The scalars of an index-target row's loss and gradient: the gradient is `a e_j - b w_j`
/// (`b = 0` without weights), but for the target class, whose entry is `g_t`.
struct IndexRow {
    loss: f64,
    a: f32,
    b: f32,
    g_t: f32,
}

/// Row `r`'s [`IndexRow`], with its target `t`, its logits `x`, their maximum `max`, `e_t =
/// exp(x_t - max)`, the sum `total` of the row's exponentials and its logarithm `log_sum`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn index_row(
    ctx: &CeContext<'_>,
    r: usize,
    t: usize,
    x: &[f32],
    e_t: f32,
    max: f32,
    total: f64,
    log_sum: f32,
) -> IndexRow {
    let w = ctx.weight;
    let w_t = if w.is_empty() { 1.0 } else { w[t] };
    let scale = ctx.plan.grad_scale(r);
    let inv = (1.0 / total) as f32;
    let mut row = index_scalars(ctx, w_t, x[t], e_t, max, inv, log_sum, scale);
    if ctx.smooth != 0.0 {
        // Class t's share of the smoothing is already in q_t.
        let others = weighted_lsm_sum(&x[..t], &w[..t], max, log_sum)
            + weighted_lsm_sum(&x[t + 1..], &w[t + 1..], max, log_sum);
        row.loss -= f64::from(ctx.smooth) * others;
    }
    row
}

/// An [`IndexRow`] but for the smoothing of the other classes' loss terms, from the target's
/// weight `w_t`, logit `x_t` and `e_t = exp(x_t - max)`, `inv`, the reciprocal of the row's sum
/// of exponentials, and the row's gradient `scale`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn index_scalars(
    ctx: &CeContext<'_>,
    w_t: f32,
    x_t: f32,
    e_t: f32,
    max: f32,
    inv: f32,
    log_sum: f32,
    scale: f64,
) -> IndexRow {
    let q_t = ctx.keep * w_t + ctx.smooth * w_t;
    let lsm_t = (x_t - max) - log_sum;
    let loss = if q_t != 0.0 {
        -f64::from(q_t) * f64::from(lsm_t)
    } else {
        0.0
    };
    let sum_q = f64::from(ctx.keep) * f64::from(w_t) + f64::from(ctx.smooth) * ctx.weight_sum;
    let s_t = e_t * inv;
    IndexRow {
        loss,
        a: (scale * sum_q) as f32 * inv,
        b: (scale * f64::from(ctx.smooth)) as f32,
        g_t: (scale * (f64::from(s_t) * sum_q - f64::from(q_t))) as f32,
    }
}

/// Turns `g`, a row's exponentials (or a chunk's), into `a e_j - b w_j`: the gradient of an
/// index-target row but for its target entry. `w` is empty without class weights or smoothing.
#[inline(always)]
fn index_row_grad<M: MulAdd>(g: &mut [f32], w: &[f32], a: f32, b: f32) {
    if w.is_empty() {
        // Unit weights without smoothing: b = 0 and the weight term is -0 for every class, so
        // this is the loop below, bit for bit.
        short_scale(g, a);
    } else {
        for (g, &w) in g.iter_mut().zip(w) {
            *g = M::mul_add(a, *g, -b * w);
        }
    }
}

/// Turns `g`, a row's exponentials (or a chunk's), into `a e_j - b q_j`: the gradient of a
/// probability-target row, `q_j = w_j (keep p_j + smooth)` the target's share of class `j`.
#[inline(always)]
fn prob_target_grad<M: MulAdd>(
    g: &mut [f32],
    p: &[f32],
    w: &[f32],
    keep: f32,
    smooth: f32,
    a: f32,
    b: f32,
) {
    for ((g, &p), &w) in g.iter_mut().zip(p).zip(w) {
        let q = w * M::mul_add(keep, p, smooth);
        *g = M::mul_add(a, *g, -b * q);
    }
}

/// Row `r`'s loss, with its logits `x`, their maximum `max` and `g` holding `exp(x_j - max)`,
/// whose sum is `total` and its logarithm `log_sum`; turns `g` into the row's gradient. Index
/// targets need at least LANES columns.
#[inline(always)]
fn cross_entropy_finish<M: MulAdd>(
    ctx: &CeContext<'_>,
    r: usize,
    x: &[f32],
    g: &mut [f32],
    max: f32,
    total: f64,
    log_sum: f32,
) -> f64 {
    let cols = ctx.plan.cols;
    let w = ctx.weight;
    match &ctx.plan.targets {
        CrossEntropyTargets::Indices(_) => {
            let t = ctx.plan.target(r).unwrap_or(0);
            let row = index_row(ctx, r, t, x, g[t], max, total, log_sum);
            index_row_grad::<M>(g, w, row.a, row.b);
            g[t] = row.g_t;
            row.loss
        }
        CrossEntropyTargets::Probabilities(p) => {
            let inv = (1.0 / total) as f32;
            let scale = ctx.plan.grad_scale(r);
            let p = &p[r * cols..(r + 1) * cols];
            let (sum_q, ql) = prob_target_sums(x, p, w, ctx.keep, ctx.smooth, max, log_sum);
            let a = (scale * sum_q) as f32 * inv;
            prob_target_grad::<M>(g, p, w, ctx.keep, ctx.smooth, a, scale as f32);
            -ql
        }
    }
}

multiversion!(cross_entropy_block_on => cross_entropy_rows(
    ctx: &CeContext<'_>, first: usize, grad: &mut [f32], losses: &mut [f64], stream: bool,
    scratch: &mut Vec<f32>
));

/// PyTorch's `F.cross_entropy` and `dL/dlogits` (times `grad_output`); the definitions are those
/// of [`reference::cross_entropy`](super::reference::cross_entropy).
pub fn cross_entropy(
    logits: &[f32],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
) -> Result<CrossEntropyOutput<f32>> {
    let plan = validate::cross_entropy(logits.len(), cols, targets, options, grad_output)?;
    let mut grad = vec![0.0; logits.len()];
    let stream = streams(2 * std::mem::size_of_val(&grad[..]));
    let split = Split::for_batch(plan.rows, cols);
    let loss = cross_entropy_planned(
        &plan,
        logits,
        GradOut::Into(&mut grad),
        stream,
        split,
        isa(),
    );
    Ok(CrossEntropyOutput { loss, grad })
}

/// [`cross_entropy`] writing the gradient into `grad` (as long as `logits`); returns the loss.
pub fn cross_entropy_into(
    logits: &[f32],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
    grad: &mut [f32],
) -> Result<Vec<f32>> {
    let plan = validate::cross_entropy(logits.len(), cols, targets, options, grad_output)?;
    validate::same_len("grad", logits.len(), grad.len())?;
    let stream = streams(2 * std::mem::size_of_val(grad));
    let split = Split::for_batch(plan.rows, cols);
    Ok(cross_entropy_planned(
        &plan,
        logits,
        GradOut::Into(grad),
        stream,
        split,
        isa(),
    ))
}

/// The loss of [`cross_entropy`] alone. The kernels work out each row's loss and gradient
/// together; here each task's gradient goes to a buffer of its thread's that stays in cache, so
/// the call allocates and writes nothing the size of the logits (but where a few very long rows
/// are split across threads).
pub fn cross_entropy_loss(
    logits: &[f32],
    cols: usize,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
) -> Result<Vec<f32>> {
    let plan = validate::cross_entropy(logits.len(), cols, targets, options, GradOutput::One)?;
    let split = Split::for_batch(plan.rows, cols);
    Ok(cross_entropy_planned(
        &plan,
        logits,
        GradOut::Dropped,
        false,
        split,
        isa(),
    ))
}

/// [`cross_entropy`] with the classes along `layout`'s axis, which need not be the last: logits
/// (and probability targets, and the gradient) `[N, C, d1, ...]` with the classes on axis 1,
/// index targets and per-line losses one per line in row-major order over the other axes; see
/// [`Along::cross_entropy`](crate::Along::cross_entropy). Read in place as the softmax along an
/// axis is: a task takes a block of neighbouring lines and walks down the axis, each step a
/// contiguous run vectorised across the lines; nothing is transposed.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) naming `logits` unless it holds the
/// layout's elements, and as [`cross_entropy`].
pub fn cross_entropy_along(
    logits: &[f32],
    layout: AxisLayout,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
) -> Result<CrossEntropyOutput<f32>> {
    let mut grad = vec![0.0; logits.len()];
    let loss = cross_entropy_along_into(logits, layout, targets, options, grad_output, &mut grad)?;
    Ok(CrossEntropyOutput { loss, grad })
}

/// [`cross_entropy_along`] writing the gradient into `grad` (as long as `logits`); returns the
/// loss.
///
/// # Errors
/// As [`cross_entropy_along`], and [`Error::LengthMismatch`](crate::Error::LengthMismatch)
/// naming `grad`; `grad` is untouched when the arguments are refused.
pub fn cross_entropy_along_into(
    logits: &[f32],
    layout: AxisLayout,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_>,
    grad: &mut [f32],
) -> Result<Vec<f32>> {
    validate::same_len("logits", layout.numel(), logits.len())?;
    if layout.inner() == 1 {
        return cross_entropy_into(logits, layout.len(), targets, options, grad_output, grad);
    }
    let plan = validate::cross_entropy(logits.len(), layout.len(), targets, options, grad_output)?;
    validate::same_len("grad", logits.len(), grad.len())?;
    Ok(cross_entropy_lines(
        &plan,
        layout,
        logits,
        Some(grad),
        isa(),
    ))
}

/// The loss of [`cross_entropy_along`] alone.
///
/// # Errors
/// As [`cross_entropy_along`].
pub fn cross_entropy_loss_along(
    logits: &[f32],
    layout: AxisLayout,
    targets: Targets<'_>,
    options: &CrossEntropyOptions<'_>,
) -> Result<Vec<f32>> {
    validate::same_len("logits", layout.numel(), logits.len())?;
    if layout.inner() == 1 {
        return cross_entropy_loss(logits, layout.len(), targets, options);
    }
    let plan = validate::cross_entropy(
        logits.len(),
        layout.len(),
        targets,
        options,
        GradOutput::One,
    )?;
    Ok(cross_entropy_lines(&plan, layout, logits, None, isa()))
}

/// [`cross_entropy_along`] on a validated plan, with the kernels built for `isa`: the lines'
/// losses, reduced as the plan says.
fn cross_entropy_lines(
    plan: &CrossEntropyPlan<'_>,
    layout: AxisLayout,
    logits: &[f32],
    grad: Option<&mut [f32]>,
    isa: Isa,
) -> Vec<f32> {
    let cols = plan.cols;
    let e = plan.label_smoothing;
    let (indices, probabilities) = match &plan.targets {
        CrossEntropyTargets::Indices(t) => (Some(&t[..]), None),
        CrossEntropyTargets::Probabilities(p) => (None, Some(*p)),
    };
    let lines = along::LossLines {
        plan,
        indices,
        probabilities,
        smooth: e / cols as f32,
        keep: 1.0 - e,
        weight_sum: plan
            .weight
            .map_or(cols as f64, |w| w.iter().map(|&w| f64::from(w)).sum()),
    };
    let losses = along::cross_entropy(isa, &lines, layout, logits, grad);
    match plan.reduction {
        Reduction::None => losses.iter().map(|&l| l as f32).collect(),
        // From +0: the sum over no lines is 0; their mean 0 / 0.
        Reduction::Mean | Reduction::Sum => reduced(plan, task_sum(&losses)),
    }
}

/// Where [`cross_entropy_planned`] puts the gradient.
enum GradOut<'g> {
    /// Into the caller's buffer, as long as the logits.
    Into(&'g mut [f32]),
    /// Nowhere: each task's rows go to a buffer of its thread's.
    Dropped,
}

/// Runs `task` on each block of `rows_per_task` rows (the last one shorter) with the block's
/// gradient: its part of `grad`'s buffer, or a buffer of the thread's when the gradient is
/// dropped; in parallel unless `serial`. Returns the tasks' results in order.
fn for_grad_blocks<T: Send>(
    grad: GradOut<'_>,
    rows: usize,
    cols: usize,
    rows_per_task: usize,
    serial: bool,
    task: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    match grad {
        GradOut::Into(grad) if serial => vec![task(0, grad)],
        GradOut::Into(grad) => grad
            .par_chunks_mut(rows_per_task * cols)
            .enumerate()
            .map(|(i, g)| task(i, g))
            .collect(),
        GradOut::Dropped => {
            let dropped = |i: usize, len: usize| {
                DROPPED_GRAD.with_borrow_mut(|g| {
                    if g.len() < len {
                        g.resize(len, 0.0);
                    }
                    task(i, &mut g[..len])
                })
            };
            if serial {
                return vec![dropped(0, rows * cols)];
            }
            (0..rows.div_ceil(rows_per_task))
                .into_par_iter()
                .map(|i| dropped(i, (rows - i * rows_per_task).min(rows_per_task) * cols))
                .collect()
        }
    }
}

/// The losses of a validated call, the gradient written where `grad` says, built for `isa`;
/// `stream`: whether the gradient is written with non-temporal stores (but where rows are
/// split); `split`: how rows are cut across threads, if they are.
fn cross_entropy_planned(
    plan: &CrossEntropyPlan<'_>,
    logits: &[f32],
    grad: GradOut<'_>,
    stream: bool,
    split: Option<Split>,
    isa: Isa,
) -> Vec<f32> {
    let cols = plan.cols;
    let e = plan.label_smoothing;
    let per_class = e != 0.0 || matches!(plan.targets, CrossEntropyTargets::Probabilities(_));
    let ones;
    let weight = match plan.weight {
        Some(w) => w,
        None if per_class => {
            ones = vec![1.0f32; cols];
            &ones[..]
        }
        None => &[],
    };
    let ctx = CeContext {
        plan,
        logits,
        weight,
        smooth: e / cols as f32,
        keep: 1.0 - e,
        weight_sum: plan
            .weight
            .map_or(cols as f64, |w| w.iter().map(|&w| f64::from(w)).sum()),
    };
    // Every row is read about three times.
    let rows_per_task = (TASK_ELEMS / cols).clamp(1, plan.rows.max(1));
    let serial = plan.rows * cols <= SERIAL_ELEMS;
    let block = |first: usize, g: &mut [f32], l: &mut [f64]| {
        SCRATCH.with_borrow_mut(|scratch| {
            cross_entropy_block_on(isa, &ctx, first, g, l, stream, scratch);
        });
    };
    if plan.rows == 0 {
        // The sum over no rows is 0; the mean is 0 / 0.
        return match plan.reduction {
            Reduction::None => Vec::new(),
            Reduction::Sum => vec![0.0],
            Reduction::Mean => vec![(0.0 / plan.mean_denominator) as f32],
        };
    }
    if let Some(split) = split {
        let mut whole = Vec::new();
        let grad = match grad {
            GradOut::Into(grad) => grad,
            GradOut::Dropped => {
                whole.resize(logits.len(), 0.0);
                &mut whole[..]
            }
        };
        let losses = split::cross_entropy(&ctx, grad, split, isa);
        if plan.reduction == Reduction::None {
            return losses.iter().map(|&l| l as f32).collect();
        }
        return reduced(plan, losses.iter().fold(0.0, |sum, &l| sum + l));
    }
    // Each task's losses in a buffer of its thread's: converted to f32 for `None`, added up in
    // the task otherwise; the tasks' results are put together in order, so nothing depends on
    // the threads.
    let task = |i: usize, g: &mut [f32]| {
        LOSSES.with_borrow_mut(|losses| {
            losses.resize(g.len() / cols, 0.0);
            block(i * rows_per_task, g, losses);
            match plan.reduction {
                Reduction::None => (losses.iter().map(|&l| l as f32).collect(), 0.0),
                Reduction::Mean | Reduction::Sum => (Vec::new(), task_sum(losses)),
            }
        })
    };
    let tasks = for_grad_blocks(grad, plan.rows, cols, rows_per_task, serial, task);
    if plan.reduction == Reduction::None {
        return tasks.into_iter().flat_map(|(losses, _)| losses).collect();
    }
    reduced(plan, tasks.iter().fold(0.0, |sum, &(_, total)| sum + total))
}

/// The sum of a task's row losses, in eight interleaved partial sums (one chain of dependent
/// additions took a twentieth of cross-entropy's time on 4 columns). From +0: the sum over no
/// rows is 0, where `Iterator::sum` would give -0.
fn task_sum(losses: &[f64]) -> f64 {
    let mut partial = [0.0f64; 8];
    let mut chunks = losses.chunks_exact(8);
    for c in &mut chunks {
        for (p, &l) in partial.iter_mut().zip(c) {
            *p += l;
        }
    }
    let rest = chunks.remainder().iter().fold(0.0, |sum, &l| sum + l);
    partial.iter().fold(rest, |sum, &p| sum + p)
}

/// The loss of a call with a reduction whose rows' losses add up to `total`.
fn reduced(plan: &CrossEntropyPlan<'_>, total: f64) -> Vec<f32> {
    match plan.reduction {
        Reduction::Mean => vec![(total / plan.mean_denominator) as f32],
        Reduction::Sum | Reduction::None => vec![total as f32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::Rng;
    use crate::error::Error;

    const INF: f32 = f32::INFINITY;

    /// Compares elementwise; NaN must match NaN and infinities must match exactly. Returns the
    /// largest absolute and relative errors seen.
    fn compare(
        what: &str,
        actual: &[f32],
        expected: &[f64],
        abs: f64,
        rel: f64,
        either: bool,
    ) -> (f64, f64) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let a = f64::from(a);
            if e.is_nan() || e.is_infinite() {
                assert!(
                    (e.is_nan() && a.is_nan()) || a == e,
                    "{what}[{i}]: got {a}, expected {e}"
                );
                continue;
            }
            let err = (a - e).abs();
            let r = if e != 0.0 { err / e.abs() } else { 0.0 };
            max_abs = max_abs.max(err);
            if e.abs() > 1e-3 {
                max_rel = max_rel.max(r);
            }
            let ok = if either {
                err <= abs || err <= rel * e.abs()
            } else {
                err <= abs + rel * e.abs()
            };
            assert!(ok, "{what}[{i}]: got {a}, expected {e} (error {err:e})");
        }
        (max_abs, max_rel)
    }

    /// Checks a backward pass against the reference with a bound per element from the magnitudes
    /// of the terms that make it up (`scale`), since the result itself may be the small
    /// difference of large terms.
    fn check_backward(what: &str, actual: &[f32], expected: &[f64], scale: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        for (i, ((&a, &e), &s)) in actual.iter().zip(expected).zip(scale).enumerate() {
            let err = (f64::from(a) - e).abs();
            assert!(
                err <= 4e-6 * s + 1e-30,
                "{what}[{i}]: got {a}, expected {e} (error {err:e}, scale {s:e})"
            );
        }
    }

    /// Per element, `|y_j| * (|dy_j| + sum_k |dy_k y_k|)`.
    fn softmax_backward_scale(y: &[f32], dy: &[f32], cols: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(y.len());
        for (y, dy) in y.chunks(cols).zip(dy.chunks(cols)) {
            let dot: f64 = y
                .iter()
                .zip(dy)
                .map(|(&y, &d)| f64::from(y * d).abs())
                .sum();
            out.extend(
                y.iter()
                    .zip(dy)
                    .map(|(&y, &d)| f64::from(y).abs() * (f64::from(d).abs() + dot)),
            );
        }
        out
    }

    /// Per element, `|dy_j| + exp(y_j) * sum_k |dy_k|`.
    fn log_softmax_backward_scale(y: &[f32], dy: &[f32], cols: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(y.len());
        for (y, dy) in y.chunks(cols).zip(dy.chunks(cols)) {
            let total: f64 = dy.iter().map(|&d| f64::from(d).abs()).sum();
            out.extend(
                y.iter()
                    .zip(dy)
                    .map(|(&y, &d)| f64::from(d).abs() + f64::from(y).exp() * total),
            );
        }
        out
    }

    /// `v` with every non-finite value replaced by 0: finite gradients need finite inputs.
    fn finite(v: &[f64]) -> Vec<f32> {
        v.iter()
            .map(|&v| if v.is_finite() { v as f32 } else { 0.0 })
            .collect()
    }

    /// Checks `backward(y, log, dx)` against the reference's softmax backward from `probs` and
    /// its log-softmax backward (`log`) from `log_probs`, with upstream gradient `dy`.
    fn check_backward_pair(
        what: &str,
        probs: &[f32],
        log_probs: &[f32],
        dy: &[f32],
        cols: usize,
        mut backward: impl FnMut(&[f32], bool, &mut [f32]),
    ) {
        let mut dx = vec![f32::NAN; dy.len()];
        backward(probs, false, &mut dx);
        check_backward(
            &format!("softmax_backward {what}"),
            &dx,
            &reference::softmax_backward(probs, dy, cols).unwrap(),
            &softmax_backward_scale(probs, dy, cols),
        );
        backward(log_probs, true, &mut dx);
        check_backward(
            &format!("log_softmax_backward {what}"),
            &dx,
            &reference::log_softmax_backward(log_probs, dy, cols).unwrap(),
            &log_softmax_backward_scale(log_probs, dy, cols),
        );
    }

    fn check_softmax(what: &str, actual: &[f32], expected: &[f64]) -> (f64, f64) {
        compare(what, actual, expected, 1e-6, 1e-5, true)
    }

    fn check_log_softmax(what: &str, actual: &[f32], expected: &[f64]) -> (f64, f64) {
        compare(what, actual, expected, 1e-5, 1e-5, false)
    }

    /// Cross-entropy losses and gradient against the reference's.
    /// The options the cross-entropy tests sweep, with an upstream gradient for each: no class
    /// weights and `w`, no label smoothing and 0.2, each reduction (`per_row` upstream for
    /// `None`, -1.5 otherwise).
    fn option_grid<'a>(
        w: &'a [f32],
        per_row: &'a [f32],
    ) -> Vec<(CrossEntropyOptions<'a>, GradOutput<'a>)> {
        let mut cases = Vec::new();
        for weight in [None, Some(w)] {
            for label_smoothing in [0.0, 0.2] {
                for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                    let o = CrossEntropyOptions {
                        weight,
                        ignore_index: -100,
                        reduction,
                        label_smoothing,
                    };
                    let g = match reduction {
                        Reduction::None => GradOutput::PerRow(per_row),
                        _ => GradOutput::Scalar(-1.5),
                    };
                    cases.push((o, g));
                }
            }
        }
        cases
    }

    fn check_cross_entropy(
        what: &str,
        loss: &[f32],
        grad: &[f32],
        want: &reference::CrossEntropyOutput<f64>,
    ) {
        compare(&format!("loss {what}"), loss, &want.loss, 1e-5, 1e-5, false);
        compare(&format!("grad {what}"), grad, &want.grad, 1e-6, 1e-5, true);
    }

    /// Rows of random probabilities, each summing to 1.
    fn probability_rows(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
        let mut probs = rng.uniforms(rows * cols);
        for row in probs.chunks_mut(cols) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|p| *p /= s);
        }
        probs
    }

    /// Random class weights in [0, 2), every seventh from class 3 zero.
    fn class_weights(rng: &mut Rng, classes: usize) -> Vec<f32> {
        (0..classes)
            .map(|c| {
                if c % 7 == 3 {
                    0.0
                } else {
                    rng.uniform() as f32 * 2.0
                }
            })
            .collect()
    }

    /// Logits with a few degenerate and `-inf`-holding rows mixed in.
    fn logits(rng: &mut Rng, rows: usize, cols: usize, sigma: f64) -> Vec<f32> {
        let mut x = rng.normals(rows * cols, sigma);
        if rows >= 6 {
            x[cols] = f32::NEG_INFINITY;
            x[2 * cols + cols / 2] = f32::NAN;
            x[3 * cols + cols - 1] = INF;
            x[4 * cols..5 * cols].fill(f32::NEG_INFINITY);
            x[5 * cols..6 * cols]
                .iter_mut()
                .step_by(2)
                .for_each(|v| *v = f32::NEG_INFINITY);
        }
        x
    }

    const SHAPES: &[(usize, usize)] = &[
        (0, 5),
        (1, 1),
        (3, 7),
        (6, 16),
        (7, 33),
        (300, 40),
        (9, 159),
        (33, 2049),
        (70_000, 10),
        (4, 300_000),
        (2, 50_000),
        (300, 1000),
        // Split across threads (where there are several).
        (1, 800_001),
    ];

    #[test]
    fn exp_is_accurate_and_handles_special_values() {
        fn check<M: MulAdd>() -> f64 {
            let mut worst = 0.0f64;
            let mut x = -86.5f32;
            while x <= 88.7 {
                let got = f64::from(exp::<M>(x));
                let want = f64::from(x).exp();
                worst = worst.max((got - want).abs() / want);
                x += 0.000_37;
            }
            for (x, want) in [
                (f32::NEG_INFINITY, 0.0),
                (-1000.0, 0.0),
                (-87.0, 0.0),
                (0.0, 1.0),
                (89.0, f32::INFINITY),
                (INF, f32::INFINITY),
            ] {
                assert_eq!(exp::<M>(x), want, "exp({x})");
            }
            assert!(exp::<M>(f32::NAN).is_nan());
            worst
        }
        let worst = check::<Separate>();
        assert!(worst < 4e-7, "exp relative error {worst:e}");
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            let worst = check::<Fused>();
            assert!(worst < 4e-7, "exp (fused) relative error {worst:e}");
        }
    }

    #[test]
    fn streaming_starts_by_three_quarters_of_at_most_48_mib() {
        // Whatever L3 the CPU reports (a VM reports the host's), a call on 36 MiB of operands
        // streams; one on a few KiB never does.
        assert!(streams(MAX_L3_BYTES / 4 * 3));
        assert!(!streams(64 << 10));
    }

    #[test]
    fn ln_normal_is_accurate() {
        // Every short row's sum lies in [1, 160); the rest checks the exponent handling.
        let rel = |x: f32| {
            let want = f64::from(x).ln();
            let err = (f64::from(ln_normal(x)) - want).abs();
            if want == 0.0 {
                err
            } else {
                err / want.abs()
            }
        };
        let mut worst = 0.0f64;
        let mut x = 1.0f32;
        while x < 256.0 {
            worst = worst.max(rel(x));
            x = f32::from_bits(x.to_bits() + 97);
        }
        for x in [
            f32::MIN_POSITIVE,
            1e-30,
            1e-10,
            0.5,
            std::f32::consts::FRAC_1_SQRT_2,
            0.999_999,
            1.000_001,
            std::f32::consts::SQRT_2,
            1e10,
            1e30,
            f32::MAX,
        ] {
            worst = worst.max(rel(x));
        }
        assert_eq!(ln_normal(1.0), 0.0);
        assert!(worst < 2.5e-7, "ln relative error {worst:e}");
    }

    #[test]
    fn softmax_and_log_softmax_match_reference() {
        let mut rng = Rng::new(11);
        let (mut sm, mut lsm) = ((0.0f64, 0.0f64), (0.0f64, 0.0f64));
        for &(rows, cols) in SHAPES {
            for sigma in [1.0, 10.0] {
                let x = logits(&mut rng, rows, cols, sigma);
                let what = format!("{rows}x{cols} sigma {sigma}");
                let (a, r) = check_softmax(
                    &format!("softmax {what}"),
                    &softmax(&x, cols).unwrap(),
                    &reference::softmax(&x, cols).unwrap(),
                );
                sm = (sm.0.max(a), sm.1.max(r));
                let (a, r) = check_log_softmax(
                    &format!("log_softmax {what}"),
                    &log_softmax(&x, cols).unwrap(),
                    &reference::log_softmax(&x, cols).unwrap(),
                );
                lsm = (lsm.0.max(a), lsm.1.max(r));
            }
        }
        println!("softmax max abs error {:e}, max rel error {:e}", sm.0, sm.1);
        println!(
            "log_softmax max abs error {:e}, max rel error {:e}",
            lsm.0, lsm.1
        );
    }

    #[test]
    fn every_build_and_store_path_matches_reference() {
        let mut rng = Rng::new(12);
        for &(rows, cols) in &[
            (37, 1),
            (300, 4),
            (9, 5),
            (230, 7),
            (75, 15),
            (9, 40),
            (7, 159),
            (6, 1000),
            (6, SCRATCH_COLS + 3),
        ] {
            let x = logits(&mut rng, rows, cols, 4.0);
            let want = reference::softmax(&x, cols).unwrap();
            let want_log = reference::log_softmax(&x, cols).unwrap();
            let (want_f32, want_log_f32) = (finite(&want), finite(&want_log));
            for stream in [false, true] {
                for isa in supported_isas() {
                    let what = format!("{isa:?} stream {stream} {rows}x{cols}");
                    let mut y = vec![0.0; x.len()];
                    let mut scratch = Vec::new();
                    softmax_block_on(isa, &x, &mut y, cols, stream, &mut scratch);
                    check_softmax(&format!("softmax {what}"), &y, &want);
                    log_softmax_block_on(isa, &x, &mut y, cols, stream);
                    check_log_softmax(&format!("log_softmax {what}"), &y, &want_log);
                    // An odd start address exercises the unaligned head of streaming stores.
                    let mut z = vec![0.0; x.len() + 1];
                    softmax_block_on(
                        isa,
                        &x[..cols],
                        &mut z[1..=cols],
                        cols,
                        stream,
                        &mut scratch,
                    );
                    check_softmax(&format!("unaligned {what}"), &z[1..=cols], &want[..cols]);
                    let dy = rng.normals(rows * cols, 1.0);
                    let (probs, log_probs) = (&want_f32[..], &want_log_f32[..]);
                    check_backward_pair(&what, probs, log_probs, &dy, cols, |y, log, dx| {
                        if log {
                            log_softmax_backward_block_on(isa, y, &dy, dx, cols, stream);
                        } else {
                            softmax_backward_block_on(isa, y, &dy, dx, cols, stream);
                        }
                    });
                }
            }
        }
    }

    #[test]
    fn hand_values_and_special_rows() {
        assert_eq!(
            softmax(&[1000.0, 0.0, 0.0, 0.0], 4).unwrap(),
            [1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(log_softmax(&[1000.0, 1.0], 2).unwrap(), [0.0, -999.0]);
        let x = [
            0.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0,
        ];
        let s = softmax(&x, 2).unwrap();
        assert_eq!(s[..2], [1.0, 0.0]);
        assert!(s[2..].iter().all(|v| v.is_nan()));
        let l = log_softmax(&x, 2).unwrap();
        assert_eq!(l[..2], [0.0, f32::NEG_INFINITY]);
        assert!(l[2..].iter().all(|v| v.is_nan()));
        let s = softmax(&[1.0, INF, 2.0, 3.0], 2).unwrap();
        assert!(s[0].is_nan() && s[1].is_nan() && s[2].is_finite());
    }

    #[test]
    fn short_softmax_rows_shift_by_their_first_element_within_the_bound() {
        let cols = 10;
        let rows = SHORT_BLOCK / cols;
        let mut rng = Rng::new(21);
        // Rows whose first element is 0 and whose others lie within `reach` of it.
        let mut from_zero = |rows: usize, reach: f32| -> Vec<f32> {
            let mut x = rng.uniforms(rows * cols);
            x.iter_mut().for_each(|v| *v = (*v - 0.5) * 2.0 * reach);
            x.iter_mut().step_by(cols).for_each(|v| *v = 0.0);
            x
        };
        let x = from_zero(rows, 63.9);
        let mut block = ShortBlock::new(cols);
        let mut e = vec![0.0; x.len()];
        let first_shift = |x: &[f32], e: &mut [f32], block: &mut ShortBlock| {
            first_element_shifts::<Separate>(x, block);
            shifted_exps::<Separate>(x, e, block)
        };
        assert!(first_shift(&x, &mut e, &mut block));
        for (&got, &x) in e.iter().zip(&x) {
            let want = f64::from(x).exp();
            assert!(
                (f64::from(got) - want).abs() <= 4e-7 * want,
                "exp({x}) gave {got}"
            );
        }
        // One element at the bound, or NaN or -inf, leaves the sub-block to the rows' maxima.
        for bad in [SHIFT_BOUND, -SHIFT_BOUND, f32::NAN, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[7 * cols + 3] = bad;
            assert!(!first_shift(&y, &mut e, &mut block));
        }

        // Through the op, both ways (a sub-block with an element beyond the bound, the next
        // ones within it), against the reference, on every instruction set.
        let rows = 3 * rows;
        let mut x = from_zero(rows, 63.5);
        x[5] = 100.0;
        let want = reference::softmax(&x, cols).unwrap();
        for isa in supported_isas() {
            let mut y = vec![0.0; x.len()];
            softmax_block_on(isa, &x, &mut y, cols, false, &mut Vec::new());
            check_softmax(&format!("{isa:?} rows of 10 out to 63.5"), &y, &want);
        }
        // Still invariant under translation, bitwise, where `x + c` is exact (integers within
        // 31 of 0, so within the bound of their rows' first elements).
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 63) as f32 - 31.0)
            .collect();
        assert!(first_shift(&x[..e.len()], &mut e, &mut block));
        let base = softmax(&x, cols).unwrap();
        for c in [1e4f32, 1e7] {
            let shifted: Vec<f32> = x.iter().map(|v| v + c).collect();
            assert_eq!(softmax(&shifted, cols).unwrap(), base, "offset {c}");
        }
    }

    #[test]
    fn translation_invariance() {
        let mut rng = Rng::new(13);
        let x: Vec<f32> = (0..50 * 40).map(|_| rng.below(30) as f32 - 15.0).collect();
        let shifted: Vec<f32> = x.iter().map(|v| v + 1e7).collect();
        assert_eq!(softmax(&x, 40).unwrap(), softmax(&shifted, 40).unwrap());
        assert_eq!(
            log_softmax(&x, 40).unwrap(),
            log_softmax(&shifted, 40).unwrap()
        );
    }

    #[test]
    fn short_cross_entropy_rows_shift_by_their_target_logit_within_the_bound() {
        let cols = 10;
        let rows = 3 * SHORT_BLOCK / cols;
        let mut rng = Rng::new(22);
        // Confident rows: the target logit 60 above the row's first element and 8-11 above the
        // others, so each loss is about 1e-4 to 1e-3, where an f32 loss has about 6e-8 of
        // absolute error from its sum of exponentials (`ln(1 + s)`, with `1 + s` rounded) but
        // a shift other than the target's or the maximum's would add the rounding of ~60.
        let targets: Vec<i64> = (0..rows).map(|_| 1 + rng.below(cols - 1) as i64).collect();
        let mut x = vec![0.0f32; rows * cols];
        for (row, &t) in x.chunks_exact_mut(cols).zip(&targets) {
            for v in &mut row[1..] {
                // Eighths, so that `x + c` below is exact.
                *v = 49.0 + rng.below(24) as f32 / 8.0;
            }
            row[t as usize] = 60.0;
        }
        // One sub-block with a row beyond the bound of its target (the rows' maxima then), the
        // others within it.
        x[7 * cols] = -10.0;
        let options = CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        };
        let targets = Targets::Indices(&targets);
        let want = reference::cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
        let plan =
            validate::cross_entropy(x.len(), cols, targets, &options, GradOutput::One).unwrap();
        for isa in supported_isas() {
            let mut grad = vec![0.0; x.len()];
            let got = cross_entropy_planned(&plan, &x, GradOut::Into(&mut grad), false, None, isa);
            let what = format!("{isa:?} confident rows of 10");
            check_cross_entropy(&what, &got, &grad, &want);
            for (r, (&l, &w)) in got.iter().zip(&want.loss).enumerate() {
                assert!(
                    (f64::from(l) - w).abs() <= 2e-7,
                    "{what}: row {r} loss {l}, want {w}"
                );
            }
        }
        // Invariant under translation, bitwise, loss and gradient (`x + c` is exact here).
        let base = cross_entropy(&x, cols, targets, &options, GradOutput::One).unwrap();
        for c in [1e3f32, 1e5] {
            let shifted: Vec<f32> = x.iter().map(|v| v + c).collect();
            let moved = cross_entropy(&shifted, cols, targets, &options, GradOutput::One).unwrap();
            assert_eq!(moved.loss, base.loss, "loss, offset {c}");
            assert_eq!(moved.grad, base.grad, "grad, offset {c}");
        }
    }

    /// The short-row kernels keep their buffers across calls on a thread: a call after calls of
    /// other widths and class weights gives what it gave before them.
    #[test]
    fn short_row_buffers_kept_across_calls_of_other_shapes() {
        let mut rng = Rng::new(23);
        // With and without label smoothing (where the class weights reach every element).
        fn options(w: &[f32]) -> [CrossEntropyOptions<'_>; 2] {
            [0.0, 0.1].map(|label_smoothing| CrossEntropyOptions {
                weight: Some(w),
                label_smoothing,
                ..Default::default()
            })
        }
        let run = |x: &[f32], cols: usize, targets: &[i64], w: &[f32]| {
            let ce = options(w).map(|o| {
                cross_entropy(x, cols, Targets::Indices(targets), &o, GradOutput::One).unwrap()
            });
            (softmax(x, cols).unwrap(), ce)
        };
        // Small enough to run on this thread.
        let cases: Vec<_> = [10, 4, 13, 10]
            .iter()
            .map(|&cols| {
                let rows = 37;
                let x = rng.normals(rows * cols, 2.0);
                let t: Vec<i64> = (0..rows).map(|_| rng.below(cols) as i64).collect();
                let w: Vec<f32> = (0..cols).map(|_| 0.5 + rng.uniform() as f32).collect();
                (x, cols, t, w)
            })
            .collect();
        let first: Vec<_> = cases.iter().map(|(x, c, t, w)| run(x, *c, t, w)).collect();
        for (i, (x, cols, t, w)) in cases.iter().enumerate().rev() {
            let (y, ce) = run(x, *cols, t, w);
            assert_eq!(y, first[i].0, "softmax, case {i}");
            for ((ce, before), o) in ce.iter().zip(&first[i].1).zip(options(w)) {
                let what = format!("case {i} smoothing {}", o.label_smoothing);
                assert_eq!(ce.loss, before.loss, "cross-entropy loss, {what}");
                assert_eq!(ce.grad, before.grad, "cross-entropy gradient, {what}");
                let want =
                    reference::cross_entropy(x, *cols, Targets::Indices(t), &o, GradOutput::One);
                check_cross_entropy(&what, &ce.loss, &ce.grad, &want.unwrap());
            }
        }
    }

    /// A reduced loss adds each task's rows in eight partial sums and the tasks in order: the
    /// same bits on one thread as on three, and as the reference within f32 rounding.
    #[test]
    fn reduced_cross_entropy_does_not_depend_on_the_threads() {
        let mut rng = Rng::new(24);
        let (rows, cols) = (70_003, 10);
        let x = rng.normals(rows * cols, 2.0);
        let t: Vec<i64> = (0..rows).map(|_| rng.below(cols) as i64).collect();
        for reduction in [Reduction::Sum, Reduction::Mean] {
            let o = CrossEntropyOptions {
                reduction,
                ..Default::default()
            };
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    cross_entropy(&x, cols, Targets::Indices(&t), &o, GradOutput::One).unwrap()
                })
            };
            let (one, three) = (run(1), run(3));
            assert_eq!(one.loss, three.loss, "{reduction:?}");
            assert_eq!(one.grad, three.grad, "{reduction:?}");
            let want =
                reference::cross_entropy(&x, cols, Targets::Indices(&t), &o, GradOutput::One);
            check_cross_entropy(
                &format!("{reduction:?}"),
                &one.loss,
                &one.grad,
                &want.unwrap(),
            );
        }
    }

    #[test]
    fn backward_and_jacobian_match_reference() {
        let mut rng = Rng::new(14);
        for &(rows, cols) in SHAPES {
            let x = rng.normals(rows * cols, 3.0);
            let dy = rng.normals(rows * cols, 1.0);
            let y = softmax(&x, cols).unwrap();
            check_backward(
                "softmax_backward",
                &softmax_backward(&y, &dy, cols).unwrap(),
                &reference::softmax_backward(&y, &dy, cols).unwrap(),
                &softmax_backward_scale(&y, &dy, cols),
            );
            let l = log_softmax(&x, cols).unwrap();
            check_backward(
                "log_softmax_backward",
                &log_softmax_backward(&l, &dy, cols).unwrap(),
                &reference::log_softmax_backward(&l, &dy, cols).unwrap(),
                &log_softmax_backward_scale(&l, &dy, cols),
            );
            if cols <= JACOBIAN_MAX_COLS && rows * cols * cols <= 1 << 22 {
                compare(
                    "softmax_jacobian",
                    &softmax_jacobian(&x, cols).unwrap(),
                    &reference::softmax_jacobian(&x, cols).unwrap(),
                    1e-6,
                    1e-5,
                    true,
                );
            }
        }
        let x = logits(&mut rng, 8, 9, 2.0);
        compare(
            "softmax_jacobian special rows",
            &softmax_jacobian(&x, 9).unwrap(),
            &reference::softmax_jacobian(&x, 9).unwrap(),
            1e-6,
            1e-5,
            true,
        );
        let x = rng.normals(3 * JACOBIAN_MAX_COLS, 2.0);
        compare(
            "softmax_jacobian widest",
            &softmax_jacobian(&x, JACOBIAN_MAX_COLS).unwrap(),
            &reference::softmax_jacobian(&x, JACOBIAN_MAX_COLS).unwrap(),
            1e-6,
            1e-5,
            true,
        );
    }

    /// Cross-entropy along an axis that is not the last, read in place, with every
    /// instruction set this CPU runs: blocks as wide as and wider than a task's lines, slabs
    /// walked flat (fewer than 32 lines, or fewer than 64 not a multiple of 16), one class,
    /// long lines summed in blocks, one task and many, every option, special values and ignored
    /// lines (their gradient exactly 0), against the reference on the lines moved last.
    #[test]
    fn cross_entropy_along_an_axis_matches_reference() {
        // Two threads whatever the machine: which walk a layout takes depends on them (the one
        // narrow slab of 1x20000x5 streams where whole slabs would leave threads idle).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let mut rng = Rng::new(16);
            for &(outer, classes, inner) in &[
                (2, 5, 3),
                (3, 21, 64),
                (2, 33, 130),
                (1, 3000, 7),
                (5, 1, 7),
                (40, 40, 40),
                (3, 50, 32),
                (2, 17, 16),
                (64, 300, 6),
                (2, 7, 2500),
                // Streamed in chunks of 512 classes (see `along::streamed`); a narrow slab streamed
                // in chunks of whole periods.
                (1, 2100, 64),
                (1, 20000, 5),
            ] {
                let layout = AxisLayout::from_parts(outer, classes, inner).unwrap();
                let lines = layout.lines();
                // Lines in row form: degenerate ones mixed in, as for rows, and line 6 -inf over
                // its first half (whole chunks of a streamed line) and far below 0 over the other,
                // which holds its target.
                let mut rows = logits(&mut rng, lines, classes, 3.0);
                if lines > 6 {
                    let (low, high) = rows[6 * classes..][..classes].split_at_mut(classes / 2);
                    low.fill(f32::NEG_INFINITY);
                    high.iter_mut().for_each(|v| *v -= 1000.0);
                }
                let x = layout.from_rows(&rows).unwrap();
                let mut idx: Vec<i64> = (0..lines).map(|_| rng.below(classes) as i64).collect();
                if lines > 6 {
                    idx[1] = -100;
                    idx[4] = -100; // the all -inf line is ignored
                    idx[6] = classes as i64 - 1;
                }
                let prob_rows = probability_rows(&mut rng, lines, classes);
                let probs = layout.from_rows(&prob_rows).unwrap();
                let w = class_weights(&mut rng, classes);
                let per_line = rng.normals(lines, 1.0);
                for (targets, row_targets) in [
                    (Targets::Indices(&idx), Targets::Indices(&idx)),
                    (
                        Targets::Probabilities(&probs),
                        Targets::Probabilities(&prob_rows),
                    ),
                ] {
                    for (o, g) in option_grid(&w, &per_line) {
                        let want =
                            reference::cross_entropy(&rows, classes, row_targets, &o, g).unwrap();
                        let want = reference::CrossEntropyOutput {
                            loss: want.loss,
                            grad: layout.from_rows(&want.grad).unwrap(),
                        };
                        let plan =
                            validate::cross_entropy(x.len(), classes, targets, &o, g).unwrap();
                        for isa in supported_isas() {
                            let mut grad = vec![0.5; x.len()];
                            let loss = cross_entropy_lines(&plan, layout, &x, Some(&mut grad), isa);
                            let what = format!(
                                "{outer}x{classes}x{inner} {isa:?} {:?} e={} \
                                         weighted={} probabilities={}",
                                o.reduction,
                                o.label_smoothing,
                                o.weight.is_some(),
                                matches!(targets, Targets::Probabilities(_))
                            );
                            check_cross_entropy(&what, &loss, &grad, &want);
                            let alone = cross_entropy_lines(&plan, layout, &x, None, isa);
                            assert_eq!(
                                alone.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                                loss.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                                "{what}: loss alone"
                            );
                            if let Targets::Indices(t) = targets {
                                for (line, _) in t.iter().enumerate().filter(|(_, &t)| t == -100) {
                                    let (o, i) = (line / inner, line % inner);
                                    for c in 0..classes {
                                        let g = grad[(o * classes + c) * inner + i];
                                        assert_eq!(g.to_bits(), 0, "{what}: ignored line");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
    }

    #[test]
    fn cross_entropy_matches_reference() {
        let mut rng = Rng::new(15);
        for &(rows, cols) in &[
            (1, 1),
            (7, 5),
            (64, 100),
            (2000, 17),
            (70_000, 10),
            (3, 50_000),
            (40, 2049),
        ] {
            let x = logits(&mut rng, rows, cols, 3.0);
            let mut idx: Vec<i64> = (0..rows).map(|_| rng.below(cols) as i64).collect();
            if rows > 3 {
                idx[1] = -100;
                idx[4] = -100; // the all -inf row is ignored
            }
            let idx32: Vec<i32> = idx.iter().map(|&v| v as i32).collect();
            let probs = probability_rows(&mut rng, rows, cols);
            let w = class_weights(&mut rng, cols);
            let per_row = rng.normals(rows, 1.0);
            for targets in [
                Targets::Indices(&idx),
                Targets::IndicesI32(&idx32),
                Targets::Probabilities(&probs),
            ] {
                for (o, g) in option_grid(&w, &per_row) {
                    let got = cross_entropy(&x, cols, targets, &o, g).unwrap();
                    let want = reference::cross_entropy(&x, cols, targets, &o, g).unwrap();
                    let what = format!("{rows}x{cols} {o:?} {targets:?}");
                    let what = &what[..what.len().min(200)];
                    check_cross_entropy(what, &got.loss, &got.grad, &want);
                    if let Targets::Indices(t) = targets {
                        for (r, &t) in t.iter().enumerate() {
                            if t == -100 {
                                assert!(got.grad[r * cols..(r + 1) * cols]
                                    .iter()
                                    .all(|&v| v == 0.0));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The loss alone is the fused call's loss, bit for bit: one task and many, short rows and
    /// long ones, rows split across threads, every reduction and kind of target; and the same
    /// errors.
    #[test]
    fn loss_alone_is_the_loss_of_the_fused_call() {
        let mut rng = Rng::new(23);
        for &(rows, cols) in &[
            (0, 3),
            (1, 1),
            (9, 5),
            (5000, 10),
            (700, 40),
            (300, 1000),
            (3, 5000),
            (1, 800_000),
        ] {
            let x = logits(&mut rng, rows, cols, 3.0);
            let idx: Vec<i64> = (0..rows)
                .map(|r| {
                    if r % 7 == 1 {
                        -100
                    } else {
                        rng.below(cols) as i64
                    }
                })
                .collect();
            let probs = probability_rows(&mut rng, rows, cols);
            let w: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 3) as f32 * 0.25).collect();
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for (weight, label_smoothing) in [(None, 0.0), (Some(&w[..]), 0.1)] {
                    for reduction in [Reduction::None, Reduction::Mean, Reduction::Sum] {
                        let o = CrossEntropyOptions {
                            weight,
                            label_smoothing,
                            reduction,
                            ..Default::default()
                        };
                        let fused = cross_entropy(&x, cols, targets, &o, GradOutput::One)
                            .unwrap()
                            .loss;
                        let alone = cross_entropy_loss(&x, cols, targets, &o).unwrap();
                        let bits = |v: &[f32]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
                        let what =
                            format!("{rows}x{cols} {reduction:?} smoothing {label_smoothing}");
                        assert_eq!(bits(&alone), bits(&fused), "{what}");
                        // Rows split across threads whatever the machine's thread count.
                        let plan =
                            validate::cross_entropy(x.len(), cols, targets, &o, GradOutput::One)
                                .unwrap();
                        if let Some(split) = split::Split::with_chunk(cols, 1024) {
                            let mut grad = vec![0.0; x.len()];
                            let fused = cross_entropy_planned(
                                &plan,
                                &x,
                                GradOut::Into(&mut grad),
                                false,
                                Some(split),
                                isa(),
                            );
                            let alone = cross_entropy_planned(
                                &plan,
                                &x,
                                GradOut::Dropped,
                                false,
                                Some(split),
                                isa(),
                            );
                            assert_eq!(bits(&alone), bits(&fused), "{what}, split");
                        }
                    }
                }
            }
        }
        let error =
            cross_entropy_loss(&[0.0; 6], 3, Targets::Indices(&[0, 3]), &Default::default());
        assert!(
            matches!(
                error,
                Err(Error::TargetOutOfRange {
                    row: 1,
                    value: 3,
                    ..
                })
            ),
            "{error:?}"
        );
    }

    /// Cross-entropy with and without non-temporal stores, on every instruction set, on rows
    /// that fit the scratch row and one that does not, into an aligned and a misaligned gradient.
    #[test]
    fn cross_entropy_build_and_store_paths_match_reference() {
        let mut rng = Rng::new(16);
        for &(rows, cols) in &[
            (37, 1),
            (300, 4),
            (9, 5),
            (230, 7),
            (9, 40),
            // Sub-blocks without the ignored row.
            (130, 17),
            (60, 40),
            (6, 1000),
            (2, SCRATCH_COLS),
            (2, SCRATCH_COLS + 3),
        ] {
            let x = logits(&mut rng, rows, cols, 3.0);
            let idx: Vec<i64> = (0..rows)
                .map(|r| if r == 1 { -100 } else { rng.below(cols) as i64 })
                .collect();
            let probs = probability_rows(&mut rng, rows, cols);
            let w: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 3) as f32 * 0.25).collect();
            let per_row = rng.normals(rows, 1.0);
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for (weight, label_smoothing) in
                    [(None, 0.0), (Some(&w[..]), 0.0), (Some(&w[..]), 0.1)]
                {
                    let o = CrossEntropyOptions {
                        weight,
                        label_smoothing,
                        reduction: Reduction::None,
                        ..Default::default()
                    };
                    let g = GradOutput::PerRow(&per_row);
                    let want = reference::cross_entropy(&x, cols, targets, &o, g).unwrap();
                    let plan = validate::cross_entropy(x.len(), cols, targets, &o, g).unwrap();
                    for stream in [false, true] {
                        for isa in supported_isas() {
                            for offset in [0, 1] {
                                let what = format!(
                                    "{isa:?} stream {stream} offset {offset} {rows}x{cols} \
                                     smoothing {label_smoothing} {}",
                                    if weight.is_some() {
                                        "weighted"
                                    } else {
                                        "unweighted"
                                    }
                                );
                                let mut grad = vec![f32::NAN; x.len() + offset];
                                let grad = &mut grad[offset..];
                                let loss = cross_entropy_planned(
                                    &plan,
                                    &x,
                                    GradOut::Into(grad),
                                    stream,
                                    None,
                                    isa,
                                );
                                check_cross_entropy(&what, &loss, grad, &want);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Logits for the split tests: [`logits`]' special rows, and rows whose maximum lies in one
    /// chunk far above the others, whose chunks are all `-inf` but one, and whose target logit is
    /// `-inf`.
    fn split_logits(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
        let mut x = logits(rng, rows, cols, 3.0);
        x[6 * cols + cols - 3] += 1e4;
        x[7 * cols..7 * cols + cols / 2].fill(f32::NEG_INFINITY);
        x[8 * cols + 2] = f32::NEG_INFINITY;
        x
    }

    #[test]
    fn split_rows_match_reference() {
        let mut rng = Rng::new(21);
        // Chunks of 48, and of 16 with a 13-column last one; both with stream on and off.
        for &(rows, cols, chunk) in &[(9, 500, 48), (10, 61, 16)] {
            let split = Split::with_chunk(cols, chunk).unwrap();
            let x = split_logits(&mut rng, rows, cols);
            let want = reference::softmax(&x, cols).unwrap();
            let want_log = reference::log_softmax(&x, cols).unwrap();
            let (want_f32, want_log_f32) = (finite(&want), finite(&want_log));
            let dy = rng.normals(rows * cols, 1.0);
            for stream in [false, true] {
                for isa in supported_isas() {
                    let what = format!("{isa:?} stream {stream} {rows}x{cols} chunk {chunk}");
                    let mut y = vec![f32::NAN; x.len()];
                    split::softmax(&x, &mut y, cols, split, stream, isa);
                    check_softmax(&format!("softmax {what}"), &y, &want);
                    split::log_softmax(&x, &mut y, cols, split, stream, isa);
                    check_log_softmax(&format!("log_softmax {what}"), &y, &want_log);
                    let (probs, log_probs) = (&want_f32[..], &want_log_f32[..]);
                    check_backward_pair(&what, probs, log_probs, &dy, cols, |y, log, dx| {
                        split::backward(y, &dy, dx, cols, log, split, stream, isa);
                    });
                }
            }
            // Targets in every chunk, the ignored row 1, and row 8's target at its -inf logit.
            let idx: Vec<i64> = (0..rows)
                .map(|r| match r {
                    1 => -100,
                    8 => 2,
                    _ => rng.below(cols) as i64,
                })
                .collect();
            let probs = probability_rows(&mut rng, rows, cols);
            let w: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 3) as f32 * 0.25).collect();
            let per_row = rng.normals(rows, 1.0);
            for targets in [Targets::Indices(&idx), Targets::Probabilities(&probs)] {
                for (weight, label_smoothing) in [
                    (None, 0.0),
                    (None, 0.2),
                    (Some(&w[..]), 0.0),
                    (Some(&w[..]), 0.1),
                ] {
                    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                        let o = CrossEntropyOptions {
                            weight,
                            label_smoothing,
                            reduction,
                            ..Default::default()
                        };
                        let g = GradOutput::PerRow(&per_row);
                        let g = if reduction == Reduction::None {
                            g
                        } else {
                            GradOutput::Scalar(0.75)
                        };
                        let want = reference::cross_entropy(&x, cols, targets, &o, g).unwrap();
                        let plan = validate::cross_entropy(x.len(), cols, targets, &o, g).unwrap();
                        for isa in supported_isas() {
                            let what = format!(
                                "{isa:?} {rows}x{cols} chunk {chunk} {reduction:?} smoothing \
                                 {label_smoothing} weighted {}",
                                weight.is_some()
                            );
                            let mut grad = vec![f32::NAN; x.len()];
                            let loss = cross_entropy_planned(
                                &plan,
                                &x,
                                GradOut::Into(&mut grad),
                                false,
                                Some(split),
                                isa,
                            );
                            check_cross_entropy(&what, &loss, &grad, &want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_split_only_where_whole_rows_leave_threads_idle() {
        let plan =
            |rows, cols, threads| Split::plan(rows, cols, threads).map(|s| (s.chunk, s.per_row));
        // One or three long rows on two threads are cut, into four chunks a thread.
        assert_eq!(plan(1, 1 << 22, 2), Some((1 << 19, 8)));
        assert_eq!(plan(3, 1 << 20, 2), Some((349_536, 3)));
        // Rows that divide among the threads, or four a thread, are not.
        assert_eq!(plan(2, 1 << 22, 2), None);
        assert_eq!(plan(5, 1 << 22, 16), Some((322_640, 13)));
        assert_eq!(plan(64, 1 << 22, 16), None);
        // Nor are rows that stay in a core's cache, nor anything on one thread.
        assert_eq!(plan(0, 1 << 22, 2), None);
        assert_eq!(plan(1, (3 << 18) - 1, 2), None);
        assert_eq!(plan(1, 3 << 18, 2), Some((98_304, 8)));
        assert_eq!(plan(1, 1 << 22, 1), None);
    }

    #[test]
    fn errors_leave_outputs_untouched() {
        let mut out = [7.0f32; 4];
        assert!(matches!(
            softmax_into(&[0.0; 4], 0, &mut out),
            Err(Error::ZeroCols)
        ));
        assert!(matches!(
            log_softmax_into(&[0.0; 3], 2, &mut out),
            Err(Error::LengthNotMultiple {
                what: "x",
                len: 3,
                cols: 2
            })
        ));
        assert!(matches!(
            softmax_into(&[0.0; 6], 2, &mut out),
            Err(Error::LengthMismatch {
                what: "out",
                expected: 6,
                actual: 4
            })
        ));
        assert!(matches!(
            softmax_backward_into(&[0.0; 4], &[0.0; 2], 2, &mut out),
            Err(Error::LengthMismatch {
                what: "grad_output",
                expected: 4,
                actual: 2
            })
        ));
        assert!(matches!(
            log_softmax_backward(&[0.0; 4], &[0.0; 4], 3),
            Err(Error::LengthNotMultiple { what: "y", .. })
        ));
        assert!(matches!(
            softmax_jacobian_into(&[0.0; 2], 2, &mut out[..3]),
            Err(Error::LengthMismatch {
                what: "out",
                expected: 4,
                actual: 3
            })
        ));
        assert!(matches!(
            softmax_jacobian(&[0.0; 1025], 1025),
            Err(Error::JacobianTooWide {
                cols: 1025,
                max: 1024
            })
        ));
        assert!(matches!(
            cross_entropy_into(
                &[0.0; 4],
                2,
                Targets::Indices(&[0, 2]),
                &CrossEntropyOptions::default(),
                GradOutput::One,
                &mut out,
            ),
            Err(Error::TargetOutOfRange {
                row: 1,
                value: 2,
                classes: 2,
                ignore_index: -100
            })
        ));
        assert!(matches!(
            cross_entropy_into(
                &[0.0; 4],
                2,
                Targets::Indices(&[0, 1]),
                &CrossEntropyOptions::default(),
                GradOutput::One,
                &mut out[..3],
            ),
            Err(Error::LengthMismatch {
                what: "grad",
                expected: 4,
                actual: 3
            })
        ));
        assert_eq!(out, [7.0; 4]);
    }

    proptest::proptest! {
        #[test]
        fn softmax_matches_reference_on_random_batches(
            cols in 1usize..300,
            rows in 0usize..20,
            seed in proptest::num::u64::ANY,
            scale in 0.01f64..50.0,
        ) {
            let x = Rng::new(seed).normals(rows * cols, scale);
            check_softmax("softmax", &softmax(&x, cols).unwrap(), &reference::softmax(&x, cols).unwrap());
            check_log_softmax(
                "log_softmax",
                &log_softmax(&x, cols).unwrap(),
                &reference::log_softmax(&x, cols).unwrap(),
            );
            let s = softmax(&x, cols).unwrap();
            for row in s.chunks(cols) {
                let total: f64 = row.iter().map(|&v| f64::from(v)).sum();
                proptest::prop_assert!((total - 1.0).abs() < 1e-5);
            }
        }
    }
}
