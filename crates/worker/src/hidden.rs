//! Hidden states on the wire: raw little-endian bf16 or f32 bytes, no per-element encoding.

use mlaserve_proto::internal::v1::{Dtype as WireDType, HiddenStates};
use tch::{Kind, Tensor};

use crate::error::StageError;

pub fn encode(t: &Tensor) -> HiddenStates {
    let t = t.contiguous();
    let size = t.size();
    let (kind, dtype) = match t.kind() {
        Kind::BFloat16 => (Kind::BFloat16, WireDType::Bf16),
        _ => (Kind::Float, WireDType::F32),
    };
    let t = t.to_kind(kind).to_device(tch::Device::Cpu);
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.copy_data_u8(&mut data, numel);
    HiddenStates { rows: size[0] as u32, cols: size[1] as u32, dtype: dtype as i32, data }
}

pub fn decode(h: &HiddenStates, expect_rows: usize, expect_cols: usize) -> Result<Tensor, StageError> {
    let kind = match WireDType::try_from(h.dtype) {
        Ok(WireDType::Bf16) => Kind::BFloat16,
        Ok(WireDType::F32) => Kind::Float,
        _ => return Err(StageError::invalid(format!("hidden states have unknown dtype {}", h.dtype))),
    };
    if h.rows as usize != expect_rows || h.cols as usize != expect_cols {
        return Err(StageError::invalid(format!(
            "hidden states are [{}, {}], expected [{expect_rows}, {expect_cols}]",
            h.rows, h.cols
        )));
    }
    let want = expect_rows * expect_cols * kind.elt_size_in_bytes();
    if h.data.len() != want {
        return Err(StageError::invalid(format!(
            "hidden states carry {} bytes, expected {want} for [{}, {}] {kind:?}",
            h.data.len(),
            h.rows,
            h.cols
        )));
    }
    Ok(Tensor::f_from_data_size(&h.data, &[h.rows as i64, h.cols as i64], kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_both_dtypes() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let t = Tensor::randn([3, 5], (kind, tch::Device::Cpu));
            let h = encode(&t);
            assert_eq!(h.data.len(), 15 * kind.elt_size_in_bytes());
            let back = decode(&h, 3, 5).unwrap();
            assert!(back.equal(&t));
            assert!(decode(&h, 2, 5).is_err());
        }
    }
}
