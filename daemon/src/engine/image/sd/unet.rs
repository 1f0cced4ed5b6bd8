//! The denoising UNet (diffusers `UNet2DConditionModel`, SD 1.x/2.x and
//! SDXL with its `text_time` added conditioning).
//!
//! Assembled here from candle's public timestep-embedding pieces rather
//! than taken whole from candle, because candle's UNet uses its tanh-GELU
//! attention blocks (see `transformer.rs`) and builds the resnets of plain
//! down/up blocks with a fixed 32 groups instead of the config's
//! `norm_num_groups` (the resnets are `resnet.rs`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::{
    embeddings::{TimestepEmbedding, Timesteps},
    unet_2d::{BlockConfig, UNet2DConditionModelConfig},
};

use super::conv::Conv3x3;
use super::resnet::{Resnet, ResnetShape};

use super::conditioning::{AddedConditioning, Conditioning};
use super::config::TextTimeShape;
use super::transformer::{SpatialTransformer, TransformerShape};

/// A down block's 3x3 convolution with stride 2.
fn downsampler(vb: VarBuilder, channels: usize, padding: usize) -> Result<Conv2d> {
    let config = Conv2dConfig {
        stride: 2,
        padding,
        ..Default::default()
    };
    conv2d(channels, channels, 3, config, vb)
}

/// What every block takes from the model's config.
struct Shared<'a> {
    config: &'a UNet2DConditionModelConfig,
    time_dim: usize,
}

impl Shared<'_> {
    fn resnet(&self, vb: VarBuilder, from: usize, to: usize, scale: f64) -> Result<Resnet> {
        let shape = ResnetShape {
            from,
            to,
            groups: self.config.norm_num_groups,
            eps: self.config.norm_eps,
            time_dim: Some(self.time_dim),
            scale,
        };
        Resnet::new(vb, shape)
    }

    fn transformer(
        &self,
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
    ) -> Result<SpatialTransformer> {
        let shape = TransformerShape {
            channels,
            heads,
            depth,
            context_dim: self.config.cross_attention_dim,
            groups: self.config.norm_num_groups,
            linear_projection: self.config.use_linear_projection,
        };
        SpatialTransformer::new(vb, shape)
    }

    /// A block's attention after each of its `layers` resnets, when the
    /// block has cross-attention; none otherwise.
    fn attentions(
        &self,
        vb: VarBuilder,
        block: &BlockConfig,
        layers: usize,
        channels: usize,
    ) -> Result<Vec<SpatialTransformer>> {
        let Some(depth) = block.use_cross_attn else {
            return Ok(Vec::new());
        };
        (0..layers)
            .map(|i| self.transformer(vb.pp(i), channels, block.attention_head_dim, depth))
            .collect()
    }
}

/// A down block: resnets, optional attention after each, optional downsampler.
struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    fn new(vb: VarBuilder, shared: &Shared, index: usize) -> Result<Self> {
        let blocks = &shared.config.blocks;
        let block = blocks[index];
        let from = if index == 0 {
            blocks[0].out_channels
        } else {
            blocks[index - 1].out_channels
        };
        let to = block.out_channels;
        let layers = shared.config.layers_per_block;
        let resnets = (0..layers)
            .map(|i| {
                shared.resnet(
                    vb.pp("resnets").pp(i),
                    if i == 0 { from } else { to },
                    to,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = shared.attentions(vb.pp("attentions"), &block, layers, to)?;
        let downsampler = (index + 1 < blocks.len())
            .then(|| {
                let padding = shared.config.downsample_padding;
                downsampler(vb.pp("downsamplers.0.conv"), to, padding)
            })
            .transpose()?;
        Ok(DownBlock {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// The block's output and the skip states it hands to the up path.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                xs = attention.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// An up block: resnets fed with skip states, optional attention after
/// each, optional nearest-neighbour upsampler.
struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Conv3x3>,
}

impl UpBlock {
    fn new(vb: VarBuilder, shared: &Shared, index: usize) -> Result<Self> {
        let channels: Vec<usize> = shared
            .config
            .blocks
            .iter()
            .rev()
            .map(|b| b.out_channels)
            .collect();
        let block = shared.config.blocks[channels.len() - 1 - index];
        let to = channels[index];
        let previous = if index == 0 {
            channels[0]
        } else {
            channels[index - 1]
        };
        let skip_in = channels[(index + 1).min(channels.len() - 1)];
        let layers = shared.config.layers_per_block + 1;
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i + 1 == layers { skip_in } else { to };
                let input = if i == 0 { previous } else { to };
                shared.resnet(vb.pp("resnets").pp(i), input + skip, to, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = shared.attentions(vb.pp("attentions"), &block, layers, to)?;
        let upsampler = (index + 1 < channels.len())
            .then(|| Conv3x3::new(vb.pp("upsamplers.0.conv"), to, to))
            .transpose()?;
        Ok(UpBlock {
            resnets,
            attentions,
            upsampler,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip states ran out".into()))?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                xs = attention.forward(&xs, context)?;
            }
        }
        let Some(upsampler) = &self.upsampler else {
            return Ok(xs);
        };
        // The next skip state's size, so odd sizes come back exactly.
        let (h, w) = match skips.last() {
            Some(skip) => (skip.dim(2)?, skip.dim(3)?),
            None => (xs.dim(2)? * 2, xs.dim(3)? * 2),
        };
        upsampler.forward(&xs.upsample_nearest2d(h, w)?)
    }
}

/// The mid block: resnet, attention, resnet.
struct MidBlock {
    first: Resnet,
    attention: SpatialTransformer,
    second: Resnet,
}

impl MidBlock {
    fn new(vb: VarBuilder, shared: &Shared) -> Result<Self> {
        let last = *shared
            .config
            .blocks
            .last()
            .ok_or_else(|| candle_core::Error::Msg("a UNet needs at least one block".into()))?;
        let c = last.out_channels;
        let scale = shared.config.mid_block_scale_factor;
        Ok(MidBlock {
            first: shared.resnet(vb.pp("resnets.0"), c, c, scale)?,
            attention: shared.transformer(
                vb.pp("attentions.0"),
                c,
                last.attention_head_dim,
                last.use_cross_attn.unwrap_or(1),
            )?,
            second: shared.resnet(vb.pp("resnets.1"), c, c, scale)?,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward(xs, Some(temb))?;
        let xs = self.attention.forward(&xs, context)?;
        self.second.forward(&xs, Some(temb))
    }
}

/// SDXL's added embedding: each time id through `add_time_proj`, those
/// after the pooled text embedding through `add_embedding`; the result is
/// added to the time embedding.
struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

impl TextTimeEmbedding {
    fn new(
        vb: VarBuilder,
        config: &UNet2DConditionModelConfig,
        shape: TextTimeShape,
        time_dim: usize,
    ) -> Result<Self> {
        Ok(TextTimeEmbedding {
            time_proj: Timesteps::new(
                shape.time_embed_dim,
                config.flip_sin_to_cos,
                config.freq_shift,
            ),
            embedding: TimestepEmbedding::new(vb.pp("add_embedding"), shape.input_dim, time_dim)?,
        })
    }

    /// `(batch, time_dim)` at `dtype`. The sinusoids are computed in f32,
    /// as diffusers does: sizes like 1024 lose their phase in f16.
    fn forward(&self, added: &AddedConditioning, dtype: DType) -> Result<Tensor> {
        let batch = added.text_embeds.dim(0)?;
        let times = self
            .time_proj
            .forward(&added.time_ids.to_dtype(DType::F32)?.flatten_all()?)?
            .reshape((batch, ()))?;
        let input = Tensor::cat(&[&added.text_embeds.to_dtype(DType::F32)?, &times], 1)?;
        self.embedding.forward(&input.to_dtype(dtype)?)
    }
}

pub struct Unet {
    conv_in: Conv3x3,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
    center_input: bool,
}

impl Unet {
    pub fn new(
        vb: VarBuilder,
        config: &UNet2DConditionModelConfig,
        (in_channels, out_channels): (usize, usize),
        text_time: Option<TextTimeShape>,
    ) -> Result<Self> {
        let c0 = config.blocks[0].out_channels;
        let shared = Shared {
            config,
            time_dim: c0 * 4,
        };
        let blocks = config.blocks.len();
        Ok(Unet {
            conv_in: Conv3x3::new(vb.pp("conv_in"), in_channels, c0)?,
            time_proj: Timesteps::new(c0, config.flip_sin_to_cos, config.freq_shift),
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), c0, c0 * 4)?,
            text_time: text_time
                .map(|shape| TextTimeEmbedding::new(vb.clone(), config, shape, c0 * 4))
                .transpose()?,
            down: (0..blocks)
                .map(|i| DownBlock::new(vb.pp("down_blocks").pp(i), &shared, i))
                .collect::<Result<Vec<_>>>()?,
            mid: MidBlock::new(vb.pp("mid_block"), &shared)?,
            up: (0..blocks)
                .map(|i| UpBlock::new(vb.pp("up_blocks").pp(i), &shared, i))
                .collect::<Result<Vec<_>>>()?,
            norm_out: group_norm(
                config.norm_num_groups,
                c0,
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: Conv3x3::new(vb.pp("conv_out"), c0, out_channels)?,
            center_input: config.center_input_sample,
        })
    }

    /// The model output for `xs` at `timestep`, conditioned on `cond`.
    pub fn forward(&self, xs: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        let batch = xs.dim(0)?;
        let xs = if self.center_input {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        let context = &cond.context;
        let temb = self.time_embedding(batch, timestep, cond, xs.dtype(), xs.device())?;
        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            xs = block.forward(&xs, &temb, context, &mut skips)?;
        }
        xs = self.mid.forward(&xs, &temb, context)?;
        for block in &self.up {
            xs = block.forward(&xs, &temb, context, &mut skips)?;
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }

    /// The time embedding, plus SDXL's added embedding when the UNet has one.
    fn time_embedding(
        &self,
        batch: usize,
        timestep: f64,
        cond: &Conditioning,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let times = (Tensor::ones(batch, dtype, device)? * timestep)?;
        let temb = self
            .time_embedding
            .forward(&self.time_proj.forward(&times)?)?;
        match (&self.text_time, &cond.added) {
            (None, None) => Ok(temb),
            (Some(text_time), Some(added)) => temb + text_time.forward(added, dtype)?,
            (Some(_), None) => Err(candle_core::Error::Msg(
                "this UNet needs SDXL's added conditioning (text_embeds, time_ids)".into(),
            )),
            (None, Some(_)) => Err(candle_core::Error::Msg(
                "this UNet has no added conditioning (addition_embed_type)".into(),
            )),
        }
    }
}
