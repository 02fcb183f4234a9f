//! Rotary embedding with YaRN frequencies.
//!
//! DeepSeek checkpoints pair rotary dimensions interleaved, (x[2i], x[2i+1]). At load time the rows of
//! the projections that produce q_pe and k_pe are permuted to [evens, odds] (see
//! [`rope_row_permutation`]), so the forward always rotates contiguous halves. The same permutation
//! on queries and keys leaves every attention score unchanged; only the internal cache layout of the
//! rotated key differs from the checkpoint's.

use mlaserve_core::{ModelConfig, RopeLayout};
use tch::{Device, Kind, Tensor};

pub struct Rope {
    inv_freq: Tensor,
    attention_factor: f64,
}

impl Rope {
    pub fn new(config: &ModelConfig, device: Device) -> Self {
        Rope {
            inv_freq: Tensor::from_slice(&config.rope_inv_freq()).to_device(device),
            attention_factor: config.rope_attention_factor(),
        }
    }

    /// cos and sin `[T, dr/2]` for absolute positions `[T]`, angles computed in f32, cast to `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.unsqueeze(0);
        let cos = freqs.cos() * self.attention_factor;
        let sin = freqs.sin() * self.attention_factor;
        (cos.to_kind(kind), sin.to_kind(kind))
    }
}

/// [`apply`] for `x [T, dr]` or `[T, h, dr]` with `cos`/`sin [T, dr/2]`: on the CPU one row kernel
/// call (`kernels::rope`), elsewhere the tensor form.
pub fn apply_rows(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    if let Some(y) = crate::kernels::rope(x, cos, sin) {
        return y;
    }
    if x.dim() == 3 {
        apply(x, &cos.unsqueeze(1), &sin.unsqueeze(1))
    } else {
        apply(x, cos, sin)
    }
}

/// Rotates `x [..., dr]` laid out as [first halves of the pairs; second halves]; `cos`/`sin` must
/// broadcast against `x[..., :dr/2]`.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x1 * cos - &x2 * sin, &x2 * cos + &x1 * sin], -1)
}

/// Row order that turns interleaved rotary pairs into halves: [0, 2, 4, ..., 1, 3, 5, ...].
pub fn rope_row_permutation(dr: usize, layout: RopeLayout) -> Option<Vec<i64>> {
    match layout {
        RopeLayout::Half => None,
        RopeLayout::Interleaved => Some((0..dr as i64).step_by(2).chain((1..dr as i64).step_by(2)).collect()),
    }
}

/// Applies [`rope_row_permutation`] to the rotary rows of a projection weight whose rows come in
/// `groups` blocks of `block` rows, the rotary part being the last `dr` rows of each block.
pub fn permute_rope_rows(w: &Tensor, groups: i64, block: i64, dr: i64, layout: RopeLayout) -> Tensor {
    let Some(perm) = rope_row_permutation(dr as usize, layout) else {
        return w.shallow_clone();
    };
    let cols = w.size()[1];
    let wv = w.view([groups, block, cols]);
    let nope = wv.narrow(1, 0, block - dr);
    let rope = wv.narrow(1, block - dr, dr).index_select(1, &Tensor::from_slice(&perm).to_device(w.device()));
    Tensor::cat(&[nope, rope], 1).reshape([groups * block, cols])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotating permuted vectors and then undoing the permutation equals the interleaved formula.
    #[test]
    fn permuted_half_rotation_equals_interleaved() {
        let dr = 8i64;
        let x = Tensor::randn([3, dr], (Kind::Double, Device::Cpu));
        let ang = Tensor::randn([3, dr / 2], (Kind::Double, Device::Cpu));
        let (cos, sin) = (ang.cos(), ang.sin());
        let perm = Tensor::from_slice(&rope_row_permutation(dr as usize, RopeLayout::Interleaved).unwrap());
        let y = apply(&x.index_select(1, &perm), &cos, &sin);
        // Interleaved reference: y[2i] = x0 c - x1 s, y[2i+1] = x0 s + x1 c.
        let xv = x.view([3, dr / 2, 2]);
        let (x0, x1) = (xv.select(2, 0), xv.select(2, 1));
        let r = Tensor::stack(&[&x0 * &cos - &x1 * &sin, &x0 * &sin + &x1 * &cos], 2).view([3, dr]);
        let diff = (y - r.index_select(1, &perm)).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn permute_rows_moves_only_rotary_rows() {
        let w = Tensor::arange(2 * 6, (Kind::Float, Device::Cpu)).view([12, 1]);
        let p = permute_rope_rows(&w, 2, 6, 4, RopeLayout::Interleaved);
        let v: Vec<f32> = Vec::try_from(p.flatten(0, 1)).unwrap();
        assert_eq!(v, vec![0., 1., 2., 4., 3., 5., 6., 7., 8., 10., 9., 11.]);
    }
}
