//! Queue position and ETA (issue 23): a queued job's `position`, `ahead`
//! and `eta_s` in `status` and `jobs.get`, against when it really starts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use modeld_e2e::synthetic::register_slow_model;
use modeld_e2e::Daemon;
use serde_json::{json, Value};

/// Runs a generation on its own connection, reading every event so the
/// worker never waits for the client.
fn generate_in_background(daemon: &Daemon, params: Value) -> std::thread::JoinHandle<usize> {
    let mut client = daemon.client();
    std::thread::spawn(move || match client.subscribe("generate", params) {
        Ok(events) => events.count(),
        Err(_) => 0,
    })
}

fn queue(daemon: &Daemon) -> Vec<Value> {
    let status = daemon.call("status", json!({})).unwrap();
    status["queue"]["jobs"].as_array().unwrap().clone()
}

fn wait_for(what: &str, mut check: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ETA of a job queued behind a long generation is its remaining
/// time, within a stated tolerance: half the real wait, plus a second.
/// The tests here time generations; run side by side on a small machine,
/// one daemon's decode would slow the other's mid-measurement.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn a_queued_job_eta_matches_when_it_starts() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start_configured("[scheduler]\nmax_batch = 1\n", &[]);
    register_slow_model(&daemon, "slow");
    // Rates are measured from earlier generations: none yet, no ETA. The
    // warm-up is as long as the job measured below, because a token's cost
    // grows with the context (attention reads every earlier position) and
    // the rate is an average over whole generations.
    let warm = generate_in_background(
        &daemon,
        json!({"model": "slow", "prompt": "a", "max_tokens": 1000}),
    );
    wait_for("the warm-up to run", || {
        queue(&daemon)
            .first()
            .filter(|j| j["running"] == true)
            .cloned()
    });
    let unmeasured = generate_in_background(
        &daemon,
        json!({"model": "slow", "prompt": "a", "max_tokens": 1}),
    );
    let first = wait_for("a queued job", || queue(&daemon).get(1).cloned());
    assert_eq!(
        (first["position"].as_u64(), first["ahead"].as_u64()),
        (Some(1), Some(1)),
        "{first}"
    );
    warm.join().unwrap();
    unmeasured.join().unwrap();

    let long = generate_in_background(
        &daemon,
        json!({"model": "slow", "prompt": "a", "max_tokens": 1000}),
    );
    let running = wait_for("the long generation to run", || {
        queue(&daemon)
            .first()
            .filter(|j| j["running"] == true)
            .cloned()
    });
    std::thread::sleep(Duration::from_millis(300));
    let short = generate_in_background(
        &daemon,
        json!({"model": "slow", "prompt": "b", "max_tokens": 5}),
    );
    let queued = wait_for("the short one to queue", || queue(&daemon).get(1).cloned());
    let asked = Instant::now();
    let eta = queued["eta_s"]
        .as_u64()
        .unwrap_or_else(|| panic!("no eta: {queued}")) as f64;
    let id = queued["id"].as_u64().unwrap();
    let info = daemon.call("jobs.get", json!({"job": id})).unwrap();
    assert_eq!(info["state"], "queued");
    assert_eq!(
        (info["position"].as_u64(), info["ahead"].as_u64()),
        (Some(1), Some(1)),
        "{info}"
    );
    wait_for("the short one to start", || {
        let jobs = queue(&daemon);
        let started = jobs.iter().all(|j| j["id"] != running["id"]);
        started.then_some(Value::Bool(true))
    });
    let waited = asked.elapsed().as_secs_f64();
    let tolerance = 0.5 * waited + 1.0;
    eprintln!("eta_s {eta} against {waited:.1} s waited");
    assert!(
        (eta - waited).abs() <= tolerance,
        "eta_s {eta} against {waited:.1} s waited (tolerance {tolerance:.1} s)"
    );
    long.join().unwrap();
    short.join().unwrap();
}

/// With `queue_events`, a waiting job's subscription hears its place
/// first (accepted while it waits), then its tokens; without, nothing
/// changes: the first event is a token.
#[test]
fn a_waiting_subscription_with_queue_events_hears_its_place() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start_configured("[scheduler]\nmax_batch = 1\n", &[]);
    register_slow_model(&daemon, "slow");
    let running = generate_in_background(
        &daemon,
        json!({"model": "slow", "prompt": "a", "max_tokens": 200}),
    );
    wait_for("the first job to run", || {
        queue(&daemon)
            .first()
            .filter(|j| j["running"] == true)
            .cloned()
    });
    let mut client = daemon.client();
    let params = json!({"model": "slow", "prompt": "a", "max_tokens": 2, "queue_events": true});
    let events: Vec<Value> = client
        .subscribe("generate", params)
        .expect("accepted while queued")
        .collect::<Result<_, _>>()
        .unwrap();
    let first = &events[0];
    assert_eq!(first["event"], "queued", "{events:?}");
    assert_eq!(
        (first["position"].as_u64(), first["ahead"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(events.iter().any(|e| e["event"] == "token"), "{events:?}");
    assert_eq!(events.last().unwrap()["event"], "done");
    running.join().unwrap();
    let plain = daemon.generate_events(json!({"model": "slow", "prompt": "a", "max_tokens": 2}));
    assert!(plain.iter().all(|e| e["event"] != "queued"), "{plain:?}");
}
