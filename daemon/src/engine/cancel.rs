//! How a running generation is cancelled, and who decides how it ended: a
//! cancel and the end of the job race for one flag, so a cancel answered
//! with `cancelled: true` is always what the client sees.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const FINISHED: u8 = 2;
const TIMED_OUT: u8 = 3;
const SHUT_DOWN: u8 = 4;

/// Why a job was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A client asked, or went away.
    Cancelled,
    /// It ran past `scheduler.max_job_s`.
    TimedOut,
    /// The daemon is stopping.
    ShutDown,
}

/// Shared by the scheduler (which cancels and reports the outcome) and the
/// worker (which stops generating once a stop is requested).
#[derive(Debug, Clone, Default)]
pub struct Cancellation(Arc<AtomicU8>);

impl Cancellation {
    pub fn new() -> Self {
        Cancellation::default()
    }

    /// Asks the job to stop on a client's behalf. True when the job will
    /// end as cancelled; false when its outcome was already settled
    /// otherwise.
    pub fn request(&self) -> bool {
        self.stop(Stop::Cancelled)
    }

    /// Asks the job to stop for `why`. True when the job will end that
    /// way: the first stop wins, and a settled job stays settled.
    pub fn stop(&self, why: Stop) -> bool {
        let state = match why {
            Stop::Cancelled => CANCELLED,
            Stop::TimedOut => TIMED_OUT,
            Stop::ShutDown => SHUT_DOWN,
        };
        match self
            .0
            .compare_exchange(RUNNING, state, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(current) => current == state,
        }
    }

    /// Whether the job has been asked to stop, for whatever reason.
    pub fn is_requested(&self) -> bool {
        self.stopped().is_some()
    }

    /// Why the job was asked to stop, if it was.
    pub fn stopped(&self) -> Option<Stop> {
        match self.0.load(Ordering::SeqCst) {
            CANCELLED => Some(Stop::Cancelled),
            TIMED_OUT => Some(Stop::TimedOut),
            SHUT_DOWN => Some(Stop::ShutDown),
            _ => None,
        }
    }

    /// Settles the job as ended without a stop. False when a stop came
    /// first: the job must then be reported as stopped.
    pub fn settle(&self) -> bool {
        self.0
            .compare_exchange(RUNNING, FINISHED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            || self.0.load(Ordering::SeqCst) == FINISHED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_cancel_and_settle_wins_for_good() {
        let cancelled = Cancellation::new();
        assert!(cancelled.request());
        assert!(cancelled.request(), "asking twice still answers true");
        assert!(!cancelled.settle());
        assert!(cancelled.is_requested());

        let finished = Cancellation::new();
        assert!(finished.settle());
        assert!(!finished.request(), "too late: the outcome is settled");
        assert!(!finished.is_requested());
        assert!(finished.settle());
    }

    #[test]
    fn the_first_stop_names_the_reason() {
        let timed_out = Cancellation::new();
        assert!(timed_out.stop(Stop::TimedOut));
        assert!(
            !timed_out.request(),
            "a cancel after the deadline is too late"
        );
        assert_eq!(timed_out.stopped(), Some(Stop::TimedOut));
        assert!(timed_out.is_requested());
        assert!(!timed_out.settle());

        let running = Cancellation::new();
        assert_eq!(running.stopped(), None);
        assert!(running.stop(Stop::ShutDown));
        assert!(
            running.stop(Stop::ShutDown),
            "asking twice still answers true"
        );
        assert_eq!(running.stopped(), Some(Stop::ShutDown));
    }
}
