//! FLUX through the daemon with the tiny-flux fixture: a diffusers folder
//! and a single fp8 transformer file beside the other components load,
//! draw seeded pictures with FLUX's own defaults, and refuse what FLUX
//! does not run by the parameter's name.

use std::path::{Path, PathBuf};

use modeld_e2e::{copy_tree, fixtures_dir, Daemon};
use modeld_wire::ClientError;
use serde_json::{json, Value};

/// Runs `generate` and returns every event.
fn generate(daemon: &Daemon, params: Value) -> Vec<Value> {
    daemon.generate_events(params)
}

/// The `data.field` of a `generate` that must be refused.
fn refused_field(daemon: &Daemon, params: Value) -> String {
    let err = match daemon.client().subscribe("generate", params.clone()) {
        Ok(stream) => match stream.collect::<Result<Vec<_>, _>>() {
            Ok(events) => panic!("{params} ran: {:?}", events.last()),
            Err(err) => err,
        },
        Err(err) => err,
    };
    match err {
        ClientError::Rpc(object) => {
            let data = object.data.expect("error data");
            assert_eq!(data["kind"], "invalid_params", "{data}");
            data["field"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("not an RPC error: {other}"),
    }
}

fn flux_fixture() -> PathBuf {
    fixtures_dir().join("tiny-flux")
}

/// The dev pipeline folder, copied into the daemon's temp dir.
fn register_dev(daemon: &Daemon) -> PathBuf {
    let dir = daemon.dir.path().join("flux-dev");
    copy_tree(&flux_fixture().join("dev"), &dir);
    daemon
        .call(
            "models.register",
            json!({"name": "flux", "local_path": dir}),
        )
        .expect("register");
    dir
}

fn picture(done: &Value) -> Vec<u8> {
    let path = done["images"][0]["path"].as_str().expect("path");
    std::fs::read(Path::new(path)).expect("picture file")
}

#[test]
fn a_flux_folder_draws_seeded_pictures_with_its_own_defaults() {
    let daemon = Daemon::start();
    register_dev(&daemon);
    let loaded = daemon.call("load", json!({"name": "flux"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "flux-dev");
    let params = json!({"model": "flux", "prompt": "a lighthouse", "size": "64x48",
                        "steps": 2, "seed": 7, "max_sequence_length": 16});
    let events = generate(&daemon, params.clone());
    let steps = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
        .count();
    assert_eq!(steps, 2, "{events:?}");
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["scheduler"], "flow_match_euler");
    assert_eq!(done["steps"], 2);
    assert_eq!(done["size"], "64x48");
    let first = picture(done);
    let again = generate(&daemon, params);
    assert_eq!(
        picture(again.last().unwrap()),
        first,
        "same seed, same picture"
    );
    // Without `steps`, dev runs diffusers' 28, not SD's default.
    let events = generate(
        &daemon,
        json!({"model": "flux", "prompt": "a lighthouse", "size": "32x32", "seed": 1,
               "max_sequence_length": 8}),
    );
    assert_eq!(events.last().unwrap()["steps"], 28);
}

#[test]
fn flux_refuses_what_it_does_not_run_naming_the_parameter() {
    let daemon = Daemon::start();
    register_dev(&daemon);
    daemon.call("load", json!({"name": "flux"})).unwrap();
    let base = json!({"model": "flux", "prompt": "a lighthouse", "size": "32x32", "steps": 1});
    let with = |key: &str, value: Value| {
        let mut params = base.clone();
        params[key] = value;
        params
    };
    let cases = [
        ("negative_prompt", json!("blurry")),
        ("scheduler", json!("ddim")),
        ("max_sequence_length", json!(513)),
    ];
    for (key, value) in cases {
        assert_eq!(refused_field(&daemon, with(key, value)), key);
    }
    // The daemon still draws afterwards.
    let events = generate(&daemon, with("max_sequence_length", json!(8)));
    assert_eq!(events.last().unwrap()["event"], "done");
}

#[test]
fn a_single_fp8_transformer_loads_with_its_folders_components() {
    let daemon = Daemon::start();
    let dir = daemon.dir.path().join("flux-single");
    copy_tree(&flux_fixture().join("dev"), &dir);
    // The folder keeps the transformer's config.json: the tiny heads are
    // not FLUX.1's, so their shape cannot be inferred.
    std::fs::remove_file(dir.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let file = dir.join("flux1-dev-fp8_e4m3fn.safetensors");
    let source = flux_fixture().join("single_file/tiny-flux-dev-fp8_e4m3fn.safetensors");
    std::fs::copy(source, &file).unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "single", "local_path": file}),
        )
        .expect("register");
    let folder = daemon.dir.path().join("flux-dev");
    copy_tree(&flux_fixture().join("dev"), &folder);
    daemon
        .call(
            "models.register",
            json!({"name": "folder", "local_path": folder}),
        )
        .expect("register");
    let single = daemon.call("load", json!({"name": "single"})).unwrap();
    assert_eq!(single["model"]["arch"], "flux-dev");
    let folder = daemon.call("load", json!({"name": "folder"})).unwrap();
    let bytes = |loaded: &Value| loaded["model"]["estimated_bytes"].as_u64().unwrap();
    assert!(
        bytes(&single) < bytes(&folder),
        "fp8 weights are counted at one byte: {} vs {}",
        bytes(&single),
        bytes(&folder)
    );
    let events = generate(
        &daemon,
        json!({"model": "single", "prompt": "a lighthouse", "size": "32x32", "steps": 2,
               "max_sequence_length": 8}),
    );
    assert_eq!(
        events.last().unwrap()["event"],
        "done",
        "{:?}",
        events.last()
    );
}

/// A ComfyUI `models/` tree holding the tiny FLUX as separate files, and a
/// folder of its tokenizers and configs without weights.
fn comfy_tree(root: &Path) {
    let dev = flux_fixture().join("dev");
    let put = |from: &Path, to: &str| {
        let target = root.join(to);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(from, target).unwrap();
    };
    put(
        &flux_fixture().join("single_file/tiny-flux-dev.safetensors"),
        "diffusion_models/tiny-flux-dev.safetensors",
    );
    put(
        &dev.join("vae/diffusion_pytorch_model.safetensors"),
        "vae/ae.safetensors",
    );
    put(
        &dev.join("text_encoder/model.safetensors"),
        "text_encoders/clip_l.safetensors",
    );
    put(
        &dev.join("text_encoder_2/model.safetensors"),
        "text_encoders/t5xxl_tiny.safetensors",
    );
    let configs = root.join("configs/flux-dev");
    copy_tree(&dev, &configs);
    for component in ["transformer", "vae", "text_encoder", "text_encoder_2"] {
        for entry in std::fs::read_dir(configs.join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
}

#[test]
fn a_comfyui_tree_mode_names_its_components_by_path() {
    let daemon = Daemon::start();
    register_dev(&daemon);
    let root = daemon.dir.path().join("models");
    comfy_tree(&root);
    let modes = format!(
        r#"model_root = "{}"
[modes.comfy]
model = "diffusion_models/tiny-flux-dev.safetensors"
vae = "vae/ae.safetensors"
text_encoders = ["text_encoders/clip_l.safetensors", "text_encoders/t5xxl_tiny.safetensors"]
config = "configs/flux-dev"
"#,
        root.display()
    );
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let listed = daemon.call("modes.list", json!({})).unwrap();
    assert_eq!(listed["modes"][0]["vae"], "vae/ae.safetensors", "{listed}");
    let request = |target: (&str, &str)| {
        let mut params = json!({"prompt": "a lighthouse", "size": "32x32", "steps": 2,
                                "seed": 3, "max_sequence_length": 8});
        params[target.0] = json!(target.1);
        let events = generate(&daemon, params);
        let done = events.last().unwrap().clone();
        assert_eq!(done["event"], "done", "{done}");
        picture(&done)
    };
    // The same weights in separate files draw the folder's picture.
    assert_eq!(request(("mode", "comfy")), request(("model", "flux")));
}

#[test]
fn a_mode_with_separate_components_is_refused_for_a_folder_model() {
    let daemon = Daemon::start();
    let root = daemon.dir.path().join("models");
    comfy_tree(&root);
    copy_tree(&flux_fixture().join("dev"), &root.join("flux-dev"));
    let modes = format!(
        r#"model_root = "{}"
[modes.bad]
model = "flux-dev"
vae = "../outside.safetensors"
"#,
        root.display()
    );
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    let err = daemon.call("modes.reload", json!({})).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("modes.bad.model"), "{text}");
    assert!(text.contains("modes.bad.vae"), "{text}");
}

#[test]
fn a_comfyui_tree_is_scanned_file_by_file_by_tensor_names() {
    let daemon = Daemon::start();
    let root = daemon.dir.path().join("models");
    comfy_tree(&root);
    std::fs::create_dir_all(root.join("loras")).unwrap();
    // File names say nothing: the family comes from the tensors.
    std::fs::copy(
        flux_fixture().join("lora/pytorch_lora_weights.safetensors"),
        root.join("loras/style.safetensors"),
    )
    .unwrap();
    // A link planted in the tree to a file outside it is not read.
    let outside = daemon.dir.path().join("outside.safetensors");
    std::fs::copy(root.join("vae/ae.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("vae/planted.safetensors")).unwrap();
    let modes = format!("model_root = \"{}\"\n", root.display());
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let scan = daemon.call("cache.scan", json!({})).unwrap();
    let tree = scan["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "model_root")
        .expect("the model root is scanned")
        .clone();
    let entry = |id: &str| {
        let repos = tree["repos"].as_array().unwrap();
        let found = repos.iter().find(|r| r["repo_id"] == id);
        found.unwrap_or_else(|| panic!("no {id} in {tree}")).clone()
    };
    let family = |id: &str| {
        let e = entry(id);
        (e["family"].clone(), e["architecture"].clone())
    };
    assert_eq!(
        family("diffusion_models/tiny-flux-dev.safetensors"),
        (json!("flux"), json!("flux-dev"))
    );
    assert_eq!(family("vae/ae.safetensors").0, "vae");
    assert_eq!(family("loras/style.safetensors").0, "lora");
    assert_eq!(
        family("text_encoders/t5xxl_tiny.safetensors"),
        (json!("text_encoder"), json!("t5"))
    );
    assert_eq!(
        family("text_encoders/clip_l.safetensors"),
        (json!("text_encoder"), json!("clip"))
    );
    assert_eq!(family("vae/planted.safetensors").0, "unknown");
    let warnings = tree["warnings"].to_string();
    assert!(warnings.contains("planted"), "{warnings}");
    // A folder of configs is still one model.
    assert_eq!(entry("configs")["repo_type"], "local");
}

#[test]
fn a_mode_offloading_text_encoders_is_its_own_resident_and_draws_the_same() {
    let daemon = Daemon::start();
    register_dev(&daemon);
    let modes = "[modes.offload]\nmodel = \"flux\"\noffload_text_encoders = true\n";
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let params = |target: (&str, &str)| {
        let mut params = json!({"prompt": "a lighthouse", "size": "32x32", "steps": 2,
                                "seed": 5, "max_sequence_length": 8});
        params[target.0] = json!(target.1);
        params
    };
    let offloaded = generate(&daemon, params(("mode", "offload")));
    let plain = generate(&daemon, params(("model", "flux")));
    assert_eq!(
        picture(offloaded.last().unwrap()),
        picture(plain.last().unwrap())
    );
    let vram = daemon.call("vram", json!({})).unwrap();
    let estimate = |name: &str| {
        let models = vram["models"].as_array().unwrap();
        let model = models.iter().find(|m| m["name"] == name);
        model.unwrap_or_else(|| panic!("{name} in {vram}"))["estimated_bytes"].as_u64()
    };
    // On the CPU the encoders are in system memory either way, so both
    // estimates count them.
    assert_eq!(estimate("flux+offload"), estimate("flux"));
}
