//! What each text family changes in the shared decoder, read from a
//! normalized `config.json` (see `model::normalize`): the arithmetic
//! ([`Flavour`]), which layers attend through a window, and which RoPE
//! tables the layers rotate by. A config field that changes the maths and
//! is not honoured here refuses the load, naming the field.

use candle_core::{DType, Device};
use serde::Deserialize;
use serde_json::Value;

use super::decoder::{Activation, Flavour, Rope};
use super::EngineError;

/// The `config.json` fields the decoder reads, after `model::normalize`.
#[derive(Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Gemma 3's base for its local (sliding) layers.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub max_window_layers: usize,
    /// Gemma 3 before `layer_types`: every n-th layer is global.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// transformers 5 (and late 4.x) name each layer's attention kind.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}

/// RoPE frequency scalings, as `model::normalize` spells them.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3: long wavelengths slowed by `factor`, short ones kept.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Phi-3's LongRoPE: per-frequency divisors, one set for sequences up
    /// to `original_max_position_embeddings` and one past it.
    Longrope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        max_position_embeddings: f64,
        #[serde(default)]
        factor: Option<f64>,
        #[serde(default)]
        attention_factor: Option<f64>,
    },
}

pub fn parse(value: &Value) -> Result<Config, EngineError> {
    serde_json::from_value(value.clone())
        .map_err(|e| EngineError::Files(format!("config.json: {e}")))
}

fn refuse(field: &str, value: impl std::fmt::Debug) -> EngineError {
    EngineError::Unsupported(format!("config.json: {field} = {value:?}"))
}

/// Whether `arch` is a Gemma, whose norms scale by `1 + weight`, whose
/// layers have four norms and whose embeddings are scaled.
pub fn is_gemma(arch: &str) -> bool {
    matches!(arch, "gemma2" | "gemma3")
}

impl Config {
    pub fn heads(&self) -> usize {
        self.num_attention_heads
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The family's arithmetic, or the field that asks for arithmetic
    /// modeld does not do.
    pub fn flavour(&self, arch: &str) -> Result<Flavour, EngineError> {
        let mut flavour = Flavour::plain(self.head_dim());
        flavour.rotary_dim = self.rotary_dim();
        if !flavour.rotary_dim.is_multiple_of(2) || flavour.rotary_dim == 0 {
            return Err(refuse("partial_rotary_factor", self.partial_rotary_factor));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(refuse("use_bidirectional_attention", true));
        }
        self.check_layer_types()?;
        if !is_gemma(arch) {
            return Ok(flavour);
        }
        if let Some(scalar) = self.query_pre_attn_scalar {
            flavour.attn_scale = 1.0 / scalar.sqrt();
        }
        flavour.attn_softcap = self.attn_logit_softcapping;
        flavour.final_softcap = self.final_logit_softcapping;
        flavour.embed_scale = Some((self.hidden_size as f64).sqrt());
        Ok(flavour)
    }

    fn check_layer_types(&self) -> Result<(), EngineError> {
        let known = ["full_attention", "sliding_attention"];
        let types = self.layer_types.iter().flatten();
        match types.clone().find(|t| !known.contains(&t.as_str())) {
            Some(other) => Err(refuse("layer_types", other)),
            None => Ok(()),
        }
    }

    /// The MLP gate's activation: `hidden_activation` for Gemma (which
    /// transformers reads instead of `hidden_act`), else `hidden_act`.
    pub fn activation(&self, arch: &str) -> Result<Activation, EngineError> {
        let (field, name) = if is_gemma(arch) {
            ("hidden_activation", self.hidden_activation.as_deref())
        } else {
            ("hidden_act", self.hidden_act.as_deref())
        };
        match name.unwrap_or(if is_gemma(arch) {
            "gelu_pytorch_tanh"
        } else {
            "silu"
        }) {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::Gelu),
            other => Err(refuse(field, other)),
        }
    }

    /// Whether layer `n` attends through the sliding window.
    fn sliding(&self, arch: &str, n: usize) -> bool {
        if let Some(types) = &self.layer_types {
            return types.get(n).is_some_and(|t| t == "sliding_attention");
        }
        match arch {
            "mistral" | "phi3" => true,
            "qwen2" | "qwen3" => self.use_sliding_window && n >= self.max_window_layers,
            // transformers' defaults when a file names no layer types.
            "gemma2" => n.is_multiple_of(2),
            "gemma3" => !(n + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6).max(1)),
            _ => false,
        }
    }

    /// The attention window of layer `n`, if it has one.
    pub fn window(&self, arch: &str, n: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding(arch, n))
    }

    /// Which of [`Config::ropes`] layer `n` rotates by: Gemma 3's local
    /// layers have their own base.
    pub fn rope_of_layer(&self, arch: &str, n: usize) -> usize {
        usize::from(arch == "gemma3" && self.sliding(arch, n))
    }

    /// The RoPE tables the layers pick from: the model's own, then Gemma
    /// 3's local one.
    pub fn ropes(
        &self,
        arch: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Vec<Rope>> {
        let dim = self.rotary_dim();
        let mut ropes = vec![self.scaled_rope(dim, dtype, device)?];
        if arch == "gemma3" {
            let base = self.rope_local_base_freq.unwrap_or(10_000.0);
            ropes.push(Rope::new(inv_freq(dim, base), dtype, device)?);
        }
        Ok(ropes)
    }

    /// How many channels of a head RoPE rotates.
    fn rotary_dim(&self) -> usize {
        let factor = self.partial_rotary_factor.unwrap_or(1.0);
        (self.head_dim() as f64 * factor) as usize
    }

    fn scaled_rope(&self, dim: usize, dtype: DType, device: &Device) -> candle_core::Result<Rope> {
        let freqs = inv_freq(dim, self.rope_theta);
        match &self.rope_scaling {
            None => Rope::new(freqs, dtype, device),
            Some(RopeScaling::Linear { factor }) => {
                let scaled = freqs.iter().map(|f| (*f as f64 / factor) as f32).collect();
                Rope::new(scaled, dtype, device)
            }
            Some(scaling @ RopeScaling::Llama3 { .. }) => {
                Rope::new(llama3_scaled(freqs, scaling), dtype, device)
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                max_position_embeddings: max,
                factor,
                attention_factor,
            }) => {
                let divided = |factors: &[f64]| -> candle_core::Result<Vec<f32>> {
                    if factors.len() != freqs.len() {
                        candle_core::bail!(
                            "longrope factors: {} for {} frequencies",
                            factors.len(),
                            freqs.len()
                        );
                    }
                    Ok(longrope_freqs(dim, self.rope_theta, factors))
                };
                let factor = factor.unwrap_or(max / original);
                let scale = attention_factor.unwrap_or(longrope_attention(factor, *original));
                Rope::longrope(
                    divided(short_factor)?,
                    divided(long_factor)?,
                    *original as usize,
                    scale as f32,
                    dtype,
                    device,
                )
            }
        }
    }
}

/// Plain RoPE frequencies for `dim` rotated channels.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    longrope_freqs(dim, theta, &vec![1.0; dim / 2])
}

/// `1 / (factor_i * theta^(2i/dim))` for each rotated pair.
fn longrope_freqs(dim: usize, theta: f64, factors: &[f64]) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (1.0 / (factors[i] * theta.powf(2.0 * i as f64 / dim as f64))) as f32)
        .collect()
}

/// transformers' LongRoPE attention factor for a context `factor` times
/// the original one: `sqrt(1 + ln(factor) / ln(original))`, 1 when not
/// extended.
pub fn longrope_attention(factor: f64, original: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / original.ln()).sqrt()
    }
}

/// Llama 3's scaling: long wavelengths slowed by `factor`, short ones
/// kept, and a smooth blend between them.
pub fn llama3_scaled(freqs: Vec<f32>, scaling: &RopeScaling) -> Vec<f32> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: original,
    } = scaling
    else {
        return freqs;
    };
    let low_wavelen = original / low_freq_factor;
    let high_wavelen = original / high_freq_factor;
    freqs
        .into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            };
            scaled as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_short_and_slows_long_wavelengths() {
        let scaling = RopeScaling::Llama3 {
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

    #[test]
    fn longrope_attention_factor_is_transformers() {
        // Phi-3-mini-128k: 131072 / 4096 = 32.
        let f = longrope_attention(32.0, 4096.0);
        assert!((f - 1.190_238_9).abs() < 1e-6, "{f}");
        assert_eq!(longrope_attention(1.0, 4096.0), 1.0);
    }
}
