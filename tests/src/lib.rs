//! Harness for the end-to-end tests: builds the real `modeld` and `modelctl`
//! binaries once, starts daemons in temporary directories, and talks to
//! them through the socket, the CLI and signals.

pub mod fakehub;
pub mod gguf;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use modeld_wire::{Client, ClientError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Directory holding the freshly built binaries (`target/debug` or
/// `target/release`, matching the test binary's own profile).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // Tests live in target/<profile>/deps, binaries in target/<profile>.
        let mut dir = exe.parent().expect("target dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "--quiet", "-p", "modeld", "-p", "modelctl"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
        dir
    })
}

pub fn modeld_bin() -> PathBuf {
    bin_dir().join("modeld")
}

pub fn modelctl_bin() -> PathBuf {
    bin_dir().join("modelctl")
}

/// A daemon running in its own temporary directory.
pub struct Daemon {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// `RLIMIT_FSIZE` for the process: a full disk without mounting one.
    file_size_limit: Option<u64>,
}

impl Daemon {
    /// Starts a daemon and waits until it answers `status`.
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts a daemon with extra environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_configured("", env)
    }

    /// Starts a daemon with a config file and extra environment variables.
    /// `HF_HOME` points into the daemon's temp dir unless `env` sets it.
    pub fn start_configured(config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("modeld-e2e")
            .tempdir()
            .expect("temp dir");
        let mut daemon = Daemon {
            socket: dir.path().join("modeld.sock"),
            state_dir: dir.path().join("state"),
            config: dir.path().join("modeld.toml"),
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            file_size_limit: None,
        };
        if !env.iter().any(|(k, _)| *k == "HF_HOME") {
            let hf_home = daemon.dir.path().join("hf");
            daemon
                .env
                .push(("HF_HOME".into(), hf_home.to_string_lossy().into_owned()));
        }
        std::fs::write(&daemon.config, config).expect("write config");
        daemon.spawn();
        daemon
    }

    /// Starts a daemon none of whose files may grow past `bytes`: writes
    /// beyond fail with EFBIG, as they would with ENOSPC on a full disk
    /// (SIGXFSZ is ignored, so the limit does not kill it). From the start,
    /// since reopening a store may write past a small limit.
    pub fn start_with_file_size_limit(config: &str, bytes: u64) -> Daemon {
        let mut daemon = Daemon::start_configured(config, &[]);
        daemon.stop();
        let store = daemon.state_dir.clone();
        std::fs::remove_dir_all(&store).expect("remove the first store");
        daemon.file_size_limit = Some(bytes);
        daemon.spawn();
        daemon
    }

    /// The standard HF cache of this daemon (`$HF_HOME/hub`).
    pub fn hf_cache(&self) -> PathBuf {
        let home = self
            .env
            .iter()
            .find(|(k, _)| k == "HF_HOME")
            .map(|(_, v)| v.clone());
        PathBuf::from(home.expect("HF_HOME is always set")).join("hub")
    }

    /// Subscribes to `models.pull` and collects events up to the last.
    pub fn pull(&self, params: Value) -> Vec<Value> {
        let mut client = self.client();
        let events: Result<Vec<Value>, _> = client
            .subscribe("models.pull", params)
            .expect("pull accepted")
            .collect::<Result<Vec<_>, _>>();
        let events = events.expect("pull stream");
        let last = events.last().expect("at least one event");
        assert_eq!(last["done"], true, "stream ended early: {events:?}");
        events
    }

    /// The command that starts this daemon, for tests that run it by hand.
    pub fn command(&self) -> Command {
        let mut command = Command::new(modeld_bin());
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--config")
            .arg(&self.config)
            .env("MODELD_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("HF_TOKEN")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_ENDPOINT")
            .env_remove("HF_HUB_OFFLINE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(bytes) = self.file_size_limit {
            limit_file_size(&mut command, bytes);
        }
        command
    }

    /// (Re)starts the process and waits for it to answer.
    pub fn spawn(&mut self) {
        if !self.config.exists() {
            std::fs::write(&self.config, "").expect("write empty config");
        }
        let child = self.command().spawn().expect("spawn modeld");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("daemon running").id() as i32)
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut client) = Client::connect(&self.socket) {
                if client.call_value("status", json!({})).is_ok() {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("modeld exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "modeld did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        let client = Client::connect(&self.socket).expect("connect to modeld");
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set timeout");
        client
    }

    /// One call on a fresh connection.
    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client().call_value(method, params)
    }

    /// Every event of a `generate` that must be accepted and run to its end.
    pub fn generate_events(&self, params: Value) -> Vec<Value> {
        self.client()
            .subscribe("generate", params)
            .expect("generate accepted")
            .collect::<Result<Vec<_>, _>>()
            .expect("generate stream")
    }

    /// Copies a fixture model into the daemon's temp dir (fixtures stay
    /// read-only) and registers it under the fixture's name.
    pub fn register_fixture(&self, fixture: &str) -> PathBuf {
        let dir = self.dir.path().join(fixture);
        copy_tree(&fixtures_dir().join(fixture), &dir);
        self.call(
            "models.register",
            json!({"name": fixture, "local_path": dir}),
        )
        .expect("register fixture");
        dir
    }

    /// Runs `modelctl` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(modelctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run modelctl")
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("send signal");
    }

    /// Waits for the process to exit on its own and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "modeld did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait: the graceful stop systemd performs.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(30))
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A registration with only the required fields.
pub fn model(name: &str) -> Value {
    json!({"name": name, "repo": format!("org/{name}")})
}

/// The names in a `models.list` reply.
pub fn names(list: &Value) -> Vec<String> {
    list["models"]
        .as_array()
        .expect("models array")
        .iter()
        .map(|m| m["name"].as_str().expect("name").to_string())
        .collect()
}

/// The `data.kind` of an error reply.
pub fn kind(err: &ClientError) -> &str {
    err.kind().unwrap_or("<none>")
}

/// Path to the fixture models kept in the repository (`tests/fixtures`),
/// so a fresh clone tests with nothing beside it.
/// Copies folder `from` to `to` with its subfolders (diffusers pipelines
/// keep each component in one).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("fixture copy dir");
    for entry in std::fs::read_dir(from).expect("fixture dir") {
        let path = entry.expect("fixture entry").path();
        let target = to.join(path.file_name().expect("file name"));
        if path.is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy fixture");
        }
    }
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Sets `RLIMIT_FSIZE` in the child before it runs, with SIGXFSZ ignored
/// (an ignored signal stays ignored across `exec`).
fn limit_file_size(command: &mut Command, bytes: u64) {
    use nix::sys::resource::{setrlimit, Resource};
    use nix::sys::signal::{signal, SigHandler, Signal};
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls are made:
    // setrlimit and sigaction, with no allocation.
    unsafe {
        command.pre_exec(move || {
            signal(Signal::SIGXFSZ, SigHandler::SigIgn).map_err(std::io::Error::from)?;
            setrlimit(Resource::RLIMIT_FSIZE, bytes, bytes).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}
