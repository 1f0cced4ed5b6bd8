//! The one place where errors of every layer become JSON-RPC error objects
//! with a stable `data.kind`. The layers below return (and stream) their
//! own typed errors; each type's kind and `data` members are decided here,
//! once, by [`Wire`].

use std::sync::Arc;

use jsonrpsee::types::ErrorObjectOwned;
use modeld_wire::{ErrorKind, RpcErrorObject};
use serde_json::{json, Map, Value};

use crate::auth::Forbidden;
use crate::caches::CacheError;
use crate::config::ConfigError;
use crate::engine::runner::RunnerStage;
use crate::engine::EngineError;
use crate::hub::HubError;
use crate::loader::LoadError;
use crate::modes::{ModesError, UnknownMode};
use crate::pull::PullError;
use crate::registry::RegistryError;
use crate::scheduler::JobError;
use crate::sources::NoSecondaryCache;
use crate::validate::ValidationError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Pull(#[from] PullError),
    /// A job's error, shared by its history and whoever waits for the job.
    #[error(transparent)]
    Job(Arc<JobError>),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    UnknownMode(#[from] UnknownMode),
    #[error(transparent)]
    Modes(#[from] ModesError),
    #[error(transparent)]
    NoSecondaryCache(#[from] NoSecondaryCache),
    #[error("no job {0}: it is not queued or running, nor among the last finished jobs")]
    UnknownJob(u64),
    #[error("modeld is shutting down and accepts no new work")]
    ShuttingDown,
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<JobError> for ApiError {
    fn from(err: JobError) -> Self {
        ApiError::Job(Arc::new(err))
    }
}

impl From<ApiError> for ErrorObjectOwned {
    fn from(err: ApiError) -> Self {
        let object = wire_object(&err);
        ErrorObjectOwned::owned(object.code, object.message, object.data)
    }
}

/// The error as it travels, for embedding in stream events and replies.
pub fn wire_object(err: &ApiError) -> RpcErrorObject {
    let mut data = Map::new();
    err.details(&mut data);
    let kind = err.kind();
    data.insert("kind".into(), json!(kind.as_str()));
    RpcErrorObject {
        code: kind.code(),
        message: err.to_string(),
        data: Some(Value::Object(data)),
    }
}

/// Builds an error object whose `data` holds `kind` plus `details`.
pub fn wire_error(
    kind: ErrorKind,
    message: impl Into<String>,
    mut details: Map<String, Value>,
) -> ErrorObjectOwned {
    details.insert("kind".into(), json!(kind.as_str()));
    ErrorObjectOwned::owned(kind.code(), message, Some(Value::Object(details)))
}

/// The `data` of an error object, `kind` aside.
type Data = Map<String, Value>;

/// How one layer's error shows on the wire. A wrapping error delegates to
/// the error it wraps, so an engine error reads the same whether a handler,
/// the loader or a job's stream returned it.
trait Wire {
    fn kind(&self) -> ErrorKind;

    /// Members beside `kind` naming what went wrong: the field and limit,
    /// the device and bytes, the file.
    fn details(&self, _data: &mut Data) {}
}

fn insert(data: &mut Data, key: &str, value: Value) {
    data.insert(key.into(), value);
}

impl Wire for ApiError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Invalid(err) => err.kind(),
            ApiError::Registry(err) => err.kind(),
            ApiError::Config(_) | ApiError::Modes(_) => ErrorKind::InvalidParams,
            ApiError::Hub(err) => err.kind(),
            ApiError::Engine(err) => err.kind(),
            ApiError::Load(err) => err.kind(),
            ApiError::Pull(err) => err.kind(),
            ApiError::Job(err) => err.kind(),
            ApiError::Cache(err) => err.kind(),
            ApiError::UnknownMode(err) => err.kind(),
            ApiError::NoSecondaryCache(err) => err.kind(),
            ApiError::UnknownJob(_) => ErrorKind::NotFound,
            ApiError::ShuttingDown => ErrorKind::ShuttingDown,
            ApiError::Forbidden(_) => ErrorKind::Forbidden,
            ApiError::Internal(_) => ErrorKind::Internal,
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            ApiError::Invalid(err) => err.details(data),
            ApiError::Registry(err) => err.details(data),
            ApiError::Hub(err) => err.details(data),
            ApiError::Engine(err) => err.details(data),
            ApiError::Load(err) => err.details(data),
            ApiError::Pull(err) => err.details(data),
            ApiError::Job(err) => err.details(data),
            ApiError::UnknownMode(err) => err.details(data),
            ApiError::NoSecondaryCache(err) => err.details(data),
            ApiError::Forbidden(err) => {
                insert(data, "method", json!(err.method));
                insert(data, "uid", json!(err.uid));
            }
            ApiError::UnknownJob(job) => {
                insert(data, "field", json!("job"));
                insert(data, "job", json!(job));
            }
            ApiError::Config(_)
            | ApiError::Modes(_)
            | ApiError::Cache(_)
            | ApiError::ShuttingDown
            | ApiError::Internal(_) => {}
        }
    }
}

impl Wire for ValidationError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidParams
    }

    fn details(&self, data: &mut Data) {
        insert(data, "field", json!(self.field));
        if let Some(limit) = &self.limit {
            insert(data, "limit", limit.clone());
        }
    }
}

impl Wire for RegistryError {
    fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::NotFound(_) => ErrorKind::NotFound,
            RegistryError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            _ => ErrorKind::Storage,
        }
    }

    fn details(&self, data: &mut Data) {
        if let RegistryError::NotFound(name) | RegistryError::AlreadyExists(name) = self {
            insert(data, "name", json!(name));
        }
    }
}

impl Wire for HubError {
    fn kind(&self) -> ErrorKind {
        match self {
            HubError::RepoNotFound { .. } => ErrorKind::RepoNotFound,
            HubError::RevisionNotFound { .. } => ErrorKind::RevisionNotFound,
            HubError::Unauthorized { .. } => ErrorKind::Unauthorized,
            HubError::Network { .. } => ErrorKind::Network,
            HubError::Offline { .. } => ErrorKind::Offline,
            HubError::InsufficientSpace { .. } => ErrorKind::InsufficientSpace,
            HubError::DiskFull { .. } => ErrorKind::DiskFull,
            HubError::Corrupt { .. } => ErrorKind::Corrupt,
            HubError::Io { .. } => ErrorKind::Io,
            HubError::Protocol(_) => ErrorKind::HubError,
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            HubError::InsufficientSpace {
                root,
                needed,
                available,
            } => {
                insert(data, "path", json!(root));
                insert(data, "needed_bytes", json!(needed));
                insert(data, "available_bytes", json!(available));
            }
            HubError::Unauthorized { status, .. } => insert(data, "status", json!(status)),
            _ => {}
        }
    }
}

impl Wire for EngineError {
    fn kind(&self) -> ErrorKind {
        match self {
            EngineError::NotLoaded(_) => ErrorKind::NotLoaded,
            EngineError::InsufficientMemory { .. } => ErrorKind::InsufficientMemory,
            EngineError::ContextOverflow { .. }
            | EngineError::NoChatTemplate
            | EngineError::EmptyPrompt
            | EngineError::Device(_)
            | EngineError::Invalid(_) => ErrorKind::InvalidParams,
            EngineError::Files(_)
            | EngineError::Unsupported(_)
            | EngineError::Tokenizer(_)
            | EngineError::Template(_)
            | EngineError::BadFile(_) => ErrorKind::LoadFailed,
            EngineError::Candle(_) => ErrorKind::InferenceFailed,
            EngineError::Output { .. } => ErrorKind::Io,
            EngineError::Cancelled => ErrorKind::Cancelled,
            EngineError::Runner(failure) => match failure.stage {
                RunnerStage::Generate => ErrorKind::InferenceFailed,
                RunnerStage::Start | RunnerStage::Load => ErrorKind::LoadFailed,
            },
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            EngineError::Invalid(err) => err.details(data),
            EngineError::Output { path, .. } => insert(data, "path", json!(path)),
            EngineError::ContextOverflow {
                prompt, context, ..
            } => {
                insert(data, "field", json!("max_tokens"));
                insert(data, "limit", json!(context.saturating_sub(*prompt)));
            }
            EngineError::InsufficientMemory {
                device,
                needed,
                available,
                in_use,
            } => {
                insert(data, "device", json!(device));
                insert(data, "needed_bytes", json!(needed));
                insert(data, "available_bytes", json!(available));
                insert(data, "in_use_bytes", json!(in_use));
            }
            EngineError::NoChatTemplate => insert(data, "field", json!("messages")),
            EngineError::EmptyPrompt => insert(data, "field", json!("prompt")),
            EngineError::BadFile(bad) => insert(data, "file", json!(bad.path)),
            EngineError::Device(_) => insert(data, "field", json!("device")),
            EngineError::Runner(failure) => {
                insert(data, "runner", json!(failure.runner));
                insert(data, "stderr", json!(failure.stderr));
                if let Some(key) = &failure.key {
                    insert(data, "field", json!(key));
                }
            }
            _ => {}
        }
    }
}

impl Wire for LoadError {
    fn kind(&self) -> ErrorKind {
        match self {
            LoadError::Engine(err) => err.kind(),
            LoadError::Registry(err) => err.kind(),
            LoadError::Pull(err) => err.kind(),
            LoadError::Internal(_) => ErrorKind::Internal,
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            LoadError::Engine(err) => err.details(data),
            LoadError::Registry(err) => err.details(data),
            LoadError::Pull(err) => err.details(data),
            LoadError::Internal(_) => {}
        }
    }
}

impl Wire for PullError {
    fn kind(&self) -> ErrorKind {
        match self {
            PullError::Target(err) => err.kind(),
            PullError::Hub(err) => err.kind(),
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            PullError::Target(err) => err.details(data),
            PullError::Hub(err) => err.details(data),
        }
    }
}

impl Wire for JobError {
    fn kind(&self) -> ErrorKind {
        match self {
            JobError::Load(err) => err.kind(),
            JobError::Engine(err) => err.kind(),
            JobError::UnknownMode(err) => err.kind(),
            JobError::Cancelled { .. } => ErrorKind::Cancelled,
            JobError::TimedOut { .. } => ErrorKind::Timeout,
            JobError::QueueFull { .. } => ErrorKind::QueueFull,
            JobError::ShuttingDown => ErrorKind::ShuttingDown,
            JobError::WorkerStopped => ErrorKind::Internal,
        }
    }

    fn details(&self, data: &mut Data) {
        match self {
            JobError::Load(err) => err.details(data),
            JobError::Engine(err) => err.details(data),
            JobError::UnknownMode(err) => err.details(data),
            JobError::Cancelled { job } => insert(data, "job", json!(job)),
            JobError::TimedOut { job, limit_s } => {
                insert(data, "job", json!(job));
                insert(data, "field", json!("scheduler.max_job_s"));
                insert(data, "limit", json!(limit_s));
            }
            JobError::QueueFull { capacity } => insert(data, "limit", json!(capacity)),
            JobError::ShuttingDown | JobError::WorkerStopped => {}
        }
    }
}

impl Wire for CacheError {
    fn kind(&self) -> ErrorKind {
        match self {
            CacheError::InUse(_) => ErrorKind::InUse,
            CacheError::NotFound(_) => ErrorKind::NotFound,
            CacheError::Io { .. } => ErrorKind::Io,
        }
    }
}

impl Wire for UnknownMode {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotFound
    }

    fn details(&self, data: &mut Data) {
        insert(data, "field", json!("mode"));
        insert(data, "name", json!(self.0));
    }
}

impl Wire for NoSecondaryCache {
    fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidParams
    }

    fn details(&self, data: &mut Data) {
        insert(data, "field", json!("cache"));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::BadFile;

    /// The object a reply carried before errors were typed below the edge:
    /// `message` and `data` exactly as the wire saw them.
    fn expected(kind: ErrorKind, message: &str, data: Value) -> RpcErrorObject {
        RpcErrorObject {
            code: kind.code(),
            message: message.into(),
            data: Some(data),
        }
    }

    fn wire(err: impl Into<ApiError>) -> RpcErrorObject {
        wire_object(&err.into())
    }

    fn memory() -> EngineError {
        EngineError::InsufficientMemory {
            device: "cpu".into(),
            needed: 10,
            available: 5,
            in_use: 1,
        }
    }

    fn no_space() -> HubError {
        HubError::InsufficientSpace {
            root: "/cache".into(),
            needed: 10,
            available: 5,
        }
    }

    #[test]
    fn queue_refusals_read_as_before() {
        let full = expected(
            ErrorKind::QueueFull,
            "the job queue is full (3 jobs); try again later",
            json!({"kind": "queue_full", "limit": 3}),
        );
        assert_eq!(wire(JobError::QueueFull { capacity: 3 }), full);
        let cancelled = expected(
            ErrorKind::Cancelled,
            "job 7 was cancelled",
            json!({"kind": "cancelled", "job": 7}),
        );
        assert_eq!(wire(JobError::Cancelled { job: 7 }), cancelled);
        let stopping = expected(
            ErrorKind::ShuttingDown,
            "modeld is shutting down and accepts no new work",
            json!({"kind": "shutting_down"}),
        );
        assert_eq!(wire(JobError::ShuttingDown), stopping);
        assert_eq!(wire(ApiError::ShuttingDown), stopping);
        let stopped = expected(
            ErrorKind::Internal,
            "internal error: the model's worker stopped without a final event",
            json!({"kind": "internal"}),
        );
        assert_eq!(wire(JobError::WorkerStopped), stopped);
    }

    #[test]
    fn an_engine_error_reads_the_same_through_every_layer() {
        let object = expected(
            ErrorKind::InsufficientMemory,
            "the model needs about 10 bytes on cpu, which has 5 free for it (1 held by models in use)",
            json!({"kind": "insufficient_memory", "device": "cpu", "needed_bytes": 10,
                   "available_bytes": 5, "in_use_bytes": 1}),
        );
        assert_eq!(wire(memory()), object);
        assert_eq!(wire(LoadError::from(memory())), object);
        assert_eq!(wire(JobError::from(memory())), object);
        assert_eq!(wire(JobError::from(LoadError::from(memory()))), object);
        let overflow = EngineError::ContextOverflow {
            prompt: 90,
            max_tokens: 20,
            context: 100,
        };
        let object = expected(
            ErrorKind::InvalidParams,
            "prompt of 90 tokens plus max_tokens 20 exceeds the context length of 100",
            json!({"kind": "invalid_params", "field": "max_tokens", "limit": 10}),
        );
        assert_eq!(wire(JobError::from(overflow)), object);
    }

    #[test]
    fn load_and_pull_errors_keep_their_file_and_bytes() {
        let bad = BadFile::new(Path::new("/m/model.safetensors"), "truncated");
        let object = expected(
            ErrorKind::LoadFailed,
            "/m/model.safetensors: truncated",
            json!({"kind": "load_failed", "file": "/m/model.safetensors"}),
        );
        assert_eq!(wire(LoadError::from(EngineError::from(bad))), object);
        let object = expected(
            ErrorKind::InsufficientSpace,
            "not enough space in /cache: 10 bytes needed, 5 available",
            json!({"kind": "insufficient_space", "path": "/cache", "needed_bytes": 10,
                   "available_bytes": 5}),
        );
        assert_eq!(wire(no_space()), object);
        assert_eq!(wire(PullError::from(no_space())), object);
        let through_a_switch = JobError::from(LoadError::from(PullError::from(no_space())));
        assert_eq!(wire(through_a_switch), object);
        let object = expected(
            ErrorKind::InvalidParams,
            &NoSecondaryCache.to_string(),
            json!({"kind": "invalid_params", "field": "cache"}),
        );
        assert_eq!(wire(PullError::from(NoSecondaryCache)), object);
    }

    #[test]
    fn an_unknown_mode_names_itself() {
        let object = expected(
            ErrorKind::NotFound,
            "no mode named \"chat\"",
            json!({"kind": "not_found", "field": "mode", "name": "chat"}),
        );
        assert_eq!(wire(UnknownMode("chat".into())), object);
        assert_eq!(wire(JobError::from(UnknownMode("chat".into()))), object);
    }
}
