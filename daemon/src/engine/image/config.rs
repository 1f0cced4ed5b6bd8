//! The `config.json` files of the components the families share (the VAE
//! and the CLIP text encoder), read into the shapes the networks are built
//! with; features the networks do not implement are refused by name.

use std::path::Path;

use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::encoders::clip::{Activation, ClipConfig};
use super::ImageError;

/// Reads and parses one JSON config file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ImageError::Files(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ImageError::Files(format!("{}: {e}", path.display())))
}

pub(crate) fn unsupported(component: &str, what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("{component}/config.json: {what}"))
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeJson {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Per-channel latent statistics (Playground-style VAEs), which
    /// diffusers' SDXL pipeline decodes with instead of the plain scale.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
}

impl VaeJson {
    /// The candle autoencoder configuration these keys describe.
    pub fn to_candle(&self) -> Result<AutoEncoderKLConfig, ImageError> {
        if self.block_out_channels.is_empty() {
            return Err(unsupported("vae", "block_out_channels is empty"));
        }
        if !self.mid_block_add_attention {
            return Err(unsupported(
                "vae",
                "mid_block_add_attention false is not supported",
            ));
        }
        if self.latents_mean.is_some() || self.latents_std.is_some() {
            return Err(unsupported(
                "vae",
                "latents_mean / latents_std are not supported (only scaling_factor)",
            ));
        }
        let plain = |types: &[String], only: &str| types.iter().all(|t| t == only);
        if !plain(&self.down_block_types, "DownEncoderBlock2D")
            || !plain(&self.up_block_types, "UpDecoderBlock2D")
        {
            return Err(unsupported(
                "vae",
                "only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported",
            ));
        }
        Ok(AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        })
    }

    /// Image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipJson {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f64,
    /// The width of `text_projection` (`CLIPTextModelWithProjection`).
    #[serde(default = "clip_projection_dim")]
    pub projection_dim: usize,
    /// Where the pooled output is read (see `ClipWithProjection`).
    #[serde(default = "clip_eos_token_id")]
    pub eos_token_id: u32,
}

impl ClipJson {
    /// The text encoder configuration these keys describe.
    pub fn to_config(&self) -> Result<ClipConfig, ImageError> {
        let activation = match self.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            // transformers' "gelu" is the exact (erf) GELU.
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => {
                return Err(unsupported(
                    "text_encoder",
                    format!("hidden_act {other:?} is not supported"),
                ))
            }
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(unsupported(
                "text_encoder",
                format!(
                    "hidden_size {} does not split into {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Ok(ClipConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.max_position_embeddings,
            activation,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn seventy_seven() -> usize {
    77
}
fn eps_1e5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn sd_scaling_factor() -> f64 {
    0.18215
}
fn clip_projection_dim() -> usize {
    512
}
fn clip_eos_token_id() -> u32 {
    49407
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
