//! `cache.duplicates`: identical files across the roots, found by size
//! first and then by sha256 (hashed in parallel, streamed in 1 MiB reads),
//! each group with the copy to keep: a trusted one, then a cache blob.
//! `consolidate.rs` acts on the groups.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use modeld_wire::types::{DuplicateGroup, DuplicatesReply};

use super::{CacheError, Root};
use crate::fingerprint::{digest_file, DigestKind};

#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    /// Other names of the same inode: they must all be relinked, or the
    /// old bytes stay on disk.
    aliases: Vec<PathBuf>,
    size: u64,
    inode: (u64, u64),
    /// Owner (uid, gid): the kept copy is preferably one of root's or the
    /// daemon's own, which no other user can rewrite.
    owner: (u32, u32),
    is_blob: bool,
}

impl Candidate {
    /// Files of root or of the daemon's own user are the ones to keep:
    /// their bytes cannot be changed by another local user.
    fn trusted(&self) -> bool {
        self.owner.0 == 0 || self.owner.0 == nix::unistd::geteuid().as_raw()
    }
}

/// Regular files under the roots: blobs of HF caches, and every file of
/// the model root. Symlinks (snapshot entries) are not files of their own.
fn candidates(roots: &[Root]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for root in roots {
        if root.path.is_file() {
            // A registered single-file model (`local_path` to a .gguf).
            consider(root.path.clone(), false, &mut out);
        } else {
            walk(&root.path, root.is_hf_cache(), &mut out);
        }
    }
    out
}

fn walk(dir: &Path, hf_cache: bool, out: &mut Vec<Candidate>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, hf_cache, out);
            continue;
        }
        if hf_cache && !in_blobs(&path) {
            continue;
        }
        consider(path, hf_cache, out);
    }
}

/// Whether `path` is in a `blobs` folder (of a Hugging Face cache, when
/// its root is one).
pub(super) fn in_blobs(path: &Path) -> bool {
    path.parent().is_some_and(|p| p.ends_with("blobs"))
}

/// Adds `path` if it is a complete, non-empty regular file (not a link).
fn consider(path: PathBuf, is_blob: bool, out: &mut Vec<Candidate>) {
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return;
    };
    let partial = path
        .extension()
        .is_some_and(|e| e == "incomplete" || e == "lock");
    if !meta.is_file() || meta.len() == 0 || partial {
        return;
    }
    out.push(Candidate {
        path,
        aliases: Vec::new(),
        size: meta.len(),
        inode: (meta.dev(), meta.ino()),
        owner: (meta.uid(), meta.gid()),
        is_blob,
    });
}

pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    digest_file(path, DigestKind::Sha256).map_err(|e| CacheError::io(path, e))
}

/// Hashes files on all cores; unreadable files are left out.
fn hash_all(files: Vec<Candidate>) -> Vec<(Candidate, String)> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = files.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|c| sha256_file(&c.path).ok().map(|h| (c.clone(), h)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

pub fn duplicates(roots: &[Root]) -> DuplicatesReply {
    // Paths that already share an inode are one file, not two.
    let mut by_inode: BTreeMap<(u64, u64), Candidate> = BTreeMap::new();
    for candidate in candidates(roots) {
        match by_inode.get_mut(&candidate.inode) {
            Some(first) => first.aliases.push(candidate.path),
            None => {
                by_inode.insert(candidate.inode, candidate);
            }
        }
    }
    let mut by_size: BTreeMap<u64, Vec<Candidate>> = BTreeMap::new();
    for candidate in by_inode.into_values() {
        by_size.entry(candidate.size).or_default().push(candidate);
    }
    let to_hash: Vec<Candidate> = by_size
        .into_values()
        .filter(|g| g.len() > 1)
        .flatten()
        .collect();
    let files_hashed = to_hash.len();
    let bytes_hashed = to_hash.iter().map(|c| c.size).sum();
    let mut by_hash: HashMap<String, Vec<Candidate>> = HashMap::new();
    for (candidate, hash) in hash_all(to_hash) {
        by_hash.entry(hash).or_default().push(candidate);
    }
    let mut reclaimable_bytes = 0;
    let mut groups: Vec<DuplicateGroup> = Vec::new();
    for (sha256, mut files) in by_hash {
        if files.len() < 2 {
            continue;
        }
        // A trusted copy is the one to keep, then a cache blob (other tools
        // find it there).
        files.sort_by(|a, b| {
            (b.trusted(), b.is_blob)
                .cmp(&(a.trusted(), a.is_blob))
                .then(a.path.cmp(&b.path))
        });
        let keep = files.remove(0);
        reclaimable_bytes += keep.size * files.len() as u64;
        let copies = files
            .into_iter()
            .flat_map(|c| std::iter::once(c.path).chain(c.aliases))
            .collect();
        groups.push(DuplicateGroup {
            sha256,
            size_bytes: keep.size,
            keep: keep.path,
            copies,
        });
    }
    groups.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.keep.cmp(&b.keep)));
    DuplicatesReply {
        groups,
        files_hashed,
        bytes_hashed,
        reclaimable_bytes,
    }
}
