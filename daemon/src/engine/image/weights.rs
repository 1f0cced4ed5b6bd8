//! Weight files of a diffusers component folder, read into named tensors
//! on the CPU, where LoRAs are merged before the networks are built; and
//! the builder that keeps what the networks took, for a later rebuild.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

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

/// The tensor names in safetensors file `path`, from its header.
pub fn tensor_names(path: &Path) -> Result<Vec<String>, ImageError> {
    let header = crate::engine::estimate::safetensors_header(path)
        .map_err(|e| ImageError::Files(e.to_string()))?;
    Ok(header.into_keys().filter(|k| k != "__metadata__").collect())
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

/// A `VarBuilder` backend over a tensor map that keeps every tensor the
/// networks took, at the device and dtype they took it. What it keeps is
/// exactly what the networks hold (the same storage), so a pipeline can
/// be built again from it, with some tensors replaced, without reading or
/// converting the rest.
struct Recording {
    source: TensorMap,
    taken: Arc<Mutex<TensorMap>>,
}

impl Recording {
    fn keep(&self, name: &str, tensor: &Tensor) {
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), tensor.clone());
    }
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get(&self.source, shape, name, init, dtype, device)?;
        self.keep(name, &tensor);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = SimpleBackend::get_unchecked(&self.source, name, dtype, device)?;
        self.keep(name, &tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_key(name)
    }
}

/// What the networks built through a `recording` builder took.
pub struct Taken(Arc<Mutex<TensorMap>>);

impl Taken {
    pub fn into_map(self) -> TensorMap {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A builder of networks from `source` at `dtype` on `device`, and what
/// they took from it.
pub fn recording(source: TensorMap, dtype: DType, device: &Device) -> (VarBuilder<'static>, Taken) {
    let taken = Arc::new(Mutex::new(TensorMap::new()));
    let backend = Recording {
        source,
        taken: taken.clone(),
    };
    let builder = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    (builder, Taken(taken))
}
