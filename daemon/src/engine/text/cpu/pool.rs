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

/// A caller that waited for tasks that helpers had claimed this many times
/// as long as one of its own tasks took (and at least [`STRAGGLER`]) saw a
/// helper lose its core mid-task.
const STRAGGLER_TASKS: u32 = 16;
const STRAGGLER: Duration = Duration::from_millis(1);

/// How long products then run on the caller alone before the helpers are
/// tried again, after a straggle that came when the helpers had worked
/// well for [`CALM`]: a virtual machine's core stops for a millisecond a
/// few times a second even on a quiet host, and a fixed quarter second
/// alone after each cost two threads a tenth of their speed.
const SOLO_FIRST: Duration = Duration::from_millis(5);

/// Each straggle soon after the helpers came back doubles the time alone,
/// up to this. Beside a busy neighbour, three threads share two cores and
/// a helper taken off its core holds a claimed task for a whole time
/// slice: two threads then decoded at 0.91-0.95 of one, so the helpers
/// are tried only now and then.
const SOLO_LONGEST: Duration = Duration::from_millis(500);

/// Helpers that worked this long since they came back count as well.
const CALM: Duration = Duration::from_millis(100);

/// When products run on the caller alone, after a straggling helper.
#[derive(Debug, Clone, Copy, Default)]
struct Solo {
    /// Until when products run on the caller alone; kept after it passes,
    /// as the time the helpers came back.
    until: Option<Instant>,
    /// How long the last time alone was.
    length: Duration,
}

impl Solo {
    fn now_alone(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// A helper straggled at `now`: products run alone for a while, the
    /// longer the sooner after the last time alone this came.
    fn straggled(&mut self, now: Instant) {
        let calm = self
            .until
            .is_none_or(|back| now.saturating_duration_since(back) > CALM);
        self.length = if calm {
            SOLO_FIRST
        } else {
            (self.length * 2).clamp(SOLO_FIRST, SOLO_LONGEST)
        };
        self.until = Some(now + self.length);
    }
}

/// One product's tasks: `run(i)` for every `i < tasks`, each exactly once.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl Job<'_> {
    /// Claims and runs tasks until none is left; returns how many it ran.
    /// They count as done together at the end, one write to the shared
    /// counter per thread rather than one per task: each write moves its
    /// cache line between the cores.
    fn work(&self) -> usize {
        let mut ran = 0;
        loop {
            let task = self.next.fetch_add(1, SeqCst);
            if task >= self.tasks {
                self.done.fetch_add(ran, SeqCst);
                return ran;
            }
            (self.run)(task);
            ran += 1;
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
    /// its tasks alone rather than wait. It holds when products run on the
    /// caller alone, after a straggling helper.
    submit: Mutex<Solo>,
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
            submit: Mutex::new(Solo::default()),
        }
    }

    /// The threads products run on: the helpers and the caller.
    pub fn threads(&self) -> usize {
        self.helpers + 1
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
        let mut guard = match self.submit.try_lock() {
            Ok(guard) if self.helpers > 0 && tasks > 1 => guard,
            _ => {
                job.work();
                return;
            }
        };
        if guard.now_alone(Instant::now()) {
            job.work();
            return;
        }
        self.offer(&job);
        let started = Instant::now();
        let mine = job.work() as u32;
        let per_task = started.elapsed() / mine.max(1);
        let mut waiting = None;
        let mut spins = 0u32;
        while job.done.load(SeqCst) < tasks {
            waiting.get_or_insert_with(Instant::now);
            spins += 1;
            // A helper taken off its core finishes sooner if we step aside.
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        self.withdraw();
        let patience = STRAGGLER.max(per_task * STRAGGLER_TASKS);
        if waiting.is_some_and(|since| since.elapsed() > patience) {
            guard.straggled(Instant::now());
        }
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

    /// A helper that holds a claimed task too long sends the next
    /// products to the caller alone, and the helpers come back after.
    #[test]
    fn a_straggling_helper_leaves_the_next_products_to_the_caller() {
        let pool = Pool::new(2);
        let caller = std::thread::current().id();
        // The caller's tasks take 20 µs, a helper's 5 ms: the helper
        // straggles whenever it takes one.
        let slow = |_| {
            if std::thread::current().id() == caller {
                let start = Instant::now();
                while start.elapsed() < Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // Until a helper takes a task (it may still be waking up when the
        // caller has done them all).
        let mut tries = 0;
        while pool.submit.lock().unwrap().until.is_none() {
            pool.run(64, &slow);
            tries += 1;
            assert!(tries < 100, "no helper ever took a task");
        }
        assert_eq!(pool.submit.lock().unwrap().length, SOLO_FIRST);
        // The time alone is short; hold it open so that a busy machine
        // running the test cannot let it pass before the next product.
        pool.submit.lock().unwrap().until = Some(Instant::now() + Duration::from_secs(3600));
        let helpers_ran = AtomicUsize::new(0);
        let count_helpers = |_| {
            if std::thread::current().id() != caller {
                helpers_ran.fetch_add(1, SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        pool.run(64, &count_helpers);
        assert_eq!(helpers_ran.load(SeqCst), 0, "the caller ran every task");
        pool.submit.lock().unwrap().until = Some(Instant::now());
        pool.run(64, &count_helpers);
        assert!(helpers_ran.load(SeqCst) > 0, "helpers tried again");
    }

    /// Straggles that follow each other double the time alone, up to its
    /// longest; one after the helpers worked well starts again short.
    #[test]
    fn time_alone_grows_with_straggles_close_together() {
        let mut solo = Solo::default();
        let start = Instant::now();
        solo.straggled(start);
        assert_eq!(solo.length, SOLO_FIRST);
        assert!(solo.now_alone(start) && !solo.now_alone(start + SOLO_FIRST));
        let mut lengths = Vec::new();
        for _ in 0..10 {
            let soon_after = solo.until.unwrap() + CALM / 2;
            solo.straggled(soon_after);
            lengths.push(solo.length);
        }
        assert_eq!(lengths[0], SOLO_FIRST * 2);
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*lengths.last().unwrap(), SOLO_LONGEST);
        let calm_after = solo.until.unwrap() + CALM * 2;
        solo.straggled(calm_after);
        assert_eq!(solo.length, SOLO_FIRST);
        assert!(solo.now_alone(calm_after) && !solo.now_alone(calm_after + SOLO_FIRST));
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
