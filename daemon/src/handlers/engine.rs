//! `load`, `unload` and `generate`: the engine's methods. A model that is
//! not resident is loaded on first use, and its files pulled if need be.

use std::path::PathBuf;
use std::sync::Arc;

use jsonrpsee::types::Params;
use jsonrpsee::PendingSubscriptionSink;
use modeld_wire::types::{
    GenerateEvent, GenerateParams, LoadParams, LoadReply, ModelRecord, NameParams, PullEvent,
    UnloadReply,
};
use tokio_util::sync::CancellationToken;

use crate::engine::sampling::ValidGenerate;
use crate::engine::{EngineError, Placement, Resident};
use crate::pull::PullJob;
use crate::rpc::{decode_params, ApiError};
use crate::sources::{find_on_disk, OnDisk};
use crate::state::AppState;
use crate::validate::valid_name;

/// Generation events a slow client may leave unread before the model waits.
const EVENT_BUFFER: usize = 256;

pub async fn load(state: Arc<AppState>, params: LoadParams) -> Result<LoadReply, ApiError> {
    let name = valid_name(&params.name)?;
    let placement = Placement::choose(params.device.as_deref(), params.dtype.as_deref())?;
    if let Some(resident) = state.engine.get(&name) {
        return Ok(LoadReply {
            model: resident.info.clone(),
            already_loaded: true,
        });
    }
    let model = state.registry.get(&name)?;
    let dir = model_dir(&state, &model).await?;
    let (model, already_loaded) = state.engine.load(&name, dir, placement).await?;
    Ok(LoadReply {
        model,
        already_loaded,
    })
}

pub async fn unload(state: Arc<AppState>, params: NameParams) -> Result<UnloadReply, ApiError> {
    let name = valid_name(&params.name)?;
    let freed_bytes = state.engine.unload(&name).await?;
    tracing::info!(model = %name, freed_bytes, "model unloaded");
    Ok(UnloadReply { name, freed_bytes })
}

/// Where a model's files are (a directory, or a `.gguf` file): on disk
/// already, or pulled now.
async fn model_dir(state: &Arc<AppState>, model: &ModelRecord) -> Result<PathBuf, ApiError> {
    let roots = state.cache_roots();
    let found = {
        let (model, roots) = (model.clone(), roots.clone());
        tokio::task::spawn_blocking(move || find_on_disk(&model, &roots))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    match found {
        Some(OnDisk::Local { path, .. }) => return Ok(path),
        Some(OnDisk::Cache { dir, .. }) => return Ok(dir),
        None => {}
    }
    let mut watch = state.pulls.attach_or_start(PullJob {
        model: model.clone(),
        roots,
        hub: state.hub_settings(),
        verify: false,
    })?;
    let mut pending = std::collections::VecDeque::from(std::mem::take(&mut watch.replay));
    loop {
        let event = match pending.pop_front() {
            Some(event) => event,
            None => match watch.events.recv().await {
                Ok(event) => event,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(ApiError::Internal(
                        "the pull ended without an outcome".into(),
                    ))
                }
            },
        };
        match event {
            PullEvent::Done { path, .. } => return Ok(path),
            PullEvent::Error { error, .. } => return Err(ApiError::Relayed(error)),
            _ => {}
        }
    }
}

/// The resident model, loading it first if it is registered but not loaded.
async fn resident(state: &Arc<AppState>, name: &str) -> Result<Arc<Resident>, ApiError> {
    if let Some(resident) = state.engine.get(name) {
        return Ok(resident);
    }
    load(
        state.clone(),
        LoadParams {
            name: name.to_string(),
            ..Default::default()
        },
    )
    .await?;
    state
        .engine
        .get(name)
        .ok_or_else(|| EngineError::NotLoaded(name.to_string()).into())
}

pub async fn generate(
    params: Params<'static>,
    pending: PendingSubscriptionSink,
    state: Arc<AppState>,
) {
    let request = match validate(&params, &state) {
        Ok(request) => request,
        Err(err) => return pending.reject(err).await,
    };
    let resident = match resident(&state, &request.model).await {
        Ok(resident) => resident,
        Err(err) => return pending.reject(err).await,
    };
    let (events, mut receiver) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    let cancel = CancellationToken::new();
    // Stops the generation when the client goes away or unsubscribes.
    let _cancel_on_drop = cancel.clone().drop_guard();
    if let Err(err) = resident.submit(request, events, cancel) {
        return pending.reject(ApiError::from(err)).await;
    }
    // The first event comes after tokenizing and prefill: a request the
    // model cannot take (too long, no chat template) is refused outright
    // instead of accepted and then failed.
    let first = receiver.recv().await;
    if let Some(GenerateEvent::Error { error, .. }) = first {
        return pending.reject(ApiError::Relayed(error)).await;
    }
    let Ok(sink) = pending.accept().await else {
        return;
    };
    let mut next = first;
    loop {
        let Some(event) = next.take() else { return };
        let last = matches!(
            event,
            GenerateEvent::Done { .. } | GenerateEvent::Error { .. }
        );
        let Ok(message) = serde_json::value::to_raw_value(&event) else {
            return;
        };
        if sink.send(message).await.is_err() || last {
            return;
        }
        next = tokio::select! {
            event = receiver.recv() => event,
            _ = sink.closed() => return,
        };
    }
}

fn validate(params: &Params<'static>, state: &AppState) -> Result<ValidGenerate, ApiError> {
    let params: GenerateParams = decode_params(params)?;
    let request = ValidGenerate::try_from(params)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    // Unknown models are refused before anything is loaded.
    state.registry.get(&request.model)?;
    Ok(request)
}
