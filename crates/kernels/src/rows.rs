//! Row-wise ops of the forward pass (RMSNorm, rotary embedding) on f32 or bf16 rows, rounding as
//! libtorch rounds each op of the tensor form in that dtype. Why hand-written: at decode each is a
//! few hundred values, and the tensor form costs 6-9 libtorch ops (~1 µs each) per call, dozens of
//! calls per step.

use crate::pool::SendPtr;
use crate::{bf16_bits, bf16_to_f32, pool};

/// An element type of activations: f32, or bf16 bits (u16).
pub trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
    /// Rounds to this type (bf16: nearest even), kept as f32.
    fn round(v: f32) -> f32;
    fn put(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn put(v: f32) -> f32 {
        v
    }
}

impl Elem for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        bf16_to_f32(self)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        bf16_to_f32(bf16_bits(v))
    }
    #[inline(always)]
    fn put(v: f32) -> u16 {
        bf16_bits(v)
    }
}

/// Rows per task when a call is big enough to spread over the pool (prefill).
const ROWS_PER_TASK: usize = 64;

/// `out = T(T(x · rsqrt(mean(x²) + eps)) · w)` per row of `x [rows, dim]`, statistics in f32 (the
/// order transformers uses: normalise in f32, round, then scale in the activation dtype).
pub fn rms_norm<T: Elem>(x: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let dim = w.len();
    assert!(dim > 0 && x.len().is_multiple_of(dim) && out.len() == x.len());
    let op = SendPtr(out.as_mut_ptr());
    by_row_tasks(x.len() / dim, &|r| {
        // SAFETY: row r belongs to this task; `out` has `x`'s length.
        let o = unsafe { std::slice::from_raw_parts_mut(op.get().add(r * dim), dim) };
        norm_row(&x[r * dim..(r + 1) * dim], w, eps, o);
    });
}

/// The residual add and the RMSNorm after it, in one pass: `h = T(x + a)` and `out = rms_norm(h)`
/// per row. Each decoder layer has two (before its FFN, and the next layer's input norm); fused,
/// each saves a libtorch add and a pass over the row. Bitwise equal to the add then [`rms_norm`].
pub fn add_rms_norm<T: Elem>(x: &[T], a: &[T], w: &[T], eps: f32, h: &mut [T], out: &mut [T]) {
    let dim = w.len();
    assert!(dim > 0 && x.len().is_multiple_of(dim) && a.len() == x.len());
    assert!(h.len() == x.len() && out.len() == x.len());
    let (hp, op) = (SendPtr(h.as_mut_ptr()), SendPtr(out.as_mut_ptr()));
    by_row_tasks(x.len() / dim, &|r| {
        let (xr, ar) = (&x[r * dim..(r + 1) * dim], &a[r * dim..(r + 1) * dim]);
        // SAFETY: row r belongs to this task; `h` and `out` have `x`'s length.
        let (hr, o) = unsafe {
            (
                std::slice::from_raw_parts_mut(hp.get().add(r * dim), dim),
                std::slice::from_raw_parts_mut(op.get().add(r * dim), dim),
            )
        };
        for ((hv, &xv), &av) in hr.iter_mut().zip(xr).zip(ar) {
            *hv = T::put(xv.get() + av.get());
        }
        norm_row(hr, w, eps, o);
    });
}

/// Runs `row(r)` for every row, [`ROWS_PER_TASK`] rows a pool task.
fn by_row_tasks(rows: usize, row: &(dyn Fn(usize) + Sync)) {
    let run = |t: usize| (t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows)).for_each(row);
    pool::global().for_each(rows.div_ceil(ROWS_PER_TASK), &run);
}

/// One row of [`rms_norm`].
#[inline(always)]
fn norm_row<T: Elem>(xr: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let ss: f32 = xr.iter().map(|v| v.get() * v.get()).sum();
    let inv = 1.0 / (ss / w.len() as f32 + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(xr).zip(w) {
        *o = T::put(T::round(v.get() * inv) * g.get());
    }
}

/// Where the rotary part of each row sits: `rows × heads` vectors of `2 · half` values, vector
/// (r, h) starting at `offset + r * row_stride + h * head_stride`.
#[derive(Clone, Copy, Debug)]
pub struct RopeLayout {
    pub rows: usize,
    pub heads: usize,
    pub half: usize,
    pub offset: usize,
    pub row_stride: usize,
    pub head_stride: usize,
}

/// Rotates contiguous halves, `[x1 c − x2 s ; x2 c + x1 s]` with `cos`/`sin [rows, half]`, each
/// product and sum rounded to T as the tensor form does; writes `out [rows, heads, 2 · half]`.
pub fn rope<T: Elem>(x: &[T], l: RopeLayout, cos: &[T], sin: &[T], out: &mut [T]) {
    let (h, half) = (l.heads, l.half);
    assert!(cos.len() >= l.rows * half && sin.len() >= l.rows * half && out.len() >= l.rows * h * 2 * half);
    if l.rows > 0 {
        let last = l.offset + (l.rows - 1) * l.row_stride + (h - 1) * l.head_stride + 2 * half;
        assert!(x.len() >= last, "rotary input too small for its layout");
    }
    for r in 0..l.rows {
        let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
        for hd in 0..h {
            let v = &x[l.offset + r * l.row_stride + hd * l.head_stride..][..2 * half];
            let o = &mut out[(r * h + hd) * 2 * half..][..2 * half];
            for i in 0..half {
                let (x1, x2, ci, si) = (v[i].get(), v[half + i].get(), c[i].get(), s[i].get());
                o[i] = T::put(T::round(x1 * ci) - T::round(x2 * si));
                o[half + i] = T::put(T::round(x2 * ci) + T::round(x1 * si));
            }
        }
    }
}

/// Attention probabilities in place over `scores [rows, cols]` (f32): row `r` sees its first
/// `visible(r)` columns (the rest become 0); `p = softmax(R(R(s) · scale))`, rounded by `R` again,
/// where `R` rounds to bf16 when `bf16` (as the tensor form computing in bf16 would) and is the
/// identity otherwise. One parallel pass instead of the tensor form's ~8 full passes (round,
/// scale, round, mask, softmax, round, on a single libtorch thread).
pub fn causal_softmax(
    scores: &mut [f32],
    cols: usize,
    visible: &(dyn Fn(usize) -> usize + Sync),
    scale: f32,
    bf16: bool,
) {
    assert!(cols > 0 && scores.len().is_multiple_of(cols));
    let rows = scores.len() / cols;
    let isa = crate::isa::selected();
    let sp = SendPtr(scores.as_mut_ptr());
    let run = |t: usize| {
        for row in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
            // SAFETY: row `row` belongs to this task; `scores` holds rows × cols values.
            let v = unsafe { std::slice::from_raw_parts_mut(sp.get().add(row * cols), cols) };
            let vis = visible(row).min(cols);
            // SAFETY: `isa` is the process's path, which this CPU supports.
            unsafe { softmax_row_on(isa, &mut v[..vis], scale, bf16) };
            v[vis..].fill(0.0);
        }
    };
    pool::global().for_each(rows.div_ceil(ROWS_PER_TASK), &run);
}

/// `$name(isa, args..)`: the `#[inline(always)]` function `$inner(args..)` compiled for the
/// instruction set (the same source inlined into functions with each set's features, so the
/// compiler vectorises its lane loops to the widest registers they allow).
macro_rules! compiled_for_isa {
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($a:ident: $t:ty),*) = $inner:path) => {
        $(#[$m])*
        /// # Safety
        /// The CPU supports `isa`.
        $vis unsafe fn $name(isa: crate::Isa, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($a: $t),*) {
                    $inner($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    $inner($($a),*)
                }
                match isa {
                    crate::Isa::Avx512Bf16 | crate::Isa::Avx512 => return avx512($($a),*),
                    crate::Isa::Avx2 => return avx2($($a),*),
                    _ => {}
                }
            }
            let _ = isa;
            $inner($($a),*)
        }
    };
}

compiled_for_isa!(
    /// [`softmax_row`] compiled for the instruction set.
    unsafe fn softmax_row_on(v: &mut [f32], scale: f32, bf16: bool) = softmax_row
);

/// `silu(g) = g · σ(g)` with `σ` from [`exp_nonpositive`] of `−|g|` (no libm call, so it
/// vectorises): within a few f32 ulps of `g / (1 + e⁻ᵍ)`.
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let s = 1.0 / (1.0 + e);
    g * if g >= 0.0 { s } else { e * s }
}

/// SwiGLU of one row: `out[i] = R(R(silu(R(g[i]))) · R(u[i]))`, `R` rounding to bf16 when `bf16`
/// (the tensor form's silu and product in bf16), the identity otherwise; and `out`'s bf16 bits
/// into `bits` when it is not empty.
pub fn swiglu_row(g: &[f32], u: &[f32], out: &mut [f32], bits: &mut [u16], bf16: bool) {
    assert!(g.len() == out.len() && u.len() == out.len() && (bits.is_empty() || bits.len() == out.len()));
    // SAFETY: the process's path, which this CPU supports.
    unsafe { swiglu_on(crate::isa::selected(), g, u, out, bits, bf16) }
}

compiled_for_isa!(unsafe fn swiglu_on(g: &[f32], u: &[f32], out: &mut [f32], bits: &mut [u16], bf16: bool) = swiglu);

#[inline(always)]
fn swiglu(g: &[f32], u: &[f32], out: &mut [f32], bits: &mut [u16], bf16: bool) {
    let r = |x: f32| if bf16 { u16::round(x) } else { x };
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = r(r(silu(r(gv))) * r(uv));
    }
    if !bits.is_empty() {
        round(out, bits);
    }
}

/// `o[i] = R(o[i] + R(R(y[i]) · w))` (see [`swiglu_row`] for `R`): a routing-weighted expert
/// output added into a token's row as the tensor form in bf16 rounds it.
pub fn add_scaled_row(o: &mut [f32], y: &[f32], w: f32, bf16: bool) {
    assert_eq!(o.len(), y.len());
    // SAFETY: the process's path, which this CPU supports.
    unsafe { add_scaled_on(crate::isa::selected(), o, y, w, bf16) }
}

compiled_for_isa!(unsafe fn add_scaled_on(o: &mut [f32], y: &[f32], w: f32, bf16: bool) = add_scaled);

#[inline(always)]
fn add_scaled(o: &mut [f32], y: &[f32], w: f32, bf16: bool) {
    let r = |x: f32| if bf16 { u16::round(x) } else { x };
    for (o, &yv) in o.iter_mut().zip(y) {
        *o = r(*o + r(r(yv) * w));
    }
}

/// `dst[i] = f32(src[i])` for bf16 bits `src`, vectorised for the process's instruction set.
pub fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: the process's path, which this CPU supports.
    unsafe { widen_on(crate::isa::selected(), src, dst) }
}

compiled_for_isa!(unsafe fn widen_on(src: &[u16], dst: &mut [f32]) = widen);

#[inline(always)]
fn widen(src: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(b);
    }
}

/// `dst[i]` = bf16 bits of `src[i]` (nearest even), vectorised for the process's instruction set.
pub fn round_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: the process's path, which this CPU supports.
    unsafe { round_on(crate::isa::selected(), src, dst) }
}

compiled_for_isa!(unsafe fn round_on(src: &[f32], dst: &mut [u16]) = round);

#[inline(always)]
fn round(src: &[f32], dst: &mut [u16]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bf16_bits(v);
    }
}

/// Each value rounded to the nearest bf16 (kept as f32), vectorised for the process's instruction
/// set.
pub fn round_to_bf16_in_place(v: &mut [f32]) {
    // SAFETY: the process's path, which this CPU supports.
    unsafe { round_in_place_on(crate::isa::selected(), v) }
}

compiled_for_isa!(unsafe fn round_in_place_on(v: &mut [f32]) = round_in_place);

#[inline(always)]
fn round_in_place(v: &mut [f32]) {
    for x in v {
        *x = u16::round(*x);
    }
}

/// Index of the first maximum of `v` (the first NaN if there is one; 0 for an empty slice), as
/// libtorch's `argmax` picks it: one vectorised pass for the maximum and one to find it, ~10× faster
/// than libtorch's reduction over a vocabulary (~50 µs a decode step here).
pub fn argmax(v: &[f32]) -> usize {
    // SAFETY: the process's path, which this CPU supports.
    unsafe { argmax_on(crate::isa::selected(), v) }
}

unsafe fn argmax_on(isa: crate::Isa, v: &[f32]) -> usize {
    let mut out = 0;
    max_or_nan_on(isa, v, &mut out);
    out
}

compiled_for_isa!(unsafe fn max_or_nan_on(v: &[f32], out: &mut usize) = max_or_nan);

#[inline(always)]
fn max_or_nan(v: &[f32], out: &mut usize) {
    let (mut maxes, mut nan) = ([f32::NEG_INFINITY; LANES], [false; LANES]);
    let chunks = v.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for ((m, n), &x) in maxes.iter_mut().zip(&mut nan).zip(c) {
            *m = if x > *m { x } else { *m };
            *n |= x.is_nan();
        }
    }
    let any_nan = nan.iter().any(|&n| n) || rest.iter().any(|x| x.is_nan());
    *out = if any_nan {
        v.iter().position(|x| x.is_nan()).unwrap_or(0)
    } else {
        let max = maxes.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        v.iter().position(|&x| x == max).unwrap_or(0)
    };
}

/// Lanes of the row loops: independent accumulators the compiler keeps in vector registers (f32
/// sums are not reassociated, so one running sum would run one add at a time).
const LANES: usize = 16;

/// `v = softmax(R(R(v) · scale))`, rounded by `R` again (see [`causal_softmax`]).
#[inline(always)]
fn softmax_row(v: &mut [f32], scale: f32, bf16: bool) {
    let r = |x: f32| if bf16 { u16::round(x) } else { x };
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, m) in c.iter_mut().zip(&mut maxes) {
            *x = r(r(*x) * scale);
            *m = m.max(*x);
        }
    }
    let mut max = maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in chunks.into_remainder() {
        *x = r(r(*x) * scale);
        max = max.max(*x);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = v.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, s) in c.iter_mut().zip(&mut sums) {
            *x = exp_nonpositive(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in v.iter_mut() {
        *x = r(*x * inv);
    }
}

/// `eˣ` for `x ≤ 0` (−∞ gives 0) in plain arithmetic that vectorises, unlike libm's `expf` (a
/// call per element: the softmax of a long prefill chunk spent ~2.7 ns an element there). Cephes'
/// `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by its degree-6 polynomial (relative error
/// below 2⁻²²), `2ⁿ` built in the exponent bits; below −87.3 (where `eˣ` leaves the normal f32
/// range) the result is 0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer (nearest), held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const MIN: f32 = -87.336_55;
    let under = x < MIN;
    let x = x.max(MIN);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n in [-126, 0]: 2ⁿ is a normal f32.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits(((ni + 127) as u32) << 23);
    if under {
        0.0
    } else {
        e * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_nonpositive_range() {
        let mut worst = 0f64;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            if x >= -87.33 {
                worst = worst.max((got - want).abs() / want);
            } else if x < -87.337 {
                assert_eq!(got, 0.0, "e^{x} below the normal range");
            }
            x += 0.000_731;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn argmax_picks_the_first_maximum_or_nan() {
        for isa in crate::isa::ALL.into_iter().filter(|i| i.supported()) {
            let am = |v: &[f32]| unsafe { argmax_on(isa, v) };
            let v: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32).sin()).collect();
            let want = (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
            assert_eq!(am(&v), want, "{isa}");
            let mut tie = v.clone();
            tie[900] = 5.0;
            tie[17] = 5.0;
            assert_eq!(am(&tie), 17, "{isa}: first of equal maxima");
            tie[995] = f32::NAN;
            tie[999] = f32::NAN;
            assert_eq!(am(&tie), 995, "{isa}: a NaN is the maximum");
            assert_eq!(am(&[f32::NEG_INFINITY; 3]), 0);
            assert_eq!(am(&[]), 0);
            assert_eq!(am(&[1.0, 2.0, 3.0]), 2, "{isa}: in the remainder");
        }
    }

    #[test]
    fn silu_matches_its_definition() {
        let mut worst = 0f64;
        let mut g = -95.0f32;
        while g <= 95.0 {
            let want = g as f64 / (1.0 + (-(g as f64)).exp());
            let got = silu(g) as f64;
            worst = worst.max((got - want).abs() / want.abs().max(1e-30));
            g += 0.001_37;
        }
        assert!(worst < 2e-6, "relative error {worst}");
        assert_eq!(silu(0.0), 0.0);
        assert_eq!(silu(f32::INFINITY), f32::INFINITY);
        assert!(silu(f32::NAN).is_nan());
    }

    /// SwiGLU, the weighted add and both conversions on every path the CPU has, against their
    /// definitions (libm's `exp`, one element at a time): f32 within 1e-6, bf16 equal but for
    /// rare ties of the rounding (then one bf16 step apart).
    #[test]
    fn row_ops_match_definitions_on_every_path() {
        let n = 1000;
        let g: Vec<f32> = (0..n).map(|i| bf16_to_f32(bf16_bits((i as f32 * 0.731).sin() * 9.0))).collect();
        let u: Vec<f32> = (0..n).map(|i| bf16_to_f32(bf16_bits((i as f32 * 0.377).cos() * 3.0))).collect();
        let step = |a: f32, b: f32| (bf16_bits(a) as i32 - bf16_bits(b) as i32).abs();
        for isa in crate::isa::ALL {
            if !isa.supported() {
                println!("skipping kernel path {isa}: not supported by this CPU");
                continue;
            }
            for bf16 in [false, true] {
                let r = |x: f32| if bf16 { u16::round(x) } else { x };
                let (mut out, mut bits) = (vec![0f32; n], vec![0u16; if bf16 { n } else { 0 }]);
                // SAFETY: `isa` is supported (checked above).
                unsafe { swiglu_on(isa, &g, &u, &mut out, &mut bits, bf16) };
                let mut acc: Vec<f32> = u.iter().map(|v| v * 0.5).collect();
                unsafe { add_scaled_on(isa, &mut acc, &g, 0.3, bf16) };
                let mut ties = 0;
                for i in 0..n {
                    let want = r(r(g[i] / (1.0 + (-g[i]).exp())) * u[i]);
                    let sum = r(u[i] * 0.5 + r(r(g[i]) * 0.3));
                    if bf16 {
                        assert_eq!(bits[i], bf16_bits(out[i]), "{isa}: bits of element {i}");
                        assert_eq!(acc[i], sum, "{isa}: weighted add of element {i}");
                        if out[i] != want {
                            assert_eq!(step(out[i], want), 1, "{isa}: element {i}: {} vs {want}", out[i]);
                            ties += 1;
                        }
                    } else {
                        assert!((out[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "{isa}: {i}");
                        assert!((acc[i] - (u[i] * 0.5 + g[i] * 0.3)).abs() < 1e-6, "{isa}: {i}");
                    }
                }
                assert!(ties <= n / 100, "{isa}: {ties} rounding ties");
                let (mut wide, mut back) = (vec![0f32; n], vec![0u16; n]);
                let src: Vec<u16> = g.iter().map(|&v| bf16_bits(v * 1.001)).collect();
                unsafe { widen_on(isa, &src, &mut wide) };
                unsafe { round_on(isa, &wide, &mut back) };
                assert_eq!(back, src, "{isa}: bf16 -> f32 -> bf16");
                let odd: Vec<f32> = g.iter().map(|v| v * 1.000_01 + 1e-3).collect();
                unsafe { round_on(isa, &odd, &mut back) };
                assert!(odd.iter().zip(&back).all(|(&v, &b)| b == bf16_bits(v)), "{isa}: rounding");
                let mut inplace = odd.clone();
                unsafe { round_in_place_on(isa, &mut inplace) };
                assert!(inplace.iter().zip(&back).all(|(&v, &b)| v == bf16_to_f32(b)), "{isa}: in place");
            }
        }
    }

    #[test]
    fn rms_norm_matches_definition_f32_and_bf16() {
        let dim = 7;
        let x: Vec<f32> = (0..3 * dim).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-6, &mut out);
        for r in 0..3 {
            let row = &x[r * dim..(r + 1) * dim];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            for k in 0..dim {
                let want = row[k] as f64 / (ms + 1e-6).sqrt() * w[k] as f64;
                assert!((out[r * dim + k] as f64 - want).abs() < 1e-5);
            }
        }
        // bf16: the same values rounded twice (after normalising, after scaling).
        let xb: Vec<u16> = x.iter().map(|&v| bf16_bits(v)).collect();
        let wb: Vec<u16> = w.iter().map(|&v| bf16_bits(v)).collect();
        let mut ob = vec![0u16; x.len()];
        rms_norm(&xb, &wb, 1e-6, &mut ob);
        for r in 0..3 {
            let row: Vec<f32> = xb[r * dim..(r + 1) * dim].iter().map(|&b| bf16_to_f32(b)).collect();
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + 1e-6).sqrt();
            for k in 0..dim {
                let want = bf16_bits(bf16_to_f32(bf16_bits(row[k] * inv)) * bf16_to_f32(wb[k]));
                assert_eq!(ob[r * dim + k], want);
            }
        }
    }

    #[test]
    fn add_rms_norm_is_the_add_then_the_norm_bitwise() {
        let dim = 37;
        let rows = 130; // more than one task of rows
        let x: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let a: Vec<f32> = (0..rows * dim).map(|i| (i as f32 * 0.11).cos() * 1.7).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        fn check<T: Elem + PartialEq + std::fmt::Debug + Default>(x: &[T], a: &[T], w: &[T]) {
            let sum: Vec<T> = x.iter().zip(a).map(|(&p, &q)| T::put(p.get() + q.get())).collect();
            let mut want = vec![T::default(); x.len()];
            rms_norm(&sum, w, 1e-6, &mut want);
            let (mut h, mut out) = (vec![T::default(); x.len()], vec![T::default(); x.len()]);
            add_rms_norm(x, a, w, 1e-6, &mut h, &mut out);
            assert_eq!(h, sum);
            assert_eq!(out, want);
        }
        check(&x, &a, &w);
        let b = |v: &[f32]| v.iter().map(|&f| bf16_bits(f)).collect::<Vec<u16>>();
        check(&b(&x), &b(&a), &b(&w));
    }

    #[test]
    fn rope_rotates_strided_heads() {
        // rows 2, heads 2, half 2, rotary part after 3 other values in each head of 7.
        let l = RopeLayout { rows: 2, heads: 2, half: 2, offset: 3, row_stride: 14, head_stride: 7 };
        let x: Vec<f32> = (0..28).map(|i| i as f32).collect();
        let cos = [1.0f32, 0.0, 0.5, 1.0];
        let sin = [0.0f32, 1.0, 0.5, 0.0];
        let mut out = vec![0f32; 16];
        rope(&x, l, &cos, &sin, &mut out);
        for r in 0..2 {
            for h in 0..2 {
                let v = &x[3 + r * 14 + h * 7..][..4];
                let o = &out[(r * 2 + h) * 4..][..4];
                for i in 0..2 {
                    let (c, s) = (cos[r * 2 + i], sin[r * 2 + i]);
                    assert_eq!(o[i], v[i] * c - v[2 + i] * s);
                    assert_eq!(o[2 + i], v[2 + i] * c + v[i] * s);
                }
            }
        }
    }

    #[test]
    fn causal_softmax_masks_and_normalises() {
        let cols = 5;
        let mut s: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.7).cos() * 4.0).collect();
        let orig = s.clone();
        causal_softmax(&mut s, cols, &|r| r + 2, 0.5, false);
        for r in 0..3 {
            let vis = r + 2;
            let e: Vec<f64> =
                orig[r * cols..r * cols + vis].iter().map(|&x| (x as f64 * 0.5).exp()).collect();
            let z: f64 = e.iter().sum();
            for j in 0..cols {
                let want = if j < vis { e[j] / z } else { 0.0 };
                assert!((s[r * cols + j] as f64 - want).abs() < 1e-6, "row {r} col {j}");
            }
        }
    }
}
