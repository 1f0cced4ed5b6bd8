//! `cache.*`: scan, duplicates, consolidate, clean and rm across every root.
//! File-system walks and hashing run on blocking threads.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use modeld_wire::types::{
    ApplyParams, CachePlan, CacheRemoveParams, CacheScanReply, DuplicatesReply,
};

use crate::caches::{self, clean, consolidate, dupes, scan};
use crate::rpc::{ApiError, NoParams};
use crate::state::AppState;
use crate::validate::{valid_repo_id, valid_revision};

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Repo directories that must not change: those with a running download,
/// and those a loaded model's files live in.
fn busy_repo_dirs(state: &AppState) -> HashSet<PathBuf> {
    let mut busy: HashSet<PathBuf> = state.pulls.active_repo_dirs().into_iter().collect();
    for model in state.engine.list() {
        let repo_dir = model.path.ancestors().find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("models--"))
        });
        if let Some(dir) = repo_dir {
            busy.insert(dir.to_path_buf());
        }
    }
    busy
}

pub async fn scan(state: Arc<AppState>, _: NoParams) -> Result<CacheScanReply, ApiError> {
    let roots = caches::roots_and_local_paths(&state);
    let models = state.registry.list()?;
    Ok(scan::scan(&roots, &models, state.registry.fingerprints()).await)
}

pub async fn duplicates(state: Arc<AppState>, _: NoParams) -> Result<DuplicatesReply, ApiError> {
    let roots = caches::roots_and_local_paths(&state);
    blocking(move || dupes::duplicates(&roots)).await
}

pub async fn consolidate(state: Arc<AppState>, params: ApplyParams) -> Result<CachePlan, ApiError> {
    let roots = caches::roots_and_local_paths(&state);
    let protected = caches::protected_files(&state);
    let policy = consolidate::Policy {
        min_link_bytes: state.config().cache.consolidate_min_bytes,
    };
    blocking(move || {
        let found = dupes::duplicates(&roots);
        consolidate::consolidate(&found, &roots, &protected, policy, params.apply)
    })
    .await
}

pub async fn clean(state: Arc<AppState>, params: ApplyParams) -> Result<CachePlan, ApiError> {
    let roots = caches::roots(&state);
    let busy = busy_repo_dirs(&state);
    Ok(blocking(move || clean::clean(&roots, &busy, params.apply, params.detached)).await??)
}

pub async fn remove(
    state: Arc<AppState>,
    params: CacheRemoveParams,
) -> Result<CachePlan, ApiError> {
    valid_repo_id(&params.repo)?;
    if let Some(revision) = &params.revision {
        valid_revision(revision)?;
    }
    let roots = caches::roots(&state);
    let busy = busy_repo_dirs(&state);
    let plan = blocking(move || {
        clean::remove(
            &roots,
            &busy,
            &params.repo,
            params.revision.as_deref(),
            params.apply,
        )
    })
    .await??;
    Ok(plan)
}
