//! The FLUX pipeline against diffusers' reference numbers for the
//! tiny-flux fixture: sigmas, token ids, T5 states and CLIP's pooled
//! output, every step's packed latents and the picture, for dev, schnell,
//! the BFL single file, its fp8 copy, a PEFT LoRA and img2img.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use modeld_wire::types::{ImageStage, LoraInfo};
use serde_json::Value;

use super::*;
use crate::engine::image::request::{decode_init_image, Given, ImageRequest};
use crate::engine::image::test_support::{
    assert_close, case, cpu_f32, fixture_dir, max_abs_diff, no_noise, reference_json,
    reference_tensors, stages, Injected,
};

pub(super) fn fixture() -> PathBuf {
    fixture_dir("tiny-flux")
}

pub(super) fn expected_json() -> Value {
    reference_json(&fixture())
}

pub(super) fn expected() -> HashMap<String, Tensor> {
    reference_tensors(&fixture())
}

fn load(folder: &str, options: &ImageLoad) -> FluxPipeline {
    FluxPipeline::load(&fixture().join(folder), &ImageParts::default(), options)
        .expect("pipeline loads")
}

fn single_file(name: &str, options: &ImageLoad) -> FluxPipeline {
    load_single_file(&fixture().join("single_file").join(name), options).expect("single file loads")
}

/// A single-file transformer with the rest of the pipeline from dev.
pub(super) fn load_single_file(
    file: &Path,
    options: &ImageLoad,
) -> Result<FluxPipeline, ImageError> {
    let parts = ImageParts {
        config_dir: Some(fixture().join("dev")),
        ..ImageParts::default()
    };
    FluxPipeline::load_single_file(file, &parts, options)
}

/// The request a reference case's pipeline call makes.
fn request_of(case: &Value) -> ValidImageRequest {
    ValidImageRequest::try_from(image_request_of(case)).expect("reference request is valid")
}

/// A reference case's call as a client's request, before validation.
fn image_request_of(case: &Value) -> ImageRequest {
    let number = |key: &str| case[key].as_u64().unwrap_or_else(|| panic!("{key}"));
    ImageRequest {
        prompt: case["prompt"].as_str().expect("prompt").into(),
        negative_prompt: None,
        width: number("width") as u32,
        height: number("height") as u32,
        steps: number("steps") as u32,
        guidance: case["guidance"].as_f64().expect("guidance"),
        seed: 0,
        count: 1,
        scheduler: None,
        init_image: None,
        strength: None,
        given: Given {
            steps: true,
            guidance: true,
        },
        max_sequence_length: Some(number("max_sequence_length") as u32),
    }
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

/// Every step's packed latents and the picture of `pipeline` on the case's
/// stored starting latents.
pub(super) fn run(pipeline: &FluxPipeline, name: &str) -> (Vec<Tensor>, Tensor) {
    let json = expected_json();
    let request = request_of(case(&json, name));
    let latents = &expected()[&format!("{name}.latents")];
    render_steps(pipeline, &request, latents, &mut no_noise())
}

/// Every step's packed latents and the picture of one `request` from the
/// packed starting `latents` (without a batch dimension).
fn render_steps(
    pipeline: &FluxPipeline,
    request: &ValidImageRequest,
    latents: &Tensor,
    noise: &mut dyn StepNoise,
) -> (Vec<Tensor>, Tensor) {
    let settings = pipeline.settings(request).expect("settings");
    let latents = latents.unsqueeze(0).expect("batch");
    let mut steps = Vec::new();
    let image = pipeline
        .render(request, &settings, latents, noise, &mut |event| {
            if let RunEvent::Denoised { latents: l, .. } = event {
                steps.push(l.squeeze(0).expect("one picture"));
            }
            ControlFlow::Continue(())
        })
        .expect("render");
    (steps, image.squeeze(0).expect("one picture"))
}

/// A run's steps and picture against case `name`'s references.
fn assert_case(pipeline: &FluxPipeline, name: &str) {
    let (steps, image) = run(pipeline, name);
    let reference = expected();
    let step_latents = &reference[&format!("{name}.step_latents")];
    for (i, ours) in steps.iter().enumerate() {
        let theirs = step_latents.get(i).expect("step");
        assert_close(&format!("{name} step {i}"), ours, &theirs);
    }
    assert_close(
        &format!("{name} image"),
        &image,
        &reference[&format!("{name}.image")],
    );
}

#[test]
fn sigmas_and_timesteps_follow_the_scheduler() {
    let json = expected_json();
    for (name, folder) in [("dev", "dev"), ("dev_g1", "dev"), ("schnell", "schnell")] {
        let case = case(&json, name);
        let scheduler: FlowMatchJson = read_json(
            &fixture()
                .join(folder)
                .join("scheduler/scheduler_config.json"),
        )
        .expect("scheduler config");
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let tokens = json["image_seq_len"].as_u64().expect("tokens") as usize;
        let sigmas = sampling::sigmas(&scheduler, steps, tokens);
        let timesteps = sampling::timesteps(&scheduler, &sigmas);
        for (ours, theirs) in sigmas.iter().zip(floats(&case["sigmas"])) {
            assert!(
                (ours - theirs).abs() < 1e-6,
                "{name}: sigma {ours} != {theirs}"
            );
        }
        for (ours, theirs) in timesteps.iter().zip(floats(&case["timesteps"])) {
            assert!(
                (ours - theirs).abs() < 1e-3,
                "{name}: timestep {ours} != {theirs}"
            );
        }
        assert_eq!(sigmas.len(), steps + 1);
    }
}

#[test]
fn prompts_encode_as_the_reference() {
    let pipeline = load("dev", &cpu_f32());
    let json = expected_json();
    let reference = expected();
    for name in ["dev", "dev_g1"] {
        let case = case(&json, name);
        let length = case["max_sequence_length"].as_u64().expect("length") as usize;
        let prompt = case["prompt"].as_str().expect("prompt");
        let ids =
            |key: &str| -> Vec<u32> { floats(&case[key]).into_iter().map(|v| v as u32).collect() };
        let t5 = pipeline
            .parts
            .t5_tokenizer
            .ids_of_length(prompt, length)
            .expect("t5 ids");
        assert_eq!(t5, ids("t5_input_ids"), "{name}: T5 ids");
        let clip = pipeline.parts.clip.tokenizer.ids(prompt).expect("clip ids");
        assert_eq!(clip, ids("clip_input_ids"), "{name}: CLIP ids");
        let (context, pooled) = pipeline.encode_prompt(prompt, length).expect("encode");
        assert_close(
            &format!("{name} prompt_embeds"),
            &context.squeeze(0).expect("batch"),
            &reference[&format!("{name}.prompt_embeds")],
        );
        assert_close(
            &format!("{name} pooled"),
            &pooled.squeeze(0).expect("batch"),
            &reference[&format!("{name}.pooled")],
        );
    }
}

#[test]
fn dev_matches_the_reference() {
    let pipeline = load("dev", &cpu_f32());
    assert_eq!(pipeline.variant(), Variant::Dev);
    assert_case(&pipeline, "dev");
    assert_case(&pipeline, "dev_g1");
}

#[test]
fn schnell_matches_the_reference() {
    let pipeline = load("schnell", &cpu_f32());
    assert_eq!(pipeline.variant(), Variant::Schnell);
    assert_eq!(pipeline.arch(), "flux-schnell");
    assert_case(&pipeline, "schnell");
}

#[test]
fn the_bfl_single_file_matches_the_diffusers_folder() {
    let pipeline = single_file("tiny-flux-dev.safetensors", &cpu_f32());
    assert_eq!(pipeline.variant(), Variant::Dev);
    let folder = load("dev", &cpu_f32());
    for (name, tensor) in &folder.parts.transformer {
        let ours = &pipeline.parts.transformer[name];
        assert_eq!(max_abs_diff(ours, tensor), 0.0, "{name}");
    }
    assert_eq!(
        pipeline.parts.transformer.len(),
        folder.parts.transformer.len()
    );
    assert_case(&pipeline, "dev");
}

#[test]
fn the_fp8_file_stays_fp8_and_matches_its_reference() {
    let pipeline = single_file("tiny-flux-dev-fp8_e4m3fn.safetensors", &cpu_f32());
    let qkv = &pipeline.parts.transformer["transformer_blocks.0.attn.to_q.weight"];
    assert_eq!(qkv.dtype(), DType::F8E4M3, "kept as storage");
    let bias = &pipeline.parts.transformer["transformer_blocks.0.attn.to_q.bias"];
    assert_eq!(bias.dtype(), DType::F32);
    assert_case(&pipeline, "fp8");
}

fn lora_file() -> PathBuf {
    fixture().join("lora/pytorch_lora_weights.safetensors")
}

pub(super) fn with_lora(strength: f32) -> ImageLoad {
    ImageLoad {
        loras: vec![LoraInfo {
            adapter_name: "tiny".into(),
            path: lora_file(),
            strength,
        }],
        ..cpu_f32()
    }
}

#[test]
fn a_peft_lora_matches_the_reference() {
    let json = expected_json();
    let scale = json["lora"]["scale"].as_f64().expect("scale") as f32;
    let pipeline = load("dev", &with_lora(scale));
    assert_eq!(pipeline.loras().len(), 1);
    assert_case(&pipeline, "lora");
}

#[test]
fn a_lora_set_is_merged_and_unmerged_in_memory() {
    let json = expected_json();
    let scale = json["lora"]["scale"].as_f64().expect("scale") as f32;
    let plain = load("dev", &cpu_f32());
    let adapted = plain
        .with_loras(&with_lora(scale).loras)
        .expect("merged in memory");
    assert_case(&adapted, "lora");
    let untouched = "x_embedder.weight";
    assert_eq!(
        adapted.parts.transformer[untouched].id(),
        plain.parts.transformer[untouched].id(),
        "tensors no adapter touches are shared"
    );
    let back = adapted.with_loras(&[]).expect("unmerged");
    assert_case(&back, "dev");
}

#[test]
fn flux_refuses_what_it_cannot_run_by_name() {
    let pipeline = load("schnell", &cpu_f32());
    let json = expected_json();
    let base = request_of(case(&json, "schnell"));
    let refused = |change: &dyn Fn(&mut ValidImageRequest)| {
        let mut request = base.clone();
        change(&mut request);
        pipeline.settings(&request).expect_err("refused").field
    };
    assert_eq!(
        refused(&|r| r.negative_prompt = Some("blur".into())),
        "negative_prompt"
    );
    assert_eq!(
        refused(&|r| r.scheduler = Some(crate::engine::image::sd::scheduler::SchedulerKind::Ddim)),
        "scheduler"
    );
    assert_eq!(refused(&|r| r.width = 50), "size");
}

#[test]
fn variant_defaults_apply_when_the_request_leaves_them_out() {
    let json = expected_json();
    let mut request = request_of(case(&json, "dev"));
    request.given = Given::default();
    request.max_sequence_length = None;
    let dev = load("dev", &cpu_f32()).settings(&request).expect("dev");
    assert_eq!(
        (dev.steps, dev.guidance, dev.max_sequence_length),
        (DEV_STEPS, DEV_GUIDANCE, DEV_MAX_SEQUENCE_LENGTH)
    );
    let schnell = load("schnell", &cpu_f32())
        .settings(&request)
        .expect("schnell");
    assert_eq!(
        (schnell.steps, schnell.max_sequence_length),
        (SCHNELL_STEPS, SCHNELL_MAX_SEQUENCE_LENGTH)
    );
}

#[test]
fn generate_is_reproducible_per_seed_and_reports_steps() {
    let pipeline = load("schnell", &cpu_f32());
    let json = expected_json();
    let mut request = request_of(case(&json, "schnell"));
    request.count = 2;
    let mut seen = Vec::new();
    let pictures = pipeline
        .generate(&request, &mut |stage, step, steps| {
            seen.push((stage, step, steps));
            ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(seen, stages(4, 2), "every stage, in order");
    assert_eq!(pictures.len(), 2);
    assert_ne!(pictures[0], pictures[1], "each picture has its own seed");
    request.count = 1;
    request.seed = 1;
    let second_alone = pipeline
        .generate(&request, &mut |_, _, _| ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!(
        second_alone[0], pictures[1],
        "seed + i reproduces picture i"
    );
}

/// The fixture's PEFT LoRA rewritten into kohya's fused BFL modules: the
/// parts' downs stacked, their ups block-diagonal, alpha the fused rank,
/// so that each part's rows of `up · down` are its own adapter's.
fn kohya_copy_of_the_peft_lora(dir: &Path) -> PathBuf {
    let peft = candle_core::safetensors::load(lora_file(), &Device::Cpu).expect("lora");
    let get = |module: &str, part: &str| {
        peft[&format!("transformer.{module}.lora_{part}.weight")].clone()
    };
    let mut kohya = HashMap::new();
    let mut fuse = |name: &str, modules: &[String]| {
        let downs: Vec<Tensor> = modules.iter().map(|m| get(m, "A")).collect();
        let ups: Vec<Tensor> = modules.iter().map(|m| get(m, "B")).collect();
        let ranks: Vec<usize> = downs.iter().map(|d| d.dim(0).expect("rank")).collect();
        let total: usize = ranks.iter().sum();
        let mut rows = Vec::new();
        let mut before = 0;
        for (up, rank) in ups.iter().zip(&ranks) {
            let height = up.dim(0).expect("rows");
            let zeros = |width: usize| Tensor::zeros((height, width), DType::F32, &Device::Cpu);
            let left = zeros(before).expect("zeros");
            let right = zeros(total - before - rank).expect("zeros");
            rows.push(Tensor::cat(&[&left, up, &right], 1).expect("row block"));
            before += rank;
        }
        let key = |part: &str| format!("lora_unet_{name}.{part}");
        kohya.insert(
            key("lora_down.weight"),
            Tensor::cat(&downs, 0).expect("down"),
        );
        kohya.insert(key("lora_up.weight"), Tensor::cat(&rows, 0).expect("up"));
        kohya.insert(
            key("alpha"),
            Tensor::new(total as f32, &Device::Cpu).expect("alpha"),
        );
    };
    let block = |names: &[&str], prefix: &str| -> Vec<String> {
        names.iter().map(|n| format!("{prefix}.{n}")).collect()
    };
    for i in 0..2 {
        let double = format!("transformer_blocks.{i}");
        let fused = |part: &str| format!("double_blocks_{i}_{part}");
        let qkv = ["attn.to_q", "attn.to_k", "attn.to_v"];
        fuse(&fused("img_attn_qkv"), &block(&qkv, &double));
        let added = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
        fuse(&fused("txt_attn_qkv"), &block(&added, &double));
        fuse(&fused("img_attn_proj"), &block(&["attn.to_out.0"], &double));
        fuse(
            &fused("txt_attn_proj"),
            &block(&["attn.to_add_out"], &double),
        );
        let single = format!("single_transformer_blocks.{i}");
        let linear1 = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
        fuse(
            &format!("single_blocks_{i}_linear1"),
            &block(&linear1, &single),
        );
    }
    let file = dir.join("kohya.safetensors");
    candle_core::safetensors::save(&kohya, &file).expect("kohya file");
    file
}

#[test]
fn a_kohya_lora_on_fused_bfl_modules_matches_the_peft_reference() {
    let json = expected_json();
    let scale = json["lora"]["scale"].as_f64().expect("scale") as f32;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = kohya_copy_of_the_peft_lora(dir.path());
    let options = ImageLoad {
        loras: vec![LoraInfo {
            adapter_name: "kohya".into(),
            path: file,
            strength: scale,
        }],
        ..cpu_f32()
    };
    assert_case(&load("dev", &options), "lora");
}

#[test]
fn img2img_at_full_strength_is_text_to_image_and_less_runs_fewer_steps() {
    let pipeline = load("schnell", &cpu_f32());
    let json = expected_json();
    let request = request_of(case(&json, "schnell"));
    let draw = |request: &ValidImageRequest| {
        let mut steps = 0;
        let pictures = pipeline
            .generate(request, &mut |stage, _, _| {
                steps += usize::from(stage == ImageStage::Denoise);
                ControlFlow::Continue(())
            })
            .expect("generate");
        (pictures, steps)
    };
    let (plain, _) = draw(&request);
    let picture = &plain[0];
    let mut img2img = request.clone();
    img2img.init_image = Some(crate::engine::image::request::InitImage {
        width: picture.width as u32,
        height: picture.height as u32,
        rgb: picture.rgb.clone(),
    });
    img2img.strength = 1.0;
    let (full, steps) = draw(&img2img);
    assert_eq!(steps, 4);
    assert_eq!(full, plain, "sigma 1 keeps none of the encoded picture");
    img2img.strength = 0.5;
    let (half, steps) = draw(&img2img);
    assert_eq!(steps, 2);
    let run = pipeline.settings(&img2img).expect("settings");
    assert_eq!((run.first_step, run.steps_run()), (2, 2));
    assert_ne!(half, plain);
    // diffusers' FLUX keeps the fraction SD floors: 0.8 of a step is one.
    img2img.strength = 0.2;
    let run = pipeline.settings(&img2img).expect("one step runs");
    assert_eq!(run.steps_run(), 1);
    assert!(pipeline.run_cost(&img2img).steps == 1);
}

/// The img2img reference (`tiny-flux/img2img`, made by its `generate.py`):
/// diffusers' `FluxImg2ImgPipeline` on dev from `init.png`, with the
/// random draws it made.
fn img2img_reference() -> (Value, HashMap<String, Tensor>) {
    let dir = fixture().join("img2img");
    (reference_json(&dir), reference_tensors(&dir))
}

fn img2img_request(json: &Value) -> ValidImageRequest {
    let png = std::fs::read(fixture().join("img2img/init.png")).expect("init.png");
    let base64 = base64::engine::general_purpose::STANDARD.encode(png);
    let mut request = image_request_of(json);
    request.init_image = Some(decode_init_image(&base64).expect("init.png decodes"));
    request.strength = json["strength"].as_f64();
    ValidImageRequest::try_from(request).expect("reference request is valid")
}

/// diffusers' posterior draw, the only noise an img2img run takes besides
/// its starting latents.
fn posterior_draw(tensors: &HashMap<String, Tensor>) -> Injected {
    Injected(VecDeque::from([tensors["posterior_noise"].clone()]))
}

#[test]
fn img2img_encodes_the_picture_as_the_reference() {
    let (json, tensors) = img2img_reference();
    let pipeline = load("dev", &cpu_f32());
    let request = img2img_request(&json);
    let image = request.init_image.as_ref().expect("init image");
    let mut noise = posterior_draw(&tensors);
    let encoded = pipeline
        .vae
        .encode(image, 1, &mut noise, &Device::Cpu)
        .expect("encode");
    let packed = pack(&encoded).expect("pack").squeeze(0).expect("batch");
    assert_close("encoded picture", &packed, &tensors["image_latents"]);
}

#[test]
fn img2img_matches_the_reference() {
    let (json, tensors) = img2img_reference();
    let pipeline = load("dev", &cpu_f32());
    let request = img2img_request(&json);
    let run = pipeline.settings(&request).expect("settings");
    let number = |key: &str| json[key].as_u64().expect(key) as usize;
    assert_eq!(
        (run.first_step, run.steps_run()),
        (number("first_step"), number("steps_run"))
    );
    let tokens = tensors["start_noise_packed"].dim(0).expect("tokens");
    let sigmas = sampling::sigmas(&pipeline.parts.scheduler_json, run.steps, tokens);
    for (ours, theirs) in sigmas.iter().zip(floats(&json["sigmas"])) {
        assert!((ours - theirs).abs() < 1e-6, "sigma {ours} != {theirs}");
    }
    let mut noise = posterior_draw(&tensors);
    let start = &tensors["start_noise_packed"];
    let (steps, image) = render_steps(&pipeline, &request, start, &mut noise);
    assert!(noise.0.is_empty(), "the posterior draw was taken");
    let step_latents = &tensors["step_latents"];
    assert_eq!(steps.len(), step_latents.dim(0).expect("steps"));
    for (i, ours) in steps.iter().enumerate() {
        let theirs = step_latents.get(i).expect("step");
        assert_close(&format!("img2img step {i}"), ours, &theirs);
    }
    assert_close("img2img image", &image, &tensors["image"]);
}

#[test]
fn offloaded_text_encoders_are_not_counted_on_the_device() {
    let dev = fixture().join("dev");
    let parts = ImageParts {
        offload_text_encoders: true,
        ..ImageParts::default()
    };
    let on_device = crate::engine::image::device_weight_files(&dev, &parts).expect("files");
    let all = crate::engine::image::device_weight_files(&dev, &ImageParts::default());
    let all = all.expect("files");
    assert_eq!(all.len(), on_device.len() + 2, "{all:?}");
    assert!(on_device
        .iter()
        .all(|f| !f.to_string_lossy().contains("text_encoder")));
}

/// Only the transformer's own checks can stop this run: the callback
/// answers `Continue` after asking for the cancel.
#[test]
fn a_cancel_is_honoured_inside_a_flux_step() {
    let pipeline = load("schnell", &cpu_f32());
    let request = request_of(case(&expected_json(), "schnell"));
    let cancel = crate::engine::cancel::Cancellation::new();
    let mut seen = Vec::new();
    let result = crate::engine::interrupt::during(&cancel, || {
        pipeline.generate(&request, &mut |stage, step, _| {
            seen.push((stage, step));
            cancel.request();
            ControlFlow::Continue(())
        })
    });
    assert!(result.is_err());
    assert_eq!(seen, [(ImageStage::Encode, 1)], "no step finished");
}
