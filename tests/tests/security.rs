//! A hostile local user: calls from a second uid (authorization, what
//! `models.source` reveals), and the permissions of what the daemon
//! writes. Tests that need a second uid run only as root.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use modeld_e2e::{modeld_bin, Daemon};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

/// Sends one request as `uid` (its group of the same number, no others)
/// through a stdlib Python client and returns the first reply line.
fn call_as(daemon: &Daemon, uid: u32, method: &str, params: Value) -> Value {
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall((json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[2], "params": json.loads(sys.argv[3])}) + "\n").encode())
print(s.makefile().readline())
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&daemon.socket)
        .arg(method)
        .arg(params.to_string())
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON reply")
}

fn error_kind(reply: &Value) -> Option<&str> {
    reply["error"]["data"]["kind"].as_str()
}

/// A daemon whose socket other users can reach; `extra_config` goes in
/// `[server]`.
fn shared_daemon(extra_config: &str) -> Option<Daemon> {
    shared_daemon_with(extra_config)
}

/// A daemon whose socket other users can reach, with `config` after the
/// socket's mode (in `[server]` unless it starts another table).
fn shared_daemon_with(config: &str) -> Option<Daemon> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to call as a second uid");
        return None;
    }
    let config = format!("[server]\nsocket_mode = \"0666\"\n{config}");
    let daemon = Daemon::start_configured(&config, &[]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(daemon)
}

#[test]
fn other_users_may_read_and_generate_but_not_change_anything() {
    let Some(daemon) = shared_daemon("") else {
        return;
    };
    daemon.register_fixture("tiny-llama");
    for (method, params) in [
        ("status", json!({})),
        ("models.list", json!({})),
        ("cache.scan", json!({})),
        ("cache.clean", json!({"detached": true})),
        ("modes.list", json!({})),
    ] {
        let reply = call_as(&daemon, NOBODY, method, params);
        assert!(reply.get("result").is_some(), "{method}: {reply}");
    }
    for (method, params) in [
        ("models.register", json!({"name": "x", "repo": "org/x"})),
        ("models.remove", json!({"name": "tiny-llama"})),
        ("models.pull", json!({"name": "tiny-llama"})),
        ("load", json!({"name": "tiny-llama"})),
        ("unload", json!({"name": "tiny-llama"})),
        ("switch_mode", json!({"mode": "m"})),
        ("cache.clean", json!({"apply": true})),
        ("cache.consolidate", json!({"apply": true})),
        ("cache.rm", json!({"repo": "org/x", "apply": true})),
        ("reload", json!({})),
        ("modes.reload", json!({})),
        ("shutdown", json!({})),
    ] {
        let reply = call_as(&daemon, NOBODY, method, params);
        assert_eq!(error_kind(&reply), Some("forbidden"), "{method}: {reply}");
        assert_eq!(reply["error"]["data"]["uid"], NOBODY);
    }
    let reply = call_as(
        &daemon,
        NOBODY,
        "generate",
        json!({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 2}),
    );
    assert!(reply.get("result").is_some(), "generate is open: {reply}");
    assert_eq!(
        daemon.call("models.list", json!({})).unwrap()["models"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn admin_group_members_may_change_state_and_generation_can_be_closed() {
    let Some(daemon) = shared_daemon("admin_group = \"nogroup\"\nusers_may_generate = false\n")
    else {
        return;
    };
    let reply = call_as(
        &daemon,
        NOBODY,
        "models.register",
        json!({"name": "x", "repo": "org/x"}),
    );
    assert!(
        reply.get("result").is_some(),
        "a member of the admin group: {reply}"
    );
    let reply = call_as(&daemon, 4242, "models.remove", json!({"name": "x"}));
    assert_eq!(error_kind(&reply), Some("forbidden"), "{reply}");
    let reply = call_as(
        &daemon,
        4242,
        "generate",
        json!({"model": "x", "prompt": "Hi"}),
    );
    assert_eq!(error_kind(&reply), Some("forbidden"), "{reply}");
}

#[test]
fn source_does_not_list_files_the_caller_cannot_read() {
    let Some(daemon) = shared_daemon("") else {
        return;
    };
    let private = daemon.dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("secret-plans.safetensors"), b"x").unwrap();
    std::fs::write(private.join("config.json"), b"{}").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "p", "local_path": private}),
        )
        .unwrap();
    let reply = call_as(&daemon, NOBODY, "models.source", json!({"name": "p"}));
    assert!(!reply.to_string().contains("secret-plans"), "{reply}");
    assert!(
        reply["result"]["reason"]
            .as_str()
            .unwrap()
            .contains("hidden"),
        "{reply}"
    );
    let own = daemon.call("models.source", json!({"name": "p"})).unwrap();
    assert!(
        own.to_string().contains("secret-plans"),
        "the owner still sees them"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn state_and_socket_folders_are_private() {
    let mut daemon = Daemon::start();
    daemon
        .call("models.register", json!({"name": "m", "repo": "org/m"}))
        .unwrap();
    assert_eq!(mode_of(&daemon.state_dir), 0o700);
    assert_eq!(mode_of(&daemon.state_dir.join("modeld.lock")), 0o600);
    let registry = daemon.state_dir.join("registry");
    assert_eq!(mode_of(&registry), 0o700);
    for entry in std::fs::read_dir(&registry).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            assert_eq!(mode_of(&entry.path()), 0o600, "{}", entry.path().display());
        }
    }
    daemon.stop();

    // A socket folder the daemon creates itself is private too.
    let socket = daemon.dir.path().join("run/modeld/modeld.sock");
    let mut child = Command::new(modeld_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(daemon.dir.path().join("state2"))
        .arg("--config")
        .arg(&daemon.config)
        .env("HF_HOME", daemon.dir.path().join("hf"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let folder_mode = mode_of(socket.parent().unwrap());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(folder_mode, 0o700);
}

#[test]
fn users_cancel_only_their_own_jobs() {
    // One generation at a time, so the second user's job stays queued.
    let Some(daemon) = shared_daemon("[scheduler]\nmax_batch = 1\n") else {
        return;
    };
    modeld_e2e::synthetic::register_slow_model(&daemon, "slow");
    let long = json!({"model": "slow", "prompt": "a", "max_tokens": 4000});
    // Root's generation runs; nobody's waits behind it.
    let root_job = {
        let mut client = daemon.client();
        let params = long.clone();
        std::thread::spawn(move || client.subscribe("generate", params).unwrap().count())
    };
    let running = wait_for_job(&daemon, None);
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall((json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate", "params": json.loads(sys.argv[2])}) + "\n").encode())
print(s.makefile().readline())
"#;
    let (socket, params) = (daemon.socket.clone(), long.to_string());
    let theirs = std::thread::spawn(move || {
        Command::new("python3")
            .args(["-c", script])
            .arg(socket)
            .arg(params)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
    });
    let queued = wait_for_job(&daemon, Some(NOBODY));

    let reply = call_as(&daemon, NOBODY, "jobs.cancel", json!({"job": running}));
    assert_eq!(error_kind(&reply), Some("forbidden"), "{reply}");
    let reply = call_as(&daemon, NOBODY, "jobs.cancel", json!({"job": queued}));
    assert_eq!(reply["result"]["cancelled"], true, "{reply}");
    let out = theirs.join().unwrap().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    assert_eq!(
        daemon.call("jobs.cancel", json!({"job": running})).unwrap()["cancelled"],
        true,
        "administrators cancel anyone's job"
    );
    root_job.join().unwrap();
}
/// The id of the first job in the queue whose uid is `uid` (any, if none).
fn wait_for_job(daemon: &Daemon, uid: Option<u32>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        let jobs = status["queue"]["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let found = jobs
            .iter()
            .find(|job| uid.is_none_or(|uid| job["uid"] == uid))
            .and_then(|job| job["id"].as_u64());
        if let Some(id) = found {
            return id;
        }
        assert!(Instant::now() < deadline, "no job: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `modes.auto_switch` decides whether a non-administrator's `generate`
/// naming another mode switches the daemon's mode (the default) or is
/// refused; naming the mode in force is always fine.
#[test]
fn auto_switch_follows_the_policy() {
    for (policy, switches) in [("everyone", true), ("admin", false)] {
        let config = format!("[modes]\nauto_switch = \"{policy}\"\n");
        let Some(daemon) = shared_daemon_with(&config) else {
            return;
        };
        daemon.register_fixture("tiny-llama");
        let modes = "[modes.a]\nmodel = \"tiny-llama\"\n[modes.b]\nmodel = \"tiny-llama\"\n";
        std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
        daemon.call("modes.reload", json!({})).unwrap();
        daemon.call("switch_mode", json!({"mode": "a"})).unwrap();
        let generate = |mode: &str| {
            let params = json!({"mode": mode, "prompt": "Hello", "max_tokens": 2});
            call_as(&daemon, NOBODY, "generate", params)
        };
        let same = generate("a");
        assert!(same.get("result").is_some(), "{policy}: {same}");
        let other = generate("b");
        if switches {
            assert!(other.get("result").is_some(), "{policy}: {other}");
        } else {
            assert_eq!(error_kind(&other), Some("forbidden"), "{policy}: {other}");
            let message = other["error"]["message"].as_str().unwrap();
            assert!(message.contains("modes.auto_switch"), "{message}");
        }
    }
}
