//! Builds a [`Decoder`] from safetensors with the normalized
//! `config.json` (LoRAs merged first); `gguf.rs` builds one from a GGUF
//! file.

use std::collections::HashMap;
use std::path::PathBuf;

use super::cpu::mapped::MappedSafetensors;
use super::decoder::{Activation, Attention, Decoder, Embedding, Layer, Mlp, Shape};
use super::family::{self, Config};
use super::linear::{Fused, Linear, RmsNorm};
use super::model::ModelSpec;
use super::{BadFile, EngineError};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// Reads every safetensors file (merging `loras`) or maps them, then
/// builds the decoder in `dtype` on `device`.
pub fn from_safetensors(
    spec: &ModelSpec,
    files: &[PathBuf],
    loras: &[modeld_wire::types::LoraInfo],
    dtype: DType,
    device: &Device,
) -> Result<Decoder, EngineError> {
    let vb = if loras.is_empty() {
        // Safety: the weight files are mmapped read-only; modeld never
        // writes to files under a loaded model, and the cache only
        // replaces blobs by rename, which leaves a mapping intact.
        // Truncated or corrupt files fail here, naming themselves.
        unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
            .map_err(|e| BadFile::from_candle(e, &files[0]))?
    } else {
        // Adapters change the weights, so they are read and merged first.
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu)
                .map_err(|e| BadFile::from_candle(e, file))?;
            tensors.extend(loaded);
        }
        for lora in loras {
            super::lora::apply(&mut tensors, lora).map_err(|e| e.in_file(&lora.path))?;
        }
        VarBuilder::from_tensors(tensors, dtype, device)
    };
    // f32 weights on the CPU are used where they lie in the file: nothing
    // to convert, so nothing to copy.
    let mapped = if loras.is_empty() && dtype == DType::F32 && device.is_cpu() {
        Some(MappedSafetensors::open(files).map_err(|e| BadFile::new(&files[0], e))?)
    } else {
        None
    };
    let config = family::parse(&spec.config)?;
    // transformers 5 saves a multimodal model's language model under
    // `model.language_model`, older files under `language_model.model`.
    let saved_by_5 = "model.language_model";
    let prefix = if spec.prefix != "model"
        && vb.contains_tensor(&format!("{saved_by_5}.embed_tokens.weight"))
    {
        saved_by_5
    } else {
        spec.prefix
    };
    let source = Source {
        vb,
        mapped: mapped.as_ref(),
    };
    dense_decoder(&config, spec.arch, prefix, source, dtype, device)
}

/// Where tensors come from: in place from the mapped files when they can
/// be, else through the var builder (converted, merged, or on a GPU).
struct Source<'a> {
    vb: VarBuilder<'a>,
    mapped: Option<&'a MappedSafetensors>,
}

impl Source<'_> {
    fn in_place(
        &self,
        vb: &VarBuilder,
        name: &str,
        dims: (usize, usize),
    ) -> Option<super::cpu::Mapped> {
        let prefix = vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        let matrix = self.mapped?.matrix(&full)?;
        ((matrix.features(), matrix.inputs()) == dims).then_some(matrix)
    }

    fn linear(
        &self,
        vb: &VarBuilder,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> candle_core::Result<Linear> {
        let bias = if bias {
            Some(vb.get(out, "bias")?)
        } else {
            None
        };
        if let Some(weight) = self.in_place(vb, "weight", (out, inp)) {
            return Ok(Linear::mapped(weight, bias));
        }
        Ok(Linear::dense(vb.get((out, inp), "weight")?, bias))
    }

    fn embedding(&self, vb: &VarBuilder, dims: (usize, usize)) -> candle_core::Result<Embedding> {
        match self.in_place(vb, "weight", dims) {
            Some(table) => Ok(Embedding::Mapped(table)),
            None => Ok(Embedding::Tensor(vb.get(dims, "weight")?)),
        }
    }
}

fn dense_decoder(
    c: &Config,
    arch: &str,
    prefix: &str,
    source: Source,
    dtype: DType,
    device: &Device,
) -> Result<Decoder, EngineError> {
    let vb = &source.vb;
    let shape = Shape {
        hidden: c.hidden_size,
        heads: c.heads(),
        kv_heads: c.kv_heads(),
        head_dim: c.head_dim(),
        layers: c.num_hidden_layers,
        vocab: c.vocab_size,
        eps: c.rms_norm_eps,
        interleaved_rope: false,
        flavour: c.flavour(arch)?,
    };
    let activation = c.activation(arch)?;
    let model = vb.pp(prefix);
    let dense = Dense {
        c,
        arch,
        activation,
        source: &source,
    };
    let layers = (0..c.num_hidden_layers)
        .map(|n| dense.layer(&model.pp(format!("layers.{n}")), n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let embed = source.embedding(&model.pp("embed_tokens"), (c.vocab_size, c.hidden_size))?;
    // Tied models (and files that simply omit the head) reuse the embedding.
    let lm_head = if c.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
        match &embed {
            Embedding::Tensor(table) => Linear::dense(table.clone(), None),
            Embedding::Mapped(table) => Linear::mapped(table.clone(), None),
        }
    } else {
        source.linear(&vb.pp("lm_head"), c.vocab_size, c.hidden_size, false)?
    };
    Ok(Decoder {
        shape,
        embed,
        layers,
        norm: dense.norm(model.pp("norm"), c.hidden_size)?,
        lm_head,
        ropes: c.ropes(arch, dtype, device)?,
        dtype,
        kv_dtype: dtype,
        settle: Default::default(),
    })
}

/// Builds one family's layers from safetensors names.
struct Dense<'a> {
    c: &'a Config,
    arch: &'a str,
    activation: Activation,
    source: &'a Source<'a>,
}

impl Dense<'_> {
    fn norm(&self, vb: VarBuilder, size: usize) -> candle_core::Result<RmsNorm> {
        let weight = vb.get(size, "weight")?;
        if family::is_gemma(self.arch) {
            RmsNorm::plus_one(&weight, self.c.rms_norm_eps)
        } else {
            Ok(RmsNorm::new(weight, self.c.rms_norm_eps))
        }
    }

    fn layer(&self, l: &VarBuilder, n: usize) -> candle_core::Result<Layer> {
        let (c, hidden) = (self.c, self.c.hidden_size);
        let gemma = family::is_gemma(self.arch);
        // Gemma's post_attention_layernorm normalizes the attention's
        // output; in the other families it is the norm before the MLP.
        let (post_attn_norm, mlp_norm, post_mlp_norm) = if gemma {
            (
                Some(self.norm(l.pp("post_attention_layernorm"), hidden)?),
                self.norm(l.pp("pre_feedforward_layernorm"), hidden)?,
                Some(self.norm(l.pp("post_feedforward_layernorm"), hidden)?),
            )
        } else {
            (
                None,
                self.norm(l.pp("post_attention_layernorm"), hidden)?,
                None,
            )
        };
        Ok(Layer {
            attn_norm: self.norm(l.pp("input_layernorm"), hidden)?,
            attn: self.attention(&l.pp("self_attn"), n)?,
            post_attn_norm,
            mlp_norm,
            mlp: self.mlp(&l.pp("mlp"))?,
            post_mlp_norm,
            rope: c.rope_of_layer(self.arch, n),
        })
    }

    fn attention(&self, a: &VarBuilder, n: usize) -> candle_core::Result<Attention> {
        let c = self.c;
        let (hidden, head_dim) = (c.hidden_size, c.head_dim());
        let (q_rows, kv_rows) = (c.heads() * head_dim, c.kv_heads() * head_dim);
        let qkv_bias = self.arch == "qwen2" || c.attention_bias;
        let qkv = if self.arch == "phi3" {
            let fused =
                self.source
                    .linear(&a.pp("qkv_proj"), q_rows + 2 * kv_rows, hidden, qkv_bias)?;
            Fused::split(fused, vec![q_rows, kv_rows, kv_rows])
        } else {
            Fused::new(vec![
                self.source
                    .linear(&a.pp("q_proj"), q_rows, hidden, qkv_bias)?,
                self.source
                    .linear(&a.pp("k_proj"), kv_rows, hidden, qkv_bias)?,
                self.source
                    .linear(&a.pp("v_proj"), kv_rows, hidden, qkv_bias)?,
            ])?
        };
        let qk_norm = matches!(self.arch, "qwen3" | "gemma3");
        let (q_norm, k_norm) = if qk_norm {
            (
                Some(self.norm(a.pp("q_norm"), head_dim)?),
                Some(self.norm(a.pp("k_norm"), head_dim)?),
            )
        } else {
            (None, None)
        };
        Ok(Attention {
            qkv,
            o: self
                .source
                .linear(&a.pp("o_proj"), hidden, q_rows, c.attention_bias)?,
            q_norm,
            k_norm,
            window: c.window(self.arch, n),
        })
    }

    fn mlp(&self, m: &VarBuilder) -> candle_core::Result<Mlp> {
        let c = self.c;
        let (hidden, inner) = (c.hidden_size, c.intermediate_size);
        let gate_up = if self.arch == "phi3" {
            let fused = self
                .source
                .linear(&m.pp("gate_up_proj"), 2 * inner, hidden, c.mlp_bias)?;
            Fused::split(fused, vec![inner, inner])
        } else {
            Fused::new(vec![
                self.source
                    .linear(&m.pp("gate_proj"), inner, hidden, c.mlp_bias)?,
                self.source
                    .linear(&m.pp("up_proj"), inner, hidden, c.mlp_bias)?,
            ])?
        };
        Ok(Mlp {
            gate_up,
            down: self
                .source
                .linear(&m.pp("down_proj"), hidden, inner, c.mlp_bias)?,
            activation: self.activation,
        })
    }
}
