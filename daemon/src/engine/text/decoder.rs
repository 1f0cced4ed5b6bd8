//! The decoder-only transformer behind every text architecture modeld runs
//! (Llama, Mistral, Qwen2, Qwen3; safetensors or GGUF), written so that
//! several sequences decode together: each has its own KV cache and
//! position, and one decode step runs every weight matrix once for all of
//! them. Attention, the only part that differs per sequence, runs per
//! sequence against its own cache.

use crate::engine::interrupt;
use candle_core::{DType, Device, Result, Tensor, D};

use super::linear::{Fused, Linear, RmsNorm};

/// The shapes and settings one model's layers share.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub vocab: usize,
    pub eps: f64,
    /// Rotate interleaved pairs (GGUF llama, whose q/k rows llama.cpp
    /// permuted) rather than the two halves of each head.
    pub interleaved_rope: bool,
}

impl Shape {
    /// Bytes of keys and values one position takes in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * dtype.size_in_bytes()) as u64
    }
}

pub struct Attention {
    /// The query, key and value projections.
    pub qkv: Fused,
    pub o: Linear,
    /// Qwen3 normalizes each head's queries and keys before rotating them.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Sliding-window attention: how many positions back a token sees.
    pub window: Option<usize>,
}

pub struct Mlp {
    /// The gate and up projections.
    pub gate_up: Fused,
    pub down: Linear,
}

pub struct Layer {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

/// Rotary embedding tables, grown on demand: a model may allow a million
/// positions, while requests use a few thousand.
pub struct Rope {
    inv_freq: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
}

const ROPE_CHUNK: usize = 4096;

impl Rope {
    pub fn new(inv_freq: Vec<f32>, dtype: DType, device: &Device) -> Result<Self> {
        let (cos, sin) = rope_tables(&inv_freq, ROPE_CHUNK, dtype, device)?;
        Ok(Rope { inv_freq, cos, sin })
    }

    fn ensure(&mut self, positions: usize) -> Result<()> {
        let have = self.cos.dim(0)?;
        if positions > have {
            let size = positions.div_ceil(ROPE_CHUNK) * ROPE_CHUNK;
            let (cos, sin) =
                rope_tables(&self.inv_freq, size, self.cos.dtype(), self.cos.device())?;
            self.cos = cos;
            self.sin = sin;
        }
        Ok(())
    }
}

fn rope_tables(
    inv_freq: &[f32],
    positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let freqs = Tensor::new(inv_freq, device)?;
    let t = Tensor::arange(0u32, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?;
    let angles = t.broadcast_mul(&freqs.reshape((1, inv_freq.len()))?)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// One sequence's keys and values, per layer, in buffers sized for the
/// whole sequence when it is admitted.
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl KvCache {
    pub fn new(layers: usize, capacity: usize) -> Self {
        KvCache {
            layers: (0..layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity.max(1)))
                .collect(),
        }
    }

    /// Positions already stored.
    pub fn positions(&self) -> usize {
        self.layers
            .first()
            .map_or(0, candle_nn::kv_cache::KvCache::current_seq_len)
    }
}

pub struct Decoder {
    pub shape: Shape,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: Rope,
    /// The dtype activations run in.
    pub dtype: DType,
}

impl Decoder {
    /// Runs `tokens` of one sequence from its cache's position (a prompt,
    /// or any tokens not yet seen); returns the last position's logits,
    /// `[1, vocab]` in f32.
    pub fn prefill(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let device = self.embed.device().clone();
        let offset = cache.positions();
        self.rope.ensure(offset + tokens.len())?;
        let ids = Tensor::new(tokens, &device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let cos = self.rope.cos.narrow(0, offset, tokens.len())?;
        let sin = self.rope.sin.narrow(0, offset, tokens.len())?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // A long prompt on the CPU takes seconds per layer: a cancel is
            // honoured between them.
            interrupt::check()?;
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.attn.project(&h, &self.shape, &cos, &sin)?;
            let (k, v) = kv.append(&k, &v)?;
            let a = attend(&q, &k, &v, offset, layer.attn.window, &self.shape)?;
            x = (x + layer.attn.o.forward(&a.unsqueeze(0)?)?)?;
            x = (&x + layer.mlp.forward(&layer.mlp_norm.forward(&x)?)?)?;
        }
        let last = x.narrow(1, tokens.len() - 1, 1)?.squeeze(1)?;
        self.logits(&last)
    }

    /// One decode step for several sequences: `tokens[i]` is the next
    /// token of the sequence whose cache is `caches[i]`. Returns logits
    /// `[batch, vocab]` in f32, one row per sequence.
    pub fn decode(&mut self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let device = self.embed.device().clone();
        let batch = tokens.len();
        let positions: Vec<u32> = caches.iter().map(|c| c.positions() as u32).collect();
        let furthest = positions.iter().max().map_or(0, |p| *p as usize + 1);
        self.rope.ensure(furthest)?;
        let index = Tensor::new(positions.as_slice(), &device)?;
        let half = self.shape.head_dim / 2;
        let cos = self
            .rope
            .cos
            .index_select(&index, 0)?
            .reshape((batch, 1, half))?;
        let sin = self
            .rope
            .sin
            .index_select(&index, 0)?
            .reshape((batch, 1, half))?;
        let ids = Tensor::new(tokens, &device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(1)?;
        for (n, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.attn.project(&h, &self.shape, &cos, &sin)?;
            let mut rows = Vec::with_capacity(batch);
            for (i, cache) in caches.iter_mut().enumerate() {
                let (k, v) = cache.layers[n].append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
                let q = q.narrow(0, i, 1)?;
                let offset = positions[i] as usize;
                rows.push(attend(&q, &k, &v, offset, layer.attn.window, &self.shape)?);
            }
            let a = Tensor::stack(&rows, 0)?;
            x = (x + layer.attn.o.forward(&a)?)?;
            x = (&x + layer.mlp.forward(&layer.mlp_norm.forward(&x)?)?)?;
        }
        self.logits(&x.squeeze(1)?)
    }

    /// `x`: `[rows, hidden]` → f32 logits `[rows, vocab]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        self.lm_head.forward(&h)?.to_dtype(DType::F32)
    }
}

impl Attention {
    /// Queries, keys and values of `h` (`[batch, seq, hidden]`), as
    /// `[batch, heads, seq, head_dim]`, rotated for their positions.
    fn project(
        &self,
        h: &Tensor,
        shape: &Shape,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, seq, _) = h.dims3()?;
        let split = |x: Tensor, heads: usize| x.reshape((batch, seq, heads, shape.head_dim));
        let [q, k, v]: [Tensor; 3] =
            self.qkv.forward(h)?.try_into().map_err(|_| {
                candle_core::Error::Msg("q/k/v projections: expected 3 outputs".into())
            })?;
        let mut q = split(q, shape.heads)?;
        let mut k = split(k, shape.kv_heads)?;
        let v = split(v, shape.kv_heads)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let rotate = |x: Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.contiguous()?;
            if shape.interleaved_rope {
                candle_nn::rotary_emb::rope_i(&x, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(&x, cos, sin)
            }
        };
        Ok((rotate(q)?, rotate(k)?, v.transpose(1, 2)?.contiguous()?))
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self.gate_up.forward(x)?.try_into().map_err(|_| {
            candle_core::Error::Msg("gate/up projections: expected 2 outputs".into())
        })?;
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

/// Attention of one sequence: `q` `[1, heads, seq, d]` at positions from
/// `offset`, against all its keys and values `[1, kv_heads, len, d]`.
/// Returns `[seq, heads * d]`. Query heads that share a key head are
/// grouped into one product rather than copying the keys per head.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    window: Option<usize>,
    shape: &Shape,
) -> Result<Tensor> {
    let seq = q.dim(2)?;
    let len = k.dim(2)?;
    let (kv_heads, group, d) = (shape.kv_heads, shape.heads / shape.kv_heads, shape.head_dim);
    let q = q.reshape((kv_heads, group * seq, d))?;
    let k = k.squeeze(0)?;
    let v = v.squeeze(0)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    if let Some(mask) = mask(seq, len, offset, window, q.device())? {
        scores = scores
            .reshape((kv_heads, group, seq, len))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * seq, len))?;
    }
    let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    weights
        .matmul(&v.contiguous()?)?
        .reshape((shape.heads, seq, d))?
        .transpose(0, 1)?
        .reshape((seq, shape.heads * d))
}

/// The additive mask of `seq` new positions from `offset` over `len` keys:
/// causal, and limited to the window when there is one. `None` when every
/// key is visible (a single new token with no window in reach).
fn mask(
    seq: usize,
    len: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let window = window.unwrap_or(usize::MAX);
    if seq == 1 && len <= window {
        return Ok(None);
    }
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| {
            let position = offset + i;
            (0..len).map(move |j| {
                let visible = j <= position && position - j < window;
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(values, (seq, len), device)?))
}

/// Argmax of each row of `logits` (`[rows, vocab]`), computed where the
/// logits are: only the ids cross to the host.
pub fn greedy(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        let m = mask(2, 4, 2, None, &Device::Cpu).unwrap().unwrap();
        let rows = m.to_vec2::<f32>().unwrap();
        assert_eq!(rows[0][..3], [0.0, 0.0, 0.0]);
        assert!(rows[0][3].is_infinite());
        assert!(rows[1].iter().all(|v| *v == 0.0));
        let m = mask(1, 4, 3, Some(2), &Device::Cpu).unwrap().unwrap();
        let row = &m.to_vec2::<f32>().unwrap()[0];
        assert!(row[0].is_infinite() && row[1].is_infinite());
        assert_eq!(row[2..], [0.0, 0.0]);
        assert!(mask(1, 4, 3, None, &Device::Cpu).unwrap().is_none());
    }
}
