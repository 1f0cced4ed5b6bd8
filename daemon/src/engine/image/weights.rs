//! Weight files of a diffusers component folder, read into named tensors
//! on the CPU, where LoRAs are merged before the networks are built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::ImageError;

/// A component's tensors by name.
pub type TensorMap = HashMap<String, Tensor>;

/// The weight files of component folder `dir` whose files are named
/// `stem`: `<stem>.safetensors`, its `.fp16` variant, or the shards listed
/// in `<stem>.safetensors.index.json`.
pub fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, ImageError> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        return shard_files(&index);
    }
    Err(ImageError::Files(format!(
        "{}: no {stem}.safetensors (or .fp16 variant, or shard index); only safetensors weights are supported",
        dir.display()
    )))
}

/// The distinct shard files an index names, in the folder of the index.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let value: serde_json::Value = super::config::read_json(index)?;
    let map = value["weight_map"]
        .as_object()
        .ok_or_else(|| ImageError::Files(format!("{}: no weight_map", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|name| dir.join(name))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Every tensor of `files`, read onto the CPU in its stored dtype.
pub fn load_tensors(files: &[PathBuf]) -> Result<TensorMap, ImageError> {
    let bad = |e: candle_core::Error| {
        let names: Vec<_> = files.iter().map(|f| f.display().to_string()).collect();
        ImageError::Files(format!("{}: {e}", names.join(", ")))
    };
    // SAFETY: the files are model weights the daemon does not modify while
    // they are mapped; the tensors are copied out before the map is dropped.
    let mapped = unsafe { MmapedSafetensors::multi(files) }.map_err(bad)?;
    let mut tensors = TensorMap::new();
    for (name, _) in mapped.tensors() {
        let tensor = mapped.load(&name, &Device::Cpu).map_err(bad)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}
