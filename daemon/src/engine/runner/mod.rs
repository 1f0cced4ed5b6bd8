//! Runners: models candle does not run, served by a child process modeld
//! starts, feeds and stops (runners/PROTOCOL.md). The bundled diffusers
//! runner takes any diffusers pipeline modeld has no native family for;
//! an admin may configure runners of their own. Their models live in the
//! same registry, queue and memory budget as native ones.

pub mod memory;
pub mod params;
pub mod process;
pub mod video;
pub mod worker;

use std::path::{Path, PathBuf};

use crate::engine::image;

/// The protocol version modeld speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// The bundled runner, written where the daemon can run it.
pub const DIFFUSERS_RUNNER: &str = include_str!("../../../../runners/diffusers_runner.py");

/// The bundled runner's name.
pub const DIFFUSERS: &str = "diffusers";

/// Where in a runner's life it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerStage {
    Start,
    Load,
    Generate,
}

/// A runner that failed: what happened, and the last lines of its stderr.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "runner {runner:?} for model {model:?}{} {what}{}{}",
    class_note(class),
    key_note(key),
    stderr_note(stderr)
)]
pub struct RunnerFailure {
    pub runner: String,
    pub model: String,
    /// The pipeline class no native family runs, when that chose the runner.
    pub class: Option<String>,
    pub stage: RunnerStage,
    pub what: String,
    pub stderr: String,
    /// The config key behind a runner that could not start.
    pub key: Option<String>,
}

fn class_note(class: &Option<String>) -> String {
    class
        .as_ref()
        .map(|class| format!(" ({class}, which modeld does not run natively)"))
        .unwrap_or_default()
}

fn key_note(key: &Option<String>) -> String {
    key.as_ref()
        .map(|key| format!(" (check {key} in modeld.toml)"))
        .unwrap_or_default()
}

fn stderr_note(stderr: &str) -> String {
    match stderr.lines().last() {
        Some(last) => format!("; its stderr ends: {last}"),
        None => String::new(),
    }
}

/// Whether the model at `path` needs a runner: a diffusers pipeline (or a
/// single file whose `pipeline` folder is one) of a class modeld has no
/// native family for. Gives the pipeline's class.
pub fn pipeline_needing_runner(path: &Path, pipeline: Option<&Path>) -> Option<String> {
    let folder = match (path.is_dir(), pipeline) {
        (true, _) => path,
        // A single file a native family reads (SD, FLUX) stays native.
        (false, _) if image::Family::of(path).is_some() => return None,
        (false, Some(pipeline)) => pipeline,
        (false, None) => return None,
    };
    if image::runs_natively(folder) {
        return None;
    }
    pipeline_class(folder)
}

/// `model_index.json`'s `_class_name`.
pub fn pipeline_class(folder: &Path) -> Option<String> {
    let text = std::fs::read_to_string(folder.join("model_index.json")).ok()?;
    let index: serde_json::Value = serde_json::from_str(&text).ok()?;
    index["_class_name"].as_str().map(str::to_string)
}

/// What a runner's runtime takes before any weight: measured 0.8 GB of
/// resident memory for Python with torch and diffusers imported on the
/// CPU (tests/gpu/acceptance.py check 7); a GPU's CUDA context is of the
/// same order.
pub const RUNTIME_BYTES: u64 = 768 << 20;

/// Memory a runner model is expected to take: its weights at `dtype`,
/// from the safetensors headers of the pipeline's folders and the single
/// file (which replaces the pipeline's transformer), plus a tenth for the
/// runtime's buffers and the runtime itself.
pub fn estimate_bytes(
    pipeline: Option<&Path>,
    transformer: Option<&Path>,
    dtype_bytes: u64,
) -> u64 {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(folder) = pipeline {
        let skip_transformer = transformer.is_some();
        files.extend(weight_files(folder, skip_transformer));
    }
    files.extend(transformer.map(Path::to_path_buf));
    let weights: u64 = files
        .iter()
        .map(
            |file| match crate::engine::estimate::safetensors_elements(file) {
                Ok(elements) => elements * dtype_bytes,
                Err(_) => file_len(file),
            },
        )
        .sum();
    weights + weights / 10 + RUNTIME_BYTES
}

/// The weight files of a pipeline folder's components, one level down.
fn weight_files(folder: &Path, skip_transformer: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if !path.is_dir() || (skip_transformer && name == "transformer") {
            continue;
        }
        let Ok(inner) = std::fs::read_dir(&path) else {
            continue;
        };
        files.extend(
            inner
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors")),
        );
    }
    files
}

fn file_len(file: &Path) -> u64 {
    std::fs::metadata(file).map(|m| m.len()).unwrap_or(0)
}

/// The bundled runner's script under `dir`, written (again) when missing
/// or different; only the daemon's user may change it.
pub fn install_diffusers_runner(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join("diffusers_runner.py");
    if std::fs::read(&path).is_ok_and(|bytes| bytes == DIFFUSERS_RUNNER.as_bytes()) {
        return Ok(path);
    }
    let temporary = dir.join(".diffusers_runner.py.new");
    let _ = std::fs::remove_file(&temporary);
    std::fs::write(&temporary, DIFFUSERS_RUNNER)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temporary, &path)?;
    Ok(path)
}

/// A fresh, private scratch folder for `model`'s runner under `dir`.
pub fn scratch_dir(dir: &Path, model: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let safe: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(safe);
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::DirBuilder::new().mode(0o700).create(&path)?;
    Ok(path)
}
