//! `modelctl` against a real daemon: tables, `--json`, exit codes.

use modeld_e2e::{modelctl_bin, Daemon};
use serde_json::Value;

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn register_list_show_rm() {
    let secondary = tempfile::tempdir().unwrap();
    let config = format!("[cache]\nsecondary = {:?}\n", secondary.path());
    let daemon = Daemon::start_configured(&config, &[]);
    let out = daemon.ctl(&[
        "register",
        "llama",
        "--repo",
        "meta-llama/Llama-3.2-1B",
        "--size",
        "2.5M",
        "--file",
        "*.safetensors",
        "--file",
        "*.json",
        "--cache",
        "secondary",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "registered llama");

    let out = daemon.ctl(&["list"]);
    let table = stdout(&out);
    assert!(
        table.contains("NAME") && table.contains("llama") && table.contains("2.5 MiB"),
        "{table}"
    );
    assert!(table.contains("secondary"), "{table}");

    let out = daemon.ctl(&["--json", "show", "llama"]);
    let model: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(model["estimated_size"], 5u64 << 19);
    assert_eq!(
        model["files"],
        serde_json::json!(["*.safetensors", "*.json"])
    );

    let out = daemon.ctl(&["ls", "--json"]);
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["models"].as_array().unwrap().len(), 1);

    let out = daemon.ctl(&["rm", "llama"]);
    assert!(out.status.success());
    let out = daemon.ctl(&["rm", "llama"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no model named \"llama\""),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&daemon.ctl(&["list"])).contains("no models registered"));
}

#[test]
fn relative_local_path_is_made_absolute() {
    let daemon = Daemon::start();
    let out = std::process::Command::new(modelctl_bin())
        .current_dir(daemon.dir.path())
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "--json",
            "register",
            "mine",
            "--local-path",
            "weights",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let expected = daemon.dir.path().join("weights");
    assert_eq!(reply["model"]["local_path"], expected.to_str().unwrap());
}

#[test]
fn bad_input_fails_with_the_field_named() {
    let daemon = Daemon::start();
    let out = daemon.ctl(&["register", "x", "--repo", "not/a/repo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("repo"), "{}", stderr(&out));
    let out = daemon.ctl(&["register", "x", "--repo", "a/b", "--size", "lots"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects bad sizes");
    assert!(stderr(&out).contains("--size"), "{}", stderr(&out));
}

#[test]
fn status_and_vram_print_tables_and_json() {
    let daemon = Daemon::start();
    let out = daemon.ctl(&["status"]);
    let text = stdout(&out);
    assert!(
        text.contains("version") && text.contains("uptime"),
        "{text}"
    );
    let out = daemon.ctl(&["status", "--json"]);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(status["pid"].is_u64());

    let out = daemon.ctl(&["vram"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("system RAM"), "{}", stdout(&out));
    let out = daemon.ctl(&["vram", "--json"]);
    let vram: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(vram["system"]["total_bytes"].as_u64().unwrap() > 0);
    // Without NVML there are no GPUs, and the reason is given.
    if vram["nvml"]["available"] == false {
        assert!(vram["gpus"].as_array().unwrap().is_empty());
        assert!(vram["nvml"]["reason"].is_string());
    }
}

#[test]
fn daemon_not_running_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = std::process::Command::new(modelctl_bin())
        .args(["--socket", socket.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not running") && err.contains("modeld"),
        "{err}"
    );
}

#[test]
fn shutdown_and_reload_commands() {
    let mut daemon = Daemon::start();
    let out = daemon.ctl(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("reloaded"));
    let out = daemon.ctl(&["shutdown"]);
    assert!(out.status.success());
    assert!(daemon
        .wait_exit(std::time::Duration::from_secs(30))
        .success());
}
