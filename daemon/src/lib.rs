//! modeld: a daemon that owns the machine's GPUs and manages generative
//! models for other programs, speaking JSON-RPC 2.0 over a Unix socket.
//!
//! `main.rs` only parses flags; [`run`] wires the pieces together. See
//! ARCHITECTURE.md for the code map.

pub mod auth;
pub mod caches;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fingerprint;
pub mod gpu;
pub mod handlers;
pub mod http;
pub mod hub;
pub mod lifecycle;
pub mod loader;
pub mod metrics;
pub mod modes;
pub mod pull;
pub mod registry;
pub mod rpc;
pub mod scheduler;
pub mod server;
pub mod sources;
pub mod state;
pub mod util;
pub mod validate;

use std::sync::Arc;

use sd_notify::NotifyState;

use crate::config::{Config, ConfigError, Paths};
use crate::gpu::GpuProbe;
use crate::lifecycle::{LockError, StateLock};
use crate::registry::{Registry, RegistryError};
use crate::rpc::dispatch::Dispatcher;
use crate::server::{BoundSocket, SocketError};
use crate::state::AppState;

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Http(#[from] http::HttpStartError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until it is told to stop.
pub async fn run(paths: Paths) -> Result<(), StartError> {
    engine::devices::keep_large_allocations_returnable();
    let signals = lifecycle::install_signals().map_err(StartError::Signals)?;
    let (config, source) = Config::load(&paths)?;
    // The lock comes before the store: sled must never be opened twice.
    let _lock = StateLock::acquire(&paths.state_dir)?;
    let registry = Registry::open(&paths.state_dir)?;
    let gpu = GpuProbe::open();
    let socket = BoundSocket::bind(
        &paths.socket,
        config.server.socket_mode_bits(),
        config.server.socket_group.as_deref(),
    )?;
    let front_door = http::Prepared::bind(&config).await?;
    let state = Arc::new(AppState::new(paths, config, source, registry, gpu));
    remove_partial_pictures(&state);
    let signals = tokio::spawn(lifecycle::handle_signals(signals, state.clone()));
    let dispatcher = Arc::new(Dispatcher::new(
        rpc::build_module(state.clone()),
        state.clone(),
    ));
    // A bad modes file is reported (log, status) but does not stop the
    // daemon: fix it and reload.
    let _ = state.reload_modes(state::ReloadCause::Request);
    let watched = state.clone();
    let _watcher = modes::watch::watch(&state.modes_file(), move || {
        let _ = watched.reload_modes(state::ReloadCause::FileChanged);
    });
    // CUDA start-up takes seconds: pay it now, not on the first request.
    let warm = state.clone();
    tokio::task::spawn_blocking(move || {
        let gpus = warm.engine.devices.warm_up();
        if gpus > 0 {
            tracing::info!(gpus, "CUDA devices ready");
        }
    });
    let scheduler = tokio::spawn(state.scheduler.clone().run(state.clone()));
    tokio::spawn(scheduler::expire_idle_models(state.clone()));
    if let Some(default) = state.loaded_modes().modes.default_mode.clone() {
        let capacity = state.config().scheduler.queue_size;
        if let Err(err) = state.scheduler.submit_switch(default, capacity) {
            tracing::warn!("cannot queue the default mode: {err}");
        }
    }

    tracing::info!(
        socket = %socket.path().display(),
        state_dir = %state.paths.state_dir.display(),
        models = state.registry.count(),
        "modeld {} ready",
        env!("CARGO_PKG_VERSION")
    );
    let front_door = front_door
        .map(|prepared| tokio::spawn(http::serve(prepared, state.clone(), dispatcher.clone())));
    lifecycle::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    server::serve(socket, state.clone(), dispatcher).await;
    if let Some(front_door) = front_door {
        let _ = front_door.await;
    }
    let _ = scheduler.await;
    lifecycle::notify(&[NotifyState::Stopping]);
    signals.abort();
    state.registry.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Pictures are written under temporary names and renamed once complete;
/// the temporaries a crash or a kill left behind are removed at start-up.
fn remove_partial_pictures(state: &AppState) {
    let dir = state.image_output_dir();
    let removed = engine::image::output::remove_partials(&dir);
    if removed > 0 {
        tracing::info!(removed, dir = %dir.display(), "removed partial pictures left by a crash");
    }
}
