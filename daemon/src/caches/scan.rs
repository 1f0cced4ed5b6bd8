//! `cache.scan`: repos, revisions, refs and sizes of every root, with
//! huggingface_hub's own accounting (hf-hub's scanner), plus which models
//! are registered, what kind of model each repo holds, and which of its
//! files changed since a pull or `pull --verify` hashed them (stamps only:
//! the scan reads no file's bytes).

use std::path::{Path, PathBuf};

use hf_hub::HFClient;
use modeld_wire::types::{CacheRootScan, CacheScanReply, CachedRepo, CachedRevision, ModelRecord};
use serde_json::Value;

use super::{epoch_secs, families, Root};
use crate::fingerprint::{files_under, Fingerprints};

pub async fn scan(
    roots: &[Root],
    models: &[ModelRecord],
    fingerprints: &Fingerprints,
) -> CacheScanReply {
    let mut scanned = Vec::with_capacity(roots.len());
    for root in roots {
        let scan = if root.is_hf_cache() {
            scan_hf_cache(root, models, fingerprints).await
        } else {
            let (root, models) = (root.clone(), models.to_vec());
            let fingerprints = fingerprints.clone();
            tokio::task::spawn_blocking(move || scan_folder(&root, &models, &fingerprints))
                .await
                .unwrap_or_else(|e| {
                    empty(
                        &Root {
                            path: Default::default(),
                            role: "model_root",
                        },
                        vec![e.to_string()],
                    )
                })
        };
        scanned.push(scan);
    }
    let total_bytes = scanned.iter().map(|r| r.size_bytes).sum();
    CacheScanReply {
        roots: scanned,
        total_bytes,
    }
}

fn empty(root: &Root, warnings: Vec<String>) -> CacheRootScan {
    CacheRootScan {
        path: root.path.clone(),
        role: root.role.to_string(),
        exists: root.path.is_dir(),
        size_bytes: 0,
        repos: Vec::new(),
        warnings,
    }
}

/// Snapshot files whose blobs changed since they were checked.
fn changed_snapshot_files(
    revisions: &[hf_hub::cache::CachedRevisionInfo],
    fingerprints: &Fingerprints,
) -> Vec<PathBuf> {
    revisions
        .iter()
        .flat_map(|revision| &revision.files)
        .filter(|file| fingerprints.check(&file.blob_path).is_change())
        .map(|file| file.file_path.clone())
        .collect()
}

/// Files under `path` that changed since they were checked.
fn changed_files_under(path: &Path, fingerprints: &Fingerprints) -> Vec<PathBuf> {
    files_under(path)
        .into_iter()
        .filter(|file| fingerprints.check(file).is_change())
        .collect()
}

async fn scan_hf_cache(
    root: &Root,
    models: &[ModelRecord],
    fingerprints: &Fingerprints,
) -> CacheRootScan {
    let client = match HFClient::builder().cache_dir(root.path.clone()).build() {
        Ok(client) => client,
        Err(err) => return empty(root, vec![err.to_string()]),
    };
    let info = match client.scan_cache().send().await {
        Ok(info) => info,
        Err(err) => return empty(root, vec![err.to_string()]),
    };
    let repos = info
        .repos
        .into_iter()
        .map(|repo| {
            let newest = repo.revisions.iter().max_by_key(|r| r.last_modified);
            let (family, architecture) = match newest {
                Some(revision) => classify(&revision.snapshot_path, &repo.repo_id),
                None => ("unknown".to_string(), None),
            };
            let registered_as = models
                .iter()
                .filter(|m| m.repo.as_deref() == Some(repo.repo_id.as_str()))
                .map(|m| m.name.clone())
                .collect();
            CachedRepo {
                changed_files: changed_snapshot_files(&repo.revisions, fingerprints),
                registered_as,
                family,
                architecture,
                repo_type: repo.repo_type.to_string(),
                path: repo.repo_path.clone(),
                size_bytes: repo.size_on_disk,
                files: repo.nb_files,
                last_accessed: epoch_secs(repo.last_accessed),
                last_modified: epoch_secs(repo.last_modified),
                revisions: repo
                    .revisions
                    .into_iter()
                    .map(|r| CachedRevision {
                        files: r.files.len(),
                        commit: r.commit_hash,
                        refs: r.refs,
                        size_bytes: r.size_on_disk,
                        snapshot_path: r.snapshot_path,
                    })
                    .collect(),
                repo_id: repo.repo_id,
            }
        })
        .collect();
    CacheRootScan {
        path: root.path.clone(),
        role: root.role.to_string(),
        exists: root.path.is_dir(),
        size_bytes: info.size_on_disk,
        repos,
        warnings: info.warnings,
    }
}

/// The folders of a ComfyUI `models/` tree, which hold loose files of
/// one component kind each rather than one model per folder.
const COMFYUI_FOLDERS: [&str; 10] = [
    "checkpoints",
    "diffusion_models",
    "unet",
    "vae",
    "loras",
    "text_encoders",
    "clip",
    "clip_vision",
    "controlnet",
    "upscale_models",
];

/// A folder that is not a Hugging Face cache: a model root, or a
/// registered `local_path` (one model, listed as one entry).
fn scan_folder(root: &Root, models: &[ModelRecord], fingerprints: &Fingerprints) -> CacheRootScan {
    match root.role {
        "local" => scan_local(root, models, fingerprints),
        _ => scan_model_root(root, fingerprints),
    }
}

/// A registered `local_path` outside the other roots: one entry, the
/// models registered with it.
fn scan_local(root: &Root, models: &[ModelRecord], fingerprints: &Fingerprints) -> CacheRootScan {
    let mut scan = empty(root, Vec::new());
    scan.exists = root.path.exists();
    let stats = tree_stats(&root.path);
    if stats.1 == 0 {
        return scan;
    }
    let name = root.path.file_name().unwrap_or_default();
    let name = name.to_string_lossy().into_owned();
    let kind = classify(&root.path, &name);
    let found = Found {
        name,
        kind: "local",
        changed_files: changed_files_under(&root.path, fingerprints),
        registered_as: models
            .iter()
            .filter(|m| m.local_path.as_deref() == Some(root.path.as_path()))
            .map(|m| m.name.clone())
            .collect(),
        path: root.path.clone(),
        stats,
    };
    add_found(&mut scan, found, kind);
    scan
}

/// A model root holds one model per directory (or single `.gguf` files);
/// a ComfyUI tree's component folders are listed file by file instead.
fn scan_model_root(root: &Root, fingerprints: &Fingerprints) -> CacheRootScan {
    let mut scan = empty(root, Vec::new());
    let Ok(entries) = std::fs::read_dir(&root.path) else {
        return scan;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if COMFYUI_FOLDERS.contains(&name.as_str()) && path.is_dir() {
            list_loose_files(root, &path, fingerprints, &mut scan);
            continue;
        }
        let (size, files, accessed, modified) = tree_stats(&path);
        if files == 0 {
            continue;
        }
        let kind = classify(&path, &name);
        let found = Found {
            name,
            kind: "local",
            changed_files: changed_files_under(&path, fingerprints),
            registered_as: Vec::new(),
            path,
            stats: (size, files, accessed, modified),
        };
        add_found(&mut scan, found, kind);
    }
    scan.repos.sort_by(|a, b| a.repo_id.cmp(&b.repo_id));
    scan
}

/// Every weight file under a ComfyUI component folder, as its own entry
/// named by its path in the tree, with the family its tensor names say.
fn list_loose_files(
    root: &Root,
    dir: &Path,
    fingerprints: &Fingerprints,
    scan: &mut CacheRootScan,
) {
    let mut files = Vec::new();
    weight_files_under(dir, &mut files);
    for path in files {
        let stats = tree_stats(&path);
        let relative = path.strip_prefix(&root.path).unwrap_or(&path);
        let name = relative.to_string_lossy().into_owned();
        let kind = match header_names(root, &path) {
            Ok(names) => {
                let (family, arch) = families::of_tensors(&names);
                (family.to_string(), arch.map(str::to_string))
            }
            Err(why) => {
                scan.warnings.push(format!("{}: {why}", path.display()));
                ("unknown".to_string(), None)
            }
        };
        let found = Found {
            name,
            kind: "file",
            changed_files: changed_files_under(&path, fingerprints),
            registered_as: Vec::new(),
            path,
            stats,
        };
        add_found(scan, found, kind);
    }
}

/// One model or file of a model root and its `tree_stats`.
struct Found {
    name: String,
    kind: &'static str,
    path: PathBuf,
    stats: (u64, usize, u64, u64),
    changed_files: Vec<PathBuf>,
    registered_as: Vec<String>,
}

/// Adds `found`, of `(family, architecture)`, to the root's listing.
fn add_found(
    scan: &mut CacheRootScan,
    found: Found,
    (family, architecture): (String, Option<String>),
) {
    let (size, files, accessed, modified) = found.stats;
    scan.size_bytes += size;
    scan.repos.push(CachedRepo {
        repo_id: found.name,
        repo_type: found.kind.into(),
        path: found.path,
        size_bytes: size,
        files,
        last_accessed: accessed,
        last_modified: modified,
        revisions: Vec::new(),
        registered_as: found.registered_as,
        family,
        architecture,
        changed_files: found.changed_files,
    });
}

/// `.safetensors` files under `dir`, at any depth; links are not followed
/// into folders.
fn weight_files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            weight_files_under(&path, out);
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            out.push(path);
        }
    }
}

/// The tensor names of a file whose real path stays inside the root: a
/// link leading elsewhere is not read for a client.
fn header_names(root: &Root, path: &Path) -> Result<Vec<String>, String> {
    let real = path.canonicalize().map_err(|e| e.to_string())?;
    let real_root = root.path.canonicalize().map_err(|e| e.to_string())?;
    if !real.starts_with(&real_root) {
        return Err("links outside the model root; not read".into());
    }
    crate::engine::image::weights::tensor_names(&real).map_err(|e| e.to_string())
}

/// Total size, file count, and newest access and change times under `path`.
fn tree_stats(path: &Path) -> (u64, usize, u64, u64) {
    let Ok(meta) = std::fs::metadata(path) else {
        return (0, 0, 0, 0);
    };
    if meta.is_file() {
        let time = |t: std::io::Result<std::time::SystemTime>| t.map_or(0, epoch_secs);
        return (meta.len(), 1, time(meta.accessed()), time(meta.modified()));
    }
    let mut total = (0, 0, 0, 0);
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let (size, files, accessed, modified) = tree_stats(&entry.path());
        total = (
            total.0 + size,
            total.1 + files,
            total.2.max(accessed),
            total.3.max(modified),
        );
    }
    total
}

/// Guesses what a model is from its config files, file names and name.
pub fn classify(dir: &Path, name: &str) -> (String, Option<String>) {
    let read = |file: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(file)).ok()?).ok()
    };
    let lower = name.to_ascii_lowercase();
    if dir.join("adapter_config.json").exists() || lower.contains("lora") {
        return ("lora".into(), None);
    }
    if let Some(index) = read("model_index.json") {
        let class = index["_class_name"].as_str().map(str::to_string);
        return ("diffusion".into(), class);
    }
    if let Some(config) = read("config.json") {
        let class = config["_class_name"].as_str().unwrap_or_default();
        if class.starts_with("Autoencoder") {
            return ("vae".into(), Some(class.to_string()));
        }
        let arch = config["architectures"][0].as_str().map(str::to_string);
        let family = match arch.as_deref() {
            Some(a) if a.ends_with("ForCausalLM") || a.ends_with("LMHeadModel") => "llm",
            Some(a) if a.ends_with("Model") || a.contains("Embedding") => "embedding",
            _ if config["model_type"].is_string() => "llm",
            _ => "unknown",
        };
        return (
            family.into(),
            arch.or_else(|| config["model_type"].as_str().map(str::to_string)),
        );
    }
    let has_ext = |ext: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == ext))
    };
    if has_ext("gguf") || dir.extension().is_some_and(|x| x == "gguf") {
        return ("llm".into(), None);
    }
    if ["stable-diffusion", "sdxl", "flux"]
        .iter()
        .any(|hint| lower.contains(hint))
    {
        return ("diffusion".into(), None);
    }
    if lower.contains("vae") {
        return ("vae".into(), None);
    }
    ("unknown".into(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_config_and_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"]}"#,
        )
        .unwrap();
        assert_eq!(
            classify(dir.path(), "x"),
            ("llm".into(), Some("LlamaForCausalLM".into()))
        );
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"_class_name":"AutoencoderKL"}"#,
        )
        .unwrap();
        assert_eq!(classify(dir.path(), "x").0, "vae");
        std::fs::write(
            dir.path().join("model_index.json"),
            r#"{"_class_name":"StableDiffusionPipeline"}"#,
        )
        .unwrap();
        assert_eq!(classify(dir.path(), "x").0, "diffusion");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(classify(empty.path(), "my-lora-style").0, "lora");
        assert_eq!(
            classify(empty.path(), "stabilityai/sdxl-turbo").0,
            "diffusion"
        );
        assert_eq!(classify(empty.path(), "mystery").0, "unknown");
    }
}
