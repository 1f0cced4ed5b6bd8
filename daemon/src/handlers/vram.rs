//! `vram`: per-GPU memory and processes, or the reason there is none.

use std::sync::Arc;

use modeld_wire::types::VramReply;

use crate::rpc::{ApiError, NoParams};
use crate::state::AppState;

pub async fn vram(state: Arc<AppState>, _: NoParams) -> Result<VramReply, ApiError> {
    // NVML calls can take milliseconds per device; keep them off the reactor.
    let models = state.engine.list();
    let mut reply = tokio::task::spawn_blocking(move || state.gpu.snapshot())
        .await
        .map_err(|err| ApiError::Internal(format!("GPU probe failed: {err}")))?;
    reply.models = models;
    Ok(reply)
}
