//! Turns one request line into its reply: JSON-RPC envelope checks, batches,
//! notifications, and subscription streams. Method calls themselves go to
//! jsonrpsee's [`RpcModule`](jsonrpsee::RpcModule).

use std::sync::Arc;

use jsonrpsee::types::ErrorObjectOwned;
use modeld_wire::ErrorKind;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map};
use tokio::sync::mpsc;

use super::error::wire_error;
use super::Module;
use crate::state::{AppState, GaugeGuard};

/// Notifications a subscription may queue before its producer waits.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Notifications of one subscription, to be forwarded to its connection.
pub type Stream = mpsc::Receiver<Box<RawValue>>;

/// What a line produced: at most one reply line, and any new streams.
#[derive(Default)]
pub struct Handled {
    pub reply: Option<String>,
    pub streams: Vec<Stream>,
}

pub struct Dispatcher {
    module: Module,
    state: Arc<AppState>,
}

/// The members of a request, borrowed raw so each can be checked for its
/// JSON type before anything else is decoded.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
}

/// Distinguishes `"id": null` (present) from a missing id (a notification).
fn present<'de, D>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl Dispatcher {
    pub fn new(module: Module, state: Arc<AppState>) -> Self {
        Dispatcher { module, state }
    }

    /// Handles one line: a single request or a batch.
    pub async fn handle(&self, line: &[u8]) -> Handled {
        let mut handled = Handled::default();
        let Ok(text) = std::str::from_utf8(line) else {
            handled.reply = Some(parse_error("request is not valid UTF-8"));
            return handled;
        };
        let text = text.trim();
        if text.is_empty() {
            return handled;
        }
        let raw: &RawValue = match serde_json::from_str(text) {
            Ok(raw) => raw,
            Err(err) => {
                handled.reply = Some(parse_error(&format!("request is not valid JSON: {err}")));
                return handled;
            }
        };
        if text.starts_with('[') {
            handled.reply = self.batch(raw, &mut handled.streams).await;
        } else {
            handled.reply = self.single(raw, &mut handled.streams).await;
        }
        handled
    }

    async fn batch(&self, raw: &RawValue, streams: &mut Vec<Stream>) -> Option<String> {
        let items: Vec<&RawValue> =
            serde_json::from_str(raw.get()).expect("a JSON array decodes as raw items");
        if items.is_empty() {
            return Some(invalid_request(
                None,
                "a batch must hold at least one request",
            ));
        }
        let mut replies = Vec::with_capacity(items.len());
        for item in items {
            if let Some(reply) = self.single(item, streams).await {
                replies.push(reply);
            }
        }
        // A batch of notifications only gets no reply at all, as the spec says.
        (!replies.is_empty()).then(|| format!("[{}]", replies.join(",")))
    }

    async fn single(&self, raw: &RawValue, streams: &mut Vec<Stream>) -> Option<String> {
        let request = match check_envelope(raw) {
            Ok(request) => request,
            Err(reply) => return Some(reply),
        };
        self.state
            .stats
            .requests_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _in_flight = GaugeGuard::new(&self.state.stats.requests_in_flight);
        let id = request.id;
        if self.module.method(&request.method).is_none() {
            let err = wire_error(
                ErrorKind::MethodNotFound,
                format!("unknown method {:?}", request.method),
                Map::from_iter([("method".to_string(), json!(request.method))]),
            );
            return id.map(|id| error_response(Some(id), &err));
        }
        let call = request.to_call();
        let (reply, stream) = match self
            .module
            .raw_json_request(&call, SUBSCRIPTION_BUFFER)
            .await
        {
            Ok(result) => result,
            Err(err) => {
                // The envelope passed our checks but jsonrpsee could not
                // read it: still the request's fault, not the daemon's.
                let err = wire_error(ErrorKind::InvalidRequest, err.to_string(), Map::new());
                return id.map(|id| error_response(Some(id), &err));
            }
        };
        // A call that is not a subscription leaves its stream closed and empty.
        if !(stream.is_closed() && stream.is_empty()) {
            streams.push(stream);
        }
        id.map(|_| reply.get().to_string())
    }
}

/// A request that passed the envelope checks.
struct CheckedRequest<'a> {
    /// `None` for a notification, which gets no reply.
    id: Option<&'a str>,
    method: String,
    method_raw: &'a str,
    params: Option<&'a str>,
}

impl CheckedRequest<'_> {
    /// The canonical request text handed to jsonrpsee; notifications get a
    /// null id there, and their reply is dropped.
    fn to_call(&self) -> String {
        let id = self.id.unwrap_or("null");
        match self.params {
            Some(params) => format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":{},"params":{params}}}"#,
                self.method_raw
            ),
            None => format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":{}}}"#,
                self.method_raw
            ),
        }
    }
}

fn check_envelope(raw: &RawValue) -> Result<CheckedRequest<'_>, String> {
    let not_an_object = || {
        invalid_request(
            None,
            "a request must be a JSON object with jsonrpc, method, and optional id and params",
        )
    };
    // Arrays would decode into the envelope by position: only objects count.
    if !raw.get().starts_with('{') {
        return Err(not_an_object());
    }
    let envelope: Envelope = serde_json::from_str(raw.get()).map_err(|_| not_an_object())?;
    let id = envelope.id.map(RawValue::get);
    if let Some(id_text) = id {
        let valid = id_text.starts_with('"') || id_text == "null" || id_text.parse::<u64>().is_ok();
        if !valid {
            return Err(invalid_request(
                None,
                "id must be a string, an unsigned integer or null",
            ));
        }
    }
    if envelope.jsonrpc.map(RawValue::get) != Some("\"2.0\"") {
        return Err(invalid_request(id, "jsonrpc must be \"2.0\""));
    }
    let method_raw = envelope
        .method
        .ok_or_else(|| invalid_request(id, "method is missing"))?;
    let method: String = serde_json::from_str(method_raw.get())
        .map_err(|_| invalid_request(id, "method must be a string"))?;
    let params = envelope.params.map(RawValue::get);
    if let Some(params) = params {
        if !(params.starts_with('{') || params.starts_with('[')) {
            return Err(invalid_request(id, "params must be an object or an array"));
        }
    }
    Ok(CheckedRequest {
        id,
        method,
        method_raw: method_raw.get(),
        params,
    })
}

/// A complete error response line.
pub fn error_response(id: Option<&str>, err: &ErrorObjectOwned) -> String {
    let error = serde_json::to_string(err).expect("error objects always serialize");
    format!(
        r#"{{"jsonrpc":"2.0","id":{},"error":{error}}}"#,
        id.unwrap_or("null")
    )
}

fn parse_error(message: &str) -> String {
    error_response(
        None,
        &wire_error(ErrorKind::ParseError, message, Map::new()),
    )
}

fn invalid_request(id: Option<&str>, message: &str) -> String {
    error_response(
        id,
        &wire_error(ErrorKind::InvalidRequest, message, Map::new()),
    )
}

/// The reply to a line longer than the limit; its id was never read.
pub fn too_large_response(limit: usize) -> String {
    let err = wire_error(
        ErrorKind::RequestTooLarge,
        format!("request line exceeds the limit of {limit} bytes"),
        Map::from_iter([("limit".to_string(), json!(limit))]),
    );
    error_response(None, &err)
}
