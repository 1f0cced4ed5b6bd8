//! File operations confined to one root directory. A path is walked from
//! the root one component at a time with `O_NOFOLLOW`, so a symlink planted
//! anywhere on the way (a repo folder, `blobs/`, `snapshots/`) can never
//! send a removal or a link outside the root — not even one swapped in
//! between planning and applying. The final component itself is never
//! followed: removing a symlink removes the link, not its target.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{linkat, unlinkat, UnlinkatFlags};

/// An open root directory; every operation stays below it.
pub struct Confined {
    root: OwnedFd,
    root_path: PathBuf,
}

fn no_follow_dir() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn outside(path: &Path, root: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is not a plain path below {}",
            path.display(),
            root.display()
        ),
    )
}

impl Confined {
    /// Opens `root` itself; a configured root may be a symlink (the
    /// operator's choice), but nothing below it is followed.
    pub fn open(root: &Path) -> io::Result<Self> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let root_fd = nix::fcntl::open(root, flags, Mode::empty())?;
        Ok(Confined {
            root: root_fd,
            root_path: root.to_path_buf(),
        })
    }

    /// The components of `path` below the root: plain names only.
    fn components<'a>(&self, path: &'a Path) -> io::Result<Vec<&'a OsStr>> {
        let relative = path
            .strip_prefix(&self.root_path)
            .map_err(|_| outside(path, &self.root_path))?;
        let mut names = Vec::new();
        for component in relative.components() {
            match component {
                Component::Normal(name) => names.push(name),
                _ => return Err(outside(path, &self.root_path)),
            }
        }
        if names.is_empty() {
            return Err(outside(path, &self.root_path));
        }
        Ok(names)
    }

    /// Opens the directory holding `path`'s last component, refusing any
    /// symlink on the way, and returns it with that component's name.
    fn open_parent(&self, path: &Path) -> io::Result<(OwnedFd, OsString)> {
        let names = self.components(path)?;
        let (last, dirs) = names.split_last().expect("components are never empty");
        let mut dir = self.root.try_clone()?;
        for name in dirs {
            dir = openat(dir.as_fd(), *name, no_follow_dir(), Mode::empty())
                .map_err(|errno| walk_error(errno, path))?;
        }
        Ok((dir, last.to_os_string()))
    }

    /// Removes a file or a symlink (never what it points to).
    pub fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.open_parent(path)?;
        unlinkat(dir.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// Removes a directory and everything in it without following any
    /// link; a symlink or file at `path` is removed itself.
    pub fn remove_tree(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.open_parent(path)?;
        remove_entry(&dir, &name)
    }

    /// Replaces `path` (below this root) with a hard link to `target`
    /// (below `target_root`), through a temporary name and a rename, so
    /// `path` never goes missing.
    pub fn replace_with_link(
        &self,
        target_root: &Confined,
        target: &Path,
        path: &Path,
    ) -> io::Result<()> {
        let (target_dir, target_name) = target_root.open_parent(target)?;
        let (dir, name) = self.open_parent(path)?;
        let mut tmp = OsString::from(".");
        tmp.push(&name);
        tmp.push(".modeld-link");
        let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        linkat(
            target_dir.as_fd(),
            target_name.as_os_str(),
            dir.as_fd(),
            tmp.as_os_str(),
            AtFlags::empty(),
        )?;
        nix::fcntl::renameat(dir.as_fd(), tmp.as_os_str(), dir.as_fd(), name.as_os_str())
            .inspect_err(|_| {
                let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            })?;
        Ok(())
    }
}

/// Confined handles for a set of roots, each opened on first use.
pub struct RootHandles {
    roots: Vec<PathBuf>,
    opened: Vec<Confined>,
}

impl RootHandles {
    pub fn new<'a>(roots: impl IntoIterator<Item = &'a Path>) -> Self {
        RootHandles {
            roots: roots.into_iter().map(Path::to_path_buf).collect(),
            opened: Vec::new(),
        }
    }

    /// The handle of the innermost root that holds `path`; a path in no
    /// root is refused.
    pub fn for_path(&mut self, path: &Path) -> io::Result<&Confined> {
        let index = self.index_for(path)?;
        Ok(&self.opened[index])
    }

    /// Handles for two paths at once, such as a link and its target.
    pub fn pair(&mut self, first: &Path, second: &Path) -> io::Result<(&Confined, &Confined)> {
        let first = self.index_for(first)?;
        let second = self.index_for(second)?;
        Ok((&self.opened[first], &self.opened[second]))
    }

    fn index_for(&mut self, path: &Path) -> io::Result<usize> {
        let root = self
            .roots
            .iter()
            .filter(|root| path.starts_with(root))
            .max_by_key(|root| root.as_os_str().len())
            .ok_or_else(|| outside(path, Path::new("any cache root")))?;
        // A root may be a single registered file: its folder is the base.
        let base = match root.is_dir() {
            true => root.as_path(),
            false => root.parent().unwrap_or(root),
        };
        if let Some(index) = self.opened.iter().position(|c| c.root_path == base) {
            return Ok(index);
        }
        self.opened.push(Confined::open(base)?);
        Ok(self.opened.len() - 1)
    }
}

/// A symlink where a directory was expected is reported as such.
fn walk_error(errno: Errno, path: &Path) -> io::Error {
    match errno {
        Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: a folder on the way is a symlink or not a folder; refusing to follow it",
                path.display()
            ),
        ),
        other => other.into(),
    }
}

/// Removes `name` in `dir`: unlinks files and links, empties and removes
/// directories, never crossing a link.
fn remove_entry(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(errno) => return Err(errno.into()),
    }
    let child = openat(dir.as_fd(), name, no_follow_dir(), Mode::empty())?;
    let mut entries = Dir::from_fd(child.try_clone()?)?;
    let names: Vec<OsString> = entries
        .iter()
        .filter_map(Result::ok)
        .map(|entry| {
            use std::os::unix::ffi::OsStrExt;
            OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string()
        })
        .filter(|n| n != "." && n != "..")
        .collect();
    for entry in &names {
        remove_entry(&child, entry)?;
    }
    unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("repo/blobs")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"x").unwrap();
        (tmp, root, outside)
    }

    #[test]
    fn a_symlinked_folder_on_the_way_is_refused() {
        let (_tmp, root, outside) = setup();
        std::os::unix::fs::symlink(&outside, root.join("repo/snapshots")).unwrap();
        let confined = Confined::open(&root).unwrap();
        let err = confined
            .remove_file(&root.join("repo/snapshots/precious"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(outside.join("precious").exists());
        confined
            .remove_tree(&root.join("repo/snapshots/precious"))
            .unwrap_err();
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn removing_a_tree_removes_links_not_their_targets() {
        let (_tmp, root, outside) = setup();
        std::os::unix::fs::symlink(&outside, root.join("repo/blobs/link")).unwrap();
        std::fs::write(root.join("repo/blobs/file"), b"y").unwrap();
        let confined = Confined::open(&root).unwrap();
        confined.remove_tree(&root.join("repo")).unwrap();
        assert!(!root.join("repo").exists());
        assert!(outside.join("precious").exists());
        // A symlinked top folder is removed as a link.
        std::os::unix::fs::symlink(&outside, root.join("models--a--b")).unwrap();
        confined.remove_tree(&root.join("models--a--b")).unwrap();
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn paths_must_be_plain_and_below_the_root() {
        let (_tmp, root, outside) = setup();
        let confined = Confined::open(&root).unwrap();
        assert!(confined.remove_file(&outside.join("precious")).is_err());
        assert!(confined
            .remove_file(&root.join("repo/../../outside/precious"))
            .is_err());
        assert!(confined.remove_tree(&root).is_err());
        assert!(outside.join("precious").exists());
    }
}
