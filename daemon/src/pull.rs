//! `models.pull`: download a model's files from the Hub into its cache root.
//!
//! One pull per (root, repo, revision) runs at a time; a second request for
//! the same files attaches to the running one and sees the same progress.
//! A pull outlives the client that asked for it, so a dropped terminal does
//! not waste a half-finished download. Every blob a pull downloads or
//! re-hashes is recorded as checked ([`Fingerprints`]), and so is every
//! file of a `local_path` that `verify` hashes, so a load can tell what
//! changed since.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modeld_wire::types::{ModelRecord, PullEvent, SourceKind, SpaceCheck};
use tokio::sync::broadcast;

use crate::fingerprint::{digest_file, DigestKind, Fingerprints};
use crate::hub::api::HubSettings;
use crate::hub::cache::{check_space, RepoCache};
use crate::hub::download::{blob_is_complete, fetch_blob};
use crate::hub::{Hub, HubError, RemoteFile};
use crate::sources::{find_on_disk, patterns, CacheRoots, NoSecondaryCache, OnDisk};

/// Progress notifications per second, at most, per pull.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What makes two pulls the same: target root, repo, revision.
type PullKey = (PathBuf, String, String);

/// Why a pull could not start, or what ended it. Shared by every watcher
/// of the pull, so the Hub's error sits behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Target(#[from] NoSecondaryCache),
    #[error(transparent)]
    Hub(Arc<HubError>),
}

impl From<HubError> for PullError {
    fn from(err: HubError) -> Self {
        PullError::Hub(Arc::new(err))
    }
}

/// What a pull's watchers see: its events, ending with `Done` or with the
/// error that stopped it (wire form is the RPC layer's business).
pub type PullUpdate = Result<PullEvent, PullError>;

/// The pulls in progress.
#[derive(Default)]
pub struct Pulls {
    active: Mutex<HashMap<PullKey, Arc<PullHandle>>>,
}

struct PullHandle {
    events: broadcast::Sender<PullUpdate>,
    /// Replayed to late joiners so they know the totals and the outcome.
    start: Mutex<Option<PullEvent>>,
    last: Mutex<Option<PullUpdate>>,
}

/// A view of one pull: events already past that matter, then the live ones.
pub struct PullWatch {
    replay: std::collections::VecDeque<PullUpdate>,
    events: broadcast::Receiver<PullUpdate>,
}

impl PullWatch {
    /// The next event: replayed ones first, then live ones. A slow reader
    /// skips progress it missed, never the outcome, since a lagging
    /// receiver keeps the newest events. `None` once the pull is gone.
    pub async fn next(&mut self) -> Option<PullUpdate> {
        if let Some(event) = self.replay.pop_front() {
            return Some(event);
        }
        loop {
            match self.events.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Everything a pull needs, taken from the state when it was asked for.
pub struct PullJob {
    pub model: ModelRecord,
    pub roots: CacheRoots,
    pub hub: HubSettings,
    pub verify: bool,
    /// Repo files found damaged or changed at load: re-hashed like `verify`
    /// does for every file, and fetched again if they differ from the Hub's.
    pub repair: Vec<String>,
    /// Where the files this pull checks are recorded.
    pub fingerprints: Fingerprints,
}

impl PullJob {
    /// Whether `file`'s cached blob is re-hashed before it is trusted.
    fn verifies(&self, file: &RemoteFile) -> bool {
        self.verify || self.repair.contains(&file.path)
    }
}

impl Pulls {
    /// The cache directories of repos with a download running.
    pub fn active_repo_dirs(&self) -> Vec<PathBuf> {
        let active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        active
            .keys()
            .map(|(root, repo, _)| RepoCache::new(root, repo).dir)
            .collect()
    }

    /// Joins the pull of the same files if one runs, else starts one.
    pub fn attach_or_start(self: &Arc<Self>, job: PullJob) -> Result<PullWatch, PullError> {
        let target = job.roots.target(&job.model.cache)?;
        let key: PullKey = (
            target.clone(),
            job.model.repo.clone().unwrap_or_default(),
            job.model.revision.clone(),
        );
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = active.get(&key) {
            let events = handle.events.subscribe();
            let start = handle
                .start
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let last = handle
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let replay = start.map(Ok).into_iter().chain(last).collect();
            return Ok(PullWatch { replay, events });
        }
        let (sender, events) = broadcast::channel(1024);
        let handle = Arc::new(PullHandle {
            events: sender,
            start: Mutex::new(None),
            last: Mutex::new(None),
        });
        active.insert(key.clone(), handle.clone());
        let pulls = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = run(&job, target, &handle, started).await;
            store_records(&job.fingerprints).await;
            let last = outcome.map_err(|err| {
                tracing::warn!(model = %job.model.name, "pull failed: {err}");
                PullError::from(err)
            });
            // Under the map lock, so a joiner sees either the live pull with
            // its outcome recorded, or no pull at all.
            let mut active = pulls.active.lock().unwrap_or_else(|e| e.into_inner());
            *handle.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(last.clone());
            let _ = handle.events.send(last);
            active.remove(&key);
        });
        Ok(PullWatch {
            replay: std::collections::VecDeque::new(),
            events,
        })
    }
}

/// Makes the records of the files a pull checked durable before watchers
/// hear its outcome.
async fn store_records(fingerprints: &Fingerprints) {
    let fingerprints = fingerprints.clone();
    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || fingerprints.flush()).await {
        tracing::warn!("cannot store the records of checked files: {err}");
    }
}

fn emit(handle: &PullHandle, event: PullEvent) {
    let _ = handle.events.send(Ok(event));
}

async fn run(
    job: &PullJob,
    target: PathBuf,
    handle: &PullHandle,
    started: Instant,
) -> Result<PullEvent, HubError> {
    let model = &job.model;
    if job.verify {
        record_local(job).await?;
    }
    // Without a repo, or offline, only what is on disk can answer; otherwise
    // a pull syncs with the Hub, fetching whatever is missing or damaged.
    let repo = match (model.repo.as_deref(), job.hub.offline) {
        (Some(repo), false) => repo,
        (repo, offline) => {
            return match find_on_disk(model, &job.roots) {
                Some(found) => Ok(done_on_disk(found, started)),
                None if offline => Err(HubError::Offline {
                    repo: repo.unwrap_or(&model.name).to_string(),
                }),
                None => Err(HubError::Io {
                    path: model.local_path.clone().unwrap_or_default(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no matching files at the local path and no repo to download from",
                    ),
                }),
            };
        }
    };
    let hub = Hub::new(job.hub.clone())?;
    let listing = hub.list(repo, &model.revision).await?;
    let globs = patterns(model);
    let mut wanted: Vec<_> = listing
        .files
        .iter()
        .filter(|f| globs.is_match(&f.path))
        .collect();
    if model.files == crate::validate::DEFAULT_FILE_PATTERNS {
        // Named patterns are taken as they are; the defaults get one copy
        // of each weights file.
        let paths: Vec<&str> = wanted.iter().map(|f| f.path.as_str()).collect();
        let keep: std::collections::HashSet<&str> = crate::hub::select::default_selection(&paths)
            .into_iter()
            .collect();
        wanted.retain(|f| keep.contains(f.path.as_str()));
    }
    let mut files: Vec<RemoteFile> = Vec::with_capacity(wanted.len());
    for file in wanted {
        files.push(hub.file_meta(repo, &listing.commit, &file.path).await?);
    }
    if files.is_empty() {
        return Err(HubError::Protocol(format!(
            "no file of {repo}@{} matches {:?}",
            model.revision, model.files
        )));
    }
    let cache = RepoCache::new(&target, repo);
    if let Some(link) = crate::hub::cache::planted_link(&cache.dir) {
        let why = std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "a folder of the repo is a symlink; refusing to download through it",
        );
        return Err(HubError::io(link, why));
    }
    let space = space_for(&cache, &files, job)?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let start = PullEvent::Start {
        repo: repo.to_string(),
        commit: listing.commit.clone(),
        files: files.len(),
        total_bytes: total,
        download_bytes: space.needed_bytes,
        target: target.clone(),
        space,
    };
    *handle.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(start.clone());
    emit(handle, start);

    let mut progress = Progress::new(total);
    for file in &files {
        if job.verifies(file) {
            blob_is_complete(&cache, file, true)?;
        }
        let mut on_bytes = |file_bytes: u64| {
            if let Some(event) = progress.update(file, file_bytes) {
                emit(handle, event);
            }
        };
        let fetched = fetch_blob(&hub, &cache, repo, &listing.commit, file, &mut on_bytes).await?;
        if fetched || job.verifies(file) {
            record_checked(&job.fingerprints, &cache, file);
        }
        progress.finish_file(file);
        emit(handle, progress.event(file, file.size));
        cache
            .link_snapshot(&listing.commit, &file.path, &file.etag)
            .map_err(|e| HubError::io(cache.snapshot_dir(&listing.commit), e))?;
    }
    cache
        .write_ref(&model.revision, &listing.commit)
        .map_err(|e| HubError::io(&cache.dir, e))?;
    tracing::info!(model = %model.name, commit = %listing.commit, bytes = progress.downloaded, "pull complete");
    Ok(PullEvent::Done {
        done: true,
        source: SourceKind::Hub,
        path: cache.snapshot_dir(&listing.commit),
        commit: Some(listing.commit),
        downloaded_bytes: progress.downloaded,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Records the blob of `file` as checked: its bytes were just hashed to
/// its etag. A record that cannot be written costs only the check at load,
/// not the download, so it is a warning.
fn record_checked(fingerprints: &Fingerprints, cache: &RepoCache, file: &RemoteFile) {
    let blob = cache.blob(&file.etag);
    if let Err(err) = fingerprints.record(&blob, file.digest_kind(), &file.etag) {
        tracing::warn!(blob = %blob.display(), "cannot record the verified blob: {err}");
    }
}

/// `verify` of a model found at its `local_path`: its files are hashed and
/// recorded as checked, so a later change shows in `cache.scan` and at
/// load. They are never fetched, so their bytes now are the reference.
async fn record_local(job: &PullJob) -> Result<(), HubError> {
    let (model, roots) = (job.model.clone(), job.roots.clone());
    let fingerprints = job.fingerprints.clone();
    let record = move || {
        let Some(OnDisk::Local { path, files }) = find_on_disk(&model, &roots) else {
            return Ok(());
        };
        let paths: Vec<PathBuf> = match path.is_file() {
            true => vec![path],
            false => files.iter().map(|file| path.join(file)).collect(),
        };
        for file in paths {
            digest_file(&file, DigestKind::Sha256)
                .and_then(|digest| fingerprints.record(&file, DigestKind::Sha256, &digest))
                .map_err(|e| HubError::io(&file, e))?;
        }
        Ok(())
    };
    let local = job.model.local_path.clone().unwrap_or_default();
    tokio::task::spawn_blocking(record)
        .await
        .map_err(|e| HubError::io(local, std::io::Error::other(e.to_string())))?
}

fn done_on_disk(found: OnDisk, started: Instant) -> PullEvent {
    let (source, path, commit) = match found {
        OnDisk::Local { path, .. } => (SourceKind::Local, path, None),
        OnDisk::Cache { dir, commit, .. } => (SourceKind::Cache, dir, Some(commit)),
    };
    PullEvent::Done {
        done: true,
        source,
        path,
        commit,
        downloaded_bytes: 0,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

/// Refuses a download that cannot fit, judged by the files' real sizes
/// less what the cache holds already; warns below 10% headroom.
fn space_for(
    cache: &RepoCache,
    files: &[RemoteFile],
    job: &PullJob,
) -> Result<SpaceCheck, HubError> {
    let mut needed = 0;
    for file in files {
        if !job.verifies(file) && blob_is_complete(cache, file, false)? {
            continue;
        }
        let partial = std::fs::metadata(cache.incomplete(&file.etag)).map_or(0, |m| m.len());
        needed += file.size.saturating_sub(partial);
    }
    check_space(&cache.root, needed)
}

/// Running totals of one pull, and the throttle on progress events.
struct Progress {
    total: u64,
    /// Bytes of files already finished.
    finished: u64,
    /// Bytes this pull fetched over the network (resumed bytes excluded).
    downloaded: u64,
    /// Where the current file stood when this pull first saw it.
    file_start: Option<u64>,
    began: Instant,
    last_emit: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            total,
            finished: 0,
            downloaded: 0,
            file_start: None,
            began: Instant::now(),
            last_emit: None,
        }
    }

    fn update(&mut self, file: &RemoteFile, file_bytes: u64) -> Option<PullEvent> {
        let start = *self.file_start.get_or_insert(file_bytes);
        // A reset (the server ignored a range) starts the count again.
        if file_bytes < start {
            self.file_start = Some(file_bytes);
        }
        let due = self
            .last_emit
            .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if !due {
            return None;
        }
        self.last_emit = Some(Instant::now());
        Some(self.event(file, file_bytes))
    }

    fn finish_file(&mut self, file: &RemoteFile) {
        let start = self.file_start.take().unwrap_or(file.size);
        self.downloaded += file.size.saturating_sub(start);
        self.finished += file.size;
    }

    fn event(&self, file: &RemoteFile, file_bytes: u64) -> PullEvent {
        let in_file = file_bytes.saturating_sub(self.file_start.unwrap_or(file_bytes));
        let fetched = self.downloaded + in_file;
        let seconds = self.began.elapsed().as_secs_f64().max(1e-3);
        let bytes = if self.file_start.is_none() {
            self.finished
        } else {
            self.finished + file_bytes
        };
        PullEvent::Progress {
            file: file.path.clone(),
            file_bytes,
            file_total: file.size,
            bytes: bytes.min(self.total),
            total: self.total,
            rate_bytes_per_s: (fetched as f64 / seconds) as u64,
        }
    }
}
