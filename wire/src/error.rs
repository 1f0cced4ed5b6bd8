//! Error kinds carried in `error.data.kind`: stable strings that scripts may
//! match on, each tied to one JSON-RPC error code.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every error the daemon reports has exactly one of these kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was not valid JSON.
    ParseError,
    /// Valid JSON, but not a JSON-RPC 2.0 request object.
    InvalidRequest,
    /// The request line exceeded the configured byte limit.
    RequestTooLarge,
    MethodNotFound,
    /// Parameters of the wrong type or shape, or values outside their limits.
    InvalidParams,
    NotFound,
    AlreadyExists,
    /// The persistent store failed; the request had no effect.
    Storage,
    /// The daemon is stopping and accepts no new work.
    ShuttingDown,
    /// Too many connections; try again once others have closed.
    Overloaded,
    /// The caller's uid may not call this method (see `server.admin_group`).
    Forbidden,
    /// A request line did not arrive in full within `server.read_timeout_s`.
    Timeout,
    RepoNotFound,
    RevisionNotFound,
    /// Gated or private repo without a token that grants access (401/403).
    Unauthorized,
    /// The Hub could not be reached, or the connection kept failing.
    Network,
    /// `HF_HUB_OFFLINE` is set and the files are not cached.
    Offline,
    /// The target cache root lacks the space the download needs.
    InsufficientSpace,
    /// The disk filled up during a download; nothing partial is visible.
    DiskFull,
    /// Downloaded bytes failed verification twice.
    Corrupt,
    /// A file-system operation failed.
    Io,
    /// The Hub answered something unexpected.
    HubError,
    /// The model is registered but not loaded.
    NotLoaded,
    /// The model's files could not be loaded (format, architecture, weights).
    LoadFailed,
    /// Inference failed while running.
    InferenceFailed,
    /// The job queue is full; `data.limit` is its capacity.
    QueueFull,
    /// The job was cancelled before it ran.
    Cancelled,
    /// The model does not fit beside the models in use.
    InsufficientMemory,
    /// The files belong to a loaded model or a running download.
    InUse,
    Internal,
}

impl ErrorKind {
    /// JSON-RPC code: the standard ones where they fit, the server range otherwise.
    pub fn code(self) -> i32 {
        match self {
            ErrorKind::ParseError => -32700,
            ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge => -32600,
            ErrorKind::MethodNotFound => -32601,
            ErrorKind::InvalidParams => -32602,
            ErrorKind::Internal => -32603,
            ErrorKind::NotFound => -32004,
            ErrorKind::AlreadyExists => -32009,
            ErrorKind::Storage => -32010,
            ErrorKind::ShuttingDown => -32011,
            ErrorKind::Overloaded => -32012,
            ErrorKind::Forbidden => -32013,
            ErrorKind::Timeout => -32014,
            ErrorKind::RepoNotFound => -32020,
            ErrorKind::RevisionNotFound => -32021,
            ErrorKind::Unauthorized => -32022,
            ErrorKind::Network => -32023,
            ErrorKind::Offline => -32024,
            ErrorKind::InsufficientSpace => -32025,
            ErrorKind::DiskFull => -32026,
            ErrorKind::Corrupt => -32027,
            ErrorKind::Io => -32028,
            ErrorKind::HubError => -32029,
            ErrorKind::NotLoaded => -32030,
            ErrorKind::LoadFailed => -32031,
            ErrorKind::InferenceFailed => -32032,
            ErrorKind::QueueFull => -32040,
            ErrorKind::Cancelled => -32041,
            ErrorKind::InsufficientMemory => -32042,
            ErrorKind::InUse => -32043,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ParseError => "parse_error",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::MethodNotFound => "method_not_found",
            ErrorKind::InvalidParams => "invalid_params",
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Storage => "storage",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RepoNotFound => "repo_not_found",
            ErrorKind::RevisionNotFound => "revision_not_found",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Network => "network",
            ErrorKind::Offline => "offline",
            ErrorKind::InsufficientSpace => "insufficient_space",
            ErrorKind::DiskFull => "disk_full",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::HubError => "hub_error",
            ErrorKind::NotLoaded => "not_loaded",
            ErrorKind::LoadFailed => "load_failed",
            ErrorKind::InferenceFailed => "inference_failed",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::InsufficientMemory => "insufficient_memory",
            ErrorKind::InUse => "in_use",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` member of a JSON-RPC response as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcErrorObject {
    pub code: i32,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcErrorObject {
    /// The `data.kind` string, when the daemon sent one.
    pub fn kind(&self) -> Option<&str> {
        self.data.as_ref()?.get("kind")?.as_str()
    }
}

impl std::fmt::Display for RpcErrorObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            Some(kind) => write!(f, "{} ({kind})", self.message),
            None => write!(f, "{} (code {})", self.message, self.code),
        }
    }
}
