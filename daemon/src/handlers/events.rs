//! `events.subscribe`: a stream of registry, config and lifecycle events.

use std::sync::Arc;

use jsonrpsee::types::Params;
use jsonrpsee::PendingSubscriptionSink;
use modeld_wire::types::Event;
use tokio::sync::broadcast::error::RecvError;

use crate::rpc::{decode_params, ApiError, NoParams};
use crate::state::{AppState, GaugeGuard};

pub async fn subscribe(
    params: Params<'static>,
    pending: PendingSubscriptionSink,
    state: Arc<AppState>,
) {
    if let Err(err) = decode_params::<NoParams>(&params) {
        pending.reject(ApiError::from(err)).await;
        return;
    }
    // Subscribe before accepting so no event between the two is missed.
    let mut events = state.subscribe_events();
    let Ok(sink) = pending.accept().await else {
        return;
    };
    let _gauge = GaugeGuard::new(&state.stats.subscriptions);
    let shutdown = state.shutdown_token();
    loop {
        // Pending events first: the shutdown event is queued before the
        // token fires, and subscribers should see it.
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            _ = sink.closed() => return,
            _ = shutdown.cancelled() => return,
        };
        let event = match event {
            Ok(event) => event,
            // A slow reader skips what it missed rather than stalling others.
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "event subscriber lagged");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let last = matches!(event, Event::ShuttingDown);
        let message = serde_json::value::to_raw_value(&event).expect("events always serialize");
        if sink.send(message).await.is_err() || last {
            return;
        }
    }
}
