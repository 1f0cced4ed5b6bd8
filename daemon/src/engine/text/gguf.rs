//! Builds a [`Decoder`] from a GGUF file with llama.cpp's tensor names and
//! metadata keys (llama, qwen2, qwen3, gemma2, gemma3, phi3), quantized
//! tensors kept quantized. Activations run in f32, as quantized kernels
//! want. llama.cpp's converter stores Gemma's norms as `1 + w` already.
//! On the CPU the matrices and the embedding are used where they lie in
//! the mapped file.

use std::path::Path;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use super::cpu::{Mapped, MappedFile};
use super::decoder::{Activation, Attention, Decoder, Embedding, Flavour, Layer, Mlp, Rope, Shape};
use super::family::inv_freq;
use super::linear::{Fused, Linear, RmsNorm};
use super::{BadFile, EngineError};

/// Reads tensors out of a GGUF file by name.
struct GgufReader<'a> {
    content: &'a gguf_file::Content,
    file: std::fs::File,
    device: &'a Device,
    /// The whole file, on the CPU.
    mapped: Option<MappedFile>,
}

impl GgufReader<'_> {
    fn tensor(&mut self, name: &str) -> candle_core::Result<QTensor> {
        self.content.tensor(&mut self.file, name, self.device)
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor needed whole (norms, biases, the embedding table), in f32.
    fn dense(&mut self, name: &str) -> candle_core::Result<Tensor> {
        self.tensor(name)?.dequantize(self.device)
    }

    fn linear(&mut self, name: &str, bias: bool) -> candle_core::Result<Linear> {
        let bias = if bias {
            Some(self.dense(&format!("{name}.bias"))?)
        } else {
            None
        };
        let weight_name = format!("{name}.weight");
        if let Some(weight) = self.in_place(&weight_name) {
            return Ok(Linear::mapped(weight, bias));
        }
        Linear::quantized(self.tensor(&weight_name)?, bias, DType::F32)
    }

    /// The 2-D tensor `name` where it lies in the mapped file, when the
    /// CPU kernels read its type.
    fn in_place(&self, name: &str) -> Option<Mapped> {
        let file = self.mapped.as_ref()?;
        let info = self.content.tensor_infos.get(name)?;
        let [features, inputs] = info.shape.dims()[..] else {
            return None;
        };
        let offset = usize::try_from(self.content.tensor_data_offset + info.offset).ok()?;
        file.matrix(offset, info.ggml_dtype, features, inputs).ok()
    }

    fn embedding(&mut self, name: &str) -> candle_core::Result<Embedding> {
        match self.in_place(name) {
            Some(table) => Ok(Embedding::Mapped(table)),
            None => Ok(Embedding::Tensor(self.dense(name)?)),
        }
    }

    fn norm(&mut self, name: &str, eps: f64) -> candle_core::Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(name)?, eps))
    }

    fn number(&self, key: &str) -> Option<f64> {
        let value = self.content.metadata.get(key)?;
        value
            .to_u32()
            .map(f64::from)
            .or_else(|_| value.to_f32().map(f64::from))
            .or_else(|_| value.to_u64().map(|v| v as f64))
            .ok()
    }

    fn required(&self, key: &str) -> Result<usize, EngineError> {
        self.number(key)
            .map(|v| v as usize)
            .ok_or_else(|| EngineError::Files(format!("GGUF metadata lacks {key}")))
    }
}

/// What the metadata says beyond the shapes: which layers slide, the
/// window, and the RoPE settings.
struct Hparams {
    arch: String,
    shape: Shape,
    window: Option<usize>,
    sliding: Vec<bool>,
    theta: f64,
    feed_forward: usize,
}

/// Builds the decoder from a GGUF file of architecture `arch`.
pub fn from_gguf(
    path: &Path,
    content: gguf_file::Content,
    arch: &str,
    device: &Device,
) -> Result<Decoder, EngineError> {
    let file = std::fs::File::open(path).map_err(|e| BadFile::new(path, e))?;
    let mapped = if device.is_cpu() {
        Some(MappedFile::open(path).map_err(|e| BadFile::new(path, e))?)
    } else {
        None
    };
    let mut reader = GgufReader {
        content: &content,
        file,
        device,
        mapped,
    };
    let hparams = Hparams::read(&reader, arch)?;
    Ok(reader.decoder(hparams)?)
}

impl Hparams {
    fn read(r: &GgufReader, arch: &str) -> Result<Self, EngineError> {
        let key = |name: &str| format!("{arch}.{name}");
        let heads = r.required(&key("attention.head_count"))?;
        let hidden = r.required(&key("embedding_length"))?;
        let layers = r.required(&key("block_count"))?;
        let head_dim = r
            .number(&key("attention.key_length"))
            .map_or(hidden / heads, |v| v as usize);
        let mut flavour = Flavour::plain(head_dim);
        if let Some(dims) = r.number(&key("rope.dimension_count")) {
            flavour.rotary_dim = dims as usize;
        }
        if arch.starts_with("gemma") {
            // As llama.cpp: the 27B models scale queries by hidden / heads
            // (their query_pre_attn_scalar), the others by head_dim.
            let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
            let scalar = if big { hidden / heads } else { head_dim };
            flavour.attn_scale = 1.0 / (scalar as f64).sqrt();
            flavour.embed_scale = Some((hidden as f64).sqrt());
            flavour.attn_softcap = r.number(&key("attn_logit_softcapping"));
            flavour.final_softcap = r.number(&key("final_logit_softcapping"));
        }
        let shape = Shape {
            hidden,
            heads,
            kv_heads: r
                .number(&key("attention.head_count_kv"))
                .map_or(heads, |v| v as usize),
            head_dim,
            layers,
            vocab: 0,
            eps: r
                .number(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            // llama.cpp permutes llama's q/k rows for interleaved rotation;
            // the other families keep the halves layout.
            interleaved_rope: arch == "llama",
            flavour,
        };
        Ok(Hparams {
            arch: arch.to_string(),
            window: r
                .number(&key("attention.sliding_window"))
                .map(|w| w as usize),
            sliding: sliding_layers(r, arch, layers),
            theta: r.number(&key("rope.freq_base")).unwrap_or(10_000.0),
            feed_forward: r.number(&key("feed_forward_length")).unwrap_or(0.0) as usize,
            shape,
        })
    }
}

/// Which layers attend through the window: the file's per-layer pattern
/// where it has one, else llama.cpp's defaults per architecture.
fn sliding_layers(r: &GgufReader, arch: &str, layers: usize) -> Vec<bool> {
    let pattern = r
        .content
        .metadata
        .get(&format!("{arch}.attention.sliding_window_pattern"))
        .and_then(|v| v.to_vec().ok());
    if let Some(pattern) = pattern {
        return pattern
            .iter()
            .map(|v| v.to_bool().unwrap_or(false))
            .collect();
    }
    (0..layers)
        .map(|n| match arch {
            "gemma2" => n.is_multiple_of(2),
            "gemma3" => n % 6 < 5,
            "phi3" => true,
            _ => false,
        })
        .collect()
}

impl GgufReader<'_> {
    fn decoder(&mut self, h: Hparams) -> candle_core::Result<Decoder> {
        let layers = (0..h.shape.layers)
            .map(|n| self.layer(&h, n))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The embedding is looked up by row: in place on the CPU, else
        // whole in f32.
        let embed = self.embedding("token_embd.weight")?;
        let mut shape = h.shape.clone();
        let lm_head = if self.has("output.weight") {
            self.linear("output", false)?
        } else {
            self.linear("token_embd", false)?
        };
        shape.vocab = match &embed {
            Embedding::Tensor(table) => table.dim(0)?,
            Embedding::Mapped(table) => table.features(),
        };
        Ok(Decoder {
            embed,
            layers,
            norm: self.norm("output_norm.weight", shape.eps)?,
            lm_head,
            ropes: self.ropes(&h)?,
            dtype: DType::F32,
            kv_dtype: self.kv_dtype(),
            settle: Default::default(),
            shape,
        })
    }

    /// f16 for layers with weights in blocks on the CPU, whose decode
    /// attention reads f16 directly: at eight sequences, reading f32 keys
    /// and values was a fifth of a small model's step. Files of f32 or
    /// f16 weights keep f32, to stay exact against transformers.
    fn kv_dtype(&self) -> DType {
        let in_blocks = self
            .content
            .tensor_infos
            .iter()
            .any(|(name, info)| name.starts_with("blk.") && info.ggml_dtype.block_size() > 1);
        if in_blocks && self.device.is_cpu() {
            DType::F16
        } else {
            DType::F32
        }
    }

    fn optional_norm(&mut self, name: &str, eps: f64) -> candle_core::Result<Option<RmsNorm>> {
        if self.has(name) {
            Ok(Some(self.norm(name, eps)?))
        } else {
            Ok(None)
        }
    }

    fn layer(&mut self, h: &Hparams, n: usize) -> candle_core::Result<Layer> {
        let (s, eps) = (&h.shape, h.shape.eps);
        let p = format!("blk.{n}");
        let bias = self.has(&format!("{p}.attn_q.bias"));
        let qkv = if self.has(&format!("{p}.attn_qkv.weight")) {
            let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
            Fused::split(
                self.linear(&format!("{p}.attn_qkv"), false)?,
                vec![q, kv, kv],
            )
        } else {
            Fused::new(vec![
                self.linear(&format!("{p}.attn_q"), bias)?,
                self.linear(&format!("{p}.attn_k"), bias)?,
                self.linear(&format!("{p}.attn_v"), bias)?,
            ])?
        };
        // Phi-3 stores its gate and up projections as one `ffn_up`.
        let gate_up = if self.has(&format!("{p}.ffn_gate.weight")) {
            Fused::new(vec![
                self.linear(&format!("{p}.ffn_gate"), false)?,
                self.linear(&format!("{p}.ffn_up"), false)?,
            ])?
        } else {
            let ff = h.feed_forward;
            Fused::split(self.linear(&format!("{p}.ffn_up"), false)?, vec![ff, ff])
        };
        let gemma = h.arch.starts_with("gemma");
        Ok(Layer {
            attn_norm: self.norm(&format!("{p}.attn_norm.weight"), eps)?,
            attn: Attention {
                qkv,
                o: self.linear(&format!("{p}.attn_output"), false)?,
                q_norm: self.optional_norm(&format!("{p}.attn_q_norm.weight"), eps)?,
                k_norm: self.optional_norm(&format!("{p}.attn_k_norm.weight"), eps)?,
                window: h
                    .window
                    .filter(|_| h.sliding.get(n).copied().unwrap_or(false)),
            },
            post_attn_norm: self.optional_norm(&format!("{p}.post_attention_norm.weight"), eps)?,
            mlp_norm: self.norm(&format!("{p}.ffn_norm.weight"), eps)?,
            mlp: Mlp {
                gate_up,
                down: self.linear(&format!("{p}.ffn_down"), false)?,
                activation: if gemma {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                },
            },
            post_mlp_norm: self.optional_norm(&format!("{p}.post_ffw_norm.weight"), eps)?,
            rope: usize::from(h.arch == "gemma3" && h.sliding.get(n).copied().unwrap_or(false)),
        })
    }

    /// The global RoPE table (with llama's per-frequency divisors, linear
    /// scaling or Phi-3's LongRoPE factors), then Gemma 3's local one, whose
    /// base llama.cpp fixes at 10000.
    fn ropes(&mut self, h: &Hparams) -> candle_core::Result<Vec<Rope>> {
        let dim = h.shape.flavour.rotary_dim;
        let key = |name: &str| format!("{}.{name}", h.arch);
        let mut freqs = inv_freq(dim, h.theta);
        // llama.cpp stores Llama 3's scaling as per-frequency divisors.
        if self.has("rope_freqs.weight") {
            let divisors = self.dense("rope_freqs.weight")?.to_vec1::<f32>()?;
            for (f, d) in freqs.iter_mut().zip(divisors) {
                *f /= d;
            }
        }
        let linear = self
            .content
            .metadata
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .is_some_and(|t| t == "linear");
        if let (true, Some(factor)) = (linear, self.number(&key("rope.scaling.factor"))) {
            freqs
                .iter_mut()
                .for_each(|f| *f = (*f as f64 / factor) as f32);
        }
        let global = if self.has("rope_factors_long.weight") {
            self.longrope(h, freqs)?
        } else {
            Rope::new(freqs, DType::F32, self.device)?
        };
        let mut ropes = vec![global];
        if h.arch == "gemma3" {
            ropes.push(Rope::new(inv_freq(dim, 10_000.0), DType::F32, self.device)?);
        }
        Ok(ropes)
    }

    /// Phi-3's LongRoPE from `rope_factors_short` / `rope_factors_long`,
    /// switching at the original context as transformers does.
    fn longrope(&mut self, h: &Hparams, freqs: Vec<f32>) -> candle_core::Result<Rope> {
        let key = |name: &str| format!("{}.{name}", h.arch);
        let divided = |factors: Vec<f32>| -> Vec<f32> {
            freqs.iter().zip(factors).map(|(f, d)| f / d).collect()
        };
        let short = divided(self.dense("rope_factors_short.weight")?.to_vec1::<f32>()?);
        let long = divided(self.dense("rope_factors_long.weight")?.to_vec1::<f32>()?);
        let context = self.number(&key("context_length")).unwrap_or(4096.0);
        let original = self
            .number(&key("rope.scaling.original_context_length"))
            .unwrap_or(context);
        let scale = self
            .number(&key("rope.scaling.attn_factor"))
            .unwrap_or_else(|| super::family::longrope_attention(context / original, original));
        Rope::longrope(
            short,
            long,
            original as usize,
            scale as f32,
            DType::F32,
            self.device,
        )
    }
}
