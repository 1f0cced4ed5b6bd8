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
