//! `cache.clean` and `cache.rm`: remove what downloads left behind, or a
//! whole repo or revision, inside HF cache roots only. Repos with a running
//! download or a loaded model are left alone.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use modeld_wire::types::{CacheAction, CachePlan, ModelRecord};

use super::confined::RootHandles;
use super::{empty_plan, CacheError, Root};
use crate::hub::cache::{is_commit, planted_link, RepoCache};

/// One repo's cache directory as found on disk.
struct RepoDir {
    dir: PathBuf,
    /// ref name -> commit
    refs: HashMap<String, String>,
    /// commit -> blob names its snapshot links to (dangling links apart)
    snapshots: HashMap<String, HashSet<String>>,
    dangling: Vec<PathBuf>,
    /// blob name -> size; `.incomplete` files separately
    blobs: HashMap<String, u64>,
    incomplete: Vec<(PathBuf, u64)>,
}

/// Why a repo folder cannot be planned on, if it holds a symlink where a
/// folder belongs.
fn linked_part(dir: &Path) -> Option<String> {
    planted_link(dir).map(|path| format!("{}: is a symlink; left alone", path.display()))
}

fn read_repo(dir: &Path) -> RepoDir {
    let mut repo = RepoDir {
        dir: dir.to_path_buf(),
        refs: HashMap::new(),
        snapshots: HashMap::new(),
        dangling: Vec::new(),
        blobs: HashMap::new(),
        incomplete: Vec::new(),
    };
    read_refs(&dir.join("refs"), "", &mut repo.refs);
    for entry in std::fs::read_dir(dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let commit = entry.file_name().to_string_lossy().into_owned();
        let mut linked = HashSet::new();
        collect_links(&entry.path(), &mut linked, &mut repo.dangling);
        repo.snapshots.insert(commit, linked);
    }
    for entry in std::fs::read_dir(dir.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(meta) = entry.metadata() else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".incomplete") {
            repo.incomplete.push((entry.path(), meta.len()));
        } else if meta.is_file() {
            repo.blobs.insert(name, meta.len());
        }
    }
    repo
}

fn read_refs(dir: &Path, prefix: &str, out: &mut HashMap<String, String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            read_refs(&entry.path(), &format!("{name}/"), out);
        } else if kind.is_symlink() {
            continue;
        } else if let Ok(commit) = std::fs::read_to_string(entry.path()) {
            out.insert(name, commit.trim().to_string());
        }
    }
}

/// Blob names the snapshot's links point at; links to nothing go to `dangling`.
fn collect_links(dir: &Path, linked: &mut HashSet<String>, dangling: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect_links(&path, linked, dangling);
        } else if meta.file_type().is_symlink() {
            match (std::fs::metadata(&path), std::fs::read_link(&path)) {
                (Ok(_), Ok(target)) => {
                    if let Some(name) = target.file_name() {
                        linked.insert(name.to_string_lossy().into_owned());
                    }
                }
                _ => dangling.push(path),
            }
        }
    }
}

fn repo_dirs(root: &Root) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root.path)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("models--"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir() || t.is_symlink()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

fn act(plan: &mut CachePlan, action: &str, path: PathBuf, bytes: u64) {
    plan.freed_bytes += bytes;
    plan.actions.push(CacheAction {
        action: action.into(),
        path,
        target: None,
        bytes,
        method: None,
        reason: None,
    });
}

/// Plans (and with `apply`, performs) the clean-up of every HF cache root.
pub fn clean(
    roots: &[Root],
    busy: &HashSet<PathBuf>,
    apply: bool,
    detached: bool,
) -> Result<CachePlan, CacheError> {
    let mut plan = empty_plan(apply);
    for root in roots.iter().filter(|r| r.is_hf_cache()) {
        for dir in repo_dirs(root) {
            if busy.contains(&dir) {
                plan.skipped.push(format!(
                    "{}: in use by a loaded model or a download",
                    dir.display()
                ));
                continue;
            }
            if let Some(why) = linked_part(&dir) {
                plan.skipped.push(why);
                continue;
            }
            plan_repo(&read_repo(&dir), detached, &mut plan);
        }
    }
    if apply {
        perform(&plan, roots)?;
    }
    Ok(plan)
}

fn plan_repo(repo: &RepoDir, detached: bool, plan: &mut CachePlan) {
    let referenced_commits: HashSet<&String> = repo.refs.values().collect();
    let mut kept_blobs: HashSet<&String> = HashSet::new();
    let mut kept_snapshots = 0;
    for (commit, linked) in &repo.snapshots {
        if detached && !referenced_commits.contains(commit) {
            act(
                plan,
                "remove_revision",
                repo.dir.join("snapshots").join(commit),
                0,
            );
        } else {
            kept_blobs.extend(linked);
            kept_snapshots += 1;
        }
    }
    for link in &repo.dangling {
        act(plan, "remove_dangling_link", link.clone(), 0);
    }
    for (path, size) in &repo.incomplete {
        act(plan, "remove_incomplete", path.clone(), *size);
    }
    let mut orphans: Vec<(&String, &u64)> = repo
        .blobs
        .iter()
        .filter(|(name, _)| !kept_blobs.contains(name))
        .collect();
    orphans.sort();
    for (name, size) in &orphans {
        act(
            plan,
            "remove_orphan_blob",
            repo.dir.join("blobs").join(name),
            **size,
        );
    }
    let blobs_left = repo.blobs.len() - orphans.len();
    if kept_snapshots == 0 && blobs_left == 0 {
        act(plan, "remove_empty_repo", repo.dir.clone(), 0);
    }
}

/// Carries out a plan. Each path is removed through its root's
/// [`Confined`] handle, so a symlink planted since the plan was made
/// cannot redirect a removal outside the roots.
pub fn perform(plan: &CachePlan, roots: &[Root]) -> Result<(), CacheError> {
    let mut handles = RootHandles::new(roots.iter().map(|r| r.path.as_path()));
    for action in &plan.actions {
        let path = &action.path;
        let result = handles
            .for_path(path)
            .and_then(|confined| match action.action.as_str() {
                "remove_revision" | "remove_empty_repo" | "remove_repo" => {
                    confined.remove_tree(path)
                }
                _ => confined.remove_file(path),
            });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CacheError::io(path, e)),
        }
    }
    Ok(())
}

/// Plans (and with `apply`, performs) the removal of a repo, or of one
/// revision and the blobs no other revision uses, from every HF cache root.
pub fn remove(
    roots: &[Root],
    busy: &HashSet<PathBuf>,
    repo_id: &str,
    revision: Option<&str>,
    apply: bool,
) -> Result<CachePlan, CacheError> {
    let mut plan = empty_plan(apply);
    for root in roots.iter().filter(|r| r.is_hf_cache()) {
        let cache = RepoCache::new(&root.path, repo_id);
        if !cache.dir.is_dir() {
            continue;
        }
        if let Some(why) = linked_part(&cache.dir) {
            plan.skipped.push(why);
            continue;
        }
        if busy.contains(&cache.dir) {
            return Err(CacheError::InUse(format!(
                "{repo_id} in {} is used by a loaded model or a download; unload it or wait",
                root.path.display()
            )));
        }
        let repo = read_repo(&cache.dir);
        match revision {
            None => {
                let bytes = repo.blobs.values().sum::<u64>()
                    + repo.incomplete.iter().map(|(_, s)| s).sum::<u64>();
                act(&mut plan, "remove_repo", cache.dir.clone(), bytes);
            }
            Some(revision) => plan_revision(&repo, revision, &mut plan),
        }
    }
    if plan.actions.is_empty() && plan.skipped.is_empty() {
        let what = revision.map_or_else(|| repo_id.to_string(), |r| format!("{repo_id}@{r}"));
        return Err(CacheError::NotFound(format!(
            "{what} is not in any cache root"
        )));
    }
    if apply {
        perform(&plan, roots)?;
    }
    Ok(plan)
}

fn plan_revision(repo: &RepoDir, revision: &str, plan: &mut CachePlan) {
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        match repo.refs.get(revision) {
            Some(commit) => commit.clone(),
            None => return,
        }
    };
    let Some(linked) = repo.snapshots.get(&commit) else {
        return;
    };
    let others: HashSet<&String> = repo
        .snapshots
        .iter()
        .filter(|(c, _)| **c != commit)
        .flat_map(|(_, l)| l)
        .collect();
    act(
        plan,
        "remove_revision",
        repo.dir.join("snapshots").join(&commit),
        0,
    );
    for (name, target) in &repo.refs {
        if *target == commit {
            act(plan, "remove_ref", repo.dir.join("refs").join(name), 0);
        }
    }
    let mut only_here: Vec<&String> = linked.iter().filter(|b| !others.contains(b)).collect();
    only_here.sort();
    for blob in only_here {
        let size = repo.blobs.get(blob).copied().unwrap_or(0);
        act(plan, "remove_blob", repo.dir.join("blobs").join(blob), size);
    }
}

/// Plans (and with `apply`, performs) the removal of one registered
/// model's files from every HF cache root: the snapshot its revision names
/// there, the refs to it and the blobs no other snapshot links to, or the
/// whole repo directory when that snapshot is its only one. A snapshot that
/// a revision of `others` (other registered models of the same repo, as
/// name and revision) also names is skipped, and so is a `local_path`.
/// `busy` holds repo directories with a running download and snapshot
/// directories of loaded models.
pub fn remove_model(
    roots: &[Root],
    busy: &HashSet<PathBuf>,
    model: &ModelRecord,
    others: &[(String, String)],
    apply: bool,
) -> Result<CachePlan, CacheError> {
    let mut plan = empty_plan(apply);
    if let Some(path) = &model.local_path {
        plan.skipped.push(format!(
            "{}: the local_path of {}; files it points at are never deleted",
            path.display(),
            model.name
        ));
    }
    if let Some(repo_id) = &model.repo {
        for root in roots.iter().filter(|r| r.is_hf_cache()) {
            let cache = RepoCache::new(&root.path, repo_id);
            plan_model(&cache, busy, &model.revision, others, &mut plan)?;
        }
    }
    if apply {
        perform(&plan, roots)?;
    }
    Ok(plan)
}

fn plan_model(
    cache: &RepoCache,
    busy: &HashSet<PathBuf>,
    revision: &str,
    others: &[(String, String)],
    plan: &mut CachePlan,
) -> Result<(), CacheError> {
    if busy.contains(&cache.dir) {
        return Err(CacheError::InUse(format!(
            "{} is being downloaded into; wait for the pull to finish",
            cache.dir.display()
        )));
    }
    if !cache.dir.is_dir() {
        return Ok(());
    }
    if let Some(why) = linked_part(&cache.dir) {
        plan.skipped.push(why);
        return Ok(());
    }
    let repo = read_repo(&cache.dir);
    let Some(commit) = commit_of(&repo, revision).filter(|c| repo.snapshots.contains_key(c)) else {
        return Ok(());
    };
    let snapshot = cache.snapshot_dir(&commit);
    if busy.contains(&snapshot) {
        return Err(CacheError::InUse(format!(
            "{} is used by a loaded model; unload it first",
            snapshot.display()
        )));
    }
    let sharer = others
        .iter()
        .find(|(_, other)| commit_of(&repo, other).as_ref() == Some(&commit));
    if let Some((name, _)) = sharer {
        plan.skipped.push(format!(
            "{}: also the files of model {name}",
            snapshot.display()
        ));
    } else if repo.snapshots.len() == 1 {
        let bytes =
            repo.blobs.values().sum::<u64>() + repo.incomplete.iter().map(|(_, s)| s).sum::<u64>();
        act(plan, "remove_repo", repo.dir.clone(), bytes);
    } else {
        plan_revision(&repo, &commit, plan);
    }
    Ok(())
}

/// The commit a revision names in this repo directory, if known.
fn commit_of(repo: &RepoDir, revision: &str) -> Option<String> {
    if is_commit(revision) {
        Some(revision.to_string())
    } else {
        repo.refs.get(revision).cloned()
    }
}
