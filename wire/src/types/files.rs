//! Model files: `models.source`, `models.pull` and its space check.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where a model's files would come from, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The registered `local_path`.
    Local,
    /// A complete snapshot in one of the Hugging Face caches.
    Cache,
    /// Not on disk yet; a pull would download it.
    Hub,
    /// Neither on disk nor downloadable; `reason` says why.
    Unavailable,
}

/// `models.source`: the source a load would use, without loading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReply {
    pub name: String,
    pub source: SourceKind,
    /// The model file or directory (local or cache snapshot).
    pub path: Option<PathBuf>,
    pub cache_root: Option<PathBuf>,
    pub commit: Option<String>,
    /// Files found, relative to `path` when it is a directory.
    pub files: Vec<String>,
    /// For `hub`: the cache root a download would go to.
    pub download_to: Option<PathBuf>,
    pub reason: Option<String>,
}

/// `models.pull` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullParams {
    pub name: String,
    /// Also hash files already in the cache and fetch again any that differ.
    #[serde(default)]
    pub verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpaceStatus {
    Sufficient,
    /// Fits, but with less than 10% headroom.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceCheck {
    pub status: SpaceStatus,
    pub needed_bytes: u64,
    pub available_bytes: u64,
    /// The cache root the files go to.
    pub path: PathBuf,
}

/// What `models.pull` streams; the last item has `done: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    Start {
        repo: String,
        commit: String,
        files: usize,
        total_bytes: u64,
        /// Bytes still to fetch after what the cache already holds.
        download_bytes: u64,
        target: PathBuf,
        space: SpaceCheck,
    },
    Progress {
        file: String,
        file_bytes: u64,
        file_total: u64,
        bytes: u64,
        total: u64,
        rate_bytes_per_s: u64,
    },
    Done {
        done: bool,
        source: SourceKind,
        path: PathBuf,
        commit: Option<String>,
        downloaded_bytes: u64,
        elapsed_ms: u64,
    },
    Error {
        done: bool,
        error: crate::error::RpcErrorObject,
    },
}
