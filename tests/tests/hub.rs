//! Model files through the daemon: local-first resolution, the HF cache
//! layout, and downloads from a fake Hub with injected faults.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modeld_e2e::fakehub::FakeHub;
use modeld_e2e::{fixtures_dir, kind, Daemon};
use serde_json::{json, Value};

const REPO: &str = "org/tiny-llama";

/// A fake hub serving the tiny-llama fixture, and a daemon pointed at it.
fn setup(config: &str, env: &[(&str, &str)]) -> (FakeHub, Daemon, String) {
    let hub = FakeHub::start();
    let commit = hub.add_repo_from_dir(REPO, &fixtures_dir().join("tiny-llama"));
    let endpoint = hub.endpoint();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("HF_ENDPOINT", &endpoint));
    let daemon = Daemon::start_configured(config, &env);
    daemon
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();
    (hub, daemon, commit)
}

fn last(events: &[Value]) -> &Value {
    events.last().unwrap()
}

fn snapshot(daemon: &Daemon, commit: &str) -> PathBuf {
    daemon
        .hf_cache()
        .join("models--org--tiny-llama/snapshots")
        .join(commit)
}

fn assert_same_as_fixture(dir: &Path) {
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let got = std::fs::read(dir.join(name)).unwrap();
        let want = std::fs::read(fixtures_dir().join("tiny-llama").join(name)).unwrap();
        assert!(got == want, "{name} differs from the fixture");
    }
}

/// The cache blob of the fixture's `model.safetensors`.
fn weights_blob(hub: &FakeHub, daemon: &Daemon) -> PathBuf {
    let sha = hub.sha256_of(REPO, "model.safetensors");
    daemon
        .hf_cache()
        .join("models--org--tiny-llama/blobs")
        .join(sha)
}

fn safetensors_gets(hub: &FakeHub) -> Vec<modeld_e2e::fakehub::Request> {
    hub.downloads_of(&hub.sha256_of(REPO, "model.safetensors"))
}

#[test]
fn pull_writes_the_standard_cache_layout_and_later_resolves_from_it() {
    let (hub, daemon, commit) = setup("", &[]);
    let source = daemon
        .call("models.source", json!({"name": "tiny"}))
        .unwrap();
    assert_eq!(source["source"], "hub");
    assert_eq!(source["download_to"], json!(daemon.hf_cache()));

    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["commit"], commit);
    assert_eq!(events[0]["space"]["status"], "sufficient");
    assert!(events.iter().any(|e| e["event"] == "progress"));
    let done = last(&events);
    assert_eq!(done["event"], "done");
    assert_eq!(done["source"], "hub");
    assert_eq!(done["path"], json!(snapshot(&daemon, &commit)));
    let total = events[0]["total_bytes"].as_u64().unwrap();
    assert_eq!(done["downloaded_bytes"], total);

    // The layout huggingface_hub writes and reads.
    let repo_dir = daemon.hf_cache().join("models--org--tiny-llama");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    let link = std::fs::read_link(snapshot(&daemon, &commit).join("model.safetensors")).unwrap();
    let sha = hub.sha256_of(REPO, "model.safetensors");
    assert_eq!(link, Path::new("../../blobs").join(&sha));
    assert_same_as_fixture(&snapshot(&daemon, &commit));

    let source = daemon
        .call("models.source", json!({"name": "tiny"}))
        .unwrap();
    assert_eq!(source["source"], "cache");
    assert_eq!(source["commit"], commit);
    assert!(source["files"]
        .as_array()
        .unwrap()
        .contains(&json!("model.safetensors")));

    // A second pull checks with the Hub but downloads nothing.
    let before = safetensors_gets(&hub).len();
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["downloaded_bytes"], 0);
    assert_eq!(safetensors_gets(&hub).len(), before);
}

#[test]
fn dropped_connection_resumes_from_the_partial_bytes() {
    let (hub, daemon, commit) = setup("", &[]);
    hub.cut_after(100_000, 1);
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["event"], "done", "{events:?}");
    let gets = safetensors_gets(&hub);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=100000-"));
    assert_same_as_fixture(&snapshot(&daemon, &commit));
}

#[test]
fn kill_9_mid_download_resumes_after_restart() {
    let (hub, mut daemon, commit) = setup("", &[]);
    hub.throttle(Some(100_000));
    let socket = daemon.socket.clone();
    let puller = std::thread::spawn(move || {
        let mut client = modeld_wire::Client::connect(&socket).unwrap();
        let _ = client
            .subscribe("models.pull", json!({"name": "tiny"}))
            .map(|s| s.count());
    });
    let sha = hub.sha256_of(REPO, "model.safetensors");
    let partial = daemon
        .hf_cache()
        .join("models--org--tiny-llama/blobs")
        .join(format!("{sha}.incomplete"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 50_000 {
        assert!(Instant::now() < deadline, "download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill9();
    puller.join().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept >= 50_000);
    assert!(
        !snapshot(&daemon, &commit)
            .join("model.safetensors")
            .exists(),
        "a partial file must never be visible in snapshots/"
    );

    hub.throttle(None);
    daemon.spawn();
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["event"], "done", "{events:?}");
    let resumed = safetensors_gets(&hub)
        .last()
        .unwrap()
        .range
        .clone()
        .unwrap();
    let offset: u64 = resumed
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(offset >= kept, "resumed at {offset}, had {kept}");
    assert!(!partial.exists());
    assert_same_as_fixture(&snapshot(&daemon, &commit));
}

#[test]
fn corrupt_bytes_are_downloaded_again_and_twice_is_an_error() {
    let (hub, daemon, commit) = setup("", &[]);
    hub.corrupt(1);
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["event"], "done", "{events:?}");
    assert_same_as_fixture(&snapshot(&daemon, &commit));

    let (hub, daemon, commit) = setup("", &[]);
    hub.corrupt(2);
    let events = daemon.pull(json!({"name": "tiny"}));
    let end = last(&events);
    assert_eq!(end["event"], "error");
    assert_eq!(end["error"]["data"]["kind"], "corrupt");
    // config.json (not LFS) may have completed; the corrupt file is nowhere.
    let snap = snapshot(&daemon, &commit);
    assert!(!snap.join("model.safetensors").exists());
    let blobs = daemon.hf_cache().join("models--org--tiny-llama/blobs");
    let leftovers: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn damaged_cached_files_are_replaced() {
    let (hub, daemon, commit) = setup("", &[]);
    daemon.pull(json!({"name": "tiny"}));
    let blob = weights_blob(&hub, &daemon);

    // Truncated: caught by the size check of every pull.
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..1000]).unwrap();
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["downloaded_bytes"], bytes.len() as u64);
    assert_same_as_fixture(&snapshot(&daemon, &commit));

    // Same size, different bytes: caught when asked to verify.
    let mut flipped = bytes.clone();
    flipped[500] ^= 0xff;
    std::fs::write(&blob, &flipped).unwrap();
    let events = daemon.pull(json!({"name": "tiny", "verify": true}));
    assert_eq!(last(&events)["event"], "done");
    assert_same_as_fixture(&snapshot(&daemon, &commit));
}

#[test]
fn concurrent_pulls_of_one_repo_download_once() {
    let (hub, daemon, _) = setup("", &[]);
    hub.throttle(Some(400_000));
    let pullers: Vec<_> = (0..3)
        .map(|_| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                let mut client = modeld_wire::Client::connect(&socket).unwrap();
                let events: Vec<Value> = client
                    .subscribe("models.pull", json!({"name": "tiny"}))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                events.last().unwrap().clone()
            })
        })
        .collect();
    for puller in pullers {
        assert_eq!(puller.join().unwrap()["event"], "done");
    }
    assert_eq!(safetensors_gets(&hub).len(), 1);
}

#[test]
fn hub_errors_have_their_own_kinds() {
    let (hub, daemon, _) = setup("[hub]\nretries = 2\n", &[]);
    daemon
        .call(
            "models.register",
            json!({"name": "ghost", "repo": "org/ghost"}),
        )
        .unwrap();
    let events = daemon.pull(json!({"name": "ghost"}));
    assert_eq!(last(&events)["error"]["data"]["kind"], "repo_not_found");

    daemon
        .call(
            "models.register",
            json!({"name": "old", "repo": REPO, "revision": "v0"}),
        )
        .unwrap();
    let events = daemon.pull(json!({"name": "old"}));
    assert_eq!(last(&events)["error"]["data"]["kind"], "revision_not_found");

    hub.gate(REPO, "secret");
    let events = daemon.pull(json!({"name": "tiny"}));
    let error = &last(&events)["error"];
    assert_eq!(error["data"]["kind"], "unauthorized", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("HF_TOKEN"),
        "{error}"
    );

    let err = daemon
        .call("models.pull", json!({"name": "nobody"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_found");
}

#[test]
fn gated_repo_works_with_a_token() {
    let hub = FakeHub::start();
    hub.add_repo_from_dir(REPO, &fixtures_dir().join("tiny-llama"));
    hub.gate(REPO, "secret");
    let endpoint = hub.endpoint();
    let daemon =
        Daemon::start_configured("", &[("HF_ENDPOINT", &endpoint), ("HF_TOKEN", "secret")]);
    daemon
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["event"], "done", "{events:?}");
}

#[test]
fn refuses_a_download_that_does_not_fit() {
    let (hub, daemon, commit) = setup("", &[]);
    hub.claim_size("model.safetensors", 1 << 60);
    let events = daemon.pull(json!({"name": "tiny"}));
    let error = &last(&events)["error"];
    assert_eq!(error["data"]["kind"], "insufficient_space", "{error}");
    assert!(error["data"]["needed_bytes"].as_u64().unwrap() >= 1 << 60);
    assert!(error["data"]["available_bytes"].is_u64());
    assert!(!snapshot(&daemon, &commit).exists(), "nothing written");
}

#[test]
fn network_down_and_offline_mode() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!("http://{closed}");
    let daemon = Daemon::start_configured("[hub]\nretries = 1\n", &[("HF_ENDPOINT", &endpoint)]);
    daemon
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();
    let events = daemon.pull(json!({"name": "tiny"}));
    assert_eq!(
        last(&events)["error"]["data"]["kind"],
        "network",
        "{events:?}"
    );

    let offline =
        Daemon::start_configured("", &[("HF_ENDPOINT", &endpoint), ("HF_HUB_OFFLINE", "1")]);
    offline
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();
    let source = offline
        .call("models.source", json!({"name": "tiny"}))
        .unwrap();
    assert_eq!(source["source"], "unavailable");
    assert!(source["reason"]
        .as_str()
        .unwrap()
        .contains("HF_HUB_OFFLINE"));
    let events = offline.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["error"]["data"]["kind"], "offline");
}

#[test]
fn offline_mode_uses_what_another_tool_cached() {
    // Fill a cache online, then read it offline from a second daemon that
    // shares only HF_HOME: the files another tool downloaded.
    let (_hub, online, commit) = setup("", &[]);
    online.pull(json!({"name": "tiny"}));
    let hf_home = online
        .hf_cache()
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let offline = Daemon::start_configured("", &[("HF_HOME", &hf_home), ("HF_HUB_OFFLINE", "1")]);
    offline
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();
    let source = offline
        .call("models.source", json!({"name": "tiny"}))
        .unwrap();
    assert_eq!(source["source"], "cache");
    assert_eq!(source["commit"], commit);
    let events = offline.pull(json!({"name": "tiny"}));
    assert_eq!(last(&events)["source"], "cache");
}

#[test]
fn local_path_comes_first_and_custom_cache_is_the_target() {
    let (_hub, daemon, commit) = setup("", &[]);
    let local = daemon.dir.path().join("local-model");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::copy(
        fixtures_dir().join("tiny-llama/config.json"),
        local.join("config.json"),
    )
    .unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "mine", "repo": REPO, "local_path": local}),
        )
        .unwrap();
    let source = daemon
        .call("models.source", json!({"name": "mine"}))
        .unwrap();
    assert_eq!(source["source"], "local");
    assert_eq!(source["path"], json!(local));

    let custom = daemon.dir.path().join("custom-cache");
    let cache = format!("custom:{}", custom.display());
    daemon
        .call(
            "models.register",
            json!({"name": "elsewhere", "repo": REPO, "cache": cache}),
        )
        .unwrap();
    let events = daemon.pull(json!({"name": "elsewhere"}));
    let expected = custom
        .join("models--org--tiny-llama/snapshots")
        .join(&commit);
    assert_eq!(last(&events)["path"], json!(expected));
    assert_same_as_fixture(&expected);

    // No secondary cache is configured: refused when registered.
    let err = daemon
        .call(
            "models.register",
            json!({"name": "second", "repo": REPO, "cache": "secondary"}),
        )
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
    assert!(err.to_string().contains("cache.secondary"), "{err}");
}

#[test]
fn pull_checks_space_with_the_real_sizes_not_the_estimate() {
    let (hub, daemon, _) = setup("", &[]);
    let registered = daemon
        .call(
            "models.register",
            json!({"name": "guessed", "repo": REPO, "estimated_size": 1}),
        )
        .unwrap();
    assert_eq!(registered["space"]["needed_bytes"], 1);
    let events = daemon.pull(json!({"name": "guessed"}));
    let space = &events[0]["space"];
    assert_eq!(space["needed_bytes"], events[0]["total_bytes"], "{space}");
    assert!(space["needed_bytes"].as_u64().unwrap() > 100_000, "{space}");
    assert_eq!(space["path"], json!(daemon.hf_cache()));
    assert_eq!(space["status"], "sufficient");

    // The estimate fits; the files the Hub lists do not.
    let custom = daemon.dir.path().join("custom-cache");
    let cache = format!("custom:{}", custom.display());
    let registered = daemon
        .call(
            "models.register",
            json!({"name": "huge", "repo": REPO, "estimated_size": 1000, "cache": cache}),
        )
        .unwrap();
    assert_eq!(registered["space"]["status"], "sufficient");
    hub.claim_size("model.safetensors", 1 << 60);
    let events = daemon.pull(json!({"name": "huge"}));
    let error = &last(&events)["error"];
    assert_eq!(error["data"]["kind"], "insufficient_space", "{error}");
    assert!(error["data"]["needed_bytes"].as_u64().unwrap() >= 1 << 60);
    assert_eq!(error["data"]["path"], json!(custom));
}

#[test]
fn modelctl_source_and_pull() {
    let (_hub, daemon, commit) = setup("", &[]);
    let out = daemon.ctl(&["source", "tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("hub"), "{text}");

    let out = daemon.ctl(&["pull", "tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tiny: hub") && text.contains(&commit),
        "{text}"
    );

    let out = daemon.ctl(&["--json", "pull", "tiny"]);
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["downloaded_bytes"], 0);

    daemon
        .call(
            "models.register",
            json!({"name": "ghost", "repo": "org/ghost"}),
        )
        .unwrap();
    let out = daemon.ctl(&["pull", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("repo_not_found"), "{err}");
}

#[test]
fn a_pull_never_writes_through_a_planted_symlink() {
    let (_hub, daemon, _commit) = setup("", &[]);
    let outside = daemon.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let repo_dir = daemon.hf_cache().join("models--org--tiny-llama");
    std::fs::create_dir_all(&repo_dir).unwrap();
    std::os::unix::fs::symlink(&outside, repo_dir.join("blobs")).unwrap();
    let mut client = daemon.client();
    let events: Vec<Value> = client
        .subscribe("models.pull", json!({"name": "tiny"}))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let end = last(&events);
    assert_eq!(end["event"], "error", "{events:?}");
    assert!(
        end["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symlink"),
        "{end}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
}

/// The `data` of an error reply.
fn error_data(err: &modeld_wire::ClientError) -> Value {
    match err {
        modeld_wire::ClientError::Rpc(obj) => obj.data.clone().unwrap_or_default(),
        other => panic!("not an error reply: {other}"),
    }
}

#[test]
fn damaged_cached_file_is_fetched_again_at_load() {
    let (hub, daemon, commit) = setup("", &[]);
    daemon.pull(json!({"name": "tiny"}));
    let blob = weights_blob(&hub, &daemon);
    let good = std::fs::read(&blob).unwrap();

    // Truncated: a generation loads the model, which fails on the file;
    // the file is fetched again and the generation runs.
    std::fs::write(&blob, &good[..good.len() / 2]).unwrap();
    let before = safetensors_gets(&hub).len();
    let events: Vec<Value> = daemon
        .client()
        .subscribe(
            "generate",
            json!({"model": "tiny", "prompt": "Model", "max_tokens": 2}),
        )
        .expect("generate accepted after the repair")
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(last(&events)["completion_tokens"], 2, "{events:?}");
    assert_eq!(safetensors_gets(&hub).len(), before + 1);
    assert_same_as_fixture(&snapshot(&daemon, &commit));

    // Same size, damaged header: only the hash tells, and it is checked.
    daemon.call("unload", json!({"name": "tiny"})).unwrap();
    let mut damaged = good.clone();
    damaged[..8].copy_from_slice(&[0xff; 8]);
    std::fs::write(&blob, &damaged).unwrap();
    let loaded = daemon.call("load", json!({"name": "tiny"})).unwrap();
    assert_eq!(loaded["model"]["arch"], "llama");
    assert_eq!(safetensors_gets(&hub).len(), before + 2);
    assert_same_as_fixture(&snapshot(&daemon, &commit));
}

#[test]
fn bad_file_on_the_hub_is_load_failed_naming_the_file() {
    let hub = FakeHub::start();
    let fixture = fixtures_dir().join("tiny-llama");
    let mut files = Vec::new();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        files.push((name.to_string(), std::fs::read(fixture.join(name)).unwrap()));
    }
    // The Hub's own copy is cut short: verified downloads reproduce it.
    let weights = &mut files[2].1;
    weights.truncate(weights.len() / 2);
    let commit = hub.add_repo(REPO, files);
    let endpoint = hub.endpoint();
    let daemon = Daemon::start_configured("", &[("HF_ENDPOINT", &endpoint)]);
    daemon
        .call("models.register", json!({"name": "tiny", "repo": REPO}))
        .unwrap();

    let err = daemon.call("load", json!({"name": "tiny"})).unwrap_err();
    assert_eq!(kind(&err), "load_failed", "{err}");
    let file = snapshot(&daemon, &commit).join("model.safetensors");
    assert_eq!(error_data(&err)["file"], json!(file), "{err}");
    let message = err.to_string();
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(message.contains("Hub's file itself is bad"), "{message}");
    // Downloaded once by the pull; the repair found the same bytes.
    assert_eq!(safetensors_gets(&hub).len(), 1);

    let refused = daemon
        .client()
        .subscribe("generate", json!({"model": "tiny", "prompt": "x"}))
        .err()
        .expect("refused");
    assert_eq!(kind(&refused), "load_failed", "{refused}");
    assert_eq!(error_data(&refused)["file"], json!(file));
}

#[test]
fn rm_purge_is_refused_while_downloading() {
    let (hub, daemon, _) = setup("", &[]);
    // Slow, so the download still runs when the purge is asked for.
    hub.throttle(Some(100_000));
    let socket = daemon.socket.clone();
    let puller = std::thread::spawn(move || {
        let mut client = modeld_wire::Client::connect(&socket).unwrap();
        client
            .subscribe("models.pull", json!({"name": "tiny"}))
            .unwrap()
            .count()
    });
    let blobs = daemon.hf_cache().join("models--org--tiny-llama/blobs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !blobs.is_dir() {
        assert!(Instant::now() < deadline, "download never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = daemon
        .call(
            "models.remove",
            json!({"name": "tiny", "purge": true, "apply": true}),
        )
        .unwrap_err();
    assert_eq!(kind(&err), "in_use", "{err}");
    hub.throttle(None);
    puller.join().unwrap();
    daemon.call("models.get", json!({"name": "tiny"})).unwrap();
    let reply = daemon
        .call(
            "models.remove",
            json!({"name": "tiny", "purge": true, "apply": true}),
        )
        .unwrap();
    assert_eq!(reply["removed"]["name"], "tiny");
    assert!(!blobs.exists());
}

/// Changes the last 4 KiB of a safetensors file in place, its size kept:
/// the header still parses, so the load itself would not notice.
fn overwrite_tensor_data(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let end = bytes.len();
    for byte in &mut bytes[end - 4096..] {
        *byte ^= 0x5a;
    }
    std::fs::write(path, &bytes).unwrap();
}

/// The `changed_files` of a load reply, as (path, outcome) pairs.
fn changed_files(reply: &Value) -> Vec<(PathBuf, String)> {
    let Some(files) = reply["changed_files"].as_array() else {
        return Vec::new();
    };
    files
        .iter()
        .map(|f| {
            let path = PathBuf::from(f["path"].as_str().unwrap());
            (path, f["outcome"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn a_blob_changed_in_place_is_hashed_and_fetched_again_before_load() {
    let (hub, daemon, commit) = setup("", &[]);
    daemon.pull(json!({"name": "tiny"}));
    let blob = weights_blob(&hub, &daemon);
    let file = snapshot(&daemon, &commit).join("model.safetensors");
    let before = safetensors_gets(&hub).len();

    // Rewritten with the same bytes: its times changed, so it is hashed,
    // and it still matches.
    std::fs::write(&blob, std::fs::read(&blob).unwrap()).unwrap();
    let loaded = daemon.call("load", json!({"name": "tiny"})).unwrap();
    assert_eq!(
        changed_files(&loaded),
        [(file.clone(), "unchanged".to_string())],
        "{loaded}"
    );
    assert_eq!(safetensors_gets(&hub).len(), before);
    daemon.call("unload", json!({"name": "tiny"})).unwrap();

    // Some KiB of tensor data changed, size kept: fetched again.
    overwrite_tensor_data(&blob);
    let loaded = daemon.call("load", json!({"name": "tiny"})).unwrap();
    assert_eq!(
        changed_files(&loaded),
        [(file.clone(), "refetched".to_string())],
        "{loaded}"
    );
    assert_eq!(safetensors_gets(&hub).len(), before + 1);
    assert_same_as_fixture(&snapshot(&daemon, &commit));

    // The fetched blob was recorded as checked: the next load hashes nothing.
    daemon.call("unload", json!({"name": "tiny"})).unwrap();
    let loaded = daemon.call("load", json!({"name": "tiny"})).unwrap();
    assert!(changed_files(&loaded).is_empty(), "{loaded}");
    assert_eq!(safetensors_gets(&hub).len(), before + 1);

    // modelctl says so too.
    daemon.call("unload", json!({"name": "tiny"})).unwrap();
    overwrite_tensor_data(&blob);
    let out = daemon.ctl(&["load", "tiny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("fetched again") && text.contains("model.safetensors"),
        "{text}"
    );
}

#[test]
fn a_changed_local_file_is_reported_and_never_fetched() {
    let (hub, daemon, _commit) = setup("", &[]);
    let local = daemon.dir.path().join("local-tiny");
    modeld_e2e::copy_tree(&fixtures_dir().join("tiny-llama"), &local);
    // A repo to fetch from exists, but the local path comes first.
    daemon
        .call(
            "models.register",
            json!({"name": "mine", "repo": REPO, "local_path": local}),
        )
        .unwrap();
    daemon.pull(json!({"name": "mine", "verify": true}));
    let weights = local.join("model.safetensors");
    overwrite_tensor_data(&weights);
    let changed = std::fs::read(&weights).unwrap();

    let entry = scan_entry(&daemon, &local);
    assert_eq!(entry["changed_files"], json!([weights]), "{entry}");

    let before = safetensors_gets(&hub).len();
    let loaded = daemon.call("load", json!({"name": "mine"})).unwrap();
    assert_eq!(
        changed_files(&loaded),
        [(weights.clone(), "modified".to_string())],
        "{loaded}"
    );
    assert_eq!(safetensors_gets(&hub).len(), before, "never fetched");
    assert_eq!(std::fs::read(&weights).unwrap(), changed, "never written");

    // Reported until a verify takes the new bytes as the checked ones.
    let entry = scan_entry(&daemon, &local);
    assert_eq!(entry["changed_files"], json!([weights]), "{entry}");
    daemon.pull(json!({"name": "mine", "verify": true}));
    let entry = scan_entry(&daemon, &local);
    assert!(entry.get("changed_files").is_none(), "{entry}");
}

/// The `cache.scan` entry whose path is `path`.
fn scan_entry(daemon: &Daemon, path: &Path) -> Value {
    let scan = daemon.call("cache.scan", json!({})).unwrap();
    scan["roots"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|root| root["repos"].as_array().unwrap())
        .find(|repo| repo["path"] == json!(path))
        .unwrap_or_else(|| panic!("no scan entry for {}: {scan}", path.display()))
        .clone()
}
