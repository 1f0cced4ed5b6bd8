//! Model registrations: `models.register`, `list`, `get`, `remove`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::*;

/// Which cache root a model's files go to when they are downloaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum CacheLocation {
    #[default]
    Primary,
    Secondary,
    Custom(PathBuf),
}

impl fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheLocation::Primary => f.write_str("primary"),
            CacheLocation::Secondary => f.write_str("secondary"),
            CacheLocation::Custom(path) => write!(f, "custom:{}", path.display()),
        }
    }
}

impl FromStr for CacheLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(CacheLocation::Primary),
            "secondary" => Ok(CacheLocation::Secondary),
            other => match other.strip_prefix("custom:") {
                Some(path) if !path.is_empty() => Ok(CacheLocation::Custom(PathBuf::from(path))),
                _ => Err(format!(
                    "cache must be 'primary', 'secondary' or 'custom:/absolute/path', got {other:?}"
                )),
            },
        }
    }
}

impl From<CacheLocation> for String {
    fn from(value: CacheLocation) -> Self {
        value.to_string()
    }
}

impl TryFrom<String> for CacheLocation {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// `models.register` parameters. Everything but `name` and one of
/// `repo`/`local_path` has a default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    pub name: String,
    /// Hugging Face repo id, `org/name` or `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Branch, tag or commit; `main` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Glob patterns of the repo files the model needs; a sensible set for
    /// safetensors models when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
    /// A local file or directory that holds the model; tried before any cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheLocation>,
    /// Expected size of the files in bytes, used before the real sizes are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_size: Option<u64>,
    /// Overwrite an existing registration of the same name.
    #[serde(default)]
    pub replace: bool,
    /// Run the model on this runner (`diffusers`, or one of modeld.toml's
    /// `[runners.NAME]`) instead of natively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
}

/// A registered model as stored and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub repo: Option<String>,
    pub revision: String,
    pub files: Vec<String>,
    pub local_path: Option<PathBuf>,
    pub cache: CacheLocation,
    pub estimated_size: Option<u64>,
    /// The runner the model runs on, when registered with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    pub updated_at: u64,
}

/// Parameters of the methods that address one model by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    pub model: ModelRecord,
    /// True when an earlier registration of the same name was overwritten.
    pub replaced: bool,
    /// `estimated_size` against the free space of the cache root a pull
    /// would fill; `None` without a size or a repo.
    #[serde(default)]
    pub space: Option<SpaceCheck>,
}

/// `models.remove` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    pub name: String,
    /// Also delete the model's files from the caches (never a `local_path`).
    #[serde(default)]
    pub purge: bool,
    /// With `purge`: carry the plan out; without it nothing changes.
    #[serde(default)]
    pub apply: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The registration removed; `None` after a purge dry run, which
    /// changes nothing.
    pub removed: Option<ModelRecord>,
    /// With `purge`: the cache files deleted, or that would be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<CachePlan>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_location_round_trips() {
        for text in ["primary", "secondary", "custom:/data/hf"] {
            let parsed: CacheLocation = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        assert!("custom:".parse::<CacheLocation>().is_err());
        assert!("tertiary".parse::<CacheLocation>().is_err());
    }

    #[test]
    fn register_params_reject_unknown_fields() {
        let err = serde_json::from_str::<RegisterParams>(r#"{"name":"a","repo_id":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("repo_id"), "{err}");
    }
}
