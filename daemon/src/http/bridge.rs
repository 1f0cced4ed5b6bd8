//! How HTTP requests reach the daemon: as JSON-RPC calls through the same
//! [`Dispatcher`] the socket uses, with the HTTP caller in the same
//! task-local, so authorization, parameter decoding, validation, the queue
//! and the error kinds are the JSON-RPC ones. There is no second path to
//! the engine.

use std::sync::Arc;

use modeld_wire::error::RpcErrorObject;
use modeld_wire::types::GenerateEvent;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{self, Caller};
use crate::rpc::dispatch::{Dispatcher, Stream};
use crate::scheduler::ticket::{self, JobTicket};

/// A reply line: a result or an error.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<RpcErrorObject>,
}

/// A notification line of a subscription.
#[derive(Deserialize)]
struct Notification<T> {
    params: NotificationParams<T>,
}

#[derive(Deserialize)]
struct NotificationParams<T> {
    result: T,
}

/// Calls `method` as `caller`; the result, or the wire error.
pub async fn call<R: DeserializeOwned>(
    dispatcher: &Dispatcher,
    caller: &Arc<Caller>,
    method: &str,
    params: Value,
) -> Result<R, RpcErrorObject> {
    let (reply, _) = request(dispatcher, caller, method, params, None).await?;
    serde_json::from_value(reply).map_err(|err| internal(format!("{method} reply: {err}")))
}

/// Starts a `generate` as `caller`: the accepted stream of its events, or
/// why it was refused. `ticket` receives the job's id once it is queued.
pub async fn generate(
    dispatcher: &Dispatcher,
    caller: &Arc<Caller>,
    params: Value,
    ticket: Arc<JobTicket>,
) -> Result<Events, RpcErrorObject> {
    let method = modeld_wire::methods::GENERATE;
    let (_, stream) = request(dispatcher, caller, method, params, Some(ticket)).await?;
    let stream = stream.ok_or_else(|| internal("generate was accepted without a stream"))?;
    Ok(Events(stream))
}

async fn request(
    dispatcher: &Dispatcher,
    caller: &Arc<Caller>,
    method: &str,
    params: Value,
    ticket: Option<Arc<JobTicket>>,
) -> Result<(Value, Option<Stream>), RpcErrorObject> {
    let line = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let line = line.to_string();
    let work = auth::scope(caller.clone(), dispatcher.handle(line.as_bytes(), caller));
    let handled = match ticket {
        Some(ticket) => ticket::scope(ticket, work).await,
        None => work.await,
    };
    let text = handled.reply.ok_or_else(|| internal("no reply"))?;
    let reply: Reply =
        serde_json::from_str(&text).map_err(|err| internal(format!("reply: {err}")))?;
    if let Some(err) = reply.error {
        return Err(err);
    }
    let stream = handled.streams.into_iter().next();
    Ok((reply.result.unwrap_or(Value::Null), stream))
}

/// A generation's events, read off its subscription. Dropping it ends the
/// subscription, which the scheduler takes as the client leaving.
pub struct Events(Stream);

impl Events {
    /// The next event; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<GenerateEvent> {
        let message = self.0.recv().await?;
        match serde_json::from_str::<Notification<GenerateEvent>>(message.get()) {
            Ok(notification) => Some(notification.params.result),
            Err(err) => Some(GenerateEvent::Error {
                done: true,
                error: internal(format!("unreadable event: {err}")),
            }),
        }
    }
}

fn internal(message: impl Into<String>) -> RpcErrorObject {
    RpcErrorObject {
        code: modeld_wire::ErrorKind::Internal.code(),
        message: message.into(),
        data: Some(serde_json::json!({"kind": "internal"})),
    }
}
