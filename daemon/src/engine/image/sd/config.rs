//! `unet/config.json` (diffusers `UNet2DConditionModel`) read into the
//! shapes the UNet is built with. Nothing here assumes SD 1.5 sizes: every
//! width, depth and head count comes from the file, and features the UNet
//! does not implement are refused by name.

use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use serde::Deserialize;

use super::ImageError;
use crate::engine::image::config::unsupported;

/// A value diffusers allows either once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
    /// A list per block of values per layer (diffusers allows it for
    /// `transformer_layers_per_block`); refused by `expand`.
    PerLayer(Vec<Vec<T>>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for each of `blocks` blocks, or why the list does not fit.
    fn expand(&self, blocks: usize, field: &str) -> Result<Vec<T>, ImageError> {
        match self {
            PerBlock::One(value) => Ok(vec![*value; blocks]),
            PerBlock::Each(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::Each(values) => Err(unsupported(
                "unet",
                format!("{field} has {} entries for {blocks} blocks", values.len()),
            )),
            PerBlock::PerLayer(_) => Err(unsupported(
                "unet",
                format!("{field} with a list per layer is not supported (one value per block)"),
            )),
        }
    }
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`), with diffusers'
/// defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetJson {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default = "per_block_two")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "per_block_eight")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default = "per_block_1280")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "per_block_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(flatten)]
    pub unsupported: UnetUnsupported,
}

/// The shape of SDXL's added conditioning (`addition_embed_type:
/// "text_time"`): each time id becomes a `time_embed_dim`-wide sinusoidal
/// embedding, and `add_embedding` reads `input_dim` values (those of all
/// time ids, then the pooled text embedding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeShape {
    pub time_embed_dim: usize,
    pub input_dim: usize,
}

/// Keys of `UNet2DConditionModel` that select features the candle UNet
/// does not implement (class embeddings, other kernels).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UnetUnsupported {
    class_embed_type: Option<String>,
    time_cond_proj_dim: Option<usize>,
    encoder_hid_dim: Option<usize>,
    time_embedding_dim: Option<usize>,
    time_embedding_type: Option<String>,
    resnet_time_scale_shift: Option<String>,
    conv_in_kernel: Option<usize>,
    conv_out_kernel: Option<usize>,
    act_fn: Option<String>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    only_cross_attention: serde_json::Value,
    /// Up-block depths other than the down blocks' mirrored.
    #[serde(default)]
    reverse_transformer_layers_per_block: serde_json::Value,
}

impl UnetUnsupported {
    /// The first key set to something other than what the UNet implements.
    fn check(&self) -> Result<(), ImageError> {
        let set = |name: &str, value: &Option<String>| match value {
            Some(v) => Err(unsupported(
                "unet",
                format!("{name} {v:?} is not supported"),
            )),
            None => Ok(()),
        };
        set("class_embed_type", &self.class_embed_type)?;
        let numbers = [
            ("time_cond_proj_dim", self.time_cond_proj_dim),
            ("encoder_hid_dim", self.encoder_hid_dim),
            ("time_embedding_dim", self.time_embedding_dim),
        ];
        if let Some((name, Some(v))) = numbers.iter().find(|(_, v)| v.is_some()) {
            return Err(unsupported("unet", format!("{name} {v} is not supported")));
        }
        let expected = [
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            ("act_fn", &self.act_fn, "silu"),
        ];
        for (name, value, only) in expected {
            if value.as_deref().is_some_and(|v| v != only) {
                return Err(unsupported(
                    "unet",
                    format!("{name} {value:?} (only {only:?})"),
                ));
            }
        }
        for (name, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel.is_some_and(|k| k != 3) {
                return Err(unsupported("unet", format!("{name} {kernel:?} (only 3)")));
            }
        }
        let only_cross = matches!(&self.only_cross_attention, serde_json::Value::Bool(true))
            || self
                .only_cross_attention
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == true));
        if !self.reverse_transformer_layers_per_block.is_null() {
            return Err(unsupported(
                "unet",
                "reverse_transformer_layers_per_block is not supported (up blocks mirror the down blocks)",
            ));
        }
        if self.dual_cross_attention || only_cross {
            return Err(unsupported(
                "unet",
                "dual or only cross-attention is not supported",
            ));
        }
        Ok(())
    }
}

impl UnetJson {
    /// The candle UNet configuration these keys describe.
    pub fn to_candle(&self) -> Result<UNet2DConditionModelConfig, ImageError> {
        self.unsupported.check()?;
        let blocks = self.block_out_channels.len();
        if blocks == 0
            || self.down_block_types.len() != blocks
            || self.up_block_types.len() != blocks
        {
            return Err(unsupported("unet", "block_out_channels, down_block_types and up_block_types must have the same non-zero length"));
        }
        if let Some(mid) = self
            .mid_block_type
            .as_deref()
            .filter(|m| *m != "UNetMidBlock2DCrossAttn")
        {
            return Err(unsupported(
                "unet",
                format!("mid_block_type {mid:?} is not supported"),
            ));
        }
        // diffusers' `attention_head_dim` historically holds the number of
        // heads; `num_attention_heads`, when set, is the same thing.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let heads = heads.expand(blocks, "attention_head_dim")?;
        let depth = self
            .transformer_layers_per_block
            .expand(blocks, "transformer_layers_per_block")?;
        let layers = self.layers_per_block.expand(blocks, "layers_per_block")?;
        if layers.iter().any(|l| *l != layers[0]) {
            return Err(unsupported(
                "unet",
                "layers_per_block must be the same for every block",
            ));
        }
        let cross = self
            .cross_attention_dim
            .expand(blocks, "cross_attention_dim")?;
        if cross.iter().any(|c| *c != cross[0]) {
            return Err(unsupported(
                "unet",
                "cross_attention_dim must be the same for every block",
            ));
        }
        let mut configs = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let use_cross_attn = self.block_attention(i)?.then_some(depth[i]);
            if heads[i] == 0 || !self.block_out_channels[i].is_multiple_of(heads[i]) {
                return Err(unsupported(
                    "unet",
                    format!(
                        "block {i}: {} channels do not split into {} heads",
                        self.block_out_channels[i], heads[i]
                    ),
                ));
            }
            configs.push(BlockConfig {
                out_channels: self.block_out_channels[i],
                use_cross_attn,
                attention_head_dim: heads[i],
            });
        }
        Ok(UNet2DConditionModelConfig {
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            blocks: configs,
            layers_per_block: layers[0],
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: cross[0],
            sliced_attention_size: None,
            use_linear_projection: self.use_linear_projection,
        })
    }

    /// The added conditioning the UNet expects, if any.
    pub fn text_time(&self) -> Result<Option<TextTimeShape>, ImageError> {
        match self.addition_embed_type.as_deref() {
            None => Ok(None),
            Some("text_time") => {
                let (Some(time_embed_dim), Some(input_dim)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return Err(unsupported("unet", "addition_embed_type \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim"));
                };
                // diffusers pads odd widths with a zero column; SDXL's are even.
                if time_embed_dim == 0 || !time_embed_dim.is_multiple_of(2) {
                    return Err(unsupported(
                        "unet",
                        format!("addition_time_embed_dim {time_embed_dim} (only even widths)"),
                    ));
                }
                Ok(Some(TextTimeShape {
                    time_embed_dim,
                    input_dim,
                }))
            }
            Some(other) => Err(unsupported(
                "unet",
                format!("addition_embed_type {other:?} is not supported (only \"text_time\")"),
            )),
        }
    }

    /// Whether down block `i` (and its mirror up block) has cross-attention;
    /// the candle UNet builds the up path as the mirror of the down path.
    fn block_attention(&self, i: usize) -> Result<bool, ImageError> {
        let mirror = &self.up_block_types[self.up_block_types.len() - 1 - i];
        let down = match self.down_block_types[i].as_str() {
            "CrossAttnDownBlock2D" => true,
            "DownBlock2D" => false,
            other => {
                return Err(unsupported(
                    "unet",
                    format!("down block type {other:?} is not supported"),
                ))
            }
        };
        let up = match mirror.as_str() {
            "CrossAttnUpBlock2D" => true,
            "UpBlock2D" => false,
            other => {
                return Err(unsupported(
                    "unet",
                    format!("up block type {other:?} is not supported"),
                ))
            }
        };
        if down != up {
            return Err(unsupported(
                "unet",
                format!(
                    "up block {mirror:?} does not mirror down block {:?}",
                    self.down_block_types[i]
                ),
            ));
        }
        Ok(down)
    }
}

fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn one_f64() -> f64 {
    1.0
}
fn eps_1e5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn per_block_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn per_block_two() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn per_block_eight() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn per_block_1280() -> PerBlock<usize> {
    PerBlock::One(1280)
}
