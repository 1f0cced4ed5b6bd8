//! The id of the generation a request queued, for a front door that needs
//! it before the job's first event: the HTTP API reports a streaming
//! client's place in the queue, and cancels the job when the client leaves
//! while it still waits. A task-local, like the caller in `auth`, so the
//! handlers and the scheduler's signatures stay as they are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Holds 0 until a generation is queued under it.
#[derive(Debug, Default)]
pub struct JobTicket(AtomicU64);

impl JobTicket {
    /// The queued job's id, once there is one.
    pub fn job(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&id| id != 0)
    }
}

tokio::task_local! {
    static TICKET: Arc<JobTicket>;
}

/// Runs `work` with `ticket` receiving the id of the generation it queues.
pub async fn scope<F: std::future::Future>(ticket: Arc<JobTicket>, work: F) -> F::Output {
    TICKET.scope(ticket, work).await
}

/// The ticket of the request being handled, to carry it to another task.
pub fn current() -> Option<Arc<JobTicket>> {
    TICKET.try_with(Arc::clone).ok()
}

/// Records a queued generation's id on the current request's ticket.
pub(super) fn note(id: u64) {
    let _ = TICKET.try_with(|ticket| ticket.0.store(id, Ordering::Release));
}
