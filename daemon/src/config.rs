//! The daemon's own settings: command-line paths plus the optional TOML file
//! (`modeld.toml`), validated into [`Config`]. Every field has an embedded
//! default, so the daemon starts with no file at all.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where things live, decided once at start-up from flags and environment.
#[derive(Debug, Clone)]
pub struct Paths {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_file: PathBuf,
    /// Given with `--config`: then a missing file is an error, not a default.
    pub config_explicit: bool,
    /// `--http` addresses; when given they replace `[http] listen`.
    pub http: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {}: {field} = {value} is out of range ({limit})", path.display())]
    OutOfRange {
        path: PathBuf,
        field: &'static str,
        value: String,
        limit: String,
    },
}

/// The contents of `modeld.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub cache: CacheConfig,
    pub hub: HubConfig,
    pub modes: ModesConfig,
    pub scheduler: SchedulerConfig,
    pub images: ImagesConfig,
    pub runners: RunnersConfig,
    pub http: HttpConfig,
}

/// Child processes that run models candle does not (`[runners]`): the
/// interpreter of the bundled diffusers runner, the limits every runner
/// works under, and the admin's own runners as `[runners.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunnersConfig {
    /// The Python that runs `diffusers_runner.py`; it needs torch and
    /// diffusers.
    pub python: String,
    /// Seconds a runner has to say hello after it starts.
    pub start_timeout_s: u64,
    /// Seconds a runner has to load a model.
    pub load_timeout_s: u64,
    /// Seconds a generation may go without a word from its runner.
    pub step_timeout_s: u64,
    /// Seconds an unload waits for the runner to exit, then again after
    /// SIGTERM, before SIGKILL.
    pub stop_grace_s: u64,
    /// The longest line a runner may write (a base64 picture is one line).
    pub max_line_bytes: u64,
    /// `[runners.NAME] command = ["/opt/svc/bin/python", "svc.py"]`.
    #[serde(flatten)]
    pub custom: std::collections::BTreeMap<String, RunnerCommand>,
}

/// An admin-configured runner: the command (run without a shell) and the
/// variables added to its otherwise cleaned environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerCommand {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

impl Default for RunnersConfig {
    fn default() -> Self {
        RunnersConfig {
            python: "python3".to_string(),
            start_timeout_s: 120,
            load_timeout_s: 1800,
            step_timeout_s: 600,
            stop_grace_s: 10,
            max_line_bytes: 64 << 20,
            custom: Default::default(),
        }
    }
}

/// The HTTP front door (OpenAI-compatible API, health, metrics): off
/// unless something is listed in `listen`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// TCP addresses (`127.0.0.1:11435`, `[::1]:11435`) and Unix sockets
    /// (`unix:/run/modeld/http.sock`).
    pub listen: Vec<String>,
    /// TOML file of API keys for TCP callers; must not be readable by
    /// group or others.
    pub keys_file: Option<PathBuf>,
    /// Lets TCP callers without a key in, as non-administrators, on
    /// loopback addresses only.
    pub allow_anonymous: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Where generated pictures are written (absolute); by default
    /// `<state_dir>/images`.
    pub output_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModesConfig {
    /// `modes.toml`; by default the one beside this config file, if any.
    pub file: Option<PathBuf>,
    /// Who may switch the daemon's mode by naming another mode in
    /// `generate` (`switch_mode` itself always needs an administrator).
    pub auto_switch: AutoSwitch,
}

/// Who a `generate {mode}` may switch the daemon's mode for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoSwitch {
    /// Any caller allowed to generate: modes switch on demand, as the
    /// original design does.
    #[default]
    Everyone,
    /// Only administrators; others get `forbidden` unless the mode they
    /// name is the one in force (or queued to be).
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Jobs (generations, mode switches, unloads) that may wait at once.
    pub queue_size: usize,
    /// Memory resident models may use: `"auto"` (80% of RAM, or of the first
    /// GPU's memory when there is one) or a size such as `"12G"`.
    pub memory_budget: String,
    /// Generations one text model decodes together (continuous batching).
    /// 1 runs them strictly one after another.
    pub max_batch: usize,
    /// Seconds a generation may run, from when its model has it; one that
    /// runs longer is stopped with a `timeout` error.
    pub max_job_s: u64,
}

/// An hour: a long CPU picture batch fits, a runaway job does not hold the
/// queue for the rest of the day.
pub const DEFAULT_MAX_JOB_S: u64 = 3600;

/// A batch of 8 costs a GPU little more than one sequence, and on the CPU
/// it turns one weight read per token into one per 8 tokens.
pub const DEFAULT_MAX_BATCH: usize = 8;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            queue_size: 64,
            memory_budget: "auto".to_string(),
            max_batch: DEFAULT_MAX_BATCH,
            max_job_s: DEFAULT_MAX_JOB_S,
        }
    }
}

/// Cache roots, all in the Hugging Face layout. The standard HF cache
/// (`HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`) is always
/// searched, and is the primary root unless one is set here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub primary: Option<PathBuf>,
    pub secondary: Option<PathBuf>,
    /// More caches to search for models other tools downloaded.
    pub extra: Vec<PathBuf>,
    /// Without reflinks, `cache.consolidate` hard-links only weight files
    /// and cache blobs of at least this many bytes.
    pub consolidate_min_bytes: u64,
}

/// A hard link saves a block or two on a small file, and small files are
/// the ones most often copied on purpose to be edited; weights are larger.
pub const DEFAULT_CONSOLIDATE_MIN_BYTES: u64 = 1 << 20;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            primary: None,
            secondary: None,
            extra: Vec::new(),
            consolidate_min_bytes: DEFAULT_CONSOLIDATE_MIN_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Overrides `HF_ENDPOINT`.
    pub endpoint: Option<String>,
    /// Attempts per request (and per interrupted file) before giving up.
    pub retries: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: None,
            retries: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Group that owns the socket, so its members may connect.
    pub socket_group: Option<String>,
    /// Socket file permissions, as an octal string.
    pub socket_mode: String,
    /// Longest request line accepted, in bytes.
    pub max_request_bytes: usize,
    pub max_connections: usize,
    /// Requests one connection may have running at once; more wait their turn.
    pub max_in_flight_per_connection: usize,
    /// How long a stop waits for in-flight requests before it gives up on them.
    pub shutdown_grace_s: u64,
    /// Members of this group may call every method, like root and the
    /// daemon's own user; others may only read (and generate, below).
    pub admin_group: Option<String>,
    /// Whether users outside the admin group may call `generate`.
    pub users_may_generate: bool,
    /// Requests one JSON-RPC batch may hold.
    pub max_batch: usize,
    /// Largest reply line; a bigger reply is replaced by an error.
    pub max_reply_bytes: usize,
    /// Seconds a started request line may take to arrive in full.
    pub read_timeout_s: u64,
    /// Seconds a connection with no request, stream or partial line in
    /// progress stays open; 0 keeps it open forever.
    pub idle_timeout_s: u64,
    /// Seconds a client may take none of its replies (its socket full)
    /// before its connection closes and its generations are cancelled.
    pub write_timeout_s: u64,
    /// Connections one uid may hold at once, so no single user can take
    /// every slot; 0 means `max_connections` minus a quarter for others.
    pub max_connections_per_uid: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket_group: None,
            socket_mode: "0660".to_string(),
            max_request_bytes: 1 << 20,
            max_connections: 1024,
            max_in_flight_per_connection: 64,
            shutdown_grace_s: 30,
            admin_group: None,
            users_may_generate: true,
            max_batch: 64,
            max_reply_bytes: 64 << 20,
            read_timeout_s: 10,
            idle_timeout_s: 600,
            write_timeout_s: 60,
            max_connections_per_uid: 0,
        }
    }
}

/// One address the HTTP front door listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// `unix:/absolute/path`, or an IP address with its port.
    pub fn parse(text: &str) -> Option<ListenAddr> {
        match text.strip_prefix("unix:") {
            Some(path) if Path::new(path).is_absolute() => Some(ListenAddr::Unix(path.into())),
            Some(_) => None,
            None => text.parse().ok().map(ListenAddr::Tcp),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl HttpConfig {
    /// The listen addresses, each parsed; the first bad one is the error.
    pub fn listeners(&self) -> Result<Vec<ListenAddr>, String> {
        self.listen
            .iter()
            .map(|text| ListenAddr::parse(text).ok_or_else(|| format!("{text:?}")))
            .collect()
    }

    fn validate(&self) -> Result<(), (String, &'static str)> {
        self.listeners().map(drop).map_err(|value| {
            let limit = "IP:port (\"127.0.0.1:11435\", \"[::1]:11435\") or unix:/absolute/path";
            (value, limit)
        })
    }
}

impl ServerConfig {
    /// The per-uid connection cap in force: configured, or three quarters
    /// of all slots (at least one), so other users always find some free.
    pub fn per_uid_limit(&self) -> usize {
        match self.max_connections_per_uid {
            0 => (self.max_connections - self.max_connections / 4).max(1),
            n => n.min(self.max_connections),
        }
    }

    /// The socket mode as bits; `validate` has already checked it parses.
    pub fn socket_mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.socket_mode, 8).unwrap_or(0o660)
    }
}

impl Config {
    /// Reads the file named in `paths`; a default path that does not exist
    /// yields the embedded defaults and `None` as the source.
    pub fn load(paths: &Paths) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = &paths.config_file;
        let (mut config, source) = match std::fs::read_to_string(path) {
            Ok(text) => (Config::parse(path, &text)?, Some(path.clone())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !paths.config_explicit => {
                (Config::default(), None)
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.clone(),
                    source,
                })
            }
        };
        // `--http` wins over the file, and is checked like it.
        if !paths.http.is_empty() {
            config.http.listen = paths.http.clone();
            config.validate(Path::new("--http"))?;
        }
        Ok((config, source))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let server = &self.server;
        let out_of_range = |field, value: String, limit: &str| ConfigError::OutOfRange {
            path: path.to_path_buf(),
            field,
            value,
            limit: limit.to_string(),
        };
        if let Some(dir) = self.images.output_dir.as_ref().filter(|d| !d.is_absolute()) {
            return Err(out_of_range(
                "images.output_dir",
                format!("{:?}", dir.display().to_string()),
                "an absolute path",
            ));
        }
        match u32::from_str_radix(&server.socket_mode, 8) {
            Ok(mode) if mode <= 0o777 && mode & 0o600 == 0o600 => {}
            _ => {
                return Err(out_of_range(
                    "server.socket_mode",
                    format!("{:?}", server.socket_mode),
                    "an octal mode such as \"0660\" that gives the owner read and write",
                ))
            }
        }
        if !(1024..=256 << 20).contains(&server.max_request_bytes) {
            return Err(out_of_range(
                "server.max_request_bytes",
                server.max_request_bytes.to_string(),
                "1024 to 268435456",
            ));
        }
        if !(1..=65536).contains(&server.max_connections) {
            return Err(out_of_range(
                "server.max_connections",
                server.max_connections.to_string(),
                "1 to 65536",
            ));
        }
        if !(1..=4096).contains(&server.max_in_flight_per_connection) {
            return Err(out_of_range(
                "server.max_in_flight_per_connection",
                server.max_in_flight_per_connection.to_string(),
                "1 to 4096",
            ));
        }
        let ranges: [(&'static str, u64, u64, u64); 7] = [
            ("server.max_batch", server.max_batch as u64, 1, 10_000),
            (
                "server.max_reply_bytes",
                server.max_reply_bytes as u64,
                1 << 16,
                1 << 32,
            ),
            ("server.read_timeout_s", server.read_timeout_s, 1, 3600),
            ("server.write_timeout_s", server.write_timeout_s, 1, 3600),
            (
                "server.idle_timeout_s",
                server.idle_timeout_s,
                0,
                86_400 * 7,
            ),
            (
                "server.max_connections_per_uid",
                server.max_connections_per_uid as u64,
                0,
                65_536,
            ),
            // Below a file-system block a link saves nothing worth an alias.
            (
                "cache.consolidate_min_bytes",
                self.cache.consolidate_min_bytes,
                4096,
                1 << 40,
            ),
        ];
        self.runners.validate(path)?;
        for (field, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                let limit = format!("{low} to {high}");
                return Err(out_of_range(field, value.to_string(), &limit));
            }
        }
        let roots = [
            ("cache.primary", &self.cache.primary),
            ("cache.secondary", &self.cache.secondary),
        ];
        for (field, root) in roots {
            if root.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(out_of_range(field, format!("{root:?}"), "an absolute path"));
            }
        }
        if self.cache.extra.iter().any(|p| !p.is_absolute()) {
            return Err(out_of_range(
                "cache.extra",
                format!("{:?}", self.cache.extra),
                "absolute paths",
            ));
        }
        if let Some(endpoint) = &self.hub.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(out_of_range(
                    "hub.endpoint",
                    format!("{endpoint:?}"),
                    "an http:// or https:// URL",
                ));
            }
        }
        if !(1..=20).contains(&self.hub.retries) {
            return Err(out_of_range(
                "hub.retries",
                self.hub.retries.to_string(),
                "1 to 20",
            ));
        }
        if !(1..=100_000).contains(&self.scheduler.queue_size) {
            return Err(out_of_range(
                "scheduler.queue_size",
                self.scheduler.queue_size.to_string(),
                "1 to 100000",
            ));
        }
        if !(1..=256).contains(&self.scheduler.max_batch) {
            return Err(out_of_range(
                "scheduler.max_batch",
                self.scheduler.max_batch.to_string(),
                "1 to 256",
            ));
        }
        if !(1..=7 * 86_400).contains(&self.scheduler.max_job_s) {
            return Err(out_of_range(
                "scheduler.max_job_s",
                self.scheduler.max_job_s.to_string(),
                "1 to 604800 (a week)",
            ));
        }
        let budget = &self.scheduler.memory_budget;
        if budget != "auto" && modeld_wire::types::parse_bytes(budget).is_err() {
            return Err(out_of_range(
                "scheduler.memory_budget",
                format!("{budget:?}"),
                "\"auto\" or a size such as \"12G\"",
            ));
        }
        if self.modes.file.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(out_of_range(
                "modes.file",
                format!("{:?}", self.modes.file),
                "an absolute path",
            ));
        }
        self.http
            .validate()
            .map_err(|(value, limit)| out_of_range("http.listen", value, limit))?;
        if let Some(file) = self.http.keys_file.as_ref().filter(|p| !p.is_absolute()) {
            return Err(out_of_range(
                "http.keys_file",
                format!("{:?}", file.display().to_string()),
                "an absolute path",
            ));
        }
        if server.shutdown_grace_s > 3600 {
            return Err(out_of_range(
                "server.shutdown_grace_s",
                server.shutdown_grace_s.to_string(),
                "0 to 3600",
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

impl RunnersConfig {
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let out_of_range = |field, value: u64, limit: &str| ConfigError::OutOfRange {
            path: path.to_path_buf(),
            field,
            value: value.to_string(),
            limit: limit.to_string(),
        };
        let ranges: [(&'static str, u64, u64, u64); 5] = [
            ("runners.start_timeout_s", self.start_timeout_s, 1, 3600),
            ("runners.load_timeout_s", self.load_timeout_s, 1, 86_400),
            ("runners.step_timeout_s", self.step_timeout_s, 1, 86_400),
            ("runners.stop_grace_s", self.stop_grace_s, 0, 600),
            (
                "runners.max_line_bytes",
                self.max_line_bytes,
                1 << 16,
                1 << 30,
            ),
        ];
        for (field, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return Err(out_of_range(field, value, &format!("{low} to {high}")));
            }
        }
        let invalid = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        if self.python.trim().is_empty() {
            return Err(invalid(
                "runners.python: give an interpreter, such as \"python3\"".into(),
            ));
        }
        for (name, runner) in &self.custom {
            if crate::validate::valid_name(name).is_err() {
                return Err(invalid(format!(
                    "runners.{name}: runner names use letters, digits and . _ - :"
                )));
            }
            if runner
                .command
                .first()
                .is_none_or(|program| program.is_empty())
            {
                return Err(invalid(format!(
                    "runners.{name}.command: give the program and its arguments, such as [\"/opt/svc/bin/python\", \"/opt/svc/runner.py\"]"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default().to_toml();
        assert_eq!(parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse("[server]\nmax_request_bytes = 10\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.max_request_bytes"), "{err}");
        let err = parse("[server]\nsocket_mode = \"999\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.socket_mode"), "{err}");
        let err = parse("[server]\nmax_conections = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn consolidate_min_bytes_defaults_to_a_mebibyte_and_is_bounded() {
        assert_eq!(Config::default().cache.consolidate_min_bytes, 1 << 20);
        let text = Config::default().to_toml();
        assert!(text.contains("consolidate_min_bytes = 1048576"), "{text}");
        let set = parse("[cache]\nconsolidate_min_bytes = 65536\n").unwrap();
        assert_eq!(set.cache.consolidate_min_bytes, 65536);
        let err = parse("[cache]\nconsolidate_min_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cache.consolidate_min_bytes") && err.contains("4096 to 1099511627776"),
            "{err}"
        );
    }

    #[test]
    fn http_listen_addresses_are_checked() {
        let ok =
            parse("[http]\nlisten = [\"127.0.0.1:11435\", \"[::1]:8080\", \"unix:/run/m.sock\"]\n")
                .unwrap();
        let listeners = ok.http.listeners().unwrap();
        assert_eq!(listeners[2], ListenAddr::Unix("/run/m.sock".into()));
        assert_eq!(listeners[0].to_string(), "127.0.0.1:11435");
        for bad in ["localhost:1", "unix:relative.sock", "127.0.0.1"] {
            let text = format!("[http]\nlisten = [{bad:?}]\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("http.listen") && err.contains(bad), "{err}");
        }
        let err = parse("[http]\nkeys_file = \"keys.toml\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.keys_file"), "{err}");
    }
}
