//! The Hugging Face cache layout, shared with Python's huggingface_hub:
//!
//! ```text
//! <root>/models--org--name/
//!     blobs/<etag>                      file contents, named by sha256 (LFS) or git oid
//!     blobs/<etag>.incomplete           a download in progress (resumable)
//!     snapshots/<commit>/<path>         relative symlink to ../../blobs/<etag>
//!     refs/<revision>                   the commit a branch or tag points at
//! ```
//!
//! A file becomes visible under `snapshots/` only after its blob is complete
//! and verified, so readers never see half a file.

use std::io;
use std::path::{Component, Path, PathBuf};

use globset::GlobSet;
use modeld_wire::types::{SpaceCheck, SpaceStatus};

use super::HubError;

/// The cache of one repo under one cache root.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub root: PathBuf,
    pub dir: PathBuf,
}

/// Whether a revision string is already a full commit hash.
pub fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A repo file path that stays inside its snapshot: relative, no `..`.
pub fn safe_repo_path(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl RepoCache {
    pub fn new(root: &Path, repo_id: &str) -> Self {
        let folder = format!("models--{}", repo_id.replace('/', "--"));
        RepoCache {
            root: root.to_path_buf(),
            dir: root.join(folder),
        }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// The commit a revision resolves to locally, if known.
    pub fn resolve_revision(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    /// Points `refs/<revision>` at `commit`, atomically.
    pub fn write_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if is_commit(revision) {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            refuse_links_between(&self.dir, parent)?;
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, commit)?;
        std::fs::rename(&tmp, &path)
    }

    /// Makes `snapshots/<commit>/<file>` a relative link to the blob, replacing
    /// whatever was there, atomically.
    pub fn link_snapshot(&self, commit: &str, file: &str, etag: &str) -> io::Result<PathBuf> {
        let link = self.snapshot_dir(commit).join(file);
        let parent = link.parent().expect("snapshot files have a parent");
        refuse_links_between(&self.dir, parent)?;
        std::fs::create_dir_all(parent)?;
        let depth = Path::new(file).components().count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = parent.join(format!(".{}.tmp{}", etag, std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
        Ok(link)
    }

    /// The files of a snapshot that match `patterns` and whose blobs exist,
    /// as paths relative to the snapshot; `None` if the snapshot is missing.
    pub fn snapshot_files(&self, commit: &str, patterns: &GlobSet) -> Option<Vec<String>> {
        let dir = self.snapshot_dir(commit);
        if !dir.is_dir() {
            return None;
        }
        Some(matching_files(&dir, patterns))
    }
}

/// Files under `dir` (following links; dangling ones are not files) whose
/// path relative to `dir` matches `patterns`, sorted.
/// The first folder of a repo (the repo folder itself, `blobs`,
/// `snapshots`, `refs`) that is a symlink: another user may have planted
/// it to send writes or deletions outside the root.
pub fn planted_link(repo_dir: &Path) -> Option<PathBuf> {
    std::iter::once(repo_dir.to_path_buf())
        .chain(["blobs", "snapshots", "refs"].map(|part| repo_dir.join(part)))
        .find(|path| is_symlink(path))
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Fails if any existing folder from `base` down to `path` (both included)
/// is a symlink, so a write below `base` cannot land elsewhere.
pub fn refuse_links_between(base: &Path, path: &Path) -> io::Result<()> {
    let planted = path
        .ancestors()
        .take_while(|p| p.starts_with(base))
        .find(|p| is_symlink(p));
    match planted {
        Some(link) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is a symlink; refusing to write through it",
                link.display()
            ),
        )),
        None => Ok(()),
    }
}

pub fn matching_files(dir: &Path, patterns: &GlobSet) -> Vec<String> {
    let mut files = Vec::new();
    collect_files(dir, dir, patterns, &mut files);
    files.sort();
    files
}

fn collect_files(base: &Path, dir: &Path, patterns: &GlobSet, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // `metadata` follows the link: a dangling link is not a file.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => collect_files(base, &path, patterns, out),
            Ok(meta) if meta.is_file() => {
                let relative = path.strip_prefix(base).unwrap_or(&path);
                let relative = relative.to_string_lossy().into_owned();
                if patterns.is_match(&relative) {
                    out.push(relative);
                }
            }
            _ => {}
        }
    }
}

/// Whether `needed` more bytes fit under `root`: refused when they cannot,
/// a warning when they would leave less than 10% headroom.
pub fn check_space(root: &Path, needed: u64) -> Result<SpaceCheck, HubError> {
    let available = available_space(root).map_err(|e| HubError::io(root, e))?;
    if needed > available {
        return Err(HubError::InsufficientSpace {
            root: root.to_path_buf(),
            needed,
            available,
        });
    }
    let status = if needed + needed / 10 > available {
        SpaceStatus::Warning
    } else {
        SpaceStatus::Sufficient
    };
    Ok(SpaceCheck {
        status,
        needed_bytes: needed,
        available_bytes: available,
        path: root.to_path_buf(),
    })
}

/// Bytes free for an unprivileged writer at `path` (or its nearest
/// existing ancestor, since the cache may not exist yet).
pub fn available_space(path: &Path) -> io::Result<u64> {
    let mut probe = path;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let stat = nix::sys::statvfs::statvfs(probe).map_err(io::Error::from)?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(patterns: &[&str]) -> GlobSet {
        let mut builder = globset::GlobSetBuilder::new();
        for p in patterns {
            builder.add(globset::Glob::new(p).unwrap());
        }
        builder.build().unwrap()
    }

    #[test]
    fn layout_matches_huggingface_hub() {
        let cache = RepoCache::new(Path::new("/c"), "org/name");
        assert_eq!(cache.dir, Path::new("/c/models--org--name"));
        assert_eq!(
            cache.blob("abc"),
            Path::new("/c/models--org--name/blobs/abc")
        );
        assert!(is_commit(&"a".repeat(40)));
        assert!(!is_commit("main"));
        assert!(safe_repo_path("sub/dir/file.json"));
        assert!(!safe_repo_path("../x") && !safe_repo_path("/abs") && !safe_repo_path("a/../b"));
    }

    #[test]
    fn snapshot_links_resolve_to_blobs() {
        let root = tempfile::tempdir().unwrap();
        let cache = RepoCache::new(root.path(), "org/name");
        let commit = "c".repeat(40);
        std::fs::create_dir_all(cache.dir.join("blobs")).unwrap();
        std::fs::write(cache.blob("e1"), b"top").unwrap();
        std::fs::write(cache.blob("e2"), b"nested").unwrap();
        cache.link_snapshot(&commit, "config.json", "e1").unwrap();
        cache
            .link_snapshot(&commit, "sub/model.safetensors", "e2")
            .unwrap();
        cache
            .link_snapshot(&commit, "dangling.json", "missing")
            .unwrap();
        let nested = cache.snapshot_dir(&commit).join("sub/model.safetensors");
        assert_eq!(std::fs::read(&nested).unwrap(), b"nested");
        assert_eq!(
            std::fs::read_link(&nested).unwrap(),
            Path::new("../../../blobs/e2")
        );
        let files = cache
            .snapshot_files(&commit, &globs(&["*.json", "*.safetensors"]))
            .unwrap();
        assert_eq!(files, ["config.json", "sub/model.safetensors"]);
        cache.write_ref("main", &commit).unwrap();
        assert_eq!(cache.resolve_revision("main").unwrap(), commit);
        assert!(cache.resolve_revision("other").is_none());
    }

    #[test]
    fn space_check_names_the_root_and_refuses_what_cannot_fit() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("not/yet");
        let check = check_space(&missing, 0).unwrap();
        assert_eq!(check.status, SpaceStatus::Sufficient);
        assert_eq!(check.path, missing);
        assert!(check.available_bytes > 0);
        let err = check_space(&missing, u64::MAX).unwrap_err();
        assert!(matches!(
            err,
            HubError::InsufficientSpace {
                needed: u64::MAX,
                ..
            }
        ));
    }
}
