//! The VAE's decoder: latents to pixels (diffusers `AutoencoderKL`'s
//! `post_quant_conv` and `decoder`). Built here rather than taken from
//! candle's `AutoEncoderKL` so that its 3x3 convolutions and its one-head
//! attention over every latent position run on `conv.rs` and
//! `attention.rs` on the CPU (candle's attention allocates the whole
//! positions² score matrix), and so that a batch of pictures decodes at
//! once (candle's attention mixes up the pictures of a batch).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, GroupNorm, Linear, VarBuilder};

use super::config::VaeJson;
use super::conv::Conv3x3;
use super::resnet::{Resnet, ResnetShape};

/// The mid block's attention: one head over every position, with a
/// residual. Its projections are `to_q`/`to_k`/`to_v`/`to_out.0`, or in
/// older checkpoints `query`/`key`/`value`/`proj_attn`, as linear or 1x1
/// convolution weights.
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

/// A `channels × channels` projection stored as a linear or a 1x1
/// convolution weight.
fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(weight) => weight,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

impl Attention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Attention {
            norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            q: projection(vb.pp(names[0]), channels)?,
            k: projection(vb.pp(names[1]), channels)?,
            v: projection(vb.pp(names[2]), channels)?,
            out: projection(vb.pp(names[3]), channels)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch, channels, h, w) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((batch, channels, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let head = |proj: &Linear| -> Result<Tensor> {
            proj.forward(&tokens)?
                .unsqueeze(1)?
                .to_dtype(candle_core::DType::F32)
        };
        let scale = (channels as f64).powf(-0.5);
        let attended =
            super::attention::attention(&head(&self.q)?, &head(&self.k)?, &head(&self.v)?, scale)?
                .squeeze(1)?
                .to_dtype(xs.dtype())?;
        let out = self
            .out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((batch, channels, h, w))?;
        out + xs
    }
}

/// An up block: resnets, then (but for the last block) a nearest-neighbour
/// doubling and a 3x3 convolution.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsampler: Option<Conv3x3>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        let Some(upsampler) = &self.upsampler else {
            return Ok(xs);
        };
        let (_, _, h, w) = xs.dims4()?;
        upsampler.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv3x3,
    mid: (Resnet, Attention, Resnet),
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl VaeDecoder {
    /// The decoder of the VAE whose weights `vae` holds (keys `decoder.*`
    /// and `post_quant_conv.*`), shaped as `json` says.
    pub fn new(vae: VarBuilder, json: &VaeJson) -> Result<Self> {
        let vb = vae.pp("decoder");
        let channels: Vec<usize> = json.block_out_channels.iter().rev().copied().collect();
        let groups = json.norm_num_groups;
        let resnet = |vb: VarBuilder, from: usize, to: usize| {
            let shape = ResnetShape {
                from,
                to,
                groups,
                eps: 1e-6,
                time_dim: None,
                scale: 1.0,
            };
            Resnet::new(vb, shape)
        };
        let top = channels[0];
        let mid_vb = vb.pp("mid_block");
        let mid = (
            resnet(mid_vb.pp("resnets.0"), top, top)?,
            Attention::new(mid_vb.pp("attentions.0"), top, groups)?,
            resnet(mid_vb.pp("resnets.1"), top, top)?,
        );
        let mut up = Vec::with_capacity(channels.len());
        for (index, &to) in channels.iter().enumerate() {
            let block_vb = vb.pp("up_blocks").pp(index);
            let from = channels[index.saturating_sub(1)];
            let resnets = (0..=json.layers_per_block)
                .map(|i| {
                    resnet(
                        block_vb.pp("resnets").pp(i),
                        if i == 0 { from } else { to },
                        to,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = (index + 1 < channels.len())
                .then(|| Conv3x3::new(block_vb.pp("upsamplers.0.conv"), to, to))
                .transpose()?;
            up.push(UpBlock { resnets, upsampler });
        }
        let bottom = channels[channels.len() - 1];
        let latents = json.latent_channels;
        Ok(VaeDecoder {
            post_quant_conv: json
                .use_post_quant_conv
                .then(|| {
                    conv2d(
                        latents,
                        latents,
                        1,
                        Default::default(),
                        vae.pp("post_quant_conv"),
                    )
                })
                .transpose()?,
            conv_in: Conv3x3::new(vb.pp("conv_in"), latents, top)?,
            mid,
            up,
            norm_out: group_norm(groups, bottom, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: Conv3x3::new(vb.pp("conv_out"), bottom, json.out_channels)?,
        })
    }

    /// `(batch, latent_channels, h, w)` scaled latents → `(batch,
    /// out_channels, h × f, w × f)` pixels in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let xs = self.conv_in.forward(&xs)?;
        let (first, attention, second) = &self.mid;
        let xs = first.forward(&xs, None)?;
        let xs = attention.forward(&xs)?;
        let mut xs = second.forward(&xs, None)?;
        for block in &self.up {
            xs = block.forward(&xs)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&xs)?.silu()?)
    }
}
