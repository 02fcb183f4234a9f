//! A decode step of a CPU stage on host rows: the same kernels, the same rounding points and the
//! same prefetch hints as the tensor form of each layer, with the activations in plain vectors.
//!
//! Why: at batch-1 decode the tensor form's glue between two products is a few cold libtorch calls
//! (an output tensor, views, a norm's `empty_like`, metadata queries: ~1.2 ms a step on the
//! benchmark shape, 13-15% of it), slow because each step streams ~212 MB of weights through the
//! caches and evicts libtorch's code and data. Here only the step's input and output are tensors.
//! Each layer's host form sits beside its tensor form (`Mla::forward_host`, `Mlp::forward_host`,
//! `Moe::forward_host`, `DecoderLayer::forward_host`); this file holds what they share and the
//! walk over the layers. `MLASERVE_DECODE_STEP=tensor` keeps every step on the tensor form (tests
//! compare the two).

use std::borrow::Cow;
use std::sync::OnceLock;

use mlaserve_kernels::rows::{self, Elem};
use mlaserve_kernels::{Problem, Weights};
use tch::{Device, Kind, Tensor};

use crate::batch::StepPlan;
use crate::error::{ModelError, Result};
use crate::kernels::{self, elems};
use crate::linear::Weight;

/// Activations on the host: f32 values, or bf16 bits (u16).
pub(crate) trait HostAct: Elem + Default + 'static {
    const KIND: Kind;
    /// The values as f32 (bf16 widened).
    fn widen(src: &[Self]) -> Cow<'_, [f32]>;
    /// The bf16 bits, for bf16 activations (the kernels may multiply them as such).
    fn bits(src: &[Self]) -> Option<&[u16]>;
    /// f32 results in this type (bf16: rounded to nearest even, as libtorch's cast).
    fn rounded(src: &[f32]) -> Vec<Self>;
    /// `out = silu(g) · u` rounded to this type (`act`: f32 scratch of the row's length).
    fn swiglu_row(g: &[f32], u: &[f32], act: &mut [f32], out: &mut [Self]);
    /// The elements of a contiguous CPU tensor of [`HostAct::KIND`].
    fn of(t: &Tensor) -> &[Self] {
        elems(t, Self::KIND)
    }
}

impl HostAct for f32 {
    const KIND: Kind = Kind::Float;
    fn widen(src: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(src)
    }
    fn bits(_: &[f32]) -> Option<&[u16]> {
        None
    }
    fn rounded(src: &[f32]) -> Vec<f32> {
        src.to_vec()
    }
    fn swiglu_row(g: &[f32], u: &[f32], _: &mut [f32], out: &mut [f32]) {
        rows::swiglu_row(g, u, out, &mut [], false)
    }
}

impl HostAct for u16 {
    const KIND: Kind = Kind::BFloat16;
    fn widen(src: &[u16]) -> Cow<'_, [f32]> {
        let mut v = vec![0f32; src.len()];
        rows::widen_bf16(src, &mut v);
        Cow::Owned(v)
    }
    fn bits(src: &[u16]) -> Option<&[u16]> {
        Some(src)
    }
    fn rounded(src: &[f32]) -> Vec<u16> {
        let mut v = vec![0u16; src.len()];
        rows::round_bf16(src, &mut v);
        v
    }
    fn swiglu_row(g: &[f32], u: &[f32], act: &mut [f32], out: &mut [u16]) {
        rows::swiglu_row(g, u, act, out, true)
    }
}

/// `values` `[size]` as a fresh CPU tensor of `T`'s kind.
pub(crate) fn tensor_of<T: HostAct>(values: &[T], size: &[i64]) -> Tensor {
    let mut t = Tensor::empty(size, (T::KIND, Device::Cpu));
    kernels::elems_mut::<T>(&mut t, T::KIND).copy_from_slice(values);
    t
}

/// Each `x_i · w_iᵀ` (`x_i` row-major `[m_i, k_i]`), unrounded f32, in one parallel region.
pub(crate) fn products<T: HostAct>(pairs: &[(&[T], &Weight)]) -> Vec<Vec<f32>> {
    let wide: Vec<Cow<[f32]>> = pairs.iter().map(|(x, _)| T::widen(x)).collect();
    let problems: Vec<Problem> = pairs
        .iter()
        .zip(&wide)
        .map(|((x, w), xf)| {
            let s = w.size();
            let (n, k) = (s[0] as usize, s[1] as usize);
            assert!(
                k > 0 && x.len().is_multiple_of(k),
                "rows of {} values for a weight of {k} columns",
                x.len()
            );
            Problem { x: xf, x_bf16: T::bits(x), w: kernels::weights_of(w), m: x.len() / k, n, k }
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = problems.iter().map(|p| vec![0f32; p.m * p.n]).collect();
    let mut views: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
    mlaserve_kernels::grouped_gemm_into(&problems, &mut views);
    outs
}

/// RMSNorm of the rows of `x` (see `rows::rms_norm`).
pub(crate) fn rms_norm<T: HostAct>(x: &[T], (w, eps): (&Tensor, f64)) -> Vec<T> {
    let mut out = vec![T::default(); x.len()];
    rows::rms_norm::<T>(x, T::of(w), eps as f32, &mut out);
    out
}

/// `(x + a, RMSNorm(x + a))` (see `rows::add_rms_norm`).
pub(crate) fn add_rms_norm<T: HostAct>(x: &[T], a: &[T], (w, eps): (&Tensor, f64)) -> (Vec<T>, Vec<T>) {
    let (mut h, mut out) = (vec![T::default(); x.len()], vec![T::default(); x.len()]);
    rows::add_rms_norm::<T>(x, a, T::of(w), eps as f32, &mut h, &mut out);
    (h, out)
}

/// SwiGLU of the rows of `gu [N, 2I]` (gate columns first): `[N, I]` rounded as the tensor form in
/// `T` (see `rows::swiglu_row`).
pub(crate) fn swiglu<T: HostAct>(gu: &[T], inter: usize) -> Vec<T> {
    let n = gu.len() / (2 * inter);
    let mut out = vec![T::default(); n * inter];
    let mut act = vec![0f32; inter];
    for (row, o) in T::widen(gu).chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        T::swiglu_row(&row[..inter], &row[inter..], &mut act, o);
    }
    out
}

/// The routed experts of a shard (and the shared expert, as `runs`' last) on host rows `x [N, H]`
/// (see `mlaserve_kernels::moe::routed_experts`): the weighted sum in `T`.
pub(crate) fn routed_experts<T: HostAct>(
    x: &[T],
    hidden: usize,
    runs: &[kernels::ExpertRows],
    inter: usize,
    then: &[&Weight],
) -> Vec<T> {
    use mlaserve_kernels::moe::ExpertRun;
    let xf = T::widen(x);
    let experts: Vec<ExpertRun> = runs
        .iter()
        .map(|(tokens, weights, gu, down)| ExpertRun {
            tokens,
            weights,
            gate_up: gu.iter().map(kernels::weights_of).collect(),
            down: kernels::weights_of(down),
        })
        .collect();
    let then: Vec<Weights> =
        then.iter().filter(|w| kernels::weight_ok(w)).map(|w| kernels::weights_of(w)).collect();
    let mut out = vec![0f32; x.len()];
    let bf16 = T::KIND == Kind::BFloat16;
    mlaserve_kernels::moe::routed_experts(&xf, hidden, inter, &experts, bf16, &then, &mut out);
    T::rounded(&out)
}

/// Which form decode steps take (`MLASERVE_DECODE_STEP`, read once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StepForm {
    /// The host form wherever it applies (the default).
    Host,
    /// The tensor form always (`tensor`).
    Tensor,
    /// Both, failing the step unless the host form's output and cache writes equal the tensor
    /// form's bitwise (`check`: tests; the tensor form's result is used).
    Check,
}

pub(crate) fn mode() -> StepForm {
    static MODE: OnceLock<StepForm> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MLASERVE_DECODE_STEP").as_deref() {
        Ok("tensor") => StepForm::Tensor,
        Ok("check") => {
            tracing::warn!(
                "MLASERVE_DECODE_STEP=check: each host-form decode step is checked against the tensor form"
            );
            StepForm::Check
        }
        _ => StepForm::Host,
    })
}

/// [`StepForm::Check`]'s comparison: the host form's output and caches against the tensor form's.
pub(crate) fn check(out: &Tensor, want: &Tensor, caches: &[Tensor], want_caches: &[Tensor]) -> Result<()> {
    let caches_equal =
        caches.len() == want_caches.len() && caches.iter().zip(want_caches).all(|(a, b)| a.equal(b));
    if !out.equal(want) || !caches_equal {
        return Err(ModelError::Check(format!(
            "the host form differs from the tensor form (output equal: {}, caches equal: {caches_equal})",
            out.equal(want)
        )));
    }
    CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

static CHECKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Decode steps [`StepForm::Check`] found equal in both forms so far (`generate --stats`).
pub fn checked_steps() -> usize {
    CHECKED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether `plan` is a step the host form takes: decode rows only (every row through the paged
/// core), few enough for the kernels' decode products and the fused shared expert.
pub(crate) fn plan_fits(plan: &StepPlan) -> bool {
    plan.batched.is_none()
        && plan.solo.is_empty()
        && plan.paged_rows.is_none()
        && !plan.paged.is_empty()
        && plan.total_tokens <= HOST_ROWS_MAX
}

/// Rows up to which a step takes the host form: the kernels' decode products (and the MoE's fused
/// shared expert) cover them; `gemm_choice` never considers libtorch below 64.
pub(crate) const HOST_ROWS_MAX: usize = 48;
