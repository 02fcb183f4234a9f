//! Memory-mapped safetensors checkpoints (single file or sharded with an index), read tensor by tensor.
//!
//! tch cannot read F8_E4M3 safetensors, so files are parsed with the `safetensors` crate over a
//! `memmap2` mapping and each tensor is copied into libtorch memory in the requested precision. FP8
//! weights are dequantised with their `weight_scale_inv` block scales on the way in.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use mlaserve_core::Quantization;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::linear::Weight;

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

struct Entry {
    file: usize,
    info: TensorInfo,
}

pub struct Checkpoint {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
    quantization: Quantization,
    progress: Option<ProgressBar>,
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io { path: path.display().to_string(), source }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl Checkpoint {
    /// Maps `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path, quantization: Quantization) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| io_err(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                path: index_path.display().to_string(),
                message: e.to_string(),
            })?;
            let map =
                v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Checkpoint {
                    path: index_path.display().to_string(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                message: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut entries = HashMap::new();
        for name in file_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(|e| io_err(&path, e))?;
            // SAFETY: the checkpoint is treated as read-only for the life of the process; nothing here
            // writes to the mapping, and every access is bounds-checked against the parsed header.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::Checkpoint { path: path.display().to_string(), message: e.to_string() }
            })?;
            let file_idx = files.len();
            for (tname, info) in metadata.tensors() {
                entries.insert(tname, Entry { file: file_idx, info: info.clone() });
            }
            files.push(MappedFile { path, mmap, data_start: 8 + header_len });
        }
        Ok(Checkpoint { files, entries, quantization, progress: None })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.info.shape.as_slice())
    }

    /// Stored bytes of the tensors whose names satisfy `keep`, scales included.
    pub fn bytes_matching(&self, keep: impl Fn(&str) -> bool) -> u64 {
        self.entries
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(_, e)| (e.info.data_offsets.1 - e.info.data_offsets.0) as u64)
            .sum()
    }

    /// Shows a progress bar over `total_bytes` while tensors load (drawn only on a terminal).
    pub fn start_progress(&mut self, total_bytes: u64, label: &str) {
        let pb = ProgressBar::new(total_bytes);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_message(label.to_string());
        self.progress = Some(pb);
    }

    pub fn finish_progress(&mut self) {
        if let Some(pb) = self.progress.take() {
            pb.finish_and_clear();
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// The tensor exactly as stored (a copy in libtorch memory).
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let f = &self.files[e.file];
        let (a, b) = e.info.data_offsets;
        let bytes = f.mmap.get(f.data_start + a..f.data_start + b).ok_or_else(|| ModelError::Checkpoint {
            path: f.path.display().to_string(),
            message: format!("tensor `{name}` lies outside the file"),
        })?;
        let kind = kind_of(e.info.dtype)
            .ok_or_else(|| ModelError::Dtype { name: name.into(), dtype: format!("{:?}", e.info.dtype) })?;
        let shape: Vec<i64> = e.info.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(bytes, &shape, kind)?;
        release_pages(&f.mmap, f.data_start + a, b - a);
        if let Some(pb) = &self.progress {
            pb.inc((b - a) as u64);
        }
        Ok(t)
    }

    /// Loads `name` in precision `kind`. An F8_E4M3 weight is dequantised with `<name>_scale_inv`
    /// (`W = float(Wq) * S[i / block_out, j / block_in]`, edge blocks partial).
    pub fn load(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let raw = self.raw(name)?;
        if raw.kind() != Kind::Float8e4m3fn {
            return Ok(raw.to_kind(kind));
        }
        let (bo, bi) = self.fp8_block();
        let scale_name = format!("{name}_scale_inv");
        let scale = self.raw(&scale_name)?.to_kind(Kind::Float);
        Ok(dequantize_fp8(&raw, &scale, bo, bi)
            .map_err(|msg| ModelError::Shape { name: scale_name, expected: msg.0, got: msg.1 })?
            .to_kind(kind))
    }

    /// A matrix weight as stored: FP8 e4m3 stays FP8 with its `_scale_inv` grid (checked against
    /// the shape); any other dtype is returned as stored.
    pub fn load_native(&self, name: &str, expected: &[usize]) -> Result<Weight> {
        let got = self.entry(name)?.info.shape.clone();
        if got != expected {
            return Err(ModelError::Shape { name: name.into(), expected: expected.to_vec(), got });
        }
        let raw = self.raw(name)?;
        if raw.kind() != Kind::Float8e4m3fn {
            return Ok(Weight::Dense(raw));
        }
        let block = self.fp8_block();
        let scale_name = format!("{name}_scale_inv");
        let scale = self.raw(&scale_name)?.to_kind(Kind::Float).contiguous();
        let grid = vec![expected[0].div_ceil(block.0), expected[1].div_ceil(block.1)];
        let have: Vec<usize> = scale.size().iter().map(|&d| d as usize).collect();
        if have != grid {
            return Err(ModelError::Shape { name: scale_name, expected: grid, got: have });
        }
        Ok(Weight::Fp8 { q: raw, scale, block })
    }

    /// The FP8 block shape: `quantization_config.weight_block_size`, else V3's 128 × 128.
    fn fp8_block(&self) -> (usize, usize) {
        match self.quantization {
            Quantization::Fp8 { block_out, block_in } => (block_out, block_in),
            // A checkpoint without quantization_config but with FP8 tensors still follows the V3 format.
            Quantization::None => (128, 128),
        }
    }

    /// Like [`Checkpoint::load`], failing with a clear message when the shape differs from `expected`.
    pub fn load_shaped(&self, name: &str, expected: &[usize], kind: Kind) -> Result<Tensor> {
        let got = self.entry(name)?.info.shape.clone();
        if got != expected {
            return Err(ModelError::Shape { name: name.into(), expected: expected.to_vec(), got });
        }
        self.load(name, kind)
    }
}

/// Drops the mapped file pages of a tensor that has been copied into libtorch memory, so that
/// the weights are resident once (as tensors) rather than twice (tensors plus mapped pages) while a
/// stage loads. The mapping is read-only and shared: the data stays in the page cache and a later
/// read maps it again. Only pages wholly inside the range are dropped.
fn release_pages(mmap: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start {
        // SAFETY: DONTNEED on a read-only shared file mapping only discards this process's page
        // table entries; nothing borrowed from the mapping outlives the copy made above.
        let _ =
            unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }
}

/// Block-scaled FP8 dequantisation into f32. On a scale-grid mismatch returns (expected, got) shapes.
pub fn dequantize_fp8(
    q: &Tensor,
    scale: &Tensor,
    block_out: usize,
    block_in: usize,
) -> std::result::Result<Tensor, (Vec<usize>, Vec<usize>)> {
    let size = q.size();
    let (rows, cols) = (size[0], size[1]);
    let expected = vec![(rows as usize).div_ceil(block_out), (cols as usize).div_ceil(block_in)];
    let got: Vec<usize> = scale.size().iter().map(|&d| d as usize).collect();
    if size.len() != 2 || got != expected {
        return Err((expected, got));
    }
    let full = scale
        .repeat_interleave_self_int(block_out as i64, 0, None)
        .narrow(0, 0, rows)
        .repeat_interleave_self_int(block_in as i64, 1, None)
        .narrow(1, 0, cols);
    Ok(q.to_kind(Kind::Float) * full)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dequantisation of a weight with partial edge blocks in both directions, checked element by
    /// element against the formula evaluated in f64.
    #[test]
    fn fp8_partial_edge_blocks() {
        let (rows, cols, b) = (5i64, 7i64, 2usize);
        let w = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu));
        let q = w.to_kind(Kind::Float8e4m3fn);
        let scale = Tensor::rand([3, 4], (Kind::Float, tch::Device::Cpu)) + 0.5;
        let out = dequantize_fp8(&q, &scale, b, b).unwrap();
        let qf: Vec<f32> = Vec::try_from(q.to_kind(Kind::Float).flatten(0, 1)).unwrap();
        let s: Vec<f32> = Vec::try_from(scale.flatten(0, 1)).unwrap();
        let o: Vec<f32> = Vec::try_from(out.flatten(0, 1)).unwrap();
        for i in 0..rows as usize {
            for j in 0..cols as usize {
                let want = qf[i * cols as usize + j] as f64 * s[(i / b) * 4 + j / b] as f64;
                let got = o[i * cols as usize + j] as f64;
                assert!((want - got).abs() <= 1e-6 * want.abs().max(1.0), "({i},{j}) {got} vs {want}");
            }
        }
        assert!(dequantize_fp8(&q, &scale.narrow(0, 0, 2), b, b).is_err());
    }
}
