//! Stable Diffusion 1.x/2.x and SDXL, text-to-image and image-to-image: a
//! pipeline loaded from a diffusers folder or a single-file checkpoint,
//! with every shape read from the components' configs, CLIP text encoding
//! (two encoders and the added conditioning for SDXL) with
//! classifier-free guidance, denoising with a choice of schedulers, and
//! the shared VAE encoding (img2img) and decoding to RGB.

pub mod conditioning;
pub mod config;
pub mod scheduler;
pub mod single_file;
pub mod transformer;
pub mod unet;

#[cfg(test)]
mod scheduler_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod xl_tests;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d::BlockConfig;
use modeld_wire::types::LoraInfo;

use self::conditioning::{Conditioning, TextEncoders, UnetExpects};
use self::config::UnetJson;
use self::scheduler::{Sampler, SchedulerJson, SchedulerKind, Schedulers, StepNoise};
use self::unet::Unet;
use super::encoders::EncoderParts;
// The parts every family shares, under the names this family's files use.
use super::config::{read_json, VaeJson};
use super::request::{InitImage, ValidImageRequest};
use super::vae::Vae;
use super::weights::{self, component_files, load_tensors, recording, TensorMap};
use super::work::{self, Network, RunCost};
use super::{attention, conv, lora, noise, resnet, scores_bytes, to_rgb8};
use super::{go_on, reporting, GeneratedImage, ImageError, ImageLoad, OnEvent, Progress, RunEvent};

/// Everything a pipeline is built from, whatever the files' layout. Once
/// built, the tensor maps hold what the networks hold, on their device.
#[derive(Clone)]
struct Components {
    unet_json: UnetJson,
    vae_json: VaeJson,
    scheduler_json: SchedulerJson,
    unet: TensorMap,
    vae: TensorMap,
    text: EncoderParts,
    /// SDXL's second text encoder.
    text_2: Option<EncoderParts>,
    force_zeros_for_empty_prompt: bool,
}

impl Components {
    /// The components of a diffusers pipeline folder.
    fn from_folder(root: &Path) -> Result<Self, ImageError> {
        let index = PipelineIndex::read(root)?;
        let component = |name: &str, stem: &str| -> Result<TensorMap, ImageError> {
            load_tensors(&component_files(&root.join(name), stem)?)
        };
        let encoder = |name: &str, tokenizer: &str| -> Result<EncoderParts, ImageError> {
            EncoderParts::new(
                read_json(&root.join(name).join("config.json"))?,
                &root.join(tokenizer),
                super::encoders::clip::with_text_model_prefix(component(name, "model")?),
            )
        };
        Ok(Components {
            unet_json: read_json(&root.join("unet/config.json"))?,
            vae_json: read_json(&root.join("vae/config.json"))?,
            scheduler_json: SchedulerJson::read(&root.join("scheduler/scheduler_config.json"))?,
            unet: component("unet", "diffusion_pytorch_model")?,
            vae: component("vae", "diffusion_pytorch_model")?,
            text: encoder("text_encoder", "tokenizer")?,
            text_2: index
                .xl
                .then(|| encoder("text_encoder_2", "tokenizer_2"))
                .transpose()?,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
        })
    }
}

impl Components {
    /// The components of single-file checkpoint `checkpoint`, with its LDM
    /// `yaml` when there is one; `config_dir` is a diffusers-layout folder
    /// supplying what the checkpoint lacks: `tokenizer/` (and SDXL's
    /// `tokenizer_2/`), and optionally `scheduler/`, the text encoders'
    /// `config.json` and `model_index.json`.
    fn from_single_file(
        checkpoint: &Path,
        yaml: Option<&Path>,
        config_dir: &Path,
    ) -> Result<Self, ImageError> {
        let yaml = yaml.map(single_file::LdmYaml::read).transpose()?;
        let renamed = single_file::rename(checkpoint)?;
        let text_2 = renamed
            .text_encoder_2
            .map(|weights| {
                EncoderParts::new(
                    single_file::clip_json_2(&weights, config_dir)?,
                    &config_dir.join("tokenizer_2"),
                    weights,
                )
            })
            .transpose()?;
        let projection = text_2.as_ref().map(|t| t.clip_json.projection_dim);
        Ok(Components {
            unet_json: single_file::config_or(config_dir, "unet", || {
                single_file::unet_json(&renamed.unet, yaml.as_ref(), projection)
            })?,
            vae_json: single_file::config_or(config_dir, "vae", || {
                single_file::vae_json(&renamed.vae, yaml.as_ref(), projection.is_some())
            })?,
            scheduler_json: single_file::scheduler_json(config_dir, yaml.as_ref())?,
            text: EncoderParts::new(
                single_file::clip_json(&renamed.text_encoder, config_dir)?,
                &config_dir.join("tokenizer"),
                renamed.text_encoder,
            )?,
            text_2,
            force_zeros_for_empty_prompt: single_file::force_zeros_for_empty_prompt(config_dir),
            unet: renamed.unet,
            vae: renamed.vae,
        })
    }
}

impl Components {
    /// The networks LoRAs adapt.
    fn adapted(&mut self) -> lora::Adapted<'_> {
        lora::Adapted {
            denoiser: &mut self.unet,
            text: &mut self.text.weights,
            text_2: self.text_2.as_mut().map(|t| &mut t.weights),
        }
    }
}

/// What `model_index.json` says about the pipeline.
struct PipelineIndex {
    /// SDXL: a second text encoder.
    xl: bool,
    force_zeros_for_empty_prompt: bool,
}

impl PipelineIndex {
    /// Reads the index, refusing pipelines other than text-to-image
    /// Stable Diffusion 1.x/2.x/XL.
    fn read(root: &Path) -> Result<Self, ImageError> {
        let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
        let class = index["_class_name"].as_str().unwrap_or_default();
        let present = |name: &str| {
            index[name]
                .as_array()
                .is_some_and(|a| a.first().is_some_and(|v| !v.is_null()))
        };
        // FLUX, SD3, PixArt and the like denoise with a transformer, not a UNet.
        if !present("unet") {
            return Err(ImageError::Unsupported(format!(
                "{}: {class} has no UNet (a transformer-based pipeline?) and is not supported; only Stable Diffusion 1.x/2.x/XL",
                root.display()
            )));
        }
        // The SDXL refiner conditions on text_encoder_2 alone, for img2img.
        if !present("text_encoder") {
            return Err(ImageError::Unsupported(format!(
                "{}: {class} has no text_encoder (an SDXL refiner?) and is not supported; only text-to-image Stable Diffusion 1.x/2.x/XL",
                root.display()
            )));
        }
        Ok(PipelineIndex {
            xl: present("text_encoder_2"),
            // `StableDiffusionXLPipeline`'s default when the index omits it.
            force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true),
        })
    }
}

/// The key prefix of a single-file checkpoint's UNet tensors, by which
/// such a checkpoint is told from a text model's weights.
pub const SINGLE_FILE_UNET_PREFIX: &str = "model.diffusion_model.";

/// A loaded Stable Diffusion pipeline.
pub struct SdPipeline {
    text: TextEncoders,
    unet: Unet,
    vae: Vae,
    scheduler: Schedulers,
    /// Where the UNet attends, for `attention_bytes`: `(downsamplings,
    /// heads)` of every block with attention and of the mid block.
    attention_levels: Vec<(usize, usize)>,
    /// The UNet's and the VAE decoder's shapes, for the cost of a run.
    unet_work: Network,
    decode_work: Network,
    device: Device,
    dtype: DType,
    /// What the networks were built from, for `with_loras`.
    parts: Components,
    loras: Vec<lora::Merged>,
}

impl SdPipeline {
    /// Loads the diffusers pipeline folder `root`.
    pub fn load(root: &Path, options: &ImageLoad) -> Result<Self, ImageError> {
        Self::build(Components::from_folder(root)?, options)
    }

    /// Loads a single-file checkpoint (see `Components::from_single_file`).
    pub fn load_single_file(
        checkpoint: &Path,
        yaml: Option<&Path>,
        config_dir: &Path,
        options: &ImageLoad,
    ) -> Result<Self, ImageError> {
        Self::build(
            Components::from_single_file(checkpoint, yaml, config_dir)?,
            options,
        )
    }

    fn build(mut parts: Components, options: &ImageLoad) -> Result<Self, ImageError> {
        let merged = lora::remerge(parts.adapted(), &[], &options.loras, options.dtype)?;
        Self::assemble(parts, merged, (&options.device, options.dtype))
    }

    /// This pipeline with `loras` merged instead of its own, built from a
    /// copy of its weights in memory: only the tensors whose adapters
    /// change are computed again, and all others are shared with this
    /// pipeline. `LoraChanged` when an adapter to unmerge changed on disk.
    pub fn with_loras(&self, loras: &[LoraInfo]) -> Result<Self, ImageError> {
        let mut parts = self.parts.clone();
        let merged = lora::remerge(parts.adapted(), &self.loras, loras, self.dtype)?;
        Self::assemble(parts, merged, (&self.device, self.dtype))
    }

    /// The precision of the UNet and text encoders.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The adapters merged into the weights.
    pub fn loras(&self) -> Vec<LoraInfo> {
        self.loras.iter().map(|m| m.info.clone()).collect()
    }

    /// Builds the networks from `parts` (LoRAs merged already) at `dtype`
    /// on `device`; `parts` is kept holding the tensors the networks took.
    fn assemble(
        mut parts: Components,
        loras: Vec<lora::Merged>,
        (device, dtype): (&Device, DType),
    ) -> Result<Self, ImageError> {
        let unet_config = parts.unet_json.to_candle()?;
        let vae_config = parts.vae_json.to_candle()?;
        if parts.unet_json.in_channels != vae_config.latent_channels {
            return Err(ImageError::Unsupported(format!(
                "the UNet takes {} channels but the VAE has {} latent channels (inpainting and other conditioned UNets are not text-to-image)",
                parts.unet_json.in_channels, vae_config.latent_channels
            )));
        }
        let attention_levels = attention_levels(&unet_config.blocks);
        let levels = unet_config.blocks.len();
        let unet_work = Network::of(
            &parts.unet,
            |name| work::unet_scale(name, levels),
            |name| name.ends_with("attn1.to_q.weight"),
        );
        let decode_work = work::vae_decoder(&parts.vae);
        let text_time = parts.unet_json.text_time()?;
        let expects = UnetExpects {
            cross_attention_dim: unet_config.cross_attention_dim,
            text_time,
        };
        let text = TextEncoders::new(
            &mut parts.text,
            parts.text_2.as_mut(),
            parts.force_zeros_for_empty_prompt,
            &expects,
            (dtype, device),
        )?;
        // The SD VAE overflows in f16; diffusers marks it `force_upcast`.
        let vae_dtype = if parts.vae_json.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let (unet_vb, unet_taken) = recording(std::mem::take(&mut parts.unet), dtype, device);
        let unet = Unet::new(
            unet_vb,
            &unet_config,
            (parts.unet_json.in_channels, parts.unet_json.out_channels),
            text_time,
        )?;
        parts.unet = unet_taken.into_map();
        let (vae_vb, vae_taken) = recording(std::mem::take(&mut parts.vae), vae_dtype, device);
        let vae = Vae::new(vae_vb, &parts.vae_json)?;
        parts.vae = vae_taken.into_map();
        Ok(SdPipeline {
            text,
            unet,
            vae,
            scheduler: Schedulers::new(parts.scheduler_json.clone())?,
            attention_levels,
            unet_work,
            decode_work,
            device: device.clone(),
            dtype,
            parts,
            loras,
        })
    }

    /// The architecture reported in `load` and `models.loaded`.
    pub fn arch(&self) -> &'static str {
        if self.text.is_xl() {
            "stable-diffusion-xl"
        } else {
            "stable-diffusion"
        }
    }

    /// Generates `request.count` pictures; `progress` hears of every piece
    /// of every stage and may stop the run.
    pub fn generate(
        &self,
        request: &ValidImageRequest,
        progress: Progress<'_>,
    ) -> Result<Vec<GeneratedImage>, ImageError> {
        let latents = self.seeded_latents(request)?;
        let mut noise = noise::SeededNoise::new(request.seed);
        let images = self.render(request, latents, &mut noise, &mut reporting(progress))?;
        to_rgb8(&images)
    }

    /// The scheduler `request` runs: its own, else the model's default.
    pub fn scheduler_kind(&self, request: &ValidImageRequest) -> SchedulerKind {
        request
            .scheduler
            .unwrap_or_else(|| self.scheduler.default_kind())
    }

    /// The work `request` takes: UNet passes (two a step with guidance)
    /// over the latent's positions, and the VAE decode of each picture.
    pub fn run_cost(&self, request: &ValidImageRequest) -> RunCost {
        let (h, w) = self.latent_size(request);
        let positions = (h * w) as f64;
        let passes = if request.classifier_free_guidance() {
            2
        } else {
            1
        };
        RunCost {
            encode_flops: 0.0,
            step_flops: self.unet_work.flops(positions) * (passes * request.count) as f64,
            decode_flops: self.decode_work.flops(positions),
            steps: request.steps_run(),
            count: request.count,
        }
    }

    /// An upper bound of the largest attention allocation of a run. Off
    /// the CPU the attention is not chunked: the UNet's scores
    /// (`unet_scores_bytes`) or the VAE's one-head attention over the
    /// latent, one picture at a time (`vae_scores_bytes`), are quadratic in
    /// the picture's area, so a size this does not fit must be refused
    /// before it runs: a failed allocation aborts the process. On the CPU
    /// both go through in blocks (`attention.rs`) and allocate little; how
    /// long a large picture takes there is bounded by `run_cost` instead.
    pub fn attention_bytes(&self, request: &ValidImageRequest) -> u64 {
        if self.device.is_cpu() {
            return 0;
        }
        self.vae_scores_bytes(request)
            .max(self.unet_scores_bytes(request))
    }

    /// The VAE's scores and probabilities over every latent position, for
    /// one picture.
    pub fn vae_scores_bytes(&self, request: &ValidImageRequest) -> u64 {
        self.vae.scores_bytes(request.height, request.width)
    }

    /// The scores and probabilities of every head over every position of
    /// the level it attends at, for the whole UNet batch: what the unfused
    /// attention allocates at most.
    pub fn unet_scores_bytes(&self, request: &ValidImageRequest) -> u64 {
        let (h, w) = self.latent_size(request);
        let passes = if request.classifier_free_guidance() {
            2
        } else {
            1
        };
        let bytes = self.dtype.size_in_bytes().max(DType::F32.size_in_bytes());
        self.attention_levels
            .iter()
            .map(|&(level, heads)| {
                // Each downsampling halves a side, rounding up.
                let tokens = h.div_ceil(1 << level) * w.div_ceil(1 << level);
                scores_bytes(request.count * passes * heads, tokens, bytes)
            })
            .max()
            .unwrap_or(0)
    }

    /// `(count, channels, h, w)` noise; image `i` uses seed `seed + i`, so
    /// each picture of a batch can be reproduced on its own.
    fn seeded_latents(&self, request: &ValidImageRequest) -> Result<Tensor, ImageError> {
        let (h, w) = self.latent_size(request);
        let per_image = self.vae.latent_channels * h * w;
        let noise: Vec<f32> = (0..request.count as u64)
            .flat_map(|i| noise::standard_normal(request.seed.wrapping_add(i), per_image))
            .collect();
        let shape = (request.count, self.vae.latent_channels, h, w);
        Ok(Tensor::from_vec(noise, shape, &Device::Cpu)?.to_device(&self.device)?)
    }

    fn latent_size(&self, request: &ValidImageRequest) -> (usize, usize) {
        (
            request.height / self.vae.scale_factor,
            request.width / self.vae.scale_factor,
        )
    }

    /// The pictures as `(count, height, width, 3)` f32 in [0, 1], starting
    /// from standard normal `latents` (img2img: the noise added to the
    /// encoded picture); later draws (img2img's posterior sample, the
    /// stochastic schedulers' steps) come from `noise`, in that order.
    /// `on_event` hears of each stage's progress, and sees the latents
    /// after every step.
    pub(crate) fn render(
        &self,
        request: &ValidImageRequest,
        latents: Tensor,
        noise: &mut dyn StepNoise,
        on_event: OnEvent<'_>,
    ) -> Result<Tensor, ImageError> {
        let conditioning = self.conditioning(request)?;
        go_on(on_event(RunEvent::Encoded))?;
        let mut sampler = self
            .scheduler
            .start(self.scheduler_kind(request), request.steps)?;
        let latents = match &request.init_image {
            None => (latents * sampler.init_noise_sigma())?,
            Some(image) => {
                let clean = self.encode_image(image, request.count, noise)?;
                let start = request.steps - request.steps_run();
                sampler.add_noise(&clean, &latents, start)?
            }
        };
        let latents = self.denoise(
            request,
            sampler.as_mut(),
            latents,
            &conditioning,
            noise,
            on_event,
        )?;
        self.vae.decode(&latents, on_event)
    }

    /// img2img's clean latents, as the UNet sees them (`Vae::encode`).
    pub(crate) fn encode_image(
        &self,
        image: &InitImage,
        count: usize,
        noise: &mut dyn StepNoise,
    ) -> Result<Tensor, ImageError> {
        self.vae.encode(image, count, noise, &self.device)
    }

    /// The UNet's conditioning: `[uncond; count] ++ [prompt; count]` with
    /// guidance, `[prompt; count]` without.
    pub(crate) fn conditioning(
        &self,
        request: &ValidImageRequest,
    ) -> Result<Conditioning, ImageError> {
        self.text.conditioning(request, &self.device)
    }

    /// Runs the request's steps (img2img: the last `steps_run` of them).
    fn denoise(
        &self,
        request: &ValidImageRequest,
        sampler: &mut dyn Sampler,
        mut latents: Tensor,
        conditioning: &Conditioning,
        noise: &mut dyn StepNoise,
        on_event: OnEvent<'_>,
    ) -> Result<Tensor, ImageError> {
        let timesteps = sampler.timesteps().to_vec();
        let start = request.steps - request.steps_run();
        let conditioning = conditioning.to_dtype(self.dtype)?;
        for (index, &timestep) in timesteps.iter().enumerate().skip(start) {
            let input = sampler.scale_model_input(&latents, index)?;
            let output = self.guided_noise(&input, timestep, &conditioning, request.guidance)?;
            latents = sampler.step(&output, index, &latents, noise)?;
            go_on(on_event(RunEvent::Denoised {
                step: index - start + 1,
                steps: timesteps.len() - start,
                latents: &latents,
            }))?;
        }
        Ok(latents)
    }

    /// The raw UNet output (f32) for `latents` at `timestep`, batched with
    /// `conditioning` as it comes (the whole [uncond, prompt] batch).
    pub(crate) fn unet_output(
        &self,
        latents: &Tensor,
        timestep: f64,
        conditioning: &Conditioning,
    ) -> Result<Tensor, ImageError> {
        let input = latents.to_dtype(self.dtype)?;
        let output = self
            .unet
            .forward(&input, timestep, &conditioning.to_dtype(self.dtype)?)?;
        Ok(output.to_dtype(DType::F32)?)
    }

    /// The noise estimate for `latents`: with guidance g > 1,
    /// `uncond + g · (prompt − uncond)` from one UNet pass on both halves.
    fn guided_noise(
        &self,
        latents: &Tensor,
        timestep: f64,
        conditioning: &Conditioning,
        guidance: f64,
    ) -> Result<Tensor, ImageError> {
        if guidance <= 1.0 {
            return self.unet_output(latents, timestep, conditioning);
        }
        let doubled = Tensor::cat(&[latents, latents], 0)?;
        let output = self.unet_output(&doubled, timestep, conditioning)?;
        let halves = output.chunk(2, 0)?;
        let (uncond, prompt) = (&halves[0], &halves[1]);
        Ok((uncond + ((prompt - uncond)? * guidance)?)?)
    }
}

/// `(downsamplings, heads)` of every attention of the UNet: the blocks
/// with cross-attention (and their mirrored up blocks) and the mid block,
/// which attends at the last block's resolution.
fn attention_levels(blocks: &[BlockConfig]) -> Vec<(usize, usize)> {
    let mut levels: Vec<(usize, usize)> = blocks
        .iter()
        .enumerate()
        .filter(|(_, block)| block.use_cross_attn.is_some())
        .map(|(level, block)| (level, block.attention_head_dim))
        .collect();
    if let Some(last) = blocks.last() {
        levels.push((blocks.len() - 1, last.attention_head_dim));
    }
    levels
}
