//! Text generation through the daemon, checked against token ids computed
//! by Hugging Face transformers (`../shared/fixtures/*/expected.json`).

use modeld_e2e::{fixtures_dir, kind, Daemon};
use serde_json::{json, Value};

fn expected(fixture: &str) -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join(fixture).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs `generate` and returns every event.
fn generate(daemon: &Daemon, params: Value) -> Vec<Value> {
    let mut client = daemon.client();
    client
        .subscribe("generate", params)
        .expect("generate accepted")
        .collect::<Result<Vec<_>, _>>()
        .expect("generate stream")
}

fn check_greedy(fixture: &str) {
    let daemon = Daemon::start();
    daemon.register_fixture(fixture);
    let loaded = daemon.call("load", json!({"name": fixture})).unwrap();
    assert_eq!(loaded["already_loaded"], false);
    assert_eq!(loaded["model"]["device"], "cpu");
    let expected = expected(fixture);
    let max_tokens = expected["max_new_tokens"].as_u64().unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let events = generate(
            &daemon,
            json!({"model": fixture, "prompt": case["prompt"], "max_tokens": max_tokens, "temperature": 0}),
        );
        let done = events.last().unwrap();
        assert_eq!(done["event"], "done", "{done}");
        assert_eq!(
            done["prompt_tokens"],
            case["input_ids"].as_array().unwrap().len(),
            "prompt {:?} tokenized differently",
            case["prompt"]
        );
        assert_eq!(
            done["token_ids"], case["greedy_ids"],
            "prompt {:?}",
            case["prompt"]
        );
        // The streamed pieces add up to the final text.
        let streamed: String = events[..events.len() - 1]
            .iter()
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        assert_eq!(streamed, done["text"].as_str().unwrap());
        assert_eq!(done["text"], case["greedy_text"]);
    }
}

#[test]
fn tiny_llama_matches_transformers_greedy() {
    check_greedy("tiny-llama");
}

#[test]
fn tiny_qwen2_matches_transformers_greedy() {
    check_greedy("tiny-qwen2");
}

#[test]
fn tiny_gemma2_matches_transformers_greedy() {
    check_greedy("tiny-gemma2");
}

#[test]
fn tiny_gemma3_matches_transformers_greedy() {
    check_greedy("tiny-gemma3");
}

#[test]
fn tiny_phi3_matches_transformers_greedy() {
    check_greedy("tiny-phi3");
}

#[test]
fn generate_loads_on_demand_and_reports_stats() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-qwen2");
    let events = generate(
        &daemon,
        json!({"model": "tiny-qwen2", "prompt": "The application uses a", "max_tokens": 8,
               "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 42, "repeat_penalty": 1.1}),
    );
    let done = events.last().unwrap();
    assert_eq!(done["seed"], 42);
    assert_eq!(done["completion_tokens"], 8);
    assert_eq!(done["finish_reason"], "length");
    assert!(done["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // The same seed gives the same tokens.
    let again = generate(
        &daemon,
        json!({"model": "tiny-qwen2", "prompt": "The application uses a", "max_tokens": 8,
               "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 42, "repeat_penalty": 1.1}),
    );
    assert_eq!(again.last().unwrap()["token_ids"], done["token_ids"]);

    let vram = daemon.call("vram", json!({})).unwrap();
    let model = &vram["models"][0];
    assert_eq!(model["name"], "tiny-qwen2");
    let size = std::fs::metadata(fixtures_dir().join("tiny-qwen2/model.safetensors"))
        .unwrap()
        .len();
    // f32 weights as in the file (less its header), plus the KV cache.
    let kv = model["kv_cache_bytes"].as_u64().unwrap();
    let weights = model["estimated_bytes"].as_u64().unwrap() - kv;
    assert!(weights <= size && weights + 16 * 1024 > size, "{model}");
    assert!(kv > 0);
}

#[test]
fn stop_strings_end_generation() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    // The greedy text of this prompt is " - Local File ha.safetensors...".
    let events = generate(
        &daemon,
        json!({"model": "tiny-llama", "prompt": "Model Loading Strategy", "max_tokens": 40, "stop": ["File"]}),
    );
    let done = events.last().unwrap();
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["text"], " - Local ");
    // The stop string is never streamed, and the pieces add up to the text.
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, " - Local ");
    // A stop string that never completes holds nothing back at the end.
    let events = generate(
        &daemon,
        json!({"model": "tiny-llama", "prompt": "Model Loading Strategy", "max_tokens": 40, "stop": ["re-x"]}),
    );
    let done = events.last().unwrap();
    assert_eq!(done["finish_reason"], "length");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, done["text"].as_str().unwrap());
    assert!(streamed.ends_with("re-"), "{streamed:?}");
}

#[test]
fn bad_requests_name_the_field() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    let mut client = daemon.client();
    let cases = [
        (
            json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny-llama", "prompt": "x", "temperature": -1}),
            "temperature",
        ),
        (
            json!({"model": "tiny-llama", "prompt": "x", "top_p": 2}),
            "top_p",
        ),
        (json!({"model": "tiny-llama"}), "prompt"),
        (
            json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 10000}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}),
            "messages",
        ),
    ];
    for (params, field) in cases {
        let err = client
            .subscribe("generate", params.clone())
            .err()
            .expect("refused");
        assert_eq!(kind(&err), "invalid_params", "{params}: {err}");
        let modeld_wire::ClientError::Rpc(obj) = &err else {
            panic!()
        };
        assert_eq!(
            obj.data.as_ref().unwrap()["field"],
            field,
            "{params}: {err}"
        );
    }
    let err = client
        .subscribe("generate", json!({"model": "nobody", "prompt": "x"}))
        .err()
        .unwrap();
    assert_eq!(kind(&err), "not_found");
    // The daemon still generates after all that.
    let events = generate(
        &daemon,
        json!({"model": "tiny-llama", "prompt": "Model", "max_tokens": 2}),
    );
    assert_eq!(events.last().unwrap()["completion_tokens"], 2);
}

#[test]
fn unload_frees_the_model() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.call("load", json!({"name": "tiny-llama"})).unwrap();
    let again = daemon.call("load", json!({"name": "tiny-llama"})).unwrap();
    assert_eq!(again["already_loaded"], true);
    assert_eq!(
        daemon.call("status", json!({})).unwrap()["counts"]["loaded"],
        1
    );
    let reply = daemon
        .call("unload", json!({"name": "tiny-llama"}))
        .unwrap();
    assert!(reply["freed_bytes"].is_u64());
    assert_eq!(
        daemon.call("status", json!({})).unwrap()["counts"]["loaded"],
        0
    );
    let err = daemon
        .call("unload", json!({"name": "tiny-llama"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_loaded");
    let err = daemon
        .call("load", json!({"name": "tiny-llama", "device": "tpu"}))
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
}

#[test]
fn modelctl_load_generate_unload() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    let out = daemon.ctl(&["load", "tiny-llama"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded tiny-llama (llama, cpu f32)"));
    let out = daemon.ctl(&[
        "generate",
        "tiny-llama",
        "Model Loading Strategy",
        "--max-tokens",
        "40",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim_end_matches('\n'),
        expected("tiny-llama")["cases"][0]["greedy_text"]
            .as_str()
            .unwrap()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("40 generated tokens"));
    let out = daemon.ctl(&["vram"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("tiny-llama"));
    let out = daemon.ctl(&["generate", "tiny-llama", "hi", "--chat"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chat template"));
    let out = daemon.ctl(&["unload", "tiny-llama"]);
    assert!(out.status.success());
}

/// GGUF written from tiny-llama: every case for f32, and the cases whose
/// top-2 logit margin leaves room for rounding for f16 and Q8_0.
#[test]
fn gguf_from_tiny_llama_gives_the_same_tokens() {
    use modeld_e2e::gguf::{write_llama_gguf, GgufType};
    let daemon = Daemon::start();
    let source = daemon.register_fixture("tiny-llama");
    let expected = expected("tiny-llama");
    for (kind, min_margin) in [
        (GgufType::F32, 0.0),
        (GgufType::F16, 0.05),
        (GgufType::Q8_0, 0.2),
    ] {
        let dir = daemon.dir.path().join(format!("gguf-{kind:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(source.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let file = dir.join("tiny-llama.gguf");
        write_llama_gguf(&source, &file, kind).unwrap();
        let name = format!("gguf-{kind:?}").to_lowercase().replace('_', "-");
        daemon
            .call("models.register", json!({"name": name, "local_path": file}))
            .unwrap();
        let loaded = daemon.call("load", json!({"name": name})).unwrap();
        assert_eq!(loaded["model"]["dtype"], "gguf");
        let mut checked = 0;
        for case in expected["cases"].as_array().unwrap() {
            if case["min_top2_margin"].as_f64().unwrap() < min_margin {
                continue;
            }
            let events = generate(
                &daemon,
                json!({"model": name, "prompt": case["prompt"], "max_tokens": 40}),
            );
            let done = events.last().unwrap();
            assert_eq!(
                done["token_ids"], case["greedy_ids"],
                "{kind:?}: {:?}",
                case["prompt"]
            );
            checked += 1;
        }
        assert!(checked >= 3, "{kind:?} checked only {checked} cases");
    }
}

/// GGUF copies (llama.cpp's names and keys, f32) of the Gemma 2, Gemma 3
/// and Phi-3 fixtures give transformers' ids through the daemon.
#[test]
fn gguf_gemma_and_phi3_give_the_same_tokens() {
    use modeld_e2e::gguf::{write_gguf, GgufType};
    let daemon = Daemon::start();
    for fixture in ["tiny-gemma2", "tiny-gemma3", "tiny-phi3"] {
        let source = daemon.register_fixture(fixture);
        let dir = daemon.dir.path().join(format!("gguf-{fixture}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(source.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let file = dir.join("model.gguf");
        write_gguf(&source, &file, GgufType::F32).unwrap();
        let name = format!("gguf-{fixture}");
        daemon
            .call("models.register", json!({"name": name, "local_path": file}))
            .unwrap();
        let loaded = daemon.call("load", json!({"name": name})).unwrap();
        assert_eq!(loaded["model"]["dtype"], "gguf");
        let expected = expected(fixture);
        for case in expected["cases"].as_array().unwrap() {
            let events = generate(
                &daemon,
                json!({"model": name, "prompt": case["prompt"], "max_tokens": 40, "temperature": 0}),
            );
            let done = events.last().unwrap();
            assert_eq!(
                done["token_ids"], case["greedy_ids"],
                "{fixture}: {:?}",
                case["prompt"]
            );
        }
    }
}

/// Architectures without trained fixtures, and the synthetic Gemma 2 and
/// Phi-3 that `bench families` times, load and generate: random weights,
/// so only the mechanics are checked, and that greedy decoding is
/// deterministic.
#[test]
fn synthetic_models_load_and_generate() {
    use modeld_e2e::synthetic::{write_model, Shape};
    let daemon = Daemon::start();
    let shape = Shape {
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
    };
    for arch in ["mistral", "qwen3", "gemma2", "phi3"] {
        let dir = daemon.dir.path().join(arch);
        write_model(&dir, arch, shape);
        daemon
            .call("models.register", json!({"name": arch, "local_path": dir}))
            .unwrap();
        let loaded = daemon.call("load", json!({"name": arch})).unwrap();
        assert_eq!(loaded["model"]["arch"], arch);
        let params = json!({"model": arch, "prompt": "Model Loading Strategy", "max_tokens": 6});
        let first = generate(&daemon, params.clone());
        let second = generate(&daemon, params);
        let done = first.last().unwrap();
        assert_eq!(done["event"], "done", "{done}");
        assert_eq!(done["token_ids"], second.last().unwrap()["token_ids"]);
    }
}

/// Greedy ids of tiny-llama's weights under a rewritten RoPE section.
fn greedy_with_rope(daemon: &Daemon, name: &str, rope: Value) -> Vec<Value> {
    let dir = daemon.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = fixtures_dir().join("tiny-llama");
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    let object = config.as_object_mut().unwrap();
    object.remove("rope_parameters");
    object.extend(rope.as_object().unwrap().clone());
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    daemon
        .call("models.register", json!({"name": name, "local_path": dir}))
        .unwrap();
    let cases = expected("tiny-llama")["cases"].as_array().unwrap().clone();
    cases
        .iter()
        .take(3)
        .map(|case| {
            let events = generate(
                daemon,
                json!({"model": name, "prompt": case["prompt"], "max_tokens": 24, "temperature": 0}),
            );
            events.last().unwrap()["token_ids"].clone()
        })
        .collect()
}

#[test]
fn llama3_rope_scaling_reads_the_same_in_every_spelling() {
    let daemon = Daemon::start();
    let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32});
    let mut v4 = scaling.clone();
    v4["rope_type"] = json!("llama3");
    let transformers_4 = greedy_with_rope(
        &daemon,
        "v4",
        json!({"rope_theta": 10000.0, "rope_scaling": v4}),
    );
    let mut v5 = scaling.clone();
    v5["rope_type"] = json!("llama3");
    v5["rope_theta"] = json!(10000.0);
    let transformers_5 = greedy_with_rope(&daemon, "v5", json!({"rope_parameters": v5}));
    assert_eq!(transformers_4, transformers_5);
    let plain = greedy_with_rope(
        &daemon,
        "plain",
        json!({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    );
    assert_ne!(plain, transformers_5, "the scaling must change the output");
    let yarn = daemon.dir.path().join("yarn");
    std::fs::create_dir_all(&yarn).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(daemon.dir.path().join("v5").join(file), yarn.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(daemon.dir.path().join("v5/config.json"))
        .unwrap()
        .replace("llama3", "yarn");
    std::fs::write(yarn.join("config.json"), config).unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "yarn", "local_path": yarn}),
        )
        .unwrap();
    let err = daemon.call("load", json!({"name": "yarn"})).unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err:?}");
    assert!(err.to_string().contains("yarn"), "{err}");
}

#[test]
fn corrupt_local_files_are_load_failed_and_nothing_is_fetched() {
    let hub = modeld_e2e::fakehub::FakeHub::start();
    let endpoint = hub.endpoint();
    let daemon = Daemon::start_with(&[("HF_ENDPOINT", &endpoint)]);
    let dir = daemon.register_fixture("tiny-llama");
    // Also a repo: the local path still wins, and its files are not ours to
    // fetch again.
    daemon
        .call(
            "models.register",
            json!({"name": "tiny-llama", "repo": "org/tiny-llama", "local_path": dir, "replace": true}),
        )
        .unwrap();
    let weights = dir.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let refused_naming = |bad: &std::path::Path| {
        let err = daemon
            .client()
            .subscribe("generate", json!({"model": "tiny-llama", "prompt": "x"}))
            .err()
            .expect("refused");
        assert_eq!(kind(&err), "load_failed", "{err}");
        let modeld_wire::ClientError::Rpc(obj) = &err else {
            panic!()
        };
        assert_eq!(obj.data.as_ref().unwrap()["file"], json!(bad), "{err}");
        assert!(err.to_string().contains(&bad.display().to_string()));
    };
    std::fs::write(&weights, &good[..good.len() / 3]).unwrap();
    refused_naming(&weights);
    std::fs::write(&weights, &good).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(&tokenizer, b"{\"not\": \"a tokenizer\"").unwrap();
    refused_naming(&tokenizer);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}
