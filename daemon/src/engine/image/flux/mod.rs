//! FLUX.1 (dev and schnell), text-to-image and image-to-image, as
//! diffusers' `FluxPipeline` and `FluxImg2ImgPipeline` run it: CLIP-L's
//! pooled output and T5's states condition a flow-matching transformer
//! over 2×2-packed latents, stepped with Euler; the shared VAE (16 latent
//! channels, shifted and scaled) decodes. dev and schnell are told apart
//! by the weights: dev's transformer has a guidance embedding.

pub mod adapters;
pub mod components;
pub mod config;
pub mod sampling;
pub mod single_file;
pub mod transformer;

#[cfg(test)]
mod scaled_fp8_tests;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use modeld_wire::types::LoraInfo;
use serde_json::json;

use self::config::{FlowMatchJson, FluxJson};
use self::transformer::{Build, FluxInputs, FluxTransformer, Rope};
use super::config::{read_json, VaeJson};
use super::encoders::clip::{pooled_output, ClipTextModel};
use super::encoders::prompt::PromptTokenizer;
use super::encoders::t5::{T5Encoder, T5Json};
use super::encoders::EncoderParts;
use super::noise::{self, StepNoise};
use super::request::ValidImageRequest;
use super::vae::Vae;
use super::weights::{component_files, load_tensors, recording, TensorMap};
use super::work::{self, Network, RunCost};
use super::{go_on, lora, reporting, GeneratedImage, ImageError, ImageLoad, ImageParts};
use super::{OnEvent, Progress, RunEvent};
use crate::validate::ValidationError;

/// T5's token budget when the request does not set `max_sequence_length`.
pub const DEV_MAX_SEQUENCE_LENGTH: usize = 512;
pub const SCHNELL_MAX_SEQUENCE_LENGTH: usize = 256;
/// dev's distilled guidance when neither request nor mode sets one.
pub const DEV_GUIDANCE: f64 = 3.5;
/// Steps when neither request nor mode sets them: diffusers' 28 for dev;
/// schnell is distilled for 4.
pub const DEV_STEPS: usize = 28;
pub const SCHNELL_STEPS: usize = 4;

/// The pipeline classes this family runs; other FLUX pipelines (Fill,
/// Depth, Canny, Kontext, Redux) take inputs it does not.
pub(crate) const PIPELINE_CLASSES: [&str; 2] = ["FluxPipeline", "FluxImg2ImgPipeline"];

/// Whether a diffusers folder's `model_index.json` names a FLUX pipeline.
pub fn is_flux_index(index: &serde_json::Value) -> bool {
    index["_class_name"]
        .as_str()
        .is_some_and(|class| class.starts_with("Flux"))
}

/// Everything a FLUX pipeline is built from. Once built, the tensor maps
/// hold what the networks hold.
#[derive(Clone)]
struct FluxParts {
    transformer_json: FluxJson,
    vae_json: VaeJson,
    scheduler_json: FlowMatchJson,
    t5_json: T5Json,
    transformer: TensorMap,
    vae: TensorMap,
    clip: EncoderParts,
    t5: TensorMap,
    t5_tokenizer: PromptTokenizer,
}

/// The networks' shapes, for what a run costs.
struct FluxWork {
    /// Runs over the image and text tokens together, once a step.
    transformer: Network,
    decoder: Network,
    /// T5's and CLIP's weights, run once over their tokens.
    t5_weights: f64,
    clip_weights: f64,
}

impl FluxWork {
    fn of(parts: &FluxParts) -> Self {
        // Embedding tables are looked up, not multiplied; the time and
        // guidance embedders run once per picture, not per token.
        let per_token = |name: &str| {
            let once =
                name.contains("embed") || name.contains("shared") || name.starts_with("norm_out");
            (!once).then_some(1.0)
        };
        let weights = |tensors: &TensorMap| Network::of(tensors, per_token, |_| false).weights();
        FluxWork {
            transformer: Network::of(&parts.transformer, per_token, |name| {
                name.ends_with("attn.to_q.weight")
            }),
            decoder: work::vae_decoder(&parts.vae),
            t5_weights: weights(&parts.t5),
            clip_weights: weights(&parts.clip.weights),
        }
    }
}

/// The transformer config with `guidance_embeds` as the weights say.
fn with_guidance_from_weights(mut json: FluxJson, transformer: &TensorMap) -> FluxJson {
    json.guidance_embeds =
        transformer.contains_key("time_text_embed.guidance_embedder.linear_1.weight");
    json
}

impl FluxParts {
    /// The components of a diffusers `FluxPipeline` folder.
    fn from_folder(root: &Path) -> Result<Self, ImageError> {
        check_index(root)?;
        let transformer = load_tensors(&component_files(
            &root.join("transformer"),
            "diffusion_pytorch_model",
        )?)?;
        let transformer_json = with_guidance_from_weights(
            read_json(&root.join("transformer/config.json"))?,
            &transformer,
        );
        let sources = components::Sources::folder(root);
        Self::with_transformer(&sources, transformer_json, transformer, None)
    }

    /// The other components from `sources` around a transformer given
    /// apart; `scheduler` when the config folder has none.
    fn with_transformer(
        sources: &components::Sources,
        transformer_json: FluxJson,
        transformer: TensorMap,
        scheduler: Option<FlowMatchJson>,
    ) -> Result<Self, ImageError> {
        let config_dir = sources.config_dir;
        let scheduler_file = config_dir.join("scheduler/scheduler_config.json");
        let scheduler_json = match scheduler {
            Some(json) if !scheduler_file.is_file() => json,
            _ => read_json(&scheduler_file)?,
        };
        let (vae_json, vae) = sources.vae()?;
        let (clip_json, clip) = sources.clip()?;
        let (t5_json, t5) = sources.t5()?;
        Ok(FluxParts {
            transformer_json,
            vae_json,
            scheduler_json,
            t5_json,
            transformer,
            vae,
            clip: EncoderParts::new(clip_json, &config_dir.join("tokenizer"), clip)?,
            t5,
            t5_tokenizer: PromptTokenizer::load(
                &config_dir.join("tokenizer_2"),
                DEV_MAX_SEQUENCE_LENGTH,
            )?,
        })
    }

    /// The networks LoRAs adapt.
    fn adapted(&mut self) -> lora::Adapted<'_> {
        lora::Adapted {
            denoiser: &mut self.transformer,
            text: &mut self.clip.weights,
            text_2: None,
        }
    }
}

/// Refuses FLUX pipelines whose inputs this one does not take.
pub(crate) fn check_index(root: &Path) -> Result<(), ImageError> {
    let index: serde_json::Value = read_json(&root.join("model_index.json"))?;
    let class = index["_class_name"].as_str().unwrap_or_default();
    if PIPELINE_CLASSES.contains(&class) {
        return Ok(());
    }
    Err(ImageError::Unsupported(format!(
        "{}: {class} is not supported (only {}: FLUX Fill, Depth, Canny, Kontext and Redux take inputs modeld does not send)",
        root.display(),
        PIPELINE_CLASSES.join(", ")
    )))
}

/// Where the networks run: the transformer and VAE on the model's device
/// at its dtype; the text encoders there too, or, offloaded, on the CPU
/// in f32 (the CPU's matmul takes no bf16).
#[derive(Debug, Clone)]
struct Placement {
    device: Device,
    dtype: DType,
    offload_text_encoders: bool,
}

impl Placement {
    fn new(device: &Device, dtype: DType, offload_text_encoders: bool) -> Self {
        Placement {
            device: device.clone(),
            dtype,
            offload_text_encoders,
        }
    }

    fn encoders(&self) -> (Device, DType) {
        if self.offload_text_encoders && !self.device.is_cpu() {
            (Device::Cpu, DType::F32)
        } else {
            (self.device.clone(), self.dtype)
        }
    }
}

/// Whether the model runs dev's guidance or schnell's plain steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Dev,
    Schnell,
}

/// A loaded FLUX pipeline.
pub struct FluxPipeline {
    clip: ClipTextModel,
    clip_eos: u32,
    t5: T5Encoder,
    transformer: FluxTransformer,
    vae: Vae,
    variant: Variant,
    device: Device,
    dtype: DType,
    placement: Placement,
    /// The shapes of the networks, for the cost of a run.
    work: FluxWork,
    /// What the networks were built from, for `with_loras`.
    parts: FluxParts,
    loras: Vec<lora::Merged>,
}

impl FluxPipeline {
    /// Loads the diffusers pipeline folder `root`; `parts` places the
    /// text encoders.
    pub fn load(root: &Path, parts: &ImageParts, options: &ImageLoad) -> Result<Self, ImageError> {
        let offload = parts.offload_text_encoders;
        Self::build(FluxParts::from_folder(root)?, offload, options)
    }

    /// Loads a BFL- or diffusers-named single-file transformer; the other
    /// components come from `parts`' files where given, and the rest
    /// (tokenizers, configs, components not given) from its config
    /// folder, by default the file's own.
    pub fn load_single_file(
        transformer: &Path,
        parts: &ImageParts,
        options: &ImageLoad,
    ) -> Result<Self, ImageError> {
        let sources = components::Sources::separate(transformer, parts)?;
        let (json, weights) = single_file::transformer(transformer, sources.config_dir)?;
        let schnell = (!json.guidance_embeds).then(FlowMatchJson::schnell);
        let scheduler = schnell.unwrap_or_default();
        let offload = parts.offload_text_encoders;
        let parts = FluxParts::with_transformer(&sources, json, weights, Some(scheduler))?;
        Self::build(parts, offload, options)
    }

    fn build(mut parts: FluxParts, offload: bool, options: &ImageLoad) -> Result<Self, ImageError> {
        let merged = lora::remerge(parts.adapted(), &[], &options.loras, options.dtype)?;
        let placement = Placement::new(&options.device, options.dtype, offload);
        Self::assemble(parts, merged, placement)
    }

    /// This pipeline with `loras` merged instead of its own, from a copy
    /// of its weights in memory (see `ImagePipeline::with_loras`).
    pub fn with_loras(&self, loras: &[LoraInfo]) -> Result<Self, ImageError> {
        let mut parts = self.parts.clone();
        let merged = lora::remerge(parts.adapted(), &self.loras, loras, self.dtype)?;
        Self::assemble(parts, merged, self.placement.clone())
    }

    fn assemble(
        mut parts: FluxParts,
        loras: Vec<lora::Merged>,
        placement: Placement,
    ) -> Result<Self, ImageError> {
        let (device, dtype) = (&placement.device, placement.dtype);
        let (encoder_device, encoder_dtype) = placement.encoders();
        parts
            .transformer_json
            .check(parts.vae_json.latent_channels)?;
        parts.scheduler_json.check()?;
        check_widths(&parts)?;
        let clip_config = parts.clip.clip_json.to_config()?;
        let clip_weights = std::mem::take(&mut parts.clip.weights);
        let (clip_vb, clip_taken) = recording(clip_weights, encoder_dtype, &encoder_device);
        let clip = ClipTextModel::new(clip_vb, &clip_config)?;
        parts.clip.weights = clip_taken.into_map();
        let t5_weights = std::mem::take(&mut parts.t5);
        let (t5_vb, t5_taken) = recording(t5_weights, encoder_dtype, &encoder_device);
        let t5 = T5Encoder::new(t5_vb, &parts.t5_json)?;
        parts.t5 = t5_taken.into_map();
        let work = FluxWork::of(&parts);
        let fp8 = Arc::new(fp8_names(&parts.transformer));
        let (vb, taken) = recording(std::mem::take(&mut parts.transformer), dtype, device);
        let transformer = FluxTransformer::new(&Build { vb, fp8 }, &parts.transformer_json)?;
        parts.transformer = taken.into_map();
        // The FLUX VAE overflows in f16 too; diffusers marks it `force_upcast`.
        let vae_dtype = if parts.vae_json.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let (vae_vb, vae_taken) = recording(std::mem::take(&mut parts.vae), vae_dtype, device);
        let vae = Vae::new(vae_vb, &parts.vae_json)?;
        parts.vae = vae_taken.into_map();
        let variant = if transformer.takes_guidance() {
            Variant::Dev
        } else {
            Variant::Schnell
        };
        Ok(FluxPipeline {
            clip,
            clip_eos: parts.clip.clip_json.eos_token_id,
            t5,
            transformer,
            vae,
            variant,
            device: device.clone(),
            dtype,
            placement,
            work,
            parts,
            loras,
        })
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The architecture reported in `load` and `models.loaded`.
    pub fn arch(&self) -> &'static str {
        match self.variant {
            Variant::Dev => "flux-dev",
            Variant::Schnell => "flux-schnell",
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn loras(&self) -> Vec<LoraInfo> {
        self.loras.iter().map(|m| m.info.clone()).collect()
    }

    /// Generates `request.count` pictures; `progress` hears of every piece
    /// of every stage and may stop the run.
    pub fn generate(
        &self,
        request: &ValidImageRequest,
        progress: Progress<'_>,
    ) -> Result<Vec<GeneratedImage>, ImageError> {
        let run = self.settings(request)?;
        let latents = self.seeded_latents(request)?;
        let mut noise = noise::SeededNoise::new(request.seed);
        let images = self.render(request, &run, latents, &mut noise, &mut reporting(progress))?;
        super::to_rgb8(&images)
    }

    /// The work `request` takes: the encoders once, a transformer pass per
    /// step over every picture's image and text tokens, and the VAE decode
    /// of each picture.
    pub fn run_cost(&self, request: &ValidImageRequest) -> RunCost {
        let run = self.settings(request);
        let text = run.as_ref().map_or(512, |run| run.max_sequence_length) as f64;
        let steps = run.map_or(request.steps_run(), |run| run.steps_run());
        let (h, w) = self.latent_size(request);
        let image = (h / 2 * w / 2) as f64;
        RunCost {
            encode_flops: 2.0 * (self.work.t5_weights * text + self.work.clip_weights * 77.0),
            step_flops: self.work.transformer.flops(image + text) * request.count as f64,
            decode_flops: self.work.decoder.flops((h * w) as f64),
            steps,
            count: request.count,
        }
    }

    /// The request's FLUX settings, or the parameter it cannot have.
    pub fn settings(&self, request: &ValidImageRequest) -> Result<FluxRun, ValidationError> {
        FluxRun::new(request, self.variant, 2 * self.vae.scale_factor)
    }

    /// Packed standard normal noise, `(count, tokens, 4 × channels)`; image
    /// `i` uses seed `seed + i`, drawn in the unpacked layout.
    fn seeded_latents(&self, request: &ValidImageRequest) -> Result<Tensor, ImageError> {
        let (h, w) = self.latent_size(request);
        let channels = self.vae.latent_channels;
        let noise: Vec<f32> = (0..request.count as u64)
            .flat_map(|i| noise::standard_normal(request.seed.wrapping_add(i), channels * h * w))
            .collect();
        let latents = Tensor::from_vec(noise, (request.count, channels, h, w), &Device::Cpu)?;
        Ok(pack(&latents)?.to_device(&self.device)?)
    }

    /// The unpacked latent size: even, as the 2×2 packing needs.
    fn latent_size(&self, request: &ValidImageRequest) -> (usize, usize) {
        let side = |pixels: usize| 2 * (pixels / (self.vae.scale_factor * 2));
        (side(request.height), side(request.width))
    }

    /// `(context, pooled)` for `prompt`, batch 1, f32: T5's states over
    /// `max_length` tokens and CLIP's pooled output.
    pub(crate) fn encode_prompt(
        &self,
        prompt: &str,
        max_length: usize,
    ) -> Result<(Tensor, Tensor), ImageError> {
        let (device, _) = self.placement.encoders();
        let clip_ids = self.parts.clip.tokenizer.ids(prompt)?;
        let clip_ids = Tensor::new(clip_ids.as_slice(), &device)?.unsqueeze(0)?;
        let last = self.clip.forward(&clip_ids)?;
        let pooled = pooled_output(&last, &clip_ids, self.clip_eos)?;
        let t5_ids = self.parts.t5_tokenizer.ids_of_length(prompt, max_length)?;
        let t5_ids = Tensor::new(t5_ids.as_slice(), &device)?.unsqueeze(0)?;
        let context = self.t5.forward(&t5_ids)?;
        let on_device = |t: Tensor| t.to_dtype(DType::F32)?.to_device(&self.device);
        Ok((on_device(context)?, on_device(pooled)?))
    }

    /// The pictures as `(count, height, width, 3)` f32 in [0, 1], from
    /// packed standard normal `latents`; img2img's posterior sample comes
    /// from `noise`. `on_event` hears of each stage's progress, and sees
    /// the packed latents after every step.
    pub(crate) fn render(
        &self,
        request: &ValidImageRequest,
        run: &FluxRun,
        latents: Tensor,
        noise: &mut dyn StepNoise,
        on_event: OnEvent<'_>,
    ) -> Result<Tensor, ImageError> {
        let (context, pooled) = self.encode_prompt(&request.prompt, run.max_sequence_length)?;
        go_on(on_event(RunEvent::Encoded))?;
        let count = request.count;
        let context = context.repeat((count, 1, 1))?.to_dtype(self.dtype)?;
        let pooled = pooled.repeat((count, 1))?.to_dtype(self.dtype)?;
        let (h, w) = self.latent_size(request);
        let sigmas = sampling::sigmas(&self.parts.scheduler_json, run.steps, latents.dim(1)?);
        let timesteps = sampling::timesteps(&self.parts.scheduler_json, &sigmas);
        let first = run.first_step;
        let mut latents = match &request.init_image {
            None => latents,
            Some(image) => {
                let clean = pack(&self.vae.encode(image, count, noise, &self.device)?)?;
                let sigma = sigmas[first] as f64;
                ((latents * sigma)? + (clean * (1.0 - sigma))?)?
            }
        };
        let rope = self.rope(context.dim(1)?, (h / 2, w / 2))?;
        for index in first..timesteps.len() {
            let inputs = FluxInputs {
                latents: &latents.to_dtype(self.dtype)?,
                context: &context,
                pooled: &pooled,
                timestep: timesteps[index],
                guidance: (self.variant == Variant::Dev).then_some(run.guidance as f32),
                rope: &rope,
            };
            let velocity = self.transformer.forward(&inputs)?.to_dtype(DType::F32)?;
            let dt = (sigmas[index + 1] - sigmas[index]) as f64;
            latents = (latents + (velocity * dt)?)?;
            go_on(on_event(RunEvent::Denoised {
                step: index - first + 1,
                steps: timesteps.len() - first,
                latents: &latents,
            }))?;
        }
        self.vae.decode(&unpack(&latents, (h, w))?, on_event)
    }

    /// Rotary positions: `text_len` text tokens at (0, 0, 0), then the
    /// image tokens at (0, row, column).
    fn rope(&self, text_len: usize, (rows, columns): (usize, usize)) -> Result<Rope, ImageError> {
        let text = std::iter::repeat_n([0.0; 3], text_len);
        let image = (0..rows).flat_map(|r| (0..columns).map(move |c| [0.0, r as f64, c as f64]));
        let ids: Vec<[f64; 3]> = text.chain(image).collect();
        let json = &self.parts.transformer_json;
        Ok(Rope::new(
            &ids,
            &json.axes_dims_rope,
            10000.0,
            &self.device,
        )?)
    }

    /// The larger of the VAE's attention scores for one picture and the
    /// transformer's. On the CPU both attend in blocks and allocate little;
    /// how long a run takes there is bounded by `run_cost` instead.
    pub fn attention_bytes(&self, request: &ValidImageRequest) -> u64 {
        if self.device.is_cpu() {
            return 0;
        }
        let vae = self.vae.scores_bytes(request.height, request.width);
        let (h, w) = self.latent_size(request);
        let max_text = self
            .settings(request)
            .map_or(DEV_MAX_SEQUENCE_LENGTH, |run| run.max_sequence_length);
        let tokens = h / 2 * w / 2 + max_text;
        let heads = request.count * self.parts.transformer_json.num_attention_heads;
        let bytes = self.dtype.size_in_bytes().max(DType::F32.size_in_bytes());
        vae.max(super::scores_bytes(heads, tokens, bytes))
    }
}

/// Weights the transformer keeps in fp8.
fn fp8_names(transformer: &TensorMap) -> HashSet<String> {
    transformer
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F8E4M3)
        .map(|(name, _)| name.clone())
        .collect()
}

/// The encoders' widths against the transformer's inputs.
fn check_widths(parts: &FluxParts) -> Result<(), ImageError> {
    let json = &parts.transformer_json;
    let widths = [
        (
            "joint_attention_dim",
            json.joint_attention_dim,
            "text_encoder_2 d_model",
            parts.t5_json.d_model,
        ),
        (
            "pooled_projection_dim",
            json.pooled_projection_dim,
            "text_encoder hidden_size",
            parts.clip.clip_json.hidden_size,
        ),
    ];
    for (field, expected, source, got) in widths {
        if expected != got {
            return Err(ImageError::Unsupported(format!(
                "transformer/config.json: {field} {expected} does not match the {source} {got}"
            )));
        }
    }
    Ok(())
}

/// `(count, channels, h, w)` → `(count, h/2 · w/2, 4 · channels)`: each
/// 2×2 patch becomes one token (diffusers' `_pack_latents`).
pub fn pack(latents: &Tensor) -> candle_core::Result<Tensor> {
    let (count, channels, h, w) = latents.dims4()?;
    latents
        .reshape((count, channels, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((count, (h / 2) * (w / 2), channels * 4))
}

/// The inverse of `pack` for latents of `(h, w)`.
pub fn unpack(latents: &Tensor, (h, w): (usize, usize)) -> candle_core::Result<Tensor> {
    let (count, _, packed) = latents.dims3()?;
    let channels = packed / 4;
    latents
        .reshape((count, h / 2, w / 2, channels, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((count, channels, h, w))
}

/// A request's settings once FLUX's own defaults and limits apply.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxRun {
    pub steps: usize,
    pub guidance: f64,
    pub max_sequence_length: usize,
    /// img2img: the index of the first step run.
    pub first_step: usize,
}

impl FluxRun {
    /// Refuses what FLUX has no use for (no classifier-free guidance, so
    /// no negative prompt; one sampler) and sides the packing cannot
    /// split; fills in the variant's defaults.
    fn new(
        request: &ValidImageRequest,
        variant: Variant,
        multiple: usize,
    ) -> Result<Self, ValidationError> {
        if request.negative_prompt.is_some() {
            return Err(ValidationError::new(
                "negative_prompt",
                "FLUX has no classifier-free guidance, so no negative prompt",
            ));
        }
        if request.scheduler.is_some() {
            return Err(ValidationError::new(
                "scheduler",
                "FLUX samples with flow-matching Euler only; leave scheduler out",
            ));
        }
        for (field, side) in [("size", request.width), ("size", request.height)] {
            if !side.is_multiple_of(multiple) {
                return Err(ValidationError {
                    field: field.into(),
                    message: format!(
                        "{}x{}: each side must be a multiple of {multiple} for this FLUX model",
                        request.width, request.height
                    ),
                    limit: Some(json!({"multiple_of": multiple})),
                });
            }
        }
        let (steps, guidance, max_length) = match variant {
            Variant::Dev => (DEV_STEPS, DEV_GUIDANCE, DEV_MAX_SEQUENCE_LENGTH),
            Variant::Schnell => (SCHNELL_STEPS, 0.0, SCHNELL_MAX_SEQUENCE_LENGTH),
        };
        let steps = if request.given.steps {
            request.steps
        } else {
            steps
        };
        let max_sequence_length = request.max_sequence_length.unwrap_or(max_length);
        let strength = request.init_image.as_ref().map(|_| request.strength);
        let first_step = strength.map_or(0, |s| sampling::first_step(steps, s));
        request.check_runs_a_step(steps, steps - first_step)?;
        Ok(FluxRun {
            steps,
            guidance: if request.given.guidance {
                request.guidance
            } else {
                guidance
            },
            max_sequence_length,
            first_step,
        })
    }

    /// The steps that run (img2img: from `first_step` on).
    pub fn steps_run(&self) -> usize {
        self.steps - self.first_step
    }
}
