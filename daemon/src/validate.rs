//! Validation of client input into `Valid*` types: once a value has one of
//! these types, every later layer may trust its names, paths and sizes.

use std::path::{Component, Path, PathBuf};

use modeld_wire::types::{CacheLocation, ModelRecord, RegisterParams};
use serde_json::{json, Value};

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_REPO_ID_LEN: usize = 96;
pub const MAX_REVISION_LEN: usize = 255;
pub const MAX_FILE_PATTERNS: usize = 64;
pub const MAX_PATTERN_LEN: usize = 256;
pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_ESTIMATED_SIZE: u64 = 1 << 50;

/// Files a model needs when the registration names none: weights, configs
/// and tokenizers of a safetensors model (`merges.txt` beside `vocab.json`
/// is how most diffusers pipelines ship their CLIP tokenizer).
pub const DEFAULT_FILE_PATTERNS: [&str; 4] =
    ["*.json", "*.safetensors", "tokenizer.model", "*merges.txt"];

/// A rejected value: which field, why, and the limit it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
    pub limit: Option<Value>,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            message: message.into(),
            limit: None,
        }
    }

    pub fn with_limit(mut self, limit: Value) -> Self {
        self.limit = Some(limit);
        self
    }
}

/// A registration whose every field has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidModel {
    pub name: String,
    pub repo: Option<String>,
    pub revision: String,
    pub files: Vec<String>,
    pub local_path: Option<PathBuf>,
    pub cache: CacheLocation,
    pub estimated_size: Option<u64>,
    pub replace: bool,
    pub runner: Option<String>,
}

impl TryFrom<RegisterParams> for ValidModel {
    type Error = ValidationError;

    fn try_from(params: RegisterParams) -> Result<Self, Self::Error> {
        let name = valid_name(&params.name)?;
        if let Some(repo) = &params.repo {
            valid_repo_id(repo)?;
        }
        let revision = params.revision.unwrap_or_else(|| "main".to_string());
        valid_revision(&revision)?;
        let files = match params.files {
            Some(files) => valid_patterns(files)?,
            None => DEFAULT_FILE_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        if let Some(path) = &params.local_path {
            valid_absolute_path("local_path", path)?;
        }
        if params.repo.is_none() && params.local_path.is_none() {
            return Err(ValidationError::new(
                "repo",
                "a model needs a Hugging Face repo id, a local_path, or both",
            ));
        }
        let cache = params.cache.unwrap_or_default();
        if let CacheLocation::Custom(path) = &cache {
            valid_cache_root("cache", path)?;
        }
        if let Some(size) = params.estimated_size {
            if size > MAX_ESTIMATED_SIZE {
                return Err(ValidationError::new(
                    "estimated_size",
                    format!("{size} bytes is larger than the limit of {MAX_ESTIMATED_SIZE}"),
                )
                .with_limit(json!(MAX_ESTIMATED_SIZE)));
            }
        }
        Ok(ValidModel {
            name,
            repo: params.repo,
            revision,
            files,
            local_path: params.local_path,
            cache,
            estimated_size: params.estimated_size,
            replace: params.replace,
            runner: params
                .runner
                .map(|runner| {
                    valid_name(&runner).map_err(|mut e| {
                        e.field = "runner".into();
                        e
                    })
                })
                .transpose()?,
        })
    }
}

impl ValidModel {
    /// The record stored for this registration.
    pub fn record(&self, registered_at: u64, updated_at: u64) -> ModelRecord {
        ModelRecord {
            name: self.name.clone(),
            repo: self.repo.clone(),
            revision: self.revision.clone(),
            files: self.files.clone(),
            local_path: self.local_path.clone(),
            cache: self.cache.clone(),
            estimated_size: self.estimated_size,
            runner: self.runner.clone(),
            registered_at,
            updated_at,
        }
    }
}

fn too_long(field: &str, len: usize, limit: usize) -> ValidationError {
    ValidationError::new(
        field,
        format!("is {len} characters long; the limit is {limit}"),
    )
    .with_limit(json!(limit))
}

/// Model names: 1 to 64 of `A-Z a-z 0-9 . _ - :`, starting with a letter or
/// digit, so they are safe in paths, URLs and shell commands.
pub fn valid_name(name: &str) -> Result<String, ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::new("name", "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(too_long("name", name.len(), MAX_NAME_LEN));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if !first_ok || !chars_ok || name.contains("..") {
        return Err(ValidationError::new(
            "name",
            format!("{name:?} may only hold letters, digits and . _ - : and must start with a letter or digit"),
        ));
    }
    Ok(name.to_string())
}

/// Hugging Face repo ids: `name` or `namespace/name`, each part of
/// `A-Z a-z 0-9 . _ -`, no `--` or `..`, not starting or ending with `-` or `.`.
pub fn valid_repo_id(repo: &str) -> Result<(), ValidationError> {
    if repo.len() > MAX_REPO_ID_LEN {
        return Err(too_long("repo", repo.len(), MAX_REPO_ID_LEN));
    }
    let parts: Vec<&str> = repo.split('/').collect();
    let part_ok = |part: &&str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
            && !part.contains("--")
            && !part.contains("..")
    };
    if parts.len() > 2 || !parts.iter().all(part_ok) || repo.ends_with(".git") {
        return Err(ValidationError::new(
            "repo",
            format!("{repo:?} is not a Hugging Face repo id (expected 'org/name' or 'name')"),
        ));
    }
    Ok(())
}

/// Revisions name a branch, tag or commit; they become file names under
/// `refs/`, so anything that could leave that directory is refused.
pub fn valid_revision(revision: &str) -> Result<(), ValidationError> {
    if revision.is_empty() {
        return Err(ValidationError::new("revision", "must not be empty"));
    }
    if revision.len() > MAX_REVISION_LEN {
        return Err(too_long("revision", revision.len(), MAX_REVISION_LEN));
    }
    let bad_char = revision.chars().any(|c| {
        c.is_control() || c.is_whitespace() || matches!(c, '\\' | '~' | '^' | ':' | '?' | '*' | '[')
    });
    if bad_char
        || revision.starts_with('/')
        || revision.ends_with('/')
        || revision.contains("//")
        || revision.split('/').any(|part| part == "." || part == "..")
    {
        return Err(ValidationError::new(
            "revision",
            format!("{revision:?} is not a valid branch, tag or commit name"),
        ));
    }
    Ok(())
}

fn valid_patterns(files: Vec<String>) -> Result<Vec<String>, ValidationError> {
    if files.is_empty() {
        return Err(ValidationError::new(
            "files",
            "must list at least one pattern",
        ));
    }
    if files.len() > MAX_FILE_PATTERNS {
        return Err(ValidationError::new(
            "files",
            format!(
                "has {} patterns; the limit is {MAX_FILE_PATTERNS}",
                files.len()
            ),
        )
        .with_limit(json!(MAX_FILE_PATTERNS)));
    }
    for (index, pattern) in files.iter().enumerate() {
        let field = format!("files[{index}]");
        if pattern.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(too_long(&field, pattern.len(), MAX_PATTERN_LEN));
        }
        if pattern.starts_with('/') || pattern.split('/').any(|part| part == "..") {
            return Err(ValidationError::new(
                field,
                format!("{pattern:?} must be relative to the repo and must not contain '..'"),
            ));
        }
        globset::Glob::new(pattern)
            .map_err(|err| ValidationError::new(field, format!("bad glob {pattern:?}: {err}")))?;
    }
    Ok(files)
}

/// An absolute path without `..`, so what it names cannot shift under
/// symlinked working directories or escape a root by traversal.
pub fn valid_absolute_path(field: &str, path: &Path) -> Result<(), ValidationError> {
    let len = path.as_os_str().len();
    if len > MAX_PATH_LEN {
        return Err(too_long(field, len, MAX_PATH_LEN));
    }
    if !path.is_absolute() {
        return Err(ValidationError::new(
            field,
            format!("{} must be an absolute path", path.display()),
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(ValidationError::new(
            field,
            format!("{} must not contain '..'", path.display()),
        ));
    }
    Ok(())
}

/// System trees that are never cache roots: the daemon would scan,
/// link and delete in them.
const SYSTEM_TREES: [&str; 14] = [
    "/proc", "/sys", "/dev", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
    "/libx32", "/usr", "/run", "/var/lib",
];

/// A folder the daemon may treat as a cache root: absolute, at least two
/// levels deep, and outside the system trees, both as written and after
/// resolving symlinks (when it exists).
pub fn valid_cache_root(field: &str, path: &Path) -> Result<(), ValidationError> {
    valid_absolute_path(field, path)?;
    let refuse = |shown: &Path| {
        ValidationError::new(
            field,
            format!(
                "{} is a system folder or a top-level folder; a cache root must be a dedicated folder such as /srv/models/hub",
                shown.display()
            ),
        )
        .with_limit(json!(SYSTEM_TREES))
    };
    let is_system = |p: &Path| {
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count()
            < 2
            || SYSTEM_TREES.iter().any(|tree| p.starts_with(tree))
    };
    if is_system(path) {
        return Err(refuse(path));
    }
    if let Ok(real) = path.canonicalize() {
        if is_system(&real) {
            return Err(refuse(&real));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_folders_are_no_cache_roots() {
        for bad in [
            "/",
            "/proc",
            "/proc/self",
            "/etc/x",
            "/home",
            "/usr/share/hub",
        ] {
            assert!(valid_cache_root("cache", Path::new(bad)).is_err(), "{bad}");
        }
        valid_cache_root("cache", Path::new("/srv/models/hub")).unwrap();
        valid_cache_root("cache", Path::new("/home/me/hub")).unwrap();
    }

    fn params(name: &str, repo: &str) -> RegisterParams {
        RegisterParams {
            name: name.into(),
            repo: Some(repo.into()),
            ..Default::default()
        }
    }

    fn field_of(params: RegisterParams) -> String {
        ValidModel::try_from(params).unwrap_err().field
    }

    #[test]
    fn accepts_typical_models() {
        let model = ValidModel::try_from(params("llama3:8b", "meta-llama/Llama-3.1-8B")).unwrap();
        assert_eq!(model.revision, "main");
        assert_eq!(model.files.len(), DEFAULT_FILE_PATTERNS.len());
        assert_eq!(model.cache, CacheLocation::Primary);
        ValidModel::try_from(params("gpt2", "gpt2")).unwrap();
    }

    #[test]
    fn rejects_bad_names_and_repos() {
        for name in ["", ".hidden", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(field_of(params(name, "org/m")), "name", "{name:?}");
        }
        for repo in [
            "a/b/c",
            "org/../x",
            "/abs",
            "org/",
            "-org/m",
            "org/m.git",
            "a--b/c",
        ] {
            assert_eq!(field_of(params("m", repo)), "repo", "{repo:?}");
        }
    }

    #[test]
    fn rejects_traversal_in_revision_files_and_paths() {
        let mut p = params("m", "org/m");
        p.revision = Some("../../etc".into());
        assert_eq!(field_of(p), "revision");
        let mut p = params("m", "org/m");
        p.files = Some(vec!["ok.json".into(), "../secret".into()]);
        assert_eq!(field_of(p), "files[1]");
        let mut p = params("m", "org/m");
        p.local_path = Some("relative/dir".into());
        assert_eq!(field_of(p), "local_path");
        let mut p = params("m", "org/m");
        p.cache = Some(CacheLocation::Custom("/data/../etc".into()));
        assert_eq!(field_of(p), "cache");
    }

    #[test]
    fn requires_repo_or_local_path() {
        let p = RegisterParams {
            name: "m".into(),
            ..Default::default()
        };
        assert_eq!(field_of(p), "repo");
        let p = RegisterParams {
            name: "m".into(),
            local_path: Some("/models/m".into()),
            ..Default::default()
        };
        ValidModel::try_from(p).unwrap();
    }

    #[test]
    fn size_limit_is_reported() {
        let mut p = params("m", "org/m");
        p.estimated_size = Some(u64::MAX);
        let err = ValidModel::try_from(p).unwrap_err();
        assert_eq!(err.field, "estimated_size");
        assert_eq!(err.limit, Some(json!(MAX_ESTIMATED_SIZE)));
    }
}
