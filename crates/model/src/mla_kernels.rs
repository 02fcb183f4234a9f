//! libtorch tensors in and out of the absorbed decode core (`mlaserve_kernels::attention`): the
//! queries of a layer's decode rows in, `W_UV`'s output out.

use mlaserve_kernels::attention::{CacheRows, MlaDecode, SeqKeys};
use mlaserve_kernels::rows;
use tch::{Device, Kind, Tensor};

use crate::absorb::HeadWeights;
use crate::batch::PagedSeq;
use crate::host_step::HostAct;
use crate::kernels::{bf16_tensor, elems, rows_kind, weights_of};

/// What a layer's decode core reads besides its queries: the cache `[slots, rkv + dr]` (f32 or
/// bf16), the absorption matrices `W_UKᵀ` (`[rkv, dn]` a head) and `W_UV` (`[dv, rkv]` a head) in
/// any format the kernels read, the sequences and the softmax scale.
pub(crate) struct CoreInputs<'a> {
    pub cache: &'a Tensor,
    pub w_uk_t: &'a HeadWeights,
    pub w_uv: &'a HeadWeights,
    pub seqs: &'a [PagedSeq],
    pub scale: f64,
}

/// The absorbed decode core for `q_nope [n, h, dn]`, `q_pe [n, h, dr]` (any strides with the last
/// one 1): `[n, h, dv]` in `q_nope`'s kind (f32 or bf16). bf16 activations round the absorbed query
/// and `o_lat` to bf16, as the tensor form does.
pub(crate) fn mla_decode(q_nope: &Tensor, q_pe: &Tensor, c: &CoreInputs) -> Tensor {
    let (n, h, dn) = (q_nope.size()[0], q_nope.size()[1], q_nope.size()[2]);
    let dr = q_pe.size()[2];
    let bf16 = q_nope.kind() == Kind::BFloat16;
    let o = core(&rows_f32(q_nope), &rows_f32(q_pe), (h, dn, dr), c, bf16);
    out_tensor(&o, &[n, h, c.w_uv.out], bf16)
}

/// [`mla_decode`] straight from the query projection's output `q [n, h · (dn + dr)]` (contiguous,
/// f32 or bf16, each head's `dn` values then its `dr` rotary ones), with `cos`/`sin [n, dr / 2]`
/// of `q`'s kind: each head's halves are read in place and the rotary half turned here by the
/// same row kernel as `rope::apply_rows`, instead of through a view, two narrows and a rotary
/// tensor (cold libtorch calls between two products, ~25 µs a layer at batch-1 decode). Returns
/// `[n, h · dv]` (what the output projection takes), or None when the kernels do not take these
/// tensors (the caller keeps the tensor form).
pub(crate) fn mla_decode_q(
    q: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    (h, dn, dr): (i64, i64, i64),
    c: &CoreInputs,
) -> Option<Tensor> {
    let kind = rows_kind(&[q, cos, sin])?;
    let size = q.size();
    let width = dn + dr;
    let fits = size.len() == 2
        && size[0] > 0
        && size[1] == h * width
        && dr > 0
        && dr % 2 == 0
        && q.is_contiguous()
        && cos.is_contiguous()
        && sin.is_contiguous()
        && cos.size() == [size[0], dr / 2]
        && sin.size() == [size[0], dr / 2];
    if !fits {
        return None;
    }
    let n = size[0] as usize;
    let bf16 = kind == Kind::BFloat16;
    let o = if bf16 {
        decode_rows::<u16>(elems(q, kind), (elems(cos, kind), elems(sin, kind)), (h, dn, dr), c)
    } else {
        decode_rows::<f32>(elems(q, kind), (elems(cos, kind), elems(sin, kind)), (h, dn, dr), c)
    };
    Some(out_tensor(&o, &[n as i64, h * c.w_uv.out], bf16))
}

/// [`mla_decode_q`] on host rows `q [n, h · (dn + dr)]` of f32 or bf16 values (`cos`/`sin [n, dr /
/// 2]` of the same type): `o [n, h, dv]`, rounded to bf16 values for bf16 rows.
pub(crate) fn decode_rows<T: HostAct>(
    q: &[T],
    (cos, sin): (&[T], &[T]),
    (h, dn, dr): (i64, i64, i64),
    c: &CoreInputs,
) -> Vec<f32> {
    let (hu, dnu, dru) = (h as usize, dn as usize, dr as usize);
    let n = q.len() / (hu * (dnu + dru));
    let mut qn = vec![0f32; n * hu * dnu];
    let mut qp = vec![0f32; n * hu * dru];
    let l = rows::RopeLayout {
        rows: n,
        heads: hu,
        half: dru / 2,
        offset: dnu,
        row_stride: hu * (dnu + dru),
        head_stride: dnu + dru,
    };
    let wide = T::widen(q);
    for (head, dst) in wide.chunks_exact(dnu + dru).zip(qn.chunks_exact_mut(dnu)) {
        dst.copy_from_slice(&head[..dnu]);
    }
    let mut turned = vec![T::default(); n * hu * dru];
    rows::rope::<T>(q, l, cos, sin, &mut turned);
    qp.copy_from_slice(&T::widen(&turned));
    core(&qn, &qp, (h, dn, dr), c, T::KIND == Kind::BFloat16)
}

/// The kernel call for f32 queries `qn [n, h, dn]`, `qp [n, h, dr]`: `o [n, h, dv]`.
fn core(qn: &[f32], qp: &[f32], (h, dn, dr): (i64, i64, i64), c: &CoreInputs, round_bf16: bool) -> Vec<f32> {
    let (rkv, dv) = (c.w_uk_t.out, c.w_uv.out);
    assert_eq!(c.cache.size()[1], rkv + dr, "cache rows and queries differ in width");
    assert!(c.w_uk_t.heads == h && c.w_uv.heads == h, "absorption matrices for {h} heads");
    let rows = match c.cache.kind() {
        Kind::BFloat16 => CacheRows::Bf16(elems(c.cache, Kind::BFloat16)),
        _ => CacheRows::F32(elems(c.cache, Kind::Float)),
    };
    let keys: Vec<SeqKeys> = c
        .seqs
        .iter()
        .map(|s| SeqKeys { row: s.row, new: s.new, cached: s.cached, slots: &s.slots })
        .collect();
    mlaserve_kernels::attention::mla_decode(&MlaDecode {
        q_nope: qn,
        q_pe: qp,
        w_uk_t: weights_of(&c.w_uk_t.w),
        w_uv: weights_of(&c.w_uv.w),
        cache: rows,
        heads: h as usize,
        dn: dn as usize,
        dr: dr as usize,
        dv: dv as usize,
        rkv: rkv as usize,
        scale: c.scale as f32,
        seqs: &keys,
        round_bf16,
    })
}

/// The core's output as a tensor of `size`: bf16 (its values already are) or f32.
fn out_tensor(o: &[f32], size: &[i64], bf16: bool) -> Tensor {
    if bf16 {
        bf16_tensor(o, size)
    } else {
        Tensor::from_slice(o).view(size)
    }
}

/// The values of a 3-D f32 or bf16 CPU tensor whose last dimension is contiguous (e.g. a narrowed
/// projection), row-major, as f32: bf16 widened here rather than by a libtorch cast and copy.
fn rows_f32(t: &Tensor) -> Vec<f32> {
    let (size, stride) = (t.size(), t.stride());
    assert!(size.len() == 3 && stride[2] == 1 && t.device() == Device::Cpu, "rows of a 3-D CPU tensor");
    let (a, b, c) = (size[0] as usize, size[1] as usize, size[2] as usize);
    let mut out = vec![0f32; a * b * c];
    if out.is_empty() {
        return out;
    }
    let span = (a - 1) * stride[0] as usize + (b - 1) * stride[1] as usize + c;
    macro_rules! go {
        ($t:ty, $row:expr) => {{
            // SAFETY: the view's elements lie within `span` values of its data pointer (strides
            // as reported, last one 1), alive as long as `t`.
            let v = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const $t, span) };
            for i in 0..a {
                for j in 0..b {
                    let src = &v[i * stride[0] as usize + j * stride[1] as usize..][..c];
                    $row(src, &mut out[(i * b + j) * c..][..c]);
                }
            }
        }};
    }
    match t.kind() {
        Kind::BFloat16 => go!(u16, |s: &[u16], d: &mut [f32]| rows::widen_bf16(s, d)),
        Kind::Float => go!(f32, |s: &[f32], d: &mut [f32]| d.copy_from_slice(s)),
        k => panic!("rows of kind {k:?}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Weight;

    /// The core straight from the projection's output equals the core over its narrowed halves with
    /// the rotary half turned by `rope::apply_rows`, bitwise, in f32 and bf16 (two sequences, one of
    /// two new rows); tensors it does not take fall back (None).
    #[test]
    fn from_the_projection_equals_the_narrowed_form() {
        tch::manual_seed(11);
        let (h, dn, dr, rkv, dv, slots) = (3i64, 16i64, 8i64, 24i64, 12i64, 20i64);
        let seqs = vec![
            PagedSeq { row: 0, new: 1, cached: 4, slots: vec![3, 9, 1, 0, 7] },
            PagedSeq { row: 1, new: 2, cached: 2, slots: vec![11, 4, 5, 18] },
        ];
        let n = 3;
        let f = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            let w_uk_t =
                HeadWeights { w: Weight::Dense(f(&[h * rkv, dn]).to_kind(kind)), heads: h, out: rkv };
            let w_uv = HeadWeights { w: Weight::Dense(f(&[h * dv, rkv]).to_kind(kind)), heads: h, out: dv };
            let cache = f(&[slots, rkv + dr]).to_kind(kind);
            let c = CoreInputs { cache: &cache, w_uk_t: &w_uk_t, w_uv: &w_uv, seqs: &seqs, scale: 0.3 };
            let q = f(&[n, h * (dn + dr)]).to_kind(kind);
            let ang = Tensor::rand([n, dr / 2], (Kind::Float, Device::Cpu)) * 3.0;
            let (cos, sin) = (ang.cos().to_kind(kind), ang.sin().to_kind(kind));
            let got = mla_decode_q(&q, (&cos, &sin), (h, dn, dr), &c).expect("CPU tensors of a row kind");
            let q3 = q.view([n, h, dn + dr]);
            let q_pe = crate::rope::apply_rows(&q3.narrow(2, dn, dr), &cos, &sin);
            let want = mla_decode(&q3.narrow(2, 0, dn), &q_pe, &c).reshape([n, h * dv]);
            assert_eq!(got.kind(), kind);
            assert!(got.equal(&want), "{kind:?}");
            let strided = q.narrow(1, 0, h * (dn + dr) - 1);
            assert!(mla_decode_q(&strided, (&cos, &sin), (h, dn, dr), &c).is_none(), "width");
            let f64_q = q.to_kind(Kind::Double);
            assert!(mla_decode_q(&f64_q, (&cos, &sin), (h, dn, dr), &c).is_none(), "kind");
        }
    }
}
