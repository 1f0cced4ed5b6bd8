//! The VAE's encoder, for img2img: pixels to the latent posterior's mean
//! and standard deviation.
//!
//! Built here from candle's blocks because candle's `AutoEncoderKL::encode`
//! hides the posterior and samples it with the device's global random
//! state; img2img samples it with the request's seeded noise instead.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};

use super::config::VaeJson;

/// The latent posterior N(mean, std²) of a picture.
pub struct Posterior {
    pub mean: Tensor,
    pub std: Tensor,
}

pub struct VaeEncoder {
    conv_in: candle_nn::Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: candle_nn::GroupNorm,
    conv_out: candle_nn::Conv2d,
    quant_conv: Option<candle_nn::Conv2d>,
}

fn conv3(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<candle_nn::Conv2d> {
    let config = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(from, to, 3, config, vb)
}

impl VaeEncoder {
    /// The encoder of the VAE whose weights `vae` holds (keys `encoder.*`
    /// and `quant_conv.*`), shaped as `json` says.
    pub fn new(vae: VarBuilder, json: &VaeJson) -> candle_core::Result<Self> {
        let vb = vae.pp("encoder");
        let channels = &json.block_out_channels;
        let groups = json.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (index, &out) in channels.iter().enumerate() {
            let config = DownEncoderBlock2DConfig {
                num_layers: json.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: groups,
                add_downsample: index + 1 < channels.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            let input = channels[index.saturating_sub(1)];
            let block_vb = vb.pp("down_blocks").pp(index.to_string());
            down_blocks.push(DownEncoderBlock2D::new(block_vb, input, out, config)?);
        }
        let last = channels[channels.len() - 1];
        let mid_config = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(groups),
            ..Default::default()
        };
        let latents = 2 * json.latent_channels;
        Ok(VaeEncoder {
            conv_in: conv3(vb.pp("conv_in"), json.in_channels, channels[0])?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(vb.pp("mid_block"), last, None, mid_config)?,
            conv_norm_out: candle_nn::group_norm(groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3(vb.pp("conv_out"), last, latents)?,
            quant_conv: json
                .use_quant_conv
                .then(|| {
                    candle_nn::conv2d(
                        latents,
                        latents,
                        1,
                        Default::default(),
                        vae.pp("quant_conv"),
                    )
                })
                .transpose()?,
        })
    }

    /// The posterior of `pixels`, `(1, 3, h, w)` in [-1, 1]. One picture at
    /// a time: candle's VAE attention mixes up larger batches.
    pub fn encode(&self, pixels: &Tensor) -> candle_core::Result<Posterior> {
        let mut xs = self.conv_in.forward(pixels)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs, None)?;
        let xs = candle_nn::ops::silu(&self.conv_norm_out.forward(&xs)?)?;
        let mut xs = self.conv_out.forward(&xs)?;
        if let Some(quant) = &self.quant_conv {
            xs = quant.forward(&xs)?;
        }
        let halves = xs.to_dtype(candle_core::DType::F32)?.chunk(2, 1)?;
        // diffusers clamps the log-variance before taking its square root.
        let log_var = halves[1].clamp(-30f32, 20f32)?;
        Ok(Posterior {
            mean: halves[0].clone(),
            std: (log_var * 0.5)?.exp()?,
        })
    }
}
