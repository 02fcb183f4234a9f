//! libtorch tensors in and out of the CPU kernels of `mlaserve-kernels`.
//!
//! On the CPU all heavy products of the forward pass go through here, and libtorch runs its
//! remaining (small, elementwise) ops on one thread: libtorch's OpenMP pool either busy-waits and
//! starves other threads or, made passive, pays a thread wake-up (tens to hundreds of µs) on every
//! small op, and its bf16 GEMMs are several times slower than f32 on CPUs without native bf16.
//! The kernel path (instruction set) is the process's, chosen once (`MLASERVE_KERNEL`).

use mlaserve_kernels::{rows, Fp8, Problem, Weights};
use tch::{Device, Kind, Tensor};

pub use mlaserve_kernels::isa::{self, Isa};
pub use mlaserve_kernels::pool;

use crate::host_step::{self, tensor_of, HostAct};
use crate::linear::Weight;

/// The elements of a contiguous CPU tensor of the matching kind.
pub(crate) fn elems<T>(t: &Tensor, kind: Kind) -> &[T] {
    assert_eq!(t.kind(), kind);
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    // SAFETY: a contiguous CPU tensor of `kind` holds numel() values of T at data_ptr(), alive as
    // long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// A fresh bf16 CPU tensor of `size` holding `values` rounded to nearest even.
pub(crate) fn bf16_tensor(values: &[f32], size: &[i64]) -> Tensor {
    let t = Tensor::empty(size, (Kind::BFloat16, Device::Cpu));
    assert_eq!(t.numel(), values.len());
    // SAFETY: a fresh contiguous bf16 tensor of values.len() elements, viewed once.
    let bits = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u16, values.len()) };
    rows::round_bf16(values, bits);
    t
}

/// Whether `x · wᵀ` runs here: CPU tensors, a 2-D contiguous weight in bf16, f32 or FP8, and
/// activations of a float kind the kernels read.
pub fn use_for(x: &Tensor, w: &Weight) -> bool {
    weight_ok(w)
        && x.device() == Device::Cpu
        && x.dim() == 2
        && matches!(x.kind(), Kind::BFloat16 | Kind::Float)
}

/// The weight half of [`use_for`].
pub(crate) fn weight_ok(w: &Weight) -> bool {
    let w_ok = match w {
        Weight::Dense(t) => {
            matches!(t.kind(), Kind::BFloat16 | Kind::Float) && t.dim() == 2 && t.is_contiguous()
        }
        Weight::Fp8 { q, scale, .. } => {
            q.kind() == Kind::Float8e4m3fn
                && q.is_contiguous()
                && scale.kind() == Kind::Float
                && scale.is_contiguous()
        }
    };
    w_ok && w.device() == Device::Cpu
}

/// Tells the kernels' pool that the product after the next one reads `ws` (see
/// [`mlaserve_kernels::prefetch`]). Weights the kernels read (CPU, contiguous, their formats) only.
pub(crate) fn prefetch(ws: &[&Weight]) {
    mlaserve_kernels::prefetch(&hint_views(ws));
}

/// The kernels' views of the weights among `ws` they read: what a hint names (others are skipped).
fn hint_views<'a>(ws: &[&'a Weight]) -> Vec<Weights<'a>> {
    ws.iter().filter(|w| weight_ok(w)).map(|w| weights_of(w)).collect()
}

/// `x · wᵀ`; the result has `x`'s dtype. A prefill-sized bf16 product runs on the kernels or
/// libtorch, whichever measured faster for its shape ([`crate::gemm_choice`]).
pub fn linear(x: &Tensor, w: &Weight) -> Tensor {
    let on_kernels = || grouped_linear(&[(x, w)]).pop().expect("one product");
    if crate::gemm_choice::candidate(x, w) {
        return crate::gemm_choice::linear(x, w, on_kernels);
    }
    on_kernels()
}

/// The kernels' view of a weight.
pub(crate) fn weights_of(w: &Weight) -> Weights<'_> {
    match w {
        Weight::Dense(t) if t.kind() == Kind::BFloat16 => Weights::Bf16(elems(t, Kind::BFloat16)),
        Weight::Dense(t) => Weights::F32(elems(t, Kind::Float)),
        Weight::Fp8 { q, scale, block } => Weights::Fp8(Fp8 {
            q: elems(q, Kind::Float8e4m3fn),
            scale: elems(scale, Kind::Float),
            block_n: block.0,
            block_k: block.1,
        }),
    }
}

/// An FP8 weight dequantised to a fresh f32 `[out, in]` tensor: the values the kernels multiply
/// (block scale applied in f32), for libtorch's f32 GEMM.
pub(crate) fn fp8_as_f32(w: &Weight) -> Tensor {
    let Weights::Fp8(f) = weights_of(w) else { panic!("not an FP8 weight") };
    let size = w.size();
    let (n, k) = (size[0] as usize, size[1] as usize);
    let mut out = Tensor::empty([n as i64, k as i64], (Kind::Float, Device::Cpu));
    mlaserve_kernels::fp8::widen_rows(&f, k, 0, n, elems_mut(&mut out, Kind::Float));
    out
}

/// An FP8 weight `[N, K]` as `[N, 2K]` bf16: each row's `bf16(w)` then `bf16(w − bf16(w))` of its
/// f32 value (`mlaserve_kernels::fp8::split_rows_bf16`).
pub(crate) fn fp8_split_bf16(w: &Weight) -> Tensor {
    let Weights::Fp8(f) = weights_of(w) else { panic!("not an FP8 weight") };
    let size = w.size();
    let (n, k) = (size[0] as usize, size[1] as usize);
    let mut out = Tensor::empty([n as i64, 2 * k as i64], (Kind::BFloat16, Device::Cpu));
    mlaserve_kernels::fp8::split_rows_bf16(&f, n, k, elems_mut(&mut out, Kind::BFloat16));
    out
}

/// Several independent `x_i · w_iᵀ` in one parallel region (each pair passes [`use_for`]).
pub fn grouped_linear(pairs: &[(&Tensor, &Weight)]) -> Vec<Tensor> {
    let xs: Vec<Tensor> = pairs.iter().map(|(x, _)| x.contiguous()).collect();
    let outs: Vec<Tensor> = pairs
        .iter()
        .map(|(x, w)| Tensor::empty([x.size()[0], w.size()[0]], (Kind::Float, Device::Cpu)))
        .collect();
    let mut views: Vec<&mut [f32]> = outs
        .iter()
        .map(|o| {
            // SAFETY: freshly allocated contiguous f32 tensors, each viewed once, alive below.
            unsafe { std::slice::from_raw_parts_mut(o.data_ptr() as *mut f32, o.numel()) }
        })
        .collect();
    run_into(&xs, pairs, &mut views);
    outs.into_iter()
        .zip(views)
        .zip(&xs)
        .map(|((o, v), x)| match x.kind() {
            Kind::Float => o,
            kind if o.numel() > HOST_CONVERT_MAX => o.to_kind(kind),
            _ => bf16_tensor(v, &o.size()),
        })
        .collect()
}

/// `x · wᵀ` as f32 holding the values of `x`'s kind (bf16 rounds in place): the logits of a decode
/// step without the casts to bf16 and back (two libtorch passes over the vocabulary).
pub fn linear_float(x: &Tensor, w: &Weight) -> Tensor {
    let out = Tensor::empty([x.size()[0], w.size()[0]], (Kind::Float, Device::Cpu));
    grouped_linear_into(&[(x, w)], &out);
    if x.kind() == Kind::BFloat16 {
        // SAFETY: a fresh contiguous f32 tensor, viewed once.
        rows::round_to_bf16_in_place(unsafe {
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel())
        });
    }
    out
}

/// [`grouped_linear`] of `pairs` that all give `[m, n]`, written unrounded (f32) into the
/// consecutive `[m, n]` blocks of `out` (contiguous f32, `pairs.len() · m · n` elements): per-head
/// attention products land in one `[heads, m, n]` tensor without a copy.
pub fn grouped_linear_into(pairs: &[(&Tensor, &Weight)], out: &Tensor) {
    assert!(out.kind() == Kind::Float && out.is_contiguous() && out.device() == Device::Cpu);
    let xs: Vec<Tensor> = pairs.iter().map(|(x, _)| x.contiguous()).collect();
    let per = pairs.first().map(|(x, w)| (x.size()[0] * w.size()[0]) as usize).unwrap_or(0);
    assert!(pairs.iter().all(|(x, w)| (x.size()[0] * w.size()[0]) as usize == per));
    assert_eq!(out.numel(), per * pairs.len(), "output holds every product");
    // SAFETY: a contiguous f32 CPU tensor, split into disjoint blocks, alive for the call.
    let all = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel()) };
    let mut views: Vec<&mut [f32]> = if per == 0 { Vec::new() } else { all.chunks_mut(per).collect() };
    views.resize_with(pairs.len(), || &mut []);
    run_into(&xs, pairs, &mut views);
}

/// The products of `pairs` (with `xs` their contiguous activations) into f32 `views`.
fn run_into(xs: &[Tensor], pairs: &[(&Tensor, &Weight)], views: &mut [&mut [f32]]) {
    // bf16 activations are exactly bf16: the kernels may multiply them as such (vdpbf16ps). Small
    // ones (decode) are widened to f32 here and their outputs rounded back here, not by a libtorch
    // op each (~3 µs, two per product, ~37 products a decode step); large ones by libtorch, whose
    // vectorised conversion beats this loop (~1-2 ns an element) on a prefill chunk.
    let here = |t: &Tensor| t.kind() == Kind::BFloat16 && t.numel() <= HOST_CONVERT_MAX;
    let widened: Vec<Option<Vec<f32>>> =
        xs.iter().map(|x| here(x).then(|| u16::widen(u16::of(x)).into_owned())).collect();
    let f32s: Vec<Option<Tensor>> =
        xs.iter().map(|x| (!here(x)).then(|| x.to_kind(Kind::Float).contiguous())).collect();
    let problems: Vec<Problem> = xs
        .iter()
        .zip(widened.iter().zip(&f32s))
        .zip(pairs)
        .map(|((x, (wide, xf)), (_, w))| {
            let s = w.size();
            let (n, k) = (s[0] as usize, s[1] as usize);
            assert_eq!(x.size()[1] as usize, k, "inner dimensions differ");
            Problem {
                x: match (wide, xf) {
                    (Some(v), _) => v,
                    (None, Some(t)) => elems(t, Kind::Float),
                    (None, None) => unreachable!("one of the two is made"),
                },
                x_bf16: (x.kind() == Kind::BFloat16).then(|| elems::<u16>(x, Kind::BFloat16)),
                w: weights_of(w),
                m: x.size()[0] as usize,
                n,
                k,
            }
        })
        .collect();
    mlaserve_kernels::grouped_gemm_into(&problems, views);
}

/// Elements of a bf16 activation up to which [`grouped_linear`] converts it itself.
const HOST_CONVERT_MAX: usize = 8192;

/// One active expert for [`routed_experts`]: its tokens, their routing weights, its gate/up
/// matrices (one or two) and its down matrix.
pub(crate) type ExpertRows<'a> = (&'a [i64], &'a [f32], &'a [Weight], &'a Weight);

/// The routed experts of a shard in one kernel call (`mlaserve_kernels::moe`): per active expert its
/// tokens (rows of `x [N, H]`), routing weights, gate/up matrices (one or two) and down matrix.
/// Returns the weighted sum `[N, H]` in `x`'s dtype (bf16 rounds as the tensor form does). `then`:
/// what the product after this call reads (a hint, see [`prefetch`]).
pub(crate) fn routed_experts(x: &Tensor, runs: &[ExpertRows], inter: usize, then: &[&Weight]) -> Tensor {
    let x = x.contiguous();
    let (n, h) = (x.size()[0], x.size()[1]);
    match x.kind() {
        Kind::BFloat16 => {
            tensor_of(&host_step::routed_experts::<u16>(u16::of(&x), h as usize, runs, inter, then), &[n, h])
        }
        Kind::Float => {
            tensor_of(&host_step::routed_experts::<f32>(f32::of(&x), h as usize, runs, inter, then), &[n, h])
        }
        k => panic!("routed experts on {k:?} activations (the kernels take f32 and bf16)"),
    }
}

/// Whether the row kernels (`mlaserve_kernels::rows`) take these tensors: CPU, one float kind
/// they read (f32 or bf16), shared by all.
pub(crate) fn rows_kind(ts: &[&Tensor]) -> Option<Kind> {
    let k = ts[0].kind();
    (matches!(k, Kind::Float | Kind::BFloat16)
        && ts.iter().all(|t| t.kind() == k && t.device() == Device::Cpu))
    .then_some(k)
}

/// RMSNorm of the rows of `x [.., dim]` with weight `w [dim]` (see `rows::rms_norm`), or None when
/// the tensors are not for the row kernels.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
    let kind = rows_kind(&[x, w])?;
    let (x, w) = (x.contiguous(), w.contiguous());
    let out = x.empty_like();
    // SAFETY: `out` is a fresh contiguous tensor of x's kind and size, viewed once.
    macro_rules! go {
        ($t:ty) => {{
            let o = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut $t, out.numel()) };
            mlaserve_kernels::rows::rms_norm::<$t>(elems(&x, kind), elems(&w, kind), eps as f32, o)
        }};
    }
    if kind == Kind::Float {
        go!(f32)
    } else {
        go!(u16)
    }
    Some(out)
}

/// `(x + a, RMSNorm(x + a))` for `x`, `a [.., dim]` of one shape (see `rows::add_rms_norm`), or
/// None when the tensors are not for the row kernels.
pub(crate) fn add_rms_norm(x: &Tensor, a: &Tensor, w: &Tensor, eps: f64) -> Option<(Tensor, Tensor)> {
    let kind = rows_kind(&[x, a, w])?;
    if x.size() != a.size() {
        return None;
    }
    let (x, a, w) = (x.contiguous(), a.contiguous(), w.contiguous());
    let (h, out) = (x.empty_like(), x.empty_like());
    // SAFETY: `h` and `out` are fresh contiguous tensors of x's kind and size, each viewed once.
    macro_rules! go {
        ($t:ty) => {{
            let hs = unsafe { std::slice::from_raw_parts_mut(h.data_ptr() as *mut $t, h.numel()) };
            let o = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut $t, out.numel()) };
            rows::add_rms_norm::<$t>(elems(&x, kind), elems(&a, kind), elems(&w, kind), eps as f32, hs, o)
        }};
    }
    if kind == Kind::Float {
        go!(f32)
    } else {
        go!(u16)
    }
    Some((h, out))
}

/// SwiGLU of `gu [N, 2I]` (gate columns first): `silu(gate) · up`, `[N, I]` in `gu`'s kind,
/// rounded as the tensor form in that kind (see `rows::swiglu_row`); None when the tensor is not
/// for the row kernels.
pub(crate) fn swiglu(gu: &Tensor, inter: usize) -> Option<Tensor> {
    let kind = rows_kind(&[gu])?;
    let gu = gu.contiguous();
    if inter == 0 || gu.dim() != 2 || gu.size()[1] as usize != 2 * inter {
        return None;
    }
    let size = [gu.size()[0], inter as i64];
    Some(match kind {
        Kind::BFloat16 => tensor_of(&host_step::swiglu::<u16>(elems(&gu, kind), inter), &size),
        _ => tensor_of(&host_step::swiglu::<f32>(elems(&gu, kind), inter), &size),
    })
}

/// The latents of `kv [T, rkv + dr]` written into rows `slots` of `cache [slots, rkv + dr]`: the
/// RMSNorm (`norm_w [rkv]`, `eps`) of the first `rkv` columns and the rotary embedding
/// (`cos`/`sin [T, dr/2]`) of the rest, rounded as the tensor form in `kv`'s kind, in one pass
/// without the norm, rope, cat, cast and index_copy tensors (~10 µs a layer at decode). Returns
/// false, writing nothing, when the tensors are not for the row kernels (`kv` of the cache's kind).
pub(crate) fn write_latents(
    kv: &Tensor,
    (norm_w, eps): (&Tensor, f64),
    (cos, sin): (&Tensor, &Tensor),
    cache: &mut Tensor,
    slots: &Tensor,
) -> bool {
    let Some(kind) = rows_kind(&[kv, norm_w, cos, sin, cache]) else { return false };
    let (t, width, rkv) = (kv.size()[0], *kv.size().last().unwrap_or(&0), norm_w.size()[0]);
    let dr = width - rkv;
    let ok = kv.dim() == 2
        && cache.dim() == 2
        && cache.is_contiguous()
        && cache.size()[1] == width
        && slots.kind() == Kind::Int64
        && slots.device() == Device::Cpu
        && slots.numel() as i64 == t
        && dr > 0
        && dr % 2 == 0
        && cos.size() == [t, dr / 2]
        && sin.size() == cos.size();
    if !ok {
        return false;
    }
    let (kv, norm_w, cos, sin, slots) =
        (kv.contiguous(), norm_w.contiguous(), cos.contiguous(), sin.contiguous(), slots.contiguous());
    let slots = elems::<i64>(&slots, Kind::Int64);
    macro_rules! go {
        ($t:ty) => {{
            let cache = elems_mut::<$t>(cache, kind);
            let (x, g) = (elems::<$t>(&kv, kind), elems::<$t>(&norm_w, kind));
            latents_into::<$t>(x, (g, eps), (elems(&cos, kind), elems(&sin, kind)), cache, slots);
        }};
    }
    if kind == Kind::Float {
        go!(f32)
    } else {
        go!(u16)
    }
    true
}

/// The elements of a contiguous CPU tensor of the matching kind, to write.
///
/// The caller holds `t` mutably (no other view reads or writes it meanwhile).
pub(crate) fn elems_mut<T>(t: &mut Tensor, kind: Kind) -> &mut [T] {
    assert_eq!(t.kind(), kind);
    assert!(t.is_contiguous() && t.device() == Device::Cpu);
    // SAFETY: a contiguous CPU tensor of `kind` holds numel() values of T at data_ptr(), alive and
    // borrowed mutably as long as `t`.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

/// [`write_latents`] on host rows: `kv [T, w]` (`w` = rkv + dr, rkv = `norm_w.len()`), `cos`/`sin
/// [T, dr/2]`, into rows `slots` of `cache [slots, w]`.
pub(crate) fn latents_into<T: rows::Elem>(
    kv: &[T],
    (norm_w, eps): (&[T], f64),
    (cos, sin): (&[T], &[T]),
    cache: &mut [T],
    slots: &[i64],
) {
    if slots.is_empty() {
        return;
    }
    let rkv = norm_w.len();
    let w = kv.len() / slots.len();
    let half = (w - rkv) / 2;
    assert!(
        kv.len() == slots.len() * w && w > rkv && cos.len() == slots.len() * half && sin.len() == cos.len()
    );
    let n_slots = cache.len() / w;
    assert!(slots.iter().all(|&s| s >= 0 && (s as usize) < n_slots), "latent slot outside the cache");
    let l = mlaserve_kernels::rows::RopeLayout {
        rows: 1,
        heads: 1,
        half,
        offset: 0,
        row_stride: 2 * half,
        head_stride: 0,
    };
    for (r, &slot) in slots.iter().enumerate() {
        let row = &mut cache[slot as usize * w..(slot as usize + 1) * w];
        let xr = &kv[r * w..(r + 1) * w];
        let (latent, pe) = row.split_at_mut(rkv);
        rows::rms_norm::<T>(&xr[..rkv], norm_w, eps as f32, latent);
        let cs = r * half..(r + 1) * half;
        rows::rope::<T>(&xr[rkv..], l, &cos[cs.clone()], &sin[cs], pe);
    }
}

/// Rotary embedding of `x [T, dr]` or `x [T, h, dr]` (any strides with the last one 1, e.g. a
/// narrowed projection) with `cos`/`sin [T, dr/2]`: a contiguous result, or None when the tensors
/// are not for the row kernels.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
    let kind = rows_kind(&[x, cos, sin])?;
    let (size, stride) = (x.size(), x.stride());
    if !(2..=3).contains(&size.len()) || stride[size.len() - 1] != 1 || size[0] == 0 {
        return None;
    }
    let (rows, heads, dr) = if size.len() == 2 { (size[0], 1, size[1]) } else { (size[0], size[1], size[2]) };
    let (cos, sin) = (cos.contiguous(), sin.contiguous());
    if cos.size() != [rows, dr / 2] || sin.size() != cos.size() || dr % 2 != 0 {
        return None;
    }
    let head_stride = if size.len() == 3 { stride[1] } else { 0 };
    let l = mlaserve_kernels::rows::RopeLayout {
        rows: rows as usize,
        heads: heads as usize,
        half: (dr / 2) as usize,
        offset: 0,
        row_stride: stride[0] as usize,
        head_stride: head_stride as usize,
    };
    let span = (rows - 1) * stride[0] + (heads - 1) * head_stride + dr;
    let out = Tensor::empty(size.as_slice(), (kind, Device::Cpu));
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: the view's elements lie within `span` values of its data pointer (strides
            // checked above); `out` is fresh and contiguous, viewed once.
            let xs = unsafe { std::slice::from_raw_parts(x.data_ptr() as *const $t, span as usize) };
            let o = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut $t, out.numel()) };
            mlaserve_kernels::rows::rope::<$t>(xs, l, elems(&cos, kind), elems(&sin, kind), o)
        }};
    }
    if kind == Kind::Float {
        go!(f32)
    } else {
        go!(u16)
    }
    Some(out)
}

/// Threads libtorch may use for its own ops next to the kernels' pool: one on the CPU (see the
/// module notes).
pub const LIBTORCH_CPU_THREADS: i32 = 1;

/// While alive, libtorch may use as many threads as the kernels' pool: for sections made of a few
/// large libtorch ops (a long prefill chunk's attention, ~10-100 ms per op), where its per-op
/// thread wake-up is noise and one thread would leave the other cores idle.
pub(crate) struct LibtorchThreads(bool);

impl LibtorchThreads {
    pub(crate) fn widen(on_cpu: bool) -> LibtorchThreads {
        let n = pool::global().threads() as i32;
        let widen = on_cpu && n > LIBTORCH_CPU_THREADS && tch::get_num_threads() == LIBTORCH_CPU_THREADS;
        if widen {
            tch::set_num_threads(n);
        }
        LibtorchThreads(widen)
    }
}

impl Drop for LibtorchThreads {
    fn drop(&mut self) {
        if self.0 {
            tch::set_num_threads(LIBTORCH_CPU_THREADS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp8_weight(n: i64, k: i64, block: (usize, usize)) -> Weight {
        let w = Tensor::randn([n, k], (Kind::Float, Device::Cpu));
        let grid = [(n as usize).div_ceil(block.0) as i64, (k as usize).div_ceil(block.1) as i64];
        let scale = Tensor::rand(grid, (Kind::Float, Device::Cpu)) * 0.01 + 0.001;
        Weight::Fp8 { q: w.to_kind(Kind::Float8e4m3fn), scale, block }
    }

    /// The kernels' dequantisation is libtorch's of the same weight, bitwise (partial edge blocks).
    #[test]
    fn fp8_as_f32_is_the_dense_weight() {
        tch::manual_seed(3);
        let w = fp8_weight(40, 70, (16, 32));
        let got = fp8_as_f32(&w);
        assert_eq!(got.size(), [40, 70]);
        assert!(got.equal(&w.to_dense(Kind::Float)), "dequantised values differ");
    }

    /// Latents written by the row kernels equal the tensor form's norm, rope, cat and index_copy,
    /// bitwise, in f32 and bf16; other slots stay untouched.
    #[test]
    fn write_latents_equals_the_tensor_form() {
        tch::manual_seed(9);
        let (t, rkv, dr, n_slots) = (3i64, 24i64, 8i64, 10i64);
        for kind in [Kind::Float, Kind::BFloat16] {
            let kv = Tensor::randn([t, rkv + dr], (Kind::Float, Device::Cpu)).to_kind(kind);
            let w = (Tensor::rand([rkv], (Kind::Float, Device::Cpu)) + 0.5).to_kind(kind);
            let ang = Tensor::rand([t, dr / 2], (Kind::Float, Device::Cpu)) * 3.0;
            let (cos, sin) = (ang.cos().to_kind(kind), ang.sin().to_kind(kind));
            let slots = Tensor::from_slice(&[7i64, 2, 5]);
            let before = Tensor::randn([n_slots, rkv + dr], (Kind::Float, Device::Cpu)).to_kind(kind);
            let mut want = before.copy();
            let (a, b) = (
                crate::norm::RmsNorm::new(w.shallow_clone(), 1e-6).forward(&kv.narrow(1, 0, rkv)),
                rope(&kv.narrow(1, rkv, dr), &cos, &sin).unwrap(),
            );
            let _ = want.index_copy_(0, &slots, &Tensor::cat(&[a, b], 1));
            let mut got = before.copy();
            assert!(write_latents(&kv, (&w, 1e-6), (&cos, &sin), &mut got, &slots));
            assert!(got.equal(&want), "{kind:?}");
            assert!(!got.equal(&before));
            let mut f32_cache = Tensor::zeros([n_slots, rkv + dr], (Kind::Float, Device::Cpu));
            if kind == Kind::BFloat16 {
                assert!(
                    !write_latents(&kv, (&w, 1e-6), (&cos, &sin), &mut f32_cache, &slots),
                    "kinds differ"
                );
            }
        }
    }

    /// The fused residual add and norm against libtorch's add, then the norm: bitwise.
    #[test]
    fn add_rms_norm_is_libtorchs_add_then_the_norm() {
        tch::manual_seed(4);
        for kind in [Kind::Float, Kind::BFloat16] {
            let x = (Tensor::randn([5, 1024], (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind);
            let a = Tensor::randn([5, 1024], (Kind::Float, Device::Cpu)).to_kind(kind);
            let w = (Tensor::rand([1024], (Kind::Float, Device::Cpu)) + 0.5).to_kind(kind);
            let norm = crate::norm::RmsNorm::new(w.shallow_clone(), 1e-6);
            let (h, n) = add_rms_norm(&x, &a, &w, 1e-6).expect("CPU tensors of a row kind");
            let sum = &x + &a;
            assert!(h.equal(&sum), "{kind:?}: the add rounds as libtorch's");
            assert!(n.equal(&norm.forward(&sum)), "{kind:?}: the norm of that sum");
            let (h2, n2) = norm.forward_residual(&x.narrow(0, 1, 3), &a.narrow(0, 1, 3));
            assert!(h2.equal(&sum.narrow(0, 1, 3)) && n2.equal(&n.narrow(0, 1, 3)), "{kind:?}: rows 1..4");
        }
        let (x, a) = (
            Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)),
            Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)),
        );
        assert!(
            add_rms_norm(&x, &a, &Tensor::ones([4], (Kind::Float, Device::Cpu)), 1e-6).is_none(),
            "shapes differ"
        );
    }

    /// The SwiGLU row kernel against libtorch's `silu(gate) * up` in the same kind: f32 within
    /// 1e-5, bf16 equal but for rare rounding ties (one bf16 step).
    #[test]
    fn swiglu_matches_libtorch() {
        tch::manual_seed(5);
        for (n, i) in [(1i64, 256i64), (7, 37)] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let gu = (Tensor::randn([n, 2 * i], (Kind::Float, Device::Cpu)) * 4.0).to_kind(kind);
                let want = gu.narrow(-1, 0, i).silu() * gu.narrow(-1, i, i);
                let got = swiglu(&gu, i as usize).expect("a CPU tensor of a row kind");
                assert_eq!(got.kind(), kind);
                let d = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs();
                if kind == Kind::Float {
                    assert!(d.max().double_value(&[]) < 1e-5);
                } else {
                    let off = d.gt(0.0).sum(Kind::Int64).int64_value(&[]);
                    assert!(off * 100 <= n * i, "{off} of {} differ", n * i);
                    let rel = d / want.to_kind(Kind::Float).abs().clamp_min(1e-3);
                    assert!(rel.max().double_value(&[]) <= 1.0 / 128.0, "more than a bf16 step");
                }
            }
        }
        assert!(swiglu(&Tensor::zeros([2, 5], (Kind::Float, Device::Cpu)), 2).is_none(), "odd width");
    }

    /// Every weight format and activation kind on the process's kernel path, against libtorch in
    /// float64 on the same (dequantised) weights. The kernel crate tests each path against a
    /// float64 reference of its own; this checks the tensor glue.
    #[test]
    fn matches_libtorch_float64() {
        for (m, n, k) in [(1, 37, 13), (3, 130, 300), (16, 96, 64), (5, 257, 1000)] {
            let weights = [
                Weight::Dense(Tensor::randn([n, k], (Kind::Float, Device::Cpu))),
                Weight::Dense(Tensor::randn([n, k], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)),
                fp8_weight(n, k, (128, 128)),
                fp8_weight(n, k, (16, 8)),
            ];
            for w in &weights {
                for xkind in [Kind::Float, Kind::BFloat16] {
                    let x = Tensor::randn([m, k], (Kind::Float, Device::Cpu)).to_kind(xkind);
                    assert!(use_for(&x, w));
                    let want = x.to_kind(Kind::Double).mm(&w.to_dense(Kind::Double).tr());
                    let got = linear(&x, w);
                    assert_eq!(got.kind(), xkind, "output keeps the input dtype");
                    let err = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
                    let scale = want.abs().max().double_value(&[]).max(1.0);
                    let tol = if xkind == Kind::Float { 1e-5 } else { 1e-2 };
                    assert!(err / scale < tol, "m={m} n={n} k={k} {xkind:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn grouped_products_are_independent() {
        let a = Tensor::randn([5, 24], (Kind::Float, Device::Cpu));
        let wa = Weight::Dense(Tensor::randn([40, 24], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16));
        let b = Tensor::randn([2, 16], (Kind::BFloat16, Device::Cpu));
        let wb = fp8_weight(7, 16, (4, 4));
        let empty = Tensor::zeros([0, 16], (Kind::Float, Device::Cpu));
        let outs = grouped_linear(&[(&a, &wa), (&b, &wb), (&empty, &wb)]);
        assert_eq!(outs[1].kind(), Kind::BFloat16, "output keeps the input dtype");
        assert_eq!(outs[2].size(), vec![0, 7]);
        let ra = a.mm(&wa.to_dense(Kind::Float).tr());
        let rb = b.to_kind(Kind::Float).mm(&wb.to_dense(Kind::Float).tr());
        assert!((&outs[0] - ra).abs().max().double_value(&[]) < 1e-4);
        assert!((outs[1].to_kind(Kind::Float) - rb).abs().max().double_value(&[]) < 0.05);
    }
}
