//! Local-first resolution of a model's files: the registered local path,
//! then any Hugging Face cache (the model's own root first), then the Hub.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use modeld_wire::types::{CacheLocation, ModelRecord, SourceKind, SourceReply};

use crate::config::Config;
use crate::hub::api::{hf_home, HubSettings};
use crate::hub::cache::{matching_files, RepoCache};

/// The cache roots in force, resolved from config and environment.
#[derive(Debug, Clone)]
pub struct CacheRoots {
    pub primary: PathBuf,
    pub secondary: Option<PathBuf>,
    pub extra: Vec<PathBuf>,
    /// The standard HF cache, always searched.
    pub standard: PathBuf,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("cache 'secondary' is not configured; set cache.secondary in modeld.toml or register the model with another cache")]
pub struct NoSecondaryCache;

impl CacheRoots {
    pub fn from_config(config: &Config) -> Self {
        let standard = std::env::var_os("HF_HUB_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home().join("hub"));
        CacheRoots {
            primary: config
                .cache
                .primary
                .clone()
                .unwrap_or_else(|| standard.clone()),
            secondary: config.cache.secondary.clone(),
            extra: config.cache.extra.clone(),
            standard,
        }
    }

    /// The root a model's downloads go to.
    pub fn target(&self, location: &CacheLocation) -> Result<PathBuf, NoSecondaryCache> {
        match location {
            CacheLocation::Primary => Ok(self.primary.clone()),
            CacheLocation::Secondary => self.secondary.clone().ok_or(NoSecondaryCache),
            CacheLocation::Custom(path) => Ok(path.clone()),
        }
    }

    /// Every root, the model's own first, without repeats.
    pub fn search_order(&self, location: &CacheLocation) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.target(location).into_iter().collect();
        let others = [
            Some(&self.primary),
            self.secondary.as_ref(),
            Some(&self.standard),
        ];
        for root in others.into_iter().flatten().chain(&self.extra) {
            if !roots.contains(root) {
                roots.push(root.clone());
            }
        }
        roots
    }
}

/// Files of a model found on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum OnDisk {
    Local {
        path: PathBuf,
        files: Vec<String>,
    },
    Cache {
        root: PathBuf,
        commit: String,
        dir: PathBuf,
        files: Vec<String>,
    },
}

pub fn patterns(model: &ModelRecord) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for pattern in &model.files {
        // Patterns were validated at registration.
        if let Ok(glob) = Glob::new(pattern) {
            builder.add(glob);
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

/// Looks for the model on disk, local path first, then each cache root.
pub fn find_on_disk(model: &ModelRecord, roots: &CacheRoots) -> Option<OnDisk> {
    let globs = patterns(model);
    if let Some(local) = &model.local_path {
        if let Some(found) = find_local(local, &globs) {
            return Some(found);
        }
    }
    let repo = model.repo.as_deref()?;
    roots
        .search_order(&model.cache)
        .into_iter()
        .find_map(|root| find_cached(&root, repo, &model.revision, &globs))
}

fn find_local(path: &Path, globs: &GlobSet) -> Option<OnDisk> {
    let meta = std::fs::metadata(path).ok()?;
    let files = if meta.is_file() {
        vec![path.file_name()?.to_string_lossy().into_owned()]
    } else {
        matching_files(path, globs)
    };
    (!files.is_empty()).then(|| OnDisk::Local {
        path: path.to_path_buf(),
        files,
    })
}

fn find_cached(root: &Path, repo: &str, revision: &str, globs: &GlobSet) -> Option<OnDisk> {
    let cache = RepoCache::new(root, repo);
    let commit = cache.resolve_revision(revision)?;
    let files = cache.snapshot_files(&commit, globs)?;
    let dir = cache.snapshot_dir(&commit);
    snapshot_is_complete(&dir, &files).then(|| OnDisk::Cache {
        root: root.to_path_buf(),
        commit,
        dir,
        files,
    })
}

/// A snapshot is usable when it has files and, for sharded safetensors,
/// every shard its index names: an interrupted pull leaves shards missing.
fn snapshot_is_complete(dir: &Path, files: &[String]) -> bool {
    if files.is_empty() {
        return false;
    }
    files
        .iter()
        .filter(|f| f.ends_with(".safetensors.index.json"))
        .all(|index| shards_present(dir, index, files))
}

fn shards_present(dir: &Path, index: &str, files: &[String]) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(index)) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        return false;
    };
    let prefix = Path::new(index).parent().unwrap_or(Path::new(""));
    map.values()
        .filter_map(|v| v.as_str())
        .all(|shard| files.iter().any(|f| Path::new(f) == prefix.join(shard)))
}

/// What `models.source` reports.
pub fn describe(model: &ModelRecord, roots: &CacheRoots, hub: &HubSettings) -> SourceReply {
    let mut reply = SourceReply {
        name: model.name.clone(),
        source: SourceKind::Unavailable,
        path: None,
        cache_root: None,
        commit: None,
        files: Vec::new(),
        download_to: None,
        reason: None,
    };
    match find_on_disk(model, roots) {
        Some(OnDisk::Local { path, files }) => {
            reply.source = SourceKind::Local;
            reply.path = Some(path);
            reply.files = files;
        }
        Some(OnDisk::Cache {
            root,
            commit,
            dir,
            files,
        }) => {
            reply.source = SourceKind::Cache;
            reply.path = Some(dir);
            reply.cache_root = Some(root);
            reply.commit = Some(commit);
            reply.files = files;
        }
        None => match (&model.repo, roots.target(&model.cache)) {
            (None, _) => {
                reply.reason = Some(format!(
                    "local path {} holds no matching files and no repo is registered",
                    model
                        .local_path
                        .as_deref()
                        .unwrap_or(Path::new("-"))
                        .display()
                ))
            }
            (Some(_), _) if hub.offline => {
                reply.reason = Some("not in any cache and HF_HUB_OFFLINE is set".to_string())
            }
            (Some(_), Err(err)) => reply.reason = Some(err.to_string()),
            (Some(_), Ok(target)) => {
                reply.source = SourceKind::Hub;
                reply.download_to = Some(target);
            }
        },
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(local: Option<&Path>, cache: CacheLocation) -> ModelRecord {
        ModelRecord {
            name: "m".into(),
            repo: Some("org/m".into()),
            revision: "main".into(),
            files: vec!["*.json".into(), "*.safetensors".into()],
            local_path: local.map(Path::to_path_buf),
            cache,
            estimated_size: None,
            runner: None,
            registered_at: 0,
            updated_at: 0,
        }
    }

    fn roots(primary: &Path, secondary: &Path) -> CacheRoots {
        CacheRoots {
            primary: primary.into(),
            secondary: Some(secondary.into()),
            extra: vec![],
            standard: primary.into(),
        }
    }

    fn seed_cache(root: &Path, files: &[(&str, &str)]) -> String {
        let cache = RepoCache::new(root, "org/m");
        let commit = "a".repeat(40);
        std::fs::create_dir_all(cache.dir.join("blobs")).unwrap();
        for (name, body) in files {
            let etag = format!("{:x}", name.len() * 7919 + body.len());
            std::fs::write(cache.blob(&etag), body).unwrap();
            cache.link_snapshot(&commit, name, &etag).unwrap();
        }
        cache.write_ref("main", &commit).unwrap();
        commit
    }

    #[test]
    fn local_path_wins_then_caches_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (primary, secondary, local) = (
            dir.path().join("p"),
            dir.path().join("s"),
            dir.path().join("l"),
        );
        let roots = roots(&primary, &secondary);
        let model = record(Some(&local), CacheLocation::Secondary);
        assert_eq!(find_on_disk(&model, &roots), None);

        seed_cache(&primary, &[("config.json", "{}")]);
        let Some(OnDisk::Cache { root, .. }) = find_on_disk(&model, &roots) else {
            panic!()
        };
        assert_eq!(root, primary);
        seed_cache(&secondary, &[("config.json", "{}")]);
        let Some(OnDisk::Cache { root, .. }) = find_on_disk(&model, &roots) else {
            panic!()
        };
        assert_eq!(root, secondary, "the model's own cache is searched first");

        std::fs::create_dir_all(&local).unwrap();
        std::fs::write(local.join("config.json"), "{}").unwrap();
        std::fs::write(local.join("notes.txt"), "x").unwrap();
        let Some(OnDisk::Local { files, .. }) = find_on_disk(&model, &roots) else {
            panic!()
        };
        assert_eq!(files, ["config.json"]);
    }

    #[test]
    fn sharded_snapshot_missing_a_shard_is_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let roots = roots(dir.path(), dir.path());
        let index = r#"{"weight_map":{"a":"model-1.safetensors","b":"model-2.safetensors"}}"#;
        seed_cache(
            dir.path(),
            &[
                ("model.safetensors.index.json", index),
                ("model-1.safetensors", "x"),
            ],
        );
        let model = record(None, CacheLocation::Primary);
        assert_eq!(find_on_disk(&model, &roots), None);
        seed_cache(dir.path(), &[("model-2.safetensors", "yy")]);
        assert!(matches!(
            find_on_disk(&model, &roots),
            Some(OnDisk::Cache { .. })
        ));
    }
}
