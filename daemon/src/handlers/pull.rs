//! `models.source` (where a load would find the files) and `models.pull`
//! (download them now, streaming progress).

use std::sync::Arc;

use jsonrpsee::types::Params;
use jsonrpsee::PendingSubscriptionSink;
use modeld_wire::types::{NameParams, PullEvent, PullParams, SourceReply};

use crate::pull::{PullJob, PullUpdate};
use crate::rpc::error::wire_object;
use crate::rpc::{decode_params, ApiError};
use crate::sources::describe;
use crate::state::AppState;
use crate::validate::valid_name;

pub async fn source(state: Arc<AppState>, params: NameParams) -> Result<SourceReply, ApiError> {
    let model = state.registry.get(&valid_name(&params.name)?)?;
    let roots = state.cache_roots();
    let hub = state.hub_settings();
    let caller = crate::auth::current();
    // Directory walks can be slow on network file systems.
    tokio::task::spawn_blocking(move || {
        let mut reply = describe(&model, &roots, &hub);
        if let Some(caller) = caller {
            hide_unlistable(&mut reply, &caller);
        }
        reply
    })
    .await
    .map_err(|err| ApiError::Internal(err.to_string()))
}

/// A caller who could not list the model's folder themselves does not
/// learn its file names from the daemon either.
fn hide_unlistable(reply: &mut SourceReply, caller: &crate::auth::Caller) {
    let Some(path) = &reply.path else { return };
    let dir = if path.is_dir() {
        path.as_path()
    } else {
        path.parent().unwrap_or(path)
    };
    if caller.admin || caller.may_list(dir) {
        return;
    }
    reply.files.clear();
    reply.reason = Some(format!(
        "file names hidden: uid {} cannot list {}",
        caller.uid,
        dir.display()
    ));
}

pub async fn pull(params: Params<'static>, pending: PendingSubscriptionSink, state: Arc<AppState>) {
    let mut watch = match start(&params, &state) {
        Ok(watch) => watch,
        Err(err) => {
            pending.reject(err).await;
            return;
        }
    };
    let Ok(sink) = pending.accept().await else {
        return;
    };
    loop {
        let event = tokio::select! {
            event = watch.next() => event,
            _ = sink.closed() => return,
        };
        let Some(update) = event else { return };
        let last = is_last(&update);
        if send(&sink, &as_wire(update)).await.is_err() || last {
            return;
        }
    }
}

fn start(
    params: &Params<'static>,
    state: &Arc<AppState>,
) -> Result<crate::pull::PullWatch, ApiError> {
    let params: PullParams = decode_params(params)?;
    let model = state.registry.get(&valid_name(&params.name)?)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let watch = state.pulls.attach_or_start(PullJob {
        model,
        roots: state.cache_roots(),
        hub: state.hub_settings(),
        verify: params.verify,
        repair: Vec::new(),
        fingerprints: state.registry.fingerprints().clone(),
    })?;
    Ok(watch)
}

fn is_last(update: &PullUpdate) -> bool {
    !matches!(
        update,
        Ok(PullEvent::Start { .. } | PullEvent::Progress { .. })
    )
}

/// The update as the client gets it: a pull's error takes wire form here.
fn as_wire(update: PullUpdate) -> PullEvent {
    update.unwrap_or_else(|err| PullEvent::Error {
        done: true,
        error: wire_object(&err.into()),
    })
}

async fn send(sink: &jsonrpsee::SubscriptionSink, event: &PullEvent) -> Result<(), ()> {
    let message = serde_json::value::to_raw_value(event).map_err(|_| ())?;
    sink.send(message).await.map_err(|_| ())
}
