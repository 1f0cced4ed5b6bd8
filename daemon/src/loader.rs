//! Getting a model into memory: find its files (pulling them if needed),
//! apply its mode's adapters and keep-alive, and respect the memory budget.

use std::path::PathBuf;
use std::sync::Arc;

use modeld_wire::types::{ModelRecord, PullEvent};

use crate::engine::{EngineError, LoadRequest, Loaded, Placement, Resident};
use crate::modes::{Mode, ModelRef};
use crate::pull::PullJob;
use crate::rpc::ApiError;
use crate::sources::{find_on_disk, OnDisk};
use crate::state::AppState;

/// Loads `name` (a registered model) or `mode`'s model, unless resident.
pub async fn ensure_loaded(
    state: &Arc<AppState>,
    name: &str,
    mode: Option<&Mode>,
    placement: Option<Placement>,
) -> Result<Loaded, ApiError> {
    if let Some(resident) = state.engine.get(name) {
        return Ok(Loaded {
            model: resident.info.clone(),
            already_loaded: true,
            evicted: Vec::new(),
        });
    }
    let placement = match placement {
        Some(placement) => placement,
        None => Placement::choose(None, None)?,
    };
    let (path, loras, keep_alive) = match mode {
        Some(mode) => {
            let path = match &mode.model {
                ModelRef::Registered(model) => {
                    model_path(state, &state.registry.get(model)?).await?
                }
                ModelRef::Path(path) => path.clone(),
            };
            (path, mode.loras.clone(), mode.keep_alive)
        }
        None => (
            model_path(state, &state.registry.get(name)?).await?,
            Vec::new(),
            None,
        ),
    };
    let request = LoadRequest {
        name: name.to_string(),
        path,
        loras,
        placement,
        keep_alive,
    };
    let loaded = state
        .engine
        .load(request, Some(state.memory_budget()))
        .await?;
    for evicted in &loaded.evicted {
        tracing::info!(model = %evicted, "unloaded to make room for {name}");
    }
    Ok(loaded)
}

/// The resident model, loading it first when needed.
pub async fn resident(
    state: &Arc<AppState>,
    name: &str,
    mode: Option<&Mode>,
) -> Result<Arc<Resident>, ApiError> {
    ensure_loaded(state, name, mode, None).await?;
    state
        .engine
        .get(name)
        .ok_or_else(|| EngineError::NotLoaded(name.to_string()).into())
}

/// Where a registered model's files are (a directory, or a `.gguf` file):
/// on disk already, or pulled now.
pub async fn model_path(state: &Arc<AppState>, model: &ModelRecord) -> Result<PathBuf, ApiError> {
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
    while let Some(event) = watch.next().await {
        match event {
            PullEvent::Done { path, .. } => return Ok(path),
            PullEvent::Error { error, .. } => return Err(ApiError::Relayed(error)),
            _ => {}
        }
    }
    Err(ApiError::Internal(
        "the pull ended without an outcome".into(),
    ))
}
