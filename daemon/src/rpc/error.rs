//! The one place where errors of every layer become JSON-RPC error objects
//! with a stable `data.kind`.

use jsonrpsee::types::ErrorObjectOwned;
use modeld_wire::ErrorKind;
use serde_json::{json, Map, Value};

use crate::config::ConfigError;
use crate::engine::EngineError;
use crate::hub::HubError;
use crate::registry::RegistryError;
use crate::sources::NoSecondaryCache;
use crate::validate::ValidationError;
use modeld_wire::RpcErrorObject;

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
    Cache(crate::caches::CacheError),
    #[error("no mode named {0:?}")]
    UnknownMode(String),
    #[error(transparent)]
    Modes(#[from] crate::modes::ModesError),
    /// An error already in wire form, relayed from another stream.
    #[error("{}", .0.message)]
    Relayed(RpcErrorObject),
    #[error(transparent)]
    NoSecondaryCache(#[from] NoSecondaryCache),
    #[error("job {job} was cancelled")]
    Cancelled { job: u64 },
    #[error("no job {0}: it is not queued or running, nor among the last finished jobs")]
    UnknownJob(u64),
    /// A job's error, shared by its history and whoever waits for the job.
    #[error("{0}")]
    Job(std::sync::Arc<ApiError>),
    #[error("modeld is shutting down and accepts no new work")]
    ShuttingDown,
    #[error(transparent)]
    Forbidden(#[from] crate::auth::Forbidden),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Invalid(_) => ErrorKind::InvalidParams,
            ApiError::Registry(RegistryError::NotFound(_)) => ErrorKind::NotFound,
            ApiError::Registry(RegistryError::AlreadyExists(_)) => ErrorKind::AlreadyExists,
            ApiError::Registry(_) => ErrorKind::Storage,
            ApiError::Config(_) => ErrorKind::InvalidParams,
            ApiError::NoSecondaryCache(_) => ErrorKind::InvalidParams,
            ApiError::Engine(err) => match err {
                EngineError::NotLoaded(_) => ErrorKind::NotLoaded,
                EngineError::InsufficientMemory { .. } => ErrorKind::InsufficientMemory,
                EngineError::ContextOverflow { .. }
                | EngineError::NoChatTemplate
                | EngineError::EmptyPrompt
                | EngineError::Device(_) => ErrorKind::InvalidParams,
                EngineError::Files(_)
                | EngineError::Unsupported(_)
                | EngineError::Tokenizer(_)
                | EngineError::Template(_)
                | EngineError::BadFile(_) => ErrorKind::LoadFailed,
                EngineError::Candle(_) => ErrorKind::InferenceFailed,
                EngineError::Invalid(_) => ErrorKind::InvalidParams,
                EngineError::Output { .. } => ErrorKind::Io,
                EngineError::Cancelled => ErrorKind::Cancelled,
            },
            ApiError::Relayed(_) => ErrorKind::Internal,
            ApiError::UnknownMode(_) => ErrorKind::NotFound,
            ApiError::Cache(err) => match err {
                crate::caches::CacheError::InUse(_) => ErrorKind::InUse,
                crate::caches::CacheError::NotFound(_) => ErrorKind::NotFound,
                crate::caches::CacheError::Io { .. } => ErrorKind::Io,
            },
            ApiError::Modes(_) => ErrorKind::InvalidParams,
            ApiError::Hub(err) => match err {
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
            },
            ApiError::Cancelled { .. } => ErrorKind::Cancelled,
            ApiError::UnknownJob(_) => ErrorKind::NotFound,
            ApiError::Job(inner) => inner.kind(),
            ApiError::ShuttingDown => ErrorKind::ShuttingDown,
            ApiError::Forbidden(_) => ErrorKind::Forbidden,
            ApiError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Extra `data` members beside `kind`.
    fn details(&self) -> Map<String, Value> {
        let mut data = Map::new();
        match self {
            ApiError::Invalid(err) | ApiError::Engine(EngineError::Invalid(err)) => {
                data.insert("field".into(), json!(err.field));
                if let Some(limit) = &err.limit {
                    data.insert("limit".into(), limit.clone());
                }
            }
            ApiError::Engine(EngineError::Output { path, .. }) => {
                data.insert("path".into(), json!(path));
            }
            ApiError::Registry(RegistryError::NotFound(name))
            | ApiError::Registry(RegistryError::AlreadyExists(name)) => {
                data.insert("name".into(), json!(name));
            }
            ApiError::NoSecondaryCache(_) => {
                data.insert("field".into(), json!("cache"));
            }
            ApiError::Forbidden(err) => {
                data.insert("method".into(), json!(err.method));
                data.insert("uid".into(), json!(err.uid));
            }
            ApiError::UnknownMode(name) => {
                data.insert("field".into(), json!("mode"));
                data.insert("name".into(), json!(name));
            }
            ApiError::Cancelled { job } => {
                data.insert("job".into(), json!(job));
            }
            ApiError::UnknownJob(job) => {
                data.insert("field".into(), json!("job"));
                data.insert("job".into(), json!(job));
            }
            ApiError::Job(inner) => return inner.details(),
            ApiError::Engine(EngineError::ContextOverflow {
                prompt, context, ..
            }) => {
                data.insert("field".into(), json!("max_tokens"));
                data.insert("limit".into(), json!(context.saturating_sub(*prompt)));
            }
            ApiError::Engine(EngineError::InsufficientMemory {
                device,
                needed,
                available,
                in_use,
            }) => {
                data.insert("device".into(), json!(device));
                data.insert("needed_bytes".into(), json!(needed));
                data.insert("available_bytes".into(), json!(available));
                data.insert("in_use_bytes".into(), json!(in_use));
            }
            ApiError::Engine(EngineError::NoChatTemplate) => {
                data.insert("field".into(), json!("messages"));
            }
            ApiError::Engine(EngineError::EmptyPrompt) => {
                data.insert("field".into(), json!("prompt"));
            }
            ApiError::Engine(EngineError::BadFile(bad)) => {
                data.insert("file".into(), json!(bad.path));
            }
            ApiError::Engine(EngineError::Device(_)) => {
                data.insert("field".into(), json!("device"));
            }
            ApiError::Hub(HubError::InsufficientSpace {
                root,
                needed,
                available,
            }) => {
                data.insert("path".into(), json!(root));
                data.insert("needed_bytes".into(), json!(needed));
                data.insert("available_bytes".into(), json!(available));
            }
            ApiError::Hub(HubError::Unauthorized { status, .. }) => {
                data.insert("status".into(), json!(status));
            }
            _ => {}
        }
        data
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
    match err {
        ApiError::Relayed(object) => return object.clone(),
        ApiError::Job(inner) => return wire_object(inner),
        _ => {}
    }
    let mut data = err.details();
    data.insert("kind".into(), json!(err.kind().as_str()));
    RpcErrorObject {
        code: err.kind().code(),
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
