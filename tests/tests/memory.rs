//! Memory accounting on the CPU: estimates made from file headers before a
//! load agree with what the load really takes, and an unload gives the
//! memory back, cycle after cycle.

use modeld_e2e::gguf::{write_llama_gguf, GgufType};
use modeld_e2e::synthetic::{write_model, Shape};
use modeld_e2e::Daemon;
use serde_json::{json, Value};

/// A synthetic llama of about 80 MB in f32.
fn write_synthetic(daemon: &Daemon) -> std::path::PathBuf {
    let dir = daemon.dir.path().join("synthetic");
    let shape = Shape {
        hidden: 512,
        intermediate: 1408,
        layers: 6,
        heads: 8,
        kv_heads: 4,
    };
    write_model(&dir, "llama", shape);
    dir
}

/// Checks the weights part of the estimate against the measurement.
fn assert_estimate_holds(model: &Value) {
    let estimated = model["estimated_bytes"].as_u64().unwrap();
    let kv = model["kv_cache_bytes"].as_u64().unwrap();
    let weights = (estimated - kv) as f64;
    let measured = model["measured_bytes"].as_u64().unwrap() as f64;
    let ratio = measured / weights;
    eprintln!(
        "{} {}: estimated weights {weights}, measured {measured}, ratio {ratio:.3}",
        model["name"], model["dtype"]
    );
    assert!(
        (0.8..=1.2).contains(&ratio),
        "{} {}: measured {measured} vs estimated weights {weights} (ratio {ratio:.2})",
        model["name"],
        model["dtype"]
    );
}

#[test]
fn estimates_match_measurements_per_dtype_and_format() {
    let daemon = Daemon::start();
    let dir = write_synthetic(&daemon);
    let gguf = daemon.dir.path().join("synthetic-q8.gguf");
    write_llama_gguf(&dir, &gguf, GgufType::Q8_0).unwrap();
    std::fs::copy(
        dir.join("tokenizer.json"),
        daemon.dir.path().join("tokenizer.json"),
    )
    .unwrap();
    daemon
        .call("models.register", json!({"name": "st", "local_path": dir}))
        .unwrap();
    daemon
        .call("models.register", json!({"name": "q8", "local_path": gguf}))
        .unwrap();
    for (name, dtype) in [("st", "f32"), ("st", "bf16"), ("q8", "f32")] {
        let loaded = daemon
            .call("load", json!({"name": name, "dtype": dtype}))
            .unwrap();
        assert_estimate_holds(&loaded["model"]);
        let freed = daemon.call("unload", json!({"name": name})).unwrap()["freed_bytes"]
            .as_u64()
            .unwrap() as f64;
        let measured = loaded["model"]["measured_bytes"].as_u64().unwrap() as f64;
        assert!(
            (0.8..=1.25).contains(&(freed / measured)),
            "{name} {dtype}: unload freed {freed} of {measured}"
        );
    }
}

#[test]
fn load_unload_cycles_do_not_keep_memory() {
    let daemon = Daemon::start();
    let dir = write_synthetic(&daemon);
    daemon
        .call("models.register", json!({"name": "st", "local_path": dir}))
        .unwrap();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let mut after_unload = Vec::new();
    for _ in 0..5 {
        daemon.call("load", json!({"name": "st"})).unwrap();
        daemon.call("unload", json!({"name": "st"})).unwrap();
        after_unload.push(rss());
    }
    let first = after_unload[0];
    let last = *after_unload.last().unwrap();
    assert!(
        last < first + (16 << 20),
        "memory kept growing across cycles: {after_unload:?}"
    );
}
