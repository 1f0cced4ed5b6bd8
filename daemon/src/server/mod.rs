//! The listener: accepts connections up to the configured limit and, on
//! shutdown, stops accepting, removes the socket and waits for in-flight
//! requests within the grace period.

pub mod codec;
pub mod conn;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use modeld_wire::ErrorKind;
use serde_json::{json, Map};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::rpc::dispatch::{error_response, Dispatcher};
use crate::rpc::error::wire_error;
use crate::state::AppState;
pub use socket::{BoundSocket, SocketError};

pub async fn serve(socket: BoundSocket, state: Arc<AppState>, dispatcher: Arc<Dispatcher>) {
    let server = state.config().server.clone();
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let connections = TaskTracker::new();
    let shutdown = state.shutdown_token();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, server.max_connections));
            continue;
        };
        let state = state.clone();
        let dispatcher = dispatcher.clone();
        connections.spawn(async move {
            conn::serve_connection(stream, state, dispatcher).await;
            drop(slot);
        });
    }
    drop(socket);
    connections.close();
    let grace = Duration::from_secs(server.shutdown_grace_s);
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connections still busy after {grace:?}; exiting anyway",
            connections.len()
        );
    }
}

/// Tells a client over the connection limit why it is turned away.
async fn refuse(mut stream: UnixStream, limit: usize) {
    let err = wire_error(
        ErrorKind::Overloaded,
        format!("too many connections (limit {limit}); try again later"),
        Map::from_iter([("limit".to_string(), json!(limit))]),
    );
    let mut line = error_response(None, &err);
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}
