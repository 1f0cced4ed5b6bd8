//! Process lifecycle: sockets, locks, signals, reload and systemd
//! notifications, exercised on the real binary.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::Duration;

use modeld_e2e::{kind, model, Daemon};
use nix::sys::signal::Signal;
use serde_json::json;

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut daemon = Daemon::start();
    let mut subscriber = daemon.client();
    let mut events = subscriber.subscribe("events.subscribe", json!({})).unwrap();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!daemon.socket.exists(), "socket file left behind");
    let last = events.next().unwrap().unwrap();
    assert_eq!(last["event"], "shutting_down");
    assert!(events.next().is_none(), "stream should end with the daemon");
}

#[test]
fn shutdown_rpc_answers_then_exits() {
    let mut daemon = Daemon::start();
    let reply = daemon.call("shutdown", json!({})).unwrap();
    assert_eq!(reply["stopping"], true);
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    assert!(!daemon.socket.exists());
}

#[test]
fn socket_is_group_writable_only() {
    let daemon = Daemon::start();
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn stale_socket_is_replaced() {
    let mut daemon = Daemon::start();
    daemon.kill9();
    assert!(daemon.socket.exists(), "kill -9 leaves the socket file");
    daemon.spawn();
    daemon.call("status", json!({})).unwrap();

    // A socket file left by some other program that no longer listens.
    let other = Daemon::start();
    let mut other = other;
    other.stop();
    drop(UnixListener::bind(&other.socket).unwrap());
    other.spawn();
    other.call("status", json!({})).unwrap();
}

#[test]
fn second_daemon_on_a_live_socket_exits_with_a_clear_message() {
    let daemon = Daemon::start();
    let mut second = daemon.command();
    second
        .arg("--state-dir")
        .arg(daemon.dir.path().join("other-state"));
    let output = second.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
    daemon
        .call("status", json!({}))
        .expect("first daemon unharmed");
}

#[test]
fn two_daemons_never_share_a_state_dir() {
    let daemon = Daemon::start();
    let mut second = daemon.command();
    second
        .arg("--socket")
        .arg(daemon.dir.path().join("other.sock"));
    let output = second.output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let pid = daemon.pid().to_string();
    assert!(
        stderr.contains("in use by another modeld") && stderr.contains(&pid),
        "{stderr}"
    );
    daemon.call("models.register", model("still-fine")).unwrap();
}

#[test]
fn bad_config_at_start_names_the_field() {
    let daemon = Daemon::start();
    let path = daemon.dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nmax_connections = 0\n").unwrap();
    let output = daemon
        .command()
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server.max_connections"), "{stderr}");

    let missing = daemon.dir.path().join("missing.toml");
    let output = daemon
        .command()
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("missing.toml"),
        "{stderr}"
    );
}

#[test]
fn sighup_and_rpc_reload_keep_the_old_config_on_error() {
    let daemon = Daemon::start();
    std::fs::write(&daemon.config, "[server]\nmax_request_bytes = 2048\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    let status = wait_for_reloads(&daemon, 1);
    assert_eq!(status["config"]["last_error"], json!(null));

    // New connections get the new limit.
    let mut client = daemon.client();
    client
        .send_line(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"status","pad":"{}"}}"#,
            "x".repeat(4096)
        ))
        .unwrap();
    let reply = client.read_message().unwrap();
    assert_eq!(reply["error"]["data"]["limit"], 2048);

    std::fs::write(&daemon.config, "[server\nbroken").unwrap();
    daemon.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        if status["config"]["last_error"].is_string() {
            assert_eq!(status["config"]["reloads"], 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bad reload not reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = daemon.call("reload", json!({})).unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
    assert!(err.to_string().contains("modeld.toml"), "{err}");
    // The old limit is still in force.
    let mut client = daemon.client();
    client
        .send_line(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"status","pad":"{}"}}"#,
            "x".repeat(4096)
        ))
        .unwrap();
    assert_eq!(
        client.read_message().unwrap()["error"]["data"]["limit"],
        2048
    );

    std::fs::write(&daemon.config, "").unwrap();
    let reply = daemon.call("reload", json!({})).unwrap();
    assert_eq!(reply["reloads"], 2);
}

fn wait_for_reloads(daemon: &Daemon, reloads: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        if status["config"]["reloads"] == reloads {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not seen: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn systemd_notifications_follow_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut daemon = Daemon::start_with(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut messages = String::new();
    let read_until = |messages: &mut String, needle: &str| {
        let mut buf = [0u8; 4096];
        while !messages.contains(needle) {
            let n = notify.recv(&mut buf).expect("notification");
            messages.push_str(&String::from_utf8_lossy(&buf[..n]));
            messages.push('\n');
        }
    };
    read_until(&mut messages, "READY=1");
    daemon.signal(Signal::SIGHUP);
    read_until(&mut messages, "RELOADING=1");
    assert!(messages.contains("MONOTONIC_USEC="), "{messages}");
    daemon.stop();
    read_until(&mut messages, "STOPPING=1");
}

fn long_generation() -> serde_json::Value {
    json!({"model": "slow", "prompt": "a b c", "max_tokens": 4000, "temperature": 0})
}

#[test]
fn shutdown_grace_is_enforced_and_late_requests_are_answered() {
    // One generation at a time, so the later ones stay queued.
    let config = "[server]\nshutdown_grace_s = 1\n[scheduler]\nmax_batch = 1\n";
    let mut daemon = Daemon::start_configured(config, &[]);
    modeld_e2e::synthetic::register_slow_model(&daemon, "slow");
    // The running generation streams before the others are queued, so
    // they are certain to wait behind it.
    let (started, first_token) = std::sync::mpsc::channel();
    let running = {
        let mut client = daemon.client();
        std::thread::spawn(move || -> Vec<serde_json::Value> {
            let mut events = client.subscribe("generate", long_generation()).unwrap();
            let first = events.next().unwrap().unwrap();
            started.send(()).unwrap();
            std::iter::once(first)
                .chain(events.map(|e| e.unwrap()))
                .collect()
        })
    };
    first_token.recv_timeout(Duration::from_secs(30)).unwrap();
    let queued: Vec<_> = (0..3)
        .map(|_| {
            let mut client = daemon.client();
            std::thread::spawn(move || {
                client
                    .subscribe("generate", long_generation())
                    .err()
                    .map(|e| kind(&e).to_string())
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.call("status", json!({})).unwrap();
        if status["queue"]["jobs"].as_array().map_or(0, Vec::len) == 4 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Accepted before the signal (a connection still in the listen
    // backlog is reset when the socket closes).
    let mut open = daemon.client();
    open.call_value("status", json!({})).unwrap();
    let stopping = std::time::Instant::now();
    daemon.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let late = open.call_value("status", json!({})).unwrap_err();
    assert_eq!(kind(&late), "shutting_down", "{late:?}");
    for job in queued {
        assert_eq!(job.join().unwrap().as_deref(), Some("shutting_down"));
    }
    assert!(daemon.wait_exit(Duration::from_secs(15)).success());
    let waited = stopping.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "took {waited:?} with a 1 s grace"
    );
    let events = running.join().unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["finish_reason"], "cancelled", "{last}");
}
