//! The layout of one forward step over a mixed batch: some sequences prefill a chunk, others decode
//! one token, each with its own position and block table. Everything that does not depend on the
//! layer (slots, masks, rotary tables) is computed once here and shared by all layers.

use mlaserve_core::blocks::slot_of;
use tch::{Device, Kind, Tensor};

use crate::error::{input_err, Result};
use crate::rope::Rope;

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    /// Tokens of this sequence already in the cache.
    pub cached: usize,
    /// New tokens in this step (at least one).
    pub new: usize,
    /// Absolute position of cache index 0 (0 for ordinary requests).
    pub pos_offset: usize,
    pub block_table: Vec<u32>,
}

impl SeqStep {
    pub fn context(&self) -> usize {
        self.cached + self.new
    }
}

/// Sequences with at most this many new tokens attend together in one padded, absorbed batch.
const BATCHED_MAX_NEW: usize = 8;

/// Sequences that attend together: queries padded to `s_max`, context to `t_max`.
pub(crate) struct BatchedGroup {
    pub b: i64,
    pub s_max: i64,
    pub t_max: i64,
    /// Token rows feeding the padded query slots `[b * s_max]` (None: exactly the rows 0..T in order).
    pub q_rows: Option<Tensor>,
    /// For each token row of the group, its padded slot; with `out_rows` the scatter back.
    pub out_slots: Option<Tensor>,
    pub out_rows: Option<Tensor>,
    /// Cache slots `[b, t_max]` (padding points at slot 0 and is masked).
    pub ctx_slots: Tensor,
    /// Allowed (query, key) pairs `[b, s_max, 1, t_max]`.
    pub allowed: Tensor,
}

/// A short chunk attending over its own cache slots through the paged CPU kernel
/// (`mlaserve_kernels::attention`): no padding to the batch's longest context.
pub(crate) struct PagedSeq {
    /// Its first row among the paged rows (see `StepPlan::paged_rows`).
    pub row: usize,
    pub new: usize,
    pub cached: usize,
    /// Cache slot of each of its positions.
    pub slots: Vec<i64>,
}

/// Whether short chunks attend through the paged CPU kernel: on the CPU for f32 and bf16
/// activations, unless `MLASERVE_DECODE_ATTENTION=padded` asks for the padded tensor form (kept for
/// other devices, float64 tests and comparisons).
pub(crate) fn paged_decode(kind: Kind, device: Device) -> bool {
    static PADDED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let padded =
        *PADDED.get_or_init(|| std::env::var("MLASERVE_DECODE_ATTENTION").is_ok_and(|v| v == "padded"));
    device == Device::Cpu && matches!(kind, Kind::Float | Kind::BFloat16) && !padded
}

/// A sequence whose chunk is long enough to attend on its own.
pub(crate) struct SoloSeq {
    pub row_start: i64,
    pub new: i64,
    pub cached: i64,
    pub ctx_slots: Tensor,
}

pub struct StepPlan {
    pub seqs: Vec<SeqStep>,
    pub total_tokens: usize,
    pub(crate) write_slots: Tensor,
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    pub(crate) batched: Option<BatchedGroup>,
    /// Short chunks for the paged kernel (instead of `batched`), and the rows of the step they
    /// occupy in order (None: all rows 0..T).
    pub(crate) paged: Vec<PagedSeq>,
    pub(crate) paged_rows: Option<Tensor>,
    pub(crate) solo: Vec<SoloSeq>,
    /// Row of the last new token of each sequence.
    pub last_rows: Vec<i64>,
}

impl StepPlan {
    /// Validates `seqs` against a cache of `num_slots` slots of `block_size` and precomputes the step.
    pub fn new(
        seqs: Vec<SeqStep>,
        block_size: usize,
        num_slots: usize,
        rope: &Rope,
        kind: Kind,
        device: Device,
        max_positions: Option<usize>,
    ) -> Result<StepPlan> {
        if seqs.is_empty() {
            return Err(input_err("a step needs at least one sequence"));
        }
        let mut write_slots = Vec::new();
        let mut positions = Vec::new();
        let mut last_rows = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if s.new == 0 {
                return Err(input_err(format!("sequence {i} has no new tokens")));
            }
            let ctx = s.context();
            if s.block_table.len() * block_size < ctx {
                return Err(input_err(format!(
                    "sequence {i}: block table of {} blocks holds {} slots, {ctx} needed",
                    s.block_table.len(),
                    s.block_table.len() * block_size
                )));
            }
            if let Some(&b) = s.block_table.iter().find(|&&b| (b as usize + 1) * block_size > num_slots) {
                return Err(input_err(format!(
                    "sequence {i}: block {b} is outside the cache ({} blocks)",
                    num_slots / block_size
                )));
            }
            if let Some(max) = max_positions {
                if s.pos_offset + ctx > max {
                    return Err(input_err(format!(
                        "sequence {i}: position {} exceeds the model's maximum of {max}",
                        s.pos_offset + ctx - 1
                    )));
                }
            }
            for p in s.cached..ctx {
                write_slots.push(slot_of(&s.block_table, block_size, p) as i64);
                positions.push((s.pos_offset + p) as i64);
            }
            last_rows.push(positions.len() as i64 - 1);
        }
        let total_tokens = positions.len();
        let (cos, sin) = rope.cos_sin_of(&positions, kind);

        // Short chunks (decode, speculative verification) attend together; long prefills alone.
        let mut group = Vec::new();
        let mut solo = Vec::new();
        let mut row = 0i64;
        let mut group_rows = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.new <= BATCHED_MAX_NEW {
                group.push(i);
                group_rows.push(row);
            } else {
                let ctx_slots: Vec<i64> =
                    (0..s.context()).map(|p| slot_of(&s.block_table, block_size, p) as i64).collect();
                solo.push(SoloSeq {
                    row_start: row,
                    new: s.new as i64,
                    cached: s.cached as i64,
                    ctx_slots: Tensor::from_slice(&ctx_slots).to_device(device),
                });
            }
            row += s.new as i64;
        }
        let paged_form = paged_decode(kind, device);
        let mut paged = Vec::new();
        let mut paged_rows = Vec::new();
        if paged_form {
            for (&i, &row0) in group.iter().zip(&group_rows) {
                let s = &seqs[i];
                paged.push(PagedSeq {
                    row: paged_rows.len(),
                    new: s.new,
                    cached: s.cached,
                    slots: (0..s.context()).map(|p| slot_of(&s.block_table, block_size, p) as i64).collect(),
                });
                paged_rows.extend(row0..row0 + s.new as i64);
            }
        }
        let batched = if group.is_empty() || paged_form {
            None
        } else {
            let b = group.len();
            let s_max = group.iter().map(|&i| seqs[i].new).max().unwrap_or(1);
            let t_max = group.iter().map(|&i| seqs[i].context()).max().unwrap_or(1);
            let mut ctx_slots = vec![0i64; b * t_max];
            let mut allowed = vec![false; b * s_max * t_max];
            let mut q_rows = vec![0i64; b * s_max];
            let mut out_slots = Vec::new();
            let mut out_rows = Vec::new();
            for (g, (&i, &row0)) in group.iter().zip(&group_rows).enumerate() {
                let s = &seqs[i];
                for p in 0..s.context() {
                    ctx_slots[g * t_max + p] = slot_of(&s.block_table, block_size, p) as i64;
                }
                for q in 0..s_max {
                    let base = (g * s_max + q) * t_max;
                    if q < s.new {
                        q_rows[g * s_max + q] = row0 + q as i64;
                        out_slots.push((g * s_max + q) as i64);
                        out_rows.push(row0 + q as i64);
                        allowed[base..base + s.cached + q + 1].fill(true);
                    } else {
                        // Padding query: let it see key 0 so its softmax stays finite; it is discarded.
                        allowed[base] = true;
                    }
                }
            }
            let identity = s_max == 1 && solo.is_empty();
            let ids = |v: &[i64]| Tensor::from_slice(v).to_device(device);
            Some(BatchedGroup {
                b: b as i64,
                s_max: s_max as i64,
                t_max: t_max as i64,
                q_rows: (!identity).then(|| ids(&q_rows)),
                out_slots: (!identity).then(|| ids(&out_slots)),
                out_rows: (!identity).then(|| ids(&out_rows)),
                ctx_slots: ids(&ctx_slots).view([b as i64, t_max as i64]),
                allowed: Tensor::from_slice(&allowed)
                    .view([b as i64, s_max as i64, 1, t_max as i64])
                    .to_device(device),
            })
        };

        Ok(StepPlan {
            seqs,
            total_tokens,
            write_slots: Tensor::from_slice(&write_slots).to_device(device),
            cos,
            sin,
            batched,
            paged_rows: (!paged.is_empty() && !solo.is_empty())
                .then(|| Tensor::from_slice(&paged_rows).to_device(device)),
            paged,
            solo,
            last_rows,
        })
    }
}

/// Rows `rows` of `x [T, H]` (e.g. a step's [`StepPlan::last_rows`]): `x` itself when they are all
/// of its rows in order (decode), which saves a gather and its index tensor (11-22 µs a batch-1
/// step on the benchmark host), else a gather.
pub fn select_rows(x: &Tensor, rows: &[i64]) -> Tensor {
    let every_row = rows.len() as i64 == x.size()[0] && rows.iter().enumerate().all(|(i, &r)| r == i as i64);
    if every_row {
        x.shallow_clone()
    } else {
        x.index_select(0, &Tensor::from_slice(rows).to_device(x.device()))
    }
}

#[cfg(test)]
mod select_tests {
    use super::*;

    #[test]
    fn select_rows_is_the_gather_and_skips_it_for_every_row_in_order() {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([4, 3]);
        for rows in [vec![0i64, 1, 2, 3], vec![3, 1], vec![0, 1, 2], vec![1, 0, 2, 3], vec![]] {
            let want = x.index_select(0, &Tensor::from_slice(&rows));
            assert!(select_rows(&x, &rows).equal(&want), "{rows:?}");
        }
        assert_eq!(select_rows(&x, &[0, 1, 2, 3]).data_ptr(), x.data_ptr(), "no copy for every row");
    }
}
