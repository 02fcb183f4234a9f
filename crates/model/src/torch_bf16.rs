//! libtorch's matrix products of bf16 operands on the CPU.
//!
//! libtorch multiplies bf16 matrices with oneDNN only where the CPU has AVX-512 (F, BW, VL, DQ:
//! oneDNN's `avx512_core`, libtorch's `mkldnn_bf16_device_check`) or Arm's BF16; elsewhere it
//! takes a portable fallback. On an AVX2-only Zen 3 (2 threads, torch 2.11) that fallback took
//! 524 ms for a `[512, 512] · [512, 1024]` product that MKL's sgemm of the same operands widened
//! to f32 took 4.7 ms, and 6 s for prefill's per-head score products (48 ms in f32). There the
//! product runs in f32 and is rounded to bf16 once: the same exact products of bf16 values
//! accumulated in f32, as the fallback and oneDNN do, in another summation order.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

/// Whether libtorch's bf16 GEMM on this CPU is oneDNN's (see the module notes).
pub fn native() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq")
        }
        #[cfg(target_arch = "aarch64")]
        {
            std::arch::is_aarch64_feature_detected!("bf16")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// `op(a, b)`, a product of libtorch's: where `a` is a bf16 CPU tensor and libtorch's bf16 GEMM
/// is not [`native`], computed on both operands widened to f32 and rounded back to bf16.
pub fn product(a: &Tensor, b: &Tensor, op: impl FnOnce(&Tensor, &Tensor) -> Tensor) -> Tensor {
    if native() || !widens(a) {
        op(a, b)
    } else {
        widened(a, b, op)
    }
}

fn widens(a: &Tensor) -> bool {
    a.kind() == Kind::BFloat16 && a.device() == Device::Cpu
}

/// [`product`]'s f32 form, on any CPU.
fn widened(a: &Tensor, b: &Tensor, op: impl FnOnce(&Tensor, &Tensor) -> Tensor) -> Tensor {
    op(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float)).to_kind(Kind::BFloat16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 form against libtorch's bf16 product (whichever GEMM this CPU gives it) and an f64
    /// reference rounded to bf16: both forms round the same f32 sums, so they may differ only
    /// where summation order moves a sum across a rounding boundary (one bf16 step, rarely).
    #[test]
    fn the_f32_form_rounds_what_the_bf16_product_rounds() {
        tch::manual_seed(7);
        let a = Tensor::randn([64, 192], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let b = Tensor::randn([3, 192, 80], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let a3 = a.unsqueeze(0).expand([3, 64, 192], false);
        let mm = |x: &Tensor, y: &Tensor| x.matmul(y);
        let ours = widened(&a3, &b, mm).to_kind(Kind::Float);
        let torch = a3.matmul(&b).to_kind(Kind::Float);
        let exact = a3.to_kind(Kind::Double).matmul(&b.to_kind(Kind::Double));
        assert_eq!(ours.size(), vec![3, 64, 80]);
        // One bf16 step at the value's magnitude (8 significant bits).
        let step = exact.abs().clamp_min(1e-30) * 2f64.powi(-7);
        for (name, t) in [("f32 form", &ours), ("libtorch bf16", &torch)] {
            let err = (t.to_kind(Kind::Double) - &exact).abs();
            let over = err.gt_tensor(&step).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(over, 0, "{name}: {over} values more than one bf16 step from the exact product");
        }
        let differ = ours.ne_tensor(&torch).sum(Kind::Int64).int64_value(&[]);
        assert!(differ * 100 <= ours.numel() as i64, "{differ} of {} values differ", ours.numel());
    }

    #[test]
    fn other_kinds_pass_through_unchanged() {
        let a = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        let y = product(&a, &b, |x, y| x.mm(y));
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(y.double_value(&[1, 3]), 3.0);
    }
}
