//! Why a job failed: what the queue itself refuses or ends (a full queue,
//! shutdown, a cancel), and the loader's and engine's errors of the jobs it
//! runs. Errors stay typed here and in the events a generation streams; the
//! RPC layer gives them wire form.

use std::sync::Arc;

use modeld_wire::types::GenerateEvent;

use crate::engine::EngineError;
use crate::loader::LoadError;
use crate::modes::UnknownMode;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    UnknownMode(#[from] UnknownMode),
    #[error("job {job} was cancelled")]
    Cancelled { job: u64 },
    #[error("job {job} ran longer than scheduler.max_job_s ({limit_s} s) and was stopped")]
    TimedOut { job: u64, limit_s: u64 },
    #[error("the job queue is full ({capacity} jobs); try again later")]
    QueueFull { capacity: usize },
    #[error("modeld is shutting down and accepts no new work")]
    ShuttingDown,
    #[error("internal error: the model's worker stopped without a final event")]
    WorkerStopped,
}

impl JobError {
    /// Whether the job was stopped by a cancel rather than failing.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            JobError::Cancelled { .. } | JobError::Engine(EngineError::Cancelled)
        )
    }
}

/// What a generation's client receives: the worker's events (the final one
/// naming the mode), or the error that ended the job, shared with the
/// job's history.
pub type JobEvent = Result<GenerateEvent, Arc<JobError>>;
