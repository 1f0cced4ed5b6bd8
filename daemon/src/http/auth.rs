//! Who an HTTP request comes from. On the HTTP Unix socket the caller is
//! the peer's uid, read from the kernel exactly as on the JSON-RPC socket
//! (`auth::Caller::of`). On TCP it is the API key in `Authorization:
//! Bearer KEY`, looked up in `[http] keys_file`; without a key, only a
//! loopback listener with `allow_anonymous` lets the request in, as a
//! non-administrator. Either way the handlers then see an ordinary
//! [`Caller`], so what a key may do follows the same rules as a uid.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::Caller;

/// Where a connection came in, fixed when it is accepted.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The HTTP Unix socket: the kernel said who it is.
    Unix(Arc<Caller>),
    /// A TCP listener; `loopback` when it is bound to a loopback address.
    Tcp { loopback: bool },
}

/// Why the keys file cannot be used; the daemon refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read http.keys_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "http.keys_file {} is readable by others (mode {mode:04o}); run chmod 600 on it",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("invalid http.keys_file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// One API key's holder, as the keys file names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Holder {
    name: String,
    #[serde(default)]
    admin: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: std::collections::BTreeMap<String, Holder>,
}

/// A key as it is kept: its sha256, so every comparison is over 32 bytes
/// whatever the key's length.
struct Entry {
    digest: [u8; 32],
    holder: Arc<Caller>,
}

/// The API keys, read once at start-up.
#[derive(Default)]
pub struct Keys {
    entries: Vec<Entry>,
}

impl Keys {
    /// Reads `path`, refusing a file group or others may read: the keys
    /// are passwords.
    pub fn load(path: &Path) -> Result<Keys, KeysError> {
        let read_error = |source| KeysError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_error)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeysError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        // The parser's message may quote the offending line: a key.
        let file: KeysFile = toml::from_str(&text).map_err(|err| KeysError::Parse {
            path: path.to_path_buf(),
            message: err.message().to_string(),
        })?;
        let entries = file
            .keys
            .into_iter()
            .map(|(key, holder)| Entry {
                digest: Sha256::digest(key.as_bytes()).into(),
                holder: Arc::new(key_caller(&holder.name, holder.admin)),
            })
            .collect();
        Ok(Keys { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The holder of `presented`. Every key is compared, each in constant
    /// time, so how long this takes says nothing about how close a guess
    /// came.
    pub fn holder(&self, presented: &str) -> Option<Arc<Caller>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry.holder.clone());
            }
        }
        found
    }
}

/// The uid that anonymous TCP callers get: `(uid_t) -1`, never a user's.
pub const ANONYMOUS_UID: u32 = u32::MAX;

/// A key holder as a caller: a uid of its own above 2^31 (no account has
/// one there), derived from the name so it is the same after a restart,
/// and which jobs.cancel and `status` use as for any uid.
fn key_caller(name: &str, admin: bool) -> Caller {
    let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let uid = 0x8000_0000 | (hash & 0x7fff_fffe);
    Caller {
        uid,
        gid: uid,
        groups: Vec::new(),
        admin,
    }
}

/// The caller a keyless request on a loopback listener becomes.
pub fn anonymous() -> Arc<Caller> {
    Arc::new(Caller {
        uid: ANONYMOUS_UID,
        gid: ANONYMOUS_UID,
        groups: Vec::new(),
        admin: false,
    })
}

/// Why a TCP request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No `Authorization` header, and anonymous access is off here.
    Missing,
    /// A key that is not in the keys file, or a malformed header.
    WrongKey,
}

/// The caller of a request from `peer` with this `Authorization` header.
pub fn resolve(
    peer: &Peer,
    authorization: Option<&str>,
    keys: &Keys,
    allow_anonymous: bool,
) -> Result<Arc<Caller>, Refused> {
    let loopback = match peer {
        Peer::Unix(caller) => return Ok(caller.clone()),
        Peer::Tcp { loopback } => *loopback,
    };
    let Some(header) = authorization else {
        return match allow_anonymous && loopback {
            true => Ok(anonymous()),
            false => Err(Refused::Missing),
        };
    };
    let key = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or(Refused::WrongKey)?;
    keys.holder(key).ok_or(Refused::WrongKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    const KEYS: &str = "[keys]\n\"sk-alice\" = { name = \"alice\", admin = true }\n\"sk-bob\" = { name = \"bob\" }\n";

    #[test]
    fn readable_keys_files_are_refused() {
        let (_dir, path) = keys_file(KEYS, 0o644);
        let err = Keys::load(&path).err().expect("refused");
        assert!(
            matches!(err, KeysError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        let (_dir, path) = keys_file(KEYS, 0o640);
        assert!(Keys::load(&path).is_err());
    }

    #[test]
    fn keys_name_their_holder() {
        let (_dir, path) = keys_file(KEYS, 0o600);
        let keys = Keys::load(&path).unwrap();
        assert_eq!(keys.len(), 2);
        let alice = keys.holder("sk-alice").unwrap();
        assert!(alice.admin && alice.uid >= 0x8000_0000);
        let bob = keys.holder("sk-bob").unwrap();
        assert!(!bob.admin && bob.uid != alice.uid);
        assert!(keys.holder("sk-alic").is_none());
        assert!(keys.holder("").is_none());
    }

    #[test]
    fn anonymous_callers_only_on_loopback() {
        let keys = Keys::default();
        let local = Peer::Tcp { loopback: true };
        let remote = Peer::Tcp { loopback: false };
        assert_eq!(
            resolve(&local, None, &keys, false).err(),
            Some(Refused::Missing)
        );
        assert!(resolve(&local, None, &keys, true).is_ok_and(|c| !c.admin));
        assert_eq!(
            resolve(&remote, None, &keys, true).err(),
            Some(Refused::Missing)
        );
        assert_eq!(
            resolve(&local, Some("Bearer nope"), &keys, true).err(),
            Some(Refused::WrongKey)
        );
    }
}
