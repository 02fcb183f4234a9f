//! Times `attention::mla_decode` and its parts at the benchmark shape (8 heads, dn 128, dr 64,
//! dv 128, rkv 512; bf16 weights and cache): `cargo run --release -p mlaserve-kernels --example mla_bench [CTX]`.
//! The absorption weights cycle through 48 layers' copies (100 MB, more than the last-level
//! cache), as decode reads them from memory; the cache rows and the attention-only figure stay hot.

use mlaserve_kernels::attention::{
    latent_attention, mla_decode, CacheRows, LatentAttention, MlaDecode, SeqKeys,
};
use mlaserve_kernels::{bf16_bits, pool, Weights};
use std::time::Instant;

fn main() {
    pool::init_global(2);
    let ctx: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let (h, dn, dr, dv, rkv) = (8usize, 128usize, 64usize, 128usize, 512usize);
    let w = rkv + dr;
    let r = |n: usize, s: u32| -> Vec<u16> {
        (0..n)
            .map(|i| bf16_bits((((i as u32).wrapping_mul(2654435761u32) ^ s) % 1000) as f32 / 1000.0 - 0.5))
            .collect()
    };
    let layers = 48usize;
    let uks: Vec<Vec<u16>> = (0..layers).map(|l| r(h * rkv * dn, 1 + 2 * l as u32)).collect();
    let uvs: Vec<Vec<u16>> = (0..layers).map(|l| r(h * dv * rkv, 2 + 2 * l as u32)).collect();
    let cache = r(4096 * w, 3);
    let q_nope: Vec<f32> = (0..h * dn).map(|i| (i as f32).sin()).collect();
    let q_pe: Vec<f32> = (0..h * dr).map(|i| (i as f32).cos()).collect();
    let slots: Vec<i64> = (0..ctx as i64).collect();
    let seqs = [SeqKeys { row: 0, new: 1, cached: ctx - 1, slots: &slots }];
    let p = |l: usize| MlaDecode {
        q_nope: &q_nope,
        q_pe: &q_pe,
        w_uk_t: Weights::Bf16(&uks[l % layers]),
        w_uv: Weights::Bf16(&uvs[l % layers]),
        cache: CacheRows::Bf16(&cache),
        heads: h,
        dn,
        dr,
        dv,
        rkv,
        scale: 0.1,
        seqs: &seqs,
        round_bf16: true,
    };
    let qc = vec![0.1f32; h * w];
    let a = LatentAttention {
        q: &qc,
        cache: CacheRows::Bf16(&cache),
        heads: h,
        width: w,
        value_width: rkv,
        scale: 0.1,
        seqs: &seqs,
    };
    for l in 0..200 {
        mla_decode(&p(l));
    }
    let n = 2000;
    let t = Instant::now();
    for l in 0..n {
        std::hint::black_box(mla_decode(&p(l)));
    }
    let full = t.elapsed().as_secs_f64() / n as f64 * 1e6;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(latent_attention(&a));
    }
    let att = t.elapsed().as_secs_f64() / n as f64 * 1e6;
    println!(
        "ctx {ctx}: mla_decode {full:.1} us, of which attention {att:.1} us; absorption weights {:.1} MB",
        (uks[0].len() + uvs[0].len()) as f64 * 2.0 / 1e6
    );
}
