//! Multi-head Latent Attention over the paged latent cache.
//!
//! Per token and layer the cache holds only `[c ; rope(k_pe)]` (kv_lora_rank + qk_rope_head_dim
//! values). Short chunks (decode) attend in the absorbed form, folding `W_UK` into the query and `W_UV`
//! into the output so the cache is never expanded; long prefill chunks choose per sequence between the
//! absorbed form and expanding their context once, whichever costs fewer multiply-adds.

use tch::{Device, Kind, Tensor};

use crate::absorb::HeadWeights;
use crate::batch::{BatchedGroup, SoloSeq, StepPlan};
use crate::error::Result;
use crate::host_step::{self, HostAct};
use crate::kernels;
use crate::kernels::elems;
use crate::linear::{forward_weight, Linear, Weight};
use crate::loader::LoadCtx;
/// Re-exported from `loader`, where the load options live (it was defined here before).
pub use crate::loader::PrefillForm;
use crate::mla_kernels;
use crate::norm::RmsNorm;
use crate::profile;
use crate::rope::{self, permute_rope_rows, rope_row_permutation};
use crate::torch_bf16;

enum QProj {
    Lora { a: Linear, norm: RmsNorm, b: Linear },
    Plain(Linear),
}

pub struct Mla {
    q: QProj,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `W_UKᵀ` (`[rkv, dn]` a head) and `W_UV` (`[dv, rkv]` a head): the two halves of kv_b_proj,
    /// each laid out `[out, in]` for the product it takes part in (query absorption, output
    /// absorption), in the checkpoint's format (see [`HeadWeights`]).
    w_uk_t: HeadWeights,
    w_uv: HeadWeights,
    /// `W_UK` `[h · dn, rkv]` as stored, when FP8: the expanded prefill's key product.
    w_uk: Option<Weight>,
    o: Linear,
    h: i64,
    dn: i64,
    dr: i64,
    dv: i64,
    rkv: i64,
    scale: f64,
    prefill: PrefillForm,
}

/// Upper bound on attention-score elements materialised at once by a long prefill.
const SCORE_TILE_ELEMS: i64 = 1 << 25;

impl Mla {
    pub(crate) fn load(ctx: &LoadCtx, prefix: &str) -> Result<Self> {
        let c = ctx.config;
        let (hid, h) = (c.hidden_size, c.num_attention_heads);
        let (dn, dr, dv, rkv) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank);
        let qk = dn + dr;
        // The rope rows of q and kv_a are reordered once at load (see `rope`); for FP8 weights the
        // outputs are reordered instead, which keeps the block scales aligned.
        let row_order = |groups: usize, block: usize| -> Option<Tensor> {
            rope_row_permutation(dr, c.rope_layout)?;
            let rows = Tensor::arange((groups * block) as i64, (Kind::Int64, Device::Cpu)).unsqueeze(1);
            Some(
                permute_rope_rows(&rows, groups as i64, block as i64, dr as i64, c.rope_layout)
                    .squeeze_dim(1),
            )
        };
        let q = match c.q_lora_rank {
            Some(rq) => QProj::Lora {
                a: Linear::from_weight(ctx.matrix(&format!("{prefix}.q_a_proj.weight"), &[rq, hid])?),
                norm: ctx.norm(&format!("{prefix}.q_a_layernorm.weight"), rq)?,
                b: Linear::with_row_order(
                    ctx.matrix(&format!("{prefix}.q_b_proj.weight"), &[h * qk, rq])?,
                    row_order(h, qk),
                ),
            },
            None => QProj::Plain(Linear::with_row_order(
                ctx.matrix(&format!("{prefix}.q_proj.weight"), &[h * qk, hid])?,
                row_order(h, qk),
            )),
        };
        let kv_a = Linear::with_row_order(
            ctx.matrix(&format!("{prefix}.kv_a_proj_with_mqa.weight"), &[rkv + dr, hid])?,
            row_order(1, rkv + dr),
        );
        // kv_b is split per head into the two absorption matrices, held as stored (FP8 stays FP8).
        let kv_b = ctx.matrix_uncounted(&format!("{prefix}.kv_b_proj.weight"), &[h * (dn + dv), rkv])?;
        let (w_uk_t, w_uv, w_uk) = HeadWeights::split_kv_b(kv_b, h as i64, dn as i64, dv as i64, ctx.kind);
        for w in [Some(&w_uk_t.w), Some(&w_uv.w), w_uk.as_ref()].into_iter().flatten() {
            ctx.count_held(w);
        }
        Ok(Mla {
            q,
            kv_a,
            kv_norm: ctx.norm(&format!("{prefix}.kv_a_layernorm.weight"), rkv)?,
            w_uk_t,
            w_uv,
            w_uk,
            o: Linear::from_weight(ctx.matrix(&format!("{prefix}.o_proj.weight"), &[hid, h * dv])?),
            h: h as i64,
            dn: dn as i64,
            dr: dr as i64,
            dv: dv as i64,
            rkv: rkv as i64,
            scale: c.softmax_scale(),
            prefill: ctx.prefill_form,
        })
    }

    /// Attention for the `T` new tokens `x [T, H]` of `plan`; writes their latents into `cache`
    /// (`[slots, rkv + dr]`) before attending, so each token sees itself.
    pub fn forward(&self, x: &Tensor, plan: &StepPlan, cache: &mut Tensor) -> Tensor {
        self.forward_then(x, plan, cache, &[])
    }

    /// Its weight tensors in the order a step reads them (input projections, the absorption
    /// matrices, the output projection).
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = Vec::new();
        match &mut self.q {
            QProj::Lora { a, b, .. } => {
                out.extend(a.weight_mut().tensors_mut());
                out.extend(self.kv_a.weight_mut().tensors_mut());
                out.extend(b.weight_mut().tensors_mut());
            }
            QProj::Plain(p) => {
                out.extend(p.weight_mut().tensors_mut());
                out.extend(self.kv_a.weight_mut().tensors_mut());
            }
        }
        out.extend(self.w_uk_t.w.tensors_mut());
        out.extend(self.w_uv.w.tensors_mut());
        out.extend(self.w_uk.iter_mut().flat_map(Weight::tensors_mut));
        out.extend(self.o.weight_mut().tensors_mut());
        out
    }

    /// The input projections' weights (the first product of [`Mla::forward`]).
    pub(crate) fn first_weights(&self) -> [&Weight; 2] {
        let first = match &self.q {
            QProj::Lora { a, .. } => a,
            QProj::Plain(p) => p,
        };
        [first.weight(), self.kv_a.weight()]
    }

    /// [`Mla::forward`], hinting `then` as what follows its output projection. Each product here
    /// first hints the next one's weights (see [`kernels::prefetch`]).
    pub(crate) fn forward_then(
        &self,
        x: &Tensor,
        plan: &StepPlan,
        cache: &mut Tensor,
        then: &[&Weight],
    ) -> Tensor {
        let t = x.size()[0];
        let proj = profile::section("attn.proj");
        // The query's first product and kv_a read the same rows: one kernel call for both.
        if let QProj::Lora { b, .. } = &self.q {
            kernels::prefetch(&[b.weight()]);
        }
        let (q_first, kv) = match &self.q {
            QProj::Lora { a, .. } => Linear::forward_pair(a, &self.kv_a, x),
            QProj::Plain(p) => Linear::forward_pair(p, &self.kv_a, x),
        };
        let q = match &self.q {
            QProj::Lora { norm, b, .. } => {
                let n = norm.forward(&q_first);
                kernels::prefetch(&[&self.w_uk_t.w, &self.w_uv.w]);
                b.forward(&n)
            }
            QProj::Plain(_) => q_first,
        };

        let norm = (self.kv_norm.weight(), self.kv_norm.eps());
        if !kernels::write_latents(&kv, norm, (&plan.cos, &plan.sin), cache, &plan.write_slots) {
            let latent = self.kv_norm.forward(&kv.narrow(1, 0, self.rkv));
            let k_pe = rope::apply_rows(&kv.narrow(1, self.rkv, self.dr), &plan.cos, &plan.sin);
            let latents = Tensor::cat(&[latent, k_pe], 1).to_kind(cache.kind());
            let _ = cache.index_copy_(0, &plan.write_slots, &latents);
        }

        drop(proj);
        let core = profile::section("attn.core");
        let out = match self.attend_paged_q(plan, &q, cache) {
            Some(o) => o,
            None => {
                let q = q.view([t, self.h, self.dn + self.dr]);
                let q_nope = q.narrow(2, 0, self.dn);
                let q_pe = rope::apply_rows(&q.narrow(2, self.dn, self.dr), &plan.cos, &plan.sin);
                self.attend(x, plan, &q_nope, &q_pe, cache).reshape([t, self.h * self.dv])
            }
        };
        drop(core);
        kernels::prefetch(then);
        let _p = profile::section("attn.o_proj");
        self.o.forward(&out)
    }

    /// Whether [`Mla::forward_host`] takes this layer for activations of `kind`: every product on
    /// the kernels, its norms in `kind`.
    pub(crate) fn host_ready(&self, kind: Kind) -> bool {
        let q = match &self.q {
            QProj::Lora { a, norm, b } => a.host_ready() && b.host_ready() && norm.weight().kind() == kind,
            QProj::Plain(p) => p.host_ready(),
        };
        q && self.kv_a.host_ready()
            && self.o.host_ready()
            && self.kv_norm.weight().kind() == kind
            && [&self.w_uk_t.w, &self.w_uv.w].iter().all(|w| kernels::weight_ok(w))
    }

    /// [`Mla::forward_then`] on host rows `x [T, H]` of a step that fits the host form
    /// (`host_step::plan_fits`), for a layer that is [`Mla::host_ready`] with `cache` of `T`'s kind:
    /// the same products, rounding and hints.
    pub(crate) fn forward_host<T: HostAct>(
        &self,
        x: &[T],
        plan: &StepPlan,
        cache: &mut Tensor,
        then: &[&Weight],
    ) -> Vec<T> {
        let proj = profile::section("attn.proj");
        if let QProj::Lora { b, .. } = &self.q {
            kernels::prefetch(&[b.weight()]);
        }
        let first = match &self.q {
            QProj::Lora { a, .. } => a,
            QProj::Plain(p) => p,
        };
        let mut both = host_step::products(&[(x, first.weight()), (x, self.kv_a.weight())]).into_iter();
        let q_first = T::rounded(&first.permuted_host(both.next().expect("two")));
        let kv = T::rounded(&self.kv_a.permuted_host(both.next().expect("two")));
        let q = match &self.q {
            QProj::Lora { norm, b, .. } => {
                let n = host_step::rms_norm(&q_first, (norm.weight(), norm.eps()));
                kernels::prefetch(&[&self.w_uk_t.w, &self.w_uv.w]);
                b.forward_host(&n)
            }
            QProj::Plain(_) => q_first,
        };
        let (cos, sin) = (T::of(&plan.cos), T::of(&plan.sin));
        let slots = elems::<i64>(&plan.write_slots, Kind::Int64);
        let norm = (T::of(self.kv_norm.weight()), self.kv_norm.eps());
        kernels::latents_into::<T>(&kv, norm, (cos, sin), kernels::elems_mut(cache, T::KIND), slots);
        drop(proj);
        let core = profile::section("attn.core");
        let o = {
            let _p = profile::section("core.paged");
            kernels::prefetch(&[self.o.weight()]);
            let dims = (self.h, self.dn, self.dr);
            T::rounded(&mla_kernels::decode_rows::<T>(&q, (cos, sin), dims, &self.core_inputs(plan, cache)))
        };
        drop(core);
        kernels::prefetch(then);
        let _p = profile::section("attn.o_proj");
        self.o.forward_host(&o)
    }

    /// The rows of `plan` over `cache` for `q_nope [T, h, dn]` and rotated `q_pe [T, h, dr]`:
    /// `[T, h, dv]` in `x`'s kind.
    fn attend(&self, x: &Tensor, plan: &StepPlan, q_nope: &Tensor, q_pe: &Tensor, cache: &Tensor) -> Tensor {
        let t = x.size()[0];
        match &plan.batched {
            Some(g) if g.q_rows.is_none() => self.attend_batched(g, q_nope, q_pe, cache).to_kind(x.kind()),
            None if !plan.paged.is_empty() && plan.paged_rows.is_none() => {
                self.attend_paged(plan, q_nope, q_pe, cache).to_kind(x.kind())
            }
            _ => {
                let mut out = x.new_zeros([t, self.h, self.dv], (x.kind(), x.device()));
                if let Some(g) = &plan.batched {
                    let rows = g.q_rows.as_ref().expect("non-identity group");
                    let o = self.attend_batched(
                        g,
                        &q_nope.index_select(0, rows),
                        &q_pe.index_select(0, rows),
                        cache,
                    );
                    let o = o
                        .index_select(0, g.out_slots.as_ref().expect("non-identity group"))
                        .to_kind(x.kind());
                    let _ = out.index_copy_(0, g.out_rows.as_ref().expect("non-identity group"), &o);
                }
                if let Some(rows) = &plan.paged_rows {
                    let o = self.attend_paged(
                        plan,
                        &q_nope.index_select(0, rows),
                        &q_pe.index_select(0, rows),
                        cache,
                    );
                    let _ = out.index_copy_(0, rows, &o.to_kind(x.kind()));
                }
                for s in &plan.solo {
                    let o = self.attend_solo(
                        s,
                        &q_nope.narrow(0, s.row_start, s.new),
                        &q_pe.narrow(0, s.row_start, s.new),
                        cache,
                    );
                    out.narrow(0, s.row_start, s.new).copy_(&o);
                }
                out
            }
        }
    }

    /// The precision the score/softmax/value products are computed in: f32 on the CPU (libtorch's
    /// CPU bf16 batched products are several times slower), the activation dtype elsewhere. Results
    /// are rounded to the activation dtype after each product (see [`round_to`]) so that bf16 runs
    /// keep bf16 numerics wherever they compute.
    fn core_kind(&self, kind: Kind) -> Kind {
        if self.w_uv.device() == Device::Cpu {
            Kind::Float
        } else {
            kind
        }
    }

    /// Per-head `x[:, h, :] · w[h]ᵀ` for `x [n, h, in]`: `[n, h, out]`.
    fn per_head(&self, x: &Tensor, w: &HeadWeights) -> Tensor {
        let xh = x.transpose(0, 1).contiguous();
        if kernels::use_for(&xh.get(0), &w.head(0)) {
            let heads: Vec<(Tensor, Weight)> = (0..self.h).map(|i| (xh.get(i), w.head(i))).collect();
            let pairs: Vec<(&Tensor, &Weight)> = heads.iter().map(|(a, b)| (a, b)).collect();
            return Tensor::stack(&kernels::grouped_linear(&pairs), 1);
        }
        xh.bmm(&w.dense(xh.kind()).transpose(1, 2)).transpose(0, 1)
    }

    /// `q_nope [n, h, dn]` folded through `W_UK` into latent space, joined with `q_pe`: `[n, h, rkv+dr]`.
    fn absorb_query(&self, q_nope: &Tensor, q_pe: &Tensor) -> Tensor {
        let act = q_nope.kind();
        let core = self.core_kind(act);
        let q_abs = round_to(self.per_head(&q_nope.to_kind(core), &self.w_uk_t), act);
        Tensor::cat(&[q_abs, q_pe.to_kind(core)], 2)
    }

    /// Latent attention output `o_lat [n, h, rkv]` mapped through `W_UV`: `[n, h, dv]`.
    fn absorb_output(&self, o_lat: &Tensor) -> Tensor {
        self.per_head(o_lat, &self.w_uv)
    }

    /// Padded batch in absorbed form; returns `[b * s_max, h, dv]` in padded-slot order.
    fn attend_batched(&self, g: &BatchedGroup, q_nope: &Tensor, q_pe: &Tensor, cache: &Tensor) -> Tensor {
        let act = q_nope.kind();
        // qc comes in the core precision (absorb_query).
        let p1 = profile::section("core.absorb_q");
        let qc = self.absorb_query(q_nope, q_pe).reshape([g.b, g.s_max * self.h, self.rkv + self.dr]);
        drop(p1);
        let p1 = profile::section("core.gather");
        let ctx = cache
            .index_select(0, &g.ctx_slots.view([-1]))
            .view([g.b, g.t_max, self.rkv + self.dr])
            .to_kind(qc.kind());
        drop(p1);
        let p1 = profile::section("core.scores");
        let scores = round_to(round_to(qc.bmm(&ctx.transpose(1, 2)), act) * self.scale, act)
            .view([g.b, g.s_max, self.h, g.t_max])
            .masked_fill(&g.allowed.logical_not(), f64::NEG_INFINITY);
        let p = round_to(scores.softmax(-1, Kind::Float), act).to_kind(qc.kind());
        let o_lat = p.view([g.b, g.s_max * self.h, g.t_max]).bmm(&ctx.narrow(2, 0, self.rkv));
        drop(p1);
        let _p1 = profile::section("core.absorb_out");
        self.absorb_output(&round_to(o_lat, act).view([g.b * g.s_max, self.h, self.rkv]))
    }

    /// Short chunks through the paged CPU kernel (each sequence over its own slots): `[n, h, dv]`
    /// for the paged rows `q_nope [n, h, dn]`, `q_pe [n, h, dr]`.
    fn attend_paged(&self, plan: &StepPlan, q_nope: &Tensor, q_pe: &Tensor, cache: &Tensor) -> Tensor {
        let _p = profile::section("core.paged");
        kernels::prefetch(&[self.o.weight()]);
        mla_kernels::mla_decode(q_nope, q_pe, &self.core_inputs(plan, cache))
    }

    /// A step of decode rows only (every row paged): the core straight from the query projection's
    /// output `q [T, h · (dn + dr)]` (see [`mla_kernels::mla_decode_q`]), `[T, h · dv]`; None for
    /// other steps, or tensors the kernels do not take.
    fn attend_paged_q(&self, plan: &StepPlan, q: &Tensor, cache: &Tensor) -> Option<Tensor> {
        if plan.batched.is_some() || plan.paged.is_empty() || plan.paged_rows.is_some() {
            return None;
        }
        let _p = profile::section("core.paged");
        kernels::prefetch(&[self.o.weight()]);
        let dims = (self.h, self.dn, self.dr);
        mla_kernels::mla_decode_q(q, (&plan.cos, &plan.sin), dims, &self.core_inputs(plan, cache))
    }

    fn core_inputs<'a>(&'a self, plan: &'a StepPlan, cache: &'a Tensor) -> mla_kernels::CoreInputs<'a> {
        mla_kernels::CoreInputs {
            cache,
            w_uk_t: &self.w_uk_t,
            w_uv: &self.w_uv,
            seqs: &plan.paged,
            scale: self.scale,
        }
    }

    /// Softmax probabilities from raw scores (f32 rows over all `tc` keys; `visible(row)` keys
    /// allowed), scaled and rounded as computing in `act` would: one row kernel pass on the CPU,
    /// else the tensor form with `mask()` (true = hidden) broadcast against `shape`.
    fn probabilities(
        &self,
        scores: Tensor,
        visible: &(dyn Fn(usize) -> usize + Sync),
        act: Kind,
        mask: impl FnOnce() -> Tensor,
        shape: [i64; 3],
    ) -> Tensor {
        if scores.device() == Device::Cpu && scores.kind() == Kind::Float && act != Kind::Double {
            let s = scores.contiguous();
            // SAFETY: a contiguous f32 CPU tensor, viewed once while `s` lives.
            let v = unsafe { std::slice::from_raw_parts_mut(s.data_ptr() as *mut f32, s.numel()) };
            mlaserve_kernels::rows::causal_softmax(
                v,
                shape[2] as usize,
                visible,
                self.scale as f32,
                act == Kind::BFloat16,
            );
            return s.view(shape);
        }
        let scores = round_to(round_to(scores, act) * self.scale, act)
            .view(shape)
            .masked_fill(&mask(), f64::NEG_INFINITY);
        round_to(scores.softmax(-1, Kind::Float), act)
    }

    /// One long chunk: `[new, h, dv]`, queries tiled so scores stay bounded in memory.
    fn attend_solo(&self, s: &SoloSeq, q_nope: &Tensor, q_pe: &Tensor, cache: &Tensor) -> Tensor {
        let n = s.new;
        let tc = s.cached + n;
        let act = q_nope.kind();
        let (h, rkv, dn, dr, dv) = (self.h, self.rkv, self.dn, self.dr, self.dv);
        // Only chunks whose score matrix is large: for short prefills (a few dozen tokens) a second
        // libtorch thread costs its wake-up on every op and saves nothing.
        let _threads =
            kernels::LibtorchThreads::widen(cache.device() == Device::Cpu && h * n * tc >= 1 << 20);
        let rows = cache.index_select(0, &s.ctx_slots);
        // Expanded on the CPU: the kernels take the latent rows in the activations' precision.
        let on_kernels = cache.device() == Device::Cpu && act != Kind::Double;
        // Multiply-adds of each form (see the model notes on the absorbed/expanded trade-off).
        let absorbed = h * n * (dn + dv) * rkv + h * n * tc * (2 * rkv + dr);
        let expanded = tc * rkv * h * (dn + dv) + h * n * tc * (dn + dr + dv);
        let tile = (SCORE_TILE_ELEMS / (h * tc)).clamp(1, n);
        let key_pos = Tensor::arange(tc, (Kind::Int64, cache.device()));
        let mask_for = |q0: i64, len: i64| {
            // Query i (absolute cache index cached + q0 + i) sees keys 0..=cached + q0 + i.
            let q_pos =
                Tensor::arange_start(s.cached + q0, s.cached + q0 + len, (Kind::Int64, cache.device()));
            key_pos.unsqueeze(0).gt_tensor(&q_pos.unsqueeze(1))
        };
        let mut outs = Vec::new();
        let use_absorbed = match self.prefill {
            PrefillForm::Auto => absorbed <= expanded,
            PrefillForm::Absorbed => true,
            PrefillForm::Expanded => false,
        };
        if use_absorbed {
            let ctx = rows.to_kind(self.core_kind(act));
            let qc = self.absorb_query(q_nope, q_pe);
            let kt = ctx.transpose(0, 1);
            let c = ctx.narrow(1, 0, rkv);
            let mut q0 = 0;
            while q0 < n {
                let len = tile.min(n - q0);
                let scores = qc.narrow(0, q0, len).reshape([len * h, rkv + dr]).mm(&kt);
                // Rows are (query, head): query i sees keys 0..=cached + q0 + i.
                let (base, heads) = ((s.cached + q0) as usize, h as usize);
                let visible = move |row: usize| base + row / heads + 1;
                let p = self.probabilities(
                    scores,
                    &visible,
                    act,
                    || mask_for(q0, len).unsqueeze(1),
                    [len, h, tc],
                );
                let p = p.to_kind(qc.kind());
                let o_lat = round_to(p.view([len * h, tc]).mm(&c), act).view([len, h, rkv]);
                outs.push(self.absorb_output(&o_lat));
                q0 += len;
            }
        } else if on_kernels {
            self.expanded_on_kernels(s, q_nope, q_pe, &rows, tile, &mut outs);
        } else {
            let ctx = rows.to_kind(self.core_kind(act));
            let p1 = profile::section("solo.expand");
            let c = ctx.narrow(1, 0, rkv);
            let core = ctx.kind();
            let k_nope = match &self.w_uk {
                Some(w) => round_to(forward_weight(&c, w), act).view([tc, h, dn]),
                None => round_to(c.matmul(&self.w_uk_t.dense(core)), act).permute([1, 0, 2]),
            }; // [tc, h, dn]
            let v = round_to(forward_weight(&c, &self.w_uv.w), act).view([tc, h, dv]).permute([1, 0, 2]);
            let k_pe = ctx.narrow(1, rkv, dr).unsqueeze(1).expand([tc, h, dr], false);
            let k = Tensor::cat(&[k_nope, k_pe], 2).permute([1, 2, 0]); // [h, dn+dr, tc]
            let q = Tensor::cat(&[q_nope.to_kind(core), q_pe.to_kind(core)], 2).transpose(0, 1); // [h, n, dn+dr]
            drop(p1);
            let mut q0 = 0;
            while q0 < n {
                let len = tile.min(n - q0);
                let p1 = profile::section("solo.scores");
                let scores = q.narrow(1, q0, len).bmm(&k);
                drop(p1);
                let p1 = profile::section("solo.softmax");
                // Rows are (head, query).
                let (base, per_head) = ((s.cached + q0) as usize, len as usize);
                let visible = move |row: usize| base + row % per_head + 1;
                let p = self.probabilities(
                    scores,
                    &visible,
                    act,
                    || mask_for(q0, len).unsqueeze(0),
                    [h, len, tc],
                );
                let p = p.to_kind(q.kind());
                drop(p1);
                let _p1 = profile::section("solo.pv");
                outs.push(round_to(p.bmm(&v), act).transpose(0, 1));
                q0 += len;
            }
        }
        Tensor::cat(&outs, 0).to_kind(q_nope.kind())
    }

    /// The expanded form on the CPU: keys and values expanded from the latent rows by the kernels
    /// in the activations' precision (each product rounded once, as the f32 form's `round_to`),
    /// then per head the score and value products. Pushes `[len, h, dv]` per query tile onto
    /// `outs`.
    fn expanded_on_kernels(
        &self,
        s: &SoloSeq,
        q_nope: &Tensor,
        q_pe: &Tensor,
        rows: &Tensor,
        tile: i64,
        outs: &mut Vec<Tensor>,
    ) {
        let (n, tc, h, rkv, dn, dr, dv) =
            (s.new, s.cached + s.new, self.h, self.rkv, self.dn, self.dr, self.dv);
        let act = q_nope.kind();
        let kind = if act == Kind::BFloat16 { Kind::BFloat16 } else { Kind::Float };
        let p1 = profile::section("solo.expand");
        let lat = rows.to_kind(kind);
        let c = lat.narrow(1, 0, rkv);
        // Products in `kind` round their outputs as `round_to(.., act)` of the f32 form does.
        let k_nope = match &self.w_uk {
            Some(w) => forward_weight(&c, w).view([tc, h, dn]),
            None => torch_bf16::product(&c, &self.w_uk_t.dense(kind), |a, b| a.matmul(b)).permute([1, 0, 2]),
        };
        let k_pe = lat.narrow(1, rkv, dr).unsqueeze(1).expand([tc, h, dr], false);
        let keys = Tensor::cat(&[k_nope, k_pe], 2).transpose(0, 1).contiguous(); // [h, tc, dn+dr]
        let vt = forward_weight(&c, &self.w_uv.w).view([tc, h, dv]).permute([1, 2, 0]).contiguous(); // [h, dv, tc]
        let q = Tensor::cat(&[q_nope, q_pe], 2).to_kind(kind).transpose(0, 1).contiguous(); // [h, n, dn+dr]

        // `a[i] · b[i]ᵀ` for each head i, f32 `[h, m, n]`. bf16: libtorch's bf16 `bmm`, whose
        // output rounding is the f32 form's `round_to` (oneDNN measured 2-3x the kernels on these
        // shapes on Zen 4, whose reduction, dn + dr = 192 for scores, is too short for the
        // kernels' tiles; without oneDNN's bf16, MKL's sgemm: see `torch_bf16`). f32: the
        // kernels, exact.
        let per_head = |a: &Tensor, b: &Tensor| -> Tensor {
            if kind == Kind::BFloat16 {
                // The kernels' helpers park rather than spin beside libtorch's threads.
                kernels::pool::global().rest();
                return torch_bf16::product(a, b, |a, b| a.bmm(&b.transpose(1, 2))).to_kind(Kind::Float);
            }
            let heads: Vec<(Tensor, Weight)> = (0..h).map(|i| (a.get(i), Weight::Dense(b.get(i)))).collect();
            let pairs: Vec<(&Tensor, &Weight)> = heads.iter().map(|(x, w)| (x, w)).collect();
            let out = Tensor::empty([h, a.size()[1], b.size()[1]], (Kind::Float, Device::Cpu));
            kernels::grouped_linear_into(&pairs, &out);
            out
        };
        drop(p1);
        let mut q0 = 0;
        while q0 < n {
            let len = tile.min(n - q0);
            let p1 = profile::section("solo.scores");
            let scores = per_head(&q.narrow(1, q0, len), &keys);
            drop(p1);
            let p1 = profile::section("solo.softmax");
            // Rows are (head, query): query i sees keys 0..=cached + q0 + i.
            let (base, queries) = ((s.cached + q0) as usize, len as usize);
            let visible = move |row: usize| base + row % queries + 1;
            let no_mask = || unreachable!("the CPU softmax takes `visible`");
            let p = self.probabilities(scores, &visible, act, no_mask, [h, len, tc]).to_kind(kind);
            drop(p1);
            let _p1 = profile::section("solo.pv");
            outs.push(round_to(per_head(&p, &vt), act).transpose(0, 1));
            q0 += len;
        }
    }
}

/// Rounds an f32 intermediate to the activation precision `act` (kept in f32), as computing that
/// product in `act` would; a no-op for f32 activations.
fn round_to(t: Tensor, act: Kind) -> Tensor {
    if t.kind() == Kind::Float && act != Kind::Float {
        t.to_kind(act).to_kind(Kind::Float)
    } else {
        t
    }
}
