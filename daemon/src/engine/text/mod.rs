//! Text models: architectures and weights (`model`), the thread that owns a
//! loaded model and runs generation jobs (`worker`), sampling and request
//! validation (`sampling`), chat templates (`chat`) and LoRA merging
//! (`lora`). Residency, devices and memory live in the parent `engine`.

pub mod chat;
pub mod lora;
pub mod model;
pub mod sampling;
pub(super) mod worker;

// The engine's error types, seen by the modules above as `super::...`.
use super::{cancel, BadFile, EngineError};
