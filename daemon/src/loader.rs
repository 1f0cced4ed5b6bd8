//! Getting a model into memory: find its files (pulling them if needed),
//! apply its mode's adapters and keep-alive, and respect the memory budget.
//! Before the load, every file that changed since a pull or `pull
//! --verify` hashed it is hashed again: a cache snapshot file that no
//! longer matches is fetched again, a `local_path` file is reported and
//! loaded as it is. A file of a Hub cache snapshot that turns out truncated
//! or corrupt at load is fetched again once, and the load retried.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use modeld_wire::types::{ChangeOutcome, ChangedFile, ModelRecord, PullEvent, SourceKind};

use crate::engine::image::ImageParts;
use crate::engine::runner::{self, process::Launch};
use crate::engine::{BadFile, EngineError, LoadRequest, Loaded, Placement, Resident};
use crate::fingerprint::{rehash_changed, Rehashed};
use crate::modes::{Mode, ModeParts, ModelRef};
use crate::pull::{PullError, PullJob};
use crate::registry::RegistryError;
use crate::sources::{find_on_disk, OnDisk};
use crate::state::AppState;

/// Why a model could not be made resident. The engine's error names the
/// device and bytes or the bad file; the RPC layer maps each to the wire.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a model's files are, and whose cache snapshot they are.
pub struct Located {
    /// A model directory or a `.gguf` file.
    pub path: PathBuf,
    /// The registered model whose Hub cache snapshot `path` is; `None` for
    /// a `local_path` or a mode's directory, whose files are never fetched.
    pub snapshot_of: Option<ModelRecord>,
}

/// A load, and the files found changed since they were checked.
pub struct LoadOutcome {
    pub loaded: Loaded,
    pub changed_files: Vec<ChangedFile>,
}

/// Loads `name` (a registered model) or `mode`'s model, unless resident.
pub async fn ensure_loaded(
    state: &Arc<AppState>,
    name: &str,
    mode: Option<&Mode>,
    placement: Option<Placement>,
) -> Result<Loaded, LoadError> {
    Ok(load_checked(state, name, mode, placement).await?.loaded)
}

/// [`ensure_loaded`], saying which files changed since they were checked
/// and what was done about each (the log says so too).
pub async fn load_checked(
    state: &Arc<AppState>,
    name: &str,
    mode: Option<&Mode>,
    placement: Option<Placement>,
) -> Result<LoadOutcome, LoadError> {
    if let Some(resident) = state.engine.get(name) {
        let loaded = Loaded {
            model: resident.info.clone(),
            already_loaded: true,
            evicted: Vec::new(),
        };
        return Ok(LoadOutcome {
            loaded,
            changed_files: Vec::new(),
        });
    }
    let placement = match placement {
        Some(placement) => placement,
        None => Placement::choose(&state.engine.devices, None, None)?,
    };
    let (located, loras, keep_alive, parts) = match mode {
        Some(mode) => (
            locate_ref(state, &mode.model).await?,
            mode.loras.clone(),
            mode.keep_alive,
            separate_parts(state, &mode.parts).await?,
        ),
        None => (
            locate(state, &state.registry.get(name)?).await?,
            Vec::new(),
            None,
            ImageParts::default(),
        ),
    };
    let (located, changed_files) = recheck(state, located).await?;
    let explicit = explicit_runner(state, name, mode);
    let runner = runner_launch(state, name, explicit, &located.path, &parts)?;
    let request = LoadRequest {
        name: name.to_string(),
        path: located.path,
        loras,
        placement,
        keep_alive,
        max_batch: state.config().scheduler.max_batch,
        parts,
        runner,
    };
    let loaded = load_repairing(state, request, located.snapshot_of.as_ref()).await?;
    for evicted in &loaded.evicted {
        tracing::info!(model = %evicted, "unloaded to make room for {name}");
    }
    if !loaded.already_loaded {
        let took = std::time::Duration::from_millis(loaded.model.load_ms);
        crate::metrics::model_loaded(name, took, loaded.evicted.len());
    }
    Ok(LoadOutcome {
        loaded,
        changed_files,
    })
}

/// The runner a mode or registration names, if any; a mode's own choice
/// comes before its registered model's.
fn explicit_runner(state: &AppState, name: &str, mode: Option<&Mode>) -> Option<String> {
    let registered = |model: &str| state.registry.get(model).ok()?.runner;
    match mode {
        Some(mode) => mode.runner.clone().or_else(|| match &mode.model {
            ModelRef::Registered(model) => registered(model),
            ModelRef::Path(_) => None,
        }),
        None => registered(name),
    }
}

/// How to start the model's runner, when it runs on one: the runner it
/// names, or the diffusers runner for a pipeline with no native family.
/// Commands come only from modeld.toml, never from a request.
fn runner_launch(
    state: &AppState,
    name: &str,
    explicit: Option<String>,
    path: &Path,
    parts: &ImageParts,
) -> Result<Option<Launch>, LoadError> {
    let (runner, class) = match explicit {
        Some(runner) => (runner, None),
        None => match runner::pipeline_needing_runner(path, parts.config_dir.as_deref()) {
            Some(class) => {
                tracing::info!(model = %name, %class, "no native family; it runs on the diffusers runner");
                (runner::DIFFUSERS.to_string(), Some(class))
            }
            None => return Ok(None),
        },
    };
    let config = state.config().runners.clone();
    let dir = state.paths.state_dir.join("runners");
    let io = |what: &str, err: std::io::Error| LoadError::Internal(format!("{what}: {err}"));
    let (command, command_key, env) = match config.custom.get(&runner) {
        Some(custom) => (
            custom.command.clone(),
            format!("runners.{runner}.command"),
            custom.env.clone().into_iter().collect(),
        ),
        None if runner == runner::DIFFUSERS => {
            let script = runner::install_diffusers_runner(&dir)
                .map_err(|e| io("cannot install the diffusers runner", e))?;
            let command = vec![config.python.clone(), script.display().to_string()];
            (command, "runners.python".to_string(), Vec::new())
        }
        None => {
            return Err(EngineError::Unsupported(format!(
                "no runner named {runner:?}: add [runners.{runner}] command = [...] to modeld.toml"
            ))
            .into())
        }
    };
    let scratch_dir = runner::scratch_dir(&dir.join("scratch"), name)
        .map_err(|e| io("cannot make the runner's scratch folder", e))?;
    let seconds = std::time::Duration::from_secs;
    Ok(Some(Launch {
        runner,
        command,
        command_key,
        class,
        env,
        scratch_dir,
        start_timeout: seconds(config.start_timeout_s),
        load_timeout: seconds(config.load_timeout_s),
        step_timeout: seconds(config.step_timeout_s),
        stop_grace: seconds(config.stop_grace_s),
        max_line_bytes: config.max_line_bytes as usize,
    }))
}

/// Hashes again the files of `located` that changed since they were
/// checked, before anything reads them. Cache snapshot files that no
/// longer match are fetched again (and the model located anew); a local
/// file is loaded as it is, and stays reported until verified again.
async fn recheck(
    state: &Arc<AppState>,
    located: Located,
) -> Result<(Located, Vec<ChangedFile>), LoadError> {
    let rehashed = rehash(state, &located.path).await?;
    let mut changed = Vec::with_capacity(rehashed.len());
    let mut refetch = Vec::new();
    for file in rehashed {
        let outcome = judge(state, &located, &file, &mut refetch);
        changed.push(ChangedFile {
            path: file.path,
            outcome,
        });
    }
    let Some(model) = located.snapshot_of.as_ref().filter(|_| !refetch.is_empty()) else {
        return Ok((located, changed));
    };
    fetch_changed(state, model, &located.path, refetch).await?;
    let located = locate(state, model).await?;
    // A pull already running for the repo may have been joined instead,
    // without these files: whatever still differs is refused, not loaded.
    let still = rehash(state, &located.path).await?;
    if let Some(file) = still.into_iter().find(|file| !file.matches) {
        let bad = BadFile::new(&file.path, "changed since it was checked");
        return Err(refused(
            bad.noting("it still differs after fetching it again"),
        ));
    }
    Ok((located, changed))
}

/// The recorded files under `path` that changed since they were checked,
/// hashed again off the async threads.
async fn rehash(state: &AppState, path: &Path) -> Result<Vec<Rehashed>, LoadError> {
    let fingerprints = state.registry.fingerprints().clone();
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || rehash_changed(&path, &fingerprints))
        .await
        .map_err(|e| LoadError::Internal(e.to_string()))
}

/// What becomes of one changed file: a repo file of a snapshot that no
/// longer matches is added to `refetch`; a local one is recorded as
/// differing.
fn judge(
    state: &AppState,
    located: &Located,
    file: &Rehashed,
    refetch: &mut Vec<String>,
) -> ChangeOutcome {
    let shown = file.path.display();
    if file.matches {
        tracing::info!(file = %shown, "changed since it was checked, but its bytes still match");
        return ChangeOutcome::Unchanged;
    }
    let snapshot_file = located
        .snapshot_of
        .as_ref()
        .and_then(|_| repo_file(&located.path, &file.path));
    if let Some(repo_path) = snapshot_file {
        tracing::warn!(file = %shown, "changed since it was checked and no longer matches its digest; fetching it again");
        refetch.push(repo_path);
        return ChangeOutcome::Refetched;
    }
    tracing::warn!(file = %shown, "changed since it was verified; loaded as it is (local files are never fetched)");
    let known = file.record.differs && file.record.stamp == file.stamp;
    let recorded = match known {
        true => Ok(()),
        false => state.registry.fingerprints().record_difference(
            &file.path,
            file.record.clone(),
            file.stamp,
        ),
    };
    if let Err(err) = recorded {
        tracing::warn!(file = %shown, "cannot record the change: {err}");
    }
    ChangeOutcome::Modified
}

/// Fetches the changed repo files `refetch` of `model` again; refused
/// naming the first of them when offline or when the fetch fails.
async fn fetch_changed(
    state: &Arc<AppState>,
    model: &ModelRecord,
    dir: &Path,
    refetch: Vec<String>,
) -> Result<(), LoadError> {
    let bad = BadFile::new(
        &dir.join(&refetch[0]),
        "changed since it was checked and no longer matches its digest",
    );
    if state.hub_settings().offline {
        return Err(refused(
            bad.noting("offline (HF_HUB_OFFLINE), so it cannot be fetched again"),
        ));
    }
    match pull(state, model, refetch).await {
        Ok(_) => Ok(()),
        Err(err) => Err(refused(
            bad.noting(format!("fetching it again failed: {err}")),
        )),
    }
}

/// Where a mode's model (or config folder) is: a registered model's
/// files, pulled if needed, or a path under `model_root`.
async fn locate_ref(state: &Arc<AppState>, model: &ModelRef) -> Result<Located, LoadError> {
    match model {
        ModelRef::Registered(model) => locate(state, &state.registry.get(model)?).await,
        ModelRef::Path(path) => Ok(Located {
            path: path.clone(),
            snapshot_of: None,
        }),
    }
}

/// A mode's separate component files, with its config folder located.
async fn separate_parts(state: &Arc<AppState>, parts: &ModeParts) -> Result<ImageParts, LoadError> {
    let config_dir = match &parts.config {
        Some(config) => Some(locate_ref(state, config).await?.path),
        None => None,
    };
    Ok(ImageParts {
        vae: parts.vae.clone(),
        text_encoders: parts.text_encoders.clone(),
        config_dir,
        offload_text_encoders: parts.offload_text_encoders,
    })
}

/// Loads the model; when a file of `snapshot_of`'s cache snapshot is bad,
/// fetches that file again once (re-hashed as `pull --verify` would) and
/// retries. Whatever still fails is reported naming the file.
async fn load_repairing(
    state: &Arc<AppState>,
    request: LoadRequest,
    snapshot_of: Option<&ModelRecord>,
) -> Result<Loaded, LoadError> {
    let budget = state.memory_budget();
    let bad = match state.engine.load(request.clone(), budget).await {
        Err(EngineError::BadFile(bad)) => bad,
        other => return Ok(other?),
    };
    let online = !state.hub_settings().offline;
    let repairable = snapshot_of
        .filter(|_| online)
        .zip(repo_file(&request.path, &bad.path));
    let Some((model, file)) = repairable else {
        return Err(EngineError::BadFile(bad).into());
    };
    tracing::warn!(model = %model.name, %file, "{bad}; fetching the file again");
    match pull(state, model, vec![file.clone()]).await {
        Ok(done) if done.downloaded_bytes == 0 => {
            return Err(refused(bad.noting(
                "the cached copy matches the Hub's, so the Hub's file itself is bad",
            )))
        }
        Ok(_) => {}
        Err(err) => {
            return Err(refused(
                bad.noting(format!("fetching it again failed: {err}")),
            ))
        }
    }
    let path = locate(state, model).await?.path;
    let retried = LoadRequest { path, ..request };
    state
        .engine
        .load(retried, budget)
        .await
        .map_err(|err| match err {
            EngineError::BadFile(again) => {
                refused(again.noting(format!("after fetching {file} again from the Hub")))
            }
            other => other.into(),
        })
}

fn refused(bad: BadFile) -> LoadError {
    EngineError::BadFile(bad).into()
}

/// The repo path of `file` inside the snapshot `dir`, if it is one there.
fn repo_file(dir: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(dir).ok()?;
    let relative = relative.to_str()?;
    (!relative.is_empty()).then(|| relative.to_string())
}

/// The resident model, loading it first when needed.
pub async fn resident(
    state: &Arc<AppState>,
    name: &str,
    mode: Option<&Mode>,
) -> Result<Arc<Resident>, LoadError> {
    ensure_loaded(state, name, mode, None).await?;
    state
        .engine
        .get(name)
        .ok_or_else(|| EngineError::NotLoaded(name.to_string()).into())
}

/// Where a registered model's files are (a directory, or a `.gguf` file):
/// on disk already, or pulled now.
pub async fn locate(state: &Arc<AppState>, model: &ModelRecord) -> Result<Located, LoadError> {
    let found = {
        let (model, roots) = (model.clone(), state.cache_roots());
        tokio::task::spawn_blocking(move || find_on_disk(&model, &roots))
            .await
            .map_err(|e| LoadError::Internal(e.to_string()))?
    };
    let (path, cached) = match found {
        Some(OnDisk::Local { path, .. }) => (path, false),
        Some(OnDisk::Cache { dir, .. }) => (dir, true),
        None => {
            let done = pull(state, model, Vec::new()).await?;
            (done.path, done.source != SourceKind::Local)
        }
    };
    Ok(Located {
        path,
        snapshot_of: cached.then(|| model.clone()),
    })
}

/// What a finished pull reports.
struct Pulled {
    path: PathBuf,
    source: SourceKind,
    downloaded_bytes: u64,
}

/// Runs (or joins) a pull of `model`, re-hashing the files in `repair`,
/// and waits for its outcome.
async fn pull(
    state: &Arc<AppState>,
    model: &ModelRecord,
    repair: Vec<String>,
) -> Result<Pulled, LoadError> {
    let mut watch = state.pulls.attach_or_start(PullJob {
        model: model.clone(),
        roots: state.cache_roots(),
        hub: state.hub_settings(),
        verify: false,
        repair,
        fingerprints: state.registry.fingerprints().clone(),
    })?;
    while let Some(event) = watch.next().await {
        // A failed pull ends its stream with the error.
        if let PullEvent::Done {
            path,
            source,
            downloaded_bytes,
            ..
        } = event?
        {
            return Ok(Pulled {
                path,
                source,
                downloaded_bytes,
            });
        }
    }
    Err(LoadError::Internal(
        "the pull ended without an outcome".into(),
    ))
}
