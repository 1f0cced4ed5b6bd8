//! `models.*`: register, list, get and remove entries of the registry.
//! Registration checks the target cache and its free space first; removal
//! can purge the model's cache files too, planned like `cache.rm`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use modeld_wire::types::{
    CachePlan, Event, ModelList, ModelRecord, NameParams, RegisterParams, RegisterReply,
    RemoveParams, RemoveReply, SpaceCheck, SpaceStatus,
};

use crate::caches::{self, clean, CacheError};
use crate::hub::cache::check_space;
use crate::rpc::{ApiError, NoParams};
use crate::sources::find_on_disk;
use crate::state::AppState;
use crate::validate::{valid_name, ValidModel, ValidationError};

pub async fn register(
    state: Arc<AppState>,
    params: RegisterParams,
) -> Result<RegisterReply, ApiError> {
    let model = ValidModel::try_from(params)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let space = registration_space(&state, &model).await?;
    let (model, replaced) = state.registry.register(model).await?;
    tracing::info!(name = %model.name, replaced, "model registered");
    if let Some(space) = space.as_ref().filter(|s| s.status == SpaceStatus::Warning) {
        tracing::warn!(name = %model.name, needed = space.needed_bytes, available = space.available_bytes,
            path = %space.path.display(), "the model would leave under 10% free space");
    }
    state.emit(Event::ModelRegistered {
        name: model.name.clone(),
        replaced,
    });
    Ok(RegisterReply {
        model,
        replaced,
        space,
    })
}

/// Checks the cache a pull would fill: it must be configured, and
/// `estimated_size` must fit in it (nothing is needed when the files are
/// on disk already). Pulls check again with the real sizes.
async fn registration_space(
    state: &AppState,
    model: &ValidModel,
) -> Result<Option<SpaceCheck>, ApiError> {
    let roots = state.cache_roots();
    let target = roots.target(&model.cache)?;
    let (Some(size), Some(_)) = (model.estimated_size, &model.repo) else {
        return Ok(None);
    };
    let record = model.record(0, 0);
    let check = tokio::task::spawn_blocking(move || {
        let needed = if find_on_disk(&record, &roots).is_some() {
            0
        } else {
            size
        };
        check_space(&target, needed)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Some(check))
}

pub async fn list(state: Arc<AppState>, _: NoParams) -> Result<ModelList, ApiError> {
    Ok(ModelList {
        models: state.registry.list()?,
    })
}

pub async fn get(state: Arc<AppState>, params: NameParams) -> Result<ModelRecord, ApiError> {
    let name = valid_name(&params.name)?;
    Ok(state.registry.get(&name)?)
}

/// Removes a registration; with `purge`, also the model's cache files,
/// planned first and deleted only with `apply`.
pub async fn remove(state: Arc<AppState>, params: RemoveParams) -> Result<RemoveReply, ApiError> {
    let name = valid_name(&params.name)?;
    if params.apply && !params.purge {
        return Err(ValidationError::new("apply", "applies only with purge: true").into());
    }
    let plan = if params.purge {
        Some(purge(&state, &name, params.apply).await?)
    } else {
        None
    };
    if plan.is_some() && !params.apply {
        return Ok(RemoveReply {
            removed: None,
            plan,
        });
    }
    let removed = state.registry.remove(&name).await?;
    tracing::info!(%name, purged = plan.is_some(), "model removed");
    state.emit(Event::ModelRemoved { name });
    Ok(RemoveReply {
        removed: Some(removed),
        plan,
    })
}

/// Plans (and with `apply`, performs) the deletion of `name`'s cache files;
/// refused while the model is loaded or its repo is being downloaded.
async fn purge(state: &AppState, name: &str, apply: bool) -> Result<CachePlan, ApiError> {
    let model = state.registry.get(name)?;
    if state.engine.get(name).is_some() {
        return Err(CacheError::InUse(format!("model {name} is loaded; unload it first")).into());
    }
    let others: Vec<(String, String)> = state
        .registry
        .list()?
        .into_iter()
        .filter(|m| m.name != model.name && m.repo.is_some() && m.repo == model.repo)
        .map(|m| (m.name, m.revision))
        .collect();
    let roots = caches::roots(state);
    let busy = busy_paths(state);
    let plan = tokio::task::spawn_blocking(move || {
        clean::remove_model(&roots, &busy, &model, &others, apply)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(plan)
}

/// Repo directories with a running download, and the snapshot directories
/// loaded models read from.
fn busy_paths(state: &AppState) -> HashSet<PathBuf> {
    let mut busy: HashSet<PathBuf> = state.pulls.active_repo_dirs().into_iter().collect();
    for model in state.engine.list() {
        let snapshot = model.path.ancestors().find(|dir| {
            dir.parent()
                .and_then(Path::file_name)
                .is_some_and(|name| name == "snapshots")
        });
        busy.extend(snapshot.map(Path::to_path_buf));
    }
    busy
}
