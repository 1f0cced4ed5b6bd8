//! The threads a decode step's products run on.
//!
//! A decode step makes a few hundred short products (tens of microseconds
//! each on small models), so handing each to rayon, whose idle threads
//! sleep and whose caller blocks on a latch, cost more than the work: two
//! threads ran the 135M shape at half the speed of one. Here the caller
//! works too, helpers spin for a while between products before they sleep,
//! and tasks are claimed one at a time from a shared counter, so a helper
//! that the kernel takes off its core (a busy neighbour) holds back at most
//! the one small task it claimed, never a fixed share of the work. When
//! the caller still waits long for that task, the pool has more threads
//! than the cores it gets: one helper fewer takes part for a while.

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

/// How long one helper fewer joins the products after a straggle that
/// came when the helpers had worked well for [`CALM`]: a virtual
/// machine's core stops for a millisecond a few times a second even on a
/// quiet host, and a fixed quarter second after each cost two threads a
/// tenth of their speed.
const SHRUNK_FIRST: Duration = Duration::from_millis(5);

/// Each straggle soon after a helper came back doubles the time before
/// the next one is tried, up to this. Beside a busy neighbour, three
/// threads share two cores and a helper taken off its core holds a
/// claimed task for a whole time slice: two threads then decoded at
/// 0.91-0.95 of one, so the helper is tried only now and then.
const SHRUNK_LONGEST: Duration = Duration::from_millis(500);

/// Helpers that worked this long since one came back count as well.
const CALM: Duration = Duration::from_millis(100);

/// How many helpers join products now. A straggle means that the pool has
/// more threads than the cores it gets, so one helper fewer joins; after
/// a while one more is tried again. On two cores that is the caller
/// alone beside a neighbour; on sixteen it is fifteen threads, not one.
#[derive(Debug, Clone, Copy)]
struct Crew {
    /// The pool's helpers.
    most: usize,
    /// The helpers that join now.
    joining: usize,
    /// When one more helper is tried, while fewer than `most` join.
    grow_at: Option<Instant>,
    /// When a helper last came back.
    back: Option<Instant>,
    /// How long the last wait before a helper came back was.
    length: Duration,
}

impl Crew {
    fn new(helpers: usize) -> Self {
        Crew {
            most: helpers,
            joining: helpers,
            grow_at: None,
            back: None,
            length: SHRUNK_FIRST,
        }
    }

    /// The helpers that join a product starting at `now`, one more than
    /// before when its wait has passed.
    fn joining(&mut self, now: Instant) -> usize {
        if self.grow_at.is_some_and(|at| now >= at) {
            self.joining += 1;
            self.back = Some(now);
            self.grow_at = (self.joining < self.most).then(|| now + self.length);
        }
        self.joining
    }

    /// A helper straggled at `now`: one fewer joins for a while, the
    /// longer the sooner after a helper came back this came.
    fn straggled(&mut self, now: Instant) {
        let calm = self
            .back
            .is_none_or(|back| now.saturating_duration_since(back) > CALM);
        self.length = if calm {
            SHRUNK_FIRST
        } else {
            (self.length * 2).clamp(SHRUNK_FIRST, SHRUNK_LONGEST)
        };
        self.joining = self.joining.saturating_sub(1);
        self.grow_at = Some(now + self.length);
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
    /// Helpers numbered below this join jobs; the others wait on
    /// `unpark`, off their cores, until it grows past them.
    joining: AtomicUsize,
    sleeping: Mutex<usize>,
    wake: Condvar,
    unpark: Condvar,
}

pub struct Pool {
    shared: &'static Shared,
    helpers: usize,
    /// One job at a time; a second caller (another model's worker) runs
    /// its tasks alone rather than wait. It holds how many helpers join,
    /// after straggles.
    submit: Mutex<Crew>,
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
            joining: AtomicUsize::new(threads.saturating_sub(1)),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
            unpark: Condvar::new(),
        }));
        let helpers = threads.saturating_sub(1);
        for n in 0..helpers {
            std::thread::Builder::new()
                .name(format!("modeld-decode-{n}"))
                .spawn(move || helper(shared, n))
                .expect("spawning a decode thread");
        }
        Pool {
            shared,
            helpers,
            submit: Mutex::new(Crew::new(helpers)),
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
        let joining = guard.joining(Instant::now());
        if joining == 0 {
            job.work();
            return;
        }
        self.admit(joining);
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

    /// Lets helpers numbered below `joining` take the next jobs, waking
    /// those that waited for it. Only a change is written: the helpers
    /// read this line for every product.
    fn admit(&self, joining: usize) {
        let before = self.shared.joining.load(SeqCst);
        if joining == before {
            return;
        }
        self.shared.joining.store(joining, SeqCst);
        if joining > before {
            // Under the lock, so that a helper between its check and its
            // wait cannot miss the call.
            let _sleeping = self
                .shared
                .sleeping
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.unpark.notify_all();
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

fn helper(shared: &'static Shared, index: usize) {
    let mut seen = shared.generation.load(SeqCst);
    loop {
        seen = wait_for_job(shared, seen);
        if shared.joining.load(SeqCst) <= index {
            wait_to_join(shared, index);
            continue;
        }
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

/// Sleeps until helper `index` may join jobs again. Its next job is a
/// later one: the caller that let it join offers one after.
fn wait_to_join(shared: &Shared, index: usize) {
    let mut sleeping = shared.sleeping.lock().unwrap_or_else(|e| e.into_inner());
    while shared.joining.load(SeqCst) <= index {
        sleeping = shared
            .unpark
            .wait(sleeping)
            .unwrap_or_else(|e| e.into_inner());
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

    /// Which helpers ran tasks of `pool.run(64, ..)`, by number, each
    /// task taking a millisecond.
    fn helpers_that_ran(pool: &Pool) -> Vec<usize> {
        let ran: Vec<AtomicUsize> = (0..pool.helpers).map(|_| AtomicUsize::new(0)).collect();
        pool.run(64, &|_| {
            let name = std::thread::current().name().map(str::to_owned);
            let helper = name.and_then(|n| n.strip_prefix("modeld-decode-")?.parse::<usize>().ok());
            if let Some(n) = helper {
                ran[n].fetch_add(1, SeqCst);
            }
            std::thread::sleep(Duration::from_millis(1));
        });
        (0..pool.helpers)
            .filter(|&n| ran[n].load(SeqCst) > 0)
            .collect()
    }

    /// Runs products until helper `n` takes a task of one (a helper may
    /// still be waking up when the caller has done them all), with
    /// `joining` helpers: a loaded machine running the tests may stall a
    /// helper and shrink the crew, or let a wait pass, between two.
    fn until_helper_runs(pool: &Pool, n: usize, joining: usize) -> Vec<usize> {
        for _ in 0..100 {
            fix_crew(pool, joining);
            let ran = helpers_that_ran(pool);
            if ran.contains(&n) {
                return ran;
            }
        }
        panic!("helper {n} never took a task");
    }

    fn fix_crew(pool: &Pool, joining: usize) {
        let mut crew = pool.submit.lock().unwrap();
        crew.joining = joining;
        crew.grow_at = (joining < crew.most).then(|| Instant::now() + Duration::from_secs(3600));
    }

    /// A helper that holds a claimed task too long sends the next products
    /// to one helper fewer, not to the caller alone; the last helpers
    /// wait off their cores, and come back one at a time.
    #[test]
    fn each_straggle_takes_one_helper_away_for_a_while() {
        let pool = Pool::new(3);
        let caller = std::thread::current().id();
        // The caller's tasks take 20 µs, a helper's 5 ms: a helper
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
        let mut tries = 0;
        while pool.submit.lock().unwrap().joining == 2 {
            pool.run(64, &slow);
            tries += 1;
            assert!(tries < 100, "no helper ever took a task");
        }
        {
            let crew = pool.submit.lock().unwrap();
            assert_eq!((crew.joining, crew.length), (1, SHRUNK_FIRST));
            assert!(crew.grow_at.is_some());
        }
        assert_eq!(
            until_helper_runs(&pool, 0, 1),
            vec![0],
            "the last one waits"
        );
        fix_crew(&pool, 0);
        assert!(
            helpers_that_ran(&pool).is_empty(),
            "the caller ran every task"
        );
        // Back one at a time (`waits_grow_with_straggles_close_together`
        // covers when); the one that waited wakes when let in.
        assert_eq!(until_helper_runs(&pool, 0, 1), vec![0]);
        until_helper_runs(&pool, 1, 2);
    }

    /// Straggles that follow each other double the wait before a helper
    /// is tried again, up to its longest, and take one helper each; one
    /// after the helpers worked well starts again short.
    #[test]
    fn waits_grow_with_straggles_close_together() {
        let mut crew = Crew::new(3);
        let start = Instant::now();
        assert_eq!(crew.joining(start), 3);
        crew.straggled(start);
        assert_eq!((crew.joining, crew.length), (2, SHRUNK_FIRST));
        assert_eq!(crew.joining(start), 2);
        let back = start + SHRUNK_FIRST;
        assert_eq!(crew.joining(back), 3);
        assert_eq!(crew.grow_at, None);
        let mut lengths = Vec::new();
        let mut now = back;
        for _ in 0..10 {
            now += CALM / 2;
            crew.straggled(now);
            lengths.push(crew.length);
            now = crew.grow_at.unwrap();
            crew.joining(now);
        }
        assert_eq!(lengths[0], SHRUNK_FIRST * 2);
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*lengths.last().unwrap(), SHRUNK_LONGEST);
        let calm_after = now + CALM * 2;
        crew.straggled(calm_after);
        assert_eq!(crew.length, SHRUNK_FIRST);
        for _ in 0..5 {
            crew.straggled(calm_after);
        }
        assert_eq!(crew.joining(calm_after), 0, "never below none");
        // The helpers come back one per wait.
        for expected in 1..=3 {
            let at = crew.grow_at.expect("one more to come back");
            assert_eq!(crew.joining(at - Duration::from_micros(1)), expected - 1);
            assert_eq!(crew.joining(at), expected);
        }
        assert_eq!(crew.grow_at, None);
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
