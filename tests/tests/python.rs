//! The stdlib-only Python client against a real daemon.

use std::path::Path;
use std::process::Command;

use modeld_e2e::fakehub::FakeHub;
use modeld_e2e::{fixtures_dir, Daemon};
use serde_json::json;

#[test]
fn python_client_suite_passes() {
    let hub = FakeHub::start();
    hub.add_repo_from_dir("org/tiny-qwen2", &fixtures_dir().join("tiny-qwen2"));
    let daemon = Daemon::start_configured("", &[("HF_ENDPOINT", &hub.endpoint())]);
    daemon
        .call(
            "models.register",
            json!({"name": "qwen", "repo": "org/tiny-qwen2"}),
        )
        .unwrap();
    daemon.register_fixture("tiny-sd");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let output = Command::new("python3")
        .arg("-m")
        .arg("unittest")
        .arg("-v")
        .arg("test_modeld_client")
        .current_dir(&dir)
        .env("MODELD_SOCKET", &daemon.socket)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("MODELD_PULL_MODEL", "qwen")
        .env("MODELD_IMAGE_MODEL", "tiny-sd")
        .output()
        .expect("python3 must be installed");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client tests failed:\n{log}"
    );
    assert!(
        log.contains("Ran 8 tests") && !log.contains("skipped"),
        "{log}"
    );
}
