//! diffusers `ResnetBlock2D`, shared by the UNet (with a time embedding)
//! and the VAE decoder (without): its own rather than candle's so that the
//! 3x3 convolutions run on `conv.rs`.

use crate::engine::interrupt;
use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, linear, Conv2d, GroupNorm, Linear, VarBuilder};

use super::conv::Conv3x3;

/// The shape of one resnet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetShape {
    pub from: usize,
    pub to: usize,
    pub groups: usize,
    pub eps: f64,
    /// The time embedding's width; `None` in the VAE.
    pub time_dim: Option<usize>,
    /// `output_scale_factor`.
    pub scale: f64,
}

/// Norm, SiLU, convolution, (+ time embedding), norm, SiLU, convolution,
/// plus the input (through a 1x1 convolution when the width changes),
/// divided by `output_scale_factor`.
pub struct Resnet {
    norm1: GroupNorm,
    conv1: Conv3x3,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv3x3,
    shortcut: Option<Conv2d>,
    scale: f64,
}

impl Resnet {
    pub fn new(vb: VarBuilder, shape: ResnetShape) -> Result<Self> {
        let ResnetShape {
            from,
            to,
            groups,
            eps,
            time_dim,
            scale,
        } = shape;
        Ok(Resnet {
            norm1: group_norm(groups, from, eps, vb.pp("norm1"))?,
            conv1: Conv3x3::new(vb.pp("conv1"), from, to)?,
            time_emb_proj: time_dim
                .map(|dim| linear(dim, to, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(groups, to, eps, vb.pp("norm2"))?,
            conv2: Conv3x3::new(vb.pp("conv2"), to, to)?,
            shortcut: (from != to)
                .then(|| conv2d(from, to, 1, Default::default(), vb.pp("conv_shortcut")))
                .transpose()?,
            scale,
        })
    }

    /// `temb` is the UNet's time embedding; `None` in the VAE.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // The UNet's and the VAE's main pieces of work: where a cancel is
        // honoured midway through a step or a decode.
        interrupt::check()?;
        let shortcut = match &self.shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let mut hidden = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let time = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            hidden = hidden.broadcast_add(&time)?;
        }
        let hidden = self.conv2.forward(&self.norm2.forward(&hidden)?.silu()?)?;
        (shortcut + hidden)? / self.scale
    }
}
