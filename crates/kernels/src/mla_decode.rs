//! The absorbed decode core of an MLA layer (deepseek-v3.md §3) on the kernels: the queries'
//! absorption through W_UK, [`latent_attention`] over the paged latent cache, and `o_lat`'s
//! product with W_UV. Short contexts run each head's three steps as one task (no hand-off between
//! them); longer ones run each step as its own parallel region, the attention split by key blocks.

use crate::attention::{
    block_on, check_slots, latent_attention_with, CacheRows, LatentAttention, Partial, SeqKeys, Task,
    KEYS_PER_TASK,
};
use crate::pool::SendPtr;
use crate::rows::round_bf16;
use crate::{gemm_here, pool, Isa, Problem, Weights};

/// The whole absorbed decode core of a layer: queries folded through W_UK into latent space,
/// [`latent_attention`], and `o_lat` mapped through W_UV. Replaces per-head
/// products and their tensor glue (transposes, copies, stacks: ~20 small ops a layer).
pub struct MlaDecode<'a> {
    /// `[rows, heads, dn]` and `[rows, heads, dr]` (rotated), f32.
    pub q_nope: &'a [f32],
    pub q_pe: &'a [f32],
    /// `W_UK` per head transposed, `[heads, rkv, dn]`; `W_UV`, `[heads, dv, rkv]` (f32, bf16, or FP8
    /// with each head's block-scale grid after the previous head's).
    pub w_uk_t: Weights<'a>,
    pub w_uv: Weights<'a>,
    pub cache: CacheRows<'a>,
    pub heads: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
    pub rkv: usize,
    pub scale: f32,
    pub seqs: &'a [SeqKeys<'a>],
    /// Round the absorbed query and `o_lat` to bf16, as bf16 activations would hold them.
    pub round_bf16: bool,
}

/// Per head `h`: `out[r, h, i] = Σ_k w[h, i, k] · x[r, h, k]` for `x [m, heads, k]`, `w [heads, n, k]`,
/// `out [m, heads, out_width]` (the first `n` of each row written): one grouped product of the GEMM
/// kernels (their streaming GEMV at one row, register tiles above), one problem per head.
#[allow(clippy::too_many_arguments)]
fn per_head(
    isa: Isa,
    w: &Weights,
    heads: usize,
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    out_width: usize,
    x_is_bf16: bool,
) {
    let head_w = |h: usize| head_of(w, h, n, k);
    // Each head's rows side by side: [heads][m, k].
    let mut xh = vec![0f32; heads * m * k];
    for r in 0..m {
        for h in 0..heads {
            xh[(h * m + r) * k..(h * m + r + 1) * k]
                .copy_from_slice(&x[(r * heads + h) * k..(r * heads + h + 1) * k]);
        }
    }
    let mut xb = vec![0u16; if x_is_bf16 { xh.len() } else { 0 }];
    if x_is_bf16 {
        round_bf16(&xh, &mut xb);
    }
    let problems: Vec<crate::Problem> = (0..heads)
        .map(|h| crate::Problem {
            x: &xh[h * m * k..(h + 1) * m * k],
            x_bf16: x_is_bf16.then(|| &xb[h * m * k..(h + 1) * m * k]),
            w: head_w(h),
            m,
            n,
            k,
        })
        .collect();
    let mut ys = vec![0f32; heads * m * n];
    let mut outs: Vec<&mut [f32]> = ys.chunks_mut(m * n).collect();
    crate::grouped_gemm_into_with(isa, &problems, &mut outs);
    for h in 0..heads {
        for r in 0..m {
            out[(r * heads + h) * out_width..][..n]
                .copy_from_slice(&ys[(h * m + r) * n..(h * m + r + 1) * n]);
        }
    }
}

/// Head `h`'s `[n, k]` matrix of per-head weights `[heads, n, k]`.
fn head_of<'a>(w: &Weights<'a>, h: usize, n: usize, k: usize) -> Weights<'a> {
    match *w {
        Weights::F32(v) => Weights::F32(&v[h * n * k..(h + 1) * n * k]),
        Weights::Bf16(v) => Weights::Bf16(&v[h * n * k..(h + 1) * n * k]),
        // Each head's block grid follows the previous head's (heads start on block rows).
        Weights::Fp8(f) => {
            let grid = n.div_ceil(f.block_n) * k.div_ceil(f.block_k);
            Weights::Fp8(crate::Fp8 {
                q: &f.q[h * n * k..(h + 1) * n * k],
                scale: &f.scale[h * grid..(h + 1) * grid],
                ..f
            })
        }
    }
}

fn round_all(v: &mut [f32]) {
    crate::rows::round_to_bf16_in_place(v)
}

/// `[rows, heads, dv]` (f32) on the process's kernel path.
pub fn mla_decode(p: &MlaDecode) -> Vec<f32> {
    mla_decode_with(crate::isa::selected(), p)
}

/// [`mla_decode`] on a given path.
pub fn mla_decode_with(isa: Isa, p: &MlaDecode) -> Vec<f32> {
    assert!(isa.supported(), "kernel path {isa} is not supported by this CPU");
    let h = p.heads;
    let m = p.seqs.iter().map(|s| s.row + s.new).max().unwrap_or(0);
    assert!(p.q_pe.len() >= m * h * p.dr, "rotary queries too small");
    assert!(p.q_nope.len() >= m * h * p.dn, "queries too small");
    if h >= 2 * pool::global().threads() && p.seqs.iter().all(|s| s.cached + s.new <= KEYS_PER_TASK) {
        by_head(isa, p, m)
    } else {
        three_regions(isa, p, m)
    }
}

/// [`mla_decode_with`] as three parallel regions: the absorption of every head, the attention split
/// by key blocks, the output products.
fn three_regions(isa: Isa, p: &MlaDecode, m: usize) -> Vec<f32> {
    let (h, w) = (p.heads, p.rkv + p.dr);
    let mut qc = vec![0f32; m * h * w];
    per_head(isa, &p.w_uk_t, h, p.rkv, p.dn, p.q_nope, m, &mut qc, w, p.round_bf16);
    for (row, pe) in qc.chunks_exact_mut(w).zip(p.q_pe.chunks_exact(p.dr)) {
        if p.round_bf16 {
            round_all(&mut row[..p.rkv]);
        }
        row[p.rkv..].copy_from_slice(pe);
    }
    let a = LatentAttention {
        q: &qc,
        cache: p.cache,
        heads: h,
        width: w,
        value_width: p.rkv,
        scale: p.scale,
        seqs: p.seqs,
    };
    let mut o_lat = latent_attention_with(isa, &a);
    if p.round_bf16 {
        round_all(&mut o_lat);
    }
    let mut out = vec![0f32; m * h * p.dv];
    per_head(isa, &p.w_uv, h, p.dv, p.rkv, &o_lat, m, &mut out, p.dv, p.round_bf16);
    out
}

/// [`mla_decode_with`] as one task per head: its queries' absorption, its attention over every
/// sequence (each sequence's keys one block) and its output product on one thread, so the pool
/// hands off once per layer instead of three times, with no merge of partial states. The numbers
/// are those of the three-region form (the same products, and a single block's state is final).
fn by_head(isa: Isa, p: &MlaDecode, m: usize) -> Vec<f32> {
    let (h, w, dn, dr, dv, rkv) = (p.heads, p.rkv + p.dr, p.dn, p.dr, p.dv, p.rkv);
    check_slots(p.seqs, p.cache.len() / w);
    // Its products run on the threads here, not through `grouped_gemm_into_with` (which records
    // the three-region form's).
    crate::replay::record([p.w_uk_t, p.w_uv]);
    let mut out = vec![0f32; m * h * dv];
    let op = SendPtr(out.as_mut_ptr());
    let threads = pool::global().threads();
    let run = |hd: usize| {
        let bits_of = |x: &[f32]| {
            let mut b = vec![0u16; if p.round_bf16 { x.len() } else { 0 }];
            if p.round_bf16 {
                round_bf16(x, &mut b);
            }
            b
        };
        let xq: Vec<f32> =
            (0..m).flat_map(|r| &p.q_nope[(r * h + hd) * dn..(r * h + hd + 1) * dn]).copied().collect();
        let xb = bits_of(&xq);
        let mut q_abs = vec![0f32; m * rkv];
        let x_bf16 = p.round_bf16.then_some(&xb[..]);
        let w_uk = head_of(&p.w_uk_t, hd, rkv, dn);
        gemm_here(isa, &Problem { x: &xq, x_bf16, w: w_uk, m, n: rkv, k: dn }, &mut q_abs);
        if p.round_bf16 {
            round_all(&mut q_abs);
        }
        let mut qc = vec![0f32; m * w];
        for r in 0..m {
            qc[r * w..r * w + rkv].copy_from_slice(&q_abs[r * rkv..(r + 1) * rkv]);
            qc[r * w + rkv..(r + 1) * w].copy_from_slice(&p.q_pe[(r * h + hd) * dr..(r * h + hd + 1) * dr]);
        }
        // While this head attends (arithmetic over cached latents, no weight stream), its W_UV
        // rows come into L2, and so does the W_UK of the head this thread likely takes next (tasks
        // go out in order, one per thread at a time). In-process A/B on a Zen 4 VM: W_UV alone made
        // batch-1 steps 1.04-1.06x faster (FP8 1.07x, batch 16 1.05x; into L1 1-3 points less),
        // the next W_UK another 1.02-1.05x (FP8 1.06x, batch 16 1.03x).
        let w_uv = head_of(&p.w_uv, hd, dv, rkv);
        let next = hd + threads;
        let next_uk = (next < h).then(|| head_of(&p.w_uk_t, next, rkv, dn));
        for (addr, len) in w_uv.ranges().into_iter().chain(next_uk.iter().flat_map(Weights::ranges)) {
            pool::prefetch_range::<{ pool::TO_L2 }>(addr, len);
        }
        let a = LatentAttention {
            q: &qc,
            cache: p.cache,
            heads: 1,
            width: w,
            value_width: rkv,
            scale: p.scale,
            seqs: p.seqs,
        };
        let mut o_lat = vec![0f32; m * rkv];
        for (i, s) in p.seqs.iter().enumerate() {
            let t = Task { seq: i, k0: 0, k1: s.cached + s.new, h0: 0, h1: 1 };
            let mut st: Vec<Partial> = (0..s.new).map(|_| Partial { max: 0.0, sum: 0.0 }).collect();
            let o = &mut o_lat[s.row * rkv..(s.row + s.new) * rkv];
            // SAFETY: `isa` is supported (checked by the caller); the slots were checked; `st` and `o`
            // hold this sequence's rows of the single head.
            unsafe { block_on(isa, &a, s, &t, &mut st, o) };
            // Query j sees key 0 at least, so every sum is positive.
            for (row, st) in o.chunks_exact_mut(rkv).zip(&st) {
                let inv = 1.0 / st.sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
        if p.round_bf16 {
            round_all(&mut o_lat);
        }
        let ob = bits_of(&o_lat);
        let mut y = vec![0f32; m * dv];
        let x_bf16 = p.round_bf16.then_some(&ob[..]);
        gemm_here(isa, &Problem { x: &o_lat, x_bf16, w: w_uv, m, n: dv, k: rkv }, &mut y);
        for r in 0..m {
            // SAFETY: head hd's columns of each output row belong to this task alone; `out`
            // outlives the parallel region.
            unsafe {
                std::ptr::copy_nonoverlapping(y.as_ptr().add(r * dv), op.get().add((r * h + hd) * dv), dv)
            };
        }
    };
    pool::global().for_each(h, &run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::reference;
    use crate::{bf16_bits, bf16_to_f32};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The per-head form gives the three-region form's numbers exactly: every weight format, f32
    /// and bf16 rounding, several sequences (two new tokens in one), on every path the CPU has.
    #[test]
    fn by_head_equals_three_regions() {
        let (h, dn, dr, dv, rkv) = (8usize, 24usize, 8usize, 16usize, 40usize);
        let w = rkv + dr;
        let f =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 * 0.61 + s).sin()) * 0.8).collect() };
        let nslots = 200;
        let cache32 = f(nslots * w, 0.3);
        let cache16: Vec<u16> = cache32.iter().map(|&v| bf16_bits(v)).collect();
        let slots: Vec<i64> = (0..nslots as i64).map(|i| (i * 37) % nslots as i64).collect();
        let seqs = [
            SeqKeys { row: 0, new: 1, cached: 0, slots: &slots },
            SeqKeys { row: 1, new: 2, cached: 30, slots: &slots[40..] },
            SeqKeys { row: 3, new: 1, cached: 120, slots: &slots[75..] },
        ];
        let m = 4;
        let (q_nope, q_pe) = (f(m * h * dn, 1.0), f(m * h * dr, 2.0));
        let (uk, uv) = (f(h * rkv * dn, 3.0), f(h * dv * rkv, 4.0));
        let (uk16, uv16): (Vec<u16>, Vec<u16>) =
            (uk.iter().map(|&v| bf16_bits(v)).collect(), uv.iter().map(|&v| bf16_bits(v)).collect());
        let codes = |n: usize| -> Vec<u8> { (0..n).map(|i| ((i * 7 + 3) % 120) as u8).collect() };
        let (uk8, uv8) = (codes(h * rkv * dn), codes(h * dv * rkv));
        let (sk, sv) = (vec![0.01f32; h * 3 * 3], vec![0.02f32; h * 3]);
        let fp8 = |q, scale| Weights::Fp8(crate::Fp8 { q, scale, block_n: 16, block_k: 16 });
        for isa in crate::isa::ALL.into_iter().filter(|i| i.supported()) {
            for format in 0..3 {
                let (wk, wv) = match format {
                    0 => (Weights::F32(&uk), Weights::F32(&uv)),
                    1 => (Weights::Bf16(&uk16), Weights::Bf16(&uv16)),
                    _ => (fp8(&uk8[..], &sk[..]), fp8(&uv8[..], &sv[..])),
                };
                for (cache, round_bf16) in
                    [(CacheRows::F32(&cache32), false), (CacheRows::Bf16(&cache16), true)]
                {
                    let p = MlaDecode {
                        q_nope: &q_nope,
                        q_pe: &q_pe,
                        w_uk_t: wk,
                        w_uv: wv,
                        cache,
                        heads: h,
                        dn,
                        dr,
                        dv,
                        rkv,
                        scale: 0.2,
                        seqs: &seqs,
                        round_bf16,
                    };
                    let (a, b) = (by_head(isa, &p, m), three_regions(isa, &p, m));
                    assert!(a.iter().any(|&v| v != 0.0));
                    assert_eq!(a, b, "{isa} format {format} bf16 {round_bf16}");
                }
            }
        }
    }

    /// Both forms of the core record W_UK and W_UV for the replay once (the three-region form
    /// through its grouped products, the per-head form itself).
    #[test]
    fn both_forms_record_the_absorption_once() {
        let _one = crate::replay::ARMING.lock().unwrap_or_else(|e| e.into_inner());
        let (h, dn, dr, dv, rkv) = (8usize, 16usize, 8usize, 16usize, 32usize);
        let w = rkv + dr;
        let nslots = KEYS_PER_TASK + 8;
        let cache = vec![0.25f32; nslots * w];
        let slots: Vec<i64> = (0..nslots as i64).collect();
        let (q_nope, q_pe) = (vec![0.5f32; h * dn], vec![0.5f32; h * dr]);
        let (uk, uv) = (vec![0.1f32; h * rkv * dn], vec![0.2f32; h * dv * rkv]);
        for cached in [3, KEYS_PER_TASK + 4] {
            let seqs = [SeqKeys { row: 0, new: 1, cached, slots: &slots }];
            let p = MlaDecode {
                q_nope: &q_nope,
                q_pe: &q_pe,
                w_uk_t: Weights::F32(&uk),
                w_uv: Weights::F32(&uv),
                cache: CacheRows::F32(&cache),
                heads: h,
                dn,
                dr,
                dv,
                rkv,
                scale: 0.2,
                seqs: &seqs,
                round_bf16: false,
            };
            crate::replay::start();
            mla_decode(&p);
            let r = crate::replay::finish();
            assert_eq!(r.bytes(), (uk.len() + uv.len()) * 4, "context {cached}");
        }
    }

    /// The absorbed core against float64: W_UK, attention and W_UV (f32, bf16 and FP8 weights, FP8
    /// with each head's block grid after the previous head's and partial edge blocks).
    #[test]
    fn mla_decode_matches_float64() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (h, dn, dr, dv, rkv) = (3usize, 20usize, 6usize, 12usize, 70usize);
        let w = rkv + dr;
        let nslots = 300;
        let cache: Vec<f32> = (0..nslots * w).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let slots: Vec<i64> = (0..nslots as i64).rev().collect();
        let seqs = [
            SeqKeys { row: 0, new: 2, cached: 5, slots: &slots },
            SeqKeys { row: 2, new: 1, cached: 280, slots: &slots[7..] },
        ];
        let m = 3;
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (q_nope, q_pe, uk, uv) = (r(m * h * dn), r(m * h * dr), r(h * rkv * dn), r(h * dv * rkv));
        let (uk16, uv16): (Vec<u16>, Vec<u16>) =
            (uk.iter().map(|&v| bf16_bits(v)).collect(), uv.iter().map(|&v| bf16_bits(v)).collect());
        let mut codes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| rng.random_range(0u8..=255))
                .map(|b| if b & 0x7F == 0x7F { 0 } else { b })
                .collect()
        };
        let (uk8, uv8) = (codes(h * rkv * dn), codes(h * dv * rkv));
        let block = (16usize, 8usize);
        let grid = |n: usize, k: usize| n.div_ceil(block.0) * k.div_ceil(block.1);
        let sk: Vec<f32> = (0..h * grid(rkv, dn)).map(|i| 1e-3 * (1 + i % 7) as f32).collect();
        let sv: Vec<f32> = (0..h * grid(dv, rkv)).map(|i| 1e-3 * (1 + i % 5) as f32).collect();
        let fp8 = |q, scale| Weights::Fp8(crate::Fp8 { q, scale, block_n: block.0, block_k: block.1 });
        for isa in crate::isa::ALL.into_iter().filter(|i| i.supported()) {
            for format in 0..3 {
                let (wk, wv) = match format {
                    0 => (Weights::F32(&uk), Weights::F32(&uv)),
                    1 => (Weights::Bf16(&uk16), Weights::Bf16(&uv16)),
                    _ => (fp8(&uk8[..], &sk[..]), fp8(&uv8[..], &sv[..])),
                };
                // Element i of a [h, n, k] weight.
                let val = |w: &Weights, n: usize, k: usize, i: usize| match w {
                    Weights::F32(v) => v[i] as f64,
                    Weights::Bf16(v) => bf16_to_f32(v[i]) as f64,
                    Weights::Fp8(f) => {
                        let (hd, r, c) = (i / (n * k), i % (n * k) / k, i % k);
                        let s = f.scale[hd * grid(n, k) + r / block.0 * k.div_ceil(block.1) + c / block.1];
                        crate::fp8::reference(f.q[i]) * s as f64
                    }
                };
                // Output j of head hd of row `row` through a [h, n, k] weight; `x(row, hd, i)` its input.
                let head_product = |wt: &Weights,
                                    (n, k): (usize, usize),
                                    x: &dyn Fn(usize, usize, usize) -> f64,
                                    row,
                                    hd,
                                    j|
                 -> f64 {
                    (0..k).map(|i| val(wt, n, k, (hd * n + j) * k + i) * x(row, hd, i)).sum()
                };
                // Reference: absorb in float64, attention through the float64 reference, then W_UV.
                let q_in = |row: usize, hd: usize, d: usize| q_nope[(row * h + hd) * dn + d] as f64;
                let mut qc = vec![0f32; m * h * w];
                for row in 0..m {
                    for hd in 0..h {
                        for i in 0..rkv {
                            qc[(row * h + hd) * w + i] =
                                head_product(&wk, (rkv, dn), &q_in, row, hd, i) as f32;
                        }
                        qc[(row * h + hd) * w + rkv..(row * h + hd + 1) * w]
                            .copy_from_slice(&q_pe[(row * h + hd) * dr..(row * h + hd + 1) * dr]);
                    }
                }
                let a = LatentAttention {
                    q: &qc,
                    cache: CacheRows::F32(&cache),
                    heads: h,
                    width: w,
                    value_width: rkv,
                    scale: 0.2,
                    seqs: &seqs,
                };
                let c64: Vec<f64> = cache.iter().map(|&v| v as f64).collect();
                let o_lat = reference(&a, &c64);
                let p = MlaDecode {
                    q_nope: &q_nope,
                    q_pe: &q_pe,
                    w_uk_t: wk,
                    w_uv: wv,
                    cache: CacheRows::F32(&cache),
                    heads: h,
                    dn,
                    dr,
                    dv,
                    rkv,
                    scale: 0.2,
                    seqs: &seqs,
                    round_bf16: false,
                };
                let got = mla_decode_with(isa, &p);
                let lat_in = |row: usize, hd: usize, i: usize| o_lat[(row * h + hd) * rkv + i];
                for row in 0..m {
                    for hd in 0..h {
                        for v in 0..dv {
                            let want = head_product(&wv, (dv, rkv), &lat_in, row, hd, v);
                            let g = got[(row * h + hd) * dv + v] as f64;
                            assert!((g - want).abs() < 2e-5, "{isa} format {format}: {g} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
