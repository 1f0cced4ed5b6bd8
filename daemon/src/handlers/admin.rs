//! Daemon-wide methods: `status`, `reload` and `shutdown`.

use std::sync::Arc;

use modeld_wire::types::{
    ConfigStatus, ModesStatus, QueueStatus, ReloadReply, ShutdownReply, StatusReply, SwitchError,
};

use crate::rpc::error::wire_object;
use crate::rpc::{ApiError, NoParams};
use crate::state::{AppState, ReloadCause};

pub async fn status(state: Arc<AppState>, _: NoParams) -> Result<StatusReply, ApiError> {
    let config = state.loaded_config();
    let modes = state.loaded_modes();
    Ok(StatusReply {
        version: env!("CARGO_PKG_VERSION").to_string(),
        queue: queue_status(&state),
        modes: ModesStatus {
            file: modes.file.clone(),
            count: modes.modes.modes.len(),
            reloads: modes.reloads,
            last_error: modes.last_error.clone(),
        },
        pid: std::process::id(),
        uptime_s: state.started.elapsed().as_secs(),
        started_at: state.started_at,
        socket: state.paths.socket.clone(),
        state_dir: state.paths.state_dir.clone(),
        config: ConfigStatus {
            path: config.source,
            loaded_at: config.loaded_at,
            reloads: config.reloads,
            last_error: config.last_error,
        },
        counts: state.stats.snapshot(
            state.registry.count() as u64,
            state.engine.list().len() as u64,
        ),
    })
}

/// The queue, with the last failed switch's error in wire form.
fn queue_status(state: &AppState) -> QueueStatus {
    let mut queue = state.scheduler.status(state.config().scheduler.queue_size);
    queue.last_switch_error = state
        .scheduler
        .last_switch_failure()
        .map(|failure| SwitchError {
            job: failure.job,
            mode: failure.mode,
            error: wire_object(&ApiError::Job(failure.error)),
            at: failure.at,
        });
    queue
}

/// The same reload that SIGHUP triggers (config, then modes), with its
/// outcome as the reply.
pub async fn reload(state: Arc<AppState>, _: NoParams) -> Result<ReloadReply, ApiError> {
    let reply = crate::lifecycle::reload(&state)?;
    state.reload_modes(ReloadCause::Request)?;
    Ok(reply)
}

/// Acknowledges first; the daemon then stops as on SIGTERM, finishing the
/// requests already in flight.
pub async fn shutdown(state: Arc<AppState>, _: NoParams) -> Result<ShutdownReply, ApiError> {
    state.request_shutdown();
    Ok(ShutdownReply { stopping: true })
}
