//! `models.*`: register, list, get and remove entries of the registry.

use std::sync::Arc;

use modeld_wire::types::{
    Event, ModelList, ModelRecord, NameParams, RegisterParams, RegisterReply, RemoveReply,
};

use crate::rpc::{ApiError, NoParams};
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
    let (model, replaced) = state.registry.register(model).await?;
    tracing::info!(name = %model.name, replaced, "model registered");
    state.emit(Event::ModelRegistered {
        name: model.name.clone(),
        replaced,
    });
    Ok(RegisterReply { model, replaced })
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
