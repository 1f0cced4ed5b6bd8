//! Prompt → what the UNet is conditioned on. SD 1.x/2.x: one CLIP
//! encoder's `last_hidden_state`. SDXL (diffusers
//! `StableDiffusionXLPipeline`): the penultimate states of both encoders
//! side by side on the channel axis, plus the added conditioning: the
//! second encoder's projected pooled output (`text_embeds`) and the
//! `time_ids` (original size, crop top-left, target size).

use candle_core::{DType, Device, Tensor};

use super::config::TextTimeShape;
use crate::engine::image::config::ClipJson;
use crate::engine::image::encoders::clip::{ClipTextModel, ClipWithProjection};
use crate::engine::image::encoders::prompt::PromptTokenizer;
use crate::engine::image::encoders::EncoderParts;
use crate::engine::image::request::ValidImageRequest;
use crate::engine::image::weights::recording;
use crate::engine::image::ImageError;

/// SDXL's time ids per picture: `(height, width)` twice around the crop
/// corner `(0, 0)`.
pub const TIME_IDS: usize = 6;

/// The UNet's inputs besides the latents and the timestep, one row per
/// UNet batch entry.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `(batch, tokens, cross_attention_dim)`: what cross-attention reads.
    pub context: Tensor,
    /// SDXL's added conditioning; `None` for SD 1.x/2.x.
    pub added: Option<AddedConditioning>,
}

/// SDXL's `added_cond_kwargs`.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `(batch, projection_dim)`: the second encoder's pooled output.
    pub text_embeds: Tensor,
    /// `(batch, 6)`, f32.
    pub time_ids: Tensor,
}

impl Conditioning {
    /// Every row `count` times.
    fn repeat(&self, count: usize) -> Result<Self, ImageError> {
        Ok(Conditioning {
            context: self.context.repeat((count, 1, 1))?,
            added: self
                .added
                .as_ref()
                .map(|a| -> Result<_, ImageError> {
                    Ok(AddedConditioning {
                        text_embeds: a.text_embeds.repeat((count, 1))?,
                        time_ids: a.time_ids.repeat((count, 1))?,
                    })
                })
                .transpose()?,
        })
    }

    /// `first`'s rows, then `second`'s.
    fn cat(first: &Self, second: &Self) -> Result<Self, ImageError> {
        let added = match (&first.added, &second.added) {
            (Some(a), Some(b)) => Some(AddedConditioning {
                text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
                time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
            }),
            _ => None,
        };
        Ok(Conditioning {
            context: Tensor::cat(&[&first.context, &second.context], 0)?,
            added,
        })
    }

    /// The embeddings at `dtype` (the time ids stay f32: the UNet embeds
    /// them at full precision).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self, ImageError> {
        Ok(Conditioning {
            context: self.context.to_dtype(dtype)?,
            added: self
                .added
                .as_ref()
                .map(|a| -> Result<_, ImageError> {
                    Ok(AddedConditioning {
                        text_embeds: a.text_embeds.to_dtype(dtype)?,
                        time_ids: a.time_ids.clone(),
                    })
                })
                .transpose()?,
        })
    }

    /// diffusers' `force_zeros_for_empty_prompt` uncond: zero embeddings,
    /// the same time ids.
    fn zeros_like(&self) -> Result<Self, ImageError> {
        Ok(Conditioning {
            context: self.context.zeros_like()?,
            added: self
                .added
                .as_ref()
                .map(|a| -> Result<_, ImageError> {
                    Ok(AddedConditioning {
                        text_embeds: a.text_embeds.zeros_like()?,
                        time_ids: a.time_ids.clone(),
                    })
                })
                .transpose()?,
        })
    }
}

/// A CLIP encoder with its tokenizer.
pub struct Encoder {
    pub(crate) tokenizer: PromptTokenizer,
    model: ClipTextModel,
}

/// SDXL's second encoder (`CLIPTextModelWithProjection`) with its tokenizer.
pub struct ProjectedEncoder {
    pub(crate) tokenizer: PromptTokenizer,
    model: ClipWithProjection,
}

/// The pipeline's text side: SD 1.x/2.x's one encoder, or SDXL's two.
pub struct TextEncoders {
    pub(crate) first: Encoder,
    /// SDXL's second encoder; `None` for SD 1.x/2.x.
    pub(crate) second: Option<ProjectedEncoder>,
    /// SDXL: an absent negative prompt gives zero uncond embeddings.
    force_zeros_for_empty_prompt: bool,
}

fn ids_tensor(
    tokenizer: &PromptTokenizer,
    text: &str,
    device: &Device,
) -> Result<Tensor, ImageError> {
    let ids = tokenizer.ids(text)?;
    Ok(Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?)
}

impl Encoder {
    /// Builds the encoder from `parts`, whose weights become what it
    /// holds (see `weights::recording`).
    fn new(parts: &mut EncoderParts, dtype: DType, device: &Device) -> Result<Self, ImageError> {
        let config = parts.clip_json.to_config()?;
        let (vb, taken) = recording(std::mem::take(&mut parts.weights), dtype, device);
        let model = ClipTextModel::new(vb, &config)?;
        parts.weights = taken.into_map();
        Ok(Encoder {
            tokenizer: parts.tokenizer.clone(),
            model,
        })
    }
}

impl ProjectedEncoder {
    /// As `Encoder::new`.
    fn new(parts: &mut EncoderParts, dtype: DType, device: &Device) -> Result<Self, ImageError> {
        let config = parts.clip_json.to_config()?;
        let (vb, taken) = recording(std::mem::take(&mut parts.weights), dtype, device);
        let json = &parts.clip_json;
        let model = ClipWithProjection::new(vb, &config, json.projection_dim, json.eos_token_id)?;
        parts.weights = taken.into_map();
        Ok(ProjectedEncoder {
            tokenizer: parts.tokenizer.clone(),
            model,
        })
    }
}

/// What the UNet expects of the text side, checked at load so that a
/// mismatch is refused by name rather than failing inside a run.
pub struct UnetExpects {
    pub cross_attention_dim: usize,
    pub text_time: Option<TextTimeShape>,
}

impl TextEncoders {
    /// SD 1.x/2.x with `first` alone; SDXL with `second` too.
    pub fn new(
        first: &mut EncoderParts,
        second: Option<&mut EncoderParts>,
        force_zeros_for_empty_prompt: bool,
        unet: &UnetExpects,
        (dtype, device): (DType, &Device),
    ) -> Result<Self, ImageError> {
        check_shapes(
            &first.clip_json,
            second.as_ref().map(|s| &s.clip_json),
            unet,
        )?;
        Ok(TextEncoders {
            first: Encoder::new(first, dtype, device)?,
            second: second
                .map(|parts| ProjectedEncoder::new(parts, dtype, device))
                .transpose()?,
            force_zeros_for_empty_prompt,
        })
    }

    /// The UNet's conditioning for `request`: `[uncond; count] ++
    /// [prompt; count]` with guidance, `[prompt; count]` without.
    pub fn conditioning(
        &self,
        request: &ValidImageRequest,
        device: &Device,
    ) -> Result<Conditioning, ImageError> {
        let size = (request.height, request.width);
        let prompt = self.encode(&request.prompt, size, device)?;
        if !request.classifier_free_guidance() {
            return prompt.repeat(request.count);
        }
        let zeroed = self.second.is_some() && self.force_zeros_for_empty_prompt;
        let uncond = match request.negative_prompt.as_deref() {
            None if zeroed => prompt.zeros_like()?,
            negative => self.encode(negative.unwrap_or(""), size, device)?,
        };
        Conditioning::cat(
            &uncond.repeat(request.count)?,
            &prompt.repeat(request.count)?,
        )
    }

    /// One text's conditioning (batch 1, f32) for a `(height, width)` picture.
    pub fn encode(
        &self,
        text: &str,
        (height, width): (usize, usize),
        device: &Device,
    ) -> Result<Conditioning, ImageError> {
        let first_ids = ids_tensor(&self.first.tokenizer, text, device)?;
        let Some(second) = &self.second else {
            return Ok(Conditioning {
                context: self.first.model.forward(&first_ids)?.to_dtype(DType::F32)?,
                added: None,
            });
        };
        let second_ids = ids_tensor(&second.tokenizer, text, device)?;
        let first_states = self.first.model.hidden_states(&first_ids)?;
        let second_states = second.model.forward(&second_ids)?;
        let context = Tensor::cat(&[&first_states.penultimate, &second_states.penultimate], 2)?;
        let (h, w) = (height as f32, width as f32);
        Ok(Conditioning {
            context: context.to_dtype(DType::F32)?,
            added: Some(AddedConditioning {
                text_embeds: second_states.text_embeds.to_dtype(DType::F32)?,
                time_ids: Tensor::new(&[[h, w, 0.0, 0.0, h, w]], device)?,
            }),
        })
    }

    /// Whether this is SDXL's pair of encoders.
    pub fn is_xl(&self) -> bool {
        self.second.is_some()
    }
}

/// The encoders' widths against the UNet's: cross-attention reads both
/// hidden sizes side by side, and `add_embedding` the time ids' embeddings
/// and the projection.
fn check_shapes(
    first: &ClipJson,
    second: Option<&ClipJson>,
    unet: &UnetExpects,
) -> Result<(), ImageError> {
    let context = first.hidden_size + second.map_or(0, |s| s.hidden_size);
    if context != unet.cross_attention_dim {
        return Err(ImageError::Unsupported(format!(
            "unet/config.json: cross_attention_dim {} does not match the text encoders' hidden size {context}",
            unet.cross_attention_dim
        )));
    }
    match (second, unet.text_time) {
        (None, None) => Ok(()),
        (Some(second), Some(shape)) => {
            let expected = TIME_IDS * shape.time_embed_dim + second.projection_dim;
            if shape.input_dim == expected {
                return Ok(());
            }
            Err(ImageError::Unsupported(format!(
                "unet/config.json: projection_class_embeddings_input_dim {} is not {TIME_IDS} time ids x addition_time_embed_dim {} + text_encoder_2 projection_dim {} = {expected}",
                shape.input_dim, shape.time_embed_dim, second.projection_dim
            )))
        }
        (None, Some(_)) => Err(ImageError::Unsupported(
            "unet/config.json: addition_embed_type \"text_time\" needs a second text encoder (text_encoder_2)".into(),
        )),
        (Some(_), None) => Err(ImageError::Unsupported(
            "unet/config.json: a pipeline with text_encoder_2 needs addition_embed_type \"text_time\"".into(),
        )),
    }
}
