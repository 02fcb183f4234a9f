//! FP8 e4m3 (the `float8_e4m3fn` of DeepSeek-V3's checkpoints) widening.
//!
//! The SIMD paths widen e4m3 through the hardware f16 → f32 conversion: the byte's exponent and
//! mantissa bits, moved into an f16 (sign to bit 15, the rest to bits 7..14), give the e4m3 value
//! divided by 2⁸ exactly — normal and subnormal numbers alike, since f16 has the wider exponent
//! range — so the 2⁸ is folded into the block scale. The two NaN codes (never in a checkpoint) read
//! as ±480 instead. The scalar paths use the same formula, so every path reads the same numbers.

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
}
