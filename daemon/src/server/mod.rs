//! The listener: accepts connections up to the configured limits (in all
//! and per uid), reads each peer's credentials, and on shutdown stops
//! accepting, removes the socket and waits for in-flight work within the
//! grace period before cancelling it.

pub mod codec;
pub mod conn;
pub mod socket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modeld_wire::ErrorKind;
use serde_json::{json, Map};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Caller;
use crate::rpc::dispatch::{error_response, Dispatcher};
use crate::rpc::error::wire_error;
use crate::state::AppState;
pub use socket::{BoundSocket, SocketError};

pub async fn serve(socket: BoundSocket, state: Arc<AppState>, dispatcher: Arc<Dispatcher>) {
    let server = state.config().server.clone();
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let per_uid = PerUid::default();
    let connections = TaskTracker::new();
    let work = TaskTracker::new();
    let closing = CancellationToken::new();
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
        // Limits in force now, so a reload applies to new connections.
        let server = state.config().server.clone();
        let caller = match Caller::of(&stream, &server) {
            Ok(caller) => Arc::new(caller),
            Err(err) => {
                tracing::warn!("cannot read the peer's credentials; closing: {err}");
                continue;
            }
        };
        let Some(uid_slot) = per_uid.take(caller.uid, server.per_uid_limit()) else {
            tokio::spawn(refuse(
                stream,
                server.per_uid_limit(),
                "server.max_connections_per_uid",
            ));
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(
                stream,
                server.max_connections,
                "server.max_connections",
            ));
            continue;
        };
        let context = conn::ConnContext {
            state: state.clone(),
            dispatcher: dispatcher.clone(),
            caller,
            work: work.clone(),
            closing: closing.clone(),
        };
        connections.spawn(async move {
            conn::serve_connection(stream, context).await;
            drop((slot, uid_slot));
        });
    }
    drop(socket);
    finish_work(&state, &work, Duration::from_secs(server.shutdown_grace_s)).await;
    // Replies and final events may still sit in connections' queues: let
    // every connection write them out before the process exits.
    closing.cancel();
    connections.close();
    if tokio::time::timeout(FINAL_EVENTS, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} connections did not drain; exiting anyway",
            connections.len()
        );
    }
}

/// Shutdown: queued jobs are refused at once; running work gets the grace
/// period, then running jobs are cancelled and their clients get a last
/// moment to read the final event. Connections themselves stay open (and
/// answer `shutting_down`) until the process exits.
async fn finish_work(state: &AppState, work: &TaskTracker, grace: Duration) {
    state.scheduler.refuse_queued();
    work.close();
    if tokio::time::timeout(grace, work.wait()).await.is_ok() {
        return;
    }
    tracing::warn!(
        "{} requests still running after {grace:?}; cancelling them",
        work.len()
    );
    state.scheduler.cancel_running();
    if tokio::time::timeout(FINAL_EVENTS, work.wait())
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!("{} requests did not finish; exiting anyway", work.len());
    state.scheduler.abandon_running();
    // Their clients' last events still have to be written out.
    let _ = tokio::time::timeout(FINAL_EVENTS, work.wait()).await;
}

/// How long stopped work may take to deliver its final events: workers
/// check for a stop between network blocks, layers and tiles, so this
/// bounds one such piece of work on a busy CPU, not a step.
const FINAL_EVENTS: Duration = Duration::from_secs(3);

/// Connections per uid, so one user cannot take every slot.
#[derive(Default, Clone)]
pub(crate) struct PerUid(Arc<Mutex<HashMap<u32, usize>>>);

/// One connection's share of its uid's count, given back on drop.
pub(crate) struct UidSlot {
    counts: PerUid,
    uid: u32,
}

impl PerUid {
    pub(crate) fn take(&self, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(uid).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Tells a client over the connection limit why it is turned away.
async fn refuse(mut stream: UnixStream, limit: usize, field: &str) {
    let err = wire_error(
        ErrorKind::Overloaded,
        format!("too many connections (limit {limit}, {field}); try again later"),
        Map::from_iter([
            ("limit".to_string(), json!(limit)),
            ("field".to_string(), json!(field)),
        ]),
    );
    let mut line = error_response(None, &err);
    line.push('\n');
    let _ = stream.write_all(line.as_bytes()).await;
}
