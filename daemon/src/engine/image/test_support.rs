//! Helpers the image families' reference tests share: CPU f32 loading,
//! reference cases, tensor comparison and injected noise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use modeld_wire::types::ImageStage;
use serde_json::Value;

use super::noise::StepNoise;
use super::ImageLoad;

/// The tolerance every reference comparison uses unless a case says why not.
pub(crate) const TOLERANCE: f32 = 1e-4;

/// `tests/fixtures/<name>` of the workspace.
pub(crate) fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A fixture's `expected.json`.
pub(crate) fn reference_json(fixture: &Path) -> Value {
    let text = std::fs::read_to_string(fixture.join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

/// A fixture's `expected.safetensors`.
pub(crate) fn reference_tensors(fixture: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture.join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors")
}

/// Loading on the CPU in f32, as the references were computed.
/// The progress a run of `steps` steps and `count` pictures reports, in
/// order: the prompt encoded, each step, each picture decoded.
pub(crate) fn stages(steps: usize, count: usize) -> Vec<(ImageStage, usize, usize)> {
    let denoise = (1..=steps).map(|step| (ImageStage::Denoise, step, steps));
    let decode = (1..=count).map(|picture| (ImageStage::Decode, picture, count));
    std::iter::once((ImageStage::Encode, 1, 1))
        .chain(denoise)
        .chain(decode)
        .collect()
}

pub(crate) fn cpu_f32() -> ImageLoad {
    ImageLoad {
        device: Device::Cpu,
        dtype: DType::F32,
        loras: Vec::new(),
    }
}

/// The reference case called `name` in an `expected.json`.
pub(crate) fn case<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The largest absolute difference between two tensors of one shape.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

pub(crate) fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let diff = max_abs_diff(ours, reference);
    assert!(
        diff <= TOLERANCE,
        "{what}: max abs difference {diff} > {TOLERANCE}"
    );
}

/// Noise injected into a run: the reference's draws, in order. Running
/// out is a test failure (a deterministic scheduler drew noise).
pub(crate) struct Injected(pub std::collections::VecDeque<Tensor>);

impl StepNoise for Injected {
    fn noise(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        let next = self
            .0
            .pop_front()
            .expect("the run drew more noise than the reference");
        assert_eq!(next.dims(), like.dims(), "noise shape");
        Ok(next)
    }
}

/// A run that must draw no noise.
pub(crate) fn no_noise() -> Injected {
    Injected(Default::default())
}
