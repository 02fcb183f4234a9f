//! FP8 e4m3 (the `float8_e4m3fn` of DeepSeek-V3's checkpoints) widening.
//!
//! The SIMD paths widen e4m3 through the hardware f16 → f32 conversion: the byte's exponent and
//! mantissa bits, moved into an f16 (sign to bit 15, the rest to bits 7..14), give the e4m3 value
//! divided by 2⁸ exactly — normal and subnormal numbers alike, since f16 has the wider exponent
//! range — so the 2⁸ is folded into the block scale. The two NaN codes (never in a checkpoint) read
//! as ±480 instead. The scalar paths use the same formula, so every path reads the same numbers.
//! NEON (no f16 converter on stable Rust) places the bits into an f32 and scales by 2¹¹², which
//! gives the same value / 2⁸ exactly; AVX512_VBMI looks the bf16 bits up in [`BF16_HI`]/[`BF16_LO`].

/// The factor by which [`f16_bits`]' value undershoots the e4m3 value.
pub const F16_UNDERSHOOT: f32 = 256.0;

/// The f16 bit pattern whose value is `e4m3 / 2⁸`.
#[inline(always)]
pub fn f16_bits(b: u8) -> u16 {
    // Sign-extend so that bit 15 holds the sign after the shift, then clear the copy in bit 14.
    (((b as i8 as i16) << 7) as u16) & 0xBFFF
}

/// `e4m3 / 2⁸` as f32.
#[inline(always)]
pub fn undershot(b: u8) -> f32 {
    half::f16::from_bits(f16_bits(b)).to_f32()
}

/// The e4m3 value (NaN codes as ±480, see the module notes).
#[inline(always)]
pub fn to_f32(b: u8) -> f32 {
    undershot(b) * F16_UNDERSHOOT
}

/// 2¹¹²: lifts e4m3 placed in f32 bits (value · 2⁻¹²⁰) to [`undershot`]'s value · 2⁻⁸ exactly
/// (f32 subnormals included), the route of the paths without an f16 converter.
pub(crate) const LIFT: f32 = f32::from_bits((112 + 127) << 23);

/// [`undershot`] by integer placement and one multiply: plain arithmetic the compiler vectorises
/// on every target, where the f16 conversion of [`undershot`] is a scalar routine without F16C.
#[inline(always)]
pub(crate) fn lifted(b: u8) -> f32 {
    let b = b as u32;
    f32::from_bits((b & 0x80) << 24 | (b & 0x7F) << 20) * LIFT
}

/// Rows `n0..n1` of block-scaled FP8 weights `[N, k]` as f32 values with their block scales
/// applied, row-major into `out[..(n1 - n0) · k]`.
pub fn widen_rows(f: &crate::Fp8, k: usize, n0: usize, n1: usize, out: &mut [f32]) {
    let kblocks = k.div_ceil(f.block_k);
    for (n, dst) in (n0..n1).zip(out.chunks_exact_mut(k)) {
        let scales = &f.scale[n / f.block_n * kblocks..][..kblocks];
        let src = &f.q[n * k..(n + 1) * k];
        for ((s, d), &scale) in src.chunks(f.block_k).zip(dst.chunks_mut(f.block_k)).zip(scales) {
            let scale = scale * F16_UNDERSHOOT;
            for (&b, o) in s.iter().zip(d) {
                *o = lifted(b) * scale;
            }
        }
    }
}

/// Rows `0..n` of block-scaled FP8 weights `[n, k]` as two bf16 terms each, `hi = bf16(w)` and
/// `lo = bf16(w − hi)` of the f32 value `w` that [`widen_rows`] gives, into `out [n, 2k]` (row `r`:
/// `hi` in columns `0..k`, `lo` in `k..2k`): 16 significant bits of every weight, for a bf16 GEMM
/// of `[x, x] · outᵀ` (the model's prefill arm on oneDNN). On the pool, rows split evenly.
pub fn split_rows_bf16(f: &crate::Fp8, n: usize, k: usize, out: &mut [u16]) {
    assert!(out.len() >= n * 2 * k, "output too small");
    let threads = crate::pool::global().threads();
    let per = n.div_ceil(threads.max(1)).max(1);
    let dst = crate::pool::SendPtr(out.as_mut_ptr());
    crate::pool::global().for_each(n.div_ceil(per), &|t| {
        let (n0, n1) = (t * per, ((t + 1) * per).min(n));
        let (mut row, mut back) = (vec![0f32; k], vec![0f32; k]);
        for r in n0..n1 {
            widen_rows(f, k, r, r + 1, &mut row);
            // SAFETY: row r's 2k values belong to this task alone; `out` outlives the region.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r * 2 * k), 2 * k) };
            let (hi, lo) = o.split_at_mut(k);
            crate::rows::round_bf16(&row, hi);
            crate::rows::widen_bf16(hi, &mut back);
            row.iter_mut().zip(&back).for_each(|(w, b)| *w -= b);
            crate::rows::round_bf16(&row, lo);
        }
    });
}

/// bf16 bits of [`undershot`] for every e4m3 magnitude (the byte's low 7 bits), high bytes and low
/// bytes apart: the two 128-entry tables of the AVX-512 VBMI byte lookup (`vpermi2b`). Every value
/// is a normal bf16 (the smallest, 2⁻¹⁷, is far above bf16's 2⁻¹²⁶), so `vdpbf16ps`, which treats
/// subnormal inputs as zero, reads each one exactly.
pub const BF16_HI: [u8; 128] = bf16_table(true);
pub const BF16_LO: [u8; 128] = bf16_table(false);

const fn bf16_table(high: bool) -> [u8; 128] {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let v = bf16_of_magnitude(b as u8);
        t[b] = if high { (v >> 8) as u8 } else { v as u8 };
        b += 1;
    }
    t
}

/// bf16 bits of `e4m3 / 2⁸` for a sign-less code (`b < 128`); the NaN code reads as 480 / 2⁸, as
/// in [`to_f32`].
const fn bf16_of_magnitude(b: u8) -> u16 {
    let (e, m) = ((b >> 3) as u16 & 0xF, b as u16 & 7);
    if e == 0 {
        if m == 0 {
            return 0;
        }
        // m · 2⁻⁹ / 2⁸ = 2^(p - 17) · (m / 2^p), p = ⌊log₂ m⌋.
        let p = 15 - m.leading_zeros() as u16;
        return (127 - 17 + p) << 7 | (m - (1 << p)) << (7 - p);
    }
    // 2^(e - 7) · (1 + m/8) / 2⁸: bf16 exponent field e - 15 + 127.
    (e + 112) << 7 | m << 4
}

/// The IEEE reading of an e4m3fn byte, written out from the format's definition (bias 7, three
/// mantissa bits, subnormals when the exponent is 0, NaN at S.1111.111): the tests' reference.
pub fn reference(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((b >> 3) & 0xF) as i32, (b & 7) as f64);
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f64.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two bf16 terms of every weight: `hi` its bf16 rounding, `hi + lo` within 2⁻¹⁶ of it, on
    /// ragged blocks and more rows than threads.
    #[test]
    fn split_rows_bf16_is_hi_plus_lo() {
        let (n, k) = (37usize, 70usize);
        let q: Vec<u8> = (0..n * k)
            .map(|i| ((i * 37 + 11) % 256) as u8)
            .map(|b| if b & 0x7F == 0x7F { 0 } else { b })
            .collect();
        let q = &q[..];
        let scale: Vec<f32> =
            (0..n.div_ceil(16) * k.div_ceil(32)).map(|i| 1e-3 * (1.0 + i as f32 * 0.37)).collect();
        let f = crate::Fp8 { q, scale: &scale, block_n: 16, block_k: 32 };
        let mut want = vec![0f32; n * k];
        widen_rows(&f, k, 0, n, &mut want);
        let mut out = vec![0u16; n * 2 * k];
        split_rows_bf16(&f, n, k, &mut out);
        for r in 0..n {
            for c in 0..k {
                let w = want[r * k + c];
                let (hi, lo) = (out[r * 2 * k + c], out[r * 2 * k + k + c]);
                assert_eq!(hi, crate::bf16_bits(w), "row {r} col {c}");
                let sum = crate::bf16_to_f32(hi) as f64 + crate::bf16_to_f32(lo) as f64;
                assert!((sum - w as f64).abs() <= (w as f64).abs() * 2f64.powi(-16), "row {r} col {c}");
            }
        }
    }

    #[test]
    fn every_code_widens_exactly() {
        for b in 0..=255u8 {
            let want = reference(b);
            if want.is_nan() {
                assert_eq!(to_f32(b).abs(), 480.0, "NaN code {b:#x}");
                continue;
            }
            assert_eq!(to_f32(b) as f64, want, "code {b:#x}");
        }
        assert_eq!(to_f32(0x7E), 448.0);
        assert_eq!(to_f32(0x01), 2f32.powi(-9));
        assert_eq!(to_f32(0x80), -0.0);
    }

    #[test]
    fn lifted_reads_what_the_f16_route_reads() {
        for b in 0..=255u8 {
            assert_eq!(lifted(b).to_bits(), undershot(b).to_bits(), "code {b:#x}");
        }
    }

    /// Each row's values times its own block's scale, partial edge blocks included.
    #[test]
    fn widened_rows_carry_their_block_scales() {
        let (n, k, bn, bk) = (5usize, 7usize, 2usize, 3usize);
        let q: Vec<u8> = (0..n * k).map(|i| (i * 37 + 11) as u8 & 0x7E).collect();
        let scale: Vec<f32> = (0..n.div_ceil(bn) * k.div_ceil(bk)).map(|i| 0.5 + i as f32).collect();
        let f = crate::Fp8 { q: &q, scale: &scale, block_n: bn, block_k: bk };
        let mut out = vec![f32::NAN; 3 * k];
        widen_rows(&f, k, 1, 4, &mut out);
        for r in 0..3 {
            for c in 0..k {
                let s = scale[(1 + r) / bn * k.div_ceil(bk) + c / bk];
                assert_eq!(out[r * k + c], to_f32(q[(1 + r) * k + c]) * s, "row {} col {c}", 1 + r);
            }
        }
    }

    #[test]
    fn byte_tables_hold_every_code_as_bf16() {
        for b in 0..=255u8 {
            let m = (b & 0x7F) as usize;
            let bits = (BF16_HI[m] as u16) << 8 | BF16_LO[m] as u16 | (b as u16 & 0x80) << 8;
            let v = f32::from_bits((bits as u32) << 16);
            assert_eq!(v.to_bits(), undershot(b).to_bits(), "code {b:#x}");
            assert!(v == 0.0 || v.is_normal(), "code {b:#x} is subnormal in bf16");
        }
    }
}
