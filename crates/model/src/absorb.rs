//! The two halves of `kv_b_proj` as the absorbed attention uses them, per head: `W_UKᵀ`
//! (`[rkv, dn]` a head, folding the query into latent space) and `W_UV` (`[dv, rkv]` a head, mapping
//! the latent output back). Each is held as one weight of `heads × out` rows in the checkpoint's
//! format: FP8 stays FP8 when every head starts on a block row (`dn` and `dv` multiples of the
//! block height, as in DeepSeek-V3's 128 × 128). Transposing `W_UK` then moves whole blocks, each
//! with its one scale, so the FP8 values and scales are exactly the stored ones.

use tch::{Device, Kind, Tensor};

use crate::linear::Weight;

pub struct HeadWeights {
    /// `[heads · out, in]`; for FP8 the scale grid is each head's `[ceil(out / bo), ceil(in / bi)]`
    /// after the previous head's.
    pub w: Weight,
    pub heads: i64,
    pub out: i64,
}

impl HeadWeights {
    /// `(W_UKᵀ, W_UV, W_UK)` from `kv_b [heads · (dn + dv), rkv]`. Dense weights are split and
    /// transposed as they are; FP8 whose blocks straddle heads, or on a GPU, is dequantised into
    /// `kind` first. FP8 also keeps `W_UK` untransposed (`[heads · dn, rkv]`, a quarter of kv_b's
    /// bf16 bytes) for the expanded prefill's keys, which would otherwise dequantise `W_UKᵀ` per
    /// chunk and layer (~4 ms a layer on the benchmark shape).
    pub fn split_kv_b(
        kv_b: Weight,
        heads: i64,
        dn: i64,
        dv: i64,
        kind: Kind,
    ) -> (HeadWeights, HeadWeights, Option<Weight>) {
        let rkv = kv_b.size()[1];
        let kv_b = match kv_b {
            // Off the CPU the tensor forms want one dtype (as everywhere on a GPU, see
            // `LoadCtx::matrix`'s notes): dequantised once here, not per product.
            Weight::Fp8 { block, .. }
                if dn % block.0 as i64 != 0 || dv % block.0 as i64 != 0 || kv_b.device() != Device::Cpu =>
            {
                Weight::Dense(kv_b.to_dense(kind))
            }
            w => w,
        };
        let (uk_t, uv, uk) = match kv_b {
            Weight::Dense(t) => {
                let t = t.view([heads, dn + dv, rkv]);
                (
                    Weight::Dense(t.narrow(1, 0, dn).transpose(1, 2).contiguous().view([heads * rkv, dn])),
                    Weight::Dense(t.narrow(1, dn, dv).contiguous().view([heads * dv, rkv])),
                    None,
                )
            }
            Weight::Fp8 { q, scale, block: (bo, bi) } => {
                // Bytes moved as u8: the same codes, whatever libtorch's float8 copy kernels do.
                let q = q.view_dtype(Kind::Uint8).view([heads, dn + dv, rkv]);
                let (ro, cols) = ((dn + dv) / bo as i64, scale.size()[1]);
                let s = scale.view([heads, ro, cols]);
                let (uk_rows, uv_rows) = (dn / bo as i64, dv / bo as i64);
                let fp8 = |q: Tensor, scale: Tensor, block| Weight::Fp8 {
                    q: q.view_dtype(Kind::Float8e4m3fn),
                    scale,
                    block,
                };
                (
                    fp8(
                        q.narrow(1, 0, dn).transpose(1, 2).contiguous().view([heads * rkv, dn]),
                        s.narrow(1, 0, uk_rows).transpose(1, 2).contiguous().view([heads * cols, uk_rows]),
                        (bi, bo),
                    ),
                    fp8(
                        q.narrow(1, dn, dv).contiguous().view([heads * dv, rkv]),
                        s.narrow(1, uk_rows, uv_rows).contiguous().view([heads * uv_rows, cols]),
                        (bo, bi),
                    ),
                    Some(fp8(
                        q.narrow(1, 0, dn).contiguous().view([heads * dn, rkv]),
                        s.narrow(1, 0, uk_rows).contiguous().view([heads * uk_rows, cols]),
                        (bo, bi),
                    )),
                )
            }
        };
        (HeadWeights { w: uk_t, heads, out: rkv }, HeadWeights { w: uv, heads, out: dv }, uk)
    }

    pub fn device(&self) -> Device {
        self.w.device()
    }

    /// Head `i`'s `[out, in]` matrix (a view of the same storage).
    pub fn head(&self, i: i64) -> Weight {
        match &self.w {
            Weight::Dense(t) => Weight::Dense(t.narrow(0, i * self.out, self.out)),
            Weight::Fp8 { q, scale, block } => {
                let grid = (self.out + block.0 as i64 - 1) / block.0 as i64;
                Weight::Fp8 {
                    q: q.narrow(0, i * self.out, self.out),
                    scale: scale.narrow(0, i * grid, grid),
                    block: *block,
                }
            }
        }
    }

    /// All heads as one `[heads, out, in]` tensor of `kind` (FP8 dequantised, exactly in f32 first):
    /// for the tensor forms (other devices, float64 tests, the expanded prefill).
    pub fn dense(&self, kind: Kind) -> Tensor {
        let t = match &self.w {
            Weight::Dense(t) => t.to_kind(kind),
            Weight::Fp8 { .. } => {
                Tensor::cat(&(0..self.heads).map(|i| self.head(i).to_dense(kind)).collect::<Vec<_>>(), 0)
            }
        };
        t.view([self.heads, self.out, -1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::dequantize_fp8;

    /// FP8 kv_b split per head equals the split of its float64 dequantisation, exactly; a block
    /// height that straddles heads falls back to dense.
    #[test]
    fn fp8_split_equals_dense_split() {
        let (h, dn, dv, rkv) = (3i64, 4i64, 2i64, 6i64);
        let q = Tensor::randn([h * (dn + dv), rkv], (Kind::Float, Device::Cpu)).to_kind(Kind::Float8e4m3fn);
        for block in [(2usize, 4usize), (1, 3), (2, 6)] {
            let grid = [h * (dn + dv) / block.0 as i64, (rkv + block.1 as i64 - 1) / block.1 as i64];
            let scale = Tensor::rand(grid, (Kind::Float, Device::Cpu)) + 0.5;
            let w = Weight::Fp8 { q: q.shallow_clone(), scale: scale.shallow_clone(), block };
            let want = dequantize_fp8(&q, &scale, block.0, block.1).unwrap().to_kind(Kind::Double);
            let (uk, uv, rows) = HeadWeights::split_kv_b(w, h, dn, dv, Kind::Double);
            assert!(matches!(uk.w, Weight::Fp8 { .. }) && matches!(uv.w, Weight::Fp8 { .. }));
            // W_UK untransposed: row h·dn + i is W_UKᵀ's column i of head h.
            let rows = rows.expect("FP8 keeps W_UK").to_dense(Kind::Double).view([h, dn, rkv]);
            assert!(rows.equal(&uk.dense(Kind::Double).transpose(1, 2)), "block {block:?}");
            let (duk, duv, _) = HeadWeights::split_kv_b(Weight::Dense(want), h, dn, dv, Kind::Double);
            for (a, b) in [(&uk, &duk), (&uv, &duv)] {
                assert_eq!(a.dense(Kind::Double).size(), b.dense(Kind::Double).size());
                assert!(a.dense(Kind::Double).equal(&b.dense(Kind::Double)), "block {block:?}");
                for i in 0..h {
                    assert!(a.head(i).to_dense(Kind::Double).equal(&b.head(i).to_dense(Kind::Double)));
                }
            }
        }
        // Block height 4 does not divide dv = 2: dequantised.
        let scale = Tensor::ones([(h * (dn + dv) + 3) / 4, 1], (Kind::Float, Device::Cpu));
        let (uk, _, rows) =
            HeadWeights::split_kv_b(Weight::Fp8 { q, scale, block: (4, 8) }, h, dn, dv, Kind::Float);
        assert!(matches!(uk.w, Weight::Dense(_)) && rows.is_none());
    }
}
