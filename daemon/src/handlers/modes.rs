//! Modes and the job queue: `modes.list`, `modes.reload`, `switch_mode`,
//! `jobs.cancel`, `jobs.get`.

use std::sync::Arc;

use modeld_wire::types::{
    CancelReply, JobParams, JobReply, JobState, ModesReply, SwitchParams, SwitchReply,
};

use crate::rpc::error::wire_object;
use crate::rpc::{ApiError, NoParams};
use crate::scheduler::{JobError, JobOutcome, JobStage};
use crate::state::{AppState, ReloadCause};

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
    state.reload_modes(ReloadCause::Request)?;
    list(state, NoParams {}).await
}

/// Queues a switch; answers at once with its place in the queue, or with
/// `wait` once it has run (its error if it failed).
pub async fn switch(state: Arc<AppState>, params: SwitchParams) -> Result<SwitchReply, ApiError> {
    state.mode(&params.mode)?;
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let capacity = state.config().scheduler.queue_size;
    let mut reply = state.scheduler.submit_switch(params.mode, capacity)?;
    if params.wait {
        let job = reply.job;
        match state.scheduler.wait(job).await {
            Some(JobOutcome::Done) => reply.state = JobState::Done,
            Some(JobOutcome::Failed(err)) => return Err(ApiError::Job(err)),
            Some(JobOutcome::Cancelled) => return Err(JobError::Cancelled { job }.into()),
            None => return Err(ApiError::UnknownJob(job)),
        }
    }
    Ok(reply)
}

/// Where a job is, or how it ended.
pub async fn get_job(state: Arc<AppState>, params: JobParams) -> Result<JobReply, ApiError> {
    let (info, stage) = state
        .scheduler
        .job(params.job)
        .ok_or(ApiError::UnknownJob(params.job))?;
    let (state, error, finished_at) = match stage {
        JobStage::Queued => (JobState::Queued, None, None),
        JobStage::Running => (JobState::Running, None, None),
        JobStage::Finished { outcome, at } => match outcome {
            JobOutcome::Done => (JobState::Done, None, Some(at)),
            JobOutcome::Cancelled => (JobState::Cancelled, None, Some(at)),
            JobOutcome::Failed(err) => {
                let error = wire_object(&ApiError::Job(err));
                (JobState::Failed, Some(error), Some(at))
            }
        },
    };
    Ok(JobReply {
        id: info.id,
        kind: info.kind,
        mode: info.mode,
        model: info.model,
        state,
        error,
        finished_at,
        position: info.position,
        ahead: info.ahead,
        eta_s: info.eta_s,
    })
}

/// Administrators may cancel any job, other users only their own.
pub async fn cancel(state: Arc<AppState>, params: JobParams) -> Result<CancelReply, ApiError> {
    if let Some(caller) = crate::auth::current().filter(|c| !c.admin) {
        let owner = state
            .scheduler
            .job(params.job)
            .and_then(|(info, _)| info.uid);
        if owner.is_some_and(|uid| uid != caller.uid) {
            return Err(crate::auth::Forbidden {
                method: "jobs.cancel".into(),
                uid: caller.uid,
                why: "the job belongs to another user",
            }
            .into());
        }
    }
    Ok(CancelReply {
        job: params.job,
        cancelled: state.scheduler.cancel(params.job),
    })
}
