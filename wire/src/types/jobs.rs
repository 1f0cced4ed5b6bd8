//! Modes and the job queue: `modes.*`, `switch_mode`, `jobs.*`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeInfo {
    pub name: String,
    /// A registered model name, or a directory or file under `model_root`.
    pub model: String,
    pub loras: Vec<LoraInfo>,
    pub defaults: GenerationDefaults,
    /// Defaults of image requests, beside `defaults` for text ones.
    #[serde(flatten)]
    pub image_defaults: ImageDefaults,
    /// Unload the model after this long unused; `None` keeps it loaded.
    pub keep_alive_s: Option<u64>,
    pub description: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// An image mode's VAE file kept apart from its model, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// Its text encoder files kept apart, as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text_encoders: Vec<String>,
    /// The registered model or folder supplying tokenizers and configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// `modes.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModesReply {
    pub file: Option<PathBuf>,
    pub default_mode: Option<String>,
    pub current: Option<String>,
    pub modes: Vec<ModeInfo>,
    pub loaded_at: u64,
    pub reloads: u64,
    /// Why the last reload was refused; the previous modes stay in force.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchParams {
    pub mode: String,
    /// Answer only once the switch has run: `state: done`, or its error.
    #[serde(default)]
    pub wait: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchReply {
    pub queued: bool,
    pub job: u64,
    /// The mode in force when the switch runs (after earlier queued switches).
    pub from: Option<String>,
    pub to: String,
    /// Jobs that run before this one.
    pub ahead: usize,
    /// `queued`, or `done` when the request waited.
    pub state: JobState,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

/// `jobs.get`: a job queued, running, or among the last finished ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReply {
    pub id: u64,
    /// `generate`, `switch` or `unload`.
    pub kind: String,
    pub mode: Option<String>,
    pub model: Option<String>,
    pub state: JobState,
    /// Why a `failed` job failed.
    pub error: Option<crate::error::RpcErrorObject>,
    /// Seconds since the Unix epoch, once finished.
    pub finished_at: Option<u64>,
    /// While queued: its place, the jobs ahead and the ETA, as in `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

/// A mode switch that failed; `status` shows the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchError {
    pub job: u64,
    pub mode: String,
    pub error: crate::error::RpcErrorObject,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobParams {
    pub job: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    pub job: u64,
    pub cancelled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    /// `generate`, `switch` or `unload`.
    pub kind: String,
    pub mode: Option<String>,
    pub model: Option<String>,
    pub running: bool,
    /// The uid that submitted the job (none for the daemon's own jobs):
    /// besides administrators, only it may cancel the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// A queued job's place among the queued jobs, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Jobs ahead of a queued one, running ones included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ahead: Option<usize>,
    /// Seconds until a queued job should start (rounded up), from
    /// measured rates; absent until they are measured (README: Queue
    /// position and ETA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub capacity: usize,
    pub current_mode: Option<String>,
    pub jobs: Vec<JobInfo>,
    /// The last mode switch that failed, kept after later successes.
    #[serde(default)]
    pub last_switch_error: Option<SwitchError>,
}
