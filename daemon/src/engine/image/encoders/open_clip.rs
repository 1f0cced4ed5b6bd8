//! OpenCLIP text-encoder tensors (SDXL single-file checkpoints'
//! `conditioner.embedders.1.model.*`: ViT-bigG) renamed to transformers'
//! `CLIPTextModelWithProjection`, as diffusers' `convert_open_clip_checkpoint`
//! does: the fused `in_proj` attention split into q/k/v, and
//! `text_projection` (stored `(hidden, projection)`, applied as `x @ P`)
//! transposed into a linear weight.

use candle_core::Tensor;

use super::weights::TensorMap;
use super::ImageError;

/// OpenCLIP names within a residual block → transformers names within an
/// encoder layer.
const LAYER_PARTS: [(&str, &str); 5] = [
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
];

/// Adds tensor `rest` (after the OpenCLIP prefix) to `out` under its
/// transformers name(s); tensors the text model does not use
/// (`logit_scale`, `attn_mask`) are left out.
pub fn insert(out: &mut TensorMap, rest: &str, tensor: Tensor) -> Result<(), ImageError> {
    let fixed = [
        (
            "token_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
        ),
        (
            "positional_embedding",
            "text_model.embeddings.position_embedding.weight",
        ),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
    ];
    if let Some((_, name)) = fixed.iter().find(|(from, _)| *from == rest) {
        out.insert((*name).to_owned(), tensor);
        return Ok(());
    }
    if rest == "text_projection" {
        out.insert("text_projection.weight".into(), tensor.t()?.contiguous()?);
        return Ok(());
    }
    let Some((layer, tail)) = rest
        .strip_prefix("transformer.resblocks.")
        .and_then(|r| r.split_once('.'))
    else {
        return Ok(());
    };
    let prefix = format!("text_model.encoder.layers.{layer}.");
    if let Some(kind) = tail.strip_prefix("attn.in_proj_") {
        // q, k and v stacked along the output axis.
        let parts = tensor.chunk(3, 0)?;
        for (name, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
            out.insert(
                format!("{prefix}self_attn.{name}.{kind}"),
                part.contiguous()?,
            );
        }
        return Ok(());
    }
    if let Some(name) = LAYER_PARTS
        .iter()
        .find_map(|(from, to)| tail.strip_prefix(from).map(|r| format!("{prefix}{to}{r}")))
    {
        out.insert(name, tensor);
    }
    Ok(())
}
