//! Where a FLUX pipeline's VAE and text encoders come from: the
//! subfolders of a diffusers-layout folder, or files kept apart as a
//! ComfyUI tree keeps them (`vae/ae.safetensors` in LDM naming,
//! `text_encoders/clip_l.safetensors` and `t5xxl_*.safetensors` in
//! transformers naming, told apart by their tensor names). Configs come
//! from the folder when it has them, else are read off the weights.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::super::config::{read_json, ClipJson, VaeJson};
use super::super::encoders::clip::with_text_model_prefix;
use super::super::encoders::t5::T5Json;
use super::super::sd::single_file::{block_count, clip_json, dim, vae_from_ldm, vae_json};
use super::super::weights::{component_files, load_tensors, tensor_names, TensorMap};
use super::super::{ImageError, ImageParts};

/// FLUX's autoencoder latents are scaled and shifted by these (BFL's
/// `ae.safetensors` carries no config).
const FLUX_VAE_SCALING: f64 = 0.3611;
const FLUX_VAE_SHIFT: f64 = 0.1159;

/// The folder supplying configs and tokenizers, and the files given apart.
pub struct Sources<'a> {
    pub config_dir: &'a Path,
    vae: Option<&'a Path>,
    clip: Option<PathBuf>,
    t5: Option<PathBuf>,
}

impl<'a> Sources<'a> {
    /// Everything from the diffusers folder `root`.
    pub fn folder(root: &'a Path) -> Self {
        Sources {
            config_dir: root,
            vae: None,
            clip: None,
            t5: None,
        }
    }

    /// `parts`' files, the rest from its config folder (else the folder of
    /// `transformer`).
    pub fn separate(transformer: &'a Path, parts: &'a ImageParts) -> Result<Self, ImageError> {
        let mut sources = Sources {
            config_dir: parts.config_dir_for(transformer),
            vae: parts.vae.as_deref(),
            clip: None,
            t5: None,
        };
        for file in &parts.text_encoders {
            let slot = match encoder_kind(file)? {
                Encoder::Clip => &mut sources.clip,
                Encoder::T5 => &mut sources.t5,
            };
            if let Some(first) = slot.replace(file.clone()) {
                return Err(ImageError::Unsupported(format!(
                    "{} and {} are both {} text encoders; FLUX takes one CLIP and one T5",
                    first.display(),
                    file.display(),
                    encoder_kind(file)?.name()
                )));
            }
        }
        Ok(sources)
    }

    fn component(&self, name: &str, stem: &str) -> Result<TensorMap, ImageError> {
        load_tensors(&component_files(&self.config_dir.join(name), stem)?)
    }

    fn config_file(&self, component: &str) -> Option<PathBuf> {
        let file = self.config_dir.join(component).join("config.json");
        file.is_file().then_some(file)
    }

    /// The VAE's config and weights under diffusers names.
    pub fn vae(&self) -> Result<(VaeJson, TensorMap), ImageError> {
        let weights = match self.vae {
            None => self.component("vae", "diffusion_pytorch_model")?,
            Some(file) => vae_from_ldm(load_tensors(&[file.to_path_buf()])?)?,
        };
        let json = match self.config_file("vae") {
            Some(file) => read_json(&file)?,
            None => {
                let mut json = vae_json(&weights, None, false)?;
                json.scaling_factor = FLUX_VAE_SCALING;
                json.shift_factor = Some(FLUX_VAE_SHIFT);
                json
            }
        };
        Ok((json, weights))
    }

    /// CLIP's config and weights (under `text_model.`).
    pub fn clip(&self) -> Result<(ClipJson, TensorMap), ImageError> {
        let weights = match &self.clip {
            None => self.component("text_encoder", "model")?,
            Some(file) => load_tensors(std::slice::from_ref(file))?,
        };
        let weights = with_text_model_prefix(weights);
        Ok((clip_json(&weights, self.config_dir)?, weights))
    }

    /// T5's config and weights.
    pub fn t5(&self) -> Result<(T5Json, TensorMap), ImageError> {
        let weights = match &self.t5 {
            None => self.component("text_encoder_2", "model")?,
            Some(file) => load_tensors(std::slice::from_ref(file))?,
        };
        let json = match self.config_file("text_encoder_2") {
            Some(file) => read_json(&file)?,
            None => inferred_t5(&weights)?,
        };
        Ok((json, weights))
    }
}

#[derive(Debug, Clone, Copy)]
enum Encoder {
    Clip,
    T5,
}

impl Encoder {
    fn name(self) -> &'static str {
        match self {
            Encoder::Clip => "CLIP",
            Encoder::T5 => "T5",
        }
    }
}

/// A text encoder file's kind, by its tensor names.
fn encoder_kind(file: &Path) -> Result<Encoder, ImageError> {
    let names = tensor_names(file)?;
    if names
        .iter()
        .any(|n| n.starts_with("encoder.block.") || n == "shared.weight")
    {
        return Ok(Encoder::T5);
    }
    if names.iter().any(|n| n.contains("token_embedding")) {
        return Ok(Encoder::Clip);
    }
    Err(ImageError::Unsupported(format!(
        "{}: neither a CLIP nor a T5 text encoder (no token_embedding or encoder.block tensors)",
        file.display()
    )))
}

/// A T5 encoder's config read off its weights, with T5 v1.1's 64-wide
/// heads and 128 maximum distance.
fn inferred_t5(weights: &TensorMap) -> Result<T5Json, ImageError> {
    let dim = |key: &str, axis: usize| dim(weights, key, axis);
    let table = if weights.contains_key("shared.weight") {
        "shared.weight"
    } else {
        "encoder.embed_tokens.weight"
    };
    let block = "encoder.block.0.layer";
    let gated = weights.contains_key(&format!("{block}.1.DenseReluDense.wi_0.weight"));
    let inner = dim(&format!("{block}.0.SelfAttention.q.weight"), 0)?;
    let wi = if gated { "wi_0" } else { "wi" };
    let layers = block_count(weights, "encoder.block.");
    let value = json!({
        "vocab_size": dim(table, 0)?,
        "d_model": dim(table, 1)?,
        "d_kv": 64,
        "d_ff": dim(&format!("{block}.1.DenseReluDense.{wi}.weight"), 0)?,
        "num_layers": layers,
        "num_heads": (inner / 64).max(1),
        "relative_attention_num_buckets":
            dim(&format!("{block}.0.SelfAttention.relative_attention_bias.weight"), 0)?,
        "feed_forward_proj": if gated { "gated-gelu" } else { "relu" },
    });
    serde_json::from_value(value).map_err(|e| ImageError::Unsupported(e.to_string()))
}
