//! Stops a generation midway through a forward pass. A denoising step or a
//! long prefill can take minutes on the CPU, so waiting for its end before
//! honouring a cancel (or a deadline, or a shutdown) holds the queue that
//! long. The worker runs each job inside [`during`], and the network code
//! calls [`check`] between blocks, layers and tiles.
//!
//! The job's [`Cancellation`] travels in a thread-local rather than as an
//! argument: the checks sit deep inside forward passes that the reference
//! tests and the bench call too, and a flag that only the worker sets is
//! not worth a parameter on every layer. Code that fans out to rayon's
//! threads takes a [`current`] handle first, since those threads do not
//! see the caller's thread-locals.

use std::cell::RefCell;

use super::cancel::Cancellation;

thread_local! {
    static RUNNING: RefCell<Option<Cancellation>> = const { RefCell::new(None) };
}

/// Why a forward pass stopped early: carried inside a candle error, and
/// read back by the worker from the job's cancellation, not from the error.
#[derive(Debug, thiserror::Error)]
#[error("the job was stopped midway")]
pub struct Interrupted;

/// Runs `work` with `cancel` as this thread's job, then restores whatever
/// was there before, also when `work` panics.
pub fn during<T>(cancel: &Cancellation, work: impl FnOnce() -> T) -> T {
    struct Restore(Option<Cancellation>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            RUNNING.with(|running| *running.borrow_mut() = previous);
        }
    }
    let previous = RUNNING.with(|running| running.replace(Some(cancel.clone())));
    let _restore = Restore(previous);
    work()
}

/// This thread's job, for work handed to other threads.
pub fn current() -> Option<Cancellation> {
    RUNNING.with(|running| running.borrow().clone())
}

/// True when this thread's job has been asked to stop.
pub fn requested() -> bool {
    RUNNING.with(|running| {
        running
            .borrow()
            .as_ref()
            .is_some_and(Cancellation::is_requested)
    })
}

/// An error when this thread's job has been asked to stop; outside a job
/// (tests, the bench) never.
pub fn check() -> candle_core::Result<()> {
    if requested() {
        return Err(candle_core::Error::wrap(Interrupted));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_fails_only_inside_a_cancelled_job() {
        assert!(check().is_ok(), "no job: nothing to stop");
        let cancel = Cancellation::new();
        during(&cancel, || {
            assert!(check().is_ok());
            cancel.request();
            assert!(check().is_err());
            assert!(current().is_some_and(|c| c.is_requested()));
        });
        assert!(check().is_ok(), "the job ended with its scope");
        assert!(current().is_none());
    }

    #[test]
    fn a_panicking_job_does_not_leave_its_cancel_behind() {
        let cancel = Cancellation::new();
        cancel.request();
        let result = std::panic::catch_unwind(|| during(&cancel, || panic!("boom")));
        assert!(result.is_err());
        assert!(check().is_ok());
    }
}
