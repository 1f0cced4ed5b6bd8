//! LoRA adapters (PEFT layout), merged into the base weights at load:
//! `W += strength × (alpha / r) × B·A` for every adapted weight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use modeld_wire::types::LoraInfo;

use super::EngineError;

/// The adapter's weights file and its `adapter_config.json`, given the
/// adapter directory or its `.safetensors` file.
fn adapter_files(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (
            path.join("adapter_model.safetensors"),
            path.join("adapter_config.json"),
        )
    } else {
        let dir = path.parent().unwrap_or(Path::new("/"));
        (path.to_path_buf(), dir.join("adapter_config.json"))
    }
}

/// `lora_alpha / r` from the adapter config; 1 when there is none.
fn scale(config: &Path) -> Result<f64, EngineError> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(1.0);
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Files(format!("{}: {e}", config.display())))?;
    let r = value["r"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(value["lora_alpha"].as_f64().unwrap_or(r) / r)
}

/// Merges `lora` into `tensors` (the base model's weights, by name).
pub fn apply(tensors: &mut HashMap<String, Tensor>, lora: &LoraInfo) -> Result<(), EngineError> {
    let (weights, config) = adapter_files(&lora.path);
    let factor = scale(&config)? * lora.strength as f64;
    let adapter = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| EngineError::Files(format!("{}: {e}", weights.display())))?;
    let mut merged = 0;
    for (key, a) in &adapter {
        let Some(stem) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapter
            .get(&format!("{stem}.lora_B.weight"))
            .ok_or_else(|| {
                EngineError::Files(format!(
                    "{}: {stem} has lora_A but no lora_B",
                    weights.display()
                ))
            })?;
        let target = format!("{}.weight", stem.trim_start_matches("base_model.model."));
        let base = tensors.get(&target).ok_or_else(|| {
            EngineError::Files(format!(
                "adapter {:?} targets {target}, which the model lacks",
                lora.adapter_name
            ))
        })?;
        let delta = (b.matmul(a)? * factor)?.to_dtype(base.dtype())?;
        if delta.dims() != base.dims() {
            return Err(EngineError::Files(format!(
                "adapter {:?}: {stem} gives {:?}, but {target} is {:?}",
                lora.adapter_name,
                delta.dims(),
                base.dims()
            )));
        }
        let updated = (base + delta)?;
        tensors.insert(target, updated);
        merged += 1;
    }
    if merged == 0 {
        return Err(EngineError::Files(format!(
            "{}: no lora_A/lora_B weights found",
            weights.display()
        )));
    }
    tracing::info!(adapter = %lora.adapter_name, weights = merged, "LoRA merged");
    Ok(())
}
