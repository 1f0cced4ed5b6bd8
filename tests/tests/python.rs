//! The stdlib-only Python client against a real daemon.

use std::path::Path;
use std::process::Command;

use modeld_e2e::Daemon;

#[test]
fn python_client_suite_passes() {
    let daemon = Daemon::start();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let output = Command::new("python3")
        .arg("-m")
        .arg("unittest")
        .arg("-v")
        .arg("test_modeld_client")
        .current_dir(&dir)
        .env("MODELD_SOCKET", &daemon.socket)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 must be installed");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python client tests failed:\n{log}"
    );
    assert!(log.contains("Ran 5 tests"), "{log}");
}
