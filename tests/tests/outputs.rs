//! Pictures that never lie: a request's pictures are all written or none,
//! an acknowledged cancel leaves nothing, a kill or a full disk leaves no
//! partial file, a job past `scheduler.max_job_s` is stopped, and a
//! shutdown gives every client its final event.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modeld_e2e::Daemon;
use modeld_wire::ClientError;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

fn image_daemon(config: &str) -> Daemon {
    let daemon = Daemon::start_configured(config, &[]);
    daemon.register_fixture("tiny-sd");
    daemon
}

fn output_dir(daemon: &Daemon) -> PathBuf {
    daemon.state_dir.join("images")
}

/// Every name in `dir`, hidden ones included; none when it is missing.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<(String, u64)> = entries
        .map(|entry| {
            let entry = entry.expect("entry");
            let size = entry.metadata().expect("metadata").len();
            (entry.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    names.sort();
    names
}

/// The id of the one job running now.
fn running_job(daemon: &Daemon) -> u64 {
    let status = daemon.call("status", json!({})).unwrap();
    status["queue"]["jobs"][0]["id"]
        .as_u64()
        .expect("a running job")
}

fn is_last_progress(event: &Value, count: u64) -> bool {
    event["event"] == "progress" && event["stage"] == "decode" && event["step"] == count
}

/// A cancel that lands right after the last progress event races the
/// writing of the pictures: whichever wins, the answer and the files agree.
#[test]
fn an_acknowledged_cancel_never_leaves_pictures() {
    let daemon = image_daemon("");
    daemon.call("load", json!({"name": "tiny-sd"})).unwrap();
    let count = 8;
    let params =
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64", "steps": 2, "count": count});
    for attempt in 0..4 {
        let before = listing(&output_dir(&daemon)).len();
        let mut client = daemon.client();
        let mut stream = client.subscribe("generate", params.clone()).unwrap();
        let job = running_job(&daemon);
        let mut events = Vec::new();
        for event in stream.by_ref() {
            let event = event.expect("event");
            let last = is_last_progress(&event, count);
            events.push(event);
            if last {
                break;
            }
        }
        let reply = daemon.call("jobs.cancel", json!({"job": job})).unwrap();
        let rest: Vec<Value> = stream.collect::<Result<_, _>>().expect("stream");
        let done = rest.last().expect("a final event");
        let written = listing(&output_dir(&daemon)).len() - before;
        if reply["cancelled"] == true {
            assert_eq!(done["finish_reason"], "cancelled", "{attempt}: {done}");
            assert_eq!(done["images"], json!([]), "{attempt}");
            assert_eq!(written, 0, "{attempt}: a cancel answered true left files");
        } else {
            assert_eq!(done["finish_reason"], "length", "{attempt}: {done}");
            assert_eq!(written, count as usize, "{attempt}");
        }
    }
}

/// A kill while pictures are being made and written leaves no partial or
/// empty file once the daemon has started again, and what a crash left
/// under a temporary name is removed.
#[test]
fn a_killed_daemon_leaves_no_partial_picture() {
    let mut daemon = image_daemon("");
    let dir = output_dir(&daemon);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".20261206-000000-seed1-0.png.modeld-partial"), b"").unwrap();
    daemon.call("load", json!({"name": "tiny-sd"})).unwrap();
    let mut client = daemon.client();
    let params =
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "64x64", "steps": 2, "count": 8});
    let mut stream = client.subscribe("generate", params).unwrap();
    for event in stream.by_ref() {
        if event.expect("event")["stage"] == "decode" {
            break;
        }
    }
    daemon.kill9();
    daemon.spawn();
    let files = listing(&dir);
    assert!(
        files
            .iter()
            .all(|(name, size)| name.ends_with(".png") && *size > 0),
        "{files:?}"
    );
    assert!(
        files.is_empty() || files.len() == 8,
        "all or none: {files:?}"
    );
}

/// With writes failing past a size (a disk that is full), the request
/// fails with an `io` error naming the path, and nothing of it remains.
#[test]
fn a_full_disk_leaves_no_file_of_the_request() {
    let daemon = Daemon::start_with_file_size_limit("", 24 << 10);
    daemon.register_fixture("tiny-sd");
    let params =
        json!({"model": "tiny-sd", "prompt": "a cat", "size": "128x128", "steps": 1, "count": 4});
    let error = final_error(&daemon, params);
    assert_eq!(error["data"]["kind"], "io", "{error}");
    let path = error["data"]["path"].as_str().expect("the path");
    assert!(
        path.starts_with(&*output_dir(&daemon).to_string_lossy()),
        "{error}"
    );
    assert_eq!(listing(&output_dir(&daemon)), Vec::new());
    let status = daemon.call("status", json!({})).unwrap();
    assert!(status["queue"].is_object(), "still serving: {status}");
}

/// The error object a generation that was accepted ended with.
fn final_error(daemon: &Daemon, params: Value) -> Value {
    let events = daemon.generate_events(params);
    let last = events.last().expect("a final event");
    assert_eq!(last["event"], "error", "{last}");
    last["error"].clone()
}

/// A job running past `scheduler.max_job_s` ends with a `timeout` error
/// naming the key and its limit, promptly. (A picture that long on the CPU
/// is refused before it starts, so a long text generation runs past it.)
#[test]
fn a_job_past_max_job_s_is_stopped() {
    let daemon = Daemon::start_configured("[scheduler]\nmax_job_s = 1\n", &[]);
    modeld_e2e::synthetic::register_slow_model(&daemon, "slow");
    let params = json!({"model": "slow", "prompt": "a b c", "max_tokens": 4000, "temperature": 0});
    let started = Instant::now();
    let error = final_error(&daemon, params);
    let data = &error["data"];
    assert_eq!(data["kind"], "timeout", "{error}");
    assert_eq!(data["field"], "scheduler.max_job_s", "{data}");
    assert_eq!(data["limit"], 1, "{data}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The error is sent when the limit passes; the worker lets go of the
    // job at its next step, which a busy machine may delay a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        if status["queue"]["jobs"] == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not move on: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On the CPU a picture estimated to take longer than `max_job_s` is
/// refused before it starts, naming what to lower (here the steps: one
/// step at 448x448 takes about 100 s on a 2-core machine, 150 of them
/// hours), and writes nothing.
#[test]
fn a_picture_past_max_job_s_is_refused_up_front() {
    let daemon = image_daemon("[scheduler]\nmax_job_s = 600\n");
    let params = json!({"model": "tiny-sd", "prompt": "a cat", "size": "448x448", "steps": 150});
    let err = match daemon.client().subscribe("generate", params) {
        Ok(stream) => panic!("accepted: {:?}", stream.collect::<Vec<_>>()),
        Err(err) => err,
    };
    let ClientError::Rpc(object) = &err else {
        panic!("not an RPC error: {err}")
    };
    let data = object.data.clone().unwrap_or_default();
    assert_eq!(data["kind"], "invalid_params", "{err}");
    assert_eq!(data["field"], "steps", "{data}");
    assert!(
        data["limit"]["max"].as_u64().is_some_and(|max| max < 150),
        "{data}"
    );
    assert!(
        object.message.contains("scheduler.max_job_s (600 s)"),
        "{}",
        object.message
    );
    assert_eq!(listing(&output_dir(&daemon)), Vec::new());
}

/// SIGTERM during a long picture: the client gets its final event before
/// the connection closes, and the process exits soon after the grace.
#[test]
fn a_shutdown_during_a_picture_answers_its_client() {
    let mut daemon = image_daemon("[server]\nshutdown_grace_s = 1\n");
    daemon.call("load", json!({"name": "tiny-sd"})).unwrap();
    let mut client = daemon.client();
    let params = json!({"model": "tiny-sd", "prompt": "a cat", "size": "128x128", "steps": 150});
    let mut stream = client.subscribe("generate", params).unwrap();
    stream.next().expect("first event").expect("progress");
    let stopping = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let events: Vec<Value> = stream.collect::<Result<_, _>>().expect("stream");
    let last = events.last().expect("a final event, not a bare EOF");
    assert_eq!(last["done"], true, "{last}");
    let ended = match last["event"].as_str() {
        Some("error") => last["error"]["data"]["kind"].clone(),
        _ => last["finish_reason"].clone(),
    };
    assert!(ended == "cancelled" || ended == "shutting_down", "{last}");
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
    let waited = stopping.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "took {waited:?} with a 1 s grace"
    );
}
