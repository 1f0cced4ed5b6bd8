//! Text models: architecture detection from `config.json` (every spelling
//! transformers 4 and 5 write) or a GGUF header, and where the weights are.
//! `build` turns them into a decoder.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde_json::Value;

use super::{BadFile, EngineError};

/// Where a model's weights are: safetensors in a directory, or one GGUF file.
#[derive(Debug, Clone)]
pub enum Weights {
    Safetensors(Vec<PathBuf>),
    Gguf(PathBuf),
}

impl Weights {
    /// Finds the weights at `path`: a `.gguf` or `.safetensors` file, or a
    /// directory holding safetensors files or exactly one `.gguf` file.
    pub fn find(path: &Path) -> Result<Self, EngineError> {
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("gguf") => Ok(Weights::Gguf(path.to_path_buf())),
                Some("safetensors") => single_safetensors(path),
                _ => Err(EngineError::Unsupported(format!(
                    "{}: expected a .gguf or .safetensors file or a model directory",
                    path.display()
                ))),
            };
        }
        let listing = |ext: &str| -> Result<Vec<PathBuf>, EngineError> {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| EngineError::Files(format!("{}: {e}", path.display())))?
                .flatten()
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect();
            files.sort();
            Ok(files)
        };
        let safetensors = listing("safetensors")?;
        if !safetensors.is_empty() {
            return Ok(Weights::Safetensors(safetensors));
        }
        let mut ggufs = listing("gguf")?;
        match ggufs.len() {
            1 => Ok(Weights::Gguf(ggufs.remove(0))),
            0 => Err(EngineError::Files(format!(
                "no .safetensors or .gguf weights in {}",
                path.display()
            ))),
            _ => Err(EngineError::Files(format!(
                "{} holds {} .gguf files; register local_path as the one to use",
                path.display(),
                ggufs.len()
            ))),
        }
    }

    /// The weights file, or the directory of several shards: where a
    /// failure that names no single file is reported.
    pub fn path(&self) -> PathBuf {
        match self {
            Weights::Safetensors(files) if files.len() == 1 => files[0].clone(),
            Weights::Safetensors(files) => files
                .first()
                .and_then(|f| f.parent())
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            Weights::Gguf(file) => file.clone(),
        }
    }

    pub fn bytes(&self) -> u64 {
        let files: &[PathBuf] = match self {
            Weights::Safetensors(files) => files,
            Weights::Gguf(file) => std::slice::from_ref(file),
        };
        files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// One `.safetensors` file as a whole model: its config and tokenizer must
/// sit beside it, as they would in a model directory.
fn single_safetensors(path: &Path) -> Result<Weights, EngineError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let missing: Vec<&str> = ["config.json", "tokenizer.json"]
        .into_iter()
        .filter(|name| !dir.join(name).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(EngineError::Files(format!(
            "{}: a text model given as one .safetensors file needs config.json and \
             tokenizer.json beside it in {}; missing: {}",
            path.display(),
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(Weights::Safetensors(vec![path.to_path_buf()]))
}

/// A GGUF file's header: architecture, context length and end-of-sequence id.
pub struct GgufHeader {
    pub arch: &'static str,
    pub context_length: Option<usize>,
    pub eos_id: Option<u32>,
}

/// A GGUF file's metadata and tensor table.
pub fn read_gguf(path: &Path) -> Result<gguf_file::Content, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| BadFile::new(path, e))?;
    // Buffered: the metadata is read a few bytes at a time, and a 50k-token
    // vocabulary otherwise costs a system call per field.
    let mut file = std::io::BufReader::new(file);
    Ok(gguf_file::Content::read(&mut file).map_err(|e| BadFile::from_candle(e, path))?)
}

pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, GgufHeader), EngineError> {
    let content = read_gguf(path)?;
    let arch_name = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let arch = match arch_name.as_str() {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma2" => "gemma2",
        "gemma3" => "gemma3",
        "phi3" => "phi3",
        other => {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {other:?} (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)"
            )))
        }
    };
    let number = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let header = GgufHeader {
        arch,
        context_length: number(&format!("{arch_name}.context_length")).map(|n| n as usize),
        eos_id: number("tokenizer.ggml.eos_token_id"),
    };
    Ok((content, header))
}

/// What `config.json` says about a model, beyond the weights.
pub struct ModelSpec {
    pub arch: &'static str,
    pub config: Value,
    /// Where the decoder's tensors sit: `model`, or the language model's
    /// folder inside a multimodal checkpoint.
    pub prefix: &'static str,
    pub context_length: usize,
    pub eos_ids: Vec<u32>,
}

impl ModelSpec {
    /// Reads `config.json` (and `generation_config.json` for extra end-of-
    /// sequence ids) and picks the architecture from `model_type`.
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let outer = read_json(&dir.join("config.json"))?;
        let (mut config, prefix) = match outer["model_type"].as_str() {
            // A multimodal Gemma 3 keeps its text decoder's settings in
            // `text_config` and its tensors under `language_model`.
            Some("gemma3") => (outer["text_config"].clone(), "language_model.model"),
            _ => (outer.clone(), "model"),
        };
        let model_type = config["model_type"].as_str().unwrap_or_default();
        let arch = match model_type {
            "llama" => "llama",
            "qwen2" => "qwen2",
            "qwen3" => "qwen3",
            "mistral" => "mistral",
            "gemma2" => "gemma2",
            "gemma3_text" => "gemma3",
            "phi3" => "phi3",
            other => {
                return Err(EngineError::Unsupported(format!(
                    "model_type {other:?} (supported: llama, qwen2, qwen3, mistral, \
                     gemma2, gemma3_text, gemma3, phi3)"
                )))
            }
        };
        fill_defaults(&mut config, arch);
        let mut eos_ids = token_ids(&outer["eos_token_id"]);
        eos_ids.extend(token_ids(&config["eos_token_id"]));
        if let Ok(generation) = read_json(&dir.join("generation_config.json")) {
            eos_ids.extend(token_ids(&generation["eos_token_id"]));
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let context_length = config["max_position_embeddings"].as_u64().unwrap_or(2048) as usize;
        Ok(ModelSpec {
            arch,
            config: normalize(config)?,
            prefix,
            context_length,
            eos_ids,
        })
    }
}

/// The defaults transformers' config classes give fields a file may omit
/// (multimodal Gemma 3 files leave most of `text_config` out), where they
/// differ from what the decoder assumes otherwise.
fn fill_defaults(config: &mut Value, arch: &str) {
    let defaults = match arch {
        "gemma2" => serde_json::json!({
            "vocab_size": 256000, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0, "tie_word_embeddings": true
        }),
        "gemma3" => serde_json::json!({
            "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 131072, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "sliding_window_pattern": 6,
            "rope_local_base_freq": 10_000.0, "tie_word_embeddings": true
        }),
        "phi3" => serde_json::json!({"original_max_position_embeddings": 4096}),
        _ => return,
    };
    for (key, value) in defaults.as_object().into_iter().flatten() {
        if config.get(key).is_none() {
            config[key] = value.clone();
        }
    }
    // Gemma 3's global layers default to another base than other families.
    let no_rope = ["rope_theta", "rope_parameters"]
        .iter()
        .all(|key| config.get(*key).is_none_or(Value::is_null));
    if arch == "gemma3" && no_rope {
        config["rope_theta"] = Value::from(1_000_000.0);
    }
}

fn read_json(path: &Path) -> Result<Value, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| BadFile::new(path, e))?;
    Ok(serde_json::from_str(&text).map_err(|e| BadFile::new(path, e))?)
}

fn token_ids(value: &Value) -> Vec<u32> {
    match value {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|id| id as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Brings every `config.json` spelling to the fields candle reads:
/// transformers 5 nests RoPE settings (`rope_theta`, `rope_type` and the
/// scaling factors) under `rope_parameters`, transformers 4 spells them
/// `rope_theta` plus `rope_scaling` (whose kind older files call `type`),
/// and a null `sliding_window` means no window.
fn normalize(mut config: Value) -> Result<Value, EngineError> {
    normalize_rope(&mut config)?;
    if config["sliding_window"].is_null() {
        config["sliding_window"] = config["max_position_embeddings"].clone();
    }
    for (key, default) in [
        ("max_window_layers", Value::from(0)),
        ("use_sliding_window", Value::from(false)),
        ("attention_bias", Value::from(false)),
    ] {
        if config.get(key).is_none() {
            config[key] = default;
        }
    }
    if config.get("tie_word_embeddings").is_none() {
        config["tie_word_embeddings"] = Value::from(false);
    }
    Ok(config)
}

/// Sets `rope_theta`, `rope_scaling` (null, or one of the forms
/// `build::RopeScaling` reads) and `partial_rotary_factor` from whichever
/// spelling the file uses. A scaling modeld cannot apply is refused rather
/// than silently run as plain RoPE.
fn normalize_rope(config: &mut Value) -> Result<(), EngineError> {
    split_rope_by_layer_type(config)?;
    let nested = config["rope_parameters"].clone();
    let scaling = match &config["rope_scaling"] {
        Value::Object(_) => config["rope_scaling"].clone(),
        _ => nested.clone(),
    };
    if config.get("rope_theta").is_none_or(Value::is_null) {
        let theta = match (&nested["rope_theta"], &scaling["rope_theta"]) {
            (Value::Number(theta), _) | (_, Value::Number(theta)) => Value::Number(theta.clone()),
            _ => Value::from(10_000.0),
        };
        config["rope_theta"] = theta;
    }
    for source in [&nested, &scaling] {
        let factor = &source["partial_rotary_factor"];
        if factor.is_number() && config.get("partial_rotary_factor").is_none() {
            config["partial_rotary_factor"] = factor.clone();
        }
    }
    let kind = scaling["rope_type"]
        .as_str()
        .or_else(|| scaling["type"].as_str())
        .unwrap_or("default");
    config["rope_scaling"] = match kind {
        // Dynamic NTK only changes positions past max_position_embeddings,
        // which is the context limit modeld enforces anyway.
        "default" | "dynamic" => Value::Null,
        "llama3" => llama3_scaling(&scaling)?,
        "linear" => serde_json::json!({
            "rope_type": "linear",
            "factor": number(&scaling, "linear", "factor")?,
        }),
        "longrope" => longrope_scaling(config, &scaling)?,
        other => {
            return Err(EngineError::Unsupported(format!(
                "RoPE scaling {other:?} (supported: default, llama3, linear, longrope)"
            )))
        }
    };
    Ok(())
}

/// Gemma 3 in transformers 5 nests RoPE settings per layer type: the
/// sliding layers' base becomes `rope_local_base_freq`, and the full
/// layers' settings are read as the model's own.
fn split_rope_by_layer_type(config: &mut Value) -> Result<(), EngineError> {
    let nested = config["rope_parameters"].clone();
    if nested.get("full_attention").is_none() && nested.get("sliding_attention").is_none() {
        return Ok(());
    }
    let local = &nested["sliding_attention"];
    let local_kind = local["rope_type"].as_str().unwrap_or("default");
    if local_kind != "default" {
        return Err(EngineError::Unsupported(format!(
            "rope_parameters.sliding_attention.rope_type {local_kind:?} (supported: default)"
        )));
    }
    if local["rope_theta"].is_number() {
        config["rope_local_base_freq"] = local["rope_theta"].clone();
    }
    config["rope_parameters"] = nested["full_attention"].clone();
    Ok(())
}

fn number(scaling: &Value, kind: &str, name: &str) -> Result<Value, EngineError> {
    match &scaling[name] {
        Value::Number(n) => Ok(Value::Number(n.clone())),
        _ => Err(EngineError::Files(format!(
            "config.json: {kind} RoPE scaling needs a number for {name}"
        ))),
    }
}

fn llama3_scaling(scaling: &Value) -> Result<Value, EngineError> {
    let field = |name| number(scaling, "llama3", name);
    Ok(serde_json::json!({
        "rope_type": "llama3",
        "factor": field("factor")?,
        "low_freq_factor": field("low_freq_factor")?,
        "high_freq_factor": field("high_freq_factor")?,
        "original_max_position_embeddings": field("original_max_position_embeddings")?,
    }))
}

/// LongRoPE (Phi-3): per-frequency divisors for short and long contexts.
/// As transformers does, a top-level `original_max_position_embeddings`
/// wins over the one inside the scaling, and `factor` defaults to the
/// ratio of the two context lengths.
fn longrope_scaling(config: &Value, scaling: &Value) -> Result<Value, EngineError> {
    let max = config["max_position_embeddings"].clone();
    let original = match (
        &config["original_max_position_embeddings"],
        &scaling["original_max_position_embeddings"],
    ) {
        (Value::Number(n), _) | (_, Value::Number(n)) => Value::Number(n.clone()),
        _ => max.clone(),
    };
    let factors = |name: &str| -> Result<Value, EngineError> {
        match &scaling[name] {
            Value::Array(items) if items.iter().all(Value::is_number) => Ok(scaling[name].clone()),
            _ => Err(EngineError::Files(format!(
                "config.json: longrope RoPE scaling needs a list of numbers for {name}"
            ))),
        }
    };
    Ok(serde_json::json!({
        "rope_type": "longrope",
        "short_factor": factors("short_factor")?,
        "long_factor": factors("long_factor")?,
        "original_max_position_embeddings": original,
        "max_position_embeddings": max,
        "factor": scaling["factor"],
        "attention_factor": scaling["attention_factor"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_llama3_rope_spellings_read_the_same() {
        let old = normalize(json!({
            "rope_theta": 5e5,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        let new = normalize(json!({
            "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                "rope_theta": 5e5}
        }))
        .unwrap();
        assert_eq!(old["rope_theta"], new["rope_theta"]);
        assert_eq!(old["rope_scaling"], new["rope_scaling"]);
        assert_eq!(new["rope_scaling"]["factor"], 8.0);
        let plain =
            normalize(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}))
                .unwrap();
        assert!(plain["rope_scaling"].is_null());
        let older = normalize(json!({"rope_scaling": {"type": "llama3", "factor": 2.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .unwrap();
        assert_eq!(older["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(older["rope_theta"], 10_000.0);
        let err = normalize(json!({"rope_scaling": {"type": "yarn", "factor": 4.0}})).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn transformers_5_config_is_normalized() {
        let config = normalize(json!({
            "rope_parameters": {"rope_theta": 1e6},
            "sliding_window": null,
            "max_position_embeddings": 512
        }))
        .unwrap();
        assert_eq!(config["rope_theta"], 1e6);
        assert_eq!(config["sliding_window"], 512);
        assert_eq!(config["use_sliding_window"], false);
        assert_eq!(token_ids(&json!([1, 2])), [1, 2]);
        assert_eq!(token_ids(&json!(7)), [7]);
    }
}
