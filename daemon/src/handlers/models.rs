//! `models.*`: register, list, get and remove entries of the registry.
//! Registration checks the target cache and its free space first.

use std::sync::Arc;

use modeld_wire::types::{
    Event, ModelList, ModelRecord, NameParams, RegisterParams, RegisterReply, RemoveReply,
    SpaceCheck, SpaceStatus,
};

use crate::hub::cache::check_space;
use crate::rpc::{ApiError, NoParams};
use crate::sources::find_on_disk;
use crate::state::AppState;
use crate::validate::{valid_name, ValidModel};

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

pub async fn remove(state: Arc<AppState>, params: NameParams) -> Result<RemoveReply, ApiError> {
    let name = valid_name(&params.name)?;
    let removed = state.registry.remove(&name).await?;
    tracing::info!(%name, "model removed");
    state.emit(Event::ModelRemoved { name });
    Ok(RemoveReply { removed })
}
