//! Everything that talks to the Hugging Face Hub or its cache layout: repo
//! listings through hf-hub, and our own resumable, verified blob downloads
//! written straight into the chosen cache.

pub mod api;
pub mod cache;
pub mod download;
pub mod select;

use std::path::PathBuf;

pub use api::{Hub, RemoteFile, RepoListing, TreeFile};

/// Failures of Hub access and cache writes, each mapped to its own wire kind.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("repository {repo:?} not found on the Hub (or it is private and no token is set)")]
    RepoNotFound { repo: String },
    #[error("revision {revision:?} not found in {repo:?}")]
    RevisionNotFound { repo: String, revision: String },
    #[error("access to {repo:?} denied ({status}): the repo is gated or private; {hint}")]
    Unauthorized {
        repo: String,
        status: u16,
        hint: &'static str,
    },
    #[error("cannot reach the Hub at {endpoint}: {message}")]
    Network { endpoint: String, message: String },
    #[error("offline mode (HF_HUB_OFFLINE) and {repo:?} is not in any cache")]
    Offline { repo: String },
    #[error("not enough space in {}: {needed} bytes needed, {available} available", root.display())]
    InsufficientSpace {
        root: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("disk full while writing {}: {message}", path.display())]
    DiskFull { path: PathBuf, message: String },
    #[error("{file} failed verification twice: expected {expected}, got {actual}")]
    Corrupt {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected answer from the Hub: {0}")]
    Protocol(String),
}

impl HubError {
    /// Wraps an I/O error, telling a full disk apart from other failures.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            HubError::DiskFull {
                path,
                message: source.to_string(),
            }
        } else {
            HubError::Io { path, source }
        }
    }
}
