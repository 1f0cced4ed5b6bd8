//! Which files of a Hub repo a pull fetches when the registration named no
//! patterns. The default patterns match every safetensors file, and real
//! repos hold several copies of one model: diffusers pipelines ship each
//! component in variants (`diffusion_pytorch_model.fp16.safetensors`,
//! `.non_ema.`) and often a single-file checkpoint at the top as well, plus
//! a safety checker modeld never runs; Mistral repos ship
//! `consolidated.safetensors` beside the sharded transformers weights.
//! Fetching all of them multiplies the download several times over.

use std::collections::HashSet;

/// Folders of a diffusers pipeline modeld does not run.
const UNUSED_COMPONENTS: [&str; 2] = ["safety_checker", "feature_extractor"];

/// The paths of `listing` a default-pattern pull needs, in listing order:
/// one copy of each weights file, as a loader would pick it.
pub fn default_selection<'a>(listing: &[&'a str]) -> Vec<&'a str> {
    let diffusers = listing.contains(&"model_index.json");
    let present: HashSet<&str> = listing.iter().copied().collect();
    let has_transformers_weights = listing
        .iter()
        .any(|p| is_top_level(p) && (p.starts_with("model-") || *p == "model.safetensors"));
    listing
        .iter()
        .copied()
        .filter(|path| {
            if diffusers && UNUSED_COMPONENTS.contains(&folder(path)) {
                return false;
            }
            if !path.ends_with(".safetensors") {
                return true;
            }
            if diffusers && is_top_level(path) {
                // A single-file checkpoint of the same pipeline.
                return false;
            }
            if has_transformers_weights && file_name(path).starts_with("consolidated") {
                return false;
            }
            preferred_variant(path, &present)
        })
        .collect()
}

fn is_top_level(path: &str) -> bool {
    !path.contains('/')
}

fn folder(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// A weights file's name in parts: `stem[.VARIANT][-0000N-of-0000M]`.
struct Named<'a> {
    stem: &'a str,
    variant: Option<&'a str>,
    shard: &'a str,
}

/// Splits `path` (a `.safetensors` file): `unet/x.fp16.safetensors` has
/// variant `fp16`; `x.fp16-00001-of-00002.safetensors` is its first shard;
/// `model-00001-of-00002.safetensors` has no variant.
fn named(path: &str) -> Named<'_> {
    let base = path.strip_suffix(".safetensors").unwrap_or(path);
    let name_start = base.len() - file_name(base).len();
    let Some(dot) = base[name_start..].rfind('.').map(|i| name_start + i) else {
        return Named {
            stem: base,
            variant: None,
            shard: "",
        };
    };
    let tail = &base[dot + 1..];
    let (variant, shard) = match tail.find("-0") {
        Some(i) if tail[i..].contains("-of-") => (&tail[..i], &tail[i..]),
        _ => (tail, ""),
    };
    Named {
        stem: &base[..dot],
        variant: Some(variant),
        shard,
    }
}

/// Whether `path` is the copy to fetch among its variants: the plain file
/// when there is one, else fp16 (what the image loader reads), else the
/// first variant by name.
fn preferred_variant(path: &str, present: &HashSet<&str>) -> bool {
    let this = named(path);
    let Some(variant) = this.variant else {
        return true;
    };
    let plain = format!("{}{}.safetensors", this.stem, this.shard);
    if present.contains(plain.as_str()) {
        return false;
    }
    let mut variants: Vec<&str> = present
        .iter()
        .filter(|p| p.ends_with(".safetensors"))
        .map(|p| named(p))
        .filter(|other| other.stem == this.stem)
        .filter_map(|other| other.variant)
        .collect();
    variants.sort_unstable();
    let chosen = if variants.contains(&"fp16") {
        "fp16"
    } else {
        variants[0]
    };
    variant == chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_of_each_pipeline_component() {
        let listing = [
            "model_index.json",
            "v1-5-pruned-emaonly.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.non_ema.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "vae/diffusion_pytorch_model.non_ema.safetensors",
            "text_encoder/model.safetensors",
            "safety_checker/model.safetensors",
            "safety_checker/config.json",
            "tokenizer/vocab.json",
        ];
        let chosen = default_selection(&listing);
        assert_eq!(
            chosen,
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/model.safetensors",
                "tokenizer/vocab.json",
            ]
        );
    }

    #[test]
    fn text_repos_keep_their_shards_and_drop_consolidated_copies() {
        let listing = [
            "config.json",
            "consolidated.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ];
        let chosen = default_selection(&listing);
        assert_eq!(chosen, [listing[0], listing[2], listing[3], listing[4]]);
        let shards = [
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ];
        assert_eq!(default_selection(&shards), shards[..2]);
        assert_eq!(default_selection(&shards[2..]), shards[2..]);
        // Without transformers weights, the consolidated file is the model.
        assert_eq!(
            default_selection(&["params.json", "consolidated.safetensors"]),
            ["params.json", "consolidated.safetensors"]
        );
    }
}
