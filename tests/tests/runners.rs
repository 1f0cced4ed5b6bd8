//! Runner processes through the real daemon, with the stdlib-Python fake
//! runner of `tests/runners/fake_runner.py`: pictures and videos through
//! the queue, parameters checked against the runner's declaration, and
//! every way a runner can misbehave (crash, hang, garbage, an oversized
//! line, ignoring SIGTERM, exiting at load, running out of memory,
//! leaving a child behind) ending in a clear error, a queue that goes on
//! and no process left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modeld_e2e::{kind, Daemon};
use modeld_wire::ClientError;
use serde_json::{json, Value};
use sha2::Digest;

fn fake_runner() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("runners/fake_runner.py")
}

/// `[runners.NAME]` entries running the fake runner with `args`.
fn runner_config(runners: &[(&str, &[&str])], limits: &str) -> String {
    let mut config = format!("[runners]\n{limits}\n");
    for (name, args) in runners {
        let mut command = vec!["python3".to_string(), fake_runner().display().to_string()];
        command.extend(args.iter().map(|a| a.to_string()));
        config.push_str(&format!(
            "[runners.{name}]\ncommand = {}\n",
            serde_json::to_string(&command).unwrap()
        ));
    }
    config
}

/// A file the fake runner's `--record` writes what it was sent to (and,
/// beside it, its environment), kept while the guard lives.
fn record_file() -> (tempfile::NamedTempFile, String) {
    let record = tempfile::NamedTempFile::new().unwrap();
    let path = record.path().display().to_string();
    (record, path)
}

/// Registers a model run by `runner`: a folder with a pipeline index of a
/// class modeld has no native family for.
fn register(daemon: &Daemon, name: &str, runner: &str) {
    let dir = daemon
        .state_dir
        .parent()
        .unwrap()
        .join(format!("{name}-files"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "FakePipeline"}"#,
    )
    .unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": name, "local_path": dir, "runner": runner}),
        )
        .expect("register");
}

fn daemon(runners: &[(&str, &[&str])], limits: &str) -> Daemon {
    let daemon = Daemon::start_configured(&runner_config(runners, limits), &[]);
    for (name, _) in runners {
        register(&daemon, name, name);
    }
    daemon
}

/// The colour the fake runner paints picture `index` (or a video's frame).
fn colour(prompt: &str, seed: u64, frame: Option<usize>) -> [u8; 3] {
    let text = match frame {
        None => format!("{prompt}\n{seed}"),
        Some(frame) => format!("{prompt}\n{seed}\n{frame}"),
    };
    let digest = sha2::Sha256::digest(text.as_bytes());
    [digest[0], digest[1], digest[2]]
}

/// A PNG's size and its first pixel.
fn read_png(path: &Path) -> (u32, u32, [u8; 3]) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    (frame.width, frame.height, [pixels[0], pixels[1], pixels[2]])
}

fn last(events: &[Value]) -> &Value {
    events.last().expect("a final event")
}

/// Children of `pid` that are zombies (exited, not reaped).
fn zombies_of(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|(_, state)| *state == 'Z')
        .map(|(child, _)| child)
        .collect()
}

fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let parent: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == pid {
            found.push((child, state));
        }
    }
    found
}

fn daemon_pid(daemon: &Daemon) -> u32 {
    daemon.pid().as_raw() as u32
}

/// Waits until the daemon has no child process left (runners stopped and
/// reaped).
fn assert_no_runner_left(daemon: &Daemon) {
    let pid = daemon_pid(daemon);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !children_of(pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(zombies_of(pid).is_empty(), "zombies: {:?}", zombies_of(pid));
    assert!(children_of(pid).is_empty(), "left: {:?}", children_of(pid));
}

/// The resident models, as `vram` lists them.
fn loaded(daemon: &Daemon) -> Vec<String> {
    let vram = daemon.call("vram", json!({})).unwrap();
    vram["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect()
}

/// An error reply's `data`.
fn data(err: &ClientError) -> Value {
    match err {
        ClientError::Rpc(object) => object.data.clone().unwrap_or_default(),
        _ => Value::Null,
    }
}

#[test]
fn a_runner_model_draws_through_the_queue_and_is_stopped_on_unload() {
    let daemon = daemon(&[("fake", &["--behaviour", "good"])], "");
    let events = daemon.generate_events(json!({
        "model": "fake", "prompt": "a red boat", "size": "48x32", "steps": 3,
        "seed": 40, "count": 2, "options": {"shift": 2.5}
    }));
    let steps = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["stage"] == "denoise")
        .count();
    assert_eq!(steps, 6, "3 steps for each of 2 pictures: {events:?}");
    let done = last(&events);
    assert_eq!(done["finish_reason"], "length", "{done}");
    let images = done["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for (index, image) in images.iter().enumerate() {
        let seed = 40 + index as u64;
        assert_eq!(image["seed"], seed);
        let (width, height, pixel) = read_png(Path::new(image["path"].as_str().unwrap()));
        assert_eq!((width, height), (48, 32));
        assert_eq!(pixel, colour("a red boat", seed, None), "picture {index}");
    }
    let reply = daemon.call("unload", json!({"name": "fake"})).unwrap();
    assert!(reply["freed_bytes"].as_u64().unwrap() > 0, "{reply}");
    assert_no_runner_left(&daemon);
}

#[test]
fn requests_are_checked_against_what_the_runner_declares() {
    let daemon = daemon(&[("fake", &["--behaviour", "good"])], "");
    let refused = |params: Value| {
        let mut request = json!({"model": "fake", "prompt": "x"});
        request
            .as_object_mut()
            .unwrap()
            .extend(params.as_object().unwrap().clone());
        let mut client = daemon.client();
        let err = client
            .subscribe("generate", request)
            .err()
            .expect("refused");
        assert_eq!(kind(&err), "invalid_params", "{params}: {err}");
        data(&err)
    };
    let data = refused(json!({"steps": 11}));
    assert_eq!(data["field"], "steps");
    assert_eq!(data["limit"]["max"], 10.0);
    let data = refused(json!({"size": "40x32"}));
    assert_eq!(
        (
            data["field"].as_str(),
            data["limit"]["multiple_of"].as_u64()
        ),
        (Some("size"), Some(16))
    );
    assert_eq!(refused(json!({"strength": 0.5}))["field"], "strength");
    assert_eq!(refused(json!({"max_tokens": 4}))["field"], "max_tokens");
    assert_eq!(refused(json!({"options": {"shift": 11}}))["field"], "shift");
    assert_eq!(refused(json!({"options": {"flow": 1}}))["field"], "flow");
    // The runner never saw any of them, and still draws.
    let done = daemon.generate_events(json!({"model": "fake", "prompt": "x", "size": "16x16"}));
    assert_eq!(last(&done)["images"].as_array().unwrap().len(), 1);
}

#[test]
fn a_video_runner_writes_one_folder_of_frames_per_video() {
    let daemon = daemon(
        &[("fake", &["--behaviour", "good", "--video", "--via-path"])],
        "",
    );
    let events = daemon.generate_events(json!({
        "model": "fake", "prompt": "waves", "size": "32x32", "steps": 2, "seed": 3, "frames": 5
    }));
    let done = last(&events);
    let video = &done["video"];
    let frames = video["frames"].as_array().expect("frames");
    assert_eq!(frames.len(), 5, "{done}");
    for (frame, path) in frames.iter().enumerate() {
        let (_, _, pixel) = read_png(Path::new(path.as_str().unwrap()));
        assert_eq!(pixel, colour("waves", 3, Some(frame)), "frame {frame}");
    }
    let dir = Path::new(video["dir"].as_str().unwrap());
    assert!(dir.is_dir());
    let parent = dir.parent().unwrap();
    let hidden = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with('.'));
    assert!(!hidden, "no partial folder or file is left");
}

#[test]
fn a_cancelled_runner_job_leaves_no_picture() {
    let daemon = daemon(&[("fake", &["--behaviour", "good", "--step-s", "0.3"])], "");
    daemon.call("load", json!({"name": "fake"})).unwrap();
    let mut client = daemon.client();
    let mut stream = client
        .subscribe(
            "generate",
            json!({"model": "fake", "prompt": "x", "steps": 10, "size": "16x16"}),
        )
        .unwrap();
    let first = stream.next().unwrap().unwrap();
    assert_eq!(first["event"], "progress");
    let status = daemon.call("status", json!({})).unwrap();
    let job = status["queue"]["jobs"][0]["id"].as_u64().unwrap();
    let reply = daemon.call("jobs.cancel", json!({"job": job})).unwrap();
    assert_eq!(reply["cancelled"], true);
    let rest: Vec<Value> = stream.collect::<Result<_, _>>().unwrap();
    let done = last(&rest);
    assert_eq!(done["finish_reason"], "cancelled", "{done}");
    assert!(done["images"].as_array().unwrap().is_empty());
    // The runner is still there and draws the next job.
    let next = daemon
        .generate_events(json!({"model": "fake", "prompt": "y", "steps": 1, "size": "16x16"}));
    assert_eq!(last(&next)["images"].as_array().unwrap().len(), 1);
}

/// Runs a job on the misbehaving runner `bad`, then one on `good`: the
/// first fails with `kind` and the text `says`, the second succeeds, the
/// bad runner is unloaded and nothing is left running.
fn fails_and_the_queue_goes_on(behaviour: &[&str], limits: &str, kind_wanted: &str, says: &str) {
    let daemon = daemon(
        &[("bad", behaviour), ("good", &["--behaviour", "good"])],
        limits,
    );
    let mut client = daemon.client();
    let request = json!({"model": "bad", "prompt": "x", "steps": 3, "size": "16x16"});
    let outcome = client
        .subscribe("generate", request)
        .map(|s| s.collect::<Vec<_>>());
    let error = match outcome {
        Err(err) => json!({"kind": kind(&err), "message": err.to_string(), "data": data(&err)}),
        Ok(events) => {
            let last = events
                .last()
                .expect("an event")
                .as_ref()
                .expect("event")
                .clone();
            assert_eq!(last["event"], "error", "{last}");
            json!({"kind": last["error"]["data"]["kind"], "message": last["error"]["message"], "data": last["error"]["data"]})
        }
    };
    assert_eq!(error["kind"], kind_wanted, "{error}");
    let text = error.to_string();
    assert!(text.contains(says), "{says:?} not in {text}");
    let next = daemon
        .generate_events(json!({"model": "good", "prompt": "y", "steps": 1, "size": "16x16"}));
    assert_eq!(
        last(&next)["images"].as_array().unwrap().len(),
        1,
        "{next:?}"
    );
    assert!(
        !loaded(&daemon).contains(&"bad".to_string()),
        "{:?}",
        loaded(&daemon)
    );
    daemon.call("unload", json!({"name": "good"})).unwrap();
    assert_no_runner_left(&daemon);
}

#[test]
fn a_runner_that_crashes_mid_generation_fails_its_job_with_its_stderr() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "crash_mid_generation"],
        "",
        "inference_failed",
        "exited with code 3",
    );
}

#[test]
fn a_runner_that_hangs_is_given_up_after_the_step_timeout() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "hang"],
        "step_timeout_s = 2",
        "inference_failed",
        "runners.step_timeout_s",
    );
}

#[test]
fn a_runner_that_prints_garbage_is_stopped() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "garbage"],
        "",
        "inference_failed",
        "not a JSON object",
    );
}

#[test]
fn a_runner_that_prints_a_100_mb_line_is_stopped() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "huge_line"],
        "",
        "inference_failed",
        "runners.max_line_bytes",
    );
}

#[test]
fn a_runner_that_exits_at_load_fails_the_load_with_its_stderr() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "exit_at_load"],
        "",
        "load_failed",
        "boom: cannot load",
    );
}

#[test]
fn a_runner_that_never_says_hello_is_given_up() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "no_hello"],
        "start_timeout_s = 2",
        "load_failed",
        "runners.start_timeout_s",
    );
}

#[test]
fn a_runner_out_of_memory_at_load_answers_insufficient_memory() {
    fails_and_the_queue_goes_on(
        &["--behaviour", "oom_at_load"],
        "",
        "insufficient_memory",
        "insufficient_memory",
    );
}

#[test]
fn a_runner_that_ignores_sigterm_is_killed_and_reaped() {
    let daemon = daemon(
        &[("stubborn", &["--behaviour", "ignore_sigterm"])],
        "stop_grace_s = 1",
    );
    daemon.call("load", json!({"name": "stubborn"})).unwrap();
    let started = Instant::now();
    daemon.call("unload", json!({"name": "stubborn"})).unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "unload + SIGTERM grace: {took:?}"
    );
    assert_no_runner_left(&daemon);
}

#[test]
fn what_a_runner_started_goes_with_it() {
    let (_record, record_path) = record_file();
    let daemon = daemon(
        &[(
            "parent",
            &["--behaviour", "spawn_child", "--record", &record_path],
        )],
        "",
    );
    daemon.call("load", json!({"name": "parent"})).unwrap();
    let child: u32 = std::fs::read_to_string(format!("{record_path}.child"))
        .expect("the grandchild's pid")
        .trim()
        .parse()
        .unwrap();
    assert!(Path::new(&format!("/proc/{child}")).exists());
    daemon.call("unload", json!({"name": "parent"})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{child}")).exists() && Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the grandchild lives on: {stat}"
    );
    assert_no_runner_left(&daemon);
}

#[test]
fn a_runner_gets_a_cleaned_environment_and_no_gpu_on_the_cpu() {
    let (_record, record_path) = record_file();
    let config = runner_config(
        &[("fake", &["--behaviour", "good", "--record", &record_path])],
        "",
    );
    let daemon = Daemon::start_configured(&config, &[("MODELD_TEST_SECRET", "do-not-pass")]);
    register(&daemon, "fake", "fake");
    daemon
        .call("load", json!({"name": "fake", "device": "cpu"}))
        .unwrap();
    let env: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{record_path}.env")).unwrap())
            .unwrap();
    assert!(env.get("MODELD_TEST_SECRET").is_none(), "{env}");
    assert!(env.get("HF_HOME").is_none(), "{env}");
    assert_eq!(env["HF_HUB_OFFLINE"], "1");
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
    let sent = std::fs::read_to_string(&record_path).unwrap();
    let load: Value = sent
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|m| m["type"] == "load")
        .expect("a load message");
    assert_eq!(load["device"], "cpu");
    assert_eq!(load["dtype"], "float32");
}

#[test]
fn an_unknown_runner_or_a_missing_interpreter_fails_the_load_by_name() {
    let daemon = Daemon::start_configured("[runners]\npython = \"/nonexistent/python3\"\n", &[]);
    register(&daemon, "nowhere", "nowhere");
    let err = daemon.call("load", json!({"name": "nowhere"})).unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err}");
    assert!(err.to_string().contains("[runners.nowhere]"), "{err}");
    // A pipeline with no native family goes to the diffusers runner.
    let dir = daemon.state_dir.parent().unwrap().join("qwen");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "QwenImagePipeline"}"#,
    )
    .unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "qwen", "local_path": dir}),
        )
        .unwrap();
    let err = daemon.call("load", json!({"name": "qwen"})).unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err}");
    let data = data(&err);
    assert_eq!(data["field"], "runners.python", "{err}");
    assert!(err.to_string().contains("/nonexistent/python3"), "{err}");
}

#[test]
fn a_runner_model_is_checked_against_the_memory_budget_before_it_starts() {
    let (_record, record_path) = record_file();
    let config = runner_config(
        &[("fake", &["--behaviour", "good", "--record", &record_path])],
        "",
    );
    let config = format!("[scheduler]\nmemory_budget = \"1M\"\n{config}");
    let daemon = Daemon::start_configured(&config, &[]);
    register(&daemon, "fake", "fake");
    // A transformer of a million f32 weights, plus the runtime.
    let dir = daemon
        .state_dir
        .parent()
        .unwrap()
        .join("fake-files/transformer");
    std::fs::create_dir_all(&dir).unwrap();
    let header = br#"{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.resize(file.len() + 4_000_000, 0);
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), file).unwrap();
    let err = daemon.call("load", json!({"name": "fake"})).unwrap_err();
    assert_eq!(kind(&err), "insufficient_memory", "{err}");
    assert!(
        data(&err)["needed_bytes"].as_u64().unwrap() >= 4_000_000,
        "{err}"
    );
    assert!(
        std::fs::read_to_string(&record_path)
            .unwrap_or_default()
            .is_empty(),
        "the runner was never started"
    );
    assert_no_runner_left(&daemon);
}

/// Two modes of one runner model with other LoRAs: a runner that can swap
/// adapters does so in place, a runner that cannot is started afresh.
fn switch_loras(swap: bool) -> (Vec<u32>, Vec<u32>, String, Vec<String>) {
    let (_record, record_path) = record_file();
    let mut args = vec!["--behaviour", "good", "--record", &record_path];
    if swap {
        args.push("--swap-loras");
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("pipe")).unwrap();
    std::fs::write(
        root.path().join("pipe/model_index.json"),
        r#"{"_class_name": "FakePipeline"}"#,
    )
    .unwrap();
    for lora in ["a.safetensors", "b.safetensors"] {
        std::fs::write(root.path().join(lora), b"").unwrap();
    }
    let modes = root.path().join("modes.toml");
    let mode = |name: &str| {
        format!("[modes.{name}]\nmodel = \"pipe\"\nrunner = \"fake\"\nloras = [\"{name}.safetensors\"]\n")
    };
    let text = format!(
        "model_root = \"{}\"\n{}{}",
        root.path().display(),
        mode("a"),
        mode("b")
    );
    std::fs::write(&modes, text).unwrap();
    let config = format!(
        "[modes]\nfile = \"{}\"\n{}",
        modes.display(),
        runner_config(&[("fake", &args)], "")
    );
    let daemon = Daemon::start_configured(&config, &[]);
    let pids = |daemon: &Daemon| -> Vec<u32> {
        children_of(daemon_pid(daemon))
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    };
    let request = |mode: &str| json!({"mode": mode, "prompt": "x", "steps": 1, "size": "16x16"});
    let first = daemon.generate_events(request("a"));
    assert_eq!(last(&first)["images"].as_array().unwrap().len(), 1);
    let before = pids(&daemon);
    let second = daemon.generate_events(request("b"));
    assert_eq!(last(&second)["images"].as_array().unwrap().len(), 1);
    let after = pids(&daemon);
    let sent = std::fs::read_to_string(&record_path).unwrap();
    (before, after, sent, loaded(&daemon))
}

#[test]
fn a_runner_that_swaps_loras_keeps_its_process_across_lora_only_switches() {
    let (before, after, sent, loaded) = switch_loras(true);
    assert_eq!(before, after, "the same runner serves both modes");
    assert!(
        sent.contains(r#""type": "loras""#) || sent.contains(r#""type":"loras""#),
        "{sent}"
    );
    assert!(sent.contains("b.safetensors"), "{sent}");
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    assert!(loaded[0].ends_with("+b"), "{loaded:?}");
}

#[test]
fn a_runner_that_cannot_swap_loras_is_started_for_the_other_set() {
    let (before, after, sent, _) = switch_loras(false);
    assert!(!sent.contains(r#""type":"loras""#), "{sent}");
    assert_eq!(before.len(), 1);
    assert!(
        after.iter().any(|pid| !before.contains(pid)),
        "{before:?} {after:?}"
    );
}

#[test]
fn an_interpreter_without_torch_fails_the_load_naming_the_key() {
    let has_torch = std::process::Command::new("python3")
        .args(["-c", "import torch, diffusers"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if has_torch {
        eprintln!("skipped: this python3 has torch and diffusers");
        return;
    }
    let daemon = Daemon::start_configured("", &[]);
    let dir = daemon.state_dir.parent().unwrap().join("t2i");
    modeld_e2e::copy_tree(
        &modeld_e2e::fixtures_dir().join("tiny-qwen-image/t2i"),
        &dir,
    );
    daemon
        .call(
            "models.register",
            json!({"name": "qwen", "local_path": dir}),
        )
        .unwrap();
    let err = daemon.call("load", json!({"name": "qwen"})).unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err}");
    assert_eq!(data(&err)["field"], "runners.python", "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cannot import torch") && text.contains("runners.python"),
        "{text}"
    );
    assert_no_runner_left(&daemon);
}

#[test]
fn a_runner_that_dies_while_idle_is_replaced_by_the_next_request() {
    let daemon = daemon(&[("fake", &["--behaviour", "good"])], "");
    daemon.call("load", json!({"name": "fake"})).unwrap();
    let runner = children_of(daemon_pid(&daemon))[0].0;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The daemon notices the closed output at once; give the signal time.
    std::thread::sleep(Duration::from_millis(300));
    let events = daemon
        .generate_events(json!({"model": "fake", "prompt": "x", "steps": 1, "size": "16x16"}));
    assert_eq!(
        last(&events)["images"].as_array().unwrap().len(),
        1,
        "{events:?}"
    );
    let now = children_of(daemon_pid(&daemon));
    assert!(
        now.iter().all(|(pid, _)| *pid != runner),
        "the dead runner is reaped: {now:?}"
    );
    daemon.call("unload", json!({"name": "fake"})).unwrap();
    assert_no_runner_left(&daemon);
}
