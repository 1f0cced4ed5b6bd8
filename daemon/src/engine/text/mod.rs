//! Text models: configs and weight files (`model`), the batched decoder
//! (`decoder`, over `rope` tables and `linear` layers, whose CPU decode
//! products, threads and mapped weights are `cpu`) and how it is built from safetensors (`build`; each
//! family's arithmetic and layer kinds are read from its config in
//! `family`) or GGUF (`gguf`), the thread that owns a loaded model and runs
//! generation jobs in batches (`worker`), sampling and request validation
//! (`sampling`), chat templates (`chat`) and LoRA merging (`lora`).
//! Residency, devices and memory live in the parent `engine`.

pub mod build;
pub mod chat;
pub mod cpu;
pub mod decoder;
pub mod family;
pub mod gguf;
pub mod linear;
pub mod lora;
pub mod model;
pub mod rope;
pub mod sampling;
pub(super) mod worker;

#[cfg(test)]
mod tests;

// The engine's error types, seen by the modules above as `super::...`.
use super::{cancel, BadFile, EngineError};
