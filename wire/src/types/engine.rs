//! The engine: `load`, `unload`, `generate` and its events, LoRAs and defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `load` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    pub name: String,
    /// `cpu` or `cuda:N`; CUDA when built with it and a GPU is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `f32`, `f16` or `bf16`; f32 on CPU, bf16 on CUDA by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

/// A model resident in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedModel {
    pub name: String,
    pub arch: String,
    pub device: String,
    pub dtype: String,
    pub path: PathBuf,
    /// Expected memory, known before loading: the weights at their dtype
    /// (GGUF: as stored, plus f32 token embeddings) and the KV cache.
    pub estimated_bytes: u64,
    /// The KV-cache part of `estimated_bytes`: every layer's keys and values
    /// for the context, up to 4096 positions.
    #[serde(default)]
    pub kv_cache_bytes: u64,
    /// Memory the load took on its device: VRAM from the driver on a GPU,
    /// anonymous resident memory on the CPU. The KV cache grows later.
    pub measured_bytes: u64,
    pub load_ms: u64,
    pub loaded_at: u64,
    pub context_length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReply {
    pub model: LoadedModel,
    /// True when the model was already resident and nothing was done.
    pub already_loaded: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadReply {
    pub name: String,
    /// Resident memory released by the unload.
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `generate` parameters; unset sampling fields take the defaults shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// A registered model; or leave it out and name a `mode`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Run in this mode: its model and default parameters, switching to it
    /// first if another mode is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// 0 is greedy (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Random when absent; the reply says which was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// 1.0 (off) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the penalty looks at; default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// The client went away.
    Cancelled,
}

/// What `generate` streams; the last item has `done: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenerateEvent {
    Token {
        index: usize,
        id: u32,
        text: String,
    },
    Done {
        done: bool,
        model: String,
        /// The mode the request ran in, if it named one.
        mode: Option<String>,
        seed: u64,
        text: String,
        token_ids: Vec<u32>,
        prompt_tokens: usize,
        completion_tokens: usize,
        prefill_tokens_per_s: f64,
        decode_tokens_per_s: f64,
        finish_reason: FinishReason,
    },
    Error {
        done: bool,
        error: crate::error::RpcErrorObject,
    },
}

/// A LoRA adapter applied to a mode's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraInfo {
    pub path: PathBuf,
    pub strength: f32,
    pub adapter_name: String,
}

/// Generation defaults of a mode; explicit request values win.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}
