//! `cache.duplicates` and `cache.consolidate`: identical files across the
//! roots, found by size first and then by sha256 (hashed in parallel,
//! streamed in 1 MiB reads); consolidation keeps one copy, preferring a
//! cache blob, and turns the others into hard links to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use modeld_wire::types::{CacheAction, CachePlan, DuplicateGroup, DuplicatesReply};
use sha2::{Digest, Sha256};

use super::{CacheError, Root};

#[derive(Debug, Clone)]
struct Candidate {
    path: PathBuf,
    /// Other names of the same inode: they must all be relinked, or the
    /// old bytes stay on disk.
    aliases: Vec<PathBuf>,
    size: u64,
    inode: (u64, u64),
    is_blob: bool,
}

/// Regular files under the roots: blobs of HF caches, and every file of
/// the model root. Symlinks (snapshot entries) are not files of their own.
fn candidates(roots: &[Root]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for root in roots {
        walk(&root.path, root.is_hf_cache(), &mut out);
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
        let in_blobs = path.parent().is_some_and(|p| p.ends_with("blobs"));
        let partial = path
            .extension()
            .is_some_and(|e| e == "incomplete" || e == "lock");
        if !meta.is_file() || meta.len() == 0 || partial || (hf_cache && !in_blobs) {
            continue;
        }
        out.push(Candidate {
            path,
            aliases: Vec::new(),
            size: meta.len(),
            inode: (meta.dev(), meta.ino()),
            is_blob: hf_cache,
        });
    }
}

pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let mut file = std::fs::File::open(path).map_err(|e| CacheError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| CacheError::io(path, e))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
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
        // A cache blob is the copy to keep: other tools find it there.
        files.sort_by(|a, b| b.is_blob.cmp(&a.is_blob).then(a.path.cmp(&b.path)));
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

/// Replaces each duplicate with a hard link to the kept copy. A dry run
/// only reports; applying re-hashes both files first and skips any that
/// changed, that a loaded model uses, or that live on another file system.
pub fn consolidate(
    found: &DuplicatesReply,
    protected: &HashSet<PathBuf>,
    apply: bool,
) -> CachePlan {
    let mut plan = super::empty_plan(apply);
    let mut freed_inodes = HashSet::new();
    for group in &found.groups {
        let Ok(keep_meta) = std::fs::metadata(&group.keep) else {
            plan.skipped
                .push(format!("{}: gone since the scan", group.keep.display()));
            continue;
        };
        for copy in &group.copies {
            let in_use = copy
                .canonicalize()
                .is_ok_and(|real| protected.contains(&real));
            if in_use {
                plan.skipped
                    .push(format!("{}: used by a loaded model", copy.display()));
                continue;
            }
            let Ok(copy_meta) = std::fs::metadata(copy) else {
                plan.skipped
                    .push(format!("{}: gone since the scan", copy.display()));
                continue;
            };
            if copy_meta.dev() != keep_meta.dev() {
                plan.skipped.push(format!(
                    "{}: on another file system than {}",
                    copy.display(),
                    group.keep.display()
                ));
                continue;
            }
            if apply {
                if let Err(why) = link_verified(&group.keep, copy, &group.sha256) {
                    plan.skipped.push(format!("{}: {why}", copy.display()));
                    continue;
                }
            }
            // Aliases of one inode free its bytes once, with the last name.
            let bytes = if freed_inodes.insert((copy_meta.dev(), copy_meta.ino())) {
                group.size_bytes
            } else {
                0
            };
            plan.freed_bytes += bytes;
            plan.actions.push(CacheAction {
                action: "hardlink".into(),
                path: copy.clone(),
                target: Some(group.keep.clone()),
                bytes,
            });
        }
    }
    plan
}

/// Links `copy` to `keep` after checking both still hash to `sha256`; the
/// swap is a rename, so `copy` is never missing.
fn link_verified(keep: &Path, copy: &Path, sha256: &str) -> Result<(), String> {
    for path in [keep, copy] {
        let hash = sha256_file(path).map_err(|e| e.to_string())?;
        if hash != sha256 {
            return Err("changed since the scan".into());
        }
    }
    let tmp = copy.with_file_name(format!(
        ".{}.modeld-link",
        copy.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(keep, &tmp).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, copy).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.to_string()
    })
}
