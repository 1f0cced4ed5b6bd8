//! ComfyUI-style scaled fp8 single files (`*_fp8_scaled.safetensors`):
//! every linear weight stored in fp8 as `W / s`, with its per-tensor scale
//! `s` beside it (`.scale_weight`, or `.weight_scale`) and a `scaled_fp8`
//! marker. The files are built in a temporary folder from the fixture's
//! BFL file, so no binary is committed for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::tests::{expected, expected_json, fixture, load_single_file, run};
use crate::engine::image::test_support::{assert_close, case, cpu_f32, max_abs_diff};

/// fp8 e4m3's largest finite value; each weight's largest magnitude is
/// scaled onto it, as ComfyUI's scaled files do.
const FP8_MAX: f32 = 448.0;

/// The key spellings of a weight's scale.
const SPELLINGS: [&str; 2] = ["scale_weight", "weight_scale"];

/// A linear weight, stored `(W / s)` in fp8, and its scale `s`.
struct Quantized {
    stored: Tensor,
    scale: f32,
}

impl Quantized {
    fn new(weight: &Tensor) -> Self {
        let largest = weight
            .abs()
            .and_then(|w| w.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("largest weight");
        let scale = largest / FP8_MAX;
        let stored = (weight / f64::from(scale))
            .and_then(|w| w.to_dtype(DType::F8E4M3))
            .expect("fp8");
        Quantized { stored, scale }
    }

    /// The weight a pipeline applying the scale computes with.
    fn dequantized(&self) -> Tensor {
        (self.stored.to_dtype(DType::F32).expect("f32") * f64::from(self.scale)).expect("scaled")
    }
}

/// The fixture's BFL transformer with every 2-D weight quantized, and
/// the other tensors (biases, norms) as they are.
fn quantized_fixture() -> (HashMap<String, Quantized>, HashMap<String, Tensor>) {
    let file = fixture().join("single_file/tiny-flux-dev.safetensors");
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).expect("BFL file");
    let (weights, rest): (HashMap<_, _>, HashMap<_, _>) = tensors
        .into_iter()
        .partition(|(name, t)| name.ends_with(".weight") && t.rank() == 2);
    let weights = weights
        .into_iter()
        .map(|(name, w)| (name, Quantized::new(&w)))
        .collect();
    (weights, rest)
}

/// What a file holds for each weight: its tensors under their names.
type Entries = dyn Fn(&str, &Quantized) -> Vec<(String, Tensor)>;

fn write(dir: &Path, name: &str, entries: &Entries) -> PathBuf {
    let (weights, mut tensors) = quantized_fixture();
    for (key, weight) in &weights {
        tensors.extend(entries(key, weight));
    }
    let file = dir.join(name);
    candle_core::safetensors::save(&tensors, &file).expect("written");
    file
}

/// The scaled fp8 file, its scales under `spelling`.
fn scaled_file(dir: &Path, spelling: &'static str) -> PathBuf {
    let entries = move |key: &str, weight: &Quantized| {
        let module = key.strip_suffix(".weight").expect("a weight");
        let scale = Tensor::new(weight.scale, &Device::Cpu).expect("scale");
        vec![
            (key.to_owned(), weight.stored.clone()),
            (format!("{module}.{spelling}"), scale),
            ("scaled_fp8".to_owned(), marker()),
        ]
    };
    write(dir, &format!("{spelling}.safetensors"), &entries)
}

/// The scaled file with `img_in`'s scale given once per output row, as
/// per-channel quantizers write `weight_scale`.
fn per_row_scale_file(dir: &Path) -> PathBuf {
    let entries = |key: &str, weight: &Quantized| {
        let module = key.strip_suffix(".weight").expect("a weight");
        let rows = weight.stored.dim(0).expect("rows");
        let scale = Tensor::new(weight.scale, &Device::Cpu).expect("scale");
        let scale = match module {
            "img_in" => scale.broadcast_as((rows, 1)).expect("per row"),
            _ => scale,
        };
        let scale = (
            format!("{module}.weight_scale"),
            scale.contiguous().expect("contiguous"),
        );
        vec![(key.to_owned(), weight.stored.clone()), scale]
    };
    write(dir, "per_row.safetensors", &entries)
}

/// ComfyUI's `scaled_fp8` marker: an empty fp8 tensor.
fn marker() -> Tensor {
    Tensor::zeros(0, DType::F8E4M3, &Device::Cpu).expect("marker")
}

/// The same fp8 weights with their scales dropped, marker kept.
fn scales_dropped_file(dir: &Path) -> PathBuf {
    let entries = |key: &str, weight: &Quantized| {
        let marker = ("scaled_fp8".to_owned(), marker());
        vec![(key.to_owned(), weight.stored.clone()), marker]
    };
    write(dir, "dropped.safetensors", &entries)
}

/// The fp8 weights multiplied back by their scales, in f32, no scales.
fn dequantized_file(dir: &Path) -> PathBuf {
    let entries = |key: &str, weight: &Quantized| vec![(key.to_owned(), weight.dequantized())];
    write(dir, "dequantized.safetensors", &entries)
}

/// How far a run is from diffusers' f32 reference: the largest
/// difference over its step latents and over its picture, infinite where
/// it left the finite numbers.
#[derive(Debug)]
struct Distance {
    steps: f32,
    image: f32,
}

/// The largest difference of `ours` from `theirs`; infinite where `ours`
/// holds a NaN or an infinity, which `max` would pass over.
fn deviation(ours: &Tensor, theirs: &Tensor) -> f32 {
    let total = ours
        .abs()
        .and_then(|t| t.sum_all()?.to_scalar::<f32>())
        .expect("sum");
    if total.is_finite() {
        max_abs_diff(ours, theirs)
    } else {
        f32::INFINITY
    }
}

fn largest(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0.0, f32::max)
}

/// A run of `file` on case `dev` against diffusers' f32 reference.
fn distance_from_f32(file: &Path) -> Distance {
    let pipeline = load_single_file(file, &cpu_f32()).expect("loads");
    let (steps, image) = run(&pipeline, "dev");
    let reference = expected();
    let step_latents = &reference["dev.step_latents"];
    let steps = steps.iter().enumerate().map(|(i, ours)| {
        let theirs = step_latents.get(i).expect("step");
        deviation(ours, &theirs)
    });
    Distance {
        steps: largest(steps),
        image: deviation(&image, &reference["dev.image"]),
    }
}

/// What fp8 rounding does to this network by diffusers' own measure: its
/// `fp8` case (every weight cast to fp8, no scales) against its f32 `dev`
/// case, the same call.
fn fp8_rounding() -> Distance {
    let reference = expected();
    let json = expected_json();
    let count = case(&json, "fp8")["steps"].as_u64().expect("steps") as usize;
    let step = |name: &str, i: usize| reference[name].get(i).expect("step");
    let steps = (0..count)
        .map(|i| max_abs_diff(&step("fp8.step_latents", i), &step("dev.step_latents", i)));
    Distance {
        steps: largest(steps),
        image: max_abs_diff(&reference["fp8.image"], &reference["dev.image"]),
    }
}

#[test]
fn a_scaled_fp8_file_keeps_fp8_and_computes_with_its_scaled_weights() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dequantized = load_single_file(&dequantized_file(dir.path()), &cpu_f32()).expect("loads");
    let (plain_steps, plain_image) = run(&dequantized, "dev");
    for spelling in SPELLINGS {
        let file = scaled_file(dir.path(), spelling);
        let pipeline = load_single_file(&file, &cpu_f32()).expect("loads");
        let q = &pipeline.parts.transformer["transformer_blocks.0.attn.to_q.weight"];
        assert_eq!(q.dtype(), DType::F8E4M3, "{spelling}: kept as storage");
        let (steps, image) = run(&pipeline, "dev");
        assert_eq!(steps.len(), plain_steps.len());
        for (i, (ours, plain)) in steps.iter().zip(&plain_steps).enumerate() {
            assert_close(&format!("{spelling} step {i}"), ours, plain);
        }
        assert_close(&format!("{spelling} image"), &image, &plain_image);
    }
}

/// The scales' rounding is fp8's: a plain cast moved diffusers' picture
/// (0.128 in the latents, 0.020 in the picture), a per-tensor scale moves
/// ours about as far (measured 0.086 and 0.016), so half as much again
/// bounds it. Without the scales the weights are 448 / max|W| (over a
/// thousand) times too large and the run ends in overflow.
#[test]
fn a_scaled_fp8_file_is_within_fp8_rounding_of_f32_and_far_off_without_its_scales() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rounding = fp8_rounding();
    for spelling in SPELLINGS {
        let scaled = distance_from_f32(&scaled_file(dir.path(), spelling));
        assert!(
            scaled.steps <= 1.5 * rounding.steps && scaled.image <= 1.5 * rounding.image,
            "{spelling}: {scaled:?} against fp8's {rounding:?}"
        );
    }
    let dropped = distance_from_f32(&scales_dropped_file(dir.path()));
    assert!(
        dropped.steps > 10.0 * rounding.steps,
        "without scales: {dropped:?}"
    );
}

#[test]
fn a_scale_per_row_is_refused_rather_than_read_as_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let refused = load_single_file(&per_row_scale_file(dir.path()), &cpu_f32());
    let message = refused.err().expect("refused").to_string();
    assert!(
        message.contains("x_embedder.weight_scale") && message.contains("per-tensor"),
        "{message}"
    );
}

/// A LoRA changes the weight `W`, not the stored `W / s`: merged into a
/// scaled file it must act as on the same weights in f32.
#[test]
fn a_lora_on_a_scaled_fp8_file_acts_on_the_scaled_weights() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strength = expected_json()["lora"]["scale"].as_f64().expect("scale") as f32;
    let with_lora = super::tests::with_lora(strength);
    let dequantized = dequantized_file(dir.path());
    let plain = load_single_file(&dequantized, &with_lora).expect("loads");
    let (plain_steps, plain_image) = run(&plain, "dev");
    let unadapted = load_single_file(&dequantized, &cpu_f32()).expect("loads");
    let (_, unadapted_image) = run(&unadapted, "dev");
    let effect = max_abs_diff(&plain_image, &unadapted_image);
    assert!(effect > 1e-3, "the LoRA changes the picture ({effect})");
    for spelling in SPELLINGS {
        let scaled =
            load_single_file(&scaled_file(dir.path(), spelling), &with_lora).expect("loads");
        let (steps, image) = run(&scaled, "dev");
        for (i, (ours, plain)) in steps.iter().zip(&plain_steps).enumerate() {
            assert_close(&format!("{spelling} step {i}"), ours, plain);
        }
        assert_close(&format!("{spelling} image"), &image, &plain_image);
    }
}
