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
use super::{ApiError, Module};
use crate::auth::{authorize, Caller};
use crate::config::ServerConfig;
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

    /// Handles one line from `caller`: a single request or a batch.
    pub async fn handle(&self, line: &[u8], caller: &Caller) -> Handled {
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
        // Read once per line: every request of a batch sees the same limits.
        let config = self.state.config();
        let server = &config.server;
        if text.starts_with('[') {
            handled.reply = self.batch(raw, caller, server, &mut handled.streams).await;
        } else {
            handled.reply = self.single(raw, caller, server, &mut handled.streams).await;
        }
        handled
    }

    async fn batch(
        &self,
        raw: &RawValue,
        caller: &Caller,
        server: &ServerConfig,
        streams: &mut Vec<Stream>,
    ) -> Option<String> {
        let items = match batch_items(raw, server.max_batch) {
            Ok(items) if items.is_empty() => {
                return Some(invalid_request(
                    None,
                    "a batch must hold at least one request",
                ))
            }
            Ok(items) => items,
            Err(_) => return Some(batch_too_large(server.max_batch)),
        };
        let mut replies = Vec::with_capacity(items.len());
        let mut reply_bytes = 0;
        for item in items {
            if let Some(reply) = self.single(item, caller, server, streams).await {
                reply_bytes += reply.len() + 1;
                if reply_bytes > server.max_reply_bytes {
                    return Some(reply_too_large(None, reply_bytes, server.max_reply_bytes));
                }
                replies.push(reply);
            }
        }
        // A batch of notifications only gets no reply at all, as the spec says.
        (!replies.is_empty()).then(|| format!("[{}]", replies.join(",")))
    }

    async fn single(
        &self,
        raw: &RawValue,
        caller: &Caller,
        server: &ServerConfig,
        streams: &mut Vec<Stream>,
    ) -> Option<String> {
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
        if let Err(forbidden) = authorize(caller, &request.method, request.params, server) {
            tracing::info!(uid = caller.uid, method = %request.method, "refused: not allowed");
            crate::metrics::rpc_request(&request.method, ErrorKind::Forbidden.as_str());
            let err = ErrorObjectOwned::from(ApiError::from(forbidden));
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
        let reply = reply.get();
        crate::metrics::rpc_request(&request.method, &outcome(reply));
        id.map(|id| match reply.len() > server.max_reply_bytes {
            true => reply_too_large(Some(id), reply.len(), server.max_reply_bytes),
            false => reply.to_string(),
        })
    }
}

/// `ok`, or the error kind of a reply, for the requests metric.
fn outcome(reply: &str) -> String {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        error: Option<modeld_wire::RpcErrorObject>,
    }
    match serde_json::from_str::<Probe>(reply) {
        Ok(Probe { error: None }) => "ok".to_string(),
        Ok(Probe { error: Some(err) }) => err.kind().unwrap_or("internal").to_string(),
        Err(_) => "internal".to_string(),
    }
}

/// The items of a batch, read lazily so an oversized batch costs no more
/// than `max + 1` items of memory; `Err` when it holds more than `max`.
fn batch_items(raw: &RawValue, max: usize) -> Result<Vec<&RawValue>, serde_json::Error> {
    struct Bounded(usize);
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {} requests", self.0)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<&RawValue>()? {
                if items.len() == self.0 {
                    return Err(serde::de::Error::custom("batch too long"));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    serde::Deserializer::deserialize_seq(&mut deserializer, Bounded(max))
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

/// An error reply for a broken server limit, naming its config key.
fn limit_error(
    id: Option<&str>,
    kind: ErrorKind,
    message: String,
    field: &str,
    limit: impl serde::Serialize,
) -> String {
    let details = Map::from_iter([
        ("field".to_string(), json!(field)),
        ("limit".to_string(), json!(limit)),
    ]);
    error_response(id, &wire_error(kind, message, details))
}

fn batch_too_large(limit: usize) -> String {
    let message = format!("a batch may hold at most {limit} requests (server.max_batch)");
    limit_error(
        None,
        ErrorKind::RequestTooLarge,
        message,
        "server.max_batch",
        limit,
    )
}

fn reply_too_large(id: Option<&str>, size: usize, limit: usize) -> String {
    let message = format!("the reply would be {size} bytes, over server.max_reply_bytes ({limit})");
    let field = "server.max_reply_bytes";
    limit_error(id, ErrorKind::RequestTooLarge, message, field, limit)
}

/// The reply to a request that arrives while the daemon stops: the
/// documented `shutting_down` error with the request's id, if it had one
/// (a notification gets nothing).
pub fn shutting_down_response(line: &[u8]) -> Option<String> {
    let err = ErrorObjectOwned::from(ApiError::ShuttingDown);
    let Ok(envelope) = serde_json::from_slice::<Envelope>(line) else {
        return Some(error_response(None, &err));
    };
    let id = envelope.id?.get();
    Some(error_response(Some(id), &err))
}

/// The reply to a request line that did not arrive in full in time.
pub fn timeout_response(limit_s: u64) -> String {
    let message = format!(
        "the request line did not arrive in full within {limit_s} s (server.read_timeout_s); closing"
    );
    limit_error(
        None,
        ErrorKind::Timeout,
        message,
        "server.read_timeout_s",
        limit_s,
    )
}

/// The reply to a line longer than the limit; its id was never read.
pub fn too_large_response(limit: usize) -> String {
    let message = format!(
        "the request line exceeds server.max_request_bytes ({limit} bytes); it was skipped"
    );
    limit_error(
        None,
        ErrorKind::RequestTooLarge,
        message,
        "server.max_request_bytes",
        limit,
    )
}
