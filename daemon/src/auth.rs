//! Who is calling, and what they may do. The peer's uid, gid and groups
//! come from the kernel (`SO_PEERCRED`, then `/proc/<pid>/status`), read
//! once per connection. Methods that change state need an administrator:
//! root, the daemon's own user or a member of `server.admin_group`. Others
//! may read, and may generate unless `server.users_may_generate` is off.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::ServerConfig;

/// The process on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
    pub admin: bool,
}

tokio::task_local! {
    static CALLER: Arc<Caller>;
}

/// Runs `work` with `caller` visible to handlers through [`current`].
pub async fn scope<F: std::future::Future>(caller: Arc<Caller>, work: F) -> F::Output {
    CALLER.scope(caller, work).await
}

/// The caller of the request being handled; `None` outside a request
/// (start-up work, tests calling handlers directly).
pub fn current() -> Option<Arc<Caller>> {
    CALLER.try_with(Arc::clone).ok()
}

impl Caller {
    /// Reads the peer's credentials from a connected socket.
    pub fn of(stream: &tokio::net::UnixStream, config: &ServerConfig) -> std::io::Result<Caller> {
        let cred = stream.peer_cred()?;
        let mut groups = cred.pid().map(proc_groups).unwrap_or_default();
        groups.push(cred.gid());
        groups.sort_unstable();
        groups.dedup();
        let mut caller = Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            groups,
            admin: false,
        };
        caller.admin = caller.is_admin(config.admin_group.as_deref());
        Ok(caller)
    }

    fn is_admin(&self, admin_group: Option<&str>) -> bool {
        if self.uid == 0 || self.uid == nix::unistd::geteuid().as_raw() {
            return true;
        }
        let Some(group) = admin_group.and_then(|name| nix::unistd::Group::from_name(name).ok()?)
        else {
            return false;
        };
        if self.groups.contains(&group.gid.as_raw()) {
            return true;
        }
        // Membership granted after the caller logged in shows only in the
        // group database.
        let user = nix::unistd::User::from_uid(self.uid.into()).ok().flatten();
        user.is_some_and(|user| group.mem.contains(&user.name))
    }

    /// Whether this caller could list `dir` themselves: search permission
    /// on every folder above it, read and search on the folder itself.
    pub fn may_list(&self, dir: &Path) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mut ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
        ancestors.reverse();
        ancestors
            .into_iter()
            .all(|folder| self.permits(folder, 0o1))
            && self.permits(dir, 0o5)
    }

    /// Checks `wanted` (an `rwx` triple of bits) against the class of
    /// `path`'s permissions this caller falls in, following links.
    fn permits(&self, path: &Path, wanted: u32) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let shift = if meta.uid() == self.uid {
            6
        } else if self.groups.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (meta.mode() >> shift) & wanted == wanted
    }
}

/// Supplementary groups of a process, from `/proc/<pid>/status`.
fn proc_groups(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What a method needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Anyone,
    Generate,
    Admin,
}

/// Methods every user may call: those that only read, and `jobs.cancel`,
/// whose handler lets users cancel only their own jobs. Everything not
/// listed here (and not `generate`) needs an administrator, so a new
/// method is closed until it is listed.
const OPEN_TO_ALL: [&str; 16] = [
    "status",
    "vram",
    "metrics",
    "models.list",
    "models.get",
    "models.source",
    "modes.list",
    "jobs.get",
    // Checked per job by its handler: users may cancel their own jobs.
    "jobs.cancel",
    "cache.scan",
    "cache.duplicates",
    "events.subscribe",
    "events.unsubscribe",
    "generate.unsubscribe",
    "models.pull.unsubscribe",
    "rpc.discover",
];

/// Cache methods that only change the disk with `apply: true`.
const DRY_RUN_FIRST: [&str; 3] = ["cache.consolidate", "cache.clean", "cache.rm"];

/// What calling `method` with `params` (raw JSON, if any) needs.
pub fn required(method: &str, params: Option<&str>) -> Access {
    if OPEN_TO_ALL.contains(&method) {
        return Access::Anyone;
    }
    if method == "generate" {
        return Access::Generate;
    }
    if DRY_RUN_FIRST.contains(&method) && !applies(params) {
        return Access::Anyone;
    }
    Access::Admin
}

/// Whether cache params ask to apply. Only absent params or an object
/// whose `apply` is absent or false count as a dry run.
fn applies(params: Option<&str>) -> bool {
    #[derive(Deserialize)]
    struct Apply {
        #[serde(default)]
        apply: bool,
    }
    match params {
        None => false,
        Some(text) if text.trim() == "null" => false,
        Some(text) => serde_json::from_str::<Apply>(text).map_or(true, |p| p.apply),
    }
}

/// Why a call is refused: the method needs an administrator, or users
/// may not generate here.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{method} is not allowed for uid {uid}: {why}")]
pub struct Forbidden {
    pub method: String,
    pub uid: u32,
    pub why: &'static str,
}

/// Refuses a call the caller may not make.
pub fn authorize(
    caller: &Caller,
    method: &str,
    params: Option<&str>,
    config: &ServerConfig,
) -> Result<(), Forbidden> {
    let why = match required(method, params) {
        Access::Anyone => return Ok(()),
        _ if caller.admin => return Ok(()),
        Access::Generate if config.users_may_generate => return Ok(()),
        Access::Generate => "server.users_may_generate is off; ask an administrator",
        Access::Admin => "it changes the daemon's state; only root, the daemon's user and members of server.admin_group may",
    };
    Err(Forbidden {
        method: method.to_string(),
        uid: caller.uid,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_runs_are_reads_and_applies_are_not() {
        assert_eq!(required("cache.clean", None), Access::Anyone);
        assert_eq!(
            required("cache.clean", Some(r#"{"detached":true}"#)),
            Access::Anyone
        );
        assert_eq!(
            required("cache.clean", Some(r#"{"apply":true}"#)),
            Access::Admin
        );
        assert_eq!(required("cache.rm", Some(r#"["org/x"]"#)), Access::Admin);
        assert_eq!(
            required("cache.rm", Some(r#"{"apply":"yes"}"#)),
            Access::Admin
        );
        assert_eq!(required("models.register", None), Access::Admin);
        assert_eq!(required("some.new.method", None), Access::Admin);
        assert_eq!(required("generate", None), Access::Generate);
    }

    #[test]
    fn listing_follows_permission_bits() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("private");
        std::fs::create_dir(&dir).unwrap();
        let owner = std::fs::metadata(&dir).unwrap().uid();
        let stranger = Caller {
            uid: owner.wrapping_add(4242),
            gid: 4242,
            groups: vec![4242],
            admin: false,
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!stranger.may_list(&dir));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(stranger.may_list(&dir));
    }
}
