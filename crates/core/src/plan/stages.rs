//! The pipeline split: each decoder layer's share of decode cost and the cost-balanced contiguous
//! stage ranges that `serve` uses and `mlaserve plan` reports.

use crate::model_config::ModelConfig;

impl ModelConfig {
    /// Weights read per token by decoder layer `layer` (attention plus the dense MLP, or the routed
    /// experts a token uses plus the shared ones): a layer's share of decode cost.
    pub fn active_params(&self, layer: usize) -> u64 {
        let (h, nh) = (self.hidden_size as u64, self.num_attention_heads as u64);
        let qk = self.qk_head_dim() as u64;
        let q = match self.q_lora_rank {
            Some(rq) => h * rq as u64 + rq as u64 * nh * qk,
            None => h * nh * qk,
        };
        let (rkv, dr) = (self.kv_lora_rank as u64, self.qk_rope_head_dim as u64);
        let (dn, dv) = (self.qk_nope_head_dim as u64, self.v_head_dim as u64);
        let attn = q + h * (rkv + dr) + rkv * nh * (dn + dv) + nh * dv * h;
        let ffn = if self.is_moe_layer(layer) {
            let experts = (self.num_experts_per_tok + self.n_shared_experts) as u64;
            experts * 3 * h * self.moe_intermediate_size as u64 + h * self.n_routed_experts as u64
        } else {
            3 * h * self.intermediate_size as u64
        };
        attn + ffn
    }

    /// Splits the layers into `stages` contiguous ranges of near-equal decode cost, the last stage
    /// also paying for lm_head. Returns None when there are more stages than layers.
    pub fn balanced_stages(&self, stages: usize) -> Option<Vec<std::ops::Range<usize>>> {
        let n = self.num_hidden_layers;
        if stages == 0 || stages > n {
            return None;
        }
        let head = (self.hidden_size * self.vocab_size) as u64;
        let cost: Vec<u64> = (0..n).map(|l| self.active_params(l)).collect();
        let mut prefix = vec![0u64; n + 1];
        for i in 0..n {
            prefix[i + 1] = prefix[i] + cost[i];
        }
        let seg = |a: usize, b: usize| prefix[b] - prefix[a] + if b == n { head } else { 0 };
        // best[p][i]: the smallest possible maximum stage cost for layers 0..i in p stages.
        let mut best = vec![vec![u64::MAX; n + 1]; stages + 1];
        let mut cut = vec![vec![0usize; n + 1]; stages + 1];
        best[0][0] = 0;
        for p in 1..=stages {
            for i in p..=n {
                for j in (p - 1)..i {
                    if best[p - 1][j] == u64::MAX {
                        continue;
                    }
                    let c = best[p - 1][j].max(seg(j, i));
                    if c < best[p][i] {
                        best[p][i] = c;
                        cut[p][i] = j;
                    }
                }
            }
        }
        let mut ranges = Vec::with_capacity(stages);
        let mut end = n;
        for p in (1..=stages).rev() {
            let start = cut[p][end];
            ranges.push(start..end);
            end = start;
        }
        ranges.reverse();
        Some(ranges)
    }
}

#[cfg(test)]
mod tests {
    use crate::model_config::ModelConfig;
    use crate::test_configs::V3;

    #[test]
    fn balanced_stages_cover_every_layer_and_spare_the_last() {
        let c = ModelConfig::from_json_str(V3).unwrap();
        for p in [1, 2, 4, 8, 61] {
            let r = c.balanced_stages(p).unwrap();
            assert_eq!(r.len(), p);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[p - 1].end, 61);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
        }
        // lm_head (129280 x 7168) weighs like ~10 MoE layers' active weights: the last stage gets fewer.
        let r = c.balanced_stages(8).unwrap();
        assert!(r[7].len() < r[3].len(), "{r:?}");
        assert!(c.balanced_stages(62).is_none());
    }
}
