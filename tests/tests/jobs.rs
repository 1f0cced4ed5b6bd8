//! Jobs of the queue, end to end: what `jobs.cancel` promises, `jobs.get`
//! and waiting for mode switches.

use std::time::{Duration, Instant};

use modeld_e2e::{kind, Daemon};
use serde_json::{json, Value};

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
/// as `cancelled`, never as `length`. The race is narrow (about one round
/// in a hundred landed in it before the fix), hence the many rounds.
#[test]
fn an_acknowledged_cancel_always_reaches_the_client() {
    let daemon = Daemon::start();
    daemon.register_fixture("tiny-llama");
    daemon.call("load", json!({"name": "tiny-llama"})).unwrap();
    let mut control = daemon.client();
    let mut acknowledged = 0;
    let mut last_job = 0;
    for round in 0..600 {
        let socket = daemon.socket.clone();
        let max_tokens = 1 + round % 3;
        let generation = std::thread::spawn(move || {
            let mut client = modeld_wire::Client::connect(&socket).unwrap();
            let params =
                json!({"model": "tiny-llama", "prompt": "Model", "max_tokens": max_tokens});
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
        }
    }
    assert!(acknowledged > 0, "no cancel landed while a job ran");
}
