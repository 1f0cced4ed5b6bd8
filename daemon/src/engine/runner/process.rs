//! A runner's process: started without a shell in a cleaned environment
//! and its own process group, stdout read as bounded JSON lines on a
//! thread of its own, stderr logged under the model's name with its tail
//! kept for errors, and stopped by escalation (stdin closed, SIGTERM,
//! SIGKILL to the whole group) so that nothing it started outlives it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{Map, Value};

/// How to start a runner and the limits it works under; built by the
/// loader from the admin's `[runners]` config only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The runner's name (`diffusers`, or a `[runners.NAME]`).
    pub runner: String,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// The config key that named the program, for errors about it.
    pub command_key: String,
    /// The pipeline class that sent the model here, when no native family
    /// runs it; errors name it.
    pub class: Option<String>,
    /// Variables added to the cleaned environment.
    pub env: Vec<(String, String)>,
    /// A private folder the runner may write pictures to.
    pub scratch_dir: PathBuf,
    pub start_timeout: Duration,
    pub load_timeout: Duration,
    pub step_timeout: Duration,
    pub stop_grace: Duration,
    pub max_line_bytes: usize,
}

impl Launch {
    /// Whether `other` starts the same runner (its own scratch folder aside).
    pub fn same_runner(&self, other: &Launch) -> bool {
        (&self.runner, &self.command, &self.env) == (&other.runner, &other.command, &other.env)
    }
}

/// What the stdout reader hands the worker.
#[derive(Debug)]
pub enum Line {
    Message(Map<String, Value>),
    /// The runner broke the protocol; the text says how.
    Bad(String),
    /// stdout closed: the runner exited or is about to.
    Closed,
}

/// The variables a runner may see from the daemon's environment; the
/// rest (and anything a client could influence) is dropped.
const PASSED_VARIABLES: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// Lines of stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 20;
/// The longest stderr line kept (the log gets it whole, up to this).
const STDERR_LINE_CHARS: usize = 2000;

pub struct RunnerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Line>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    pub pid: u32,
}

impl RunnerProcess {
    /// Starts `launch`'s command for `model`, placed on `gpu` (hidden from
    /// every GPU when `None`). `alive` is cleared when its output closes,
    /// so a runner that dies while idle is known dead before the next job
    /// is sent to it.
    pub fn start(
        launch: &Launch,
        model: &str,
        gpu: Option<usize>,
        alive: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let mut command = Command::new(&launch.command[0]);
        command
            .args(&launch.command[1..])
            .env_clear()
            .envs(clean_environment(launch, gpu))
            .current_dir(&launch.scratch_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The runner dies with the thread that owns it, even if the daemon
        // is killed: a GPU must never be held by an orphan.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
            });
        }
        let mut child = command.spawn()?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        let max = launch.max_line_bytes;
        std::thread::Builder::new()
            .name(format!("runner-out-{model}"))
            .spawn(move || {
                read_lines(stdout, max, sender);
                alive.store(false, Ordering::SeqCst);
            })?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (kept, name) = (tail.clone(), model.to_string());
        let stderr_thread = std::thread::Builder::new()
            .name(format!("runner-err-{model}"))
            .spawn(move || log_stderr(stderr, &name, &kept))?;
        Ok(RunnerProcess {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: tail,
            stderr_thread: Some(stderr_thread),
            pid,
        })
    }

    /// Sends one message as a line; false when the runner no longer reads.
    pub fn send(&mut self, message: &Value) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        let mut line = message.to_string();
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .and_then(|_| stdin.flush())
            .is_ok()
    }

    /// The next line, or `None` when nothing came within `wait`.
    pub fn next_line(&self, wait: Duration) -> Option<Line> {
        match self.lines.recv_timeout(wait) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(Line::Closed),
        }
    }

    /// The last lines the runner wrote to stderr, waiting briefly for a
    /// runner that just exited to have them read.
    pub fn stderr_tail(&mut self) -> String {
        if let Ok(Some(_)) = self.child.try_wait() {
            if let Some(thread) = self.stderr_thread.take() {
                join_within(thread, Duration::from_millis(500));
            }
        }
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// How the runner exited, if it has.
    pub fn exit_status(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe(status)),
            _ => None,
        }
    }

    /// Stops the runner: `unload`, stdin closed, then SIGTERM and SIGKILL
    /// to its process group after `grace` each; reaps it, so no zombie is
    /// left, and kills whatever it started that is still in its group.
    pub fn stop(mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.send(&serde_json::json!({"type": "unload"}));
        }
        self.stdin.take();
        let group = Pid::from_raw(self.pid as i32);
        if !self.exited_within(grace) {
            tracing::warn!(
                pid = self.pid,
                "runner still running {grace:?} after unload; SIGTERM"
            );
            let _ = killpg(group, Signal::SIGTERM);
            if !self.exited_within(grace) {
                tracing::warn!(pid = self.pid, "runner ignored SIGTERM; SIGKILL");
                let _ = killpg(group, Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
        // Children it left behind in its group go too.
        let _ = killpg(group, Signal::SIGKILL);
        if let Some(thread) = self.stderr_thread.take() {
            join_within(thread, Duration::from_secs(1));
        }
    }

    /// Kills the runner at once (it broke the protocol), and reaps it.
    pub fn kill(self) {
        let group = Pid::from_raw(self.pid as i32);
        let _ = killpg(group, Signal::SIGKILL);
        self.stop(Duration::ZERO);
    }

    fn exited_within(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The runner's environment: a few of the daemon's variables, the
/// runner's own from the config, and what modeld decides (offline Hub,
/// unbuffered Python, the GPU it may see).
fn clean_environment(launch: &Launch, gpu: Option<usize>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = PASSED_VARIABLES
        .iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    if !env.iter().any(|(name, _)| name == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    env.extend(launch.env.iter().cloned());
    let visible = gpu.map(|index| index.to_string()).unwrap_or_default();
    env.extend([
        ("HF_HUB_OFFLINE".to_string(), "1".to_string()),
        ("TRANSFORMERS_OFFLINE".to_string(), "1".to_string()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
        ("CUDA_VISIBLE_DEVICES".to_string(), visible),
        (
            "TMPDIR".to_string(),
            launch.scratch_dir.display().to_string(),
        ),
    ]);
    env
}

/// Reads stdout line by line, at most `max` bytes a line, parsing each as
/// a JSON object; stops at the first bad line (the worker kills the
/// runner) or at end of file.
fn read_lines(stdout: impl Read, max: usize, lines: mpsc::Sender<Line>) {
    let mut reader = BufReader::with_capacity(1 << 16, stdout);
    loop {
        let line = match read_bounded_line(&mut reader, max) {
            Ok(Some(bytes)) => parse_line(&bytes),
            Ok(None) => Line::Closed,
            Err(message) => Line::Bad(message),
        };
        let last = !matches!(line, Line::Message(_));
        if lines.send(line).is_err() || last {
            return;
        }
    }
}

/// One line without its `\n`; `None` at end of file.
fn read_bounded_line(reader: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    loop {
        let buffer = match reader.fill_buf() {
            Ok(buffer) => buffer,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(format!("reading its output failed: {err}")),
        };
        if buffer.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        let (taken, ended) = match buffer.iter().position(|b| *b == b'\n') {
            Some(end) => (end + 1, true),
            None => (buffer.len(), false),
        };
        let part = &buffer[..taken - usize::from(ended)];
        if line.len() + part.len() > max {
            return Err(format!(
                "it wrote a line longer than runners.max_line_bytes ({max} bytes)"
            ));
        }
        line.extend_from_slice(part);
        reader.consume(taken);
        if ended {
            return Ok(Some(line));
        }
    }
}

fn parse_line(bytes: &[u8]) -> Line {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(message)) => Line::Message(message),
        _ => {
            let shown: String = String::from_utf8_lossy(bytes).chars().take(200).collect();
            Line::Bad(format!(
                "it wrote a line that is not a JSON object: {shown:?}"
            ))
        }
    }
}

/// Logs each stderr line under the model's name and keeps the last few.
fn log_stderr(stderr: impl Read, model: &str, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        // A runner's stderr is bounded per line by what is kept, not read.
        match reader.by_ref().take(1 << 20).read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&bytes);
        let line: String = text.trim_end().chars().take(STDERR_LINE_CHARS).collect();
        if line.is_empty() {
            continue;
        }
        tracing::info!(target: "modeld::runner", "[{model}] {line}");
        let mut kept = tail.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == STDERR_TAIL_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
}

fn join_within(thread: std::thread::JoinHandle<()>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if thread.is_finished() {
        let _ = thread.join();
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "exited".to_string(),
    }
}

/// The runner and every process below it, by parent links in `/proc`.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(parent) = parent_of(pid) {
                parents.push((pid, parent));
            }
        }
    }
    let mut tree = vec![root];
    let mut index = 0;
    while index < tree.len() {
        let parent = tree[index];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of `pids` in bytes (`VmRSS`).
pub fn resident_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| crate::gpu::proc_kib_field(&status, "VmRSS"))
        .sum()
}

/// Whether `path` is a file directly inside `dir` (no `..`, no links).
pub fn inside(dir: &Path, name: &str) -> Option<PathBuf> {
    let relative = Path::new(name);
    let mut components = relative.components();
    let single = matches!(components.next(), Some(std::path::Component::Normal(_)))
        && components.next().is_none();
    single.then(|| dir.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_parsed() {
        let input = b"{\"type\":\"hello\"}\nnot json\n".to_vec();
        let (sender, receiver) = mpsc::channel();
        read_lines(&input[..], 1024, sender);
        assert!(matches!(receiver.recv().unwrap(), Line::Message(m) if m["type"] == "hello"));
        assert!(
            matches!(receiver.recv().unwrap(), Line::Bad(m) if m.contains("not a JSON object"))
        );
        let long = vec![b'x'; 5000];
        let (sender, receiver) = mpsc::channel();
        read_lines(&long[..], 1024, sender);
        assert!(matches!(receiver.recv().unwrap(), Line::Bad(m) if m.contains("max_line_bytes")));
    }

    #[test]
    fn names_from_a_runner_stay_in_the_scratch_folder() {
        let dir = Path::new("/scratch");
        assert_eq!(inside(dir, "a.png"), Some(dir.join("a.png")));
        for bad in ["../a.png", "/etc/passwd", "x/../../a", "", "sub/a.png"] {
            assert_eq!(inside(dir, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_process_tree_holds_this_process() {
        let me = std::process::id();
        assert_eq!(process_tree(me)[0], me);
        assert!(resident_bytes(&[me]) > 0);
    }
}
