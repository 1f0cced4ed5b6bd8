//! Modes and the job queue, end to end: validation and hot reload,
//! automatic switches, ordering, overflow, cancel, residency and LoRAs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modeld_e2e::fakehub::FakeHub;
use modeld_e2e::{fixtures_dir, kind, Daemon};
use serde_json::{json, Value};

fn modes_file(daemon: &Daemon) -> PathBuf {
    daemon.dir.path().join("modes.toml")
}

const MODES: &str = r#"
default_mode = "chat"

[modes.chat]
model = "tiny-llama"
description = "the llama"
metadata = { owner = "tests" }
[modes.chat.defaults]
max_tokens = 5
temperature = 0.0

[modes.qwen]
model = "tiny-qwen2"
[modes.qwen.defaults]
max_tokens = 4
"#;

fn generate(daemon: &Daemon, params: Value) -> Result<Vec<Value>, modeld_wire::ClientError> {
    let mut client = daemon.client();
    client.subscribe("generate", params)?.collect()
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(daemon: &Daemon) -> Value {
    daemon.call("status", json!({})).unwrap()
}

#[test]
fn generate_in_a_mode_switches_and_applies_defaults() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    let modes = daemon.call("modes.reload", json!({})).unwrap();
    assert_eq!(modes["modes"].as_array().unwrap().len(), 2);
    assert_eq!(modes["modes"][0]["metadata"]["owner"], "tests");

    let events = generate(
        &daemon,
        json!({"mode": "chat", "prompt": "Model Loading Strategy"}),
    )
    .unwrap();
    let done = events.last().unwrap();
    assert_eq!(done["mode"], "chat");
    assert_eq!(
        done["completion_tokens"], 5,
        "the mode's max_tokens applies"
    );
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("tiny-llama/expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        done["token_ids"].as_array().unwrap()[..],
        expected["cases"][0]["greedy_ids"].as_array().unwrap()[..5]
    );
    assert_eq!(status(&daemon)["queue"]["current_mode"], "chat");

    // An explicit value beats the mode's default.
    let events = generate(
        &daemon,
        json!({"mode": "qwen", "prompt": "The application", "max_tokens": 2}),
    )
    .unwrap();
    assert_eq!(events.last().unwrap()["completion_tokens"], 2);
    assert_eq!(events.last().unwrap()["mode"], "qwen");
    assert_eq!(status(&daemon)["queue"]["current_mode"], "qwen");

    let err = generate(&daemon, json!({"mode": "nope", "prompt": "x"})).unwrap_err();
    assert_eq!(kind(&err), "not_found");
    let err = generate(
        &daemon,
        json!({"mode": "chat", "model": "tiny-qwen2", "prompt": "x"}),
    )
    .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");

    let reply = daemon.call("switch_mode", json!({"mode": "chat"})).unwrap();
    assert_eq!(reply["queued"], true);
    assert_eq!(reply["from"], "qwen");
    assert_eq!(reply["to"], "chat");
    wait_until("the switch", || {
        status(&daemon)["queue"]["current_mode"] == "chat"
    });
}

#[test]
fn bad_modes_file_reports_every_error_and_keeps_the_old_modes() {
    let mut daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();

    let bad = r#"
default_mode = "gone"
[modes.a]
model = "not-registered"
[modes.b]
model = "tiny-llama"
keep_alive = "later"
[modes.b.defaults]
top_p = 7.0
"#;
    std::fs::write(modes_file(&daemon), bad).unwrap();
    let err = daemon.call("modes.reload", json!({})).unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
    let message = err.to_string();
    for field in [
        "default_mode",
        "modes.a.model",
        "modes.b.keep_alive",
        "modes.b.defaults.top_p",
    ] {
        assert!(message.contains(field), "{field} missing: {message}");
    }
    let modes = daemon.call("modes.list", json!({})).unwrap();
    assert_eq!(
        modes["modes"].as_array().unwrap().len(),
        2,
        "old modes kept"
    );
    assert!(status(&daemon)["modes"]["last_error"]
        .as_str()
        .unwrap()
        .contains("modes.a.model"));
    // Still usable.
    let events = generate(&daemon, json!({"mode": "qwen", "prompt": "x"})).unwrap();
    assert_eq!(events.last().unwrap()["event"], "done");

    // SIGHUP reloads a fixed file.
    std::fs::write(
        modes_file(&daemon),
        MODES.replace("max_tokens = 4", "max_tokens = 3"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("SIGHUP reload", || {
        status(&daemon)["modes"]["last_error"].is_null()
    });
    let events = generate(&daemon, json!({"mode": "qwen", "prompt": "x"})).unwrap();
    assert_eq!(events.last().unwrap()["completion_tokens"], 3);

    // The default mode is loaded at start-up.
    daemon.stop();
    daemon.spawn();
    wait_until("the default mode", || {
        let s = status(&daemon);
        s["queue"]["current_mode"] == "chat" && s["counts"]["loaded"] == 1
    });
}

#[test]
fn file_changes_reload_without_a_signal() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    wait_until("the watcher to load modes", || {
        daemon.call("modes.list", json!({})).unwrap()["modes"]
            .as_array()
            .unwrap()
            .len()
            == 2
    });
    // Replace by rename, as editors do.
    let tmp = daemon.dir.path().join(".modes.toml.swp");
    std::fs::write(
        &tmp,
        MODES
            .replace("[modes.qwen]", "[modes.qwen2]")
            .replace("modes.qwen.defaults", "modes.qwen2.defaults"),
    )
    .unwrap();
    std::fs::rename(&tmp, modes_file(&daemon)).unwrap();
    wait_until("the rename to reload", || {
        let modes = daemon.call("modes.list", json!({})).unwrap();
        modes["modes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "qwen2")
    });
    // Garbage keeps what was there.
    std::fs::write(modes_file(&daemon), "[[[").unwrap();
    wait_until("the error to show", || {
        status(&daemon)["modes"]["last_error"].is_string()
    });
    let modes = daemon.call("modes.list", json!({})).unwrap();
    assert!(modes["modes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "qwen2"));
}

/// A mode whose model must be pulled from a throttled hub keeps the queue
/// busy for seconds: long enough to fill it, cancel in it and watch order.
#[test]
fn queue_overflow_cancel_and_order() {
    let hub = FakeHub::start();
    hub.add_repo_from_dir("org/tiny-llama", &fixtures_dir().join("tiny-llama"));
    hub.throttle(Some(150_000));
    let endpoint = hub.endpoint();
    let daemon = Daemon::start_configured(
        "[scheduler]\nqueue_size = 3\n",
        &[("HF_ENDPOINT", &endpoint)],
    );
    daemon
        .call(
            "models.register",
            json!({"name": "remote", "repo": "org/tiny-llama"}),
        )
        .unwrap();
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(
        modes_file(&daemon),
        "[modes.slow]\nmodel = \"remote\"\n[modes.fast]\nmodel = \"tiny-qwen2\"\n",
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();

    let first = daemon.call("switch_mode", json!({"mode": "slow"})).unwrap();
    assert_eq!(first["ahead"], 0);
    wait_until("the slow switch to start", || {
        status(&daemon)["queue"]["jobs"][0]["running"] == true
    });

    // Queue: [switch fast, generate fast] then one more generate fills it.
    let socket = daemon.socket.clone();
    let spawn_generate = |prompt: &'static str| {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut client = modeld_wire::Client::connect(&socket).unwrap();
            let result: Result<Vec<Value>, _> = client
                .subscribe(
                    "generate",
                    json!({"mode": "fast", "prompt": prompt, "max_tokens": 2}),
                )
                .and_then(|s| s.collect());
            (
                prompt,
                result.map(|events| events.last().unwrap().clone()),
                Instant::now(),
            )
        })
    };
    let a = spawn_generate("first");
    wait_until("two queued jobs", || {
        status(&daemon)["queue"]["jobs"].as_array().unwrap().len() == 3
    });
    let b = spawn_generate("second");
    wait_until("three queued jobs", || {
        status(&daemon)["queue"]["jobs"].as_array().unwrap().len() == 4
    });
    let err = generate(&daemon, json!({"mode": "fast", "prompt": "overflow"})).unwrap_err();
    assert_eq!(kind(&err), "queue_full");
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    assert_eq!(obj.data.as_ref().unwrap()["limit"], 3);
    let err = daemon
        .call("switch_mode", json!({"mode": "fast"}))
        .unwrap_err();
    assert_eq!(kind(&err), "queue_full");

    // Cancel the second generation while it waits.
    let jobs = status(&daemon)["queue"]["jobs"].clone();
    let second = jobs.as_array().unwrap().last().unwrap()["id"]
        .as_u64()
        .unwrap();
    let reply = daemon.call("jobs.cancel", json!({"job": second})).unwrap();
    assert_eq!(reply["cancelled"], true);
    let (_, result, _) = b.join().unwrap();
    assert_eq!(kind(&result.unwrap_err()), "cancelled");
    assert_eq!(
        daemon.call("jobs.cancel", json!({"job": second})).unwrap()["cancelled"],
        false
    );

    hub.throttle(None);
    let (_, result, _) = a.join().unwrap();
    let done = result.unwrap();
    assert_eq!(done["mode"], "fast");
    wait_until("an empty queue", || {
        status(&daemon)["queue"]["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // Both switches ran, in order: slow was loaded, fast is current.
    assert_eq!(status(&daemon)["queue"]["current_mode"], "fast");
    let vram = daemon.call("vram", json!({})).unwrap();
    let loaded: Vec<&str> = vram["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["remote", "tiny-qwen2"]);
}

#[test]
fn memory_budget_evicts_idle_models_and_refuses_what_cannot_fit() {
    let daemon = Daemon::start_configured("[scheduler]\nmemory_budget = \"1M\"\n", &[]);
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    daemon.call("load", json!({"name": "tiny-llama"})).unwrap();
    // Both do not fit in 1 MiB: the idle llama goes.
    let events = generate(
        &daemon,
        json!({"model": "tiny-qwen2", "prompt": "x", "max_tokens": 1}),
    )
    .unwrap();
    assert_eq!(events.last().unwrap()["event"], "done");
    let vram = daemon.call("vram", json!({})).unwrap();
    assert_eq!(vram["models"].as_array().unwrap().len(), 1);
    assert_eq!(vram["models"][0]["name"], "tiny-qwen2");

    let small = Daemon::start_configured("[scheduler]\nmemory_budget = \"100K\"\n", &[]);
    small.register_fixture("tiny-llama");
    let err = small
        .call("load", json!({"name": "tiny-llama"}))
        .unwrap_err();
    assert_eq!(kind(&err), "insufficient_memory");
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    let data = obj.data.as_ref().unwrap();
    assert_eq!(data["available_bytes"], 100 * 1024);
    assert_eq!(data["device"], "cpu");
    assert!(data["needed_bytes"].as_u64().unwrap() > 100 * 1024);
}

#[test]
fn keep_alive_unloads_idle_models() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    std::fs::write(
        modes_file(&daemon),
        "[modes.brief]\nmodel = \"tiny-llama\"\nkeep_alive = \"1s\"\n",
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    generate(
        &daemon,
        json!({"mode": "brief", "prompt": "x", "max_tokens": 1}),
    )
    .unwrap();
    assert_eq!(status(&daemon)["counts"]["loaded"], 1);
    wait_until("the keep-alive to expire", || {
        status(&daemon)["counts"]["loaded"] == 0
    });
}

/// Writes a PEFT-style adapter for tiny-llama's attention projections.
fn write_lora(dir: &Path, scale: f32) {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..2 {
        // q_proj maps 64 -> 4 heads x 16, v_proj 64 -> 2 KV heads x 16.
        for (proj, out) in [("q_proj", 64), ("v_proj", 32)] {
            let stem = format!("base_model.model.model.layers.{layer}.self_attn.{proj}");
            let a = Tensor::randn(0f32, scale, (4, 64), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, scale, (out, 4), &Device::Cpu).unwrap();
            tensors.insert(format!("{stem}.lora_A.weight"), a);
            tensors.insert(format!("{stem}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8}"#,
    )
    .unwrap();
}

#[test]
fn lora_adapters_are_merged_at_load() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    let loras = daemon.dir.path().join("loras");
    write_lora(&loras.join("strong"), 1.0);
    let modes = format!(
        r#"lora_root = "{}"
[modes.plain]
model = "tiny-llama"
[modes.off]
model = "tiny-llama"
loras = [{{ path = "strong", strength = 0.0 }}]
[modes.on]
model = "tiny-llama"
loras = [{{ path = "strong", strength = 2.0, adapter_name = "style" }}]
"#,
        loras.display()
    );
    std::fs::write(modes_file(&daemon), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let run = |mode: &str| {
        let events = generate(
            &daemon,
            json!({"mode": mode, "prompt": "Model Loading Strategy", "max_tokens": 10}),
        )
        .unwrap();
        events.last().unwrap()["token_ids"].clone()
    };
    let plain = run("plain");
    assert_eq!(run("off"), plain, "strength 0 leaves the model as it was");
    assert_ne!(run("on"), plain, "a strong adapter changes the output");
    let list = daemon.call("modes.list", json!({})).unwrap();
    let on = list["modes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "on")
        .unwrap()
        .clone();
    assert_eq!(on["loras"][0]["adapter_name"], "style");
    // The resident model says which adapters are merged into it.
    let vram = daemon.call("vram", json!({})).unwrap();
    let merged: Vec<&Value> = vram["models"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["loras"].as_array().unwrap())
        .collect();
    assert!(
        merged.iter().any(|l| l["adapter_name"] == "style"),
        "{vram}"
    );
}

#[test]
fn modelctl_modes_switch_cancel() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    let out = daemon.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = daemon.ctl(&["modes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("chat") && text.contains("the llama"),
        "{text}"
    );
    let out = daemon.ctl(&["switch", "qwen"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("-> qwen"));
    wait_until("the switch", || {
        status(&daemon)["queue"]["current_mode"] == "qwen"
    });
    assert!(String::from_utf8_lossy(&daemon.ctl(&["modes"]).stdout).contains("qwen*"));
    let out = daemon.ctl(&["generate", "chat", "Model Loading Strategy", "--mode"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("5 generated tokens"));
    let out = daemon.ctl(&["cancel", "999"]);
    assert_eq!(out.status.code(), Some(1));
    let out = daemon.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mode         chat"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Reloads (good and bad files, by RPC and by file change) racing with
/// generations and switches: every generation finishes in its mode, and
/// the last switch queued is the mode in force at the end.
#[test]
fn reloads_race_generations_and_switches_keep_order() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();

    let socket = daemon.socket.clone();
    let generations: Vec<_> = (0..6)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mode = if i % 2 == 0 { "chat" } else { "qwen" };
                let mut client = modeld_wire::Client::connect(&socket).unwrap();
                let events: Vec<Value> = client
                    .subscribe(
                        "generate",
                        json!({"mode": mode, "prompt": "Model", "max_tokens": 3}),
                    )
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                (mode, events.last().unwrap().clone())
            })
        })
        .collect();
    for round in 0..10 {
        let text = if round % 3 == 2 {
            "[[[broken".to_string()
        } else {
            MODES.to_string()
        };
        std::fs::write(modes_file(&daemon), text).unwrap();
        let _ = daemon.call("modes.reload", json!({}));
    }
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    for generation in generations {
        let (mode, done) = generation.join().unwrap();
        assert_eq!(done["event"], "done", "{done}");
        assert_eq!(done["mode"], mode);
        assert_eq!(done["completion_tokens"], 3);
    }
    for mode in ["qwen", "chat", "qwen", "chat"] {
        daemon.call("switch_mode", json!({"mode": mode})).unwrap();
    }
    wait_until("the queue to drain", || {
        status(&daemon)["queue"]["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert_eq!(status(&daemon)["queue"]["current_mode"], "chat");
}

/// A prompt alone runs in the mode current when its turn comes, after the
/// switches queued before it; with no mode at all, `model` is missing.
#[test]
fn a_prompt_alone_runs_in_the_current_mode() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    let refused = |daemon: &Daemon| {
        let err = generate(daemon, json!({"prompt": "x"})).unwrap_err();
        assert_eq!(kind(&err), "invalid_params");
        let modeld_wire::ClientError::Rpc(object) = &err else {
            panic!("{err}")
        };
        assert_eq!(object.data.as_ref().unwrap()["field"], "model");
    };
    refused(&daemon);
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    refused(&daemon);

    // Queued, not yet run: the prompt still goes to qwen.
    daemon.call("switch_mode", json!({"mode": "qwen"})).unwrap();
    let events = generate(&daemon, json!({"prompt": "The application"})).unwrap();
    let done = events.last().unwrap();
    assert_eq!(done["mode"], "qwen", "{done}");
    assert_eq!(done["completion_tokens"], 4, "qwen's default max_tokens");

    daemon
        .call("switch_mode", json!({"mode": "chat", "wait": true}))
        .unwrap();
    let events = generate(&daemon, json!({"prompt": "Model", "max_tokens": 2})).unwrap();
    let done = events.last().unwrap();
    assert_eq!(done["mode"], "chat");
    assert_eq!(done["completion_tokens"], 2);
}

/// The original design's form: a mode's model is one `.safetensors` file
/// under `model_root`, and LoRA paths without a `lora_root` are taken
/// under `model_root`. A file without its config and tokenizer beside it
/// fails to load with an error that says so.
#[test]
fn a_mode_model_may_be_one_safetensors_file_beside_its_config() {
    let daemon = Daemon::start();
    let root = daemon.dir.path().join("models");
    let llm = root.join("llm");
    std::fs::create_dir_all(&llm).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures_dir().join("tiny-llama").join(file), llm.join(file)).unwrap();
    }
    std::fs::create_dir_all(root.join("sdxl")).unwrap();
    std::fs::copy(
        llm.join("model.safetensors"),
        root.join("sdxl/sdxl-base-1.0.safetensors"),
    )
    .unwrap();
    write_lora(&root.join("loras/strong"), 1.0);
    let modes = format!(
        r#"model_root = "{}"
[modes.file]
model = "llm/model.safetensors"
[modes.styled]
model = "llm/model.safetensors"
loras = [{{ path = "loras/strong", strength = 2.0 }}]
[modes.image]
model = "sdxl/sdxl-base-1.0.safetensors"
"#,
        root.display()
    );
    std::fs::write(modes_file(&daemon), modes).unwrap();
    let listed = daemon.call("modes.reload", json!({})).unwrap();
    assert_eq!(listed["modes"].as_array().unwrap().len(), 3, "{listed}");

    let run = |mode: &str| {
        let events = generate(
            &daemon,
            json!({"mode": mode, "prompt": "Model Loading Strategy", "max_tokens": 5}),
        )
        .unwrap();
        events.last().unwrap()["token_ids"].clone()
    };
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("tiny-llama/expected.json")).unwrap(),
    )
    .unwrap();
    let plain = run("file");
    assert_eq!(
        plain.as_array().unwrap()[..],
        expected["cases"][0]["greedy_ids"].as_array().unwrap()[..5]
    );
    assert_ne!(run("styled"), plain, "the adapter under model_root applies");

    let err = daemon
        .call("switch_mode", json!({"mode": "image", "wait": true}))
        .unwrap_err();
    assert_eq!(kind(&err), "load_failed");
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("tokenizer.json"),
        "{message}"
    );
}

/// The `events` notifications that arrive within `window`.
fn events_within(subscription: &mut modeld_wire::Subscription<'_>, window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut events = Vec::new();
    while Instant::now() < deadline {
        // A read timeout only means nothing came yet.
        if let Ok(Some(event)) = subscription.next_result() {
            events.push(event);
        }
    }
    events
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

/// Reading the file, or a reload of unchanged content, starts no further
/// reloads; a file emptied (as a half-written save would be) keeps the
/// modes in force; a save by rename with new content reloads once.
#[test]
fn the_watcher_reloads_changed_content_only_and_never_to_nothing() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.register_fixture("tiny-qwen2");
    std::fs::write(modes_file(&daemon), MODES).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let mut subscriber = daemon.client();
    subscriber
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut events = subscriber.subscribe("events.subscribe", json!({})).unwrap();

    for _ in 0..5 {
        std::fs::read_to_string(modes_file(&daemon)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.call("modes.reload", json!({})).unwrap();
    let seen = events_within(&mut events, Duration::from_secs(3));
    assert_eq!(
        count(&seen, "modes_reloaded"),
        1,
        "only the explicit reload: {seen:?}"
    );

    std::fs::write(modes_file(&daemon), "").unwrap();
    let seen = events_within(&mut events, Duration::from_millis(1500));
    assert_eq!(count(&seen, "modes_reloaded"), 0, "{seen:?}");
    assert_eq!(count(&seen, "modes_rejected"), 1, "{seen:?}");
    let modes = daemon.call("modes.list", json!({})).unwrap();
    assert_eq!(
        modes["modes"].as_array().unwrap().len(),
        2,
        "old modes kept"
    );
    assert!(status(&daemon)["modes"]["last_error"]
        .as_str()
        .unwrap()
        .contains("holds no modes"));

    let tmp = daemon.dir.path().join(".modes.toml.new");
    std::fs::write(
        &tmp,
        MODES
            .replace("[modes.qwen]", "[modes.qwen2]")
            .replace("modes.qwen.defaults", "modes.qwen2.defaults"),
    )
    .unwrap();
    std::fs::rename(&tmp, modes_file(&daemon)).unwrap();
    let seen = events_within(&mut events, Duration::from_secs(2));
    assert_eq!(count(&seen, "modes_reloaded"), 1, "{seen:?}");
    let modes = daemon.call("modes.list", json!({})).unwrap();
    assert!(modes["modes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "qwen2"));
    assert!(status(&daemon)["modes"]["last_error"].is_null());
}
