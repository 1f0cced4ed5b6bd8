//! The one place where errors of every layer become JSON-RPC error objects
//! with a stable `data.kind`.

use jsonrpsee::types::ErrorObjectOwned;
use modeld_wire::ErrorKind;
use serde_json::{json, Map, Value};

use crate::config::ConfigError;
use crate::registry::RegistryError;
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
    #[error("modeld is shutting down and accepts no new work")]
    ShuttingDown,
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
            ApiError::ShuttingDown => ErrorKind::ShuttingDown,
            ApiError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Extra `data` members beside `kind`.
    fn details(&self) -> Map<String, Value> {
        let mut data = Map::new();
        match self {
            ApiError::Invalid(err) => {
                data.insert("field".into(), json!(err.field));
                if let Some(limit) = &err.limit {
                    data.insert("limit".into(), limit.clone());
                }
            }
            ApiError::Registry(RegistryError::NotFound(name))
            | ApiError::Registry(RegistryError::AlreadyExists(name)) => {
                data.insert("name".into(), json!(name));
            }
            _ => {}
        }
        data
    }
}

impl From<ApiError> for ErrorObjectOwned {
    fn from(err: ApiError) -> Self {
        wire_error(err.kind(), err.to_string(), err.details())
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
