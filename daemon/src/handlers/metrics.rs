//! `metrics`: the Prometheus text that `GET /metrics` also serves, for
//! hosts without the HTTP front door. The present (queue, resident models,
//! device memory) is read here, as the text is asked for.

use std::sync::Arc;

use modeld_wire::types::MetricsReply;

use crate::metrics::{self, Snapshot};
use crate::rpc::{ApiError, NoParams};
use crate::state::AppState;

pub async fn metrics(state: Arc<AppState>, _: NoParams) -> Result<MetricsReply, ApiError> {
    let capacity = state.config().scheduler.queue_size;
    let queue = state.scheduler.status(capacity);
    let running = queue.jobs.iter().filter(|job| job.running).count();
    let resident = state
        .engine
        .list()
        .into_iter()
        .map(|m| (m.name, m.device, m.estimated_bytes, m.measured_bytes))
        .collect();
    // NVML calls can take milliseconds per device; keep them off the reactor.
    let probe = state.clone();
    let vram = tokio::task::spawn_blocking(move || probe.gpu.snapshot())
        .await
        .map_err(|err| ApiError::Internal(format!("GPU probe failed: {err}")))?;
    let mut devices = Vec::new();
    for gpu in vram.gpus {
        let device = format!("cuda:{}", gpu.index);
        devices.push((device.clone(), "total", gpu.total_bytes));
        devices.push((device.clone(), "used", gpu.used_bytes));
        devices.push((device, "free", gpu.free_bytes));
    }
    devices.push(("cpu".to_string(), "total", vram.system.total_bytes));
    devices.push(("cpu".to_string(), "available", vram.system.available_bytes));
    let text = metrics::encode(Snapshot {
        queued: queue.jobs.len() - running,
        running,
        resident,
        devices,
        uptime: state.started.elapsed(),
    });
    Ok(MetricsReply {
        content_type: metrics::CONTENT_TYPE.to_string(),
        text,
    })
}
