//! The HTTP front door's one error mapping, beside `rpc/error.rs`: a wire
//! error (whatever layer raised it, through the same handlers as JSON-RPC)
//! becomes a status code and OpenAI's error shape, `{error: {message,
//! type, param, code}}`, with `code` the wire `data.kind`. Errors of the
//! HTTP layer itself (a body that is not JSON, an unsupported parameter,
//! a missing key) take the same shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use modeld_wire::error::RpcErrorObject;
use serde_json::{json, Value};

/// An error as an HTTP client gets it.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// The wire kind (`invalid_params`, `queue_full`, ...).
    pub code: String,
}

/// Seconds a client refused with `queue_full` is told to wait: about one
/// short generation.
const RETRY_AFTER_S: &str = "1";

impl HttpError {
    /// A request the client must change: 400 naming the parameter.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_params".into(),
        }
    }

    /// A body axum could not read: over `server.max_request_bytes` (413),
    /// or not the form or encoding the endpoint takes.
    pub fn rejected(status: StatusCode, message: String) -> Self {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            _ => "invalid_request",
        };
        HttpError {
            status,
            message,
            param: Some("body".into()),
            code: code.into(),
        }
    }

    /// No key or a wrong one: OpenAI's own code for it, since the wire's
    /// `unauthorized` is about the Hub.
    pub fn unauthorized(message: &str) -> Self {
        HttpError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            param: None,
            code: "invalid_api_key".into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            code: "internal".into(),
        }
    }

    /// OpenAI's `type`, from the status as OpenAI's own API pairs them.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The status each wire kind gets over HTTP.
fn status_of(kind: &str) -> StatusCode {
    match kind {
        "parse_error" | "invalid_request" | "invalid_params" | "method_not_found" => {
            StatusCode::BAD_REQUEST
        }
        "request_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found" | "repo_not_found" | "revision_not_found" => StatusCode::NOT_FOUND,
        "already_exists" | "in_use" | "not_loaded" | "cancelled" => StatusCode::CONFLICT,
        "queue_full" => StatusCode::TOO_MANY_REQUESTS,
        "shutting_down" | "overloaded" => StatusCode::SERVICE_UNAVAILABLE,
        "insufficient_memory" | "insufficient_space" | "disk_full" => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        // The Hub, behind the daemon, failed a pull the request needed.
        "network" | "offline" | "hub_error" | "unauthorized" | "corrupt" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<RpcErrorObject> for HttpError {
    fn from(err: RpcErrorObject) -> Self {
        let kind = err.kind().unwrap_or("internal").to_string();
        let param = err
            .data
            .as_ref()
            .and_then(|data| data.get("field"))
            .and_then(Value::as_str)
            .map(str::to_string);
        // What the API can name that may not exist is its model (or mode).
        let param = param.or_else(|| (kind == "not_found").then(|| "model".to_string()));
        HttpError {
            status: status_of(&kind),
            message: err.message,
            param,
            code: kind,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_kinds_pick_the_status_and_param() {
        let err = RpcErrorObject {
            code: -32602,
            message: "top_p must be in (0, 1]".into(),
            data: Some(json!({"kind": "invalid_params", "field": "top_p"})),
        };
        let http = HttpError::from(err);
        assert_eq!(http.status, StatusCode::BAD_REQUEST);
        assert_eq!(http.body()["error"]["param"], "top_p");
        assert_eq!(http.body()["error"]["type"], "invalid_request_error");
        assert_eq!(status_of("queue_full"), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            status_of("insufficient_memory"),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(status_of("shutting_down"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of("forbidden"), StatusCode::FORBIDDEN);
        assert_eq!(status_of("not_found"), StatusCode::NOT_FOUND);
        assert_eq!(status_of("internal"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
