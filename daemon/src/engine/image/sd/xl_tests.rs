//! The SDXL pipeline against diffusers' reference numbers for the
//! tiny-sdxl fixture: both tokenizers, both encoders' penultimate states
//! and the pooled projection, the time ids, the first UNet call, every DDIM
//! step's latents and the final picture, for a case with a negative prompt
//! (not square), one without (zero uncond embeddings) and one without
//! guidance; and the refusals of pipelines whose parts do not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use super::conditioning::{AddedConditioning, Conditioning};
use super::tests::{
    assert_close, assert_steps_and_image, case, cpu_f32, fixture_dir, max_abs_diff, reference_json,
    reference_tensors, run,
};
use super::*;
use crate::engine::image::config::read_json;
use crate::engine::image::request::{self, ImageRequest};

fn fixture() -> PathBuf {
    fixture_dir("tiny-sdxl")
}

fn expected_json() -> Value {
    reference_json(&fixture())
}

fn expected_tensors() -> HashMap<String, Tensor> {
    reference_tensors(&fixture())
}

fn load(root: &Path) -> SdPipeline {
    SdPipeline::load(root, &cpu_f32()).expect("SDXL pipeline loads")
}

fn request_of(case: &Value) -> ValidImageRequest {
    ValidImageRequest::try_from(ImageRequest {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: case["negative_prompt"].as_str().map(str::to_owned),
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        steps: case["num_inference_steps"].as_u64().expect("steps") as u32,
        guidance: case["guidance_scale"].as_f64().expect("guidance"),
        seed: 0,
        count: 1,
        scheduler: None,
        init_image: None,
        strength: None,
        given: request::Given::default(),
        max_sequence_length: None,
    })
    .expect("reference request is valid")
}

fn added(conditioning: &Conditioning) -> &AddedConditioning {
    conditioning
        .added
        .as_ref()
        .expect("SDXL has added conditioning")
}

fn xl_encoders(pipeline: &SdPipeline) -> (&conditioning::Encoder, &conditioning::ProjectedEncoder) {
    let second = pipeline.text.second.as_ref();
    (
        &pipeline.text.first,
        second.expect("tiny-sdxl has two encoders"),
    )
}

#[test]
fn both_tokenizers_match_the_reference() {
    let json = expected_json();
    let pipeline = load(&fixture());
    let (first, second) = xl_encoders(&pipeline);
    for (key, tokenizer) in [
        ("tokenizer", &first.tokenizer),
        ("tokenizer_2", &second.tokenizer),
    ] {
        let checks = json["tokenizers"][key]["check_texts"]
            .as_object()
            .expect("check_texts");
        assert!(!checks.is_empty());
        for (text, check) in checks {
            let expected: Vec<u32> =
                serde_json::from_value(check["padded_ids"].clone()).expect("ids");
            assert_eq!(
                tokenizer.ids(text).expect("ids"),
                expected,
                "{key} {text:?}"
            );
        }
    }
    // tokenizer_2 pads with its own "!" (id 0), not with the end token.
    assert_eq!(json["tokenizers"]["tokenizer_2"]["pad_token_id"], 0);
    assert_eq!(second.tokenizer.ids("").expect("ids")[2], 0);
}

/// A pad token missing from the vocabulary is refused by name, not added
/// with an id past the embedding table.
#[test]
fn a_pad_token_outside_the_vocabulary_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_tree(&fixture().join("tokenizer_2"), dir.path());
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.path().join(file);
        let mut value: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        value["pad_token"] = "<|pad|>".into();
        std::fs::write(&path, value.to_string()).expect("write");
    }
    let error = match crate::engine::image::encoders::prompt::PromptTokenizer::load(dir.path(), 77)
    {
        Ok(_) => panic!("a pad token outside the vocabulary was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("pad_token \"<|pad|>\""), "{error}");
}

#[test]
fn both_encoders_match_the_reference_for_every_text() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let pipeline = load(&fixture());
    for (label, entry) in json["text_encoders"].as_object().expect("text_encoders") {
        let text = entry["text"].as_str().expect("text");
        let ours = pipeline
            .text
            .encode(text, (64, 64), &Device::Cpu)
            .expect("encode");
        let first = &tensors[entry["text_encoder_penultimate"].as_str().expect("name")];
        let second = &tensors[entry["text_encoder_2_penultimate"].as_str().expect("name")];
        let width = first.dim(2).expect("width");
        let split = |from, len| ours.context.narrow(2, from, len).expect("narrow");
        assert_close(&format!("{label} text_encoder"), &split(0, width), first);
        assert_close(
            &format!("{label} text_encoder_2"),
            &split(width, second.dim(2).expect("width")),
            second,
        );
        assert_close(
            &format!("{label} text_embeds"),
            &added(&ours).text_embeds,
            &tensors[entry["text_embeds"].as_str().expect("name")],
        );
    }
}

fn check_case(name: &str) {
    let json = expected_json();
    check_case_on(&load(&fixture()), case(&json, name), name);
}

/// `pipeline` against reference case `case`, its tensors named `name.*`.
fn check_case_on(pipeline: &SdPipeline, case: &Value, name: &str) {
    let tensors = expected_tensors();
    let request = request_of(case);
    let t = |suffix: &str| &tensors[&format!("{name}.{suffix}")];
    let conditioning = pipeline.conditioning(&request).expect("conditioning");
    assert_close(
        &format!("{name} prompt embeddings"),
        &conditioning.context,
        t("text_embeddings"),
    );
    assert_close(
        &format!("{name} pooled embeddings"),
        &added(&conditioning).text_embeds,
        t("pooled_text_embeds"),
    );
    assert_eq!(
        max_abs_diff(&added(&conditioning).time_ids, t("time_ids")),
        0.0,
        "{name} time ids"
    );
    let reference = Conditioning {
        context: t("text_embeddings").clone(),
        added: Some(AddedConditioning {
            text_embeds: t("pooled_text_embeds").clone(),
            time_ids: t("time_ids").clone(),
        }),
    };
    let first_t = case["first_unet_call"]["timestep"]
        .as_f64()
        .expect("timestep");
    let noise = pipeline
        .unet_output(t("first_unet_input"), first_t, &reference)
        .expect("unet");
    assert_close(
        &format!("{name} first noise prediction"),
        &noise,
        t("first_noise_pred"),
    );
    let (steps, image) = run(pipeline, &request, t("latents"));
    assert_eq!(steps.len(), request.steps);
    assert_steps_and_image(name, (&steps, &image), t("step_latents"), t("image"));
}

#[test]
fn case_cfg_matches_the_reference() {
    check_case("cfg");
}

#[test]
fn case_cfg_noneg_matches_the_reference() {
    check_case("cfg_noneg");
}

#[test]
fn case_nocfg_matches_the_reference() {
    check_case("nocfg");
}

fn single_file_dir() -> PathBuf {
    fixture().join("single_file")
}

/// The SGM-style checkpoint (float16 weights, OpenCLIP naming for the
/// second encoder) against diffusers' `from_single_file` on it.
#[test]
fn single_file_checkpoint_matches_the_reference() {
    let json = expected_json();
    let pipeline = SdPipeline::load_single_file(
        &single_file_dir().join("tiny-sdxl.safetensors"),
        Some(&single_file_dir().join("tiny-sdxl.yaml")),
        &fixture(),
        &cpu_f32(),
    )
    .expect("single file loads");
    assert_eq!(pipeline.arch(), "stable-diffusion-xl");
    check_case_on(&pipeline, &json["single_file"], "single_file");
}

/// Without the folder's configs, the UNet's shape comes from the tensors
/// and the yaml (the group count aside: LDM's is always 32), and the
/// OpenCLIP tensors become the folder's text_encoder_2 (to float16).
#[test]
fn single_file_shapes_and_open_clip_tensors_are_recovered() {
    let checkpoint = single_file_dir().join("tiny-sdxl.safetensors");
    let yaml = single_file::LdmYaml::read(&single_file_dir().join("tiny-sdxl.yaml")).expect("yaml");
    let renamed = single_file::rename(&checkpoint).expect("rename");
    let second = renamed.text_encoder_2.expect("an SDXL checkpoint");
    let folder: config::UnetJson = read_json(&fixture().join("unet/config.json")).expect("config");
    let mut inferred =
        single_file::unet_json(&renamed.unet, Some(&yaml), Some(40)).expect("unet config");
    inferred.norm_num_groups = folder.norm_num_groups;
    assert_eq!(
        format!("{:?}", inferred.to_candle().expect("candle")),
        format!("{:?}", folder.to_candle().expect("candle"))
    );
    assert_eq!(
        inferred.text_time().expect("text_time"),
        folder.text_time().expect("text_time")
    );
    let without_configs = tempfile::tempdir().expect("temp dir");
    let clip = single_file::clip_json_2(&second, without_configs.path()).expect("clip config");
    assert_eq!(
        (
            clip.hidden_size,
            clip.num_hidden_layers,
            clip.projection_dim,
            clip.hidden_act.as_str()
        ),
        (48, 3, 40, "gelu")
    );
    let path = fixture().join("text_encoder_2/model.safetensors");
    let reference = weights::load_tensors(&[path]).expect("weights");
    assert_eq!(second.len(), reference.len());
    for (name, tensor) in &reference {
        let ours = second
            .get(name)
            .unwrap_or_else(|| panic!("the checkpoint lacks text_encoder_2 {name}"));
        let ours = ours.to_dtype(DType::F32).expect("f32");
        let diff = max_abs_diff(&ours, tensor);
        assert!(diff <= 1e-3, "{name}: {diff} from the folder's");
    }
}

/// A LoRA on the UNet and both encoders, against diffusers'
/// `load_lora_weights` + `set_adapters` at the same strength.
fn with_lora(file: &Path, lora: &Value) -> ImageLoad {
    ImageLoad {
        loras: vec![modeld_wire::types::LoraInfo {
            path: file.to_path_buf(),
            strength: lora["strength"].as_f64().expect("strength") as f32,
            adapter_name: "detail".into(),
        }],
        ..cpu_f32()
    }
}

#[test]
fn lora_on_all_three_networks_matches_the_reference() {
    let json = expected_json();
    let lora = &json["lora"];
    let file = fixture().join(lora["file"].as_str().expect("file"));
    let pipeline = SdPipeline::load(&fixture(), &with_lora(&file, lora)).expect("load");
    check_case_on(&pipeline, lora, "lora");
    let tensors = expected_tensors();
    let changed = max_abs_diff(&tensors["lora.image"], &tensors["cfg.image"]);
    assert!(changed > 1e-2, "the LoRA changes the picture ({changed})");
}

/// The same LoRA in kohya naming, the UNet's modules by their SGM paths
/// (diffusers loads it to the very same picture).
#[test]
fn kohya_lora_with_sgm_unet_names_matches_the_reference() {
    let json = expected_json();
    let lora = &json["lora"];
    assert_eq!(lora["kohya"]["image_vs_peft_max_abs_diff"], 0.0);
    let file = fixture().join(lora["kohya"]["file"].as_str().expect("file"));
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("LoRA");
    assert!(tensors
        .keys()
        .any(|k| k.starts_with("lora_unet_input_blocks_")));
    let pipeline = SdPipeline::load(&fixture(), &with_lora(&file, lora)).expect("load");
    check_case_on(&pipeline, lora, "lora");
}

/// The same LoRA as saved with transformers 5's flattened `CLIPTextModel`:
/// `text_encoder.encoder.layers.*`, without `text_model.`.
#[test]
fn a_lora_without_the_text_model_prefix_matches_too() {
    let json = expected_json();
    let lora = &json["lora"];
    let file = fixture().join(lora["file"].as_str().expect("file"));
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("LoRA");
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(key, tensor)| {
            (
                key.replace("text_encoder.text_model.", "text_encoder."),
                tensor,
            )
        })
        .collect();
    assert!(renamed
        .keys()
        .any(|k| k.starts_with("text_encoder.encoder.")));
    let dir = tempfile::tempdir().expect("temp dir");
    let flat = dir.path().join("flat.safetensors");
    candle_core::safetensors::save(&renamed, &flat).expect("save");
    let pipeline = SdPipeline::load(&fixture(), &with_lora(&flat, lora)).expect("load");
    let conditioning = pipeline
        .conditioning(&request_of(lora))
        .expect("conditioning");
    assert_close(
        "flattened LoRA prompt embeddings",
        &conditioning.context,
        &expected_tensors()["lora.text_embeddings"],
    );
}

#[test]
fn timesteps_follow_the_scheduler_config() {
    let json = expected_json();
    let pipeline = load(&fixture());
    for name in ["cfg", "cfg_noneg", "nocfg"] {
        let case = case(&json, name);
        let expected: Vec<usize> =
            serde_json::from_value(case["timesteps"].clone()).expect("timesteps");
        let steps = case["num_inference_steps"].as_u64().expect("steps") as usize;
        let sampler = pipeline
            .scheduler
            .start(super::scheduler::SchedulerKind::Ddim, steps)
            .expect("DDIM");
        let timesteps: Vec<usize> = sampler.timesteps().iter().map(|t| *t as usize).collect();
        assert_eq!(timesteps, expected);
    }
}

/// Only an absent negative prompt is zeroed: an empty one is encoded, as
/// diffusers does (`negative_prompt is None and force_zeros_for_empty_prompt`).
#[test]
fn an_empty_negative_prompt_is_encoded_not_zeroed() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let pipeline = load(&fixture());
    let mut request = request_of(case(&json, "cfg_noneg"));
    request.negative_prompt = Some(String::new());
    let conditioning = pipeline.conditioning(&request).expect("conditioning");
    let uncond = conditioning.context.i(0).expect("uncond");
    let empty = &json["text_encoders"]["empty"];
    let first = tensors[empty["text_encoder_penultimate"].as_str().expect("name")]
        .i(0)
        .expect("row");
    assert_close(
        "empty negative prompt",
        &uncond
            .narrow(1, 0, first.dim(1).expect("width"))
            .expect("narrow"),
        &first,
    );
    assert_close(
        "empty negative prompt pooled",
        &added(&conditioning).text_embeds.i(0..1).expect("row"),
        &tensors[empty["text_embeds"].as_str().expect("name")],
    );
}

/// SDXL's first block has no attention: the largest attention is at the
/// second block's resolution, not the latent's (16x less for 8 pictures).
#[test]
fn the_attention_bound_follows_the_levels_that_attend() {
    let pipeline = load(&fixture());
    let mut request = request_of(case(&expected_json(), "cfg"));
    (request.width, request.height, request.count) = (1024, 1024, 8);
    // Latent 512x512 (the VAE halves each side); blocks 1 and 2 attend with
    // 4 heads, the first at 256x256; 8 pictures, twice with guidance; f32.
    let tokens: u64 = 256 * 256;
    let unet = 2 * (8 * 2 * 4) * tokens * tokens * 4;
    assert_eq!(pipeline.unet_scores_bytes(&request), unet);
    // The VAE's one-head attention over the whole 512x512 latent, one
    // picture at a time.
    let latent: u64 = 512 * 512;
    let vae = 2 * latent * latent * 4;
    assert_eq!(pipeline.vae_scores_bytes(&request), vae);
    // One picture without guidance: the VAE's is the larger.
    (request.count, request.guidance) = (1, 1.0);
    assert!(pipeline.unet_scores_bytes(&request) < vae);
    // On the CPU both attend in blocks: the run's cost bounds it instead.
    assert_eq!(pipeline.attention_bytes(&request), 0);
}

#[test]
fn the_estimate_counts_both_text_encoders() {
    let files =
        crate::engine::image::device_weight_files(&fixture(), &Default::default()).expect("files");
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(fixture().join("text_encoder_2"))),
        "{files:?}"
    );
    assert_eq!(files.len(), 4);
}

/// A copy of the fixture with `edit` applied to one of its JSON files.
fn edited_copy(file: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_tree(&fixture(), dir.path());
    let path = dir.path().join(file);
    let mut value: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut value);
    std::fs::write(&path, value.to_string()).expect("write");
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn load_error(dir: &Path) -> String {
    match SdPipeline::load(dir, &cpu_f32()) {
        Ok(_) => panic!("a pipeline whose parts do not fit was loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_projection_that_does_not_fit_the_added_embedding_is_refused_by_name() {
    let dir = edited_copy("text_encoder_2/config.json", |v| {
        v["projection_dim"] = 24.into()
    });
    let message = load_error(dir.path());
    assert!(
        message.contains("projection_class_embeddings_input_dim 88")
            && message.contains("projection_dim 24"),
        "{message}"
    );
}

#[test]
fn an_sdxl_refiner_without_text_encoder_is_refused() {
    let dir = edited_copy("model_index.json", |v| {
        v["text_encoder"] = serde_json::json!([null, null]);
    });
    let message = load_error(dir.path());
    assert!(message.contains("no text_encoder"), "{message}");
}

#[test]
fn a_text_time_unet_without_a_second_encoder_is_refused() {
    let dir = edited_copy("model_index.json", |v| {
        v["text_encoder_2"] = serde_json::json!([null, null]);
    });
    let message = load_error(dir.path());
    assert!(message.contains("cross_attention_dim 80"), "{message}");
}

#[test]
fn an_unknown_addition_embed_type_is_refused_by_name() {
    let dir = edited_copy("unet/config.json", |v| {
        v["addition_embed_type"] = "image".into();
    });
    let message = load_error(dir.path());
    assert!(
        message.contains("addition_embed_type \"image\""),
        "{message}"
    );
}

/// stabilityai/stable-diffusion-xl-base-1.0's `unet/config.json`: the
/// real sizes come out of it (nothing assumes them).
#[test]
fn the_sdxl_base_unet_config_is_understood() {
    let json = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": false,
        "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
        "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
        "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
        "time_embedding_act_fn": null, "time_embedding_dim": null,
        "time_embedding_type": "positional", "timestep_post_act": null,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null, "use_linear_projection": true}"#;
    let unet: config::UnetJson = serde_json::from_str(json).expect("parses");
    let candle = unet.to_candle().expect("supported");
    let blocks: Vec<_> = candle
        .blocks
        .iter()
        .map(|b| (b.out_channels, b.use_cross_attn, b.attention_head_dim))
        .collect();
    assert_eq!(
        blocks,
        vec![(320, None, 5), (640, Some(2), 10), (1280, Some(10), 20)]
    );
    assert_eq!(
        (candle.cross_attention_dim, candle.use_linear_projection),
        (2048, true)
    );
    assert_eq!(
        unet.text_time().expect("text_time"),
        Some(config::TextTimeShape {
            time_embed_dim: 256,
            input_dim: 2816
        })
    );
}

#[test]
fn a_vae_with_latent_statistics_is_refused_by_name() {
    let dir = edited_copy("vae/config.json", |v| {
        v["latents_mean"] = serde_json::json!([0.1, 0.2, 0.3, 0.4]);
        v["latents_std"] = serde_json::json!([1.0, 1.0, 1.0, 1.0]);
    });
    let message = load_error(dir.path());
    assert!(message.contains("latents_mean"), "{message}");
}

#[test]
fn per_layer_transformer_depths_are_refused_by_name() {
    let dir = edited_copy("unet/config.json", |v| {
        v["transformer_layers_per_block"] = serde_json::json!([[1], [1], [2]]);
    });
    let message = load_error(dir.path());
    assert!(
        message.contains("transformer_layers_per_block with a list per layer"),
        "{message}"
    );
    let dir = edited_copy("unet/config.json", |v| {
        v["reverse_transformer_layers_per_block"] = serde_json::json!([[2, 2], [1, 1], [1, 1]]);
    });
    let message = load_error(dir.path());
    assert!(
        message.contains("reverse_transformer_layers_per_block"),
        "{message}"
    );
}

/// Half precision (the VAE upcast by `force_upcast`) gives pictures of the
/// asked size close to the f32 reference.
#[test]
fn f16_pictures_stay_close_to_the_f32_reference() {
    let json = expected_json();
    let request = request_of(case(&json, "cfg"));
    let options = ImageLoad {
        dtype: DType::F16,
        ..cpu_f32()
    };
    let pipeline = SdPipeline::load(&fixture(), &options).expect("f16 load");
    let pictures = pipeline
        .generate(&request, &mut |_, _, _| std::ops::ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!((pictures[0].width, pictures[0].height), (64, 48));
    let tensors = expected_tensors();
    let (_, image) = run(&pipeline, &request, &tensors["cfg.latents"]);
    let diff = max_abs_diff(&image.i(0).expect("image"), &tensors["cfg.image"]);
    // Half precision moves the picture by ~5e-3 here.
    assert!(diff <= 2e-2, "f16 picture {diff} from the f32 reference");
}
