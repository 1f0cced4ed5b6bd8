//! Process lifecycle: the state-directory lock, signals (SIGTERM/SIGINT stop,
//! SIGHUP reloads) and systemd readiness notifications.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use modeld_wire::types::ReloadReply;
use nix::fcntl::{Flock, FlockArg};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::config::ConfigError;
use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("state dir {} is in use by another modeld (pid {pid}); two daemons must not share one store", dir.display())]
    Held { dir: PathBuf, pid: String },
    #[error("cannot lock state dir {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on the state directory, held for the process lifetime.
pub struct StateLock {
    _lock: Flock<File>,
}

impl StateLock {
    /// Takes the lock and records our pid in it, so a second daemon can say
    /// which process holds the store.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        private_dir(dir).map_err(io_err)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("modeld.lock"))
            .map_err(io_err)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.into()
                    },
                });
            }
        };
        lock.set_len(0).map_err(io_err)?;
        lock.rewind().map_err(io_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
        Ok(StateLock { _lock: lock })
    }
}

/// Creates `dir` if needed and makes it 0700: the state dir holds the
/// registry, which lists every model path, and is nobody else's business.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Tells systemd (when it is watching) about a state change.
pub fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {err}");
    }
}

/// Reloads the config the way systemd expects: RELOADING, then READY.
pub fn reload(state: &AppState) -> Result<ReloadReply, ConfigError> {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
    let result = state.reload_config();
    let status = match &result {
        Ok(_) => "config reloaded".to_string(),
        Err(err) => format!("config reload refused: {err}"),
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    result
}

/// Installs the handlers. This must happen before the socket accepts
/// anyone: until then SIGHUP's default action would kill the daemon.
pub fn install_signals() -> std::io::Result<signal_hook_tokio::Signals> {
    signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
}

/// Handles signals until the daemon stops. A second SIGTERM or SIGINT
/// during shutdown exits at once, for an operator who will not wait.
pub async fn handle_signals(mut signals: signal_hook_tokio::Signals, state: Arc<AppState>) {
    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => {
                let _ = reload(&state);
                let _ = state.reload_modes(crate::state::ReloadCause::Request);
            }
            _ if state.is_shutting_down() => {
                tracing::warn!("second stop signal; exiting without waiting");
                std::process::exit(1);
            }
            _ => state.request_shutdown(),
        }
    }
}
