//! Writes a GGUF file from a llama, gemma2, gemma3 or phi3 safetensors
//! model, as llama.cpp's converter does (tensor names, metadata, llama's
//! q/k row permutation for its interleaved rotary layout, Gemma's norms
//! stored as `1 + w`), in f32, f16, Q8_0 or Q4_K. Tests use it to check
//! that GGUF loading gives the same tokens.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    /// Q8_0 where rows divide into 32-value blocks, f16 elsewhere.
    Q8_0,
    /// Q4_K where rows divide into 256-value super-blocks, else as Q8_0.
    Q4K,
}

/// llama.cpp's `permute`: rows of each head reordered from HF's
/// half-and-half rotary layout to interleaved pairs.
fn permute(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight
        .reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

fn gguf_name(name: &str, gemma: bool) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tensor) = rest.split_once('.')?;
    let short = match tensor {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        // Phi-3's fused gate and up projections keep llama.cpp's up name.
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        // Gemma's post_attention_layernorm follows the attention; the
        // norm before its MLP is pre_feedforward_layernorm.
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// Converts `dir` (config.json + model.safetensors, a llama) into a GGUF
/// at `out`.
pub fn write_llama_gguf(dir: &Path, out: &Path, kind: GgufType) -> candle_core::Result<()> {
    write_gguf(dir, out, kind)
}

/// Converts `dir` (config.json + model.safetensors of a llama, gemma2,
/// gemma3_text or phi3 model) into a GGUF at `out`.
pub fn write_gguf(dir: &Path, out: &Path, kind: GgufType) -> candle_core::Result<()> {
    write_gguf_with(dir, out, kind, Vec::new())
}

/// `write_gguf` with `extra` metadata entries after the converter's own
/// (a tokenizer vocabulary, which llama.cpp needs to load a file).
pub fn write_gguf_with(
    dir: &Path,
    out: &Path,
    kind: GgufType,
    extra: Vec<(String, gguf_file::Value)>,
) -> candle_core::Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
            .map_err(candle_core::Error::wrap)?;
    let arch = match config["model_type"].as_str().unwrap_or("llama") {
        "gemma3_text" => "gemma3",
        other => other,
    };
    let gemma = arch.starts_with("gemma");
    let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |n| n as usize);
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut quantized: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let Some(target) = gguf_name(name, gemma) else {
            continue;
        };
        let mut tensor = tensors[name].clone();
        if arch == "llama" && target.ends_with("attn_q.weight") {
            tensor = permute(&tensor, heads)?;
        } else if arch == "llama" && target.ends_with("attn_k.weight") {
            tensor = permute(&tensor, kv_heads)?;
        } else if gemma && target.ends_with("norm.weight") {
            tensor = (tensor + 1.0)?;
        }
        quantized.push((
            target,
            QTensor::quantize(&tensor, ggml_type(&tensor, kind))?,
        ));
    }
    quantized.extend(rope_factors(&config)?);
    let mut metadata = metadata(&config, arch);
    metadata.extend(extra);
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        quantized.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out)?;
    gguf_file::write(&mut file, &metadata, &tensor_refs)
}

fn ggml_type(tensor: &Tensor, kind: GgufType) -> GgmlDType {
    let last = *tensor.dims().last().unwrap_or(&0);
    match kind {
        _ if tensor.rank() == 1 => GgmlDType::F32,
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Q4K if last.is_multiple_of(256) => GgmlDType::Q4K,
        GgufType::Q8_0 | GgufType::Q4K if last.is_multiple_of(32) => GgmlDType::Q8_0,
        GgufType::Q8_0 | GgufType::Q4K => GgmlDType::F16,
    }
}

/// The RoPE settings transformers 5 nests under `rope_parameters` (per
/// layer type for Gemma 3: the global layers'), or their older top-level
/// spelling.
fn rope(config: &serde_json::Value) -> serde_json::Value {
    let nested = &config["rope_parameters"];
    if nested["full_attention"].is_object() {
        return nested["full_attention"].clone();
    }
    if nested.is_object() {
        return nested.clone();
    }
    let mut rope = config["rope_scaling"].clone();
    if !rope.is_object() {
        rope = serde_json::json!({});
    }
    rope["rope_theta"] = config["rope_theta"].clone();
    rope
}

/// LongRoPE's per-frequency divisors as llama.cpp stores them.
fn rope_factors(config: &serde_json::Value) -> candle_core::Result<Vec<(String, QTensor)>> {
    let rope = rope(config);
    let mut out = Vec::new();
    for (key, name) in [
        ("long_factor", "rope_factors_long.weight"),
        ("short_factor", "rope_factors_short.weight"),
    ] {
        if let Some(values) = rope[key].as_array() {
            let values: Vec<f32> = values
                .iter()
                .filter_map(|v| v.as_f64())
                .map(|v| v as f32)
                .collect();
            let tensor = Tensor::new(values, &Device::Cpu)?;
            out.push((
                name.to_string(),
                QTensor::quantize(&tensor, GgmlDType::F32)?,
            ));
        }
    }
    Ok(out)
}

fn metadata(config: &serde_json::Value, arch: &str) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value;
    let get = |key: &str| config[key].as_u64().unwrap_or(0) as u32;
    let float = |key: &str| config[key].as_f64().map(|v| Value::F32(v as f32));
    let heads = get("num_attention_heads");
    let hidden = get("hidden_size");
    let head_dim = config["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |d| d as u32);
    let rope = rope(config);
    let partial = rope["partial_rotary_factor"]
        .as_f64()
        .or(config["partial_rotary_factor"].as_f64())
        .unwrap_or(1.0);
    let mut entries: Vec<(&str, Value)> = vec![
        ("attention.head_count", Value::U32(heads)),
        (
            "attention.head_count_kv",
            Value::U32(
                config["num_key_value_heads"]
                    .as_u64()
                    .map_or(heads, |n| n as u32),
            ),
        ),
        ("attention.key_length", Value::U32(head_dim)),
        ("attention.value_length", Value::U32(head_dim)),
        ("block_count", Value::U32(get("num_hidden_layers"))),
        ("embedding_length", Value::U32(hidden)),
        ("feed_forward_length", Value::U32(get("intermediate_size"))),
        ("context_length", Value::U32(get("max_position_embeddings"))),
        (
            "rope.dimension_count",
            Value::U32((head_dim as f64 * partial) as u32),
        ),
        (
            "rope.freq_base",
            Value::F32(rope["rope_theta"].as_f64().unwrap_or(10_000.0) as f32),
        ),
        (
            "attention.layer_norm_rms_epsilon",
            Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32),
        ),
    ];
    let optional = [
        (
            "attention.sliding_window",
            config["sliding_window"]
                .as_u64()
                .map(|w| Value::U32(w as u32)),
        ),
        ("attn_logit_softcapping", float("attn_logit_softcapping")),
        ("final_logit_softcapping", float("final_logit_softcapping")),
        (
            "rope.scaling.type",
            rope["rope_type"]
                .as_str()
                .filter(|t| *t != "default")
                .map(|t| Value::String(t.into())),
        ),
        (
            "rope.scaling.factor",
            rope["factor"].as_f64().map(|f| Value::F32(f as f32)),
        ),
        (
            "rope.scaling.original_context_length",
            config["original_max_position_embeddings"]
                .as_u64()
                .map(|n| Value::U32(n as u32)),
        ),
    ];
    entries.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    if let Some(types) = config["layer_types"].as_array() {
        let sliding = types
            .iter()
            .map(|t| Value::Bool(t == "sliding_attention"))
            .collect();
        entries.push(("attention.sliding_window_pattern", Value::Array(sliding)));
    }
    let mut out: Vec<(String, Value)> = entries
        .into_iter()
        .map(|(k, v)| (format!("{arch}.{k}"), v))
        .collect();
    out.push(("general.architecture".into(), Value::String(arch.into())));
    out.push((
        "tokenizer.ggml.eos_token_id".into(),
        Value::U32(get("eos_token_id")),
    ));
    out
}
