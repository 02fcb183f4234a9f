//! Rotary embedding with YaRN frequencies.
//!
//! DeepSeek checkpoints pair rotary dimensions interleaved, (x[2i], x[2i+1]). At load time the rows of
//! the projections that produce q_pe and k_pe are permuted to [evens, odds] (see
//! [`rope_row_permutation`]), so the forward always rotates contiguous halves. The same permutation
//! on queries and keys leaves every attention score unchanged; only the internal cache layout of the
//! rotated key differs from the checkpoint's.

use mlaserve_core::{ModelConfig, RopeLayout};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

pub struct Rope {
    inv_freq: Tensor,
    attention_factor: f64,
    /// On the CPU: f32 cos and sin rows of blocks of [`TABLE_BLOCK`] positions, computed by the
    /// tensor form once per block (a decode step's ~10 small ops cost ~75 µs here).
    tables: Mutex<HashMap<usize, Arc<Table>>>,
}

/// One block's cos and sin rows, f32, `[TABLE_BLOCK, dr/2]` each.
type Table = (Vec<f32>, Vec<f32>);

/// Positions per cached block of rotary tables (256 KB per block at DeepSeek's 32 frequencies).
const TABLE_BLOCK: usize = 1024;
/// Blocks kept before the cache starts over (32 MB at most).
const TABLE_BLOCKS_MAX: usize = 128;

impl Rope {
    pub fn new(config: &ModelConfig, device: Device) -> Self {
        Rope {
            inv_freq: Tensor::from_slice(&config.rope_inv_freq()).to_device(device),
            attention_factor: config.rope_attention_factor(),
            tables: Mutex::new(HashMap::new()),
        }
    }

    /// [`Rope::cos_sin`] for host `positions`: on the CPU from the cached tables (the same values:
    /// the tensor form is elementwise), elsewhere the tensor form on the device.
    pub fn cos_sin_of(&self, positions: &[i64], kind: Kind) -> (Tensor, Tensor) {
        let device = self.inv_freq.device();
        if device != Device::Cpu || positions.iter().any(|&p| p < 0) {
            return self.cos_sin(&Tensor::from_slice(positions).to_device(device), kind);
        }
        let half = self.inv_freq.numel();
        let (mut cos, mut sin) =
            (Vec::with_capacity(positions.len() * half), Vec::with_capacity(positions.len() * half));
        for &p in positions {
            let (block, row) = (p as usize / TABLE_BLOCK, p as usize % TABLE_BLOCK);
            let t = self.table(block);
            cos.extend_from_slice(&t.0[row * half..(row + 1) * half]);
            sin.extend_from_slice(&t.1[row * half..(row + 1) * half]);
        }
        let shape = [positions.len() as i64, half as i64];
        match kind {
            // One fresh tensor each, filled here: a decode step's first libtorch calls are cold
            // (a copy, a view and a cast each cost ~65 µs a step).
            Kind::Float | Kind::BFloat16 => (host_tensor(&cos, shape, kind), host_tensor(&sin, shape, kind)),
            _ => {
                let (c, s) = (Tensor::from_slice(&cos).view(shape), Tensor::from_slice(&sin).view(shape));
                (c.to_kind(kind), s.to_kind(kind))
            }
        }
    }

    fn table(&self, block: usize) -> Arc<Table> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tables.get(&block) {
            return t.clone();
        }
        if tables.len() >= TABLE_BLOCKS_MAX {
            tables.clear();
        }
        let start = (block * TABLE_BLOCK) as i64;
        let (c, s) = self.cos_sin(
            &Tensor::arange_start(start, start + TABLE_BLOCK as i64, (Kind::Int64, Device::Cpu)),
            Kind::Float,
        );
        let t = Arc::new((
            Vec::try_from(c.view([-1])).expect("f32 cos"),
            Vec::try_from(s.view([-1])).expect("f32 sin"),
        ));
        tables.insert(block, t.clone());
        t
    }

    /// cos and sin `[T, dr/2]` for absolute positions `[T]`, angles computed in f32, cast to `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.unsqueeze(0);
        let cos = freqs.cos() * self.attention_factor;
        let sin = freqs.sin() * self.attention_factor;
        (cos.to_kind(kind), sin.to_kind(kind))
    }
}

/// `values` as a fresh CPU tensor of `shape` in `kind` (f32, or bf16 rounded to nearest even as
/// libtorch's cast rounds).
fn host_tensor(values: &[f32], shape: [i64; 2], kind: Kind) -> Tensor {
    if kind == Kind::BFloat16 {
        return crate::kernels::bf16_tensor(values, &shape);
    }
    let t = Tensor::empty(shape, (Kind::Float, Device::Cpu));
    assert_eq!(t.numel(), values.len());
    // SAFETY: a fresh contiguous f32 tensor of values.len() elements, viewed once.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, values.len()) }.copy_from_slice(values);
    t
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

    /// The cached host tables give the tensor form's cos and sin bitwise, in f32 and bf16, for
    /// positions in several blocks, repeated and out of order.
    #[test]
    fn host_tables_equal_the_tensor_form() {
        let inv: Vec<f32> = (0..32).map(|i| 10000f32.powf(-(i as f32) / 32.0) * 0.9).collect();
        let r = Rope {
            inv_freq: Tensor::from_slice(&inv),
            attention_factor: 1.37,
            tables: Mutex::new(HashMap::new()),
        };
        let positions = [0i64, 5, 1023, 1024, 70_001, 5, 163_839, 2047];
        for kind in [Kind::Float, Kind::BFloat16] {
            let (c, s) = r.cos_sin_of(&positions, kind);
            let (wc, ws) = r.cos_sin(&Tensor::from_slice(&positions), kind);
            assert_eq!(c.kind(), kind);
            assert!(c.equal(&wc) && s.equal(&ws), "{kind:?}");
        }
        assert_eq!(r.tables.lock().unwrap().len(), 4, "blocks 0, 1, 68 and 159");
    }

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
