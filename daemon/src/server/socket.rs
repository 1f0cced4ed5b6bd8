//! Binding the Unix socket: refuse when a live daemon answers on it, replace
//! a stale file, set mode and group, and remove the file again on exit.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another modeld is already listening on {}; stop it first or pass a different --socket", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("unknown group {group:?} for the socket (server.socket_group)")]
    UnknownGroup { group: String },
    #[error("cannot set up socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The bound socket; dropping it removes the file if it is still ours.
pub struct BoundSocket {
    pub listener: UnixListener,
    path: PathBuf,
    inode: u64,
}

impl BoundSocket {
    pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<Self, SocketError> {
        let io_err = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        if let Some(group) = group {
            let gid = nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| SocketError::UnknownGroup {
                    group: group.to_string(),
                })?
                .gid;
            std::os::unix::fs::chown(path, None, Some(gid.as_raw())).map_err(io_err)?;
        }
        let inode = std::fs::metadata(path).map_err(io_err)?.ino();
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A socket file nobody answers on is left over from a crash: remove it.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_path_buf(),
        }),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        // Only remove the file we created: a successor may have bound anew.
        let ours = std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
