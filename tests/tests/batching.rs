//! Continuous batching: concurrent generations on one model run together,
//! give the tokens each would give alone, and leave the queue's order for
//! everything else intact.

use std::time::{Duration, Instant};

use modeld_e2e::{fixtures_dir, kind, Daemon};
use serde_json::{json, Value};

fn expected(fixture: &str) -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join(fixture).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs every request at once, one client each; returns each final event.
fn concurrently(daemon: &Daemon, requests: Vec<Value>) -> Vec<Value> {
    let threads: Vec<_> = requests
        .into_iter()
        .map(|params| {
            let mut client = daemon.client();
            std::thread::spawn(move || {
                let events: Vec<Value> = client
                    .subscribe("generate", params)
                    .expect("generate accepted")
                    .collect::<Result<_, _>>()
                    .expect("generate stream");
                events.last().cloned().expect("a final event")
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Polls `status` until `count` generations run at once.
fn wait_for_running(daemon: &Daemon, count: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        let running = status["queue"]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|job| job["running"] == true)
            .count();
        if running == count {
            return status;
        }
        assert!(Instant::now() < deadline, "never {count} running: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn concurrent_greedy_generations_match_transformers() {
    let fixtures = [
        "tiny-llama",
        "tiny-qwen2",
        "tiny-gemma2",
        "tiny-gemma3",
        "tiny-phi3",
    ];
    for fixture in fixtures {
        let daemon = Daemon::start();
        daemon.register_fixture(fixture);
        daemon.call("load", json!({"name": fixture})).unwrap();
        let expected = expected(fixture);
        let cases = expected["cases"].as_array().unwrap();
        let max_tokens = expected["max_new_tokens"].as_u64().unwrap();
        // Each prompt twice, with different lengths, so sequences join and
        // leave the batch at different steps.
        let requests: Vec<Value> = cases
            .iter()
            .chain(cases)
            .enumerate()
            .map(|(i, case)| {
                let tokens = max_tokens - (i as u64 % 3) * 7;
                json!({"model": fixture, "prompt": case["prompt"], "max_tokens": tokens,
                       "temperature": 0})
            })
            .collect();
        let dones = concurrently(&daemon, requests.clone());
        for ((done, request), case) in dones.iter().zip(&requests).zip(cases.iter().cycle()) {
            assert_eq!(done["finish_reason"], "length", "{done}");
            let n = request["max_tokens"].as_u64().unwrap() as usize;
            let greedy = &case["greedy_ids"].as_array().unwrap()[..n];
            assert_eq!(
                done["token_ids"].as_array().unwrap().as_slice(),
                greedy,
                "{fixture}: prompt {:?}",
                case["prompt"]
            );
        }
    }
}

#[test]
fn a_seeded_sample_is_the_same_alone_and_in_a_batch() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-qwen2");
    let sampled = json!({"model": "tiny-qwen2", "prompt": "The application uses a",
                         "max_tokens": 24, "temperature": 0.9, "top_k": 40, "seed": 7});
    let alone = concurrently(&daemon, vec![sampled.clone()]);
    let mut requests = vec![sampled];
    for prompt in ["Model Loading", "a b c d", "The cache"] {
        requests.push(
            json!({"model": "tiny-qwen2", "prompt": prompt, "max_tokens": 30,
                             "temperature": 0}),
        );
    }
    let batched = concurrently(&daemon, requests);
    assert_eq!(batched[0]["token_ids"], alone[0]["token_ids"]);
    assert_eq!(batched[0]["text"], alone[0]["text"]);
}

#[test]
fn quantized_generations_are_the_same_alone_and_batched() {
    use modeld_e2e::gguf::{write_llama_gguf, GgufType};
    let daemon = Daemon::start();
    let dir = daemon.dir.path().join("synthetic");
    let shape = modeld_e2e::synthetic::Shape {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
    };
    modeld_e2e::synthetic::write_never_ending_model(&dir, shape, 4096);
    for kind in [GgufType::Q8_0, GgufType::Q4K] {
        let name = format!("{kind:?}").to_lowercase().replace('_', "-");
        let out = daemon.dir.path().join(&name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(dir.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
        let file = out.join("model.gguf");
        write_llama_gguf(&dir, &file, kind).unwrap();
        daemon
            .call("models.register", json!({"name": name, "local_path": file}))
            .unwrap();
        let requests: Vec<Value> = ["one prompt", "another, longer prompt here", "x"]
            .iter()
            .map(|p| json!({"model": name, "prompt": p, "max_tokens": 20, "temperature": 0}))
            .collect();
        let alone: Vec<Value> = requests
            .iter()
            .map(|r| concurrently(&daemon, vec![r.clone()]).remove(0))
            .collect();
        let batched = concurrently(&daemon, requests);
        for (a, b) in alone.iter().zip(&batched) {
            assert_eq!(a["completion_tokens"], 20, "{name}: {a}");
            assert_eq!(a["token_ids"], b["token_ids"], "{name}");
        }
    }
}

#[test]
fn generations_batch_up_to_max_batch_and_other_jobs_wait_for_them() {
    let daemon = Daemon::start_configured("[scheduler]\nmax_batch = 3\n", &[]);
    modeld_e2e::synthetic::register_slow_model(&daemon, "slow");
    // Three of these fit the model's KV positions (4096) together.
    let long = json!({"model": "slow", "prompt": "a b c", "max_tokens": 1200, "temperature": 0});
    let (progress, seen) = std::sync::mpsc::channel::<&str>();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut client = daemon.client();
            let params = long.clone();
            let progress = progress.clone();
            std::thread::spawn(move || -> String {
                // A job cancelled while queued is refused at once.
                let events = match client.subscribe("generate", params) {
                    Ok(events) => events,
                    Err(err) => return kind(&err).to_string(),
                };
                let mut last = Value::Null;
                for (n, event) in events.enumerate() {
                    if n == 0 {
                        let _ = progress.send("token");
                    }
                    last = event.unwrap();
                }
                let _ = progress.send("done");
                last["finish_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
        })
        .collect();
    // Three run together: each streams before any has finished. The
    // fourth waits for room in the batch.
    for _ in 0..3 {
        let event = seen.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(
            event, "token",
            "a generation ended before three ran together"
        );
    }
    let status = wait_for_running(&daemon, 3);
    let jobs = status["queue"]["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 4, "{status}");
    // An unload queued now waits for every generation ahead of it.
    let mut unloader = daemon.client();
    let unload = std::thread::spawn(move || unloader.call_value("unload", json!({"name": "slow"})));
    std::thread::sleep(Duration::from_millis(300));
    let loaded = daemon.call("vram", json!({})).unwrap();
    assert!(loaded.to_string().contains("\"slow\""), "{loaded}");
    // Cancel everything generating until the unload has run (the fourth
    // may start as the others end).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !unload.is_finished() {
        let status = daemon.call("status", json!({})).unwrap();
        for job in status["queue"]["jobs"].as_array().unwrap() {
            if job["kind"] == "generate" {
                let _ = daemon.call("jobs.cancel", json!({"job": job["id"]}));
            }
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    unload.join().unwrap().expect("unload after the batch");
    for client in clients {
        assert_eq!(client.join().unwrap(), "cancelled");
    }
}
