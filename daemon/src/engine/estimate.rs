//! What a model will take in memory, known before loading it, from its
//! files' headers: safetensors tensors at the dtype they are converted to,
//! GGUF tensors as stored plus the f32 copy of the token embeddings that
//! candle's quantized models make, and the KV cache for the context.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::DType;
use serde_json::Value;

use super::text::model::{read_gguf, ModelSpec, Weights};
use super::EngineError;

/// Tokens of KV cache counted per model: candle's models keep at most this
/// many positions, and longer contexts are rarely filled in practice.
pub const KV_ESTIMATE_TOKENS: usize = 4096;

/// A model's expected memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Weights as they sit in memory after loading.
    pub weights: u64,
    /// Keys and values for `KV_ESTIMATE_TOKENS` positions (or the context,
    /// if shorter).
    pub kv_cache: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache
    }
}

/// Estimates a model from its weight files; `dir` holds its config.json.
pub fn estimate(weights: &Weights, dir: &Path, dtype: DType) -> Result<Estimate, EngineError> {
    match weights {
        Weights::Safetensors(files) => {
            let spec = ModelSpec::read(dir)?;
            let mut bytes = 0;
            for file in files {
                bytes += language_elements(file, spec.prefix)? * dtype.size_in_bytes() as u64;
            }
            let kv = kv_bytes(
                &spec.config,
                dtype.size_in_bytes() as u64,
                spec.context_length,
            );
            Ok(Estimate {
                weights: bytes,
                kv_cache: kv,
            })
        }
        Weights::Gguf(file) => {
            let content = read_gguf(file)?;
            Ok(gguf_estimate(&content))
        }
    }
}

/// An image model's weights (UNet, VAE and text encoder(s), or a single-file
/// checkpoint) at `dtype`. It needs no KV cache; the activations of a run
/// grow with the picture size and are not counted.
pub fn image_estimate(
    path: &Path,
    parts: &super::image::ImageParts,
    dtype: DType,
) -> Result<Estimate, EngineError> {
    let mut bytes = 0;
    for file in super::image::device_weight_files(path, parts)? {
        bytes += resident_bytes(&file, dtype)?;
    }
    Ok(Estimate {
        weights: bytes,
        kv_cache: 0,
    })
}

/// The bytes a file's tensors take once loaded at `dtype`: fp8 weights
/// stay fp8 (one byte each) in image models, every other tensor is
/// converted.
fn resident_bytes(path: &Path, dtype: DType) -> Result<u64, EngineError> {
    Ok(stored_tensors(path)?
        .map(|(elements, fp8)| elements * if fp8 { 1 } else { dtype.size_in_bytes() as u64 })
        .sum())
}

/// Elements of every tensor in a safetensors file, from its JSON header.
pub fn safetensors_elements(path: &Path) -> Result<u64, EngineError> {
    Ok(stored_tensors(path)?.map(|(elements, _)| elements).sum())
}

/// Elements of the tensors a text decoder loads: all of them, except in a
/// multimodal checkpoint (decoder under `prefix`, not `model`), whose
/// vision tower stays on disk.
fn language_elements(path: &Path, prefix: &str) -> Result<u64, EngineError> {
    if prefix == "model" {
        return safetensors_elements(path);
    }
    let header = safetensors_header(path)?;
    let language = |name: &str| {
        name.starts_with("language_model.")
            || name.starts_with("model.language_model.")
            || name == "lm_head.weight"
    };
    Ok(header
        .iter()
        .filter(|(name, _)| language(name))
        .map(|(_, info)| elements(info))
        .sum())
}

/// Elements of one tensor in a safetensors header.
fn elements(info: &Value) -> u64 {
    info["shape"]
        .as_array()
        .map_or(0, |dims| dims.iter().filter_map(Value::as_u64).product())
}

/// `(elements, stored as fp8)` of every tensor in a safetensors file.
fn stored_tensors(path: &Path) -> Result<impl Iterator<Item = (u64, bool)>, EngineError> {
    let header = safetensors_header(path)?;
    Ok(header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(_, info)| {
            let fp8 = info["dtype"].as_str().is_some_and(|d| d.starts_with("F8_"));
            (elements(&info), fp8)
        }))
}

/// A safetensors file's JSON header: tensor names to dtype, shape and offsets.
pub fn safetensors_header(path: &Path) -> Result<HashMap<String, Value>, EngineError> {
    let bad = |message: String| super::BadFile::new(path, message);
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("header of {len} bytes is not a safetensors header")).into());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(e.to_string()))?;
    Ok(serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?)
}

/// Keys and values of every layer for the context (capped), per config.
fn kv_bytes(config: &Value, dtype_bytes: u64, context: usize) -> u64 {
    let number = |key: &str| config[key].as_u64();
    let (Some(layers), Some(heads), Some(hidden)) = (
        number("num_hidden_layers"),
        number("num_attention_heads"),
        number("hidden_size"),
    ) else {
        return 0;
    };
    let kv_heads = number("num_key_value_heads").unwrap_or(heads);
    let head_dim = number("head_dim").unwrap_or(hidden / heads.max(1));
    let tokens = context.min(KV_ESTIMATE_TOKENS) as u64;
    layers * 2 * kv_heads * head_dim * tokens * dtype_bytes
}

/// GGUF weights stay as stored, except the token embeddings, which candle
/// expands to f32 (and drops the stored copy unless it doubles as the
/// output layer); the KV cache is counted in f32. On the CPU a quantized
/// model caches f16, and its batch then admits twice the positions in
/// the same bytes (`kv_tokens`), so the bytes counted stay the bytes used.
fn gguf_estimate(content: &gguf_file::Content) -> Estimate {
    let stored = |info: &gguf_file::TensorInfo| {
        let dtype = info.ggml_dtype;
        (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64
    };
    let mut weights: u64 = content.tensor_infos.values().map(stored).sum();
    if let Some(embeddings) = content.tensor_infos.get("token_embd.weight") {
        weights += embeddings.shape.elem_count() as u64 * 4;
        if content.tensor_infos.contains_key("output.weight") {
            weights -= stored(embeddings);
        }
    }
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let number = |key: &str| {
        content
            .metadata
            .get(&format!("{arch}.{key}"))
            .and_then(|v| v.to_u32().ok())
            .map(u64::from)
    };
    let kv_cache = match (
        number("block_count"),
        number("attention.head_count"),
        number("embedding_length"),
    ) {
        (Some(layers), Some(heads), Some(hidden)) => {
            let kv_heads = number("attention.head_count_kv").unwrap_or(heads);
            let head_dim = number("attention.key_length").unwrap_or(hidden / heads.max(1));
            let context = number("context_length").unwrap_or(4096) as usize;
            let tokens = context.min(KV_ESTIMATE_TOKENS) as u64;
            layers * 2 * kv_heads * head_dim * tokens * 4
        }
        _ => 0,
    };
    Estimate { weights, kv_cache }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kv_cache_counts_layers_heads_and_positions() {
        let config = json!({"num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "hidden_size": 64});
        // 2 layers x (k, v) x 2 heads x 16 dims x 512 positions x 2 bytes.
        assert_eq!(kv_bytes(&config, 2, 512), 2 * 2 * 2 * 16 * 512 * 2);
        assert_eq!(
            kv_bytes(&config, 2, 1 << 20),
            kv_bytes(&config, 2, KV_ESTIMATE_TOKENS)
        );
    }

    #[test]
    fn safetensors_elements_come_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = candle_core::Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
        let b = candle_core::Tensor::zeros(7, DType::BF16, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", a), ("b", b)]), &path).unwrap();
        assert_eq!(safetensors_elements(&path).unwrap(), 22);
        assert_eq!(resident_bytes(&path, DType::F16).unwrap(), 44);
    }

    #[test]
    fn a_multimodal_checkpoint_counts_only_its_language_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let zeros = |n: usize| {
            candle_core::Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap()
        };
        let tensors = HashMap::from([
            ("language_model.model.norm.weight", zeros(3)),
            ("model.language_model.norm.weight", zeros(5)),
            ("vision_tower.patch.weight", zeros(100)),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        assert_eq!(language_elements(&path, "language_model.model").unwrap(), 8);
        assert_eq!(language_elements(&path, "model").unwrap(), 108);
    }

    #[test]
    fn fp8_weights_of_image_models_are_counted_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let cpu = &candle_core::Device::Cpu;
        let a = candle_core::Tensor::zeros((3, 5), DType::F8E4M3, cpu).unwrap();
        let b = candle_core::Tensor::zeros(7, DType::F32, cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", a), ("b", b)]), &path).unwrap();
        assert_eq!(safetensors_elements(&path).unwrap(), 22);
        assert_eq!(resident_bytes(&path, DType::BF16).unwrap(), 15 + 7 * 2);
    }
}
