//! How a running generation is cancelled, and who decides how it ended: a
//! cancel and the end of the job race for one flag, so a cancel answered
//! with `cancelled: true` is always what the client sees.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const FINISHED: u8 = 2;

/// Shared by the scheduler (which cancels and reports the outcome) and the
/// worker (which stops generating once a cancel is requested).
#[derive(Debug, Clone, Default)]
pub struct Cancellation(Arc<AtomicU8>);

impl Cancellation {
    pub fn new() -> Self {
        Cancellation::default()
    }

    /// Asks the job to stop. True when the job will end as cancelled;
    /// false when its outcome was already settled otherwise.
    pub fn request(&self) -> bool {
        match self
            .0
            .compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(state) => state == CANCELLED,
        }
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// Settles the job as ended without a cancel. False when a cancel came
    /// first: the job must then be reported as cancelled.
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
}
