//! The daemon itself: `status`, `reload`, `shutdown`, `vram`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub queue: QueueStatus,
    pub modes: ModesStatus,
    pub pid: u32,
    pub uptime_s: u64,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: ConfigStatus,
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModesStatus {
    pub file: Option<PathBuf>,
    pub count: usize,
    pub reloads: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// The file read, or `None` when the embedded defaults are in use.
    pub path: Option<PathBuf>,
    pub loaded_at: u64,
    pub reloads: u64,
    /// Why the last reload was refused; the previous config stays in force.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub models: u64,
    /// Models resident in memory.
    #[serde(default)]
    pub loaded: u64,
    pub connections: u64,
    pub requests_total: u64,
    pub requests_in_flight: u64,
    pub subscriptions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub path: Option<PathBuf>,
    pub reloads: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReply {
    pub stopping: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VramReply {
    pub gpus: Vec<GpuInfo>,
    /// Models resident in this daemon.
    #[serde(default)]
    pub models: Vec<LoadedModel>,
    pub nvml: NvmlStatus,
    pub system: SystemMemory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmlStatus {
    pub available: bool,
    pub driver_version: Option<String>,
    /// Why no GPU is listed, when NVML could not be used.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    pub name: Option<String>,
    /// `None` where the driver does not report per-process memory.
    pub used_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// `metrics`: the Prometheus (OpenMetrics) text, as `GET /metrics` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    pub content_type: String,
    pub text: String,
}
