//! `bench cancel`: how long a cancel takes to end a picture's run, measured
//! from the `jobs.cancel` call to the final event, with the cancel landing
//! at several points inside a denoising step and inside the VAE decode of
//! the SD1.5-shaped pipeline at 512x512 on the CPU.

use std::path::Path;
use std::time::{Duration, Instant};

use modeld_e2e::Daemon;
use serde_json::{json, Value};

/// Seconds into the first step (after the prompt is encoded), or into the
/// decode (after the last step), at which a cancel is sent.
const INTO_STEP_S: [f64; 4] = [0.5, 2.0, 5.0, 11.0];
const INTO_DECODE_S: [f64; 2] = [0.5, 3.0];

pub fn run(python: &str, script: &Path, fixture: &Path) {
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("sd15-random");
    super::make_sd15(python, script, &dir, fixture);
    // The worker's debug line gives the run's estimated seconds, printed
    // beside the measured ones to check the CPU work estimate.
    let daemon = Daemon::start_with(&[("MODELD_LOG", "warn,modeld::engine::image::worker=debug")]);
    daemon
        .call(
            "models.register",
            json!({"name": "sd15", "local_path": dir}),
        )
        .expect("register");
    daemon.call("load", json!({"name": "sd15"})).expect("load");
    let mut client = patient_client(&daemon);
    let full: Vec<Value> = client
        .subscribe("generate", params())
        .expect("generate")
        .collect::<Result<_, _>>()
        .expect("events");
    let done = full.last().expect("done");
    println!(
        "one whole run (2 steps, guidance, encode and decode): generate_ms {}\n",
        done["generate_ms"]
    );
    println!("Cancel latency, SD1.5-shaped pipeline (random weights, float32), 512x512, guidance 7.5, CPU: from the jobs.cancel call to the final event\n");
    println!("| cancel sent | latency s |");
    println!("|---|---|");
    let mut worst = 0f64;
    let cases = INTO_STEP_S
        .iter()
        .map(|&s| ("denoise", s))
        .chain(INTO_DECODE_S.iter().map(|&s| ("decode", s)));
    for (stage, delay) in cases {
        let latency = cancel_latency(&daemon, stage, delay);
        worst = worst.max(latency);
        let place = match stage {
            "denoise" => "inside step 1",
            _ => "inside the VAE decode",
        };
        println!("| {delay:.1} s {place} | {latency:.3} |");
    }
    println!("\nworst: {worst:.3} s");
}

/// Starts a run, waits until `stage` has begun (the event before it has
/// arrived), waits `delay` seconds more, cancels, and times the ending.
fn cancel_latency(daemon: &Daemon, stage: &str, delay: f64) -> f64 {
    let mut client = patient_client(daemon);
    let mut stream = client.subscribe("generate", params()).expect("generate");
    let job = running_job(daemon);
    for event in stream.by_ref() {
        let event = event.expect("event");
        if begins(&event, stage) {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs_f64(delay));
    let sent = Instant::now();
    let reply = daemon
        .call("jobs.cancel", json!({"job": job}))
        .expect("cancel");
    assert_eq!(
        reply["cancelled"], true,
        "the run ended before the cancel: {reply}"
    );
    let last = stream.last().expect("a final event").expect("event");
    let latency = sent.elapsed().as_secs_f64();
    assert_eq!(last["finish_reason"], "cancelled", "{last}");
    latency
}

/// A client that waits as long as a CPU step may take.
fn patient_client(daemon: &Daemon) -> modeld_wire::Client {
    let client = daemon.client();
    client
        .set_read_timeout(Some(Duration::from_secs(1800)))
        .expect("timeout");
    client
}

fn params() -> Value {
    json!({"model": "sd15", "prompt": "a lighthouse at dusk", "size": "512x512",
           "steps": 2, "guidance": 7.5, "seed": 1})
}

/// Whether `event` is the one after which `stage` runs.
fn begins(event: &Value, stage: &str) -> bool {
    match stage {
        "denoise" => event["stage"] == "encode",
        _ => event["stage"] == "denoise" && event["step"] == event["steps"],
    }
}

fn running_job(daemon: &Daemon) -> u64 {
    let status = daemon.call("status", json!({})).expect("status");
    status["queue"]["jobs"][0]["id"]
        .as_u64()
        .expect("a running job")
}
