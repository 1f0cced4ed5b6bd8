//! The CLIP text encoders: `CLIPTextModel` (SD's, and FLUX's pooled
//! output) and, for SDXL's second encoder, `CLIPTextModelWithProjection`.
//!
//! Re-implemented here rather than taken from candle because candle's
//! `clip::Config` has private fields (it cannot be built from a
//! `config.json`), hard-codes the layer-norm epsilon, and maps `gelu` to
//! the tanh approximation where transformers uses the exact GELU.

use super::weights::TensorMap;
use crate::engine::image::attention::{attend, split_heads};
use crate::engine::interrupt;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};

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
/// with weights under `text_model.*` (see `with_text_model_prefix`).
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
        Ok(self.hidden_states(ids)?.last)
    }

    /// The penultimate layer's output and `last_hidden_state` for
    /// `(batch, seq)` token ids.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<HiddenStates> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, ids.device())?;
        // transformers' `hidden_states[-2]`: the input of the last layer,
        // which is the embeddings themselves for a one-layer encoder.
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            interrupt::check()?;
            penultimate = xs;
            xs = layer.forward(&penultimate, &mask)?;
        }
        Ok(HiddenStates {
            penultimate,
            last: self.final_layer_norm.forward(&xs)?,
        })
    }
}

/// What SDXL reads of a CLIP text encoder.
pub struct HiddenStates {
    /// transformers' `hidden_states[-2]` (no final layer norm).
    pub penultimate: Tensor,
    /// `last_hidden_state` (after the final layer norm).
    pub last: Tensor,
}

/// `CLIPTextModelWithProjection`: the encoder plus `text_projection` of the
/// pooled output (the end token's final state), SDXL's `text_embeds`.
pub struct ClipWithProjection {
    encoder: ClipTextModel,
    text_projection: Linear,
    eos_token_id: u32,
}

/// The projected encoder's outputs for one batch of ids.
pub struct ProjectedStates {
    pub penultimate: Tensor,
    /// `(batch, projection_dim)`.
    pub text_embeds: Tensor,
}

impl ClipWithProjection {
    pub fn new(
        vb: VarBuilder,
        c: &ClipConfig,
        projection_dim: usize,
        eos_token_id: u32,
    ) -> Result<Self> {
        Ok(ClipWithProjection {
            encoder: ClipTextModel::new(vb.clone(), c)?,
            text_projection: linear_no_bias(
                c.hidden_size,
                projection_dim,
                vb.pp("text_projection"),
            )?,
            eos_token_id,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<ProjectedStates> {
        let states = self.encoder.hidden_states(ids)?;
        let pooled = pooled_output(&states.last, ids, self.eos_token_id)?;
        Ok(ProjectedStates {
            penultimate: states.penultimate,
            text_embeds: self.text_projection.forward(&pooled)?,
        })
    }
}

/// `pooler_output`: each row's final state at its end token, `(batch,
/// hidden)`.
pub fn pooled_output(last: &Tensor, ids: &Tensor, eos_token_id: u32) -> Result<Tensor> {
    let rows = pooled_positions(ids, eos_token_id)?
        .into_iter()
        .enumerate()
        .map(|(row, position)| last.get(row)?.get(position))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// Where each row's pooled state is read, as transformers does: configs
/// from before its fix say `eos_token_id` 2 and are pooled at the largest
/// id (CLIP's end token is the last of its vocabulary); others at the
/// first end token.
fn pooled_positions(ids: &Tensor, eos_token_id: u32) -> Result<Vec<usize>> {
    let rows = ids.to_device(&Device::Cpu)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            if eos_token_id == 2 {
                first_position_of(row, row.iter().copied().max().unwrap_or(0))
            } else {
                first_position_of(row, eos_token_id)
            }
        })
        .collect())
}

/// The first index holding `id`, else 0 (what `argmax` of an all-false
/// comparison gives in transformers).
fn first_position_of(row: &[u32], id: u32) -> usize {
    row.iter().position(|&x| x == id).unwrap_or(0)
}

/// `weights` with every encoder tensor under `text_model.`: transformers 5
/// saves a `CLIPTextModel` without that prefix, which older files, the
/// projected model and LoRAs (`text_encoder.text_model.*`) all have.
pub fn with_text_model_prefix(weights: TensorMap) -> TensorMap {
    if weights.keys().any(|k| k.starts_with("text_model.")) {
        return weights;
    }
    weights
        .into_iter()
        .map(|(name, tensor)| (format!("text_model.{name}"), tensor))
        .collect()
}

/// `(seq, seq)` additive mask that hides later tokens from earlier ones.
fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)
}
