//! How a checkpoint stores each tensor, and how many bytes it takes resident under a weight format.
//!
//! With the weight files present, the dtypes come from their safetensors headers (only the JSON header
//! at the start of each file is read, never the data). Without them, the DeepSeek-V3 convention from
//! `config.json`: with an fp8 `quantization_config`, every linear weight is float8 e4m3 with an f32
//! `weight_scale_inv` per `[block_out, block_in]` tile (128 x 128), except the embeddings, lm_head,
//! norms, the router gates and the MTP `eh_proj`, which are in `torch_dtype` (bf16); the correction
//! biases are f32.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

use super::inventory::{Role, TensorSpec};
use super::PlanError;
use crate::model_config::{ModelConfig, Quantization};

/// A tensor's storage in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// float8 e4m3, one byte per value, plus an f32 scale per `[block_out, block_in]` tile.
    Fp8 {
        block_out: usize,
        block_in: usize,
    },
    Bf16,
    F16,
    F32,
}

impl Stored {
    /// Bytes of a tensor of `shape` in this storage (FP8: values plus the scale grid, partial edge
    /// tiles counted whole).
    pub fn bytes(self, shape: &[usize]) -> u64 {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        match self {
            Stored::Fp8 { block_out, block_in } => {
                let (rows, cols) = match shape {
                    [r, c] => (*r, *c),
                    _ => (numel as usize, 1),
                };
                numel + 4 * (rows.div_ceil(block_out) * cols.div_ceil(block_in)) as u64
            }
            Stored::Bf16 | Stored::F16 => 2 * numel,
            Stored::F32 => 4 * numel,
        }
    }

    /// Short name for reports: "fp8-e4m3-128x128", "bf16", "f16", "f32".
    pub fn label(self) -> String {
        match self {
            Stored::Fp8 { block_out, block_in } => format!("fp8-e4m3-{block_out}x{block_in}"),
            Stored::Bf16 => "bf16".into(),
            Stored::F16 => "f16".into(),
            Stored::F32 => "f32".into(),
        }
    }
}

/// How weights are kept in memory (`--weights`): `native` keeps each tensor as the checkpoint stores
/// it (FP8 stays FP8 with its scales), `bf16` / `f32` convert every tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    #[default]
    Native,
    Bf16,
    F32,
}

impl FromStr for WeightFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(WeightFormat::Native),
            "bf16" => Ok(WeightFormat::Bf16),
            "f32" => Ok(WeightFormat::F32),
            _ => Err(format!("weight format {s:?}: expected native, bf16 or f32")),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::Native => "native",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F32 => "f32",
        })
    }
}

/// The stored format of every tensor of a checkpoint: from its headers, or by convention.
#[derive(Debug, Clone)]
pub struct StoredFormats {
    headers: Option<HashMap<String, Stored>>,
    files_read: usize,
    fp8: Option<Stored>,
    plain: Stored,
}

impl StoredFormats {
    /// The DeepSeek-V3 convention from `config.json` alone.
    pub fn convention(c: &ModelConfig) -> Self {
        let fp8 = match c.quantization {
            Quantization::Fp8 { block_out, block_in } => Some(Stored::Fp8 { block_out, block_in }),
            Quantization::None => None,
        };
        let plain = match c.torch_dtype.as_deref() {
            Some("float32") => Stored::F32,
            Some("float16") => Stored::F16,
            _ => Stored::Bf16,
        };
        StoredFormats { headers: None, files_read: 0, fp8, plain }
    }

    /// The headers of `dir`'s `model.safetensors` or of the shards named by
    /// `model.safetensors.index.json`, where present (missing files are left to the convention).
    pub fn from_dir(dir: &Path, c: &ModelConfig) -> Result<Self, PlanError> {
        let mut s = Self::convention(c);
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| PlanError::io(&index, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| PlanError::header(&index, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| PlanError::header(&index, "has no weight_map object"))?;
            let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".into()]
        };
        let block = s.fp8.unwrap_or(Stored::Fp8 { block_out: 128, block_in: 128 });
        let mut headers = HashMap::new();
        for f in files {
            let path = dir.join(&f);
            if !path.is_file() {
                continue;
            }
            read_header(&path, block, &mut headers)?;
            s.files_read += 1;
        }
        if s.files_read > 0 {
            s.headers = Some(headers);
        }
        Ok(s)
    }

    /// Where the formats come from, for reports.
    pub fn source(&self) -> String {
        match self.files_read {
            0 => "config.json by the DeepSeek-V3 convention (no weight files)".into(),
            1 => "safetensors header of 1 file".into(),
            n => format!("safetensors headers of {n} files"),
        }
    }

    /// Whether the checkpoint holds `name`; None when only the convention is known.
    pub fn contains(&self, name: &str) -> Option<bool> {
        self.headers.as_ref().map(|h| h.contains_key(name))
    }

    pub fn stored(&self, t: &TensorSpec) -> Stored {
        if let Some(s) = self.headers.as_ref().and_then(|h| h.get(&t.name)) {
            return *s;
        }
        match t.role {
            Role::Linear => self.fp8.unwrap_or(self.plain),
            Role::RouterF32 if t.name.ends_with("e_score_correction_bias") => Stored::F32,
            Role::RouterF32 | Role::Plain => self.plain,
        }
    }

    /// Bytes `t` takes in memory under `format`. The router's tensors are kept in fp32 by the loader
    /// whatever the format.
    pub fn resident_bytes(&self, t: &TensorSpec, format: WeightFormat) -> u64 {
        let kept = match (t.role, format) {
            (Role::RouterF32, _) | (_, WeightFormat::F32) => Stored::F32,
            (_, WeightFormat::Bf16) => Stored::Bf16,
            (_, WeightFormat::Native) => self.stored(t),
        };
        kept.bytes(&t.shape)
    }
}

/// Adds the dtypes of one safetensors file's tensors (its JSON header only) to `out`.
fn read_header(path: &Path, fp8: Stored, out: &mut HashMap<String, Stored>) -> Result<(), PlanError> {
    let mut f = std::fs::File::open(path).map_err(|e| PlanError::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| PlanError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    // safetensors caps headers at 100 MB.
    if len > 100_000_000 {
        return Err(PlanError::header(path, format!("header length {len} is not plausible")));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(|e| PlanError::io(path, e))?;
    let v: Value = serde_json::from_slice(&buf).map_err(|e| PlanError::header(path, e.to_string()))?;
    let map = v.as_object().ok_or_else(|| PlanError::header(path, "header is not a JSON object"))?;
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(Value::as_str).unwrap_or("");
        let stored = match dtype {
            "F8_E4M3" => fp8,
            "BF16" => Stored::Bf16,
            "F16" => Stored::F16,
            "F32" => Stored::F32,
            other => {
                return Err(PlanError::header(path, format!("tensor {name} has unsupported dtype {other:?}")))
            }
        };
        out.insert(name.clone(), stored);
    }
    Ok(())
}
