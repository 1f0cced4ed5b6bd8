//! Default locations shared by the daemon and its clients, following the
//! systemd and XDG conventions so that both sides find the same socket.

use std::env;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Environment variable that overrides the socket path for every tool.
pub const SOCKET_ENV: &str = "MODELD_SOCKET";
pub const SOCKET_FILE: &str = "modeld.sock";

/// The effective user id, read without libc: `/proc/self` belongs to it.
pub fn effective_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn env_path(name: &str) -> Option<PathBuf> {
    env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Where the daemon listens unless told otherwise.
///
/// Order: `$MODELD_SOCKET`; systemd's `$RUNTIME_DIRECTORY`; `/run/modeld`
/// for root; `$XDG_RUNTIME_DIR/modeld` for a user; `/tmp/modeld-$UID` last.
pub fn default_socket() -> PathBuf {
    if let Some(path) = env_path(SOCKET_ENV) {
        return path;
    }
    // systemd may list several runtime directories separated by ':'.
    if let Some(dirs) = env::var_os("RUNTIME_DIRECTORY").filter(|v| !v.is_empty()) {
        if let Some(first) = env::split_paths(&dirs).next() {
            return first.join(SOCKET_FILE);
        }
    }
    let uid = effective_uid();
    if uid == Some(0) {
        return PathBuf::from("/run/modeld").join(SOCKET_FILE);
    }
    if let Some(dir) = env_path("XDG_RUNTIME_DIR") {
        return dir.join("modeld").join(SOCKET_FILE);
    }
    PathBuf::from(format!("/tmp/modeld-{}", uid.unwrap_or(0))).join(SOCKET_FILE)
}

/// Where the daemon keeps its store: `$STATE_DIRECTORY`, `/var/lib/modeld`
/// for root, `$XDG_STATE_HOME/modeld`, then `~/.local/state/modeld`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dirs) = env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        if let Some(first) = env::split_paths(&dirs).next() {
            return first;
        }
    }
    if effective_uid() == Some(0) {
        return PathBuf::from("/var/lib/modeld");
    }
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return dir.join("modeld");
    }
    home_dir().join(".local/state/modeld")
}

/// The daemon's config file when `--config` is not given; it may be absent,
/// in which case the embedded defaults apply.
pub fn default_config_file() -> PathBuf {
    if let Some(dirs) = env::var_os("CONFIGURATION_DIRECTORY").filter(|v| !v.is_empty()) {
        if let Some(first) = env::split_paths(&dirs).next() {
            return first.join("modeld.toml");
        }
    }
    if effective_uid() == Some(0) {
        return PathBuf::from("/etc/modeld/modeld.toml");
    }
    if let Some(dir) = env_path("XDG_CONFIG_HOME") {
        return dir.join("modeld/modeld.toml");
    }
    home_dir().join(".config/modeld/modeld.toml")
}

pub fn home_dir() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/"))
}
