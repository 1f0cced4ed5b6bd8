//! How jobs ended: the outcome of each finished job, the last ones kept so
//! a client can ask after a job it queued (`jobs.get`) or wait for it.
//! Errors stay typed here ([`JobError`]); the RPC layer turns them into
//! wire errors.

use std::collections::VecDeque;
use std::sync::Arc;

use modeld_wire::types::{FinishReason, GenerateEvent, JobInfo};

use super::error::{JobError, JobEvent};
use crate::util::unix_now;

/// Finished jobs remembered for `jobs.get`; older ones are forgotten.
pub const FINISHED_JOBS_KEPT: usize = 256;

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Done,
    Cancelled,
    Failed(Arc<JobError>),
}

impl JobOutcome {
    /// The outcome a generation's final event reports; `None` for tokens.
    pub fn of_event(event: &JobEvent) -> Option<JobOutcome> {
        let event = match event {
            Err(err) if err.is_cancelled() => return Some(JobOutcome::Cancelled),
            Err(err) => return Some(JobOutcome::Failed(err.clone())),
            Ok(event) => event,
        };
        match event {
            // Wire errors are made only at the RPC edge, never sent here.
            GenerateEvent::Token { .. }
            | GenerateEvent::Progress { .. }
            | GenerateEvent::Queued { .. }
            | GenerateEvent::Error { .. } => None,
            GenerateEvent::Images(done) if done.finish_reason == FinishReason::Cancelled => {
                Some(JobOutcome::Cancelled)
            }
            GenerateEvent::Images(_) => Some(JobOutcome::Done),
            GenerateEvent::Done {
                finish_reason: FinishReason::Cancelled,
                ..
            } => Some(JobOutcome::Cancelled),
            GenerateEvent::Done { .. } => Some(JobOutcome::Done),
        }
    }
}

/// Where a job is: waiting, running, or finished with its outcome.
#[derive(Debug, Clone)]
pub enum JobStage {
    Queued,
    Running,
    Finished { outcome: JobOutcome, at: u64 },
}

/// A mode switch that failed, as `status` shows the last one.
#[derive(Debug, Clone)]
pub struct SwitchFailure {
    pub job: u64,
    pub mode: String,
    pub error: Arc<JobError>,
    pub at: u64,
}

struct Finished {
    info: JobInfo,
    outcome: JobOutcome,
    at: u64,
}

/// The last finished jobs, oldest first, and the last failed switch.
#[derive(Default)]
pub struct History {
    finished: VecDeque<Finished>,
    last_switch_failure: Option<SwitchFailure>,
}

impl History {
    pub fn record(&mut self, mut info: JobInfo, outcome: JobOutcome) {
        let at = unix_now();
        info.running = false;
        let state = match &outcome {
            JobOutcome::Done => "done",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::Failed(_) => "failed",
        };
        crate::metrics::job_finished(&info.kind, state);
        if info.kind == "switch" && state != "cancelled" {
            crate::metrics::mode_switch(state == "done");
        }
        if let (JobOutcome::Failed(error), "switch") = (&outcome, info.kind.as_str()) {
            self.last_switch_failure = Some(SwitchFailure {
                job: info.id,
                mode: info.mode.clone().unwrap_or_default(),
                error: error.clone(),
                at,
            });
        }
        if self.finished.len() == FINISHED_JOBS_KEPT {
            self.finished.pop_front();
        }
        self.finished.push_back(Finished { info, outcome, at });
    }

    pub fn get(&self, id: u64) -> Option<(JobInfo, JobStage)> {
        let job = self.finished.iter().find(|job| job.info.id == id)?;
        let stage = JobStage::Finished {
            outcome: job.outcome.clone(),
            at: job.at,
        };
        Some((job.info.clone(), stage))
    }

    pub fn last_switch_failure(&self) -> Option<SwitchFailure> {
        self.last_switch_failure.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::UnknownMode;

    fn info(id: u64, kind: &str) -> JobInfo {
        JobInfo {
            id,
            kind: kind.into(),
            mode: Some("chat".into()),
            model: None,
            running: true,
            uid: None,
            position: None,
            ahead: None,
            eta_s: None,
        }
    }

    #[test]
    fn keeps_the_last_finished_jobs_and_the_last_switch_failure() {
        let mut history = History::default();
        let failure = Arc::new(JobError::from(UnknownMode("chat".into())));
        history.record(info(1, "switch"), JobOutcome::Failed(failure));
        for id in 2..=(FINISHED_JOBS_KEPT as u64 + 1) {
            history.record(info(id, "generate"), JobOutcome::Done);
        }
        assert!(history.get(1).is_none(), "the oldest is forgotten");
        let (job, stage) = history.get(2).unwrap();
        assert!(!job.running);
        assert!(matches!(
            stage,
            JobStage::Finished {
                outcome: JobOutcome::Done,
                ..
            }
        ));
        let failure = history.last_switch_failure().unwrap();
        assert_eq!((failure.job, failure.mode.as_str()), (1, "chat"));
    }
}
