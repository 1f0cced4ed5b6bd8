//! Single-file (LDM / A1111 style) Stable Diffusion 1.x and SDXL
//! checkpoints: `model.diffusion_model.*`, `first_stage_model.*` and
//! `cond_stage_model.transformer.text_model.*` (SDXL:
//! `conditioner.embedders.0.transformer.text_model.*` and the OpenCLIP
//! `conditioner.embedders.1.model.*`) renamed to the diffusers layout, with
//! the shapes read from the LDM yaml where it has them and inferred from
//! the tensors otherwise.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::config::UnetJson;
use super::scheduler::SchedulerJson;
use super::weights::{load_tensors, TensorMap};
use super::ImageError;
use crate::engine::image::config::{read_json, ClipJson, VaeJson};
use crate::engine::image::encoders::open_clip;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const TEXT: &str = "cond_stage_model.transformer.";
const XL_TEXT: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// `key: value` lines of an LDM yaml whose keys are unique in it; enough
/// for the few scalars the networks need, without a YAML parser.
pub struct LdmYaml(HashMap<String, String>);

impl LdmYaml {
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ImageError::Files(format!("{}: {e}", path.display())))?;
        let pairs = text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .filter(|(k, v)| !k.starts_with('#') && !v.is_empty())
            .collect();
        Ok(LdmYaml(pairs))
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.0.get(key)?.parse().ok()
    }

    fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

/// The networks' tensors under diffusers names.
pub struct Renamed {
    pub unet: TensorMap,
    pub vae: TensorMap,
    pub text_encoder: TensorMap,
    /// SDXL's second text encoder, in transformers naming.
    pub text_encoder_2: Option<TensorMap>,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("{}: {what}", path.display()))
}

/// Splits and renames the checkpoint's tensors.
pub fn rename(path: &Path) -> Result<Renamed, ImageError> {
    let tensors = load_tensors(&[path.to_path_buf()])?;
    let xl = tensors.keys().any(|k| k.starts_with(XL_OPEN_CLIP));
    let text = if xl { XL_TEXT } else { TEXT };
    if !tensors.keys().any(|k| k.starts_with(text)) {
        return Err(bad(
            path,
            format!("no {text}* tensors (only SD 1.x and SDXL base single files are supported)"),
        ));
    }
    let layers = unet_layers_per_block(&tensors)
        .ok_or_else(|| bad(path, "no model.diffusion_model.input_blocks"))?;
    let vae_blocks = indices(&tensors, &format!("{VAE}decoder.up.")).len();
    let mut renamed = Renamed {
        unet: TensorMap::new(),
        vae: TensorMap::new(),
        text_encoder: TensorMap::new(),
        text_encoder_2: xl.then(TensorMap::new),
    };
    for (key, tensor) in tensors {
        if let Some(rest) = key.strip_prefix(UNET) {
            renamed.unet.insert(unet_name(rest, layers), tensor);
        } else if let Some(rest) = key.strip_prefix(VAE) {
            let (name, tensor) = vae_entry(rest, vae_blocks, tensor)?;
            renamed.vae.insert(name, tensor);
        } else if let Some(rest) = key.strip_prefix(text) {
            renamed.text_encoder.insert(rest.to_owned(), tensor);
        } else if let (Some(rest), Some(second)) = (
            key.strip_prefix(XL_OPEN_CLIP),
            renamed.text_encoder_2.as_mut(),
        ) {
            open_clip::insert(second, rest, tensor)?;
        }
    }
    Ok(renamed)
}

/// A VAE saved on its own in LDM naming (FLUX's `ae.safetensors`, the
/// files of ComfyUI's `vae/`) under diffusers' names; a file already in
/// diffusers' naming passes unchanged.
pub fn vae_from_ldm(tensors: TensorMap) -> Result<TensorMap, ImageError> {
    if !tensors.keys().any(|k| k.starts_with("decoder.up.")) {
        return Ok(tensors);
    }
    let blocks = indices(&tensors, "decoder.up.").len();
    tensors
        .into_iter()
        .map(|(key, tensor)| vae_entry(&key, blocks, tensor))
        .collect()
}

/// The distinct numbers `n` of keys starting with `prefix` then `n.`.
pub(crate) fn indices(tensors: &TensorMap, prefix: &str) -> BTreeSet<usize> {
    tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect()
}

/// How many numbered blocks under `prefix` a file holds: one more than
/// the highest number, so a missing block is looked for and reported.
pub(crate) fn block_count(tensors: &TensorMap, prefix: &str) -> usize {
    indices(tensors, prefix).last().map_or(0, |n| n + 1)
}

/// Resnets per down block: the first downsampler sits right after them.
fn unet_layers_per_block(tensors: &TensorMap) -> Option<usize> {
    let inputs = indices(tensors, &format!("{UNET}input_blocks."));
    let first_op = inputs
        .iter()
        .find(|k| tensors.contains_key(&format!("{UNET}input_blocks.{k}.0.op.weight")));
    match first_op {
        Some(k) => Some(k - 1),
        None => inputs.last().copied(),
    }
}

fn resnet_part(rest: &str) -> String {
    let renames = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    renames
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
        .unwrap_or_else(|| rest.to_owned())
}

/// `(block number, layer number, the rest)` of `input_blocks.3.1.norm.weight`.
fn numbered(rest: &str) -> Option<(usize, usize, &str)> {
    let mut parts = rest.splitn(3, '.');
    let block = parts.next()?.parse().ok()?;
    let layer = parts.next()?.parse().ok()?;
    Some((block, layer, parts.next()?))
}

/// The diffusers name of UNet tensor `rest` (after `model.diffusion_model.`);
/// `layers` is the resnet count of a down block.
pub fn unet_name(rest: &str, layers: usize) -> String {
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ];
    if let Some(name) = fixed
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
    {
        return name;
    }
    if let Some((index, 0, tail)) = rest.strip_prefix("middle_block.").and_then(numbered_single) {
        return format!("mid_block.resnets.{}.{}", index / 2, resnet_part(tail));
    }
    if let Some((k, layer, tail)) = rest.strip_prefix("input_blocks.").and_then(numbered) {
        let (block, j) = ((k - 1) / (layers + 1), (k - 1) % (layers + 1));
        return match (j == layers, layer) {
            (true, _) => format!(
                "down_blocks.{block}.downsamplers.0.conv.{}",
                tail.trim_start_matches("op.")
            ),
            (false, 0) => format!("down_blocks.{block}.resnets.{j}.{}", resnet_part(tail)),
            (false, _) => format!("down_blocks.{block}.attentions.{j}.{tail}"),
        };
    }
    if let Some((k, layer, tail)) = rest.strip_prefix("output_blocks.").and_then(numbered) {
        let (block, j) = (k / (layers + 1), k % (layers + 1));
        return match (layer, tail.strip_prefix("conv.")) {
            (0, _) => format!("up_blocks.{block}.resnets.{j}.{}", resnet_part(tail)),
            (_, Some(conv)) => format!("up_blocks.{block}.upsamplers.0.conv.{conv}"),
            (_, None) => format!("up_blocks.{block}.attentions.{j}.{tail}"),
        };
    }
    rest.to_owned()
}

/// `middle_block.0.in_layers...` → `(0, 0, "in_layers...")`: the mid
/// block's resnets are its layers 0 and 2.
fn numbered_single(rest: &str) -> Option<(usize, usize, &str)> {
    let (index, tail) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    (index != 1).then_some((index, 0, tail))
}

/// The diffusers name (and shape) of VAE tensor `rest` (after `first_stage_model.`).
fn vae_entry(rest: &str, blocks: usize, tensor: Tensor) -> Result<(String, Tensor), ImageError> {
    let (side, tail) = rest.split_once('.').unwrap_or((rest, ""));
    if side != "encoder" && side != "decoder" {
        return Ok((rest.to_owned(), tensor));
    }
    if let Some(attention) = tail.strip_prefix("mid.attn_1.") {
        return vae_attention(side, attention, tensor);
    }
    Ok((format!("{side}.{}", vae_block_name(tail, blocks)), tensor))
}

fn vae_block_name(tail: &str, blocks: usize) -> String {
    let resnet = |s: &str| s.replace("nin_shortcut.", "conv_shortcut.");
    if let Some(rest) = tail.strip_prefix("norm_out.") {
        return format!("conv_norm_out.{rest}");
    }
    if let Some(rest) = tail.strip_prefix("mid.block_") {
        let (n, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let index = n.parse::<usize>().unwrap_or(1).saturating_sub(1);
        return format!("mid_block.resnets.{index}.{}", resnet(rest));
    }
    for (ldm, diffusers, reversed) in [("down.", "down_blocks", false), ("up.", "up_blocks", true)]
    {
        let Some((i, kind, rest)) = tail.strip_prefix(ldm).and_then(vae_numbered) else {
            continue;
        };
        let block = if reversed {
            blocks.saturating_sub(1 + i)
        } else {
            i
        };
        return match kind {
            VaePart::Resnet(j) => format!("{diffusers}.{block}.resnets.{j}.{}", resnet(rest)),
            VaePart::Downsample => format!("{diffusers}.{block}.downsamplers.0.{rest}"),
            VaePart::Upsample => format!("{diffusers}.{block}.upsamplers.0.{rest}"),
        };
    }
    tail.to_owned()
}

enum VaePart {
    Resnet(usize),
    Downsample,
    Upsample,
}

/// `1.block.0.conv1.weight` → `(1, Resnet(0), "conv1.weight")`.
fn vae_numbered(rest: &str) -> Option<(usize, VaePart, &str)> {
    let (i, rest) = rest.split_once('.')?;
    let i = i.parse().ok()?;
    if let Some(rest) = rest.strip_prefix("block.") {
        let (j, rest) = rest.split_once('.')?;
        return Some((i, VaePart::Resnet(j.parse().ok()?), rest));
    }
    if let Some(rest) = rest.strip_prefix("downsample.") {
        return Some((i, VaePart::Downsample, rest));
    }
    Some((i, VaePart::Upsample, rest.strip_prefix("upsample.")?))
}

/// The mid-block attention: 1×1 convolutions become linear layers.
fn vae_attention(side: &str, rest: &str, tensor: Tensor) -> Result<(String, Tensor), ImageError> {
    let (layer, param) = rest.split_once('.').unwrap_or((rest, ""));
    let name = match layer {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        other => other,
    };
    let tensor = match tensor.dims() {
        [out, inp, 1, 1] => tensor.reshape((*out, *inp))?,
        _ => tensor,
    };
    Ok((
        format!("{side}.mid_block.attentions.0.{name}.{param}"),
        tensor,
    ))
}

pub(crate) fn dim(tensors: &TensorMap, key: &str, axis: usize) -> Result<usize, ImageError> {
    let tensor = tensors
        .get(key)
        .ok_or_else(|| ImageError::Unsupported(format!("single-file checkpoint lacks {key}")))?;
    Ok(tensor.dim(axis)?)
}

/// The UNet config the renamed tensors (and the yaml's head count)
/// describe; `projection_dim` is SDXL's second text encoder's, from which
/// the time ids' embedding width follows when the yaml lacks `outdim`.
pub fn unet_json(
    unet: &TensorMap,
    yaml: Option<&LdmYaml>,
    projection_dim: Option<usize>,
) -> Result<UnetJson, ImageError> {
    let blocks = indices(unet, "down_blocks.").len();
    let channels = (0..blocks)
        .map(|i| dim(unet, &format!("down_blocks.{i}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let layers = indices(unet, "down_blocks.0.resnets.").len();
    // Transformer blocks per attention (one where a block has none, which
    // diffusers then ignores); the mid block has the last block's depth.
    let depths: Vec<usize> = (0..blocks)
        .map(|i| {
            let prefix = format!("down_blocks.{i}.attentions.0.transformer_blocks.");
            indices(unet, &prefix).len()
        })
        .collect();
    let linear = unet
        .get("mid_block.attentions.0.proj_in.weight")
        .is_some_and(|t| t.rank() == 2);
    let heads = |c: usize| match (
        yaml.and_then(|y| y.number("num_heads")),
        yaml.and_then(|y| y.number("num_head_channels")),
    ) {
        (Some(h), _) if h > 0.0 => h as usize,
        (_, Some(d)) if d > 0.0 => c / d as usize,
        // diffusers' inference: SD 2.x and SDXL (linear projections) have
        // 64-channel heads, SD 1.x 8 heads.
        _ if linear => c / 64,
        _ => 8,
    };
    let context = dim(
        unet,
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        1,
    )?;
    let mut value = json!({
        "in_channels": dim(unet, "conv_in.weight", 1)?,
        "out_channels": dim(unet, "conv_out.weight", 0)?,
        "block_out_channels": channels,
        "down_block_types": depths.iter().map(|d| if *d > 0 { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
        "up_block_types": depths.iter().rev().map(|d| if *d > 0 { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect::<Vec<_>>(),
        "layers_per_block": layers,
        "attention_head_dim": channels.iter().map(|c| heads(*c)).collect::<Vec<_>>(),
        "cross_attention_dim": context,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths.iter().map(|d| (*d).max(1)).collect::<Vec<_>>(),
    });
    if unet.contains_key("add_embedding.linear_1.weight") {
        let input = dim(unet, "add_embedding.linear_1.weight", 1)?;
        let from_yaml = yaml.and_then(|y| y.number("outdim")).map(|d| d as usize);
        // SDXL embeds 6 time ids after the pooled text embedding.
        let inferred = projection_dim.map(|p| input.saturating_sub(p) / 6);
        value["addition_embed_type"] = json!("text_time");
        value["addition_time_embed_dim"] = json!(from_yaml.or(inferred));
        value["projection_class_embeddings_input_dim"] = json!(input);
    }
    serde_json::from_value(value).map_err(|e| ImageError::Unsupported(e.to_string()))
}

/// The VAE config the renamed tensors (and the yaml's scale) describe;
/// without a yaml scale, SDXL's VAE (`xl`) is scaled by 0.13025 as in
/// diffusers' SDXL default, SD's by 0.18215.
pub fn vae_json(vae: &TensorMap, yaml: Option<&LdmYaml>, xl: bool) -> Result<VaeJson, ImageError> {
    let default_scale = if xl { 0.13025 } else { 0.18215 };
    let blocks = indices(vae, "encoder.down_blocks.").len();
    let channels = (0..blocks)
        .map(|i| {
            dim(
                vae,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let value = json!({
        "block_out_channels": channels,
        "layers_per_block": indices(vae, "encoder.down_blocks.0.resnets.").len(),
        "latent_channels": dim(vae, "decoder.conv_in.weight", 1)?,
        "scaling_factor": yaml.and_then(|y| y.number("scale_factor")).unwrap_or(default_scale),
        "use_quant_conv": vae.contains_key("quant_conv.weight"),
        "use_post_quant_conv": vae.contains_key("post_quant_conv.weight"),
    });
    serde_json::from_value(value).map_err(|e| ImageError::Unsupported(e.to_string()))
}

/// The text encoder config: `config_dir/text_encoder/config.json` when
/// there is one (head count is not in the weights), else inferred with
/// CLIP's 64-wide heads.
pub fn clip_json(text: &TensorMap, config_dir: &Path) -> Result<ClipJson, ImageError> {
    config_or(config_dir, "text_encoder", || {
        clip_from_value(inferred_clip(text)?)
    })
}

/// SDXL's second text encoder config: `config_dir/text_encoder_2/config.json`
/// when there is one, else inferred as OpenCLIP's: 64-wide heads, exact
/// GELU, pooled at the largest id (`eos_token_id` 2, as OpenCLIP pools at
/// the end token, the last of its vocabulary).
pub fn clip_json_2(text: &TensorMap, config_dir: &Path) -> Result<ClipJson, ImageError> {
    config_or(config_dir, "text_encoder_2", || {
        let mut value = inferred_clip(text)?;
        value["hidden_act"] = json!("gelu");
        value["projection_dim"] = json!(dim(text, "text_projection.weight", 0)?);
        value["eos_token_id"] = json!(2);
        clip_from_value(value)
    })
}

/// A CLIP text encoder's shape read off its weights, with 64-wide heads.
fn inferred_clip(text: &TensorMap) -> Result<serde_json::Value, ImageError> {
    let hidden = dim(text, "text_model.embeddings.token_embedding.weight", 1)?;
    Ok(json!({
        "vocab_size": dim(text, "text_model.embeddings.token_embedding.weight", 0)?,
        "hidden_size": hidden,
        "intermediate_size": dim(text, "text_model.encoder.layers.0.mlp.fc1.weight", 0)?,
        "num_hidden_layers": indices(text, "text_model.encoder.layers.").len(),
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(text, "text_model.embeddings.position_embedding.weight", 0)?,
    }))
}

fn clip_from_value(value: serde_json::Value) -> Result<ClipJson, ImageError> {
    serde_json::from_value(value).map_err(|e| ImageError::Unsupported(e.to_string()))
}

/// `config_dir/component/config.json` when there is one (what diffusers'
/// `from_single_file(config=...)` reads: a checkpoint holds no group
/// counts, and LDM's are always 32), else `infer()`.
pub fn config_or<T: serde::de::DeserializeOwned>(
    config_dir: &Path,
    component: &str,
    infer: impl FnOnce() -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    let file = config_dir.join(component).join("config.json");
    if file.is_file() {
        return read_json(&file);
    }
    infer()
}

/// `model_index.json`'s `force_zeros_for_empty_prompt` in `config_dir`,
/// else `StableDiffusionXLPipeline`'s default (true).
pub fn force_zeros_for_empty_prompt(config_dir: &Path) -> bool {
    read_json::<serde_json::Value>(&config_dir.join("model_index.json"))
        .ok()
        .and_then(|index| index["force_zeros_for_empty_prompt"].as_bool())
        .unwrap_or(true)
}

/// The scheduler: `config_dir/scheduler/scheduler_config.json` when there
/// is one, else the LDM training schedule from the yaml.
pub fn scheduler_json(
    config_dir: &Path,
    yaml: Option<&LdmYaml>,
) -> Result<SchedulerJson, ImageError> {
    let file = config_dir.join("scheduler/scheduler_config.json");
    if file.is_file() {
        return SchedulerJson::read(&file);
    }
    let number = |key: &str, default: f64| yaml.and_then(|y| y.number(key)).unwrap_or(default);
    let velocity = yaml.and_then(|y| y.text("parameterization")) == Some("v");
    let value = json!({
        "num_train_timesteps": number("timesteps", 1000.0) as usize,
        "beta_start": number("linear_start", 0.00085),
        "beta_end": number("linear_end", 0.012),
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": if velocity { "v_prediction" } else { "epsilon" },
    });
    serde_json::from_value(value).map_err(|e| ImageError::Unsupported(e.to_string()))
}
