//! Jobs of the queue, end to end: what `jobs.cancel` promises, `jobs.get`
//! and waiting for mode switches.

use std::time::{Duration, Instant};

use modeld_e2e::{kind, Daemon};
use serde_json::{json, Value};

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job_state(daemon: &Daemon, job: u64) -> String {
    let reply = daemon.call("jobs.get", json!({"job": job})).unwrap();
    reply["state"].as_str().unwrap().to_string()
}

/// What the client of a generation finally saw: the done event's
/// `finish_reason`, or the error kind.
fn outcome(result: Result<Vec<Value>, modeld_wire::ClientError>) -> String {
    match result {
        Ok(events) => {
            let last = events.last().expect("a final event");
            last["finish_reason"].as_str().unwrap_or("none").to_string()
        }
        Err(err) => kind(&err).to_string(),
    }
}

/// Sixteen long stop strings that never match: checking them after each
/// token lengthens the stretch between a generation's last cancel check
/// and its end, where the race lies.
fn slow_stops() -> Vec<String> {
    (1..=16u8)
        .map(|c| char::from(c).to_string().repeat(256))
        .collect()
}

/// The id of the running generation newer than job `after`, polled from
/// `status`; `None` once the generation has ended without being seen.
fn running_generation(daemon: &Daemon, after: u64, until: Instant) -> Option<u64> {
    let mut client = daemon.client();
    while Instant::now() < until {
        let status = client.call_value("status", json!({})).unwrap();
        let first = &status["queue"]["jobs"][0];
        let id = first["id"].as_u64().unwrap_or(0);
        if first["running"] == true && first["kind"] == "generate" && id > after {
            return Some(id);
        }
        if status["queue"]["jobs"]
            .as_array()
            .is_some_and(|jobs| jobs.is_empty())
        {
            return None;
        }
    }
    None
}

/// Cancels land at every point of short generations, including just as
/// they end: each cancel answered `cancelled: true` must reach the client
/// as `cancelled`, never as `length`. The race is narrow (a few rounds in a
/// thousand landed in it before the fix), hence the many rounds.
#[test]
fn an_acknowledged_cancel_always_reaches_the_client() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.call("load", json!({"name": "tiny-llama"})).unwrap();
    let mut control = daemon.client();
    let mut acknowledged = 0;
    let mut last_job = 0;
    for round in 0..1000 {
        let socket = daemon.socket.clone();
        let max_tokens = 1 + round % 3;
        let generation = std::thread::spawn(move || {
            let mut client = modeld_wire::Client::connect(&socket).unwrap();
            let params = json!({"model": "tiny-llama", "prompt": "Model",
                                "max_tokens": max_tokens, "stop": slow_stops()});
            outcome(
                client
                    .subscribe("generate", params)
                    .and_then(|s| s.collect()),
            )
        });
        let until = Instant::now() + Duration::from_secs(10);
        let Some(job) = running_generation(&daemon, last_job, until) else {
            generation.join().unwrap();
            continue;
        };
        last_job = job;
        let reply = control
            .call_value("jobs.cancel", json!({"job": job}))
            .unwrap();
        let seen = generation.join().unwrap();
        if reply["cancelled"] == true {
            acknowledged += 1;
            assert_eq!(
                seen, "cancelled",
                "round {round}: job {job} was acknowledged as cancelled"
            );
            wait_until("the job to be recorded", || {
                job_state(&daemon, job) == "cancelled"
            });
        }
    }
    assert!(acknowledged > 0, "no cancel landed while a job ran");
}

/// A daemon with a mode that loads and one of an unsupported architecture.
fn daemon_with_a_broken_mode() -> Daemon {
    let daemon = Daemon::start();
    let good = daemon.register_fixture("tiny-llama");
    let broken = daemon.dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(good.join(file), broken.join(file)).unwrap();
    }
    std::fs::write(broken.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "hollow", "local_path": broken}),
        )
        .unwrap();
    std::fs::write(
        daemon.dir.path().join("modes.toml"),
        "[modes.good]\nmodel = \"tiny-llama\"\n[modes.broken]\nmodel = \"hollow\"\n",
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    daemon
}

/// A failed switch reaches whoever asked: `wait: true` answers with its
/// error, `jobs.get` keeps it, `status` shows the last one, and
/// `modelctl switch` prints it and exits 1.
#[test]
fn a_failed_switch_reaches_its_caller() {
    let daemon = daemon_with_a_broken_mode();
    let err = daemon
        .call("switch_mode", json!({"mode": "broken", "wait": true}))
        .unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err}");

    let queued = daemon
        .call("switch_mode", json!({"mode": "broken"}))
        .unwrap();
    assert_eq!(queued["state"], "queued");
    let job = queued["job"].as_u64().unwrap();
    wait_until("the switch to fail", || job_state(&daemon, job) == "failed");
    let failed = daemon.call("jobs.get", json!({"job": job})).unwrap();
    assert_eq!(failed["kind"], "switch");
    assert_eq!(failed["mode"], "broken");
    assert_eq!(failed["error"]["data"]["kind"], "load_failed");
    assert!(failed["finished_at"].as_u64().unwrap() > 0);

    let status = daemon.call("status", json!({})).unwrap();
    let last = &status["queue"]["last_switch_error"];
    assert_eq!(last["job"], job);
    assert_eq!(last["mode"], "broken");
    assert_eq!(last["error"]["data"]["kind"], "load_failed");
    assert!(status["queue"]["current_mode"].is_null());

    let done = daemon
        .call("switch_mode", json!({"mode": "good", "wait": true}))
        .unwrap();
    assert_eq!(done["state"], "done");
    assert_eq!(
        daemon.call("status", json!({})).unwrap()["queue"]["current_mode"],
        "good"
    );
    assert_eq!(job_state(&daemon, done["job"].as_u64().unwrap()), "done");

    let out = daemon.ctl(&["switch", "broken"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("switch to broken failed") && stderr.contains("load_failed"),
        "{stderr}"
    );
    let out = daemon.ctl(&["switch", "good"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("switched good -> good"));
    let out = daemon.ctl(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("last switch error: to broken"));
}

#[test]
fn jobs_get_knows_generations_and_refuses_unknown_ids() {
    let daemon = daemon_with_a_broken_mode();
    let mut client = daemon.client();
    let events: Vec<Value> = client
        .subscribe(
            "generate",
            json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 1}),
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(events.last().unwrap()["event"], "done");
    // The first job of a daemon without a default mode.
    let job = 1;
    wait_until("the generation to be recorded", || {
        job_state(&daemon, job) == "done"
    });
    let reply = daemon.call("jobs.get", json!({"job": job})).unwrap();
    assert_eq!(reply["kind"], "generate");
    assert_eq!(reply["model"], "tiny-llama");
    assert!(reply["error"].is_null());

    let err = daemon.call("jobs.get", json!({"job": 4242})).unwrap_err();
    assert_eq!(kind(&err), "not_found");
    let modeld_wire::ClientError::Rpc(object) = &err else {
        panic!("{err}")
    };
    assert_eq!(object.data.as_ref().unwrap()["field"], "job");
    let err = daemon.call("jobs.get", json!({"job": "one"})).unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
}
