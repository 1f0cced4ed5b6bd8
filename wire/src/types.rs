//! Parameter and reply types of every method, serialized as JSON objects.
//!
//! Parameter structs reject unknown fields so that a typo in a script is an
//! error naming the field instead of a silently ignored option.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which cache root a model's files go to when they are downloaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum CacheLocation {
    #[default]
    Primary,
    Secondary,
    Custom(PathBuf),
}

impl fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheLocation::Primary => f.write_str("primary"),
            CacheLocation::Secondary => f.write_str("secondary"),
            CacheLocation::Custom(path) => write!(f, "custom:{}", path.display()),
        }
    }
}

impl FromStr for CacheLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(CacheLocation::Primary),
            "secondary" => Ok(CacheLocation::Secondary),
            other => match other.strip_prefix("custom:") {
                Some(path) if !path.is_empty() => Ok(CacheLocation::Custom(PathBuf::from(path))),
                _ => Err(format!(
                    "cache must be 'primary', 'secondary' or 'custom:/absolute/path', got {other:?}"
                )),
            },
        }
    }
}

impl From<CacheLocation> for String {
    fn from(value: CacheLocation) -> Self {
        value.to_string()
    }
}

impl TryFrom<String> for CacheLocation {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// `models.register` parameters. Everything but `name` and one of
/// `repo`/`local_path` has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    pub name: String,
    /// Hugging Face repo id, `org/name` or `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Branch, tag or commit; `main` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Glob patterns of the repo files the model needs; a sensible set for
    /// safetensors models when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    /// A local file or directory that holds the model; tried before any cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheLocation>,
    /// Expected size of the files in bytes, used before the real sizes are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_size: Option<u64>,
    /// Overwrite an existing registration of the same name.
    #[serde(default)]
    pub replace: bool,
}

/// A registered model as stored and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub repo: Option<String>,
    pub revision: String,
    pub files: Vec<String>,
    pub local_path: Option<PathBuf>,
    pub cache: CacheLocation,
    pub estimated_size: Option<u64>,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    pub updated_at: u64,
}

/// Parameters of the methods that address one model by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    pub model: ModelRecord,
    /// True when an earlier registration of the same name was overwritten.
    pub replaced: bool,
    /// `estimated_size` against the free space of the cache root a pull
    /// would fill; `None` without a size or a repo.
    #[serde(default)]
    pub space: Option<SpaceCheck>,
}

/// `models.remove` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    pub name: String,
    /// Also delete the model's files from the caches (never a `local_path`).
    #[serde(default)]
    pub purge: bool,
    /// With `purge`: carry the plan out; without it nothing changes.
    #[serde(default)]
    pub apply: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The registration removed; `None` after a purge dry run, which
    /// changes nothing.
    pub removed: Option<ModelRecord>,
    /// With `purge`: the cache files deleted, or that would be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<CachePlan>,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Where a model's files would come from, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The registered `local_path`.
    Local,
    /// A complete snapshot in one of the Hugging Face caches.
    Cache,
    /// Not on disk yet; a pull would download it.
    Hub,
    /// Neither on disk nor downloadable; `reason` says why.
    Unavailable,
}

/// `models.source`: the source a load would use, without loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReply {
    pub name: String,
    pub source: SourceKind,
    /// The model file or directory (local or cache snapshot).
    pub path: Option<PathBuf>,
    pub cache_root: Option<PathBuf>,
    pub commit: Option<String>,
    /// Files found, relative to `path` when it is a directory.
    pub files: Vec<String>,
    /// For `hub`: the cache root a download would go to.
    pub download_to: Option<PathBuf>,
    pub reason: Option<String>,
}

/// `models.pull` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullParams {
    pub name: String,
    /// Also hash files already in the cache and fetch again any that differ.
    #[serde(default)]
    pub verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpaceStatus {
    Sufficient,
    /// Fits, but with less than 10% headroom.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceCheck {
    pub status: SpaceStatus,
    pub needed_bytes: u64,
    pub available_bytes: u64,
    /// The cache root the files go to.
    pub path: PathBuf,
}

/// What `models.pull` streams; the last item has `done: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    Start {
        repo: String,
        commit: String,
        files: usize,
        total_bytes: u64,
        /// Bytes still to fetch after what the cache already holds.
        download_bytes: u64,
        target: PathBuf,
        space: SpaceCheck,
    },
    Progress {
        file: String,
        file_bytes: u64,
        file_total: u64,
        bytes: u64,
        total: u64,
        rate_bytes_per_s: u64,
    },
    Done {
        done: bool,
        source: SourceKind,
        path: PathBuf,
        commit: Option<String>,
        downloaded_bytes: u64,
        elapsed_ms: u64,
    },
    Error {
        done: bool,
        error: crate::error::RpcErrorObject,
    },
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeInfo {
    pub name: String,
    /// A registered model name, or a directory or file under `model_root`.
    pub model: String,
    pub loras: Vec<LoraInfo>,
    pub defaults: GenerationDefaults,
    /// Unload the model after this long unused; `None` keeps it loaded.
    pub keep_alive_s: Option<u64>,
    pub description: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
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

/// `cache.scan`: every cache root and the model root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheScanReply {
    pub roots: Vec<CacheRootScan>,
    /// Bytes on disk across all roots.
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRootScan {
    pub path: PathBuf,
    /// `primary`, `secondary`, `standard`, `extra`, `custom` or `model_root`.
    pub role: String,
    pub exists: bool,
    pub size_bytes: u64,
    pub repos: Vec<CachedRepo>,
    /// Unreadable blobs, dangling links and the like.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRepo {
    /// `org/name` for cache repos; the directory name under model_root.
    pub repo_id: String,
    pub repo_type: String,
    pub path: PathBuf,
    /// Blobs shared between revisions count once, as huggingface_hub counts.
    pub size_bytes: u64,
    pub files: usize,
    /// Seconds since the Unix epoch.
    pub last_accessed: u64,
    pub last_modified: u64,
    pub revisions: Vec<CachedRevision>,
    /// Registry names that use this repo; empty when another tool put it here.
    pub registered_as: Vec<String>,
    /// `llm`, `diffusion`, `lora`, `vae`, `embedding` or `unknown`.
    pub family: String,
    pub architecture: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRevision {
    pub commit: String,
    pub refs: Vec<String>,
    pub size_bytes: u64,
    pub files: usize,
    pub snapshot_path: PathBuf,
}

/// `cache.duplicates`: identical files found by size, then sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicatesReply {
    pub groups: Vec<DuplicateGroup>,
    pub files_hashed: usize,
    pub bytes_hashed: u64,
    /// Bytes freed if every group kept one copy.
    pub reclaimable_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    pub sha256: String,
    pub size_bytes: u64,
    /// The copy that stays: a cache blob when there is one.
    pub keep: PathBuf,
    pub copies: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// Carry the plan out; without it nothing changes (a dry run).
    #[serde(default)]
    pub apply: bool,
    /// `cache.clean` only: also remove revisions no ref points to.
    #[serde(default)]
    pub detached: bool,
}

/// What `cache.consolidate`, `cache.clean` and `cache.rm` did, or would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachePlan {
    pub applied: bool,
    pub actions: Vec<CacheAction>,
    pub freed_bytes: u64,
    /// Things left alone, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheAction {
    /// `hardlink`, `remove_incomplete`, `remove_dangling_link`,
    /// `remove_orphan_blob`, `remove_empty_repo`, `remove_revision`,
    /// `remove_repo`.
    pub action: String,
    pub path: PathBuf,
    /// For `hardlink`: the copy it now shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRemoveParams {
    /// `org/name`.
    pub repo: String,
    /// Only this commit (or the commit this ref names); all revisions when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default)]
    pub apply: bool,
}

/// What `events.subscribe` streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ModelRegistered {
        name: String,
        replaced: bool,
    },
    ModelRemoved {
        name: String,
    },
    ConfigReloaded {
        path: Option<PathBuf>,
    },
    ModesReloaded {
        path: PathBuf,
        modes: usize,
    },
    ModesRejected {
        path: PathBuf,
        error: String,
    },
    ModeSwitched {
        from: Option<String>,
        to: String,
    },
    ConfigRejected {
        path: Option<PathBuf>,
        error: String,
    },
    ShuttingDown,
}

/// Human-readable byte counts for tables and messages.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses sizes such as `7G`, `512MiB`, `1.5GB` or a bare byte count.
/// Both SI and binary suffixes count in powers of 1024, as `ls -h` does.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("not a size: {text:?} (examples: 4096, 512M, 7G)"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size suffix {other:?} in {text:?}")),
    };
    let bytes = number * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_location_round_trips() {
        for text in ["primary", "secondary", "custom:/data/hf"] {
            let parsed: CacheLocation = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert!("custom:".parse::<CacheLocation>().is_err());
        assert!("tertiary".parse::<CacheLocation>().is_err());
    }

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("7G").unwrap(), 7 << 30);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert!(parse_bytes("7Q").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn register_params_reject_unknown_fields() {
        let err = serde_json::from_str::<RegisterParams>(r#"{"name":"a","repo_id":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("repo_id"), "{err}");
    }
}
