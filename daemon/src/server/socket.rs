//! Binding the Unix socket: refuse when a live daemon answers on it, replace
//! a stale file, set mode and group, and remove the file again on exit.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
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
        let gid = group.map(group_id).transpose()?;
        if let Some(parent) = path.parent() {
            create_socket_dir(parent, mode, gid).map_err(io_err)?;
        }
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err)?;
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

fn group_id(group: &str) -> Result<u32, SocketError> {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| SocketError::UnknownGroup {
            group: group.to_string(),
        })
}

/// Creates the socket's folder when it is missing: 0700, plus search
/// permission for the group (when the socket has one) and for others
/// exactly where the socket's own mode lets them connect. A folder that
/// already exists (`/run/modeld` from systemd, `/tmp`) is left as it is.
fn create_socket_dir(dir: &Path, socket_mode: u32, gid: Option<u32>) -> io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut mode = 0o700;
    if gid.is_some() && socket_mode & 0o020 != 0 {
        mode |= 0o010;
    }
    if socket_mode & 0o002 != 0 {
        mode |= 0o001;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, None, Some(gid))?;
    }
    Ok(())
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
