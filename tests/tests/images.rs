//! Image generation through the daemon with the tiny Stable Diffusion
//! fixtures (SD 1.x and SDXL): loading, seeded PNG files, progress, inline
//! pictures, refused parameters, cancellation, schedulers and img2img.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use modeld_e2e::{copy_tree, fixtures_dir, kind, Daemon};
use modeld_wire::ClientError;
use serde_json::{json, Value};

/// Runs `generate` and returns every event.
fn generate(daemon: &Daemon, params: Value) -> Vec<Value> {
    daemon.generate_events(params)
}

/// The refusal of a `generate` that must not run.
fn refused(daemon: &Daemon, params: Value) -> ClientError {
    match daemon.client().subscribe("generate", params.clone()) {
        Ok(stream) => match stream.collect::<Result<Vec<_>, _>>() {
            Ok(events) => panic!("{params} ran: {:?}", events.last()),
            Err(err) => err,
        },
        Err(err) => err,
    }
}

fn field(err: &ClientError) -> String {
    match err {
        ClientError::Rpc(object) => object.data.as_ref().map_or(String::new(), |data| {
            data["field"].as_str().unwrap_or_default().to_string()
        }),
        other => panic!("not an RPC error: {other}"),
    }
}

/// Width, height and RGB pixels of a PNG file's bytes.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("PNG pixels");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    pixels.truncate(info.buffer_size());
    (info.width, info.height, pixels)
}

fn picture_paths(done: &Value) -> Vec<PathBuf> {
    done["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|image| PathBuf::from(image["path"].as_str().expect("path")))
        .collect()
}

fn image_daemon() -> Daemon {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-sd");
    daemon
}

#[test]
fn seeded_pictures_are_written_as_png_files_and_reproduce() {
    let daemon = image_daemon();
    let loaded = daemon.call("load", json!({"name": "tiny-sd"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "stable-diffusion");
    assert!(loaded["model"]["estimated_bytes"].as_u64().unwrap() > 0);
    let params = json!({"model": "tiny-sd", "prompt": "a red cube", "size": "64x48",
                        "steps": 3, "seed": 42, "count": 2});
    let events = generate(&daemon, params.clone());
    let stages: Vec<(&str, u64)> = events
        .iter()
        .filter(|e| e["event"] == "progress")
        .map(|e| (e["stage"].as_str().unwrap(), e["step"].as_u64().unwrap()))
        .collect();
    let expected = [
        ("encode", 1),
        ("denoise", 1),
        ("denoise", 2),
        ("denoise", 3),
    ];
    let expected = [&expected[..], &[("decode", 1), ("decode", 2)]].concat();
    assert_eq!(stages, expected, "every stage is reported, in order");
    let steps: Vec<&Value> = events.iter().filter(|e| e["stage"] == "denoise").collect();
    assert_eq!(steps[2]["step"], 3);
    assert_eq!(steps[2]["steps"], 3);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(
        (done["seed"].clone(), done["size"].clone()),
        (json!(42), json!("64x48"))
    );
    let paths = picture_paths(done);
    assert_eq!(paths.len(), 2);
    assert_eq!(done["images"][1]["seed"], 43);
    let images_dir = daemon.state_dir.join("images");
    let mut first = Vec::new();
    for path in &paths {
        assert_eq!(path.parent(), Some(images_dir.as_path()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.contains("-seed4"), "{name}");
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "{}", path.display());
        let bytes = std::fs::read(path).unwrap();
        let (width, height, pixels) = decode_png(&bytes);
        assert_eq!((width, height), (64, 48));
        assert!(pixels.iter().any(|&p| p != pixels[0]), "a blank picture");
        first.push(bytes);
    }
    assert_ne!(first[0], first[1], "seed + 1 must give another picture");
    let again = generate(&daemon, params);
    let again_paths = picture_paths(again.last().unwrap());
    assert_ne!(again_paths, paths, "files are never overwritten");
    for (path, bytes) in again_paths.iter().zip(&first) {
        assert_eq!(
            &std::fs::read(path).unwrap(),
            bytes,
            "same seed, same picture"
        );
    }
}

/// The tiny SDXL pipeline (two text encoders, added conditioning) loads,
/// is counted with both encoders, and generates pictures of the asked size
/// with a negative prompt and without one (zero uncond embeddings).
#[test]
fn an_sdxl_pipeline_generates_through_the_daemon() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-sdxl");
    let loaded = daemon.call("load", json!({"name": "tiny-sdxl"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "stable-diffusion-xl");
    let fixture = fixtures_dir().join("tiny-sdxl");
    let weights: u64 = ["unet", "vae", "text_encoder", "text_encoder_2"]
        .iter()
        .map(|component| {
            let dir = fixture.join(component);
            std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .map(|e| e.metadata().unwrap().len())
                .sum::<u64>()
        })
        .sum();
    let estimated = loaded["model"]["estimated_bytes"].as_u64().unwrap();
    // f32 weights: the file sizes less their JSON headers.
    assert!(
        estimated <= weights && estimated * 100 >= weights * 95,
        "{estimated} for {weights} bytes of weights"
    );
    for negative in [json!("blurry"), Value::Null] {
        let events = generate(
            &daemon,
            json!({"model": "tiny-sdxl", "prompt": "a red cube", "negative_prompt": negative,
                   "size": "64x48", "steps": 2, "guidance": 5.0, "seed": 7}),
        );
        let done = events.last().unwrap();
        assert_eq!(done["event"], "done", "{done}");
        let (width, height, pixels) = decode_png(&std::fs::read(&picture_paths(done)[0]).unwrap());
        assert_eq!((width, height), (64, 48));
        assert!(pixels.iter().any(|&p| p != pixels[0]), "a blank picture");
    }
}

#[test]
fn inline_pictures_match_their_files_and_output_dir_is_configurable() {
    let out = tempfile::tempdir().unwrap();
    let config = format!("[images]\noutput_dir = {:?}\n", out.path().join("pics"));
    let daemon = Daemon::start_configured(&config, &[]);
    daemon.register_fixture("tiny-sd");
    let events = generate(
        &daemon,
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64", "steps": 2,
               "guidance": 7.5, "negative_prompt": "blur", "inline": true}),
    );
    let done = events.last().unwrap();
    let path = &picture_paths(done)[0];
    assert_eq!(path.parent(), Some(out.path().join("pics").as_path()));
    let inline = base64::engine::general_purpose::STANDARD
        .decode(done["images"][0]["base64"].as_str().expect("base64"))
        .unwrap();
    assert_eq!(inline, std::fs::read(path).unwrap());
    let plain = generate(
        &daemon,
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64", "steps": 1}),
    );
    assert!(plain.last().unwrap()["images"][0].get("base64").is_none());
}

#[test]
fn bad_image_parameters_are_refused_naming_the_field() {
    let daemon = image_daemon();
    for (bad, name) in [
        (json!({"size": "63x64"}), "size"),
        (json!({"size": "4096x64"}), "size"),
        (json!({"size": "large"}), "size"),
        (json!({"steps": 0}), "steps"),
        (json!({"steps": 151}), "steps"),
        (json!({"guidance": -1.0}), "guidance"),
        (json!({"count": 9}), "count"),
        (json!({"scheduler": "pndm"}), "scheduler"),
        (json!({"strength": 0.5}), "strength"),
        (json!({"init_image": "not base64!"}), "init_image"),
        (
            json!({"init_image": init_image(), "size": "32x32"}),
            "init_image",
        ),
        (
            json!({"init_image": init_image(), "strength": 1.5}),
            "strength",
        ),
        (
            json!({"init_image": init_image(), "steps": 2, "strength": 0.4}),
            "strength",
        ),
    ] {
        let mut params = json!({"model": "tiny-sd", "prompt": "a cat"});
        params
            .as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let err = refused(&daemon, params);
        assert_eq!(kind(&err), "invalid_params", "{bad}: {err}");
        assert_eq!(field(&err), name, "{bad}: {err}");
    }
}

#[test]
fn each_kind_of_model_refuses_the_other_kinds_parameters() {
    let daemon = image_daemon();
    daemon.register_fixture("tiny-llama");
    let err = refused(
        &daemon,
        json!({"model": "tiny-sd", "prompt": "a cat", "max_tokens": 4}),
    );
    assert_eq!(kind(&err), "invalid_params", "{err}");
    assert_eq!(field(&err), "max_tokens", "{err}");
    let err = refused(
        &daemon,
        json!({"model": "tiny-sd", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(field(&err), "messages", "{err}");
    let err = refused(
        &daemon,
        json!({"model": "tiny-llama", "prompt": "Hi", "size": "64x64"}),
    );
    assert_eq!(kind(&err), "invalid_params", "{err}");
    assert_eq!(field(&err), "size", "{err}");
    // A bare prompt still runs on a text model.
    let text = generate(&daemon, json!({"model": "tiny-llama", "prompt": "Hi"}));
    assert!(text.last().unwrap()["text"].is_string());
}

#[test]
fn a_cancel_stops_the_run_between_steps() {
    let daemon = image_daemon();
    daemon.call("load", json!({"name": "tiny-sd"})).unwrap();
    let mut client = daemon.client();
    let params = json!({"model": "tiny-sd", "prompt": "a cat", "size": "128x128", "steps": 150});
    let mut stream = client.subscribe("generate", params).expect("accepted");
    let first = stream.next().expect("an event").expect("progress");
    assert_eq!(first["event"], "progress", "{first}");
    let status = daemon.call("status", json!({})).unwrap();
    let job = status["queue"]["jobs"][0]["id"]
        .as_u64()
        .expect("the running job");
    let reply = daemon.call("jobs.cancel", json!({"job": job})).unwrap();
    assert_eq!(reply["cancelled"], true);
    let rest: Vec<Value> = stream.collect::<Result<_, _>>().expect("stream");
    let done = rest.last().unwrap();
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    assert_eq!(done["images"], json!([]));
    assert!(
        rest.len() < 150,
        "ran {} steps after the cancel",
        rest.len()
    );
    let images = daemon.state_dir.join("images");
    let written = std::fs::read_dir(&images).map_or(0, |dir| dir.count());
    assert_eq!(written, 0, "a cancelled run writes no pictures");
}

/// On the CPU the attention runs in blocks, so what bounds a picture is
/// the work: a run estimated (from the networks' shapes, the size, steps
/// and count) to take longer than `scheduler.max_job_s` is refused before
/// it starts, naming what to lower.
#[test]
fn a_run_too_long_for_the_cpu_is_refused_and_the_daemon_lives() {
    let daemon = image_daemon();
    let err = refused(
        &daemon,
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "2048x2048"}),
    );
    assert_eq!(kind(&err), "invalid_params", "{err}");
    assert_eq!(field(&err), "size", "{err}");
    assert!(err.to_string().contains("scheduler.max_job_s"), "{err}");
    let events = generate(
        &daemon,
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64", "steps": 1}),
    );
    assert_eq!(events.last().unwrap()["finish_reason"], "length");
}

/// A copy of the fixture with its `model_index.json` changed by `edit`.
fn variant(daemon: &Daemon, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let dir = daemon.state_dir.parent().unwrap().join(name);
    copy_tree(&fixtures_dir().join("tiny-sd"), &dir);
    let index_path = dir.join("model_index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    edit(&mut index);
    std::fs::write(&index_path, index.to_string()).unwrap();
    daemon
        .call("models.register", json!({"name": name, "local_path": dir}))
        .unwrap();
    dir
}

fn load_error(daemon: &Daemon, name: &str) -> ClientError {
    daemon
        .call("load", json!({"name": name}))
        .expect_err("must be refused")
}

/// Pipelines no native family runs go to the diffusers runner; these
/// fixtures have no weights for it (and the test's python3 may have no
/// torch), so the load fails, naming the class that sent them there.
#[test]
fn other_diffusion_architectures_are_refused_by_name() {
    let daemon = Daemon::start();
    variant(&daemon, "sdxl-refiner", |index| {
        index["_class_name"] = json!("StableDiffusionXLImg2ImgPipeline");
        index["text_encoder"] = json!([null, null]);
        index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
    });
    // FLUX runs, but not Kontext's image-conditioned pipeline.
    variant(&daemon, "kontext", |index| {
        index["_class_name"] = json!("FluxKontextPipeline");
        index.as_object_mut().unwrap().remove("unet");
        index["transformer"] = json!(["diffusers", "FluxTransformer2DModel"]);
    });
    variant(&daemon, "sd3", |index| {
        index["_class_name"] = json!("StableDiffusion3Pipeline");
        index.as_object_mut().unwrap().remove("unet");
        index["transformer"] = json!(["diffusers", "SD3Transformer2DModel"]);
    });
    for (name, named) in [
        ("sdxl-refiner", "StableDiffusionXLImg2ImgPipeline"),
        ("kontext", "FluxKontextPipeline"),
        ("sd3", "StableDiffusion3Pipeline"),
    ] {
        let err = load_error(&daemon, name);
        assert_eq!(kind(&err), "load_failed", "{err}");
        assert!(err.to_string().contains(named), "{err}");
    }
}

#[test]
fn a_single_file_checkpoint_loads_as_an_image_model() {
    let daemon = Daemon::start();
    let dir = daemon.state_dir.parent().unwrap().join("single");
    copy_tree(&fixtures_dir().join("tiny-sd/single_file"), &dir);
    copy_tree(
        &fixtures_dir().join("tiny-sd/tokenizer"),
        &dir.join("tokenizer"),
    );
    let checkpoint: &Path = &dir.join("tiny-sd.safetensors");
    daemon
        .call(
            "models.register",
            json!({"name": "single", "local_path": checkpoint}),
        )
        .unwrap();
    let loaded = daemon.call("load", json!({"name": "single"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "stable-diffusion");
    let events = generate(
        &daemon,
        json!({"model": "single", "prompt": "a cat", "size": "64x64", "steps": 2, "seed": 1}),
    );
    assert_eq!(picture_paths(events.last().unwrap()).len(), 1);
}

/// An SGM-style SDXL checkpoint, its folder holding the tokenizers and
/// the diffusers configs (the tiny UNet's group count is not LDM's 32).
#[test]
fn an_sdxl_single_file_checkpoint_loads_and_generates() {
    let daemon = Daemon::start();
    let dir = daemon.state_dir.parent().unwrap().join("xl-single");
    let fixture = fixtures_dir().join("tiny-sdxl");
    copy_tree(&fixture.join("single_file"), &dir);
    for tokenizer in ["tokenizer", "tokenizer_2"] {
        copy_tree(&fixture.join(tokenizer), &dir.join(tokenizer));
    }
    for config in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        std::fs::create_dir(dir.join(config)).unwrap();
        std::fs::copy(
            fixture.join(config).join("config.json"),
            dir.join(config).join("config.json"),
        )
        .unwrap();
    }
    let checkpoint: &Path = &dir.join("tiny-sdxl.safetensors");
    daemon
        .call(
            "models.register",
            json!({"name": "xl-single", "local_path": checkpoint}),
        )
        .unwrap();
    let loaded = daemon.call("load", json!({"name": "xl-single"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "stable-diffusion-xl");
    let events = generate(
        &daemon,
        json!({"model": "xl-single", "prompt": "a cat", "size": "64x64", "steps": 2,
               "guidance": 3.0, "seed": 1}),
    );
    assert_eq!(picture_paths(events.last().unwrap()).len(), 1);
}

#[test]
fn a_mode_supplies_image_defaults_and_refuses_bad_ones() {
    let daemon = image_daemon();
    let modes = daemon.dir.path().join("modes.toml");
    std::fs::write(
        &modes,
        "[modes.art]\nmodel = \"tiny-sd\"\ndefault_size = \"64x48\"\ndefault_steps = 2\ndefault_guidance = 3.0\n",
    )
    .unwrap();
    let listed = daemon.call("modes.reload", json!({})).unwrap();
    assert_eq!(listed["modes"][0]["default_size"], "64x48");
    let events = generate(&daemon, json!({"mode": "art", "prompt": "a cat"}));
    let done = events.last().unwrap();
    assert_eq!(
        (done["size"].clone(), done["steps"].clone()),
        (json!("64x48"), json!(2))
    );
    assert_eq!(done["mode"], "art");
    let progress = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
        .count();
    assert_eq!(progress, 2);
    // The request's own values win over the mode's.
    let events = generate(
        &daemon,
        json!({"mode": "art", "prompt": "a cat", "steps": 1, "size": "64x64"}),
    );
    assert_eq!(events.last().unwrap()["size"], "64x64");
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
            .count(),
        1
    );

    std::fs::write(
        &modes,
        "[modes.art]\nmodel = \"tiny-sd\"\ndefault_steps = 0\n",
    )
    .unwrap();
    let err = daemon.call("modes.reload", json!({})).expect_err("refused");
    assert!(err.to_string().contains("modes.art.default_steps"), "{err}");
}

#[test]
fn modelctl_shows_progress_and_prints_the_picture_paths() {
    let daemon = image_daemon();
    let output = daemon.ctl(&[
        "generate", "tiny-sd", "a cat", "--size", "64x64", "--steps", "2", "--seed", "5",
        "--count", "2",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("step 2/2"), "{stderr}");
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 2, "{stdout}");
    for path in paths {
        assert!(Path::new(path).is_file(), "{path}");
        assert!(
            path.contains("-seed5-0") || path.contains("-seed6-1"),
            "{path}"
        );
    }
}

/// The img2img fixture picture (64x64), as a request carries it.
fn init_image() -> String {
    let bytes = std::fs::read(fixtures_dir().join("tiny-sd-extra/init.png")).expect("init.png");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inline PNG of a run's single picture.
fn inline_picture(events: &[Value]) -> String {
    events.last().unwrap()["images"][0]["base64"]
        .as_str()
        .expect("inline picture")
        .to_string()
}

#[test]
fn a_request_picks_its_scheduler_and_seeded_noise_reproduces() {
    let daemon = image_daemon();
    let request = |scheduler: Option<&str>, seed: u64| {
        let mut params = json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64",
            "steps": 3, "seed": seed, "inline": true});
        if let Some(name) = scheduler {
            params["scheduler"] = json!(name);
        }
        generate(&daemon, params)
    };
    let default = request(None, 1);
    assert_eq!(default.last().unwrap()["scheduler"], "ddim");
    let mut pictures = vec![inline_picture(&default)];
    for name in ["euler", "euler_a", "ddpm", "dpmpp_2m", "unipc"] {
        let events = request(Some(name), 1);
        assert_eq!(events.last().unwrap()["scheduler"], name);
        let progress = events
            .iter()
            .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
            .count();
        assert_eq!(progress, 3, "{name}");
        pictures.push(inline_picture(&events));
    }
    // DDPM's posterior step and Euler ancestral's step are the same
    // ancestral sampler written two ways: on this fixture, with the same
    // draws, their pictures are within one level of each other and may
    // round to the same bytes. Every other pair differs.
    for (i, a) in pictures.iter().enumerate() {
        for (j, b) in pictures.iter().enumerate().skip(i + 1) {
            if (i, j) != (2, 3) {
                assert_ne!(a, b, "schedulers {i} and {j} drew the same picture");
            }
        }
    }
    // The stochastic one's per-step noise comes from the seed.
    let again = inline_picture(&request(Some("euler_a"), 1));
    assert_eq!(again, pictures[2]);
    assert_ne!(inline_picture(&request(Some("euler_a"), 2)), again);
}

#[test]
fn img2img_takes_the_pictures_size_and_runs_strength_of_the_steps() {
    let daemon = image_daemon();
    let params = json!({"model": "tiny-sd", "prompt": "a cat", "steps": 4, "strength": 0.5,
        "seed": 3, "inline": true, "init_image": init_image(), "scheduler": "dpmpp_2m"});
    let events = generate(&daemon, params.clone());
    let done = events.last().unwrap();
    assert_eq!(
        (done["size"].clone(), done["steps"].clone()),
        (json!("64x64"), json!(2))
    );
    let progress: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
        .collect();
    assert_eq!(progress.len(), 2);
    assert_eq!(progress[1]["steps"], 2);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(inline_picture(&events))
        .unwrap();
    assert_eq!(decode_png(&bytes).0, 64);
    assert_eq!(
        inline_picture(&generate(&daemon, params)),
        inline_picture(&events)
    );
}

#[test]
fn a_mode_supplies_the_default_scheduler_and_refuses_unknown_ones() {
    let daemon = image_daemon();
    let modes = daemon.dir.path().join("modes.toml");
    std::fs::write(
        &modes,
        "[modes.art]\nmodel = \"tiny-sd\"\ndefault_size = \"32x32\"\ndefault_steps = 2\ndefault_scheduler = \"unipc\"\n",
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let events = generate(&daemon, json!({"mode": "art", "prompt": "a cat"}));
    assert_eq!(events.last().unwrap()["scheduler"], "unipc");
    // An img2img request's size is its picture's, not the mode's.
    let events = generate(
        &daemon,
        json!({"mode": "art", "prompt": "a cat", "init_image": init_image(), "strength": 1.0}),
    );
    assert_eq!(events.last().unwrap()["size"], "64x64");
    std::fs::write(
        &modes,
        "[modes.art]\nmodel = \"tiny-sd\"\ndefault_scheduler = \"plms\"\n",
    )
    .unwrap();
    let err = daemon.call("modes.reload", json!({})).expect_err("refused");
    assert!(
        err.to_string().contains("modes.art.default_scheduler"),
        "{err}"
    );
}

#[test]
fn modelctl_passes_scheduler_and_init_image() {
    let daemon = image_daemon();
    let picture = fixtures_dir().join("tiny-sd-extra/init.png");
    let output = daemon.ctl(&[
        "generate",
        "tiny-sd",
        "a cat",
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--scheduler",
        "euler_a",
        "--init-image",
        picture.to_str().unwrap(),
        "--seed",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("step 2/2"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout.lines().next().expect("a path");
    let (width, height, _) = decode_png(&std::fs::read(path).unwrap());
    assert_eq!((width, height), (64, 64));
}

/// The RGB pixels of a run's single inline picture.
fn inline_pixels(events: &[Value]) -> Vec<u8> {
    let png = base64::engine::general_purpose::STANDARD
        .decode(inline_picture(events))
        .expect("base64");
    decode_png(&png).2
}

/// The largest difference between two pictures' channel values.
fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Modes on one base that differ only in LoRAs: a switch re-merges the
/// adapters into the resident copy in memory, which it replaces, so it
/// works with the base's weight files spoiled on disk, and each mode still
/// draws what it drew when loaded from the files.
#[test]
fn modes_differing_only_in_loras_switch_without_reading_the_base_again() {
    let daemon = image_daemon();
    let base = daemon.dir.path().join("tiny-sd");
    let modes = format!(
        "lora_root = {:?}\n\
         [modes.plain]\nmodel = \"tiny-sd\"\n\
         [modes.peft]\nmodel = \"tiny-sd\"\n\
         loras = [{{ path = \"pytorch_lora_weights.safetensors\", strength = 0.8 }}]\n\
         [modes.kohya]\nmodel = \"tiny-sd\"\n\
         loras = [{{ path = \"kohya_lora.safetensors\", strength = 0.8, adapter_name = \"k\" }}]\n",
        base.join("lora"),
    );
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let draw = |mode: &str| {
        inline_pixels(&generate(
            &daemon,
            json!({"mode": mode, "prompt": "a cat", "size": "64x64", "steps": 2,
                   "guidance": 3.0, "seed": 5, "inline": true}),
        ))
    };
    let plain = draw("plain");
    let peft = draw("peft");
    assert!(
        max_pixel_diff(&plain, &peft) > 2,
        "the LoRA changed nothing"
    );

    // Zeros where the UNet's and the text encoder's weights were: a load
    // from the files now fails.
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let path = base.join(file);
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        std::fs::write(&path, vec![0u8; len]).unwrap();
    }
    // One rounding of the merged weights' f32 sums may move a channel by one.
    assert!(max_pixel_diff(&draw("plain"), &plain) <= 1);
    let kohya = draw("kohya");
    assert!(
        max_pixel_diff(&kohya, &peft) <= 1,
        "kohya and PEFT namings differ"
    );
    assert!(max_pixel_diff(&draw("peft"), &peft) <= 1);

    let loaded = daemon.call("vram", json!({})).unwrap();
    let models = loaded["models"].as_array().expect("models");
    assert_eq!(models.len(), 1, "one copy of the base: {loaded}");
    assert_eq!(models[0]["name"], "tiny-sd+peft");
    assert_eq!(models[0]["loras"][0]["strength"], 0.8);
}
