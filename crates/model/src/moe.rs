//! DeepSeekMoE: sigmoid router with bias-corrected, group-limited top-k, routed experts computed
//! batched (assignments sorted by expert, one GEMM chain per active expert over all its tokens), an
//! always-on shared expert. Routed experts may be split into shards (devices); each shard produces a
//! partial sum over its experts and the partials are combined.

use tch::{Device, Kind, Tensor};

use crate::combine::Combine;
use crate::error::Result;
use crate::host_step::{self, HostAct};
use crate::kernels;
use crate::linear::{forward_weight, Weight};
use crate::loader::LoadCtx;
use crate::mlp::Mlp;
use crate::profile;
use crate::routing::{Dispatch, Router};

pub struct ExpertShard {
    /// Global id of the first expert held.
    pub(crate) first: i64,
    /// Per local expert: gate and up (one fused `[2I, H]` product, or two for FP8 with their own
    /// block scales) and down. Views made once at load; dense experts are views into one stacked
    /// `[n, 2I, H]` / `[n, H, I]` pair.
    pub(crate) experts: Vec<(Vec<Weight>, Weight)>,
    /// Dense experts: the stacked `gate_up [n, 2I, H]` and `down [n, H, I]` the views come from.
    pub(crate) stacked: Option<(Tensor, Tensor)>,
    pub(crate) inter: i64,
    pub(crate) device: Device,
}

impl ExpertShard {
    /// Dense experts from stacked `gate_up [n, 2I, H]` (gate rows then up rows) and `down [n, H, I]`.
    fn stacked(first: i64, gate_up: &Tensor, down: &Tensor, inter: i64, device: Device) -> Self {
        let stacked = Some((gate_up.shallow_clone(), down.shallow_clone()));
        let mut shard = ExpertShard { first, experts: vec![], stacked, inter, device };
        shard.refresh_views();
        shard
    }

    /// Its weight tensors: the stacked pair (call [`ExpertShard::refresh_views`] after moving
    /// them), or each expert's own.
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        match &mut self.stacked {
            Some((gu, d)) => vec![gu, d],
            None => self
                .experts
                .iter_mut()
                .flat_map(|(gu, d)| gu.iter_mut().chain(std::iter::once(d)).flat_map(Weight::tensors_mut))
                .collect(),
        }
    }

    /// The per-expert views of the stacked pair (again, after it moved).
    fn refresh_views(&mut self) {
        if let Some((gu, d)) = &self.stacked {
            self.experts = (0..gu.size()[0])
                .map(|e| (vec![Weight::Dense(gu.get(e))], Weight::Dense(d.get(e))))
                .collect();
        }
    }

    #[cfg(test)]
    pub(crate) fn stacked_for_tests(first: i64, gate_up: &Tensor, down: &Tensor, inter: i64) -> Self {
        Self::stacked(first, gate_up, down, inter, Device::Cpu)
    }

    pub fn num_experts(&self) -> i64 {
        self.experts.len() as i64
    }

    /// This shard's experts' weighted outputs summed per token, `[N, H]` on the shard's device, or
    /// None when none of its experts was chosen.
    pub fn forward_partial(&self, x: &Tensor, d: &Dispatch) -> Option<Tensor> {
        if let Some(route) = &d.device {
            match crate::grouped_experts::forward(self, x, route) {
                Ok(y) => return Some(y),
                Err(e) => {
                    crate::grouped_experts::warn_fallback(&e);
                    return self.forward_partial(x, route.per_expert());
                }
            }
        }
        let (lo, hi) = (self.first as usize, (self.first + self.num_experts()) as usize);
        let (start, end) = (d.offsets[lo], d.offsets[hi]);
        if start == end {
            return None;
        }
        if let Some(y) = self.forward_partial_kernel(x, d, lo, hi) {
            return Some(y);
        }
        let (token_of, weight) = d.tensors();
        let rows = token_of.narrow(0, start, end - start);
        let xs = x.index_select(0, &rows).to_device(self.device);
        let rows = rows.to_device(self.device);
        // The active experts, their weights and their runs of rows in `xs`.
        let active: Vec<(Tensor, &[Weight], &Weight)> = (lo..hi)
            .filter(|&e| d.offsets[e + 1] > d.offsets[e])
            .map(|e| {
                let (gu, down) = &self.experts[e - self.first as usize];
                (xs.narrow(0, d.offsets[e] - start, d.offsets[e + 1] - d.offsets[e]), gu.as_slice(), down)
            })
            .collect();
        let inter = self.inter;
        let swiglu = |gu: &[Tensor]| match gu {
            [gu] => gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter),
            [g, u] => g.silu() * u,
            _ => unreachable!("gate and up are one or two products"),
        };
        let kernel =
            active.iter().all(|(x, gu, down)| gu.iter().chain([*down]).all(|w| kernels::use_for(x, w)));
        let outs: Vec<Tensor> = if kernel {
            // All active experts' products in one parallel region per matrix.
            let pairs: Vec<(&Tensor, &Weight)> =
                active.iter().flat_map(|(x, gu, _)| gu.iter().map(move |w| (x, w))).collect();
            let gu = kernels::grouped_linear(&pairs);
            let per = active.first().map(|(_, gu, _)| gu.len()).unwrap_or(1);
            // SwiGLU once over all experts' rows (a handful of libtorch ops per layer, not per
            // expert), then each expert's rows as a view.
            let column = |j: usize| -> Tensor {
                let v: Vec<&Tensor> = gu.chunks(per).map(|c| &c[j]).collect();
                Tensor::cat(&v, 0)
            };
            let act = if per == 1 { swiglu(&[column(0)]) } else { swiglu(&[column(0), column(1)]) };
            let mut row = 0;
            let acts: Vec<Tensor> = active
                .iter()
                .map(|(x, _, _)| {
                    let n = x.size()[0];
                    row += n;
                    act.narrow(0, row - n, n)
                })
                .collect();
            let pairs: Vec<(&Tensor, &Weight)> = acts.iter().zip(active.iter().map(|(_, _, d)| *d)).collect();
            kernels::grouped_linear(&pairs)
        } else {
            active
                .iter()
                .map(|(x, gu, down)| {
                    let gu: Vec<Tensor> = gu.iter().map(|w| forward_weight(x, w)).collect();
                    forward_weight(&swiglu(&gu), down)
                })
                .collect()
        };
        let ys = Tensor::cat(&outs, 0);
        let w = weight.narrow(0, start, end - start).unsqueeze(1).to_device(self.device);
        // Weighting in fp32 (as the reference does for bf16 activations); f64 stays f64 for tests.
        let ys = match ys.kind() {
            Kind::Double => ys * w,
            kind => (ys.to_kind(Kind::Float) * w).to_kind(kind),
        };
        Some(xs.new_zeros(x.size(), (x.kind(), self.device)).index_add(0, &rows, &ys))
    }
}

impl ExpertShard {
    /// The CPU kernel form of [`ExpertShard::forward_partial`] (`kernels::routed_experts`): when
    /// routing was decided on the host and every matrix is one the kernels read.
    fn forward_partial_kernel(&self, x: &Tensor, d: &Dispatch, lo: usize, hi: usize) -> Option<Tensor> {
        self.kernel_runs(x, d, lo, hi, None, &[])
    }

    /// [`ExpertShard::forward_partial_kernel`] with `shared` (an expert of the same width, given
    /// every token with weight 1) added last: a layer's whole FFN in one kernel call, two parallel
    /// regions instead of four. Its output is added after the routed sum, rounded as
    /// `routed + shared` in the activations' dtype.
    fn kernel_runs(
        &self,
        x: &Tensor,
        d: &Dispatch,
        lo: usize,
        hi: usize,
        shared: Option<&Mlp>,
        then: &[&Weight],
    ) -> Option<Tensor> {
        let x_ok =
            x.device() == Device::Cpu && x.dim() == 2 && matches!(x.kind(), Kind::BFloat16 | Kind::Float);
        if !x_ok {
            return None;
        }
        let n = x.size()[0] as usize;
        self.with_runs(n, d, (lo, hi), shared, |runs| {
            let ok = runs.iter().all(|(_, _, gu, down)| gu.iter().chain([*down]).all(kernels::weight_ok));
            ok.then(|| kernels::routed_experts(x, runs, self.inter as usize, then))
        })
    }

    /// `f` over the kernel's runs (see [`ExpertShard::kernel_runs`]) for `n` tokens: None (and `f`
    /// not called) unless routing was decided on the host; `f` says whether the kernels read the
    /// runs' matrices (the host step knows they do: `Moe::host_ready`, decided once).
    fn with_runs<R>(
        &self,
        n: usize,
        d: &Dispatch,
        (lo, hi): (usize, usize),
        shared: Option<&Mlp>,
        f: impl FnOnce(&[kernels::ExpertRows]) -> Option<R>,
    ) -> Option<R> {
        let (token_of, weight) = d.host.as_ref()?;
        if self.device != Device::Cpu {
            return None;
        }
        let mut runs: Vec<kernels::ExpertRows> = (lo..hi)
            .filter(|&e| d.offsets[e + 1] > d.offsets[e])
            .map(|e| {
                let (a, b) = (d.offsets[e] as usize, d.offsets[e + 1] as usize);
                let (gu, down) = &self.experts[e - self.first as usize];
                (&token_of[a..b], &weight[a..b], gu.as_slice(), down)
            })
            .collect();
        let n = if shared.is_some() { n as i64 } else { 0 };
        let (all, ones): (Vec<i64>, Vec<f32>) = (0..n).map(|t| (t, 1.0)).unzip();
        if let Some(m) = shared {
            let (gu, down, inter) = m.as_expert();
            if inter != self.inter {
                return None;
            }
            runs.push((&all, &ones, gu, down));
        }
        f(&runs)
    }
}

/// Rows up to which the shared expert joins the routed experts' kernel call (decode, speculative
/// verification); a prefill chunk's shared expert keeps its own products, which may run on
/// libtorch's GEMM (`gemm_choice`).
const FUSED_SHARED_MAX_ROWS: i64 = 48;

pub struct Moe {
    router: Router,
    shards: Vec<ExpertShard>,
    combine: Combine,
    shared: Option<Mlp>,
}

impl Moe {
    /// Loads layer `prefix`'s MoE with its routed experts split evenly over the context's expert
    /// devices.
    pub(crate) fn load(ctx: &LoadCtx, prefix: &str) -> Result<Self> {
        let shard_devices = &ctx.expert_devices;
        let c = ctx.config;
        let (hid, e, inter) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size);
        let router = Router {
            weight: ctx.weight_f32(&format!("{prefix}.gate.weight"), &[e, hid])?,
            bias: ctx.weight_f32(&format!("{prefix}.gate.e_score_correction_bias"), &[e])?,
            bias_host: Default::default(),
            n_experts: e as i64,
            n_group: c.n_group as i64,
            topk_group: c.topk_group as i64,
            top_k: c.num_experts_per_tok as i64,
            norm_topk_prob: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
        };
        let g = shard_devices.len().max(1);
        let mut shards = Vec::with_capacity(g);
        for (s, &device) in shard_devices.iter().enumerate() {
            let (lo, hi) = (s * e / g, (s + 1) * e / g);
            let mut each = Vec::with_capacity(hi - lo);
            for j in lo..hi {
                let p = format!("{prefix}.experts.{j}");
                each.push([
                    ctx.matrix(&format!("{p}.gate_proj.weight"), &[inter, hid])?,
                    ctx.matrix(&format!("{p}.up_proj.weight"), &[inter, hid])?,
                    ctx.matrix(&format!("{p}.down_proj.weight"), &[hid, inter])?,
                ]);
            }
            let shard = if each.iter().flatten().all(|w| matches!(w, Weight::Dense(_))) {
                let dense = |i: usize| -> Vec<Tensor> {
                    each.iter()
                        .map(|ws| match &ws[i] {
                            Weight::Dense(t) => t.shallow_clone(),
                            Weight::Fp8 { .. } => unreachable!("checked dense"),
                        })
                        .collect()
                };
                let (g, u) = (dense(0), dense(1));
                let gate_up: Vec<Tensor> = g.iter().zip(&u).map(|(g, u)| Tensor::cat(&[g, u], 0)).collect();
                let gate_up = Tensor::stack(&gate_up, 0).to_device(device);
                let down = Tensor::stack(&dense(2), 0).to_device(device);
                ExpertShard::stacked(lo as i64, &gate_up, &down, inter as i64, device)
            } else {
                let experts = each
                    .iter()
                    .map(|[g, u, d]| (vec![g.to_device(device), u.to_device(device)], d.to_device(device)))
                    .collect();
                ExpertShard { first: lo as i64, experts, stacked: None, inter: inter as i64, device }
            };
            shards.push(shard);
        }
        let shared = if c.n_shared_experts > 0 {
            let si = inter * c.n_shared_experts;
            let p = format!("{prefix}.shared_experts");
            Some(Mlp::new(
                ctx.matrix(&format!("{p}.gate_proj.weight"), &[si, hid])?,
                ctx.matrix(&format!("{p}.up_proj.weight"), &[si, hid])?,
                ctx.matrix(&format!("{p}.down_proj.weight"), &[hid, si])?,
            ))
        } else {
            None
        };
        Ok(Moe { router, shards, combine: ctx.combine.clone(), shared })
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_then(x, &[])
    }

    /// Its weight tensors in the order a step reads them (router, shared expert, routed experts);
    /// [`Moe::refresh_views`] after moving them.
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.router.weight];
        if let Some(s) = &mut self.shared {
            out.extend(s.tensors_mut());
        }
        out.extend(self.shards.iter_mut().flat_map(ExpertShard::tensors_mut));
        out
    }

    pub(crate) fn refresh_views(&mut self) {
        self.shards.iter_mut().for_each(ExpertShard::refresh_views);
    }

    /// What its first product reads, when known before routing: the shared expert's gate/up.
    pub(crate) fn first_weights(&self) -> Vec<&Weight> {
        self.shared.as_ref().map(Mlp::first_weights).unwrap_or_default()
    }

    /// [`Moe::forward`], hinting `then` as what follows (see [`kernels::prefetch`]).
    pub(crate) fn forward_then(&self, x: &Tensor, then: &[&Weight]) -> Tensor {
        let d = {
            let _p = profile::section("moe.route");
            self.router.dispatch(x)
        };
        // Decode on the CPU with one shard: the routed and shared experts in one kernel call.
        if let ([shard], Some(shared)) = (&self.shards[..], &self.shared) {
            if x.size()[0] <= FUSED_SHARED_MAX_ROWS {
                let _p = profile::section("moe.experts_shared");
                let (lo, hi) = (shard.first as usize, (shard.first + shard.num_experts()) as usize);
                if let Some(y) = shard.kernel_runs(x, &d, lo, hi, Some(shared), then) {
                    return y;
                }
            }
        }
        let _p = profile::section("moe.experts");
        // Shards launch in turn; on CUDA devices their kernels run concurrently until the combine.
        let partials = self.shards.iter().map(|s| (s.forward_partial(x, &d), s.device)).collect();
        let routed = self.combine.sum(partials, x.device(), x);
        // Like a failed libtorch op, a failed collective fails this step (the worker turns the
        // panic into an INTERNAL status for it) rather than returning a wrong sum.
        let routed = routed.unwrap_or_else(|e| panic!("expert combine: {e}"));
        drop(_p);
        let _p = profile::section("moe.shared");
        match &self.shared {
            Some(m) => routed + m.forward(x),
            None => routed,
        }
    }

    /// Whether [`Moe::forward_host`] takes this layer: one shard on the CPU, a shared expert of
    /// the routed experts' width, every matrix on the kernels.
    pub(crate) fn host_ready(&self) -> bool {
        let ([shard], Some(shared)) = (&self.shards[..], &self.shared) else { return false };
        let (gu, down, inter) = shared.as_expert();
        shard.device == Device::Cpu
            && inter == shard.inter
            && self.router.host_ready()
            && gu.iter().chain([down]).all(kernels::weight_ok)
            && shard.experts.iter().all(|(gu, down)| gu.iter().chain([down]).all(kernels::weight_ok))
    }

    /// [`Moe::forward_then`] on host rows `x [T, H]` (at most `FUSED_SHARED_MAX_ROWS`) for a layer
    /// that is [`Moe::host_ready`]: the routed and shared experts in one kernel call.
    pub(crate) fn forward_host<T: HostAct>(&self, x: &[T], hidden: usize, then: &[&Weight]) -> Vec<T> {
        let d = {
            let _p = profile::section("moe.route");
            self.router.dispatch_host(x)
        };
        let _p = profile::section("moe.experts_shared");
        let (shard, shared) = (&self.shards[0], self.shared.as_ref());
        let (lo, hi) = (shard.first as usize, (shard.first + shard.num_experts()) as usize);
        let n = x.len() / hidden;
        shard
            .with_runs(n, &d, (lo, hi), shared, |runs| {
                Some(host_step::routed_experts(x, hidden, runs, shard.inter as usize, then))
            })
            .expect("host_ready: routing on the host, matrices on the kernels")
    }

    /// Router decisions, for tests and diagnostics.
    pub fn route(&self, x: &Tensor) -> (Tensor, Tensor) {
        self.router.route(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batched dispatch over any number of shards equals a per-token loop over the chosen experts.
    #[test]
    fn batched_experts_equal_token_loop() {
        let (e, h, i, n) = (8i64, 12i64, 5i64, 9i64);
        let opts = (Kind::Double, Device::Cpu);
        let gate_up = Tensor::randn([e, 2 * i, h], opts);
        let down = Tensor::randn([e, h, i], opts);
        let x = Tensor::randn([n, h], opts);
        let r = Router::random(e, h, 1, 1, 3);
        let (idx, w) = r.route(&x);
        let d = Dispatch::new(&idx, &w, e);
        let idxv: Vec<Vec<i64>> = Vec::try_from(&idx).unwrap();
        let want = x.zeros_like();
        for t in 0..n {
            for (j, &ex) in idxv[t as usize].iter().enumerate() {
                let xt = x.get(t).unsqueeze(0);
                let gu = xt.mm(&gate_up.get(ex).tr());
                let act = gu.narrow(1, 0, i).silu() * gu.narrow(1, i, i);
                let y =
                    act.mm(&down.get(ex).tr()).squeeze_dim(0) * w.get(t).get(j as i64).to_kind(Kind::Double);
                let mut row = want.get(t);
                row += y;
            }
        }
        for g in [1i64, 2, 3] {
            let mut partials = vec![];
            for s in 0..g {
                let (lo, hi) = (s * e / g, (s + 1) * e / g);
                let shard = ExpertShard::stacked(
                    lo,
                    &gate_up.narrow(0, lo, hi - lo),
                    &down.narrow(0, lo, hi - lo),
                    i,
                    Device::Cpu,
                );
                partials.push((shard.forward_partial(&x, &d), Device::Cpu));
            }
            let sum = Combine::Add.sum(partials, Device::Cpu, &x).unwrap();
            let diff = (&sum - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "G={g}: {diff}");
        }
    }

    /// The decode path with the shared expert in the routed experts' kernel call gives exactly
    /// `routed + shared` as separate calls give it, in f32 and bf16; a shared expert of another
    /// width takes the separate calls.
    #[test]
    fn shared_expert_in_the_kernel_call_equals_separate_calls() {
        let (e, h, i, n) = (8i64, 32i64, 16i64, 3i64);
        let opts = (Kind::Float, Device::Cpu);
        for (kind, si) in [(Kind::Float, i), (Kind::BFloat16, i), (Kind::BFloat16, 2 * i)] {
            tch::manual_seed(4);
            let gate_up = (Tensor::randn([e, 2 * i, h], opts) * 0.2).to_kind(kind);
            let down = (Tensor::randn([e, h, i], opts) * 0.2).to_kind(kind);
            let w = |r: i64, c: i64| Weight::Dense((Tensor::randn([r, c], opts) * 0.2).to_kind(kind));
            let moe = Moe {
                router: Router::random(e, h, 4, 2, 3),
                shards: vec![ExpertShard::stacked(0, &gate_up, &down, i, Device::Cpu)],
                combine: Combine::Add,
                shared: Some(Mlp::new(w(si, h), w(si, h), w(h, si))),
            };
            let x = Tensor::randn([n, h], opts).to_kind(kind);
            let d = moe.router.dispatch(&x);
            let want =
                moe.shards[0].forward_partial(&x, &d).unwrap() + moe.shared.as_ref().unwrap().forward(&x);
            let got = moe.forward(&x);
            assert!(got.equal(&want), "{kind:?} shared width {si}");
        }
    }

    /// Packing a MoE's weights (see `huge_pages`) moves every tensor a step reads, the expert
    /// views follow the stacked pair, and the layer computes exactly what it did.
    #[test]
    fn packed_weights_compute_the_same() {
        let (e, h, i, n) = (8i64, 32i64, 16i64, 3i64);
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(5);
        let kind = Kind::BFloat16;
        let gate_up = (Tensor::randn([e, 2 * i, h], opts) * 0.2).to_kind(kind);
        let down = (Tensor::randn([e, h, i], opts) * 0.2).to_kind(kind);
        let w = |r: i64, c: i64| Weight::Dense((Tensor::randn([r, c], opts) * 0.2).to_kind(kind));
        let mut moe = Moe {
            router: Router::random(e, h, 4, 2, 3),
            shards: vec![ExpertShard::stacked(0, &gate_up, &down, i, Device::Cpu)],
            combine: Combine::Add,
            shared: Some(Mlp::new(w(i, h), w(i, h), w(h, i))),
        };
        let x = Tensor::randn([n, h], opts).to_kind(kind);
        let want = moe.forward(&x);
        let before: Vec<usize> = moe.tensors_mut().iter().map(|t| t.data_ptr() as usize).collect();
        assert_eq!(before.len(), 1 + 2 + 2, "router, shared gate/up and down, stacked gate/up and down");
        let packed = crate::huge_pages::pack(moe.tensors_mut());
        moe.refresh_views();
        if packed == 0 {
            return; // MLASERVE_HUGE_PAGES=0
        }
        let after: Vec<usize> = moe.tensors_mut().iter().map(|t| t.data_ptr() as usize).collect();
        assert!(before.iter().zip(&after).all(|(b, a)| b != a), "every tensor moved");
        assert!(after.windows(2).all(|p| p[0] < p[1]), "in read order");
        let shard = &moe.shards[0];
        let (gu, d) = shard.stacked.as_ref().unwrap();
        for (k, (g, dn)) in shard.experts.iter().enumerate() {
            let ptr = |w: &Weight| match w {
                Weight::Dense(t) => t.data_ptr() as usize,
                Weight::Fp8 { .. } => unreachable!(),
            };
            assert_eq!(ptr(&g[0]), gu.get(k as i64).data_ptr() as usize, "expert {k} gate/up view");
            assert_eq!(ptr(dn), d.get(k as i64).data_ptr() as usize, "expert {k} down view");
        }
        assert!(moe.forward(&x).equal(&want));
    }

    /// The kernel form (host routing, one `routed_experts` call) equals the tensor form in f32,
    /// fused gate/up; bf16 stays within bf16 rounding of it.
    #[test]
    fn kernel_experts_equal_tensor_form() {
        tch::manual_seed(3);
        let (e, h, i, n) = (8i64, 32i64, 16i64, 5i64);
        let opts = (Kind::Float, Device::Cpu);
        let shard = |kind: Kind| {
            let gate_up = (Tensor::randn([e, 2 * i, h], opts) * 0.2).to_kind(kind);
            let down = (Tensor::randn([e, h, i], opts) * 0.2).to_kind(kind);
            ExpertShard::stacked(0, &gate_up, &down, i, Device::Cpu)
        };
        let r = Router::random(e, h, 4, 2, 3);
        let x = Tensor::randn([n, h], opts);
        let host = r.dispatch(&x);
        assert!(host.host.is_some(), "CPU routing is decided on the host");
        let (idx, w) = r.route(&x);
        let tensor = Dispatch::new(&idx, &w, e);
        let s = shard(Kind::Float);
        let (a, b) = (s.forward_partial(&x, &host).unwrap(), s.forward_partial(&x, &tensor).unwrap());
        let diff = (&a - &b).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "f32: {diff}");
        let s = shard(Kind::BFloat16);
        let xb = x.to_kind(Kind::BFloat16);
        let (a, b) = (s.forward_partial(&xb, &host).unwrap(), s.forward_partial(&xb, &tensor).unwrap());
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let rel = ((&a - &b).abs().max() / b.abs().max()).double_value(&[]);
        assert!(rel < 0.02, "bf16: {rel}");
    }
}
