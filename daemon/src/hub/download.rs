//! Resumable, verified download of one repo file into a cache blob.
//!
//! Bytes land in `blobs/<etag>.incomplete`; an interrupted download (a dropped
//! connection, or `kill -9` of the daemon) resumes from the bytes already
//! there with an HTTP range request. The finished file is hashed (sha256 for
//! LFS files, the git blob id otherwise) and only a verified file is renamed
//! to its blob name. A mismatch discards the bytes and downloads once more.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, RANGE};
use reqwest::StatusCode;

use super::api::{Hub, RemoteFile};
use super::cache::RepoCache;
use super::HubError;
use crate::fingerprint::{digest_file, Hasher};

/// Where a download is up to, reported after every chunk.
pub type OnBytes<'a> = &'a mut (dyn FnMut(u64) + Send);

/// Whether the blob for `file` is already present and of the right size;
/// with `verify`, its hash is checked too (and a bad blob removed).
pub fn blob_is_complete(
    cache: &RepoCache,
    file: &RemoteFile,
    verify: bool,
) -> Result<bool, HubError> {
    let blob = cache.blob(&file.etag);
    match std::fs::metadata(&blob) {
        Ok(meta) if meta.len() == file.size => {}
        Ok(_) => {
            tracing::warn!(blob = %blob.display(), "cached blob has the wrong size; downloading again");
            std::fs::remove_file(&blob).map_err(|e| HubError::io(&blob, e))?;
            return Ok(false);
        }
        Err(_) => return Ok(false),
    }
    if !verify {
        return Ok(true);
    }
    if digest_file(&blob, file.digest_kind()).map_err(|e| HubError::io(&blob, e))? == file.etag {
        return Ok(true);
    }
    tracing::warn!(blob = %blob.display(), "cached blob is corrupt; downloading again");
    std::fs::remove_file(&blob).map_err(|e| HubError::io(&blob, e))?;
    Ok(false)
}

/// Downloads `file` into its blob unless it is already there; true when
/// it did (the new blob's bytes were verified on the way).
pub async fn fetch_blob(
    hub: &Hub,
    cache: &RepoCache,
    repo: &str,
    commit: &str,
    file: &RemoteFile,
    on_bytes: OnBytes<'_>,
) -> Result<bool, HubError> {
    let blob = cache.blob(&file.etag);
    if blob_is_complete(cache, file, false)? {
        on_bytes(file.size);
        return Ok(false);
    }
    let blobs = blob.parent().expect("blobs have a parent");
    std::fs::create_dir_all(blobs).map_err(|e| HubError::io(blobs, e))?;
    let partial = cache.incomplete(&file.etag);
    let url = hub.resolve_url(repo, commit, &file.path);
    let mut mismatches = 0;
    loop {
        let hasher = download_to(hub, &url, &partial, file, on_bytes).await?;
        let actual = hasher.finish();
        if actual == file.etag {
            break;
        }
        std::fs::remove_file(&partial).map_err(|e| HubError::io(&partial, e))?;
        mismatches += 1;
        if mismatches == 2 {
            return Err(HubError::Corrupt {
                file: file.path.clone(),
                expected: file.etag.clone(),
                actual,
            });
        }
        tracing::warn!(file = %file.path, "downloaded bytes failed verification; downloading again");
    }
    File::open(&partial)
        .and_then(|f| f.sync_all())
        .map_err(|e| HubError::io(&partial, e))?;
    std::fs::rename(&partial, &blob).map_err(|e| HubError::io(&blob, e))?;
    Ok(true)
}

/// Fills `partial` up to `file.size`, resuming and retrying transient
/// failures; returns the hash of the whole file.
async fn download_to(
    hub: &Hub,
    url: &str,
    partial: &Path,
    file: &RemoteFile,
    on_bytes: OnBytes<'_>,
) -> Result<Hasher, HubError> {
    let mut failures = 0;
    loop {
        let (mut out, mut hasher, offset) = open_partial(partial, file)?;
        on_bytes(offset);
        if offset == file.size {
            return Ok(hasher);
        }
        match stream_range(
            hub,
            url,
            &mut out,
            &mut hasher,
            partial,
            offset,
            file,
            on_bytes,
        )
        .await
        {
            Ok(true) => return Ok(hasher),
            Ok(false) => {}
            Err(Transfer::Fatal(err)) => return Err(err),
            Err(Transfer::Transient(message)) => {
                failures += 1;
                if failures >= hub.settings.retries {
                    return Err(HubError::Network {
                        endpoint: hub.settings.endpoint.clone(),
                        message,
                    });
                }
                tracing::info!(file = %file.path, failures, "download interrupted ({message}); resuming");
                tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
            }
        }
    }
}

/// Opens the partial file for appending and hashes what it already holds.
fn open_partial(partial: &Path, file: &RemoteFile) -> Result<(File, Hasher, u64), HubError> {
    let mut out = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(partial)
        .map_err(|e| HubError::io(partial, e))?;
    let mut offset = out.metadata().map_err(|e| HubError::io(partial, e))?.len();
    if offset > file.size {
        out.set_len(0).map_err(|e| HubError::io(partial, e))?;
        offset = 0;
    }
    let mut hasher = Hasher::new(file.digest_kind(), file.size);
    if offset > 0 {
        hasher
            .update_from(partial)
            .map_err(|e| HubError::io(partial, e))?;
    }
    let _ = out.flush();
    Ok((out, hasher, offset))
}

enum Transfer {
    Transient(String),
    Fatal(HubError),
}

/// One HTTP request from `offset`; `Ok(true)` when the file is complete,
/// `Ok(false)` when the server ignored the range and the file was reset.
#[allow(clippy::too_many_arguments)]
async fn stream_range(
    hub: &Hub,
    url: &str,
    out: &mut File,
    hasher: &mut Hasher,
    partial: &Path,
    offset: u64,
    file: &RemoteFile,
    on_bytes: OnBytes<'_>,
) -> Result<bool, Transfer> {
    let mut request = hub.http.get(url);
    if let Some(token) = &hub.settings.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if offset > 0 {
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request
        .send()
        .await
        .map_err(|e| Transfer::Transient(e.to_string()))?;
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK if offset == 0 => {}
        StatusCode::OK => {
            // The server sent the whole file: start over with it.
            out.set_len(0)
                .map_err(|e| Transfer::Fatal(HubError::io(partial, e)))?;
            return Ok(false);
        }
        status if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
            return Err(Transfer::Transient(format!("HTTP {status}")));
        }
        status => return Err(Transfer::Fatal(status_error(status, &file.path))),
    }
    let mut written = offset;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Transfer::Transient(e.to_string()))?;
        let end = written + chunk.len() as u64;
        if end > file.size {
            return Err(Transfer::Fatal(HubError::Protocol(format!(
                "{} is longer than the {} bytes listed",
                file.path, file.size
            ))));
        }
        // Disk writes and hashing are blocking work: keep them off the reactor.
        tokio::task::block_in_place(|| {
            out.write_all(&chunk)?;
            crate::metrics::downloaded(chunk.len() as u64);
            hasher.update(&chunk);
            Ok::<_, std::io::Error>(())
        })
        .map_err(|e| Transfer::Fatal(HubError::io(partial, e)))?;
        written = end;
        on_bytes(written);
    }
    if written < file.size {
        return Err(Transfer::Transient(format!(
            "connection closed after {written} of {} bytes",
            file.size
        )));
    }
    Ok(true)
}

fn status_error(status: StatusCode, path: &str) -> HubError {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => HubError::Unauthorized {
            repo: path.to_string(),
            status: status.as_u16(),
            hint: "set HF_TOKEN or run `hf auth login`",
        },
        _ => HubError::Protocol(format!("HTTP {status} for {path}")),
    }
}
