//! The threads a decode step's products run on.
//!
//! A decode step makes a few hundred short products (tens of microseconds
//! each on small models), so handing each to rayon, whose idle threads
//! sleep and whose caller blocks on a latch, cost more than the work: two
//! threads ran the 135M shape at half the speed of one. Here the caller
//! works too, helpers spin for a while between products before they sleep,
//! and tasks are claimed one at a time from a shared counter, so a helper
//! that the kernel takes off its core (a busy neighbour) holds back at most
//! the one small task it claimed, never a fixed share of the work.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it sleeps: longer than the gap
/// between two products of a decode step, shorter than a human notices as
/// a busy core after the last request.
const SPIN: Duration = Duration::from_micros(300);

/// One product's tasks: `run(i)` for every `i < tasks`, each exactly once.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl Job<'_> {
    /// Claims and runs tasks until none is left.
    fn work(&self) {
        loop {
            let task = self.next.fetch_add(1, SeqCst);
            if task >= self.tasks {
                return;
            }
            (self.run)(task);
            self.done.fetch_add(1, SeqCst);
        }
    }
}

struct Shared {
    /// The job on offer, type-erased; null between jobs.
    job: AtomicPtr<()>,
    /// Bumped for every job, so a helper knows a new one from the last.
    generation: AtomicUsize,
    /// Helpers that may be reading `job`: the caller waits for none before
    /// the job (on its stack) goes away.
    inside: AtomicUsize,
    sleeping: Mutex<usize>,
    wake: Condvar,
}

pub struct Pool {
    shared: &'static Shared,
    helpers: usize,
    /// One job at a time; a second caller (another model's worker) runs
    /// its tasks alone rather than wait.
    submit: Mutex<()>,
}

/// The process's pool: one thread per core that rayon would use
/// (`RAYON_NUM_THREADS` sets it), the caller counted as one.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads()))
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let helpers = threads.saturating_sub(1);
        for n in 0..helpers {
            std::thread::Builder::new()
                .name(format!("modeld-decode-{n}"))
                .spawn(move || helper(shared))
                .expect("spawning a decode thread");
        }
        Pool {
            shared,
            helpers,
            submit: Mutex::new(()),
        }
    }

    /// Runs `run(i)` for `i` in `0..tasks` on the pool and the calling
    /// thread; returns when all are done. Which thread runs a task never
    /// changes its result.
    pub fn run(&self, tasks: usize, run: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            run,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        let guard = match self.submit.try_lock() {
            Ok(guard) if self.helpers > 0 && tasks > 1 => guard,
            _ => return job.work(),
        };
        self.offer(&job);
        job.work();
        let mut spins = 0u32;
        while job.done.load(SeqCst) < tasks {
            spins += 1;
            // A helper taken off its core finishes sooner if we step aside.
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        self.withdraw();
        drop(guard);
    }

    fn offer(&self, job: &Job) {
        let erased = job as *const Job as *mut ();
        self.shared.job.store(erased, SeqCst);
        self.shared.generation.fetch_add(1, SeqCst);
        if *self
            .shared
            .sleeping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            > 0
        {
            self.shared.wake.notify_all();
        }
    }

    /// Takes the job off offer and waits until no helper can still reach
    /// it, so that it may be dropped.
    fn withdraw(&self) {
        self.shared.job.store(std::ptr::null_mut(), SeqCst);
        while self.shared.inside.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
    }
}

fn helper(shared: &'static Shared) {
    let mut seen = shared.generation.load(SeqCst);
    loop {
        seen = wait_for_job(shared, seen);
        shared.inside.fetch_add(1, SeqCst);
        let erased = shared.job.load(SeqCst);
        if !erased.is_null() && shared.generation.load(SeqCst) == seen {
            // SAFETY: the caller keeps the job alive until `inside` is zero
            // after it nulled `job`; we counted ourselves in before reading
            // the pointer, and the pointer is of the generation we saw.
            let job = unsafe { &*(erased as *const Job) };
            job.work();
        }
        shared.inside.fetch_sub(1, SeqCst);
    }
}

/// Spins, then sleeps, until the generation moves past `seen`.
fn wait_for_job(shared: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let now = shared.generation.load(SeqCst);
        if now != seen {
            return now;
        }
        spins += 1;
        if spins.is_multiple_of(64) {
            if start.elapsed() > SPIN {
                break;
            }
            // Leaves the core to a neighbour that wants it.
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
    let mut sleeping = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
    *sleeping += 1;
    loop {
        let now = shared.generation.load(SeqCst);
        if now != seen {
            *sleeping -= 1;
            return now;
        }
        sleeping = shared
            .wake
            .wait(sleeping)
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for tasks in [0, 1, 2, 7, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(tasks, &|i| {
                counts[i].fetch_add(1, SeqCst);
            });
            assert!(counts.iter().all(|c| c.load(SeqCst) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn concurrent_callers_each_finish_their_own_job() {
        let pool = Pool::new(2);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        let sum = AtomicUsize::new(0);
                        pool.run(50, &|i| {
                            sum.fetch_add(i, SeqCst);
                        });
                        assert_eq!(sum.load(SeqCst), 49 * 50 / 2);
                    }
                });
            }
        });
    }
}
