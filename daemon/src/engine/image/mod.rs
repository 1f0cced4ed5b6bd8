//! Image generation: the families modeld draws with (`sd/`: Stable
//! Diffusion 1.x/2.x and SDXL; `flux/`: FLUX.1 dev and schnell), picked in
//! one place from the model's files (`Family`), and what they share: text
//! encoders (`encoders/`), the VAE (`vae/`), LoRA merging, weights,
//! seeded noise, the CPU kernels, requests, the worker and PNG output.

pub mod attention;
pub mod config;
pub mod conv;
pub mod encoders;
pub mod flux;
pub mod lora;
pub mod noise;
pub mod output;
pub mod request;
pub mod resnet;
pub mod sd;
pub mod vae;
pub mod weights;
pub mod work;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_support;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use modeld_wire::types::{ImageStage, LoraInfo};

use self::config::read_json;
use self::flux::FluxPipeline;
pub use self::request::{ImageRequest, ValidImageRequest};
use self::sd::{SdPipeline, SINGLE_FILE_UNET_PREFIX};
use self::weights::component_files;
use crate::validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("model files: {0}")]
    Files(String),
    #[error("unsupported image model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("LoRA {}: none of its keys match this pipeline's UNet or text encoder", file.display())]
    LoraNoMatch { file: PathBuf },
    #[error("LoRA {}: {tensor} has shape {got:?}, which does not fit {target} {expected:?} (a LoRA for another base model?)", file.display())]
    LoraShape {
        file: PathBuf,
        tensor: String,
        got: Vec<usize>,
        target: String,
        expected: Vec<usize>,
    },
    #[error("LoRA {}: the file changed since it was merged, so it cannot be unmerged", file.display())]
    LoraChanged { file: PathBuf },
    #[error("generation cancelled")]
    Cancelled,
    /// A request parameter this family cannot run.
    #[error(transparent)]
    Invalid(#[from] crate::validate::ValidationError),
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Where and at which precision the pipeline runs, and the LoRAs merged
/// into it.
#[derive(Debug, Clone)]
pub struct ImageLoad {
    pub device: Device,
    pub dtype: DType,
    pub loras: Vec<LoraInfo>,
}

/// How an image model's components are found and placed: files given
/// apart from the model (a ComfyUI tree keeps them in `vae/` and
/// `text_encoders/`), the diffusers-layout folder supplying tokenizers,
/// configs and whatever else the files leave out, and whether the text
/// encoders stay in system memory. Default: the model's own folder
/// supplies all, every component on the model's device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageParts {
    pub vae: Option<PathBuf>,
    /// CLIP and T5 encoders, each recognised by its tensor names.
    pub text_encoders: Vec<PathBuf>,
    pub config_dir: Option<PathBuf>,
    /// FLUX: keep the text encoders (T5-XXL alone is ~9.5 GB in f16) in
    /// system memory and run them on the CPU, so that only the
    /// transformer and VAE take the device's memory.
    pub offload_text_encoders: bool,
}

impl ImageParts {
    /// Whether any component comes from a file of its own.
    pub fn has_files(&self) -> bool {
        self.vae.is_some() || !self.text_encoders.is_empty() || self.config_dir.is_some()
    }

    /// The folder supplying what `file` (a single-file model) lacks.
    fn config_dir_for<'a>(&'a self, file: &'a Path) -> &'a Path {
        self.config_dir
            .as_deref()
            .unwrap_or_else(|| config_dir(file))
    }
}

/// One generated picture: `width × height` RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// The image families modeld draws with, told apart by their files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x/2.x and SDXL: a UNet.
    StableDiffusion,
    /// FLUX.1 dev and schnell: a flow-matching transformer.
    Flux,
}

impl Family {
    /// The family of a diffusers folder (by its `model_index.json`) or of a
    /// single `.safetensors` file (by its tensor names); `None` when the
    /// path holds no image model. The one place families are picked.
    pub fn of(path: &Path) -> Option<Family> {
        if path.is_dir() {
            let index: serde_json::Value = read_json(&path.join("model_index.json")).ok()?;
            return Some(if flux::is_flux_index(&index) {
                Family::Flux
            } else {
                Family::StableDiffusion
            });
        }
        if path.extension().is_none_or(|ext| ext != "safetensors") {
            return None;
        }
        let names = weights::tensor_names(path).ok()?;
        if flux::single_file::is_flux_transformer(names.iter().map(String::as_str)) {
            return Some(Family::Flux);
        }
        names
            .iter()
            .any(|name| name.starts_with(SINGLE_FILE_UNET_PREFIX))
            .then_some(Family::StableDiffusion)
    }
}

/// Whether a diffusers folder is a pipeline a native family runs: FLUX's
/// text-to-image and img2img classes, or a Stable Diffusion 1.x/2.x/XL
/// pipeline with a UNet and a text encoder. Others (Qwen-Image, Wan,
/// SD3, ...) go to a runner.
pub fn runs_natively(folder: &Path) -> bool {
    let Ok(index) = read_json::<serde_json::Value>(&folder.join("model_index.json")) else {
        return false;
    };
    let class = index["_class_name"].as_str().unwrap_or_default();
    if flux::is_flux_index(&index) {
        return flux::PIPELINE_CLASSES.contains(&class);
    }
    let present = |name: &str| {
        index[name]
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|v| !v.is_null()))
    };
    let stable_diffusion = class.is_empty()
        || (class.starts_with("StableDiffusion") && !class.starts_with("StableDiffusion3"));
    stable_diffusion && present("unet") && present("text_encoder")
}

/// The folder supplying what a single file lacks (tokenizers, configs,
/// and for FLUX the encoders and VAE): the file's own folder.
fn config_dir(file: &Path) -> &Path {
    file.parent().unwrap_or(Path::new("/"))
}

/// The weight files whose tensors the model's device holds: the denoiser,
/// VAE and text encoder(s) of a diffusers folder, or the single-file
/// checkpoint itself (for FLUX, with the components of its folder or
/// `parts`); without the text encoders of a model that keeps them in
/// system memory.
pub fn device_weight_files(path: &Path, parts: &ImageParts) -> Result<Vec<PathBuf>, ImageError> {
    let flux = Family::of(path) == Some(Family::Flux);
    if flux && path.is_dir() {
        // Refused by name before any file is looked for.
        flux::check_index(path)?;
    }
    let (mut files, folder) = if path.is_dir() {
        let denoiser = if flux { "transformer" } else { "unet" };
        let files = component_files(&path.join(denoiser), "diffusion_pytorch_model")?;
        (files, path)
    } else if flux {
        (vec![path.to_path_buf()], parts.config_dir_for(path))
    } else {
        return Ok(vec![path.to_path_buf()]);
    };
    match &parts.vae {
        Some(vae) => files.push(vae.clone()),
        None => files.extend(component_files(
            &folder.join("vae"),
            "diffusion_pytorch_model",
        )?),
    }
    if !parts.offload_text_encoders {
        files.extend(text_encoder_files(folder, parts)?);
    }
    Ok(files)
}

/// The text encoders' files: given apart, or those of `folder`.
fn text_encoder_files(folder: &Path, parts: &ImageParts) -> Result<Vec<PathBuf>, ImageError> {
    if !parts.text_encoders.is_empty() {
        return Ok(parts.text_encoders.clone());
    }
    let mut files = component_files(&folder.join("text_encoder"), "model")?;
    if folder.join("text_encoder_2").is_dir() {
        files.extend(component_files(&folder.join("text_encoder_2"), "model")?);
    }
    Ok(files)
}

/// What a run reports as it goes; answering `Break` stops it.
pub enum RunEvent<'a> {
    /// The prompt's conditioning is ready.
    Encoded,
    /// Denoising step `step` of `steps` is done, leaving `latents`.
    Denoised {
        step: usize,
        steps: usize,
        latents: &'a Tensor,
    },
    /// Picture `picture` of `pictures` is decoded.
    Decoded { picture: usize, pictures: usize },
}

impl RunEvent<'_> {
    /// The event as a client's `progress`: `(stage, done, of)`.
    pub fn progress(&self) -> (ImageStage, usize, usize) {
        match *self {
            RunEvent::Encoded => (ImageStage::Encode, 1, 1),
            RunEvent::Denoised { step, steps, .. } => (ImageStage::Denoise, step, steps),
            RunEvent::Decoded { picture, pictures } => (ImageStage::Decode, picture, pictures),
        }
    }
}

/// Where a run's events go.
pub type OnEvent<'a> = &'a mut dyn FnMut(RunEvent<'_>) -> ControlFlow<()>;

/// Where a run's progress goes, as `(stage, done, of)`.
pub type Progress<'a> = &'a mut dyn FnMut(ImageStage, usize, usize) -> ControlFlow<()>;

/// A run's events as progress, for the pipelines' `generate`.
fn reporting(progress: Progress<'_>) -> impl FnMut(RunEvent<'_>) -> ControlFlow<()> + '_ {
    move |event| {
        let (stage, done, of) = event.progress();
        progress(stage, done, of)
    }
}

/// Stops the run with `Cancelled` when the caller answered `Break`.
fn go_on(flow: ControlFlow<()>) -> Result<(), ImageError> {
    match flow {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(ImageError::Cancelled),
    }
}

/// A loaded image pipeline of any family: what the engine and the image
/// worker call.
pub enum ImagePipeline {
    StableDiffusion(Box<SdPipeline>),
    Flux(Box<FluxPipeline>),
}

impl ImagePipeline {
    /// Loads the image model at `path`: a diffusers folder, or a single
    /// file (an SD checkpoint with its LDM `.yaml` beside it if there is
    /// one, or a FLUX transformer) whose folder, or `parts`, supplies the
    /// rest.
    pub fn load(path: &Path, parts: &ImageParts, options: &ImageLoad) -> Result<Self, ImageError> {
        let family = Family::of(path);
        let flux = family == Some(Family::Flux);
        if parts.has_files() && (path.is_dir() || !flux) {
            return Err(ImageError::Unsupported(format!(
                "{}: separate VAE, text encoder and config files go with a single-file FLUX transformer",
                path.display()
            )));
        }
        if parts.offload_text_encoders && !flux {
            return Err(ImageError::Unsupported(format!(
                "{}: offload_text_encoders applies to FLUX models",
                path.display()
            )));
        }
        let family = family.ok_or_else(|| {
            ImageError::Unsupported(format!(
                "{}: not an image model (no model_index.json, and no UNet or FLUX transformer tensors)",
                path.display()
            ))
        })?;
        Ok(match (family, path.is_dir()) {
            (Family::Flux, true) => Self::Flux(Box::new(FluxPipeline::load(path, parts, options)?)),
            (Family::Flux, false) => Self::Flux(Box::new(FluxPipeline::load_single_file(
                path, parts, options,
            )?)),
            (Family::StableDiffusion, true) => {
                Self::StableDiffusion(Box::new(SdPipeline::load(path, options)?))
            }
            (Family::StableDiffusion, false) => {
                let yaml = path.with_extension("yaml");
                let yaml = yaml.is_file().then_some(yaml.as_path());
                Self::StableDiffusion(Box::new(SdPipeline::load_single_file(
                    path,
                    yaml,
                    config_dir(path),
                    options,
                )?))
            }
        })
    }

    /// This pipeline with `loras` merged instead of its own, derived in
    /// memory (see `SdPipeline::with_loras`).
    pub fn with_loras(&self, loras: &[LoraInfo]) -> Result<Self, ImageError> {
        Ok(match self {
            Self::StableDiffusion(p) => Self::StableDiffusion(Box::new(p.with_loras(loras)?)),
            Self::Flux(p) => Self::Flux(Box::new(p.with_loras(loras)?)),
        })
    }

    /// The architecture reported in `load` and `models.loaded`.
    pub fn arch(&self) -> &'static str {
        match self {
            Self::StableDiffusion(p) => p.arch(),
            Self::Flux(p) => p.arch(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::StableDiffusion(p) => p.dtype(),
            Self::Flux(p) => p.dtype(),
        }
    }

    /// The adapters merged into the weights.
    pub fn loras(&self) -> Vec<LoraInfo> {
        match self {
            Self::StableDiffusion(p) => p.loras(),
            Self::Flux(p) => p.loras(),
        }
    }

    /// Refuses, naming the parameter, what this family cannot run; the
    /// shared limits were checked when the request was validated.
    pub fn check(&self, request: &ValidImageRequest) -> Result<(), ValidationError> {
        match self {
            Self::StableDiffusion(_) => {
                request.check_runs_a_step(request.steps, request.steps_run())
            }
            Self::Flux(p) => p.settings(request).map(|_| ()),
        }
    }

    /// Generates `request.count` pictures; `progress` hears of every piece
    /// of every stage as `(stage, done, of)` and may stop the run.
    pub fn generate(
        &self,
        request: &ValidImageRequest,
        progress: Progress<'_>,
    ) -> Result<Vec<GeneratedImage>, ImageError> {
        match self {
            Self::StableDiffusion(p) => p.generate(request, progress),
            Self::Flux(p) => p.generate(request, progress),
        }
    }

    /// The work a run of `request` takes, estimated from the networks.
    pub fn run_cost(&self, request: &ValidImageRequest) -> work::RunCost {
        match self {
            Self::StableDiffusion(p) => p.run_cost(request),
            Self::Flux(p) => p.run_cost(request),
        }
    }

    /// The largest attention allocation of a run (see
    /// `SdPipeline::attention_bytes`).
    pub fn attention_bytes(&self, request: &ValidImageRequest) -> u64 {
        match self {
            Self::StableDiffusion(p) => p.attention_bytes(request),
            Self::Flux(p) => p.attention_bytes(request),
        }
    }

    /// The sampler a run of `request` uses, by its request name.
    pub fn scheduler_name(&self, request: &ValidImageRequest) -> &'static str {
        match self {
            Self::StableDiffusion(p) => p.scheduler_kind(request).name(),
            Self::Flux(_) => "flow_match_euler",
        }
    }

    /// The denoising steps a run of `request` takes.
    pub fn steps_run(&self, request: &ValidImageRequest) -> usize {
        match self {
            Self::StableDiffusion(_) => request.steps_run(),
            Self::Flux(p) => p.settings(request).map_or(0, |run| run.steps_run()),
        }
    }
}

/// Scores and probabilities, `batch × tokens × tokens` each, in bytes.
pub(crate) fn scores_bytes(batch: usize, tokens: usize, bytes: usize) -> u64 {
    let tokens = tokens as u64;
    2u64.saturating_mul(batch as u64)
        .saturating_mul(tokens)
        .saturating_mul(tokens)
        .saturating_mul(bytes as u64)
}

/// `(count, h, w, 3)` pixels in [0, 1] → 8-bit RGB pictures, rounded like
/// diffusers' `numpy_to_pil`.
pub(crate) fn to_rgb8(images: &Tensor) -> Result<Vec<GeneratedImage>, ImageError> {
    let (count, height, width, _) = images.dims4()?;
    let bytes = (images.to_device(&Device::Cpu)? * 255.0)?
        .round()?
        .to_dtype(DType::U8)?;
    (0..count)
        .map(|i| {
            Ok(GeneratedImage {
                width,
                height,
                rgb: bytes.get(i)?.flatten_all()?.to_vec1::<u8>()?,
            })
        })
        .collect()
}
