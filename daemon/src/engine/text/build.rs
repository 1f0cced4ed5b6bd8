//! Builds a [`Decoder`] from a model's weights: safetensors with the
//! normalized `config.json` (LoRAs merged first), or a GGUF file with its
//! metadata, quantized tensors kept quantized.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use serde_json::Value;

use super::decoder::{Attention, Decoder, Layer, Mlp, Rope, Shape};
use super::linear::{Fused, Linear, RmsNorm};
use super::model::ModelSpec;
use super::{BadFile, EngineError};

/// The `config.json` fields the decoder reads, after `model::normalize`.
#[derive(Debug, Deserialize)]
struct Config {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<Llama3Scaling>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    max_window_layers: usize,
    /// transformers 5 (and late 4.x) name each layer's attention kind.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

fn default_eps() -> f64 {
    1e-6
}

/// Llama 3's RoPE frequency scaling, as `model::normalize` spells it.
#[derive(Debug, Clone, Deserialize)]
struct Llama3Scaling {
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
}

/// Plain RoPE frequencies for `dim` rotated channels.
fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect()
}

/// Llama 3's scaling: long wavelengths slowed by `factor`, short ones
/// kept, and a smooth blend between them.
fn llama3_scaled(freqs: Vec<f32>, s: &Llama3Scaling) -> Vec<f32> {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    freqs
        .into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            };
            scaled as f32
        })
        .collect()
}

/// The attention window of layer `n`, if it has one.
fn window(config: &Config, arch: &str, n: usize) -> Option<usize> {
    let sliding = match &config.layer_types {
        Some(types) => types.get(n).is_some_and(|t| t == "sliding_attention"),
        None => match arch {
            "mistral" => true,
            "qwen2" | "qwen3" => config.use_sliding_window && n >= config.max_window_layers,
            _ => false,
        },
    };
    config.sliding_window.filter(|_| sliding)
}

fn parse_config(value: &Value) -> Result<Config, EngineError> {
    serde_json::from_value(value.clone())
        .map_err(|e| EngineError::Files(format!("config.json: {e}")))
}

/// Reads every safetensors file (merging `loras`) or maps them, then
/// builds the decoder in `dtype` on `device`.
pub fn from_safetensors(
    spec: &ModelSpec,
    files: &[PathBuf],
    loras: &[modeld_wire::types::LoraInfo],
    dtype: DType,
    device: &Device,
) -> Result<Decoder, EngineError> {
    let vb = if loras.is_empty() {
        // Safety: the weight files are mmapped read-only; modeld never
        // writes to files under a loaded model, and the cache only
        // replaces blobs by rename, which leaves a mapping intact.
        // Truncated or corrupt files fail here, naming themselves.
        unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
            .map_err(|e| BadFile::from_candle(e, &files[0]))?
    } else {
        // Adapters change the weights, so they are read and merged first.
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| BadFile::from_candle(e, file))?;
            tensors.extend(loaded);
        }
        for lora in loras {
            super::lora::apply(&mut tensors, lora).map_err(|e| e.in_file(&lora.path))?;
        }
        VarBuilder::from_tensors(tensors, dtype, device)
    };
    let config = parse_config(&spec.config)?;
    Ok(dense_decoder(&config, spec.arch, vb, dtype, device)?)
}

fn dense_decoder(
    c: &Config,
    arch: &str,
    vb: VarBuilder,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Decoder> {
    let heads = c.num_attention_heads;
    let kv_heads = c.num_key_value_heads.unwrap_or(heads);
    let head_dim = c.head_dim.unwrap_or(c.hidden_size / heads);
    let shape = Shape {
        hidden: c.hidden_size,
        heads,
        kv_heads,
        head_dim,
        layers: c.num_hidden_layers,
        vocab: c.vocab_size,
        eps: c.rms_norm_eps,
        interleaved_rope: false,
    };
    let linear = |vb: &VarBuilder, out: usize, inp: usize, bias: bool| {
        let weight = vb.get((out, inp), "weight")?;
        let bias = if bias {
            Some(vb.get(out, "bias")?)
        } else {
            None
        };
        candle_core::Result::Ok(Linear::dense(weight, bias))
    };
    let norm = |vb: VarBuilder, size: usize| {
        candle_core::Result::Ok(RmsNorm::new(vb.get(size, "weight")?, c.rms_norm_eps))
    };
    let qkv_bias = arch == "qwen2" || c.attention_bias;
    let model = vb.pp("model");
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for n in 0..c.num_hidden_layers {
        let l = model.pp(format!("layers.{n}"));
        let a = l.pp("self_attn");
        let m = l.pp("mlp");
        let (qk_norm_q, qk_norm_k) = if arch == "qwen3" {
            (
                Some(norm(a.pp("q_norm"), head_dim)?),
                Some(norm(a.pp("k_norm"), head_dim)?),
            )
        } else {
            (None, None)
        };
        layers.push(Layer {
            attn_norm: norm(l.pp("input_layernorm"), c.hidden_size)?,
            attn: Attention {
                qkv: Fused::new(vec![
                    linear(&a.pp("q_proj"), heads * head_dim, c.hidden_size, qkv_bias)?,
                    linear(
                        &a.pp("k_proj"),
                        kv_heads * head_dim,
                        c.hidden_size,
                        qkv_bias,
                    )?,
                    linear(
                        &a.pp("v_proj"),
                        kv_heads * head_dim,
                        c.hidden_size,
                        qkv_bias,
                    )?,
                ])?,
                o: linear(
                    &a.pp("o_proj"),
                    c.hidden_size,
                    heads * head_dim,
                    c.attention_bias,
                )?,
                q_norm: qk_norm_q,
                k_norm: qk_norm_k,
                window: window(c, arch, n),
            },
            mlp_norm: norm(l.pp("post_attention_layernorm"), c.hidden_size)?,
            mlp: Mlp {
                gate_up: Fused::new(vec![
                    linear(
                        &m.pp("gate_proj"),
                        c.intermediate_size,
                        c.hidden_size,
                        c.mlp_bias,
                    )?,
                    linear(
                        &m.pp("up_proj"),
                        c.intermediate_size,
                        c.hidden_size,
                        c.mlp_bias,
                    )?,
                ])?,
                down: linear(
                    &m.pp("down_proj"),
                    c.hidden_size,
                    c.intermediate_size,
                    c.mlp_bias,
                )?,
            },
        });
    }
    let embed = model
        .pp("embed_tokens")
        .get((c.vocab_size, c.hidden_size), "weight")?;
    // Tied models (and files that simply omit the head) reuse the embedding.
    let lm_head = if c.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
        Linear::dense(embed.clone(), None)
    } else {
        linear(&vb.pp("lm_head"), c.vocab_size, c.hidden_size, false)?
    };
    let mut freqs = inv_freq(head_dim, c.rope_theta);
    if let Some(scaling) = &c.rope_scaling {
        freqs = llama3_scaled(freqs, scaling);
    }
    Ok(Decoder {
        shape,
        embed,
        layers,
        norm: norm(model.pp("norm"), c.hidden_size)?,
        lm_head,
        rope: Rope::new(freqs, dtype, device)?,
        dtype,
    })
}

/// Reads tensors out of a GGUF file by name.
struct GgufReader<'a> {
    content: &'a gguf_file::Content,
    file: std::fs::File,
    device: &'a Device,
}

impl GgufReader<'_> {
    fn tensor(&mut self, name: &str) -> candle_core::Result<QTensor> {
        self.content.tensor(&mut self.file, name, self.device)
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor needed whole (norms, biases, the embedding table), in f32.
    fn dense(&mut self, name: &str) -> candle_core::Result<Tensor> {
        self.tensor(name)?.dequantize(self.device)
    }

    fn linear(&mut self, name: &str, bias: bool) -> candle_core::Result<Linear> {
        let weight = self.tensor(&format!("{name}.weight"))?;
        let bias = if bias {
            Some(self.dense(&format!("{name}.bias"))?)
        } else {
            None
        };
        Linear::quantized(weight, bias, DType::F32)
    }

    fn norm(&mut self, name: &str, eps: f64) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(name)?, eps))
    }

    fn number(&self, key: &str) -> Option<f64> {
        let value = self.content.metadata.get(key)?;
        value
            .to_u32()
            .map(f64::from)
            .or_else(|_| value.to_f32().map(f64::from))
            .or_else(|_| value.to_u64().map(|v| v as f64))
            .ok()
    }

    fn required(&self, key: &str) -> Result<usize, EngineError> {
        self.number(key)
            .map(|v| v as usize)
            .ok_or_else(|| EngineError::Files(format!("GGUF metadata lacks {key}")))
    }
}

/// Builds the decoder from a GGUF file of architecture `arch` (llama,
/// qwen2 or qwen3). Activations run in f32, as quantized kernels want.
pub fn from_gguf(
    path: &Path,
    content: gguf_file::Content,
    arch: &str,
    device: &Device,
) -> Result<Decoder, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| BadFile::new(path, e))?;
    let mut reader = GgufReader {
        content: &content,
        file,
        device,
    };
    let key = |name: &str| format!("{arch}.{name}");
    let heads = reader.required(&key("attention.head_count"))?;
    let hidden = reader.required(&key("embedding_length"))?;
    let head_dim = reader
        .number(&key("attention.key_length"))
        .map_or(hidden / heads, |v| v as usize);
    let eps = reader
        .number(&key("attention.layer_norm_rms_epsilon"))
        .unwrap_or(1e-6);
    let theta = reader.number(&key("rope.freq_base")).unwrap_or(10_000.0);
    let shape = Shape {
        hidden,
        heads,
        kv_heads: reader
            .number(&key("attention.head_count_kv"))
            .map_or(heads, |v| v as usize),
        head_dim,
        layers: reader.required(&key("block_count"))?,
        vocab: 0,
        eps,
        // llama.cpp permutes llama's q/k rows for interleaved rotation;
        // Qwen files keep the halves layout.
        interleaved_rope: arch == "llama",
    };
    Ok(gguf_decoder(&mut reader, shape, arch, theta)?)
}

fn gguf_decoder(
    r: &mut GgufReader,
    mut shape: Shape,
    arch: &str,
    theta: f64,
) -> candle_core::Result<Decoder> {
    let eps = shape.eps;
    let mut layers = Vec::with_capacity(shape.layers);
    for n in 0..shape.layers {
        let p = format!("blk.{n}");
        let (q_norm, k_norm) = if arch == "qwen3" {
            (
                Some(r.norm(&format!("{p}.attn_q_norm.weight"), eps)?),
                Some(r.norm(&format!("{p}.attn_k_norm.weight"), eps)?),
            )
        } else {
            (None, None)
        };
        let bias = r.has(&format!("{p}.attn_q.bias"));
        layers.push(Layer {
            attn_norm: r.norm(&format!("{p}.attn_norm.weight"), eps)?,
            attn: Attention {
                qkv: Fused::new(vec![
                    r.linear(&format!("{p}.attn_q"), bias)?,
                    r.linear(&format!("{p}.attn_k"), bias)?,
                    r.linear(&format!("{p}.attn_v"), bias)?,
                ])?,
                o: r.linear(&format!("{p}.attn_output"), false)?,
                q_norm,
                k_norm,
                window: None,
            },
            mlp_norm: r.norm(&format!("{p}.ffn_norm.weight"), eps)?,
            mlp: Mlp {
                gate_up: Fused::new(vec![
                    r.linear(&format!("{p}.ffn_gate"), false)?,
                    r.linear(&format!("{p}.ffn_up"), false)?,
                ])?,
                down: r.linear(&format!("{p}.ffn_down"), false)?,
            },
        });
    }
    // The embedding is looked up by row, so it is kept whole, in f32.
    let embed = r.dense("token_embd.weight")?;
    shape.vocab = embed.dim(0)?;
    let lm_head = if r.has("output.weight") {
        r.linear("output", false)?
    } else {
        Linear::quantized(r.tensor("token_embd.weight")?, None, DType::F32)?
    };
    let mut freqs = inv_freq(shape.head_dim, theta);
    // llama.cpp stores Llama 3's scaling as per-frequency divisors.
    if r.has("rope_freqs.weight") {
        let divisors = r.dense("rope_freqs.weight")?.to_vec1::<f32>()?;
        for (f, d) in freqs.iter_mut().zip(divisors) {
            *f /= d;
        }
    }
    let device = r.device.clone();
    Ok(Decoder {
        shape,
        embed,
        layers,
        norm: r.norm("output_norm.weight", eps)?,
        lm_head,
        rope: Rope::new(freqs, DType::F32, &device)?,
        dtype: DType::F32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_short_and_slows_long_wavelengths() {
        let scaling = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inv_freq(128, 500_000.0);
        let scaled = llama3_scaled(plain.clone(), &scaling);
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
        assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p));
    }
}
