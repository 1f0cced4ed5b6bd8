//! The model registry: registered models kept in a sled tree, keyed by name,
//! each value the JSON of a [`ModelRecord`]. Every mutation is flushed to
//! disk before it returns, so an acknowledged change survives `kill -9`.
//! The same store holds the fingerprints of checked model files
//! (`fingerprint.rs`).

use std::path::{Path, PathBuf};

use modeld_wire::types::ModelRecord;

use crate::fingerprint::Fingerprints;
use crate::util::{make_private, unix_now};
use crate::validate::ValidModel;

const MODELS_TREE: &str = "models";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open the store in {}: {source}", path.display())]
    Open { path: PathBuf, source: sled::Error },
    #[error("store failure: {0}")]
    Storage(#[from] sled::Error),
    #[error("stored record for {name:?} is unreadable: {message}")]
    Corrupt { name: String, message: String },
    #[error("no model named {0:?} is registered")]
    NotFound(String),
    #[error("a model named {0:?} is already registered (pass replace to overwrite it)")]
    AlreadyExists(String),
}

pub struct Registry {
    db: sled::Db,
    models: sled::Tree,
    /// What model files were when last hashed, in the same store.
    fingerprints: Fingerprints,
}

impl Registry {
    /// Opens (or creates) the store under `dir/registry`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let path = dir.join("registry");
        let open_err = |source| RegistryError::Open {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&path)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(open_err)?;
        let models = db.open_tree(MODELS_TREE).map_err(open_err)?;
        let fingerprints = db.open_tree(crate::fingerprint::TREE).map_err(open_err)?;
        make_private(&path).map_err(|e| open_err(e.into()))?;
        Ok(Registry {
            db,
            models,
            fingerprints: Fingerprints::new(fingerprints),
        })
    }

    /// Stores `model`; returns the record and whether one was overwritten.
    pub async fn register(&self, model: ValidModel) -> Result<(ModelRecord, bool), RegistryError> {
        let key = model.name.as_bytes();
        // Compare-and-swap so two concurrent registrations of one name
        // cannot both believe they created it.
        loop {
            let previous = self.models.get(key)?;
            let old = previous
                .as_deref()
                .map(|bytes| decode(&model.name, bytes))
                .transpose()?;
            if old.is_some() && !model.replace {
                return Err(RegistryError::AlreadyExists(model.name));
            }
            let now = unix_now();
            let record = model.record(old.as_ref().map_or(now, |o| o.registered_at), now);
            let swapped = self
                .models
                .compare_and_swap(key, previous, Some(encode(&record)))?;
            if swapped.is_ok() {
                self.flush().await?;
                return Ok((record, old.is_some()));
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<ModelRecord, RegistryError> {
        match self.models.get(name.as_bytes())? {
            Some(bytes) => decode(name, &bytes),
            None => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// All models in name order. An unreadable record is an error rather
    /// than silently missing from the list.
    pub fn list(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        self.models
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    pub async fn remove(&self, name: &str) -> Result<ModelRecord, RegistryError> {
        let removed = self
            .models
            .remove(name.as_bytes())?
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        self.flush().await?;
        decode(name, &removed)
    }

    /// The records of what model files were when last hashed.
    pub fn fingerprints(&self) -> &Fingerprints {
        &self.fingerprints
    }

    pub fn count(&self) -> usize {
        self.models.len()
    }

    /// Makes every write so far durable. sled's own `flush_async` can stall
    /// under many concurrent callers, so the blocking flush runs on the
    /// blocking pool instead; concurrent flushes share sled's one fsync.
    pub async fn flush(&self) -> Result<(), RegistryError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|err| RegistryError::Storage(sled::Error::ReportableBug(err.to_string())))??;
        Ok(())
    }
}

fn encode(record: &ModelRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a ModelRecord always serializes")
}

fn decode(name: &str, bytes: &[u8]) -> Result<ModelRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|err| RegistryError::Corrupt {
        name: name.to_string(),
        message: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use modeld_wire::types::RegisterParams;

    fn model(name: &str, replace: bool) -> ValidModel {
        ValidModel::try_from(RegisterParams {
            name: name.into(),
            repo: Some("org/model".into()),
            replace,
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn register_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let (record, replaced) = registry.register(model("b", false)).await.unwrap();
        assert!(!replaced);
        registry.register(model("a", false)).await.unwrap();
        assert_eq!(registry.get("b").unwrap(), record);
        let names: Vec<_> = registry
            .list()
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            registry.register(model("a", false)).await,
            Err(RegistryError::AlreadyExists(_))
        ));
        let (_, replaced) = registry.register(model("a", true)).await.unwrap();
        assert!(replaced);
        registry.remove("a").await.unwrap();
        assert!(matches!(registry.get("a"), Err(RegistryError::NotFound(_))));
        assert!(matches!(
            registry.remove("a").await,
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = Registry::open(dir.path()).unwrap();
            registry.register(model("kept", false)).await.unwrap();
        }
        let registry = Registry::open(dir.path()).unwrap();
        assert_eq!(registry.get("kept").unwrap().name, "kept");
    }
}
