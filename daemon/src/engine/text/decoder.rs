//! The decoder-only transformer behind every text architecture modeld runs
//! (Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, Phi-3; safetensors or
//! GGUF), written so that
//! several sequences decode together: each has its own KV cache and
//! position, and one decode step runs every weight matrix once for all of
//! them. Attention, the only part that differs per sequence, runs per
//! sequence against its own cache.

use crate::engine::interrupt;
use candle_core::{DType, Device, Result, Tensor, D};

use super::cpu::attention::{Heads, Sequence};
use super::cpu::{self, Mapped};
use super::linear::{Fused, Linear, RmsNorm};
pub use super::rope::Rope;

/// The token embedding table, looked up by row.
pub enum Embedding {
    Tensor(Tensor),
    /// In the mapped model file, f32 or quantized rows (CPU only).
    Mapped(Mapped),
}

impl Embedding {
    /// Rows of `tokens`, `[len, hidden]`, in f32 for a mapped table.
    fn lookup(&self, tokens: &[u32]) -> Result<Tensor> {
        match self {
            Embedding::Tensor(table) => {
                let ids = Tensor::new(tokens, table.device())?;
                table.index_select(&ids, 0)
            }
            Embedding::Mapped(table) => {
                let hidden = table.inputs();
                let mut values = vec![0f32; tokens.len() * hidden];
                for (token, row) in tokens.iter().zip(values.chunks_exact_mut(hidden)) {
                    let index = *token as usize;
                    if index >= table.features() {
                        candle_core::bail!(
                            "token {index} is past the vocabulary of {}",
                            table.features()
                        );
                    }
                    table.row(index, row);
                }
                Tensor::from_vec(values, (tokens.len(), hidden), &Device::Cpu)
            }
        }
    }
}

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
    pub flavour: Flavour,
}

/// What a family changes in the arithmetic of the shared layers.
#[derive(Debug, Clone)]
pub struct Flavour {
    /// Multiplies attention scores (`1/sqrt(head_dim)` unless the family
    /// says otherwise).
    pub attn_scale: f64,
    /// `tanh(s / c) * c` on attention scores before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// The same on the final logits.
    pub final_softcap: Option<f64>,
    /// Multiplies the embeddings, rounded to the model's dtype (Gemma).
    pub embed_scale: Option<f64>,
    /// How many leading channels of each head RoPE rotates (Phi's
    /// `partial_rotary_factor`); the rest pass through.
    pub rotary_dim: usize,
}

impl Flavour {
    /// Llama's arithmetic for heads of `head_dim` channels.
    pub fn plain(head_dim: usize) -> Self {
        Flavour {
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            embed_scale: None,
            rotary_dim: head_dim,
        }
    }
}

/// The gate's activation in the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU's tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact (erf) GELU.
    Gelu,
}

impl Shape {
    /// The attention settings the CPU's decode attention reads.
    fn decode_heads(&self) -> Heads {
        Heads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: self.flavour.attn_scale as f32,
            softcap: self.flavour.attn_softcap.map(|cap| cap as f32),
        }
    }

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
    pub activation: Activation,
}

pub struct Layer {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    /// Gemma normalizes the attention's and the MLP's outputs too.
    pub post_attn_norm: Option<RmsNorm>,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
    pub post_mlp_norm: Option<RmsNorm>,
    /// Which of the decoder's RoPE tables this layer rotates by (Gemma 3's
    /// local layers use another base).
    pub rope: usize,
}

impl Layer {
    /// Adds the attention output `a` to the residual stream `x`, then runs
    /// the MLP block.
    fn finish(&self, x: Tensor, a: &Tensor) -> Result<Tensor> {
        let mut a = self.attn.o.forward(a)?;
        if let Some(norm) = &self.post_attn_norm {
            a = norm.forward(&a)?;
        }
        let x = (x + a)?;
        let mut m = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        if let Some(norm) = &self.post_mlp_norm {
            m = norm.forward(&m)?;
        }
        x + m
    }
}

/// One sequence's keys and values, per layer, in buffers sized for the
/// whole sequence when it is admitted.
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    capacity: usize,
    /// Every token stored, for LongRoPE's recomputation when a sequence
    /// crosses its switch.
    tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(layers: usize, capacity: usize) -> Self {
        KvCache {
            layers: (0..layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity.max(1)))
                .collect(),
            capacity,
            tokens: Vec::new(),
        }
    }

    /// Empties the cache, keeping its size, and returns the tokens it held.
    fn clear(&mut self) -> Vec<u32> {
        let tokens = std::mem::take(&mut self.tokens);
        *self = KvCache::new(self.layers.len(), self.capacity);
        tokens
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
    pub embed: Embedding,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    /// The RoPE tables layers pick from by [`Layer::rope`].
    pub ropes: Vec<Rope>,
    /// The dtype activations run in.
    pub dtype: DType,
    /// The dtype keys and values are cached in: f16 for quantized weights
    /// on the CPU, as llama.cpp caches them, else `dtype`.
    pub kv_dtype: DType,
    /// Last, so that it drops after the weights: waits for the thread
    /// that repacks them to let their file go, before an unload measures
    /// what it freed.
    pub settle: cpu::SettleOnDrop,
}

impl Decoder {
    /// Runs `tokens` of one sequence from its cache's position (a prompt,
    /// or any tokens not yet seen); returns the last position's logits,
    /// `[1, vocab]` in f32.
    pub fn prefill(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let offset = cache.positions();
        if offset > 0 && self.recomputes(offset, tokens.len()) {
            let mut all = cache.clear();
            all.extend_from_slice(tokens);
            return self.prefill(&all, cache);
        }
        cache.tokens.extend_from_slice(tokens);
        // The thread that repacks CPU weights after a load waits meanwhile.
        let _running = (tokens.len() > cpu::MAX_ROWS).then(cpu::PromptRunning::start);
        let tables = self
            .ropes
            .iter_mut()
            .map(|rope| rope.span(offset, tokens.len()))
            .collect::<Result<Vec<_>>>()?;
        let mut x = self.embed(tokens)?.unsqueeze(0)?;
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            // A long prompt on the CPU takes seconds per layer: a cancel is
            // honoured between them.
            interrupt::check()?;
            let (cos, sin) = &tables[layer.rope];
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.attn.project(&h, &self.shape, cos, sin)?;
            let (k, v) = kv.append(&k.to_dtype(self.kv_dtype)?, &v.to_dtype(self.kv_dtype)?)?;
            let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
            let a = attend(&q, &k, &v, offset, layer.attn.window, &self.shape)?;
            x = layer.finish(x, &a.unsqueeze(0)?)?;
        }
        let last = x.narrow(1, tokens.len() - 1, 1)?.squeeze(1)?;
        self.logits(&last)
    }

    /// One decode step for several sequences: `tokens[i]` is the next
    /// token of the sequence whose cache is `caches[i]`. Returns logits
    /// `[batch, vocab]` in f32, one row per sequence.
    pub fn decode(&mut self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let redo: Vec<bool> = caches
            .iter()
            .map(|c| self.recomputes(c.positions(), 1))
            .collect();
        if !redo.contains(&true) {
            return self.decode_batch(tokens, caches);
        }
        let mut rows: Vec<Option<Tensor>> = vec![None; tokens.len()];
        let (mut rest, mut rest_tokens, mut rest_rows) = (Vec::new(), Vec::new(), Vec::new());
        for (i, cache) in caches.iter_mut().enumerate() {
            if redo[i] {
                rows[i] = Some(self.prefill(&tokens[i..=i], cache)?);
            } else {
                rest.push(&mut **cache);
                rest_tokens.push(tokens[i]);
                rest_rows.push(i);
            }
        }
        if !rest.is_empty() {
            let logits = self.decode_batch(&rest_tokens, &mut rest)?;
            for (n, i) in rest_rows.into_iter().enumerate() {
                rows[i] = Some(logits.narrow(0, n, 1)?);
            }
        }
        Tensor::cat(&rows.into_iter().flatten().collect::<Vec<_>>(), 0)
    }

    /// Whether running `len` tokens from `offset` crosses a LongRoPE
    /// switch with positions already cached: transformers then drops the
    /// cache and runs the whole sequence again with the long factors.
    fn recomputes(&self, offset: usize, len: usize) -> bool {
        self.ropes.iter().any(|rope| {
            rope.switch()
                .is_some_and(|s| offset <= s && s < offset + len)
        })
    }

    fn decode_batch(&mut self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let batch = tokens.len();
        for (cache, token) in caches.iter_mut().zip(tokens) {
            cache.tokens.push(*token);
        }
        let positions: Vec<u32> = caches.iter().map(|c| c.positions() as u32).collect();
        let tables = self
            .ropes
            .iter_mut()
            .map(|rope| rope.at(&positions))
            .collect::<Result<Vec<_>>>()?;
        let heads = self.shape.decode_heads();
        let mut x = self.embed(tokens)?.unsqueeze(1)?;
        for (n, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = &tables[layer.rope];
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.attn.project(&h, &self.shape, cos, sin)?;
            let (k, v) = (k.to_dtype(self.kv_dtype)?, v.to_dtype(self.kv_dtype)?);
            let mut sequences = Vec::with_capacity(batch);
            let window = layer.attn.window.unwrap_or(usize::MAX);
            for (i, cache) in caches.iter_mut().enumerate() {
                let (k, v) = cache.layers[n].append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
                let offset = positions[i] as usize;
                sequences.push(Sequence {
                    q: q.narrow(0, i, 1)?,
                    k,
                    v,
                    // The mask's rule for one new token: keys within the window.
                    first_visible: (offset + 1).saturating_sub(window),
                });
            }
            let attended = match cpu::attention::attend(&sequences, &heads)? {
                Some(attended) => attended,
                None => {
                    let window = layer.attn.window;
                    let rows = sequences
                        .iter()
                        .zip(&positions)
                        .map(|(s, p)| {
                            let (k, v) = (s.k.to_dtype(s.q.dtype())?, s.v.to_dtype(s.q.dtype())?);
                            attend(&s.q, &k, &v, *p as usize, window, &self.shape)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::stack(&rows, 0)?
                }
            };
            x = layer.finish(x, &attended)?;
        }
        self.logits(&x.squeeze(1)?)
    }

    /// The embeddings of `tokens`, `[len, hidden]`, scaled where the family
    /// scales them.
    fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let x = self.embed.lookup(tokens)?;
        match self.shape.flavour.embed_scale {
            // transformers rounds the factor to the model's dtype first.
            Some(scale) => {
                x.broadcast_mul(&Tensor::new(scale as f32, x.device())?.to_dtype(x.dtype())?)
            }
            None => Ok(x),
        }
    }

    /// `x`: `[rows, hidden]` → f32 logits `[rows, vocab]`.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(x)?;
        let logits = self.lm_head.forward(&h)?;
        let logits = match self.shape.flavour.final_softcap {
            Some(cap) => softcap(&logits, cap)?,
            None => logits,
        };
        logits.to_dtype(DType::F32)
    }
}

/// `tanh(x / cap) * cap`: bounds `x` smoothly to `(-cap, cap)`.
fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
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
        let rotary = shape.flavour.rotary_dim;
        let rotate = |x: Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.contiguous()?;
            let turn = |x: &Tensor| {
                if shape.interleaved_rope {
                    candle_nn::rotary_emb::rope_i(x, cos, sin)
                } else {
                    candle_nn::rotary_emb::rope(x, cos, sin)
                }
            };
            if rotary == shape.head_dim {
                return turn(&x);
            }
            // Partial rotary: only the leading channels turn.
            let turned = turn(&x.narrow(3, 0, rotary)?.contiguous()?)?;
            let kept = x.narrow(3, rotary, shape.head_dim - rotary)?;
            Tensor::cat(&[turned, kept], 3)?.contiguous()
        };
        Ok((rotate(q)?, rotate(k)?, v.transpose(1, 2)?.contiguous()?))
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self.gate_up.forward(x)?.try_into().map_err(|_| {
            candle_core::Error::Msg("gate/up projections: expected 2 outputs".into())
        })?;
        let gated = match self.activation {
            Activation::Silu => match cpu::gate::silu_times(&gate, &up)? {
                Some(gated) => gated,
                None => (candle_nn::ops::silu(&gate)? * up)?,
            },
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        self.down.forward(&gated)
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
    let flavour = &shape.flavour;
    let mut scores = (q.matmul(&k.t()?)? * flavour.attn_scale)?.to_dtype(DType::F32)?;
    if let Some(cap) = flavour.attn_softcap {
        scores = softcap(&scores, cap)?;
    }
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
