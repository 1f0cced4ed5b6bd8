//! Single-file FLUX transformers: Black Forest Labs' naming (as
//! `flux1-dev.safetensors` and ComfyUI's `diffusion_models/` files have
//! it, with or without `model.diffusion_model.`) renamed to diffusers',
//! splitting the fused projections as diffusers' converter does: each
//! block's `qkv` into q, k and v, a single block's `linear1` into q, k, v
//! and the MLP's input, and the final modulation's (shift, scale) swapped
//! to diffusers' (scale, shift). A file already in diffusers naming passes
//! unchanged. Per-layer fp8 scales follow their weights.

use std::path::Path;

use candle_core::Tensor;

use super::config::FluxJson;
use crate::engine::image::config::read_json;
use crate::engine::image::sd::single_file::{block_count, dim};
use crate::engine::image::weights::{load_tensors, TensorMap};
use crate::engine::image::ImageError;

/// The prefix full checkpoints put before the transformer's keys.
const PREFIX: &str = "model.diffusion_model.";

/// Whether `keys` are those of a FLUX transformer, in either naming.
pub fn is_flux_transformer<'a>(mut keys: impl Iterator<Item = &'a str>) -> bool {
    keys.any(|key| {
        let key = key.strip_prefix(PREFIX).unwrap_or(key);
        key.starts_with("double_blocks.") || key.starts_with("single_transformer_blocks.")
    })
}

/// The transformer in `path` under diffusers names, and its config:
/// `config_dir/transformer/config.json` when there is one, else read off
/// the weights; `guidance_embeds` is always the weights'.
pub fn transformer(path: &Path, config_dir: &Path) -> Result<(FluxJson, TensorMap), ImageError> {
    let tensors = load_tensors(&[path.to_path_buf()])?;
    let renamed = if tensors.keys().any(|k| k.contains("double_blocks.")) {
        rename(tensors)?
    } else {
        tensors
    };
    let config_file = config_dir.join("transformer/config.json");
    let json = if config_file.is_file() {
        read_json(&config_file)?
    } else {
        inferred_config(&renamed)?
    };
    Ok((super::with_guidance_from_weights(json, &renamed), renamed))
}

fn bad(what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("FLUX single file: {what}"))
}

/// The diffusers names of every tensor.
fn rename(tensors: TensorMap) -> Result<TensorMap, ImageError> {
    let hidden = tensors
        .iter()
        .find(|(k, _)| k.ends_with("img_in.weight"))
        .map(|(_, t)| t.dim(0))
        .transpose()?
        .ok_or_else(|| bad("no img_in.weight"))?;
    let mut out = TensorMap::new();
    for (key, tensor) in tensors {
        let key = key.strip_prefix(PREFIX).unwrap_or(&key).to_owned();
        for (name, tensor) in bfl_entries(&key, tensor, hidden)? {
            out.insert(name, tensor);
        }
    }
    Ok(out)
}

/// A weight's suffix: `weight`, `bias`, or an fp8 scale.
fn split_suffix(key: &str) -> (&str, &str) {
    key.rsplit_once('.').unwrap_or((key, ""))
}

/// The diffusers entries of one BFL tensor (without the checkpoint
/// prefix); `hidden` cuts fused projections.
pub(crate) fn bfl_entries(
    key: &str,
    tensor: Tensor,
    hidden: usize,
) -> Result<Vec<(String, Tensor)>, ImageError> {
    // Markers and activation scales that only fp8 matmuls read.
    if key == "scaled_fp8" || key.ends_with(".scale_input") || key.ends_with(".input_scale") {
        return Ok(Vec::new());
    }
    let (module, suffix) = split_suffix(key);
    if let Some(rest) = module.strip_prefix("double_blocks.") {
        let (index, part) = rest.split_once('.').ok_or_else(|| bad(key))?;
        let base = format!("transformer_blocks.{index}");
        return double_block(&base, part, suffix, tensor, hidden);
    }
    if let Some(rest) = module.strip_prefix("single_blocks.") {
        let (index, part) = rest.split_once('.').ok_or_else(|| bad(key))?;
        let base = format!("single_transformer_blocks.{index}");
        return single_block(&base, part, suffix, tensor, hidden);
    }
    if module == "final_layer.adaLN_modulation.1" {
        return Ok(vec![(
            format!("norm_out.linear.{suffix}"),
            swap_halves(&tensor, suffix)?,
        )]);
    }
    let top = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        (
            "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in.out_layer",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        (
            "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_1",
        ),
        (
            "guidance_in.out_layer",
            "time_text_embed.guidance_embedder.linear_2",
        ),
        (
            "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_1",
        ),
        (
            "vector_in.out_layer",
            "time_text_embed.text_embedder.linear_2",
        ),
        ("final_layer.linear", "proj_out"),
    ];
    let name = top
        .iter()
        .find(|(bfl, _)| *bfl == module)
        .map(|(_, diffusers)| *diffusers)
        .ok_or_else(|| bad(format!("unknown tensor {key}")))?;
    Ok(vec![(format!("{name}.{suffix}"), tensor)])
}

/// One tensor of a double block, `part` after `double_blocks.N.`.
fn double_block(
    base: &str,
    part: &str,
    suffix: &str,
    tensor: Tensor,
    hidden: usize,
) -> Result<Vec<(String, Tensor)>, ImageError> {
    let qkv = |names: [&str; 3]| -> Result<Vec<(String, Tensor)>, ImageError> {
        split(
            &tensor,
            suffix,
            &[hidden; 3],
            &names.map(|n| format!("{base}.attn.{n}")),
        )
    };
    let one = |name: &str| Ok(vec![(format!("{base}.{name}.{suffix}"), tensor.clone())]);
    match part {
        "img_attn.qkv" => qkv(["to_q", "to_k", "to_v"]),
        "txt_attn.qkv" => qkv(["add_q_proj", "add_k_proj", "add_v_proj"]),
        "img_mod.lin" => one("norm1.linear"),
        "txt_mod.lin" => one("norm1_context.linear"),
        "img_attn.proj" => one("attn.to_out.0"),
        "txt_attn.proj" => one("attn.to_add_out"),
        "img_mlp.0" => one("ff.net.0.proj"),
        "img_mlp.2" => one("ff.net.2"),
        "txt_mlp.0" => one("ff_context.net.0.proj"),
        "txt_mlp.2" => one("ff_context.net.2"),
        "img_attn.norm.query_norm" => Ok(vec![norm(base, "norm_q", tensor)]),
        "img_attn.norm.key_norm" => Ok(vec![norm(base, "norm_k", tensor)]),
        "txt_attn.norm.query_norm" => Ok(vec![norm(base, "norm_added_q", tensor)]),
        "txt_attn.norm.key_norm" => Ok(vec![norm(base, "norm_added_k", tensor)]),
        other => Err(bad(format!("unknown double-block tensor {other}.{suffix}"))),
    }
}

/// One tensor of a single block, `part` after `single_blocks.N.`.
fn single_block(
    base: &str,
    part: &str,
    suffix: &str,
    tensor: Tensor,
    hidden: usize,
) -> Result<Vec<(String, Tensor)>, ImageError> {
    match part {
        "linear1" => {
            let mlp = tensor.dim(0).unwrap_or(0).saturating_sub(3 * hidden);
            let names =
                ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].map(|n| format!("{base}.{n}"));
            split(&tensor, suffix, &[hidden, hidden, hidden, mlp], &names)
        }
        "linear2" => Ok(vec![(format!("{base}.proj_out.{suffix}"), tensor)]),
        "modulation.lin" => Ok(vec![(format!("{base}.norm.linear.{suffix}"), tensor)]),
        "norm.query_norm" => Ok(vec![norm(base, "attn.norm_q", tensor)]),
        "norm.key_norm" => Ok(vec![norm(base, "attn.norm_k", tensor)]),
        other => Err(bad(format!("unknown single-block tensor {other}.{suffix}"))),
    }
}

/// A q/k norm: BFL's `scale` is diffusers' `weight`.
fn norm(base: &str, name: &str, tensor: Tensor) -> (String, Tensor) {
    let name = if name.starts_with("attn.") {
        format!("{base}.{name}.weight")
    } else {
        format!("{base}.attn.{name}.weight")
    };
    (name, tensor)
}

/// Rows of a fused weight or bias cut into `sizes` under `names`; a
/// per-layer scale applies to every part.
fn split(
    tensor: &Tensor,
    suffix: &str,
    sizes: &[usize],
    names: &[String],
) -> Result<Vec<(String, Tensor)>, ImageError> {
    if suffix != "weight" && suffix != "bias" {
        return Ok(names
            .iter()
            .map(|name| (format!("{name}.{suffix}"), tensor.clone()))
            .collect());
    }
    let rows = tensor.dim(0)?;
    if sizes.iter().sum::<usize>() != rows {
        return Err(bad(format!(
            "a fused {suffix} of {rows} rows does not split into {sizes:?}"
        )));
    }
    let mut start = 0;
    let mut parts = Vec::with_capacity(sizes.len());
    for (name, &size) in names.iter().zip(sizes) {
        parts.push((
            format!("{name}.{suffix}"),
            tensor.narrow(0, start, size)?.contiguous()?,
        ));
        start += size;
    }
    Ok(parts)
}

/// BFL's final modulation is (shift, scale); diffusers' is (scale, shift).
fn swap_halves(tensor: &Tensor, suffix: &str) -> Result<Tensor, ImageError> {
    if suffix != "weight" && suffix != "bias" {
        return Ok(tensor.clone());
    }
    let half = tensor.dim(0)? / 2;
    let (shift, scale) = (tensor.narrow(0, 0, half)?, tensor.narrow(0, half, half)?);
    Ok(Tensor::cat(&[&scale, &shift], 0)?)
}

/// The config of a transformer with no `config.json`: widths and depths
/// from the weights; head width 128 with FLUX.1's rotary axes, the only
/// shape released.
fn inferred_config(tensors: &TensorMap) -> Result<FluxJson, ImageError> {
    let dim = |key: &str, axis: usize| dim(tensors, key, axis);
    let count = |prefix: &str| block_count(tensors, prefix);
    let head_dim = dim("transformer_blocks.0.attn.norm_q.weight", 0)?;
    if head_dim != 128 {
        return Err(bad(format!(
            "heads {head_dim} wide need a transformer/config.json beside the file (FLUX.1's are 128)"
        )));
    }
    let hidden = dim("x_embedder.weight", 0)?;
    Ok(FluxJson {
        patch_size: 1,
        in_channels: dim("x_embedder.weight", 1)?,
        out_channels: Some(dim("proj_out.weight", 0)?),
        num_layers: count("transformer_blocks."),
        num_single_layers: count("single_transformer_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: hidden / head_dim,
        joint_attention_dim: dim("context_embedder.weight", 1)?,
        pooled_projection_dim: dim("time_text_embed.text_embedder.linear_1.weight", 1)?,
        guidance_embeds: false,
        axes_dims_rope: vec![16, 56, 56],
    })
}
