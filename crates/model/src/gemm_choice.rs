//! Per-shape choice, by measurement on this machine, between the kernels and libtorch's GEMM
//! (oneDNN) for prefill-sized bf16 products.
//!
//! The kernels stream weights at memory speed and win wherever a product reads more than it
//! computes (decode, small batches). A long prompt's products are compute-bound, and there a
//! packed library GEMM may be faster on some CPUs (AMX, or a wider core than the kernels' tiles
//! assume) and slower on others. Which one is faster is measured rather than guessed: the first
//! calls of each shape (rows bucketed by powers of two) alternate between the two, timed, and
//! the faster by median then runs every later call of that shape. Only bf16 activations against
//! bf16 or FP8 weights on the CPU take part: there both compute the same rounded products (f32
//! accumulation, one rounding of the output to bf16), and the f32 path stays on the kernels,
//! exact. Where libtorch has no oneDNN bf16 GEMM its arm is MKL's sgemm on widened operands
//! (`torch_bf16`). An FP8 weight's libtorch arm dequantises it per call (the values the kernels
//! multiply, `w · scale`): where oneDNN has a bf16 GEMM, as two bf16 terms against the rows twice
//! (`fp8_split_product`), else to f32 for MKL's sgemm; N·K conversions beside ≥ 64·N·K products.
//! On a Zen 5 (avx512_bf16, 512-row prompt) the two-term arm took 2.0-5.5 ms a projection where
//! the f32 arm took 5.4-11.4; the kernels 1.4-7.1 ms in the same runs (the VM's speed moved).
//!
//! `MLASERVE_PREFILL_GEMM` = `auto` (default), `kernels` or `libtorch` forces one for tests and
//! benchmarks.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::kernels::LibtorchThreads;
use crate::linear::Weight;

/// Rows from which a product is a candidate (below, the kernels' streaming wins by far).
pub const MIN_ROWS: i64 = 64;
/// Timed calls of each engine before a shape is decided.
const TRIALS: usize = 3;
/// The environment variable that forces an engine.
pub const ENV: &str = "MLASERVE_PREFILL_GEMM";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Kernels,
    Libtorch,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Kernels => "kernels",
            Engine::Libtorch => "libtorch",
        }
    }
}

/// What the first calls of one shape measured (seconds per call).
#[derive(Default, Debug, Clone)]
pub struct Trials {
    kernels: Vec<f64>,
    libtorch: Vec<f64>,
}

impl Trials {
    /// The engine for the next call: alternating until both have [`TRIALS`] timings, then the one
    /// with the lower median (ties to the kernels).
    pub fn next(&self) -> Engine {
        match self.decided() {
            Some(e) => e,
            None if self.libtorch.len() < self.kernels.len() => Engine::Libtorch,
            None => Engine::Kernels,
        }
    }

    pub fn decided(&self) -> Option<Engine> {
        if self.kernels.len() < TRIALS || self.libtorch.len() < TRIALS {
            return None;
        }
        Some(if median(&self.libtorch) < median(&self.kernels) { Engine::Libtorch } else { Engine::Kernels })
    }

    /// Records one timed call; returns the decision when this call completed the trials. Once
    /// decided, a shape stays decided (later timings are not kept).
    pub fn record(&mut self, engine: Engine, seconds: f64) -> Option<Engine> {
        if self.decided().is_some() {
            return None;
        }
        match engine {
            Engine::Kernels => self.kernels.push(seconds),
            Engine::Libtorch => self.libtorch.push(seconds),
        }
        self.decided()
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Shape key: rows bucketed to the next power of two, then the weight's `[out, in]` and whether it
/// is FP8 (the two formats cost the engines differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub rows_bucket: i64,
    pub n: i64,
    pub k: i64,
    pub fp8: bool,
}

impl Shape {
    pub fn new(m: i64, n: i64, k: i64, fp8: bool) -> Shape {
        Shape { rows_bucket: (m.max(1) as u64).next_power_of_two() as i64, n, k, fp8 }
    }
}

fn forced() -> Option<Engine> {
    static FORCED: OnceLock<Option<Engine>> = OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var(ENV).as_deref().map(str::trim) {
        Ok("kernels") => Some(Engine::Kernels),
        Ok("libtorch") => Some(Engine::Libtorch),
        Ok("") | Ok("auto") | Err(_) => None,
        Ok(other) => {
            tracing::warn!("{ENV}={other:?} is not auto, kernels or libtorch: measuring (auto)");
            None
        }
    })
}

fn table() -> &'static Mutex<HashMap<Shape, Trials>> {
    static TABLE: OnceLock<Mutex<HashMap<Shape, Trials>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// The largest copy of an FP8 weight that libtorch's arm makes per call (f32, or two bf16 terms: 4
/// bytes a weight either way): a transient allocation beside the step's own, kept small
/// (DeepSeek-V3's largest dense weight would be 528 MB). Larger FP8 weights stay on the kernels.
const FP8_COPY_MAX_BYTES: i64 = 64 << 20;

/// Whether `x · wᵀ` is a candidate: bf16 rows, at least [`MIN_ROWS`] of them, a dense bf16 or an
/// FP8 weight (of at most [`FP8_COPY_MAX_BYTES`] as f32), all on the CPU (the caller has checked
/// that the kernels take it).
pub fn candidate(x: &Tensor, w: &Weight) -> bool {
    let format = match w {
        Weight::Dense(t) => t.kind() == Kind::BFloat16,
        Weight::Fp8 { .. } => w.size().iter().product::<i64>() * 4 <= FP8_COPY_MAX_BYTES,
    };
    format
        && w.device() == Device::Cpu
        && x.kind() == Kind::BFloat16
        && x.dim() == 2
        && x.size()[0] >= MIN_ROWS
}

/// `x · wᵀ` for a [`candidate`], by the engine chosen for its shape; `kernels` computes it on the
/// kernels.
pub fn linear(x: &Tensor, w: &Weight, kernels: impl FnOnce() -> Tensor) -> Tensor {
    let libtorch = || {
        // The kernels' helpers park rather than spin beside libtorch's threads on the same cores.
        crate::kernels::pool::global().rest();
        let _threads = LibtorchThreads::widen(true);
        match w {
            Weight::Dense(wt) => crate::torch_bf16::product(x, wt, |x, w| x.mm(&w.tr())),
            fp8 if crate::torch_bf16::native() => fp8_split_product(x, fp8),
            fp8 => x.to_kind(Kind::Float).mm(&crate::kernels::fp8_as_f32(fp8).tr()).to_kind(Kind::BFloat16),
        }
    };
    if let Some(e) = forced() {
        return match e {
            Engine::Kernels => kernels(),
            Engine::Libtorch => libtorch(),
        };
    }
    let size = w.size();
    let shape = Shape::new(x.size()[0], size[0], size[1], matches!(w, Weight::Fp8 { .. }));
    let engine = table().lock().unwrap_or_else(|e| e.into_inner()).entry(shape).or_default().next();
    let t = Instant::now();
    let y = match engine {
        Engine::Kernels => kernels(),
        Engine::Libtorch => libtorch(),
    };
    let dt = t.elapsed().as_secs_f64();
    let mut table = table().lock().unwrap_or_else(|e| e.into_inner());
    let trials = table.entry(shape).or_default();
    if let Some(choice) = trials.record(engine, dt) {
        tracing::info!(
            rows = shape.rows_bucket,
            n = shape.n,
            k = shape.k,
            fp8 = shape.fp8,
            kernels_us = median(&trials.kernels) * 1e6,
            libtorch_us = median(&trials.libtorch) * 1e6,
            choice = choice.name(),
            "prefill GEMM engine chosen by measurement"
        );
    }
    y
}

/// `x · wᵀ` for bf16 `x` and an FP8 `w` on oneDNN's bf16 GEMM: `w · scale` (f32) as the sum of two
/// bf16 terms, `hi = bf16(w)` and `lo = bf16(w − hi)`, side by side along the reduction, against
/// `x` twice: `[x, x] · [hi, lo]ᵀ`, one product accumulated in f32 and rounded to bf16 once. The
/// two terms hold 16 of the weight's significant bits (relative error ≤ 2⁻¹⁷ a weight, far below
/// the output's bf16 rounding, 2⁻⁹), where a single bf16 copy would round every weight to 8.
fn fp8_split_product(x: &Tensor, w: &Weight) -> Tensor {
    Tensor::cat(&[x, x], 1).mm(&crate::kernels::fp8_split_bf16(w).tr())
}

/// The decisions made so far, for the profile report: (shape, kernels µs, libtorch µs, choice).
pub fn decisions() -> Vec<(Shape, f64, f64, Engine)> {
    let table = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = table
        .iter()
        .filter_map(|(s, t)| {
            t.decided().map(|e| (*s, median(&t.kernels) * 1e6, median(&t.libtorch) * 1e6, e))
        })
        .collect();
    v.sort_by_key(|(s, ..)| (s.n, s.k, s.rows_bucket));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trials_alternate_then_pick_the_lower_median() {
        let mut t = Trials::default();
        let mut order = Vec::new();
        // libtorch faster except for one outlier: the median decides, not the mean.
        let times = |e: Engine, i: usize| match e {
            Engine::Kernels => 2.0,
            Engine::Libtorch => [1.0, 9.0, 1.5][i],
        };
        let mut counts = [0usize; 2];
        let mut decided = None;
        for _ in 0..2 * TRIALS {
            let e = t.next();
            order.push(e);
            let i = &mut counts[e as usize];
            let r = t.record(e, times(e, *i));
            *i += 1;
            if r.is_some() {
                assert!(decided.is_none(), "decided once");
                decided = r;
            }
        }
        use Engine::*;
        assert_eq!(order, [Kernels, Libtorch, Kernels, Libtorch, Kernels, Libtorch]);
        assert_eq!(decided, Some(Libtorch));
        assert_eq!(t.next(), Libtorch);
        // Later calls do not re-decide.
        assert_eq!(t.record(Libtorch, 100.0), None);
        assert_eq!(t.decided(), Some(Libtorch));
    }

    #[test]
    fn ties_and_slower_libtorch_keep_the_kernels() {
        for lt in [2.0, 3.0] {
            let mut t = Trials::default();
            for _ in 0..TRIALS {
                t.record(Engine::Kernels, 2.0);
                t.record(Engine::Libtorch, lt);
            }
            assert_eq!(t.decided(), Some(Engine::Kernels));
        }
    }

    /// The two-term bf16 form of an FP8 product gives the f32 arm's bf16 outputs: the same but for
    /// outputs within a rounding step of a bf16 boundary (a 2⁻¹⁷ error a weight moves a sum there).
    #[test]
    fn fp8_split_product_equals_the_f32_product() {
        let x = Tensor::randn([80, 256], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let q = (Tensor::randn([96, 256], (Kind::Float, Device::Cpu)) * 40.0).to_kind(Kind::Float8e4m3fn);
        let w = Weight::Fp8 {
            q,
            scale: Tensor::rand([6, 2], (Kind::Float, Device::Cpu)) * 1e-2 + 1e-3,
            block: (16, 128),
        };
        let split = fp8_split_product(&x, &w).to_kind(Kind::Double);
        let f32 = x.to_kind(Kind::Float).mm(&crate::kernels::fp8_as_f32(&w).tr()).to_kind(Kind::BFloat16);
        let f32 = f32.to_kind(Kind::Double);
        let differ = split.ne_tensor(&f32).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!(differ < 0.01, "{:.3}% of outputs differ", differ * 100.0);
        // Where they differ, by one bf16 step (≤ 2⁻⁷ of the value), plus f32 summation-order noise.
        let mag = x.to_kind(Kind::Double).abs().mm(&w.to_dense(Kind::Double).abs().tr());
        let step = split.abs().maximum(&f32.abs()) * (1.0 / 128.0) + mag * 1e-6;
        let over = ((&split - &f32).abs() - step).max().double_value(&[]);
        assert!(over <= 0.0, "an output off by more than a bf16 step: {over}");
    }

    #[test]
    fn shapes_bucket_rows_by_powers_of_two() {
        assert_eq!(Shape::new(64, 8, 4, false), Shape::new(64, 8, 4, false));
        assert_eq!(Shape::new(65, 8, 4, false).rows_bucket, 128);
        assert_eq!(Shape::new(128, 8, 4, false).rows_bucket, 128);
        assert_ne!(Shape::new(512, 8, 4, false), Shape::new(512, 8, 5, false));
        assert_ne!(Shape::new(512, 8, 4, false), Shape::new(512, 8, 4, true));
    }

    #[test]
    fn both_engines_give_the_same_bf16_product() {
        let x = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let w = Weight::Dense(Tensor::randn([48, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16));
        assert!(candidate(&x, &w));
        let reference = x.to_kind(Kind::Double).mm(&w.to_dense(Kind::Double).tr());
        // Enough calls to pass the trials: every call, whichever engine ran it, is the product.
        for _ in 0..2 * TRIALS + 2 {
            let y = linear(&x, &w, || crate::kernels::grouped_linear(&[(&x, &w)]).pop().expect("one"));
            let err = (y.to_kind(Kind::Double) - &reference).abs().max().double_value(&[]);
            let scale = reference.abs().max().double_value(&[]);
            assert!(err <= scale * 1e-2, "bf16 product off by {err} (scale {scale})");
        }
        let shape = Shape::new(96, 48, 64, false);
        assert!(decisions().iter().any(|(s, ..)| *s == shape) || forced().is_some());
        // FP8 weights take part, each format under its own shape key.
        let q = Tensor::randn([48, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::Float8e4m3fn);
        let w8 =
            Weight::Fp8 { q, scale: Tensor::rand([3, 2], (Kind::Float, Device::Cpu)) + 0.5, block: (16, 32) };
        assert!(candidate(&x, &w8));
        let reference = x.to_kind(Kind::Double).mm(&w8.to_dense(Kind::Double).tr());
        for _ in 0..2 * TRIALS + 2 {
            let y = linear(&x, &w8, || crate::kernels::grouped_linear(&[(&x, &w8)]).pop().expect("one"));
            assert_eq!(y.kind(), Kind::BFloat16);
            let err = (y.to_kind(Kind::Double) - &reference).abs().max().double_value(&[]);
            let scale = reference.abs().max().double_value(&[]);
            assert!(err <= scale * 1e-2, "FP8 product off by {err} (scale {scale})");
        }
        let fp8_shape = Shape::new(96, 48, 64, true);
        assert!(decisions().iter().any(|(s, ..)| *s == fp8_shape) || forced().is_some());
        let big = Weight::Fp8 {
            q: Tensor::zeros([4096, 4097], (Kind::Float8e4m3fn, Device::Cpu)),
            scale: Tensor::ones([32, 33], (Kind::Float, Device::Cpu)),
            block: (128, 128),
        };
        assert!(
            !candidate(&Tensor::zeros([64, 4097], (Kind::BFloat16, Device::Cpu)), &big),
            "f32 copy > 64 MiB"
        );
        // f32 rows and small batches are not candidates.
        assert!(!candidate(&x.to_kind(Kind::Float), &w));
        assert!(!candidate(&x.narrow(0, 0, MIN_ROWS - 1), &w));
    }
}
