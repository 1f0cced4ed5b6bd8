//! Modes and the job queue: `modes.list`, `modes.reload`, `switch_mode`,
//! `jobs.cancel`.

use std::sync::Arc;

use modeld_wire::types::{CancelReply, JobParams, ModesReply, SwitchParams, SwitchReply};

use crate::rpc::{ApiError, NoParams};
use crate::state::AppState;

pub async fn list(state: Arc<AppState>, _: NoParams) -> Result<ModesReply, ApiError> {
    let loaded = state.loaded_modes();
    Ok(ModesReply {
        file: loaded.file.clone(),
        default_mode: loaded.modes.default_mode.clone(),
        current: state.scheduler.current_mode(),
        modes: loaded
            .modes
            .modes
            .values()
            .map(|mode| mode.info())
            .collect(),
        loaded_at: loaded.loaded_at,
        reloads: loaded.reloads,
        last_error: loaded.last_error,
    })
}

/// The same reload a change of the file or SIGHUP triggers.
pub async fn reload(state: Arc<AppState>, _: NoParams) -> Result<ModesReply, ApiError> {
    state.reload_modes()?;
    list(state, NoParams {}).await
}

/// Queues a switch; answers at once with its place in the queue.
pub async fn switch(state: Arc<AppState>, params: SwitchParams) -> Result<SwitchReply, ApiError> {
    state.mode(&params.mode)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let capacity = state.config().scheduler.queue_size;
    state.scheduler.submit_switch(params.mode, capacity)
}

pub async fn cancel(state: Arc<AppState>, params: JobParams) -> Result<CancelReply, ApiError> {
    Ok(CancelReply {
        job: params.job,
        cancelled: state.scheduler.cancel(params.job),
    })
}
