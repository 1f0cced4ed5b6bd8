//! The CLIP text encoder of a Stable Diffusion pipeline.
//!
//! Re-implemented here rather than taken from candle because candle's
//! `clip::Config` has private fields (it cannot be built from a
//! `config.json`), hard-codes the layer-norm epsilon, and maps `gelu` to
//! the tanh approximation where transformers uses the exact GELU.

use super::transformer::{attend, split_heads};
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};

/// The prefix of the text encoder's weight names as transformers 4 saves
/// `CLIPTextModel`.
const PREFIX: &str = "text_model.";

/// The text encoder's weights named as this module reads them: transformers
/// 5 saves `CLIPTextModel` without the `text_model.` prefix, so a file
/// whose names all lack it gets it added.
pub fn with_text_model_prefix(tensors: super::weights::TensorMap) -> super::weights::TensorMap {
    if tensors.keys().any(|name| name.starts_with(PREFIX)) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(name, tensor)| (format!("{PREFIX}{name}"), tensor))
        .collect()
}

/// The activation between the two MLP layers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::GeluErf => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
        }
    }
}

/// The text encoder's shape, from `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let dim = c.hidden_size;
        Ok(SelfAttention {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
        })
    }

    /// `(batch, seq, dim)` → `(batch, heads, seq, head_dim)` in f32, so the
    /// softmax is computed at full precision whatever the weights' dtype.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (batch, seq, dim) = xs.dims3()?;
        let scale = ((dim / self.heads) as f64).powf(-0.5);
        let q = split_heads(self.heads, &(self.q_proj.forward(xs)? * scale)?)?;
        let k = split_heads(self.heads, &self.k_proj.forward(xs)?)?;
        let v = split_heads(self.heads, &self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let out = attend(&scores, &v, xs.dtype(), (batch, seq, dim))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let dim = c.hidden_size;
        Ok(EncoderLayer {
            layer_norm1: layer_norm(dim, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), c)?,
            layer_norm2: layer_norm(dim, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(dim, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, dim, vb.pp("mlp.fc2"))?,
            activation: c.activation,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (attended + xs)?;
        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let mlp = self.fc2.forward(&self.activation.apply(&hidden)?)?;
        mlp + xs
    }
}

/// `CLIPTextModel` up to `last_hidden_state` (after the final layer norm),
/// with weights under `text_model.*`.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let embeddings = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder.layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextModel {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                embeddings.pp("token_embedding"),
            )?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                embeddings.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
        })
    }

    /// `last_hidden_state` for `(batch, seq)` token ids.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, ids.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}

/// `(seq, seq)` additive mask that hides later tokens from earlier ones.
fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}
