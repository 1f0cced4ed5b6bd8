//! Cache management across every cache root and the model root: scan,
//! duplicates, consolidate, clean and remove. Everything that changes the
//! disk is a dry run unless asked to apply, never leaves the roots, and
//! never touches the files of a loaded model or a running download.

pub mod clean;
pub mod confined;
pub mod consolidate;
pub mod dupes;
pub mod families;
pub mod scan;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use modeld_wire::types::CacheLocation;

use crate::state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CacheError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A directory that holds models, and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub path: PathBuf,
    /// `primary`, `secondary`, `standard`, `extra`, `custom` or `model_root`.
    pub role: &'static str,
}

impl Root {
    pub fn is_hf_cache(&self) -> bool {
        !matches!(self.role, "model_root" | "local")
    }
}

/// Every root: the configured caches, the standard HF cache, custom caches
/// of registered models, and the modes' model root.
pub fn roots(state: &AppState) -> Vec<Root> {
    let cache = state.cache_roots();
    let mut roots: Vec<Root> = Vec::new();
    let mut add = |path: &Path, role: &'static str| {
        if !roots.iter().any(|r| r.path == path) {
            roots.push(Root {
                path: path.to_path_buf(),
                role,
            });
        }
    };
    add(&cache.primary, "primary");
    if let Some(secondary) = &cache.secondary {
        add(secondary, "secondary");
    }
    add(&cache.standard, "standard");
    for extra in &cache.extra {
        add(extra, "extra");
    }
    for model in state.registry.list().unwrap_or_default() {
        // Registrations from before system folders were refused as roots
        // are still never scanned, linked or cleaned.
        if let CacheLocation::Custom(path) = &model.cache {
            if crate::validate::valid_cache_root("cache", path).is_ok() {
                add(path, "custom");
            }
        }
    }
    if let Some(model_root) = &state.loaded_modes().modes.model_root {
        add(model_root, "model_root");
    }
    roots
}

/// Every root, plus the folders (or single files) registered models point
/// at with `local_path` outside them: duplicates are searched there, since
/// they often hold a second copy of a cached model, and the scan reports
/// their changed files.
pub fn roots_and_local_paths(state: &AppState) -> Vec<Root> {
    let mut roots = roots(state);
    for model in state.registry.list().unwrap_or_default() {
        let Some(path) = model.local_path else {
            continue;
        };
        let covered = roots.iter().any(|r| path.starts_with(&r.path));
        if !covered && crate::validate::valid_cache_root("local_path", &path).is_ok() {
            roots.push(Root {
                path,
                role: "local",
            });
        }
    }
    roots
}

/// The real paths of every file a loaded model reads: its directory's files
/// with symlinks (snapshot links to blobs) resolved.
pub fn protected_files(state: &AppState) -> HashSet<PathBuf> {
    let mut files = HashSet::new();
    for model in state.engine.list() {
        collect_real_files(&model.path, &mut files);
    }
    files
}

fn collect_real_files(path: &Path, out: &mut HashSet<PathBuf>) {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                collect_real_files(&entry.path(), out);
            }
        }
        Ok(_) => {
            if let Ok(real) = path.canonicalize() {
                out.insert(real);
            }
        }
        Err(_) => {}
    }
}

/// A plan with nothing in it yet.
pub fn empty_plan(apply: bool) -> modeld_wire::types::CachePlan {
    modeld_wire::types::CachePlan {
        applied: apply,
        actions: Vec::new(),
        freed_bytes: 0,
        skipped: Vec::new(),
    }
}

/// Seconds since the Unix epoch of a system time.
pub fn epoch_secs(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
