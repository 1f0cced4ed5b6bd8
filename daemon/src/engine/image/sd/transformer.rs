//! The UNet's attention blocks (diffusers `Transformer2DModel` with
//! `BasicTransformerBlock`s): self-attention, cross-attention to the text
//! embeddings, and a GEGLU feed-forward.
//!
//! Re-implemented here rather than taken from candle because candle's
//! GEGLU gates with the tanh approximation of GELU where diffusers uses the
//! exact (erf) GELU; against the reference that alone moves the first noise
//! prediction by ~6e-5 and the step latents past 1e-4.

use crate::engine::interrupt;
use candle_core::{Module, Result, Tensor};

use crate::engine::image::attention::{merge_heads, split_heads};
use candle_nn::{
    conv2d, group_norm, layer_norm, linear, linear_no_bias, Conv2d, GroupNorm, LayerNorm, Linear,
    VarBuilder,
};

/// Multi-head attention of `to_q`/`to_k`/`to_v`/`to_out.0`.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Attention {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// `(batch, seq, dim)` → `(batch, heads, seq, head_dim)` in f32, so the
    /// softmax runs at full precision whatever the weights' dtype.
    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, seq, dim) = xs.dims3()?;
        let q = split_heads(self.heads, &self.to_q.forward(xs)?)?;
        let k = split_heads(self.heads, &self.to_k.forward(context)?)?;
        let v = split_heads(self.heads, &self.to_v.forward(context)?)?;
        let scale = ((dim / self.heads) as f64).powf(-0.5);
        let out = super::attention::attention(&q, &k, &v, scale)?;
        self.to_out
            .forward(&merge_heads(&out, xs.dtype(), (batch, seq, dim))?)
    }
}

/// `ff.net.0.proj` (GEGLU, exact GELU on the gate half) then `ff.net.2`.
struct FeedForward {
    project_in: Linear,
    project_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            project_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            project_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let halves = self
            .project_in
            .forward(xs)?
            .chunk(2, candle_core::D::Minus1)?;
        let gated = (&halves[0] * halves[1].gelu_erf()?)?;
        self.project_out.forward(&gated)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let normed = self.norm1.forward(xs)?;
        let xs = (self.attn1.forward(&normed, &normed)? + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, context)? + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `proj_in`/`proj_out`: 1×1 convolutions, or linear layers when the
/// config says `use_linear_projection` (SD 2.x).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, from: usize, to: usize, linear_projection: bool) -> Result<Self> {
        Ok(if linear_projection {
            Projection::Linear(linear(from, to, vb)?)
        } else {
            Projection::Conv(conv2d(from, to, 1, Default::default(), vb)?)
        })
    }
}

/// The shape of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

/// diffusers `Transformer2DModel` on `(batch, channels, h, w)` features.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(vb: VarBuilder, shape: TransformerShape) -> Result<Self> {
        let c = shape.channels;
        let blocks = (0..shape.depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    c,
                    shape.context_dim,
                    shape.heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: group_norm(shape.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), c, c, shape.linear_projection)?,
            blocks,
            proj_out: Projection::new(vb.pp("proj_out"), c, c, shape.linear_projection)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, h, w) = xs.dims4()?;
        let to_tokens = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((batch, h * w, channels));
        let to_map = |t: Tensor| {
            t.reshape((batch, h, w, channels))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            interrupt::check()?;
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(tokens)?)?,
            Projection::Linear(linear) => to_map(linear.forward(&tokens)?)?,
        };
        out + xs
    }
}
