//! Random-weight models in Hugging Face layout, for architectures the
//! fixtures do not cover and for benchmarks that need bigger models.
//! `write_model`'s tokenizer is tiny-llama's (vocabulary 384); `write_llama`
//! takes any vocabulary size and leaves the tokenizer to its caller.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

/// Sizes of a synthetic decoder.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

pub const VOCAB: usize = 384;

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` for
/// `model_type` (`llama`, `mistral`, `qwen3`, `gemma2` or `phi3`); returns
/// the weights' size. Every family has the same projections for a given
/// shape; they differ in what wraps them: Gemma 2 ties its embeddings and
/// has four norms per layer, Phi-3 fuses q/k/v and gate/up into one tensor
/// each, Qwen3 adds q/k norms.
pub fn write_model(dir: &Path, model_type: &str, shape: Shape) -> u64 {
    let vocab = Vocab {
        size: VOCAB,
        tied: model_type == "gemma2",
    };
    let size = write_weights(dir, model_type, shape, vocab);
    let tokenizer = crate::fixtures_dir().join("tiny-llama/tokenizer.json");
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).expect("tokenizer");
    size
}

/// The embedding side of a synthetic decoder: how many tokens, and
/// whether the output head reuses the embedding table.
#[derive(Debug, Clone, Copy)]
pub struct Vocab {
    pub size: usize,
    pub tied: bool,
}

/// Writes `config.json` and `model.safetensors` for a llama of `shape`
/// with `vocab`, without a tokenizer (the caller writes one that covers
/// `vocab.size`); returns the weights' size.
pub fn write_llama(dir: &Path, shape: Shape, vocab: Vocab) -> u64 {
    write_weights(dir, "llama", shape, vocab)
}

/// `write_model` without the tokenizer, for any vocabulary size.
fn write_weights(dir: &Path, model_type: &str, shape: Shape, vocab: Vocab) -> u64 {
    let Shape {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
    } = shape;
    let head_dim = hidden / heads;
    let (gemma2, phi3) = (model_type == "gemma2", model_type == "phi3");
    let mut tensors = HashMap::new();
    let mut add = |name: String, dims: &[usize]| {
        let tensor = Tensor::randn(0f32, 0.05, dims, &Device::Cpu).expect("random tensor");
        tensors.insert(name, tensor);
    };
    add("model.embed_tokens.weight".into(), &[vocab.size, hidden]);
    if !vocab.tied {
        add("lm_head.weight".into(), &[vocab.size, hidden]);
    }
    add("model.norm.weight".into(), &[hidden]);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let (q_rows, kv_rows) = (heads * head_dim, kv_heads * head_dim);
        if phi3 {
            add(
                format!("{p}.self_attn.qkv_proj.weight"),
                &[q_rows + 2 * kv_rows, hidden],
            );
            add(
                format!("{p}.mlp.gate_up_proj.weight"),
                &[2 * intermediate, hidden],
            );
        } else {
            add(format!("{p}.self_attn.q_proj.weight"), &[q_rows, hidden]);
            add(format!("{p}.self_attn.k_proj.weight"), &[kv_rows, hidden]);
            add(format!("{p}.self_attn.v_proj.weight"), &[kv_rows, hidden]);
            add(format!("{p}.mlp.gate_proj.weight"), &[intermediate, hidden]);
            add(format!("{p}.mlp.up_proj.weight"), &[intermediate, hidden]);
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[hidden, q_rows]);
        add(format!("{p}.mlp.down_proj.weight"), &[hidden, intermediate]);
        add(format!("{p}.input_layernorm.weight"), &[hidden]);
        add(format!("{p}.post_attention_layernorm.weight"), &[hidden]);
        if gemma2 {
            add(format!("{p}.pre_feedforward_layernorm.weight"), &[hidden]);
            add(format!("{p}.post_feedforward_layernorm.weight"), &[hidden]);
        }
        if model_type == "qwen3" {
            add(format!("{p}.self_attn.q_norm.weight"), &[head_dim]);
            add(format!("{p}.self_attn.k_norm.weight"), &[head_dim]);
        }
    }
    std::fs::create_dir_all(dir).expect("model dir");
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).expect("write safetensors");
    // Written the way transformers writes them: qwen3 and mistral configs
    // carry head_dim, and sliding_window may be null.
    let mut config = json!({
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab.size, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rope_parameters": {"rope_theta": 10000.0},
        "sliding_window": null, "attention_bias": false,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": vocab.tied
    });
    let extra = match model_type {
        // Gemma 2 2B/9B's settings: query_pre_attn_scalar is the head
        // size, even layers attend through the window.
        "gemma2" => json!({
            "architectures": ["Gemma2ForCausalLM"], "rms_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": head_dim, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "sliding_window": 4096,
            "layer_types": gemma2_layer_types(layers),
            "tie_word_embeddings": true
        }),
        // Phi-4-mini's partial rotary (Phi-3 rotates every channel).
        "phi3" => json!({
            "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75
        }),
        _ => json!({}),
    };
    for (key, value) in extra.as_object().expect("object") {
        config[key] = value.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    std::fs::metadata(&weights).expect("weights").len()
}

/// Gemma 2's attention kinds: even layers slide, odd ones see everything.
fn gemma2_layer_types(layers: usize) -> Vec<&'static str> {
    (0..layers)
        .map(|n| {
            if n % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect()
}

/// Makes the model in `dir` never end on its own: its end-of-sequence id
/// is out of the vocabulary, so that only `max_tokens` (or a cancel) ends
/// a generation, with a `context`-position context.
pub fn make_never_ending(dir: &Path, context: usize) {
    let config = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).expect("config")).expect("json");
    value["eos_token_id"] = json!(100_000);
    value["max_position_embeddings"] = json!(context);
    std::fs::write(&config, value.to_string()).expect("config");
}

/// Writes a synthetic llama (as `write_model`) whose end-of-sequence id is
/// out of the vocabulary, so that only `max_tokens` (or a cancel) ends a
/// generation, with a `context`-position context.
pub fn write_never_ending_model(dir: &Path, shape: Shape, context: usize) {
    write_model(dir, "llama", shape);
    make_never_ending(dir, context);
}

/// Writes a never-ending model (`write_never_ending_model`) under the
/// daemon's dir and registers it as `name`.
fn register_never_ending(daemon: &crate::Daemon, name: &str, shape: Shape, context: usize) {
    let dir = daemon.dir.path().join(name);
    write_never_ending_model(&dir, shape, context);
    daemon
        .call("models.register", json!({"name": name, "local_path": dir}))
        .expect("register");
}

/// Registers and loads `name`: a never-ending synthetic llama big enough
/// that a long generation takes seconds.
pub fn register_slow_model(daemon: &crate::Daemon, name: &str) {
    // About 20M parameters: a few milliseconds a token, so 4000 tokens
    // take seconds even on a fast machine.
    let shape = Shape {
        hidden: 512,
        intermediate: 1024,
        layers: 8,
        heads: 8,
        kv_heads: 8,
    };
    register_never_ending(daemon, name, shape, 4096);
    daemon.call("load", json!({"name": name})).expect("load");
}

/// Registers `name`: a one-layer never-ending synthetic llama with a
/// 32768-position context, fast enough to stream tens of thousands of
/// tokens.
pub fn register_endless_model(daemon: &crate::Daemon, name: &str) {
    let shape = Shape {
        hidden: 64,
        intermediate: 128,
        layers: 1,
        heads: 2,
        kv_heads: 2,
    };
    register_never_ending(daemon, name, shape, 32_768);
}

/// Sizes of a synthetic FLUX transformer: FLUX.1's block structure (128-wide
/// heads, 4× MLP, FLUX.1's rotary axes) at a reduced width and depth.
#[derive(Debug, Clone, Copy)]
pub struct FluxShape {
    pub heads: usize,
    pub double_blocks: usize,
    pub single_blocks: usize,
}

/// Writes a FLUX-shaped dev pipeline: the tiny-flux fixture's encoders,
/// tokenizers, VAE and scheduler around a random transformer of `shape`
/// (diffusers names); returns the transformer's size in bytes.
pub fn write_flux(dir: &Path, shape: FluxShape) -> u64 {
    crate::copy_tree(&crate::fixtures_dir().join("tiny-flux/dev"), dir);
    let dim = shape.heads * 128;
    let (context, pooled, latent) = (32, 32, 16);
    let mut tensors = HashMap::new();
    let mut add = |name: String, dims: &[usize]| {
        let tensor = Tensor::randn(0f32, 0.02, dims, &Device::Cpu).expect("random tensor");
        tensors.insert(name, tensor);
    };
    let mut linear = |name: &str, input: usize, output: usize| {
        add(format!("{name}.weight"), &[output, input]);
        add(format!("{name}.bias"), &[output]);
    };
    linear("x_embedder", latent, dim);
    linear("context_embedder", context, dim);
    for (embedder, input) in [("timestep", 256), ("guidance", 256), ("text", pooled)] {
        let p = format!("time_text_embed.{embedder}_embedder");
        linear(&format!("{p}.linear_1"), input, dim);
        linear(&format!("{p}.linear_2"), dim, dim);
    }
    for i in 0..shape.double_blocks {
        let p = format!("transformer_blocks.{i}");
        linear(&format!("{p}.norm1.linear"), dim, 6 * dim);
        linear(&format!("{p}.norm1_context.linear"), dim, 6 * dim);
        for name in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
        ] {
            linear(&format!("{p}.attn.{name}"), dim, dim);
        }
        linear(&format!("{p}.attn.to_out.0"), dim, dim);
        linear(&format!("{p}.attn.to_add_out"), dim, dim);
        for ff in ["ff", "ff_context"] {
            linear(&format!("{p}.{ff}.net.0.proj"), dim, 4 * dim);
            linear(&format!("{p}.{ff}.net.2"), 4 * dim, dim);
        }
    }
    for i in 0..shape.single_blocks {
        let p = format!("single_transformer_blocks.{i}");
        linear(&format!("{p}.norm.linear"), dim, 3 * dim);
        for name in ["to_q", "to_k", "to_v"] {
            linear(&format!("{p}.attn.{name}"), dim, dim);
        }
        linear(&format!("{p}.proj_mlp"), dim, 4 * dim);
        linear(&format!("{p}.proj_out"), 5 * dim, dim);
    }
    linear("norm_out.linear", dim, 2 * dim);
    linear("proj_out", dim, latent);
    let norms = (0..shape.double_blocks)
        .flat_map(|i| {
            ["norm_q", "norm_k", "norm_added_q", "norm_added_k"]
                .map(|n| format!("transformer_blocks.{i}.attn.{n}.weight"))
        })
        .chain((0..shape.single_blocks).flat_map(|i| {
            ["norm_q", "norm_k"].map(|n| format!("single_transformer_blocks.{i}.attn.{n}.weight"))
        }));
    for name in norms.collect::<Vec<_>>() {
        let ones = Tensor::ones(128, candle_core::DType::F32, &Device::Cpu).expect("ones");
        tensors.insert(name, ones);
    }
    let transformer = dir.join("transformer");
    let weights = transformer.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).expect("write safetensors");
    let config = json!({
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": true, "in_channels": latent,
        "joint_attention_dim": context, "num_attention_heads": shape.heads,
        "num_layers": shape.double_blocks, "num_single_layers": shape.single_blocks,
        "patch_size": 1, "pooled_projection_dim": pooled
    });
    std::fs::write(transformer.join("config.json"), config.to_string()).expect("config");
    std::fs::metadata(&weights).expect("weights").len()
}
