//! The pipeline against diffusers' reference numbers for the tiny-sd
//! fixture: tokens, text embeddings, the first UNet call, every DDIM step's
//! latents and the final picture, for each reference case.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::Value;

use modeld_wire::types::{ImageStage, LoraInfo};

use super::*;
use crate::engine::image::config::read_json;
use crate::engine::image::request::{self, ImageRequest};
pub(super) use crate::engine::image::test_support::*;

fn fixture() -> PathBuf {
    fixture_dir("tiny-sd")
}

fn expected_json() -> Value {
    reference_json(&fixture())
}

fn expected_tensors() -> HashMap<String, Tensor> {
    reference_tensors(&fixture())
}

fn load(root: &Path) -> SdPipeline {
    SdPipeline::load(root, &cpu_f32()).expect("pipeline loads")
}

/// The request a reference case's pipeline call makes.
fn request_of(case: &Value) -> ValidImageRequest {
    let negative = case["negative_prompt"].as_str().map(str::to_owned);
    ValidImageRequest::try_from(ImageRequest {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: negative,
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

/// SD 1.x/2.x conditioning: the text embeddings alone.
fn context(embeddings: &Tensor) -> Conditioning {
    Conditioning {
        context: embeddings.clone(),
        added: None,
    }
}

/// The step latents and the picture of `pipeline` on the case's latents.
pub(super) fn run(
    pipeline: &SdPipeline,
    request: &ValidImageRequest,
    latents: &Tensor,
) -> (Vec<Tensor>, Tensor) {
    let mut steps = Vec::new();
    let image = pipeline
        .render(request, latents.clone(), &mut no_noise(), &mut |event| {
            if let RunEvent::Denoised { latents: l, .. } = event {
                steps.push(l.clone());
            }
            ControlFlow::Continue(())
        })
        .expect("render");
    (steps, image)
}

/// Each step's latents and the picture of a run against the reference's
/// `step_latents` (one row per step) and `image`.
pub(super) fn assert_steps_and_image(
    name: &str,
    (steps, image): (&[Tensor], &Tensor),
    step_latents: &Tensor,
    expected_image: &Tensor,
) {
    for (i, latents) in steps.iter().enumerate() {
        let reference = step_latents
            .i(i)
            .and_then(|row| row.unsqueeze(0))
            .expect("row");
        assert_close(
            &format!("{name} latents after step {}", i + 1),
            latents,
            &reference,
        );
    }
    assert_close(
        &format!("{name} image"),
        &image.i(0).expect("image"),
        expected_image,
    );
}

#[test]
fn tokenizer_ids_match_the_reference() {
    let json = expected_json();
    let pipeline = load(&fixture());
    let checks = json["tokenizer"]["check_texts"]
        .as_object()
        .expect("check_texts");
    assert!(!checks.is_empty());
    for (text, check) in checks {
        let expected: Vec<u32> = serde_json::from_value(check["padded_ids"].clone()).expect("ids");
        assert_eq!(
            pipeline.text.first.tokenizer.ids(text).expect("ids"),
            expected,
            "{text:?}"
        );
    }
}

/// Most diffusers repos ship `vocab.json` and `merges.txt` but no
/// `tokenizer.json`: the tokenizer built from those gives the same ids.
#[test]
fn tokenizer_from_vocab_and_merges_matches_the_reference() {
    let json = expected_json();
    let dir = tempfile::tempdir().expect("temp dir");
    let source = fixture().join("tokenizer");
    for file in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(source.join(file), dir.path().join(file)).expect("copy");
    }
    let tokenizer = crate::engine::image::encoders::prompt::PromptTokenizer::load(dir.path(), 77)
        .expect("tokenizer");
    let checks = json["tokenizer"]["check_texts"]
        .as_object()
        .expect("check_texts");
    for (text, check) in checks {
        let expected: Vec<u32> = serde_json::from_value(check["padded_ids"].clone()).expect("ids");
        assert_eq!(tokenizer.ids(text).expect("ids"), expected, "{text:?}");
    }
}

#[test]
fn text_encoder_matches_the_reference_for_every_text() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let pipeline = load(&fixture());
    for (label, entry) in json["text_encoder"].as_object().expect("text_encoder") {
        let ours = pipeline
            .text
            .encode(
                entry["text"].as_str().expect("text"),
                (64, 64),
                &Device::Cpu,
            )
            .expect("encode")
            .context;
        let reference = &tensors[entry["tensor"].as_str().expect("tensor")];
        assert_close(&format!("text encoder {label}"), &ours, reference);
    }
}

fn check_case(name: &str) {
    let (json, tensors) = (expected_json(), expected_tensors());
    let (case, pipeline) = (case(&json, name), load(&fixture()));
    let request = request_of(case);
    let t = |suffix: &str| &tensors[&format!("{name}.{suffix}")];
    let conditioning = pipeline.conditioning(&request).expect("embeddings");
    assert!(conditioning.added.is_none());
    assert_close(
        &format!("{name} text embeddings"),
        &conditioning.context,
        t("text_embeddings"),
    );
    let first_t = case["first_unet_call"]["timestep"]
        .as_f64()
        .expect("timestep");
    let noise = pipeline
        .unet_output(
            t("first_unet_input"),
            first_t,
            &context(t("text_embeddings")),
        )
        .expect("unet");
    assert_close(
        &format!("{name} first noise prediction"),
        &noise,
        t("first_noise_pred"),
    );
    let (steps, image) = run(&pipeline, &request, t("latents"));
    assert_eq!(steps.len(), request.steps);
    assert_steps_and_image(name, (&steps, &image), t("step_latents"), t("image"));
}

#[test]
fn case_cfg_matches_the_reference() {
    check_case("cfg");
}

#[test]
fn case_nocfg_matches_the_reference() {
    check_case("nocfg");
}

#[test]
fn case_cfg_noneg_matches_the_reference() {
    check_case("cfg_noneg");
}

#[test]
fn timesteps_follow_the_scheduler_config() {
    let json = expected_json();
    let pipeline = load(&fixture());
    for name in ["cfg", "nocfg", "cfg_noneg"] {
        let case = case(&json, name);
        let expected: Vec<usize> =
            serde_json::from_value(case["timesteps"].clone()).expect("timesteps");
        let steps = case["num_inference_steps"].as_u64().expect("steps") as usize;
        let sampler = pipeline
            .scheduler
            .start(scheduler::SchedulerKind::Ddim, steps)
            .expect("DDIM");
        let timesteps: Vec<usize> = sampler.timesteps().iter().map(|t| *t as usize).collect();
        assert_eq!(timesteps, expected);
    }
}

#[test]
fn rgb_output_is_the_reference_picture_rounded() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let request = request_of(case(&json, "cfg"));
    let pipeline = load(&fixture());
    let image = pipeline
        .render(
            &request,
            tensors["cfg.latents"].clone(),
            &mut no_noise(),
            &mut |_| ControlFlow::Continue(()),
        )
        .expect("render");
    let pictures = to_rgb8(&image).expect("rgb");
    assert_eq!((pictures[0].width, pictures[0].height), (64, 64));
    let reference = (&tensors["cfg.image"] * 255.0)
        .and_then(|t| t.round())
        .expect("round");
    let reference = reference
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values");
    assert_eq!(pictures[0].rgb.len(), reference.len());
    for (ours, theirs) in pictures[0].rgb.iter().zip(&reference) {
        // Values within 1e-4 of a rounding boundary may land either side.
        assert!((*ours as f32 - theirs).abs() <= 1.0, "{ours} vs {theirs}");
    }
}

#[test]
fn generate_reports_every_step_and_is_reproducible_per_seed() {
    let pipeline = load(&fixture());
    let mut request = request_of(case(&expected_json(), "cfg"));
    request.count = 2;
    request.seed = 99;
    let mut seen = Vec::new();
    let pictures = pipeline
        .generate(&request, &mut |stage, step, steps| {
            seen.push((stage, step, steps));
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(seen, stages(4, 2), "every stage, in order");
    assert_eq!(pictures.len(), 2);
    assert_ne!(pictures[0], pictures[1]);
    request.count = 1;
    request.seed = 100;
    let alone = pipeline
        .generate(&request, &mut |_, _, _| ControlFlow::Continue(()))
        .expect("generate");
    let diff = pictures[1]
        .rgb
        .iter()
        .zip(&alone[0].rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max();
    assert!(
        diff <= Some(1),
        "the second picture of seed 99 is the picture of seed 100"
    );
}

#[test]
fn a_progress_callback_can_stop_the_run() {
    let pipeline = load(&fixture());
    let request = request_of(case(&expected_json(), "nocfg"));
    let mut calls = 0;
    let result = pipeline.generate(&request, &mut |stage, step, _| {
        calls += 1;
        if stage == ImageStage::Denoise && step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(
        matches!(result, Err(ImageError::Cancelled)),
        "{:?}",
        result.err()
    );
    assert_eq!(calls, 3, "the prompt's encoding, then two steps");
}

fn with_lora(file: &Path, strength: f32) -> ImageLoad {
    ImageLoad {
        loras: vec![LoraInfo {
            path: file.to_path_buf(),
            strength,
            adapter_name: "detail".into(),
        }],
        ..cpu_f32()
    }
}

fn check_lora(file: &str) {
    let (json, tensors) = (expected_json(), expected_tensors());
    let strength = json["lora"]["strength"].as_f64().expect("strength") as f32;
    let pipeline = SdPipeline::load(&fixture(), &with_lora(&fixture().join(file), strength))
        .expect("load with LoRA");
    let request = request_of(case(&json, "cfg"));
    let conditioning = pipeline.conditioning(&request).expect("embeddings");
    assert_close(
        &format!("{file} text embeddings"),
        &conditioning.context,
        &tensors["lora.text_embeddings"],
    );
    let noise = pipeline
        .unet_output(
            &tensors["cfg.first_unet_input"],
            751.0,
            &context(&tensors["lora.text_embeddings"]),
        )
        .expect("unet");
    assert_close(
        &format!("{file} first noise prediction"),
        &noise,
        &tensors["lora.first_noise_pred"],
    );
    let (steps, image) = run(&pipeline, &request, &tensors["cfg.latents"]);
    assert_steps_and_image(
        file,
        (&steps, &image),
        &tensors["lora.step_latents"],
        &tensors["lora.image"],
    );
    let unchanged = max_abs_diff(&image.i(0).expect("image"), &tensors["cfg.image"]);
    assert!(
        unchanged > 1e-2,
        "{file}: the LoRA changed nothing ({unchanged})"
    );
}

#[test]
fn peft_lora_matches_the_reference() {
    check_lora("lora/pytorch_lora_weights.safetensors");
}

#[test]
fn kohya_lora_matches_the_reference() {
    check_lora("lora/kohya_lora.safetensors");
}

/// A LoRA set changed in memory: the adapter unmerged gives the base's
/// reference, the same adapter in the other naming merged again gives the
/// LoRA's, and tensors no adapter touches are shared, not copied.
#[test]
fn another_lora_set_is_merged_into_the_loaded_weights() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let strength = json["lora"]["strength"].as_f64().expect("strength") as f32;
    let peft = fixture().join("lora/pytorch_lora_weights.safetensors");
    let kohya = fixture().join("lora/kohya_lora.safetensors");
    let merged = SdPipeline::load(&fixture(), &with_lora(&peft, strength)).expect("load");
    let request = request_of(case(&json, "cfg"));

    let plain = merged.with_loras(&[]).expect("unmerged");
    assert!(plain.loras().is_empty());
    let (steps, image) = run(&plain, &request, &tensors["cfg.latents"]);
    assert_steps_and_image(
        "unmerged",
        (&steps, &image),
        &tensors["cfg.step_latents"],
        &tensors["cfg.image"],
    );

    let remerged = plain
        .with_loras(&with_lora(&kohya, strength).loras)
        .expect("merged again");
    assert_eq!(remerged.loras()[0].path, kohya);
    let (steps, image) = run(&remerged, &request, &tensors["cfg.latents"]);
    assert_steps_and_image(
        "re-merged",
        (&steps, &image),
        &tensors["lora.step_latents"],
        &tensors["lora.image"],
    );

    let id = |p: &SdPipeline, key: &str| p.parts.unet[key].id();
    let untouched = "conv_in.weight";
    let touched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    assert_eq!(id(&merged, untouched), id(&remerged, untouched));
    assert_ne!(id(&merged, touched), id(&plain, touched));
    let vae = |p: &SdPipeline| p.parts.vae["decoder.conv_out.weight"].id();
    assert_eq!(vae(&merged), vae(&remerged));
}

/// Unmerging needs the numbers that were merged: an adapter file that
/// changed since is refused, and the caller loads the base from its files.
#[test]
fn a_lora_changed_since_it_was_merged_is_not_unmerged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("adapter.safetensors");
    std::fs::copy(
        fixture().join("lora/pytorch_lora_weights.safetensors"),
        &file,
    )
    .expect("copy");
    let merged = SdPipeline::load(&fixture(), &with_lora(&file, 1.0)).expect("load");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("adapter");
    tensors.insert("extra".into(), zeros(&[8]));
    candle_core::safetensors::save(&tensors, &file).expect("rewrite");
    match merged.with_loras(&[]) {
        Err(ImageError::LoraChanged { file: named }) => assert_eq!(named, file),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("unmerged a changed adapter"),
    }
    // Keeping the same adapter needs no unmerging.
    assert!(merged.with_loras(&with_lora(&file, 1.0).loras).is_ok());
}

fn load_error(adapter: HashMap<String, Tensor>) -> (PathBuf, ImageError) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("adapter.safetensors");
    candle_core::safetensors::save(&adapter, &file).expect("save adapter");
    match SdPipeline::load(&fixture(), &with_lora(&file, 1.0)) {
        Ok(_) => panic!("a bad LoRA was merged"),
        Err(e) => (file, e),
    }
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("zeros")
}

#[test]
fn a_lora_matching_nothing_is_refused_naming_the_file() {
    let (file, error) = load_error(HashMap::from([
        (
            "model.layers.0.self_attn.q_proj.lora_A.weight".to_owned(),
            zeros(&[4, 32]),
        ),
        (
            "model.layers.0.self_attn.q_proj.lora_B.weight".to_owned(),
            zeros(&[32, 4]),
        ),
    ]));
    assert!(
        matches!(&error, ImageError::LoraNoMatch { file: f } if *f == file),
        "{error}"
    );
    assert!(
        error.to_string().contains(&file.display().to_string()),
        "{error}"
    );
}

#[test]
fn a_lora_for_another_base_is_refused_naming_the_tensor() {
    let module = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q";
    let (_, error) = load_error(HashMap::from([
        (format!("{module}.lora_A.weight"), zeros(&[4, 320])),
        (format!("{module}.lora_B.weight"), zeros(&[320, 4])),
    ]));
    let message = error.to_string();
    assert!(matches!(error, ImageError::LoraShape { .. }), "{message}");
    assert!(
        message.contains(&format!("{module}.lora_A.weight")),
        "{message}"
    );
}

#[test]
fn single_file_checkpoint_matches_the_reference() {
    let (json, tensors) = (expected_json(), expected_tensors());
    let dir = fixture().join("single_file");
    let pipeline = SdPipeline::load_single_file(
        &dir.join("tiny-sd.safetensors"),
        Some(&dir.join("tiny-sd.yaml")),
        &fixture(),
        &cpu_f32(),
    )
    .expect("single file loads");
    let request = request_of(case(&json, "cfg"));
    // The text encoder runs on the checkpoint's float16-rounded weights too.
    let conditioning = pipeline.conditioning(&request).expect("embeddings");
    let noise = pipeline
        .unet_output(&tensors["cfg.first_unet_input"], 751.0, &conditioning)
        .expect("unet");
    assert_close(
        "single-file first noise prediction",
        &noise,
        &tensors["single_file.first_noise_pred"],
    );
    let (_, image) = run(&pipeline, &request, &tensors["cfg.latents"]);
    assert_close(
        "single-file image",
        &image.i(0).expect("image"),
        &tensors["single_file.image"],
    );
}

#[test]
fn single_file_shapes_are_inferred_without_yaml_or_configs() {
    let renamed =
        single_file::rename(&fixture().join("single_file/tiny-sd.safetensors")).expect("rename");
    let from_folder: config::UnetJson =
        read_json(&fixture().join("unet/config.json")).expect("config");
    let unet = single_file::unet_json(&renamed.unet, None, None).expect("unet config");
    assert_eq!(
        format!("{:?}", unet.to_candle().expect("candle")),
        format!("{:?}", from_folder.to_candle().expect("candle"))
    );
    let vae = single_file::vae_json(&renamed.vae, None, false).expect("vae config");
    assert_eq!(vae.block_out_channels, vec![32, 64]);
    assert_eq!((vae.layers_per_block, vae.latent_channels), (1, 4));
    for (component, file, renamed) in [
        ("unet", "diffusion_pytorch_model", &renamed.unet),
        ("vae", "diffusion_pytorch_model", &renamed.vae),
        ("text_encoder", "model", &renamed.text_encoder),
    ] {
        let path = fixture().join(format!("{component}/{file}.safetensors"));
        let folder = weights::load_tensors(&[path]).expect("weights");
        assert_eq!(renamed.len(), folder.len(), "{component} tensor count");
        for (name, tensor) in &folder {
            let ours = renamed
                .get(name)
                .unwrap_or_else(|| panic!("single file lacks {component} {name}"));
            assert_eq!(ours.dims(), tensor.dims(), "{component} {name}");
        }
    }
}

/// transformers 5 saves the text encoder without `text_model.`: the same
/// weights load and encode alike.
#[test]
fn a_text_encoder_saved_without_its_prefix_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("tiny-sd");
    copy_tree(&fixture(), &copy);
    let file = copy.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("weights");
    let bare: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            (
                name.strip_prefix("text_model.")
                    .expect("prefixed")
                    .to_owned(),
                t,
            )
        })
        .collect();
    candle_core::safetensors::save(&bare, &file).expect("save");
    let (json, tensors) = (expected_json(), expected_tensors());
    let request = request_of(case(&json, "cfg"));
    let embeddings = load(&copy)
        .conditioning(&request)
        .expect("embeddings")
        .context;
    assert_close(
        "unprefixed text encoder",
        &embeddings,
        &tensors["cfg.text_embeddings"],
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The stages a run reached when a cancel, made at `stop_at`, was
/// honoured by the network code itself: the callback always answers
/// `Continue`, so only the checks between blocks can stop it.
fn stages_reached(stop_at: (ImageStage, usize)) -> Vec<(ImageStage, usize)> {
    let pipeline = load(&fixture());
    let request = request_of(case(&expected_json(), "nocfg"));
    let cancel = crate::engine::cancel::Cancellation::new();
    let mut seen = Vec::new();
    let result = crate::engine::interrupt::during(&cancel, || {
        pipeline.generate(&request, &mut |stage, step, _| {
            seen.push((stage, step));
            if (stage, step) == stop_at {
                cancel.request();
            }
            ControlFlow::Continue(())
        })
    });
    assert!(result.is_err(), "a cancelled run has no pictures");
    seen
}

#[test]
fn a_cancel_is_honoured_inside_a_denoising_step() {
    use ImageStage::{Denoise, Encode};
    assert_eq!(
        stages_reached((Encode, 1)),
        [(Encode, 1)],
        "no step finished"
    );
    assert_eq!(
        stages_reached((Denoise, 1)),
        [(Encode, 1), (Denoise, 1)],
        "the second step stopped midway"
    );
}

#[test]
fn a_cancel_is_honoured_inside_the_vae_decode() {
    let steps = request_of(case(&expected_json(), "nocfg")).steps;
    let seen = stages_reached((ImageStage::Denoise, steps));
    assert_eq!(seen.last(), Some(&(ImageStage::Denoise, steps)));
    assert!(!seen.iter().any(|(stage, _)| *stage == ImageStage::Decode));
}
