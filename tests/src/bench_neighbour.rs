//! `bench cpu`'s busy neighbour, and the most that any engine could make of
//! the cores beside it.
//!
//! Linux shares the cores between sessions first (each session is an
//! autogroup, as each cgroup is under systemd) and only then between a
//! session's threads. A neighbour in a session of its own, as a job from
//! another login or another service is, leaves the daemon's session one core
//! of two however many threads it runs. One in the daemon's own session gets
//! a thread's share, so two engine threads get four thirds of a core. The
//! bench runs both, and beside each it times the ceiling: threads that read
//! their own part of the weights over and over, never waiting for each other,
//! which no engine's decode can beat.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where the neighbour runs, which decides what share the scheduler gives it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// A session of its own: another user's job, or another service.
    Own,
    /// The session of the bench and its daemon.
    Daemons,
}

impl Session {
    pub const BOTH: [Session; 2] = [Session::Own, Session::Daemons];

    pub fn label(self) -> &'static str {
        match self {
            Session::Own => "its own",
            Session::Daemons => "the daemon's",
        }
    }
}

/// The hidden `spin` subcommand: the busy neighbour, one core's worth.
pub fn spin() -> ! {
    loop {
        std::hint::spin_loop();
    }
}

/// The busy neighbour: this binary's `spin` subcommand, killed on drop.
pub struct Neighbour(Child);

impl Neighbour {
    pub fn start(session: Session) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let mut command = Command::new(exe);
        command.arg("spin");
        if session == Session::Own {
            new_session(&mut command);
        }
        let neighbour = Neighbour(command.spawn().expect("start the spinner"));
        // Let the scheduler see it busy before anything is timed.
        std::thread::sleep(Duration::from_millis(200));
        neighbour
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn new_session(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only setsid, which is async-signal-safe
    // and allocates nothing, is called.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// How long each streaming measurement runs.
const STREAM_TIME: Duration = Duration::from_millis(2000);

/// The streaming ceiling for weights of `bytes`: `threads` threads beside
/// the neighbour in each session, over one thread alone, in bytes read.
#[derive(Clone, Copy)]
pub struct Ceiling {
    own: f64,
    daemons: f64,
}

impl Ceiling {
    pub fn measure(bytes: usize, threads: usize) -> Self {
        let words = vec![1u64; bytes / 8];
        let quiet = stream_rate(&words, 1);
        let beside = |session| {
            let _neighbour = Neighbour::start(session);
            stream_rate(&words, threads) / quiet
        };
        Ceiling {
            own: beside(Session::Own),
            daemons: beside(Session::Daemons),
        }
    }

    pub fn get(&self, session: Session) -> f64 {
        match session {
            Session::Own => self.own,
            Session::Daemons => self.daemons,
        }
    }
}

/// Bytes a second that `threads` threads read together, each summing its
/// own part of `words` pass after pass until the time is up.
fn stream_rate(words: &[u64], threads: usize) -> f64 {
    let part = (words.len() / threads).max(1);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let passes: usize = std::thread::scope(|scope| {
        let readers: Vec<_> = words
            .chunks_exact(part)
            .take(threads)
            .map(|mine| scope.spawn(|| passes_until(mine, &stop)))
            .collect();
        std::thread::sleep(STREAM_TIME);
        stop.store(true, Ordering::Relaxed);
        readers.into_iter().map(|r| r.join().expect("reader")).sum()
    });
    (passes * part * 8) as f64 / started.elapsed().as_secs_f64()
}

fn passes_until(words: &[u64], stop: &AtomicBool) -> usize {
    let mut passes = 0;
    while !stop.load(Ordering::Relaxed) {
        std::hint::black_box(sum(words));
        passes += 1;
    }
    passes
}

/// A sum the compiler vectorizes: eight independent lanes.
fn sum(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    for chunk in words.chunks_exact(8) {
        for (lane, word) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(*word);
        }
    }
    lanes.iter().fold(0, |a, b| a.wrapping_add(*b))
}
