//! File operations confined to one root directory. A path is walked from
//! the root one component at a time with `O_NOFOLLOW`, so a symlink planted
//! anywhere on the way (a repo folder, `blobs/`, `snapshots/`) can never
//! send a removal or a link outside the root — not even one swapped in
//! between planning and applying. The final component itself is never
//! followed: removing a symlink removes the link, not its target.
//!
//! Consolidation replaces a duplicate with a hard link, or where the file
//! system can share blocks, with a copy-on-write clone (`FICLONE`): a file
//! of its own, so writing to one name never changes the other.

use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes, Metadata, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

    /// Opens the regular file at `path` for reading, never through a link.
    fn open_file(&self, path: &Path) -> io::Result<File> {
        let (dir, name) = self.open_parent(path)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty())
            .map_err(|errno| walk_error(errno, path))?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(file)
    }

    /// Whether `target` can be cloned into `path`'s folder: tried on an
    /// unnamed temporary file there (`O_TMPFILE`), which is gone when
    /// closed, so a dry run changes nothing on disk.
    pub fn can_clone(
        &self,
        target_root: &Confined,
        target: &Path,
        path: &Path,
    ) -> io::Result<bool> {
        let source = target_root.open_file(target)?;
        let (dir, _) = self.open_parent(path)?;
        let flags = OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let tried = openat(dir.as_fd(), ".", flags, Mode::from_bits_truncate(0o600))
            .and_then(|probe| ficlone(probe.as_fd(), source.as_fd()));
        match tried {
            Ok(()) => Ok(true),
            Err(errno) if clone_unsupported(errno) => Ok(false),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Replaces `path` (below this root) with a copy-on-write clone of
    /// `target` (below `target_root`): a new inode sharing `target`'s
    /// blocks, with `path`'s owner, mode and times, renamed over `path` so
    /// it never goes missing. Where the file system cannot clone, fails
    /// with an error [`is_clone_unsupported`] recognizes and changes nothing.
    pub fn replace_with_clone(
        &self,
        target_root: &Confined,
        target: &Path,
        path: &Path,
    ) -> io::Result<()> {
        let source = target_root.open_file(target)?;
        let existing = self.open_file(path)?.metadata()?;
        let (dir, name) = self.open_parent(path)?;
        let tmp = temporary_name(&name, "clone");
        let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let clone = File::from(openat(
            dir.as_fd(),
            tmp.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )?);
        let made = ficlone(clone.as_fd(), source.as_fd())
            .map_err(io::Error::from)
            .and_then(|()| take_metadata(&clone, &existing))
            .and_then(|()| {
                nix::fcntl::renameat(dir.as_fd(), tmp.as_os_str(), dir.as_fd(), name.as_os_str())
                    .map_err(io::Error::from)
            });
        if made.is_err() {
            let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        made
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
        let tmp = temporary_name(&name, "link");
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

/// The hidden name a replacement of `name` is made under before it is
/// renamed over it.
fn temporary_name(name: &OsStr, what: &str) -> OsString {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".modeld-{what}"));
    tmp
}

/// Gives a clone the owner, mode and times of the file it replaces (owner
/// first: a change of owner clears set-id bits), and makes it durable.
fn take_metadata(clone: &File, like: &Metadata) -> io::Result<()> {
    std::os::unix::fs::fchown(clone, Some(like.uid()), Some(like.gid()))?;
    clone.set_permissions(Permissions::from_mode(like.mode() & 0o7777))?;
    let times = FileTimes::new()
        .set_accessed(like.accessed()?)
        .set_modified(like.modified()?);
    clone.set_times(times)?;
    clone.sync_all()
}

/// `FICLONE`: makes `dest` share all of `source`'s blocks, copy-on-write.
fn ficlone(dest: BorrowedFd<'_>, source: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument
    // and touches no memory of ours; both descriptors stay open (borrowed)
    // for the whole call.
    let result =
        unsafe { nix::libc::ioctl(dest.as_raw_fd(), nix::libc::FICLONE, source.as_raw_fd()) };
    Errno::result(result).map(drop)
}

/// The errors of a clone (or of the `O_TMPFILE` probe) that mean the file
/// system cannot share blocks between these files: a hard link, or
/// nothing, is the fallback.
fn clone_unsupported(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY | Errno::ENOSYS
    )
}

/// Whether an error of [`Confined::replace_with_clone`] means clones are
/// not possible here (as opposed to a failure worth reporting).
pub fn is_clone_unsupported(err: &io::Error) -> bool {
    err.raw_os_error()
        .is_some_and(|code| clone_unsupported(Errno::from_raw(code)))
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
    fn a_clone_replaces_the_copy_or_changes_nothing() {
        let (_tmp, root, _outside) = setup();
        let (keep, copy) = (root.join("repo/blobs/keep"), root.join("repo/copy.bin"));
        std::fs::write(&keep, vec![7u8; 64 << 10]).unwrap();
        std::fs::write(&copy, vec![7u8; 64 << 10]).unwrap();
        std::fs::set_permissions(&copy, Permissions::from_mode(0o640)).unwrap();
        let before = std::fs::metadata(&copy).unwrap();
        let confined = Confined::open(&root).unwrap();
        let supported = confined.can_clone(&confined, &keep, &copy).unwrap();
        let names = || std::fs::read_dir(root.join("repo")).unwrap().count();
        let listed = names();
        match confined.replace_with_clone(&confined, &keep, &copy) {
            Ok(()) => {
                assert!(supported, "the probe said clones fail here");
                let after = std::fs::metadata(&copy).unwrap();
                assert_ne!(after.ino(), std::fs::metadata(&keep).unwrap().ino());
                assert_eq!(after.mode(), before.mode());
                assert_eq!(after.modified().unwrap(), before.modified().unwrap());
                std::fs::write(&copy, b"x").unwrap();
                assert_eq!(std::fs::read(&keep).unwrap(), vec![7u8; 64 << 10]);
            }
            Err(err) => {
                assert!(is_clone_unsupported(&err), "{err}");
                assert!(!supported, "the probe said clones work here");
                assert_eq!(std::fs::metadata(&copy).unwrap().ino(), before.ino());
            }
        }
        assert_eq!(names(), listed, "no temporary file is left");
    }

    #[test]
    fn a_clone_never_reads_through_a_planted_link() {
        let (_tmp, root, outside) = setup();
        let copy = root.join("repo/copy.bin");
        std::fs::write(&copy, b"x").unwrap();
        std::os::unix::fs::symlink(outside.join("precious"), root.join("repo/blobs/keep")).unwrap();
        let confined = Confined::open(&root).unwrap();
        let keep = root.join("repo/blobs/keep");
        assert!(confined.can_clone(&confined, &keep, &copy).is_err());
        assert!(confined
            .replace_with_clone(&confined, &keep, &copy)
            .is_err());
        assert_eq!(std::fs::read(&copy).unwrap(), b"x");
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
