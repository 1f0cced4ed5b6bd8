//! Hub metadata through hf-hub: which commit a revision names and which
//! files (with sizes and content hashes) it holds. Also the shared HTTP
//! client, endpoint and token that our own downloads use.

use std::time::Duration;

use futures::StreamExt;
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFError};

use super::cache::safe_repo_path;
use super::HubError;
use crate::fingerprint::DigestKind;

/// Where the Hub is and how to authenticate, resolved once from config and
/// the standard Hugging Face environment variables.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
    /// Attempts per HTTP request before a transient failure is final.
    pub retries: usize,
}

impl HubSettings {
    /// `HF_ENDPOINT`, `HF_TOKEN` / `HF_TOKEN_PATH` / `$HF_HOME/token`,
    /// `HF_HUB_OFFLINE`; `endpoint` from the config file wins over the env.
    pub fn from_env(endpoint: Option<&str>, retries: usize) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| env("HF_ENDPOINT"))
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let token = env("HF_TOKEN").or_else(|| {
            let path = env("HF_TOKEN_PATH")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| hf_home().join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        HubSettings {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline,
            retries: retries.max(1),
        }
    }
}

/// `$HF_HOME`, or `~/.cache/huggingface`.
pub fn hf_home() -> std::path::PathBuf {
    std::env::var_os("HF_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| modeld_wire::paths::home_dir().join(".cache"));
            cache.join("huggingface")
        })
}

/// One file of a repo's tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    pub path: String,
    pub size: u64,
}

/// One file ready to download: its blob name and size from a HEAD request,
/// exactly as huggingface_hub names blobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    /// The blob name in the cache: the LFS sha256, or the git blob id.
    pub etag: String,
    /// True when `etag` is a sha256 of the contents (LFS), false for a git oid.
    pub lfs: bool,
}

impl RemoteFile {
    /// How `etag` is computed from the file's bytes.
    pub fn digest_kind(&self) -> DigestKind {
        match self.lfs {
            true => DigestKind::Sha256,
            false => DigestKind::GitBlob,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RepoListing {
    pub commit: String,
    pub files: Vec<TreeFile>,
}

pub struct Hub {
    pub settings: HubSettings,
    pub http: reqwest::Client,
    /// For HEAD requests: the Hub's redirect to its CDN carries the
    /// headers we need, so it must not be followed.
    head_http: reqwest::Client,
    client: HFClient,
}

impl Hub {
    pub fn new(settings: HubSettings) -> Result<Self, HubError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .user_agent(concat!("modeld/", env!("CARGO_PKG_VERSION")))
        };
        let http_err = |err: reqwest::Error| HubError::Protocol(format!("HTTP client: {err}"));
        let http = builder().build().map_err(http_err)?;
        let head_http = builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(http_err)?;
        let mut builder = HFClient::builder()
            .endpoint(settings.endpoint.clone())
            .client(http.clone())
            .retry_max_attempts(settings.retries)
            .retry_base_delay(Duration::from_millis(200));
        if let Some(token) = &settings.token {
            builder = builder.token(token.clone());
        }
        let client = builder
            .build()
            .map_err(|err| HubError::Protocol(format!("hf-hub client: {err}")))?;
        Ok(Hub {
            settings,
            http,
            head_http,
            client,
        })
    }

    /// The commit `revision` names and every file it holds.
    pub async fn list(&self, repo: &str, revision: &str) -> Result<RepoListing, HubError> {
        if self.settings.offline {
            return Err(HubError::Offline { repo: repo.into() });
        }
        let (owner, name) = hf_hub::split_id(repo);
        let handle = self.client.model(owner, name);
        let info = handle
            .info()
            .revision(revision.to_string())
            .send()
            .await
            .map_err(|err| self.map_error(err, repo, revision))?;
        let commit = info
            .sha
            .filter(|sha| super::cache::is_commit(sha))
            .ok_or_else(|| HubError::Protocol(format!("no commit sha for {repo}@{revision}")))?;
        let stream = handle
            .list_tree()
            .revision(commit.clone())
            .recursive(true)
            .send()
            .map_err(|err| self.map_error(err, repo, revision))?;
        futures::pin_mut!(stream);
        let mut files = Vec::new();
        while let Some(entry) = stream.next().await {
            let entry = entry.map_err(|err| self.map_error(err, repo, revision))?;
            if let Some(file) = tree_file(entry)? {
                files.push(file);
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(RepoListing { commit, files })
    }

    /// The blob name (etag) and size of one file, from a HEAD request as
    /// huggingface_hub makes it: `X-Linked-Etag`/`X-Linked-Size` on the
    /// redirect of LFS files, `ETag`/`Content-Length` otherwise.
    pub async fn file_meta(
        &self,
        repo: &str,
        commit: &str,
        path: &str,
    ) -> Result<RemoteFile, HubError> {
        let url = self.resolve_url(repo, commit, path);
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let mut request = self.head_http.head(&url);
            if let Some(token) = &self.settings.token {
                request = request.bearer_auth(token);
            }
            match request.send().await {
                Ok(response) if !response.status().is_server_error() => break response,
                Ok(_) | Err(_) if attempt < self.settings.retries => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
                Ok(response) => {
                    return Err(HubError::Protocol(format!(
                        "HTTP {} for {path}",
                        response.status()
                    )))
                }
                Err(err) => {
                    return Err(HubError::Network {
                        endpoint: self.settings.endpoint.clone(),
                        message: err.to_string(),
                    })
                }
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(HubError::Unauthorized {
                repo: repo.to_string(),
                status: status.as_u16(),
                hint: "set HF_TOKEN or run `hf auth login`",
            });
        }
        if !(status.is_success() || status.is_redirection()) {
            return Err(HubError::Protocol(format!(
                "HTTP {status} for {path} in {repo}"
            )));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string())
        };
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .filter(|e| matches!(e.len(), 40 | 64) && e.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| HubError::Protocol(format!("no usable ETag for {path}")))?;
        let size = header("x-linked-size")
            .or_else(|| header("content-length"))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| HubError::Protocol(format!("no size for {path}")))?;
        Ok(RemoteFile {
            path: path.to_string(),
            size,
            lfs: etag.len() == 64,
            etag,
        })
    }

    /// The download URL of one file at one commit.
    pub fn resolve_url(&self, repo: &str, commit: &str, file: &str) -> String {
        let encoded: Vec<String> = file.split('/').map(percent_encode).collect();
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.settings.endpoint,
            encoded.join("/")
        )
    }

    fn map_error(&self, err: HFError, repo: &str, revision: &str) -> HubError {
        let repo = repo.to_string();
        match err {
            HFError::RepoNotFound { .. } => HubError::RepoNotFound { repo },
            HFError::RevisionNotFound { context, .. } => {
                let error_code = context.as_ref().and_then(|c| c.error_code.as_deref());
                if error_code == Some("RepoNotFound") {
                    HubError::RepoNotFound { repo }
                } else {
                    HubError::RevisionNotFound {
                        repo,
                        revision: revision.to_string(),
                    }
                }
            }
            HFError::AuthRequired { context } | HFError::Forbidden { context } => {
                if context.error_code.as_deref() == Some("RepoNotFound") {
                    return HubError::RepoNotFound { repo };
                }
                let hint = if self.settings.token.is_some() {
                    "the token set does not grant access; accept the repo's terms on the Hub"
                } else {
                    "set HF_TOKEN or run `hf auth login`"
                };
                HubError::Unauthorized {
                    repo,
                    status: context.status.as_u16(),
                    hint,
                }
            }
            HFError::Request { source, .. } => HubError::Network {
                endpoint: self.settings.endpoint.clone(),
                message: source.to_string(),
            },
            other => HubError::Protocol(other.to_string()),
        }
    }
}

fn tree_file(entry: RepoTreeEntry) -> Result<Option<TreeFile>, HubError> {
    let RepoTreeEntry::File { size, path, .. } = entry else {
        return Ok(None);
    };
    if !safe_repo_path(&path) {
        return Err(HubError::Protocol(format!(
            "unsafe file path in listing: {path:?}"
        )));
    }
    Ok(Some(TreeFile { path, size }))
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters pass).
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
