//! The MoE router (sigmoid scores, bias-corrected group-limited top-k, deepseek-v3.md §4) and the
//! dispatch it produces: (token, expert) assignments sorted by expert.
//!
//! On the CPU the decision runs on the host over the `[N, E]` gate logits: one matrix product in
//! libtorch, then a few microseconds of plain Rust. The tensor form is ~20 small libtorch ops (~45 µs
//! per layer at batch 1, measured), which at decode is more than the experts' own products. Other
//! devices keep the tensor form, so routing stays on the device.

use std::cell::OnceCell;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::host_step::{self, HostAct};
use crate::kernels;
use crate::linear::Weight;

pub struct Router {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    /// `bias` on the host, copied once (the host rule reads it every step).
    pub(crate) bias_host: OnceLock<Vec<f32>>,
    pub(crate) n_experts: i64,
    pub(crate) n_group: i64,
    pub(crate) topk_group: i64,
    pub(crate) top_k: i64,
    pub(crate) norm_topk_prob: bool,
    pub(crate) scaling: f64,
}

/// Routing decisions on the host: row-major `[N, k]` expert ids (best first) and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRoute {
    pub idx: Vec<i64>,
    pub w: Vec<f32>,
    pub k: usize,
}

/// Indices of the `k` largest of `v` (restricted to `allowed`), best first; ties go to the lower
/// index, as a stable descending sort would give.
fn top_indices(v: &[f32], k: usize, allowed: impl Fn(usize) -> bool, out: &mut Vec<usize>) {
    out.clear();
    for (i, &x) in v.iter().enumerate() {
        if !allowed(i) {
            continue;
        }
        // Insertion into a short sorted list: k is 8 or less in every DeepSeek config.
        let pos = out.iter().position(|&j| x > v[j]).unwrap_or(out.len());
        if pos < k {
            out.insert(pos, i);
            out.truncate(k);
        }
    }
}

impl Router {
    /// The gate logits `[N, E]` in fp32 (the router's precision whatever the activations'). On the
    /// CPU through the kernels' exact fp32 product, which widen small bf16 activations themselves:
    /// the cast and MKL's gemv were ~15 µs a layer at decode, the product itself ~2.
    fn logits(&self, x: &Tensor) -> Tensor {
        let w = Weight::Dense(self.weight.shallow_clone());
        let x = x.contiguous();
        if kernels::use_for(&x, &w) {
            let out = Tensor::empty([x.size()[0], self.n_experts], (Kind::Float, Device::Cpu));
            kernels::grouped_linear_into(&[(&x, &w)], &out);
            return out;
        }
        x.to_kind(Kind::Float).mm(&self.weight.tr()).contiguous()
    }

    /// The routing rule over host logits (row-major `[N, E]`) and the correction bias.
    pub fn route_host(&self, logits: &[f32], bias: &[f32]) -> HostRoute {
        let e = self.n_experts as usize;
        let (k, groups, keep_groups) =
            (self.top_k as usize, self.n_group.max(1) as usize, self.topk_group as usize);
        let per = e / groups;
        let n = logits.len() / e;
        let (mut idx, mut w) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
        let (mut scores, mut choice) = (vec![0f32; e], vec![0f32; e]);
        let (mut group_score, mut kept, mut top) = (vec![0f32; groups], Vec::new(), Vec::new());
        let mut allowed = vec![true; e];
        for row in logits.chunks_exact(e) {
            for j in 0..e {
                scores[j] = 1.0 / (1.0 + (-row[j]).exp());
                choice[j] = scores[j] + bias[j];
            }
            if groups > 1 {
                for (g, gs) in group_score.iter_mut().enumerate() {
                    top_indices(&choice[g * per..(g + 1) * per], 2, |_| true, &mut top);
                    *gs = top.iter().map(|&j| choice[g * per + j]).sum();
                }
                top_indices(&group_score, keep_groups, |_| true, &mut kept);
                for (j, a) in allowed.iter_mut().enumerate() {
                    *a = kept.contains(&(j / per));
                }
            }
            top_indices(&choice, k, |j| allowed[j], &mut top);
            let total: f32 = top.iter().map(|&j| scores[j]).sum();
            for &j in &top {
                let mut wj = scores[j];
                if self.norm_topk_prob {
                    wj /= total + 1e-20;
                }
                idx.push(j as i64);
                w.push(wj * self.scaling as f32);
            }
        }
        HostRoute { idx, w, k }
    }

    /// Expert indices `[N, k]` and their weights `[N, k]` (fp32) for tokens `x [N, H]`, as tensors.
    pub fn route(&self, x: &Tensor) -> (Tensor, Tensor) {
        let n = x.size()[0];
        let scores = self.logits(x).sigmoid();
        let mut choice = &scores + &self.bias;
        if self.n_group > 1 {
            let per = self.n_experts / self.n_group;
            let group_scores = choice
                .view([n, self.n_group, per])
                .topk(2, -1, true, false)
                .0
                .sum_dim_intlist(-1, false, Kind::Float);
            let (_, keep) = group_scores.topk(self.topk_group, -1, true, false);
            let group_mask =
                Tensor::zeros([n, self.n_group], (Kind::Bool, x.device())).scatter_value(1, &keep, 1);
            let expert_mask = group_mask.unsqueeze(-1).expand([n, self.n_group, per], false).reshape([n, -1]);
            choice = choice.masked_fill(&expert_mask.logical_not(), f64::NEG_INFINITY);
        }
        let (_, idx) = choice.topk(self.top_k, -1, true, false);
        let mut w = scores.gather(1, &idx, false);
        if self.norm_topk_prob {
            w = &w / (w.sum_dim_intlist(-1, true, Kind::Float) + 1e-20);
        }
        (idx, w * self.scaling)
    }

    /// The dispatch for tokens `x`: decided on the host for CPU tensors, on the device otherwise.
    pub fn dispatch(&self, x: &Tensor) -> Dispatch {
        if x.device() != Device::Cpu {
            let (idx, w) = self.route(x);
            // bf16 (`_grouped_mm`'s type on a GPU): grouped, nothing read back; else per expert.
            return if x.kind() == Kind::BFloat16 {
                Dispatch::on_device(&idx, &w, self.n_experts)
            } else {
                Dispatch::new(&idx, &w, self.n_experts)
            };
        }
        // Read in place (contiguous f32 on the CPU): a view and a copy were cold libtorch calls.
        self.dispatch_logits(kernels::elems(&self.logits(x), Kind::Float))
    }

    /// [`Router::dispatch`] on the CPU for host rows `x [N, H]` (the gate's exact fp32 product).
    pub(crate) fn dispatch_host<T: HostAct>(&self, x: &[T]) -> Dispatch {
        let w = Weight::Dense(self.weight.shallow_clone());
        self.dispatch_logits(&host_step::products(&[(x, &w)]).pop().expect("one product"))
    }

    /// Whether [`Router::dispatch_host`] takes it: its gate on the kernels.
    pub(crate) fn host_ready(&self) -> bool {
        kernels::weight_ok(&Weight::Dense(self.weight.shallow_clone()))
    }

    /// The decisions for host gate logits `[N, E]`.
    fn dispatch_logits(&self, logits: &[f32]) -> Dispatch {
        let bias = self.bias_host.get_or_init(|| Vec::try_from(&self.bias).expect("fp32 bias"));
        Dispatch::from_host(&self.route_host(logits, bias), self.n_experts as usize)
    }

    #[cfg(test)]
    pub(crate) fn random(e: i64, hidden: i64, groups: i64, kg: i64, k: i64) -> Router {
        Router {
            weight: Tensor::randn([e, hidden], (Kind::Float, Device::Cpu)),
            bias: Tensor::randn([e], (Kind::Float, Device::Cpu)) * 0.1,
            bias_host: OnceLock::new(),
            n_experts: e,
            n_group: groups,
            topk_group: kg,
            top_k: k,
            norm_topk_prob: true,
            scaling: 2.5,
        }
    }
}

/// Assignments (token, expert) sorted by expert, shared by all shards of a layer.
pub struct Dispatch {
    /// Start of each expert's run in the sorted order; `offsets[E]` = N * k.
    pub(crate) offsets: Vec<i64>,
    /// The token of each assignment and its routing weight, on the host when decided there.
    pub(crate) host: Option<(Vec<i64>, Vec<f32>)>,
    /// The same as tensors: made on first use when decided on the host (the CPU expert kernel
    /// reads `host` and never needs them).
    tensors: OnceCell<(Tensor, Tensor)>,
    /// Decided on a GPU: the assignments left on the device (`offsets` stays empty: counting the
    /// experts' runs on the host would synchronise per layer).
    pub(crate) device: Option<DeviceRoute>,
}

/// A layer's routing on the device, for the grouped expert products.
pub(crate) struct DeviceRoute {
    /// Every assignment's expert, token and weight `[N * k]`, in token order.
    pub(crate) expert: Tensor,
    pub(crate) token: Tensor,
    pub(crate) weight: Tensor,
    idx: Tensor,
    w: Tensor,
    n_experts: i64,
    per_expert: OnceCell<Box<Dispatch>>,
}

impl DeviceRoute {
    /// The per-expert dispatch of the same routing (counts read back): for a device whose
    /// `_grouped_mm` refuses the product.
    pub(crate) fn per_expert(&self) -> &Dispatch {
        self.per_expert.get_or_init(|| Box::new(Dispatch::new(&self.idx, &self.w, self.n_experts)))
    }
}

fn offsets_of(counts: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut offsets = vec![0];
    for c in counts {
        offsets.push(offsets.last().copied().unwrap_or(0) + c);
    }
    offsets
}

impl Dispatch {
    /// From device tensors `idx`/`w` `[N, k]`.
    pub fn new(idx: &Tensor, w: &Tensor, n_experts: i64) -> Self {
        let k = idx.size()[1];
        let flat = idx.view([-1]);
        let order = flat.argsort_stable(true, 0, false);
        let counts: Vec<i64> = Vec::try_from(flat.bincount::<Tensor>(None, n_experts).to_device(Device::Cpu))
            .expect("bincount is int64");
        let tensors = OnceCell::from((order.floor_divide_scalar(k), w.view([-1]).index_select(0, &order)));
        Dispatch { offsets: offsets_of(counts), host: None, tensors, device: None }
    }

    /// From device tensors `idx`/`w` `[N, k]`, without reading anything back to the host: the
    /// experts then run as grouped products whose group ends are computed on the device.
    pub fn on_device(idx: &Tensor, w: &Tensor, n_experts: i64) -> Self {
        let k = idx.size()[1];
        let flat = idx.view([-1]);
        let token = Tensor::arange(flat.size()[0], (Kind::Int64, flat.device())).floor_divide_scalar(k);
        let device = Some(DeviceRoute {
            expert: flat,
            token,
            weight: w.view([-1]),
            idx: idx.shallow_clone(),
            w: w.shallow_clone(),
            n_experts,
            per_expert: OnceCell::new(),
        });
        Dispatch { offsets: Vec::new(), host: None, tensors: OnceCell::new(), device }
    }

    /// From host decisions: a stable counting sort by expert.
    pub fn from_host(r: &HostRoute, n_experts: usize) -> Self {
        let mut counts = vec![0i64; n_experts];
        for &e in &r.idx {
            counts[e as usize] += 1;
        }
        let offsets = offsets_of(counts);
        let mut next: Vec<usize> = offsets[..n_experts].iter().map(|&o| o as usize).collect();
        let mut token_of = vec![0i64; r.idx.len()];
        let mut weight = vec![0f32; r.idx.len()];
        for (j, &e) in r.idx.iter().enumerate() {
            let slot = &mut next[e as usize];
            token_of[*slot] = (j / r.k) as i64;
            weight[*slot] = r.w[j];
            *slot += 1;
        }
        Dispatch { offsets, host: Some((token_of, weight)), tensors: OnceCell::new(), device: None }
    }

    /// The token of each assignment `[N * k]` and its weight, as (CPU, for host decisions) tensors.
    pub(crate) fn tensors(&self) -> &(Tensor, Tensor) {
        self.tensors.get_or_init(|| {
            let (t, w) = self.host.as_ref().expect("a dispatch holds tensors or host vectors");
            (Tensor::from_slice(t), Tensor::from_slice(w))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor router against a scalar re-implementation of the rule in the model notes.
    #[test]
    fn routing_matches_scalar_rule() {
        let r = Router::random(16, 16, 4, 2, 3);
        let x = Tensor::randn([20, 16], (Kind::Float, Device::Cpu));
        let (idx, w) = r.route(&x);
        let logits: Vec<Vec<f32>> = Vec::try_from(x.mm(&r.weight.tr())).unwrap();
        let bias: Vec<f32> = Vec::try_from(&r.bias).unwrap();
        let idx: Vec<Vec<i64>> = Vec::try_from(idx).unwrap();
        let w: Vec<Vec<f32>> = Vec::try_from(w).unwrap();
        for t in 0..20 {
            let s: Vec<f32> = logits[t].iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
            let b: Vec<f32> = s.iter().zip(&bias).map(|(a, c)| a + c).collect();
            let mut gs: Vec<(f32, usize)> = (0..4)
                .map(|g| {
                    let mut v: Vec<f32> = b[g * 4..g * 4 + 4].to_vec();
                    v.sort_by(|a, b| b.partial_cmp(a).unwrap());
                    (v[0] + v[1], g)
                })
                .collect();
            gs.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            let kept: Vec<usize> = gs[..2].iter().map(|g| g.1).collect();
            let mut cand: Vec<(f32, usize)> =
                (0..16).filter(|e| kept.contains(&(e / 4))).map(|e| (b[e], e)).collect();
            cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            let mut want: Vec<usize> = cand[..3].iter().map(|c| c.1).collect();
            want.sort();
            let mut got: Vec<usize> = idx[t].iter().map(|&i| i as usize).collect();
            got.sort();
            assert_eq!(got, want, "token {t}");
            let total: f32 = want.iter().map(|&e| s[e]).sum();
            for (j, &e) in idx[t].iter().enumerate() {
                let expect = s[e as usize] / total * 2.5;
                assert!((w[t][j] - expect).abs() < 1e-5, "token {t}: {} vs {expect}", w[t][j]);
            }
        }
    }

    /// The CPU gate logits (the kernels' fp32 product) equal libtorch's fp32 product, for f32 and
    /// bf16 activations, at decode and prefill sizes.
    #[test]
    fn kernel_logits_equal_libtorch() {
        tch::manual_seed(3);
        let r = Router::random(32, 64, 4, 2, 8);
        for (n, kind) in [(1, Kind::Float), (1, Kind::BFloat16), (300, Kind::BFloat16), (7, Kind::Float)] {
            let x = Tensor::randn([n, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
            let want = x.to_kind(Kind::Float).mm(&r.weight.tr());
            let got = r.logits(&x);
            assert_eq!(got.kind(), Kind::Float);
            let d = (got - &want).abs().max().double_value(&[]);
            assert!(d < 1e-4, "n {n} {kind:?}: {d}");
        }
    }

    /// The host rule decides as the tensor rule does, over seeded random shapes (with and without
    /// groups), and the host dispatch equals the device dispatch.
    #[test]
    fn host_routing_equals_tensor_routing() {
        tch::manual_seed(7);
        for (e, h, groups, kg, k, n) in
            [(16, 16, 4, 2, 3, 20), (8, 24, 4, 2, 2, 1), (32, 8, 8, 4, 8, 33), (8, 16, 1, 1, 2, 5)]
        {
            let r = Router::random(e, h, groups, kg, k);
            let x = Tensor::randn([n, h], (Kind::Float, Device::Cpu));
            let (idx, w) = r.route(&x);
            let logits: Vec<f32> = Vec::try_from(r.logits(&x).view([-1])).unwrap();
            let bias: Vec<f32> = Vec::try_from(&r.bias).unwrap();
            let host = r.route_host(&logits, &bias);
            // The tensor form's top-k is unsorted: compare each row as a set of (expert, weight).
            let rows = |idx: &[i64], w: &[f32]| -> Vec<Vec<(i64, f32)>> {
                idx.chunks(k as usize)
                    .zip(w.chunks(k as usize))
                    .map(|(i, w)| {
                        let mut r: Vec<(i64, f32)> = i.iter().copied().zip(w.iter().copied()).collect();
                        r.sort_by_key(|p| p.0);
                        r
                    })
                    .collect()
            };
            let want = rows(&Vec::try_from(idx.view([-1])).unwrap(), &Vec::try_from(w.view([-1])).unwrap());
            for (t, (a, b)) in rows(&host.idx, &host.w).iter().zip(&want).enumerate() {
                assert_eq!(
                    a.iter().map(|p| p.0).collect::<Vec<_>>(),
                    b.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "E={e} G={groups} token {t}"
                );
                for (x, y) in a.iter().zip(b) {
                    assert!((x.1 - y.1).abs() <= 1e-6 * y.1.abs().max(1.0), "{} vs {}", x.1, y.1);
                }
            }
            let (dt, dh) = (Dispatch::new(&idx, &w, e), Dispatch::from_host(&host, e as usize));
            assert_eq!(dt.offsets, dh.offsets);
            let ((tt, tw), (ht, hw)) = (dt.tensors(), dh.tensors());
            assert_eq!(Vec::<i64>::try_from(tt).unwrap(), Vec::<i64>::try_from(ht).unwrap());
            let diff = (tw - hw).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{diff}");
        }
    }

    /// Ties go to the lower expert id; masked groups are never chosen even when their scores tie.
    #[test]
    fn host_ties_prefer_lower_ids() {
        let mut out = vec![];
        top_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 2, |_| true, &mut out);
        assert_eq!(out, vec![1, 2]);
        top_indices(&[1.0, 3.0, 3.0, 2.0, 3.0], 3, |i| i != 2, &mut out);
        assert_eq!(out, vec![1, 4, 3]);
    }
}
