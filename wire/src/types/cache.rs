//! Cache management: `cache.scan`, `duplicates`, `consolidate`, `clean`, `rm`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `cache.scan`: every cache root and the model root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheScanReply {
    pub roots: Vec<CacheRootScan>,
    /// Bytes on disk across all roots.
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRootScan {
    pub path: PathBuf,
    /// `primary`, `secondary`, `standard`, `extra`, `custom`, `model_root`,
    /// or `local` (a registered `local_path` outside the other roots).
    pub role: String,
    pub exists: bool,
    pub size_bytes: u64,
    pub repos: Vec<CachedRepo>,
    /// Unreadable blobs, dangling links and the like.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRepo {
    /// `org/name` for cache repos; the directory name under model_root.
    pub repo_id: String,
    pub repo_type: String,
    pub path: PathBuf,
    /// Blobs shared between revisions count once, as huggingface_hub counts.
    pub size_bytes: u64,
    pub files: usize,
    /// Seconds since the Unix epoch.
    pub last_accessed: u64,
    pub last_modified: u64,
    pub revisions: Vec<CachedRevision>,
    /// Registry names that use this repo; empty when another tool put it here.
    pub registered_as: Vec<String>,
    /// `llm`, `diffusion`, `lora`, `vae`, `embedding` or `unknown`.
    pub family: String,
    pub architecture: Option<String>,
    /// Files whose size, mtime or ctime changed since a pull or `pull
    /// --verify` hashed them (or that a load found changed): snapshot
    /// files of a cache repo, files of a model root entry or `local_path`.
    /// A load hashes them again; cache files that no longer match are
    /// fetched again, local ones never.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRevision {
    pub commit: String,
    pub refs: Vec<String>,
    pub size_bytes: u64,
    pub files: usize,
    pub snapshot_path: PathBuf,
}

/// `cache.duplicates`: identical files found by size, then sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicatesReply {
    pub groups: Vec<DuplicateGroup>,
    pub files_hashed: usize,
    pub bytes_hashed: u64,
    /// Bytes freed if every group kept one copy.
    pub reclaimable_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DuplicateGroup {
    pub sha256: String,
    pub size_bytes: u64,
    /// The copy that stays: a cache blob when there is one.
    pub keep: PathBuf,
    pub copies: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// Carry the plan out; without it nothing changes (a dry run).
    #[serde(default)]
    pub apply: bool,
    /// `cache.clean` only: also remove revisions no ref points to.
    #[serde(default)]
    pub detached: bool,
}

/// What `cache.consolidate`, `cache.clean` and `cache.rm` did, or would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachePlan {
    pub applied: bool,
    pub actions: Vec<CacheAction>,
    pub freed_bytes: u64,
    /// Things left alone, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheAction {
    /// `consolidate`, `remove_incomplete`, `remove_dangling_link`,
    /// `remove_orphan_blob`, `remove_empty_repo`, `remove_revision`,
    /// `remove_repo`.
    pub action: String,
    pub path: PathBuf,
    /// For `consolidate`: the kept copy `path` becomes (or would become)
    /// a clone of or a link to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
    pub bytes: u64,
    /// For `consolidate`: `reflink` (a copy-on-write clone: no aliasing),
    /// `hardlink` (one inode for both names), or `skip` (left as it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For a `skip`: why the copy is left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRemoveParams {
    /// `org/name`.
    pub repo: String,
    /// Only this commit (or the commit this ref names); all revisions when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default)]
    pub apply: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_without_methods_read_and_write_as_before() {
        let old = serde_json::json!({"action": "remove_orphan_blob", "path": "/c/b", "bytes": 3});
        let action: CacheAction = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(
            (action.method.as_deref(), action.reason.as_deref()),
            (None, None)
        );
        assert_eq!(serde_json::to_value(&action).unwrap(), old);
        let skip = CacheAction {
            action: "consolidate".into(),
            method: Some("skip".into()),
            reason: Some("a config or text file".into()),
            ..action
        };
        let written = serde_json::to_value(&skip).unwrap();
        assert_eq!(written["method"], "skip");
        assert_eq!(written["reason"], "a config or text file");
    }
}
