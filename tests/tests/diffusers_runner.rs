//! The bundled diffusers runner through the daemon, against diffusers'
//! own references (`tests/fixtures/tiny-qwen-image`): Qwen-Image text to
//! image with and without true CFG, with a LoRA, from a ComfyUI-style fp8
//! single file, Qwen-Image-Edit-2509, and Wan2.1 frames. Each picture must
//! have the reference's pixels: the same sha256 of the decoded RGB bytes,
//! or, where this CPU's float kernels round a value differently from the
//! machine that made the reference (diffusers called directly here does
//! the same: up to 2 of 4608 values off by 1 for the small cases, 941 of
//! 3.2 million off by at most 2 for the edit), at most 0.1% of the values
//! off by at most 2, against the reference PNG.
//!
//! The runner needs a Python with torch and diffusers: `MODELD_RUNNER_PYTHON`,
//! else `target/runner-venv/bin/python` (made by `.ci/runner-venv`). Without
//! one the tests say so and pass, unless `MODELD_REQUIRE_RUNNER_VENV=1`
//! (set by `.ci/run`), which makes a missing one a failure.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use modeld_e2e::{copy_tree, fixtures_dir, Daemon};
use serde_json::{json, Value};
use sha2::Digest;

fn runner_python() -> Option<PathBuf> {
    if let Some(python) = std::env::var_os("MODELD_RUNNER_PYTHON") {
        return Some(PathBuf::from(python));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/runner-venv/bin/python");
    if venv.exists() {
        return Some(venv);
    }
    let required = std::env::var("MODELD_REQUIRE_RUNNER_VENV").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "no runner Python: run .ci/runner-venv or set MODELD_RUNNER_PYTHON"
    );
    eprintln!("skipped: no runner Python (run .ci/runner-venv or set MODELD_RUNNER_PYTHON)");
    None
}

fn expected() -> Value {
    let path = fixtures_dir().join("tiny-qwen-image/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case(name: &str) -> Value {
    let expected = expected();
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("case {name}"))
        .clone()
}

/// A PNG's decoded 8-bit RGB pixels, row by row, and its size.
fn pixels(path: &Path) -> (Vec<u8>, u32, u32) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Rgb, "{}", path.display());
    pixels.truncate(frame.buffer_size());
    (pixels, frame.width, frame.height)
}

/// Values that may round differently on another CPU: a thousandth.
const MAX_DIFFERING: f64 = 0.001;
const MAX_DIFFERENCE: u8 = 2;

/// Checks the picture at `got` against the reference PNG `reference`
/// (fixture-relative) and its pixels' sha256 `sha`: equal, or within the
/// rounding tolerance above.
fn assert_matches(got: &Path, reference: &str, sha: &str, what: &str) {
    let (got, width, height) = pixels(got);
    if hex::encode(sha2::Sha256::digest(&got)) == sha {
        eprintln!("{what}: the reference's exact pixels");
        return;
    }
    let wanted_png = fixtures_dir().join("tiny-qwen-image").join(reference);
    let (wanted, wanted_width, wanted_height) = pixels(&wanted_png);
    assert_eq!(
        (width, height),
        (wanted_width, wanted_height),
        "{what}: size"
    );
    let differing: Vec<u8> = got
        .iter()
        .zip(&wanted)
        .map(|(a, b)| a.abs_diff(*b))
        .filter(|d| *d > 0)
        .collect();
    let largest = differing.iter().copied().max().unwrap_or(0);
    let share = differing.len() as f64 / got.len() as f64;
    eprintln!(
        "{what}: {} of {} values differ from the reference, by at most {largest}",
        differing.len(),
        got.len()
    );
    assert!(
        largest <= MAX_DIFFERENCE && share <= MAX_DIFFERING,
        "{what}: {} of {} values differ, by up to {largest}",
        differing.len(),
        got.len()
    );
}

fn assert_case(got: &Path, name: &str) {
    let case = case(name);
    let sha = case["image_sha256_u8"].as_str().unwrap();
    assert_matches(got, &format!("expected/{name}.png"), sha, name);
}

/// A daemon whose diffusers runner uses `python`, with the fixture copied
/// to `<dir>/qwen` as its modes' model root.
fn daemon(python: &Path, modes: &str) -> (Daemon, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("modeld-qwen")
        .tempdir()
        .unwrap()
        .keep();
    let root = dir.join("qwen");
    copy_tree(&fixtures_dir().join("tiny-qwen-image"), &root);
    let modes_file = dir.join("modes.toml");
    let modes = format!("model_root = \"{}\"\n{modes}", root.display());
    std::fs::write(&modes_file, modes).unwrap();
    let config = format!(
        "[runners]\npython = \"{}\"\n[modes]\nfile = \"{}\"\n",
        python.display(),
        modes_file.display()
    );
    (Daemon::start_configured(&config, &[]), root)
}

fn register(daemon: &Daemon, name: &str, path: &Path) {
    daemon
        .call("models.register", json!({"name": name, "local_path": path}))
        .expect("register");
}

fn picture(events: &[Value]) -> PathBuf {
    let done = events.last().expect("a final event");
    assert_eq!(done["event"], "done", "{done}");
    PathBuf::from(done["images"][0]["path"].as_str().expect("a picture"))
}

const T2I_PROMPT: &str = "a lighthouse made of model caches";

fn t2i(model_or_mode: Value) -> Value {
    let mut params = json!({
        "prompt": T2I_PROMPT, "negative_prompt": "blurry, low quality",
        "guidance": 4.0, "steps": 3, "size": "48x32", "seed": 7
    });
    params
        .as_object_mut()
        .unwrap()
        .extend(model_or_mode.as_object().unwrap().clone());
    params
}

#[test]
fn qwen_image_text_to_image_matches_diffusers() {
    let Some(python) = runner_python() else {
        return;
    };
    let modes = "[modes.lora]\nmodel = \"t2i\"\nloras = [{ path = \"lora/pytorch_lora_weights.safetensors\", strength = 0.8 }]\n\
                 [modes.fp8]\nmodel = \"single_file/tiny-qwen-image_fp8_e4m3fn.safetensors\"\npipeline = \"t2i\"\n";
    let (daemon, root) = daemon(&python, modes);
    register(&daemon, "qwen", &root.join("t2i"));
    let events = daemon.generate_events(t2i(json!({"model": "qwen"})));
    assert_case(&picture(&events), "t2i");
    let loaded = daemon.call("vram", json!({})).unwrap();
    assert_eq!(loaded["models"][0]["arch"], "QwenImagePipeline", "{loaded}");
    let nocfg = json!({
        "model": "qwen", "prompt": "Direct download into the chosen cache",
        "guidance": 1.0, "steps": 2, "size": "48x32", "seed": 8
    });
    let events = daemon.generate_events(nocfg);
    assert_case(&picture(&events), "t2i_nocfg");
    let events = daemon.generate_events(t2i(json!({"mode": "lora"})));
    assert_case(&picture(&events), "t2i_lora");
    let events = daemon.generate_events(t2i(json!({"mode": "fp8"})));
    assert_case(&picture(&events), "t2i_fp8");
}

#[test]
fn qwen_image_edit_2509_matches_diffusers() {
    let Some(python) = runner_python() else {
        return;
    };
    let (daemon, root) = daemon(&python, "");
    register(&daemon, "edit", &root.join("edit"));
    let input = std::fs::read(root.join("inputs/edit_input.png")).unwrap();
    let events = daemon.generate_events(json!({
        "model": "edit", "prompt": "make the sky orange and add a small red boat",
        "negative_prompt": " ", "guidance": 4.0, "steps": 2, "seed": 9,
        "init_image": [base64::engine::general_purpose::STANDARD.encode(input)]
    }));
    assert_case(&picture(&events), "edit");
}

#[test]
fn wan_frames_match_diffusers() {
    let Some(python) = runner_python() else {
        return;
    };
    let (daemon, root) = daemon(&python, "");
    register(&daemon, "wan", &root.join("wan"));
    let events = daemon.generate_events(json!({
        "model": "wan", "prompt": "a lighthouse made of model caches, waves rolling in",
        "negative_prompt": "static, blurred", "guidance": 5.0, "steps": 2,
        "size": "32x32", "frames": 5, "seed": 3
    }));
    let done = events.last().unwrap();
    let frames = done["video"]["frames"].as_array().expect("frames");
    let expected = expected();
    let wanted = expected["wan"]["case"]["frames"].as_array().unwrap();
    assert_eq!(frames.len(), wanted.len(), "{done}");
    for (index, (frame, want)) in frames.iter().zip(wanted).enumerate() {
        let got = Path::new(frame.as_str().unwrap());
        let sha = want["sha256_u8"].as_str().unwrap();
        let reference = want["png"].as_str().unwrap();
        assert_matches(got, reference, sha, &format!("wan frame {index}"));
    }
}
