//! Decode attention over the paged latent cache in absorbed form (deepseek-v3.md §3): for each
//! query row and head, scores against the sequence's own cached latents, softmax, and the
//! probability-weighted sum of the latents (`o_lat`). The projections into and out of latent
//! space (W_UK, W_UV) stay with the caller.
//!
//! Each sequence reads exactly its own slots through its block table, so a batch with one long
//! sequence costs what its tokens cost (no `[B, T_max]` padded gather). Work is split flash-decoding
//! style into (sequence, block of keys) tasks: each reads its cache rows once for all heads and
//! queries and keeps a running max, sum and partial `o_lat`; the partials are then merged per
//! (row, head). Why hand-written: libtorch has no paged attention on the CPU, and the tensor form
//! (gather, padded bmm, mask, softmax, bmm) is ~15 small ops per layer whose fixed cost exceeded the
//! arithmetic at decode (measured in PERFORMANCE.md).

use crate::latent_tiles::{dot_tile, weighted_rows_tile, Lanes, Row, Scalar};
#[cfg(target_arch = "x86_64")]
use crate::latent_tiles::{Avx2, Avx512};
use crate::pool::SendPtr;
use crate::rows::exp_nonpositive;
use crate::{pool, Isa};

pub use crate::mla_decode::{mla_decode, mla_decode_with, MlaDecode};

/// The latent cache, `[slots, width]` row-major.
#[derive(Clone, Copy)]
pub enum CacheRows<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns.
    Bf16(&'a [u16]),
}

impl CacheRows<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            CacheRows::F32(c) => c.len(),
            CacheRows::Bf16(c) => c.len(),
        }
    }
}

/// One sequence of the batch.
pub struct SeqKeys<'a> {
    /// First of its query rows; rows `row..row + new` belong to it.
    pub row: usize,
    /// Its new tokens (query rows): query `j` sees keys `0..=cached + j`.
    pub new: usize,
    pub cached: usize,
    /// Cache slot of each of its positions, at least `cached + new` of them.
    pub slots: &'a [i64],
}

/// The problem: `q [rows, heads, width]` absorbed queries (latent part then rotary part, f32) and
/// the cache rows of the same `width`; values are the first `value_width` columns of each row.
pub struct LatentAttention<'a> {
    pub q: &'a [f32],
    pub cache: CacheRows<'a>,
    pub heads: usize,
    pub width: usize,
    pub value_width: usize,
    pub scale: f32,
    pub seqs: &'a [SeqKeys<'a>],
}

impl LatentAttention<'_> {
    /// Checks the shapes (every slot inside the cache included); returns the number of query rows.
    pub(crate) fn check(&self) -> usize {
        let (h, w, vw) = (self.heads, self.width, self.value_width);
        assert!(vw <= w && w > 0, "value width {vw} exceeds row width {w}");
        let rows = self.seqs.iter().map(|s| s.row + s.new).max().unwrap_or(0);
        assert!(self.q.len() >= rows * h * w, "queries too small");
        check_slots(self.seqs, self.cache.len() / w);
        rows
    }
}

/// Every sequence has a slot for each of its positions, inside a cache of `slots` rows.
pub(crate) fn check_slots(seqs: &[SeqKeys], slots: usize) {
    for s in seqs {
        assert!(s.slots.len() >= s.cached + s.new, "sequence at row {}: too few slots", s.row);
        assert!(
            s.slots[..s.cached + s.new].iter().all(|&x| x >= 0 && (x as usize) < slots),
            "sequence at row {}: slot outside the cache",
            s.row
        );
    }
}

/// Keys per task: a block's cache rows (≤ 288 KiB in bf16 at DeepSeek-V3's width of 576) stay in L2
/// while every head and query reads them.
pub(crate) const KEYS_PER_TASK: usize = 256;

/// A task's running softmax state for one (query, head): max, sum of exp, and Σ exp · value.
pub(crate) struct Partial {
    pub(crate) max: f32,
    pub(crate) sum: f32,
}

/// One task: sequence `s`, keys `k0..k1`, heads `t.h0..t.h1`. Writes, for each (query, head) that
/// sees any of these keys, its partial state and un-normalised `o_lat` into the task's slices.
#[inline(always)]
unsafe fn block<L: Lanes>(p: &LatentAttention, s: &SeqKeys, t: &Task, states: &mut [Partial], o: &mut [f32]) {
    match p.cache {
        CacheRows::F32(c) => block_rows::<L, f32>(p, c, s, t, states, o),
        CacheRows::Bf16(c) => block_rows::<L, u16>(p, c, s, t, states, o),
    }
}

/// Query-head rows per tile: two keep a tile's accumulators, loads and broadcast within AVX2's
/// 16 registers.
const QA: usize = 2;
/// Keys per score tile, and value vectors per output tile.
const KB: usize = 4;

#[inline(always)]
unsafe fn block_rows<L: Lanes, E: Row>(
    p: &LatentAttention,
    cache: &[E],
    s: &SeqKeys,
    t: &Task,
    states: &mut [Partial],
    o: &mut [f32],
) {
    let (w, vw, heads) = (p.width, p.value_width, p.heads);
    let (k0, k1, h0) = (t.k0, t.k1, t.h0);
    let h = t.h1 - t.h0;
    let nkeys = k1 - k0;
    let nq = s.new * h;
    // Cache rows are read as stored (bf16 widened in registers), never copied.
    let rows: Vec<*const E> = (k0..k1).map(|k| cache.as_ptr().add(s.slots[k] as usize * w)).collect();
    // Query-head row `qh` = (new token qh / h, head qh % h).
    let qrow = |qh: usize| p.q.as_ptr().add(((s.row + qh / h) * heads + h0 + qh % h) * w);
    // Scores [nq, nkeys] in QA × KB tiles; a short key tile repeats its last row (dropped).
    let mut scores = vec![0f32; nq * nkeys];
    let mut a0 = 0;
    while a0 < nq {
        let qa = if nq - a0 >= QA { QA } else { 1 };
        for b0 in (0..nkeys).step_by(KB) {
            let kb = (nkeys - b0).min(KB);
            let c: [*const E; KB] = std::array::from_fn(|b| rows[b0 + b.min(kb - 1)]);
            let mut put = |a: usize, r: &[f32; KB]| {
                scores[(a0 + a) * nkeys + b0..][..kb].copy_from_slice(&r[..kb]);
            };
            if qa == QA {
                let r = dot_tile::<L, E, QA, KB>(std::array::from_fn(|a| qrow(a0 + a)), c, w);
                r.iter().enumerate().for_each(|(a, r)| put(a, r));
            } else {
                put(0, &dot_tile::<L, E, 1, KB>([qrow(a0)], c, w)[0]);
            }
        }
        a0 += qa;
    }
    // Softmax state per row over its visible keys (a prefix: query j sees keys ≤ cached + j).
    for (qh, st) in states.iter_mut().enumerate() {
        let visible = (s.cached + qh / h + 1).saturating_sub(k0).min(nkeys);
        let sc = &mut scores[qh * nkeys..(qh + 1) * nkeys];
        sc[visible..].fill(0.0);
        let sc = &mut sc[..visible];
        st.sum = 0.0;
        st.max = f32::NEG_INFINITY;
        for v in sc.iter_mut() {
            *v *= p.scale;
            st.max = st.max.max(*v);
        }
        if visible == 0 {
            continue; // no key of this block is visible to this query
        }
        for v in sc.iter_mut() {
            *v = exp_nonpositive(*v - st.max);
            st.sum += *v;
        }
    }
    // o_lat rows: Σ_t e[qh][t] · value(t), KB vectors of columns at a time held in registers.
    let op = o.as_mut_ptr();
    let mut a0 = 0;
    while a0 < nq {
        let qa = if nq - a0 >= QA { QA } else { 1 };
        let e = |a: usize| scores.as_ptr().add((a0 + a) * nkeys);
        let out = |a: usize| op.add((a0 + a) * vw);
        if qa == QA {
            weighted_rows::<L, E, QA>(std::array::from_fn(e), &rows, vw, std::array::from_fn(out));
        } else {
            weighted_rows::<L, E, 1>([e(0)], &rows, vw, [out(0)]);
        }
        a0 += qa;
    }
}

/// All `vw` value columns of [`weighted_rows_tile`]: tiles of `KB` vectors, then single vectors,
/// then single columns.
#[inline(always)]
unsafe fn weighted_rows<L: Lanes, E: Row, const Q: usize>(
    e: [*const f32; Q],
    rows: &[*const E],
    vw: usize,
    o: [*mut f32; Q],
) {
    let mut col = 0;
    while col + KB * L::N <= vw {
        weighted_rows_tile::<L, E, Q, KB>(e, rows, col, o);
        col += KB * L::N;
    }
    while col + L::N <= vw {
        weighted_rows_tile::<L, E, Q, 1>(e, rows, col, o);
        col += L::N;
    }
    for col in col..vw {
        for a in 0..Q {
            *o[a].add(col) = rows.iter().enumerate().map(|(t, &r)| *e[a].add(t) * (*r.add(col)).get()).sum();
        }
    }
}

/// A unit of work: sequence `seq`, keys `k0..k1`, heads `h0..h1`.
pub(crate) struct Task {
    pub(crate) seq: usize,
    pub(crate) k0: usize,
    pub(crate) k1: usize,
    pub(crate) h0: usize,
    pub(crate) h1: usize,
}

/// [`block`] on the given path.
///
/// # Safety
/// The CPU supports `isa`; `p` was checked (slots inside the cache, queries large enough);
/// `states` and `o` hold the task's `new · (h1 - h0)` rows.
pub(crate) unsafe fn block_on(
    isa: Isa,
    p: &LatentAttention,
    s: &SeqKeys,
    t: &Task,
    st: &mut [Partial],
    o: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 | Isa::Avx512 => block_avx512(p, s, t, st, o),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => block_avx2(p, s, t, st, o),
        _ => block::<Scalar>(p, s, t, st, o),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
unsafe fn block_avx512(p: &LatentAttention, s: &SeqKeys, t: &Task, st: &mut [Partial], o: &mut [f32]) {
    block::<Avx512>(p, s, t, st, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2(p: &LatentAttention, s: &SeqKeys, t: &Task, st: &mut [Partial], o: &mut [f32]) {
    block::<Avx2>(p, s, t, st, o)
}

/// `o_lat [rows, heads, value_width]` (f32) on the process's kernel path.
pub fn latent_attention(p: &LatentAttention) -> Vec<f32> {
    latent_attention_with(crate::isa::selected(), p)
}

/// [`latent_attention`] on a given path.
///
/// # Panics
/// When `isa` is not supported by this CPU, or a slice is smaller than the shapes say (a slot
/// outside the cache included).
pub fn latent_attention_with(isa: Isa, p: &LatentAttention) -> Vec<f32> {
    assert!(isa.supported(), "kernel path {isa} is not supported by this CPU");
    let (h, vw) = (p.heads, p.value_width);
    let rows = p.check();
    // Tasks: (sequence, key block, head group), each with its own partial buffers. Heads are
    // grouped so that a short batch still gives every thread work; a block's cache rows are read
    // once per group.
    let blocks: usize = p.seqs.iter().map(|s| (s.cached + s.new).div_ceil(KEYS_PER_TASK)).sum();
    let groups = (2 * pool::global().threads()).div_ceil(blocks.max(1)).clamp(1, h);
    let per_group = h.div_ceil(groups);
    let mut tasks = Vec::new();
    for (i, s) in p.seqs.iter().enumerate() {
        let ctx = s.cached + s.new;
        for h0 in (0..h).step_by(per_group) {
            for k0 in (0..ctx).step_by(KEYS_PER_TASK) {
                tasks.push(Task {
                    seq: i,
                    k0,
                    k1: (k0 + KEYS_PER_TASK).min(ctx),
                    h0,
                    h1: (h0 + per_group).min(h),
                });
            }
        }
    }
    let mut offsets = Vec::with_capacity(tasks.len() + 1);
    offsets.push(0usize);
    for t in &tasks {
        offsets.push(offsets.last().copied().unwrap_or(0) + p.seqs[t.seq].new * (t.h1 - t.h0));
    }
    let n_partials = offsets.last().copied().unwrap_or(0);
    let mut states: Vec<Partial> = (0..n_partials).map(|_| Partial { max: 0.0, sum: 0.0 }).collect();
    let mut partial_o = vec![0f32; n_partials * vw];
    let (sp, op) = (SendPtr(states.as_mut_ptr()), SendPtr(partial_o.as_mut_ptr()));
    let run = |i: usize| {
        let t = &tasks[i];
        let (a, b) = (offsets[i], offsets[i + 1]);
        // SAFETY: task i alone writes partials a..b; the buffers outlive the parallel region.
        let (st, o) = unsafe {
            (
                std::slice::from_raw_parts_mut(sp.get().add(a), b - a),
                std::slice::from_raw_parts_mut(op.get().add(a * vw), (b - a) * vw),
            )
        };
        // SAFETY: `isa` is supported (checked above); slices were bounds-checked.
        unsafe { block_on(isa, p, &p.seqs[t.seq], t, st, o) };
    };
    pool::global().for_each(tasks.len(), &run);

    // Merge each (row, head)'s partials over its sequence's key blocks.
    let mut out = vec![0f32; rows * h * vw];
    let mut first = 0;
    for (i, s) in p.seqs.iter().enumerate() {
        let mut end = first;
        while end < tasks.len() && tasks[end].seq == i {
            end += 1;
        }
        for j in 0..s.new {
            for hd in 0..h {
                let parts = (first..end)
                    .filter(|&k| (tasks[k].h0..tasks[k].h1).contains(&hd))
                    .map(|k| offsets[k] + j * (tasks[k].h1 - tasks[k].h0) + hd - tasks[k].h0);
                let max = parts.clone().map(|i| states[i].max).fold(f32::NEG_INFINITY, f32::max);
                let dst = &mut out[((s.row + j) * h + hd) * vw..((s.row + j) * h + hd + 1) * vw];
                let mut sum = 0f32;
                for i in parts {
                    if states[i].max == f32::NEG_INFINITY {
                        continue;
                    }
                    let f = (states[i].max - max).exp();
                    sum += states[i].sum * f;
                    for (d, &v) in dst.iter_mut().zip(&partial_o[i * vw..(i + 1) * vw]) {
                        *d += f * v;
                    }
                }
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|v| *v *= inv);
            }
        }
        first = end;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bf16_to_f32;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The definition in float64: softmax over each query's visible keys, then the weighted sum.
    pub(crate) fn reference(p: &LatentAttention, cache: &[f64]) -> Vec<f64> {
        let (h, w, vw) = (p.heads, p.width, p.value_width);
        let rows = p.seqs.iter().map(|s| s.row + s.new).max().unwrap_or(0);
        let mut out = vec![0f64; rows * h * vw];
        for s in p.seqs {
            for j in 0..s.new {
                for hd in 0..h {
                    let q = &p.q[((s.row + j) * h + hd) * w..((s.row + j) * h + hd + 1) * w];
                    let keys: Vec<usize> = (0..=s.cached + j).map(|t| s.slots[t] as usize).collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&k| {
                            q.iter().zip(&cache[k * w..(k + 1) * w]).map(|(&a, &b)| a as f64 * b).sum::<f64>()
                                * p.scale as f64
                        })
                        .collect();
                    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let o = &mut out[((s.row + j) * h + hd) * vw..((s.row + j) * h + hd + 1) * vw];
                    for (&k, &ek) in keys.iter().zip(&e) {
                        for c in 0..vw {
                            o[c] += ek / z * cache[k * w + c];
                        }
                    }
                }
            }
        }
        out
    }

    /// Every path this CPU has, f32 and bf16 caches, sequences of 1..8 new tokens over contexts up
    /// to a few key blocks, slots scattered over the cache: within 1e-5 of float64.
    #[test]
    fn matches_float64_on_every_path() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for isa in crate::isa::ALL {
            if !isa.supported() {
                println!("skipping kernel path {isa}: not supported by this CPU");
                continue;
            }
            for (h, w, vw, shape) in [
                (2usize, 80usize, 64usize, vec![(0usize, 1usize), (5, 1), (600, 2)]),
                (3, 19, 16, vec![(0, 8), (255, 1), (256, 3), (40, 1)]),
            ] {
                let nslots = 1400;
                let cache32: Vec<f32> = (0..nslots * w).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let bf16: Vec<u16> = cache32.iter().map(|&v| crate::bf16_bits(v)).collect();
                let mut seqs_slots = Vec::new();
                for &(cached, new) in &shape {
                    // A random permutation prefix: each sequence's own scattered slots.
                    let mut all: Vec<i64> = (0..nslots as i64).collect();
                    for i in 0..cached + new {
                        let j = rng.random_range(i..nslots);
                        all.swap(i, j);
                    }
                    seqs_slots.push(all[..cached + new].to_vec());
                }
                let mut row = 0;
                let seqs: Vec<SeqKeys> = shape
                    .iter()
                    .zip(&seqs_slots)
                    .map(|(&(cached, new), slots)| {
                        row += new;
                        SeqKeys { row: row - new, new, cached, slots }
                    })
                    .collect();
                let q: Vec<f32> = (0..row * h * w).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                for cache in [CacheRows::F32(&cache32), CacheRows::Bf16(&bf16)] {
                    let p = LatentAttention {
                        q: &q,
                        cache,
                        heads: h,
                        width: w,
                        value_width: vw,
                        scale: 0.3,
                        seqs: &seqs,
                    };
                    let c64: Vec<f64> = match cache {
                        CacheRows::F32(c) => c.iter().map(|&v| v as f64).collect(),
                        CacheRows::Bf16(c) => c.iter().map(|&b| bf16_to_f32(b) as f64).collect(),
                    };
                    let want = reference(&p, &c64);
                    let got = latent_attention_with(isa, &p);
                    let err = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
                    assert!(err < 1e-5, "{isa} h={h} w={w}: max error {err}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "slot outside the cache")]
    fn refuses_a_slot_outside_the_cache() {
        let cache = vec![0f32; 4 * 8];
        let q = vec![0f32; 8];
        let seqs = [SeqKeys { row: 0, new: 1, cached: 1, slots: &[0, 4] }];
        let p = LatentAttention {
            q: &q,
            cache: CacheRows::F32(&cache),
            heads: 1,
            width: 8,
            value_width: 8,
            scale: 1.0,
            seqs: &seqs,
        };
        latent_attention(&p);
    }
}
