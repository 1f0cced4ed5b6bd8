//! The T5 encoder (transformers `T5EncoderModel`) FLUX reads its prompt
//! with: relative position buckets shared by every layer, RMS layer norms
//! without bias, attention without the 1/√d scale, and the gated-GELU (or
//! plain ReLU) feed-forward. Keys as transformers saves them
//! (`shared.weight`, `encoder.block.N.layer.M.…`), which are also the keys
//! of ComfyUI's `t5xxl_*.safetensors` files.

use crate::engine::interrupt;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::ImageError;

/// `text_encoder_2/config.json` of a `T5EncoderModel`, with transformers'
/// defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Json {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "thirty_two")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "one_twenty_eight")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "eps_1e6")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
    /// transformers 4.x configs may carry it beside `feed_forward_proj`.
    #[serde(default)]
    pub dense_act_fn: Option<String>,
}

fn thirty_two() -> usize {
    32
}
fn one_twenty_eight() -> usize {
    128
}
fn eps_1e6() -> f64 {
    1e-6
}
fn relu() -> String {
    "relu".into()
}

/// The feed-forward's activation and whether it is gated.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FeedForward {
    Relu,
    GatedGeluTanh,
}

impl T5Json {
    /// transformers maps `gated-gelu` to the tanh GELU (`gelu_new`); other
    /// gated activations and non-ReLU plain ones are refused by name.
    fn feed_forward(&self) -> std::result::Result<FeedForward, ImageError> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(FeedForward::GatedGeluTanh),
            "relu" => Ok(FeedForward::Relu),
            other => Err(ImageError::Unsupported(format!(
                "text_encoder_2/config.json: feed_forward_proj {other:?} is not supported (gated-gelu or relu)"
            ))),
        }
    }

    fn check(&self) -> std::result::Result<FeedForward, ImageError> {
        if self.num_heads == 0 || self.relative_attention_num_buckets < 4 {
            return Err(ImageError::Unsupported(format!(
                "text_encoder_2/config.json: num_heads {} and relative_attention_num_buckets {} must be positive (buckets at least 4)",
                self.num_heads, self.relative_attention_num_buckets
            )));
        }
        self.feed_forward()
    }
}

/// T5's layer norm: RMS without mean or bias, in f32.
struct T5Norm {
    weight: Tensor,
    eps: f64,
}

impl T5Norm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(T5Norm {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps as f32)
    }
}

fn linear(vb: VarBuilder, input: usize, output: usize) -> Result<Linear> {
    candle_nn::linear_no_bias(input, output, vb)
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, c: &T5Json) -> Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(SelfAttention {
            q: linear(vb.pp("q"), c.d_model, inner)?,
            k: linear(vb.pp("k"), c.d_model, inner)?,
            v: linear(vb.pp("v"), c.d_model, inner)?,
            o: linear(vb.pp("o"), inner, c.d_model)?,
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    /// `bias` is `(1, heads, seq, seq)`; T5 adds it to unscaled scores.
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (batch, seq, _) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, seq, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(xs)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out =
            weights
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((batch, seq, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

enum Dense {
    Relu {
        wi: Linear,
        wo: Linear,
    },
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

impl Dense {
    fn new(vb: VarBuilder, c: &T5Json, kind: FeedForward) -> Result<Self> {
        let wo = linear(vb.pp("wo"), c.d_ff, c.d_model)?;
        Ok(match kind {
            FeedForward::Relu => Dense::Relu {
                wi: linear(vb.pp("wi"), c.d_model, c.d_ff)?,
                wo,
            },
            FeedForward::GatedGeluTanh => Dense::Gated {
                wi_0: linear(vb.pp("wi_0"), c.d_model, c.d_ff)?,
                wi_1: linear(vb.pp("wi_1"), c.d_model, c.d_ff)?,
                wo,
            },
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Dense::Relu { wi, wo } => wo.forward(&wi.forward(xs)?.relu()?),
            Dense::Gated { wi_0, wi_1, wo } => {
                let gate = wi_0.forward(xs)?.gelu()?;
                wo.forward(&(gate * wi_1.forward(xs)?)?)
            }
        }
    }
}

struct Block {
    attention_norm: T5Norm,
    attention: SelfAttention,
    dense_norm: T5Norm,
    dense: Dense,
}

impl Block {
    fn new(vb: VarBuilder, c: &T5Json, kind: FeedForward) -> Result<Self> {
        let (attn, ff) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Block {
            attention_norm: T5Norm::new(attn.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            attention: SelfAttention::new(attn.pp("SelfAttention"), c)?,
            dense_norm: T5Norm::new(ff.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            dense: Dense::new(ff.pp("DenseReluDense"), c, kind)?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let attended = self
            .attention
            .forward(&self.attention_norm.forward(xs)?, bias)?;
        let xs = clamp_f16((xs + attended)?)?;
        let dense = self.dense.forward(&self.dense_norm.forward(&xs)?)?;
        clamp_f16((xs + dense)?)
    }
}

/// transformers keeps f16 activations finite by clamping them just below
/// f16's largest value; other dtypes pass unchanged.
fn clamp_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    let limit = 65504f64 - 1000.0;
    xs.clamp(-limit, limit)
}

/// `T5EncoderModel` up to `last_hidden_state`.
pub struct T5Encoder {
    embedding: Embedding,
    relative_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: T5Norm,
    buckets: usize,
    max_distance: usize,
}

impl T5Encoder {
    /// Builds the encoder from weights under `shared.` and `encoder.`.
    pub fn new(vb: VarBuilder, c: &T5Json) -> std::result::Result<Self, ImageError> {
        let kind = c.check()?;
        Ok(Self::build(vb, c, kind)?)
    }

    fn build(vb: VarBuilder, c: &T5Json, kind: FeedForward) -> Result<Self> {
        // transformers 5 may save the tied table only as the encoder's.
        let table = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
        } else {
            vb.pp("encoder.embed_tokens")
        };
        let encoder = vb.pp("encoder");
        let blocks = (0..c.num_layers)
            .map(|i| Block::new(encoder.pp("block").pp(i), c, kind))
            .collect::<Result<Vec<_>>>()?;
        let bias_vb = encoder.pp("block.0.layer.0.SelfAttention.relative_attention_bias");
        Ok(T5Encoder {
            embedding: candle_nn::embedding(c.vocab_size, c.d_model, table)?,
            relative_bias: candle_nn::embedding(
                c.relative_attention_num_buckets,
                c.num_heads,
                bias_vb,
            )?,
            blocks,
            final_norm: T5Norm::new(
                encoder.pp("final_layer_norm"),
                c.d_model,
                c.layer_norm_epsilon,
            )?,
            buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
        })
    }

    /// `last_hidden_state` for `(batch, seq)` ids, every position attended
    /// (FLUX passes no attention mask).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let seq = ids.dim(1)?;
        let bias = self.position_bias(seq, ids.device())?;
        let mut xs = self.embedding.forward(ids)?;
        for block in &self.blocks {
            interrupt::check()?;
            xs = block.forward(&xs, &bias)?;
        }
        self.final_norm.forward(&xs)
    }

    /// `(1, heads, seq, seq)` f32: the first layer's learned bias per
    /// relative-position bucket, which every layer adds.
    fn position_bias(&self, seq: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..seq)
            .flat_map(|query| (0..seq).map(move |key| (query, key)))
            .map(|(query, key)| {
                bidirectional_bucket(key as i64 - query as i64, self.buckets, self.max_distance)
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (seq, seq), device)?;
        self.relative_bias
            .forward(&buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?
            .contiguous()
    }
}

/// transformers' `_relative_position_bucket` for an encoder: half the
/// buckets for keys after the query; within each half, exact buckets for
/// short distances, then logarithmic ones up to `max_distance`.
fn bidirectional_bucket(relative: i64, buckets: usize, max_distance: usize) -> u32 {
    let half = (buckets / 2) as i64;
    let offset = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let exact = half / 2;
    if distance < exact {
        return (offset + distance) as u32;
    }
    // In f32, as torch computes it, then truncated toward zero.
    let log_ratio =
        (distance as f32 / exact as f32).ln() / (max_distance as f32 / exact as f32).ln();
    let large = exact + (log_ratio * (half - exact) as f32) as i64;
    (offset + large.min(half - 1)) as u32
}
