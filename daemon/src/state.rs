//! Shared daemon state handed to every handler: the registry, the config in
//! force, counters, the event bus and the shutdown signal.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use modeld_wire::types::{Counts, Event, ReloadReply};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Paths};
use crate::engine::Engine;
use crate::gpu::GpuProbe;
use crate::hub::api::HubSettings;
use crate::modes::{Mode, Modes, ModesError, UnknownMode};
use crate::pull::Pulls;
use crate::registry::Registry;
use crate::scheduler::Scheduler;
use crate::sources::CacheRoots;
use crate::util::unix_now;

pub struct AppState {
    pub paths: Paths,
    pub started: Instant,
    pub started_at: u64,
    pub registry: Registry,
    pub gpu: GpuProbe,
    pub stats: Stats,
    pub pulls: Arc<Pulls>,
    pub engine: Engine,
    pub scheduler: Arc<Scheduler>,
    modes: RwLock<LoadedModes>,
    config: RwLock<LoadedConfig>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
}

/// The config in force and the history of reloads.
#[derive(Clone)]
pub struct LoadedConfig {
    pub config: Arc<Config>,
    pub source: Option<PathBuf>,
    pub loaded_at: u64,
    pub reloads: u64,
    pub last_error: Option<String>,
}

/// The modes in force and the history of reloads.
#[derive(Clone, Default)]
pub struct LoadedModes {
    pub modes: Arc<Modes>,
    pub file: Option<PathBuf>,
    pub loaded_at: u64,
    pub reloads: u64,
    /// Why the last reload changed nothing (refused, or a file without modes).
    pub last_error: Option<String>,
    /// sha256 of the bytes last read, loaded or not: the watcher skips
    /// reloads that would read the same again.
    read_hash: Option<[u8; 32]>,
}

/// Why the modes are re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadCause {
    /// `modes.reload`, `reload`, SIGHUP or start-up: always re-validated,
    /// since registered models may have changed.
    Request,
    /// The watcher saw the file change; unchanged bytes are skipped.
    FileChanged,
}

/// Live counters, read by `status`.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
    pub subscriptions: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self, models: u64, loaded: u64) -> Counts {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Counts {
            models,
            loaded,
            connections: load(&self.connections),
            requests_total: load(&self.requests_total),
            requests_in_flight: load(&self.requests_in_flight),
            subscriptions: load(&self.subscriptions),
        }
    }
}

/// Increments a gauge for as long as the guard lives.
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    pub fn new(
        paths: Paths,
        config: Config,
        source: Option<PathBuf>,
        registry: Registry,
        gpu: GpuProbe,
    ) -> Self {
        let now = unix_now();
        let (events, _) = broadcast::channel(256);
        AppState {
            paths,
            started: Instant::now(),
            started_at: now,
            registry,
            gpu,
            stats: Stats::default(),
            pulls: Arc::new(Pulls::default()),
            engine: Engine::default(),
            scheduler: Arc::new(Scheduler::default()),
            modes: RwLock::new(LoadedModes::default()),
            config: RwLock::new(LoadedConfig {
                config: Arc::new(config),
                source,
                loaded_at: now,
                reloads: 0,
                last_error: None,
            }),
            events,
            shutdown: CancellationToken::new(),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.loaded_config().config
    }

    /// Cache roots as the config in force and the environment say.
    pub fn cache_roots(&self) -> CacheRoots {
        CacheRoots::from_config(&self.config())
    }

    pub fn hub_settings(&self) -> HubSettings {
        let config = self.config();
        HubSettings::from_env(config.hub.endpoint.as_deref(), config.hub.retries)
    }

    /// Memory resident models may use on each device, per
    /// `scheduler.memory_budget`: a fixed size, or live free memory.
    pub fn memory_budget(&self) -> crate::engine::Budget {
        let config = self.config();
        match modeld_wire::types::parse_bytes(&config.scheduler.memory_budget) {
            Ok(bytes) => crate::engine::Budget::Fixed(bytes),
            Err(_) => crate::engine::Budget::Live,
        }
    }

    /// Where generated pictures go: `images.output_dir`, else
    /// `<state_dir>/images`.
    pub fn image_output_dir(&self) -> PathBuf {
        match &self.config().images.output_dir {
            Some(dir) => dir.clone(),
            None => self.paths.state_dir.join("images"),
        }
    }

    /// The modes file: `modes.file` from the config, else `modes.toml`
    /// beside the config file.
    pub fn modes_file(&self) -> PathBuf {
        match &self.config().modes.file {
            Some(file) => file.clone(),
            None => self
                .paths
                .config_file
                .parent()
                .unwrap_or(std::path::Path::new("/"))
                .join("modes.toml"),
        }
    }

    pub fn loaded_modes(&self) -> LoadedModes {
        self.modes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn mode(&self, name: &str) -> Result<Mode, UnknownMode> {
        self.loaded_modes()
            .modes
            .modes
            .get(name)
            .cloned()
            .ok_or_else(|| UnknownMode(name.to_string()))
    }

    /// Re-reads the modes file and returns how many modes are in force. A
    /// missing file (unless the config names it) or one without modes never
    /// replaces modes in force: a half-written file must not lose them. An
    /// invalid file changes nothing either; the reason is kept for `status`.
    /// Jobs already running are not touched.
    pub fn reload_modes(&self, cause: ReloadCause) -> Result<usize, ModesError> {
        let path = self.modes_file();
        let bytes = self.read_modes_file(&path)?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        let mut loaded = self.modes.write().unwrap_or_else(|e| e.into_inner());
        if cause == ReloadCause::FileChanged && loaded.read_hash == Some(hash) {
            tracing::debug!(path = %path.display(), "modes file unchanged");
            return Ok(loaded.modes.modes.len());
        }
        loaded.read_hash = Some(hash);
        let result = Modes::from_bytes(&path, &bytes, &|name| self.registry.get(name).is_ok());
        match result {
            Ok(modes) if modes.modes.is_empty() && !loaded.modes.modes.is_empty() => {
                let kept = loaded.modes.modes.len();
                let warning = format!(
                    "{} holds no modes; keeping the {kept} modes in force",
                    path.display()
                );
                tracing::warn!("{warning}");
                loaded.last_error = Some(warning.clone());
                self.emit(Event::ModesRejected {
                    path,
                    error: warning,
                });
                Ok(kept)
            }
            Ok(modes) => {
                let count = modes.modes.len();
                loaded.modes = Arc::new(modes);
                loaded.file = path.exists().then(|| path.clone());
                loaded.loaded_at = unix_now();
                loaded.reloads += 1;
                loaded.last_error = None;
                if path.exists() {
                    tracing::info!(path = %path.display(), modes = count, "modes loaded");
                } else {
                    tracing::debug!(path = %path.display(), "no modes file");
                }
                self.emit(Event::ModesReloaded { path, modes: count });
                Ok(count)
            }
            Err(err) => {
                tracing::warn!("modes reload refused, keeping the previous modes: {err}");
                loaded.last_error = Some(err.to_string());
                self.emit(Event::ModesRejected {
                    path,
                    error: err.to_string(),
                });
                Err(err)
            }
        }
    }

    /// The modes file's bytes; a missing file reads as empty unless the
    /// config names it.
    fn read_modes_file(&self, path: &Path) -> Result<Vec<u8>, ModesError> {
        match std::fs::read(path) {
            Err(err)
                if err.kind() == std::io::ErrorKind::NotFound
                    && self.config().modes.file.is_none() =>
            {
                Ok(Vec::new())
            }
            result => result.map_err(|source| ModesError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn loaded_config(&self) -> LoadedConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the config file. A file that fails to parse or validate
    /// leaves the running config untouched; the error is kept for `status`.
    pub fn reload_config(&self) -> Result<ReloadReply, ConfigError> {
        let result = Config::load(&self.paths);
        let mut loaded = self.config.write().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((config, source)) => {
                loaded.config = Arc::new(config);
                loaded.source = source.clone();
                loaded.loaded_at = unix_now();
                loaded.reloads += 1;
                loaded.last_error = None;
                tracing::info!(path = ?source, "config reloaded");
                self.emit(Event::ConfigReloaded {
                    path: source.clone(),
                });
                Ok(ReloadReply {
                    path: source,
                    reloads: loaded.reloads,
                })
            }
            Err(err) => {
                tracing::warn!("config reload refused, keeping the previous config: {err}");
                loaded.last_error = Some(err.to_string());
                self.emit(Event::ConfigRejected {
                    path: Some(self.paths.config_file.clone()),
                    error: err.to_string(),
                });
                Err(err)
            }
        }
    }

    pub fn emit(&self, event: Event) {
        // No subscribers is normal; the event is simply not seen.
        let _ = self.events.send(event);
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn request_shutdown(&self) {
        if !self.shutdown.is_cancelled() {
            tracing::info!("shutting down");
            self.emit(Event::ShuttingDown);
            self.shutdown.cancel();
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}
