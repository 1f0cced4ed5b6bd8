//! What a single `.safetensors` file holds, told by its tensor names (never
//! its file name): a FLUX transformer, an SD 1.x/2.x or SDXL checkpoint or
//! UNet, a LoRA, a VAE, or a CLIP or T5 text encoder. This is how the scan
//! of a ComfyUI `models/` tree, whose folders hold loose files of every
//! kind, says what each file is.

/// `(family, architecture)` of a file with these tensor names.
pub fn of_tensors(names: &[String]) -> (&'static str, Option<&'static str>) {
    let any = |test: &dyn Fn(&str) -> bool| names.iter().any(|n| test(n));
    let bare = |n: &str| {
        n.strip_prefix("model.diffusion_model.")
            .unwrap_or(n)
            .to_owned()
    };
    if any(&|n| is_lora_key(n)) {
        return ("lora", None);
    }
    if any(&|n| {
        let n = bare(n);
        n.starts_with("double_blocks.") || n.starts_with("single_transformer_blocks.")
    }) {
        let dev = any(&|n| n.contains("guidance_in.") || n.contains("guidance_embedder."));
        return ("flux", Some(if dev { "flux-dev" } else { "flux-schnell" }));
    }
    if let Some(sd) = stable_diffusion(names) {
        return sd;
    }
    if any(&|n| n.starts_with("decoder.conv_in.") || n.starts_with("first_stage_model.")) {
        return ("vae", None);
    }
    if any(&|n| n.starts_with("encoder.block.") || n == "shared.weight") {
        return ("text_encoder", Some("t5"));
    }
    if any(&|n| n.contains("token_embedding")) {
        return ("text_encoder", Some("clip"));
    }
    ("unknown", None)
}

/// PEFT, kohya and XLabs adapter keys.
fn is_lora_key(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.contains(".lora_down.")
        || name.contains(".lora_up.")
        || name.starts_with("lora_unet_")
        || name.starts_with("lora_te")
        || (name.contains(".processor.") && name.contains("_lora"))
}

/// SD checkpoints (LDM/SGM names) and UNets (diffusers names): SDXL by its
/// added embedding or second encoder, SD 2.x by its OpenCLIP encoder.
fn stable_diffusion(names: &[String]) -> Option<(&'static str, Option<&'static str>)> {
    let any = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    let checkpoint = any("model.diffusion_model.input_blocks.");
    let unet = any("down_blocks.") && any("conv_in.") && any("time_embedding.");
    if !checkpoint && !unet {
        return None;
    }
    if any("conditioner.embedders.1.")
        || any("model.diffusion_model.label_emb.")
        || any("add_embedding.")
    {
        return Some(("sdxl", None));
    }
    if any("cond_stage_model.model.") {
        return Some(("sd2", None));
    }
    Some(("sd15", None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(names: &[&str]) -> (&'static str, Option<&'static str>) {
        of_tensors(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn files_are_told_apart_by_their_tensor_names() {
        assert_eq!(
            of(&[
                "double_blocks.0.img_attn.qkv.weight",
                "guidance_in.in_layer.weight"
            ]),
            ("flux", Some("flux-dev"))
        );
        assert_eq!(
            of(&["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]),
            ("flux", Some("flux-schnell"))
        );
        assert_eq!(
            of(&["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]).0,
            "lora"
        );
        assert_eq!(
            of(&["lora_unet_double_blocks_0_img_attn_qkv.alpha"]).0,
            "lora"
        );
        let sd15 = [
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        ];
        assert_eq!(of(&sd15).0, "sd15");
        let sdxl = [
            "model.diffusion_model.input_blocks.0.0.weight",
            "conditioner.embedders.1.model.ln_final.weight",
        ];
        assert_eq!(of(&sdxl).0, "sdxl");
        assert_eq!(
            of(&["decoder.conv_in.weight", "encoder.conv_in.weight"]).0,
            "vae"
        );
        assert_eq!(
            of(&["encoder.block.0.layer.0.SelfAttention.q.weight"]),
            ("text_encoder", Some("t5"))
        );
        assert_eq!(
            of(&["text_model.embeddings.token_embedding.weight"]),
            ("text_encoder", Some("clip"))
        );
        assert_eq!(of(&["something.else"]), ("unknown", None));
    }
}
