//! One expert shard's routed experts on a GPU: two grouped products (gate+up, then down) over the
//! assignments sorted by expert, `_grouped_mm` with the group ends counted on the device, so a MoE
//! layer never waits for the host (the per-expert form needs each expert's row count there: one
//! synchronisation per layer, 58 per V3 step). bf16 activations (what `_grouped_mm` takes on
//! Hopper); FP8 experts are dequantised, one layer at a time, into a bf16 buffer that every
//! layer of the device reuses. The CPU keeps its kernel form (`moe.rs`); this form runs on the
//! CPU too (torch 2.11), which is how it is tested.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, TchError, Tensor};

use crate::moe::ExpertShard;
use crate::routing::DeviceRoute;

/// `Σ_j w_j · expert_j(x_t)` over this shard's assignments, `[N, H]` on the shard's device; an
/// error when the device's `_grouped_mm` refuses the product (the caller then runs per expert).
pub(crate) fn forward(shard: &ExpertShard, x: &Tensor, route: &DeviceRoute) -> Result<Tensor, TchError> {
    let dev = shard.device;
    let n = shard.num_experts();
    let (expert, token, weight) =
        (route.expert.to_device(dev), route.token.to_device(dev), route.weight.to_device(dev));
    let local = expert.ge(shard.first).logical_and(&expert.lt(shard.first + n));
    // This shard's assignments first, by expert; the others after them, outside every group.
    let key = (&expert - shard.first).masked_fill(&local.logical_not(), n);
    let order = key.argsort_stable(true, 0, false);
    let ends = key.bincount::<Tensor>(None, n + 1).narrow(0, 0, n).cumsum(0, Kind::Int);
    let token = token.index_select(0, &order);
    let keep = local.index_select(0, &order).unsqueeze(1);
    let (gate_up, down) = weights(shard);
    let xs = x.to_device(dev).index_select(0, &token).to_kind(Kind::BFloat16);
    let gu = xs.f_internal_grouped_mm(&gate_up.transpose(1, 2), Some(&ends), None, None)?;
    let i = shard.inter;
    let act = gu.narrow(1, 0, i).silu() * gu.narrow(1, i, i);
    let y = act.f_internal_grouped_mm(&down.transpose(1, 2), Some(&ends), None, None)?;
    // Rows past the last group are not written by the grouped product: zeroed, not trusted.
    let y = y.to_kind(Kind::Float).where_self(&keep, &Tensor::zeros([1], (Kind::Float, dev)));
    // Weighting in fp32, as the per-expert form does.
    let y = (y * weight.index_select(0, &order).unsqueeze(1)).to_kind(x.kind());
    Ok(Tensor::zeros(x.size(), (x.kind(), dev)).index_add(0, &token, &y))
}

/// Says once per process that the grouped products fell back to the per-expert form.
pub(crate) fn warn_fallback(e: &TchError) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!("grouped expert products unavailable on this device, running per expert: {e}");
    }
}

/// The shard's `gate_up [n, 2I, H]` and `down [n, H, I]` in bf16: the stacked dense weights, or
/// FP8 dequantised into this device's reused buffers.
fn weights(shard: &ExpertShard) -> (Tensor, Tensor) {
    if let Some((gu, d)) = &shard.stacked {
        return (gu.to_kind(Kind::BFloat16), d.to_kind(Kind::BFloat16));
    }
    let (n, i) = (shard.num_experts(), shard.inter);
    let h = shard.experts[0].1.size()[0];
    let gate_up = scratch(shard.device, [n, 2 * i, h]);
    let down = scratch(shard.device, [n, h, i]);
    for (e, (gu, d)) in shard.experts.iter().enumerate() {
        let mut row = 0;
        for w in gu {
            let rows = w.size()[0];
            gate_up.get(e as i64).narrow(0, row, rows).copy_(&w.to_dense(Kind::BFloat16));
            row += rows;
        }
        down.get(e as i64).copy_(&d.to_dense(Kind::BFloat16));
    }
    (gate_up, down)
}

type ScratchKey = (String, [i64; 3]);

/// A bf16 buffer of `shape` on `device`, the same storage on every call: each layer overwrites
/// what the previous one left (layers run in order on a stage, and on a GPU in stream order).
fn scratch(device: Device, shape: [i64; 3]) -> Tensor {
    static BUFFERS: Mutex<Option<HashMap<ScratchKey, Tensor>>> = Mutex::new(None);
    let mut b = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    b.get_or_insert_with(HashMap::new)
        .entry((format!("{device:?}"), shape))
        .or_insert_with(|| Tensor::empty(shape, (Kind::BFloat16, device)))
        .shallow_clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Weight;
    use crate::routing::{Dispatch, Router};

    /// bf16 experts of `e` experts split over `g` shards: grouped form against the per-expert
    /// tensor form (host counts), dense and FP8.
    #[test]
    fn grouped_form_equals_the_per_expert_form() {
        tch::manual_seed(11);
        let (e, h, i, n) = (8i64, 64i64, 32i64, 13i64);
        let opts = (Kind::Float, Device::Cpu);
        let gate_up = (Tensor::randn([e, 2 * i, h], opts) * 0.2).to_kind(Kind::BFloat16);
        let down = (Tensor::randn([e, h, i], opts) * 0.2).to_kind(Kind::BFloat16);
        let x = Tensor::randn([n, h], opts).to_kind(Kind::BFloat16);
        let r = Router::random(e, h, 4, 2, 3);
        let (idx, w) = r.route(&x.to_kind(Kind::Float));
        let (host, dev) = (Dispatch::new(&idx, &w, e), Dispatch::on_device(&idx, &w, e));
        assert!(dev.offsets.is_empty(), "nothing counted on the host");
        // The fallback for devices without grouped products is the same routing, counted.
        let route = dev.device.as_ref().expect("device routing");
        assert_eq!(route.per_expert().offsets, host.offsets);
        for g in [1i64, 2, 3] {
            let mut worst = 0f64;
            for s in 0..g {
                let (lo, hi) = (s * e / g, (s + 1) * e / g);
                let (gu, d) = (gate_up.narrow(0, lo, hi - lo), down.narrow(0, lo, hi - lo));
                // Both forms from the same weights: the tensor form loops over the experts.
                let loop_form =
                    ExpertShard { stacked: None, ..ExpertShard::stacked_for_tests(lo, &gu, &d, i) };
                let grouped = ExpertShard::stacked_for_tests(lo, &gu, &d, i);
                let want = loop_form.forward_partial(&x, &host).map(|t| t.to_kind(Kind::Float));
                let got = grouped.forward_partial(&x, &dev).expect("grouped form always answers");
                let want = want.unwrap_or_else(|| got.zeros_like().to_kind(Kind::Float));
                let scale = want.abs().max().double_value(&[]).max(1e-3);
                worst = worst.max(((got.to_kind(Kind::Float) - &want).abs().max().double_value(&[])) / scale);
            }
            assert!(worst < 1e-2, "G={g}: relative difference {worst}");
        }
    }

    /// FP8 experts, dequantised into the reused buffer, equal the same experts held dense.
    #[test]
    fn fp8_experts_through_the_reused_buffer() {
        tch::manual_seed(12);
        let (e, h, i, n) = (4i64, 64i64, 32i64, 9i64);
        let q = |rows: i64, cols: i64| {
            let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu)) * 0.2;
            // 16 × 24 blocks: partial edge blocks along the 64-wide side.
            let grid = [(rows + 15) / 16, (cols + 23) / 24];
            let scale = Tensor::rand(grid, (Kind::Float, Device::Cpu)) + 0.5;
            Weight::Fp8 { q: w.to_kind(Kind::Float8e4m3fn), scale, block: (16, 24) }
        };
        let experts: Vec<(Vec<Weight>, Weight)> = (0..e).map(|_| (vec![q(i, h), q(i, h)], q(h, i))).collect();
        let gate_up = Tensor::stack(
            &experts
                .iter()
                .map(|(gu, _)| {
                    Tensor::cat(&[gu[0].to_dense(Kind::BFloat16), gu[1].to_dense(Kind::BFloat16)], 0)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let down =
            Tensor::stack(&experts.iter().map(|(_, d)| d.to_dense(Kind::BFloat16)).collect::<Vec<_>>(), 0);
        let fp8 = ExpertShard { first: 0, experts, stacked: None, inter: i, device: Device::Cpu };
        let bf16 = ExpertShard::stacked_for_tests(0, &gate_up, &down, i);
        let x = Tensor::randn([n, h], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        let r = Router::random(e, h, 2, 1, 2);
        let (idx, w) = r.route(&x.to_kind(Kind::Float));
        let d = Dispatch::on_device(&idx, &w, e);
        for _ in 0..2 {
            // Twice: the second call overwrites the buffer the first one filled.
            let (a, b) = (fp8.forward_partial(&x, &d).unwrap(), bf16.forward_partial(&x, &d).unwrap());
            assert!(a.equal(&b), "dequantised into the buffer = held dense");
        }
    }
}
