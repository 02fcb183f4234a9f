//! The demo checkpoint `mlaserve serve` uses when no model is given: a tiny DeepSeek-V3-shaped model
//! TRAINED on Python's documentation by `tools/train_demo.py` (fluent-ish, not knowledgeable), with
//! its byte-level BPE tokenizer and the DeepSeek-V3 chat template. The files live in
//! `assets/demo-model/` and are embedded in the binary, so it runs outside the repository: the first
//! use writes them to the cache directory, keyed by their content.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The shipped checkpoint, file name and bytes. `training.json` records how it was made and its
/// held-out loss on `heldout.txt` (checked by tests/test_demo_model.py).
const FILES: [(&str, &[u8]); 7] = [
    ("config.json", include_bytes!("../../assets/demo-model/config.json")),
    ("model.safetensors", include_bytes!("../../assets/demo-model/model.safetensors")),
    ("tokenizer.json", include_bytes!("../../assets/demo-model/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../assets/demo-model/tokenizer_config.json")),
    ("generation_config.json", include_bytes!("../../assets/demo-model/generation_config.json")),
    ("training.json", include_bytes!("../../assets/demo-model/training.json")),
    ("heldout.txt", include_bytes!("../../assets/demo-model/heldout.txt")),
];

pub fn cache_dir() -> PathBuf {
    std::env::var_os("MLASERVE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mlaserve")))
        .unwrap_or_else(|| std::env::temp_dir().join("mlaserve"))
}

/// FNV-1a over every embedded file: a retrained checkpoint gets a new cache directory.
fn content_key() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain(bytes) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cached demo model directory, written on first use.
pub fn ensure_demo_model() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(format!("demo-model-trained-{:016x}", content_key()));
    // model.safetensors is written last, so its presence means the directory is complete.
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_files(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another process won the race: use its copy.
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(e).with_context(|| format!("moving the demo model to {}", dir.display())),
    }
    Ok(dir)
}

fn write_files(dir: &Path) -> anyhow::Result<()> {
    let mut files = FILES.to_vec();
    files.sort_by_key(|(n, _)| *n == "model.safetensors");
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> &'static [u8] {
        FILES.iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn embedded_checkpoint_is_consistent() {
        let dir = std::env::temp_dir().join(format!("mlaserve-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_files(&dir).unwrap();
        let c = mlaserve_core::ModelConfig::from_dir(&dir).unwrap();
        let tok = mlaserve_router::tokenizer::TokenizerInfo::from_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.num_hidden_layers, 4, "helm's demo values split 4 layers");
        assert!(c.num_nextn_predict_layers >= 1, "the demo model carries an MTP module");
        let tok = tok.unwrap();
        assert_eq!(tok.vocab_size(), c.vocab_size);
        // The template is the router's own DeepSeek-V3 one (tools/train_demo.py copies it).
        let cfg: serde_json::Value = serde_json::from_slice(file("tokenizer_config.json")).unwrap();
        assert_eq!(cfg["chat_template"], mlaserve_router::chat_template::DEEPSEEK_V3_TEMPLATE);
    }

    #[test]
    fn content_key_depends_on_bytes() {
        assert_ne!(content_key(), 0xcbf2_9ce4_8422_2325);
        assert!(std::str::from_utf8(file("training.json")).unwrap().contains("heldout_ce"));
    }
}
