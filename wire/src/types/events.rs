//! The `events.subscribe` stream.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What `events.subscribe` streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ModelRegistered {
        name: String,
        replaced: bool,
    },
    ModelRemoved {
        name: String,
    },
    ConfigReloaded {
        path: Option<PathBuf>,
    },
    ModesReloaded {
        path: PathBuf,
        modes: usize,
    },
    ModesRejected {
        path: PathBuf,
        error: String,
    },
    ModeSwitched {
        from: Option<String>,
        to: String,
    },
    ConfigRejected {
        path: Option<PathBuf>,
        error: String,
    },
    ShuttingDown,
}
