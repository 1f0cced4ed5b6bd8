//! Writes a GGUF file from a llama-architecture safetensors model, as
//! llama.cpp's converter does (tensor names, metadata, and the q/k row
//! permutation for its interleaved rotary layout), in f32, f16, Q8_0 or Q4_K.
//! Tests use it to check that GGUF loading gives the same tokens.

use std::collections::HashMap;
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

fn gguf_name(name: &str) -> Option<String> {
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
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// Converts `dir` (config.json + model.safetensors) into a GGUF at `out`.
pub fn write_llama_gguf(dir: &Path, out: &Path, kind: GgufType) -> candle_core::Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
            .map_err(candle_core::Error::wrap)?;
    let get = |key: &str| config[key].as_u64().unwrap_or(0) as u32;
    let heads = get("num_attention_heads");
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |n| n as u32);
    let hidden = get("hidden_size");
    let theta = config["rope_parameters"]["rope_theta"]
        .as_f64()
        .or(config["rope_theta"].as_f64())
        .unwrap_or(10_000.0);
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut quantized: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let Some(target) = gguf_name(name) else {
            continue;
        };
        let mut tensor = tensors[name].clone();
        if target.ends_with("attn_q.weight") {
            tensor = permute(&tensor, heads as usize)?;
        } else if target.ends_with("attn_k.weight") {
            tensor = permute(&tensor, kv_heads as usize)?;
        }
        let last = *tensor.dims().last().unwrap_or(&0);
        let dtype = match kind {
            _ if tensor.rank() == 1 => GgmlDType::F32,
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Q4K if last % 256 == 0 => GgmlDType::Q4K,
            GgufType::Q8_0 | GgufType::Q4K if last % 32 == 0 => GgmlDType::Q8_0,
            GgufType::Q8_0 | GgufType::Q4K => GgmlDType::F16,
        };
        quantized.push((target, QTensor::quantize(&tensor, dtype)?));
    }
    use gguf_file::Value;
    let metadata: HashMap<&str, Value> = HashMap::from([
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.block_count", Value::U32(get("num_hidden_layers"))),
        ("llama.embedding_length", Value::U32(hidden)),
        (
            "llama.feed_forward_length",
            Value::U32(get("intermediate_size")),
        ),
        (
            "llama.context_length",
            Value::U32(get("max_position_embeddings")),
        ),
        ("llama.rope.dimension_count", Value::U32(hidden / heads)),
        ("llama.rope.freq_base", Value::F32(theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(get("eos_token_id")),
        ),
    ]);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        quantized.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out)?;
    gguf_file::write(&mut file, &metadata, &tensor_refs)
}
