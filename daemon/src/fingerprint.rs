//! What a model file was when its bytes were last hashed: its size, inode,
//! mtime and ctime, and the digest those bytes had. A pull records every
//! blob it downloads or verifies, and `pull --verify` every file of a
//! `local_path`; a load compares a file's stamp with its record, so only a
//! file that changed since is hashed again (a write that keeps the size
//! and even restores the mtime still moves the ctime).
//!
//! The records are a tree of the registry's sled store (in the private
//! state dir), keyed by the file's real path. They are not kept in the
//! Hugging Face cache: other tools share it and would neither update nor
//! expect them, and any user who can write there could forge them. They are
//! not part of a `ModelRecord` either: a blob belongs to the cache, not to
//! one registration, and two registrations of a repo share its blobs.
//!
//! A leaf like `util.rs`: it imports nothing from the crate, so the hub
//! (which hashes downloads with [`Hasher`]) and the pull may use it.

use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The name of the sled tree that holds the records.
pub const TREE: &str = "fingerprints";

/// A file's identity and last change, as `stat` tells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Self {
        Stamp {
            size: meta.len(),
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How a file's digest is computed: sha256 for LFS files and local files,
/// the git blob id (sha1 over `blob <size>\0` and the bytes) for the small
/// files the Hub keeps in git.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DigestKind {
    Sha256,
    GitBlob,
}

/// A digest computed as bytes stream past.
pub enum Hasher {
    Sha256(Sha256),
    GitBlob(Sha1),
}

impl Hasher {
    /// A git blob id covers the size too, so it is given up front.
    pub fn new(kind: DigestKind, size: u64) -> Self {
        match kind {
            DigestKind::Sha256 => Hasher::Sha256(Sha256::new()),
            DigestKind::GitBlob => {
                let mut sha1 = Sha1::new();
                sha1.update(format!("blob {size}\0").as_bytes());
                Hasher::GitBlob(sha1)
            }
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::GitBlob(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::GitBlob(h) => hex::encode(h.finalize()),
        }
    }

    /// Feeds the whole of `path` through the hasher, in 1 MiB reads.
    pub fn update_from(&mut self, path: &Path) -> io::Result<()> {
        let mut input = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.update(&buf[..n]);
        }
    }
}

/// The digest of the file at `path` as it is now.
pub fn digest_file(path: &Path, kind: DigestKind) -> io::Result<String> {
    let size = std::fs::metadata(path)?.len();
    let mut hasher = Hasher::new(kind, size);
    hasher.update_from(path)?;
    Ok(hasher.finish())
}

/// One file's record: its stamp when its bytes last hashed to `digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub stamp: Stamp,
    pub kind: DigestKind,
    pub digest: String,
    /// A later load found bytes that no longer hash to `digest` and loaded
    /// them as they are (a `local_path` file, never fetched); `stamp` is
    /// then theirs, and the file stays reported until verified again.
    #[serde(default)]
    pub differs: bool,
}

/// What a file's record says about it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Never hashed by modeld (another tool downloaded it, or it predates
    /// the records): nothing to compare with.
    Unrecorded,
    /// As it was when hashed.
    Same,
    /// Stamped differently since: its bytes must be hashed again.
    Changed(Record),
    /// Known to differ from its digest, and unchanged since that was found.
    Differs(Record),
}

impl Check {
    /// Whether `cache.scan` reports the file as changed.
    pub fn is_change(&self) -> bool {
        matches!(self, Check::Changed(_) | Check::Differs(_))
    }
}

/// The records, in the registry's store. Cloning shares the tree.
#[derive(Clone)]
pub struct Fingerprints {
    tree: sled::Tree,
}

impl Fingerprints {
    pub fn new(tree: sled::Tree) -> Self {
        Fingerprints { tree }
    }

    /// Records that `path` (followed to its real file) hashes to `digest`
    /// now, clearing any earlier finding that it differs.
    pub fn record(&self, path: &Path, kind: DigestKind, digest: &str) -> io::Result<()> {
        let real = path.canonicalize()?;
        let record = Record {
            stamp: Stamp::of(&std::fs::metadata(&real)?),
            kind,
            digest: digest.to_string(),
            differs: false,
        };
        self.put(&real, &record)
    }

    /// Records that the bytes of `path`, stamped `stamp`, no longer hash to
    /// the digest of `record`.
    pub fn record_difference(&self, path: &Path, record: Record, stamp: Stamp) -> io::Result<()> {
        let real = path.canonicalize()?;
        let record = Record {
            stamp,
            differs: true,
            ..record
        };
        self.put(&real, &record)
    }

    /// Compares `path` (followed to its real file) with its record.
    pub fn check(&self, path: &Path) -> Check {
        let Ok(real) = path.canonicalize() else {
            return Check::Unrecorded;
        };
        let Some(record) = self.get(&real) else {
            return Check::Unrecorded;
        };
        let Ok(meta) = std::fs::metadata(&real) else {
            return Check::Unrecorded;
        };
        match (Stamp::of(&meta) == record.stamp, record.differs) {
            (true, false) => Check::Same,
            (true, true) => Check::Differs(record),
            (false, _) => Check::Changed(record),
        }
    }

    /// Makes every record so far durable.
    pub fn flush(&self) -> io::Result<()> {
        self.tree.flush()?;
        Ok(())
    }

    fn get(&self, real: &Path) -> Option<Record> {
        let bytes = self.tree.get(real.as_os_str().as_bytes()).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    fn put(&self, real: &Path, record: &Record) -> io::Result<()> {
        let value = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.tree.insert(real.as_os_str().as_bytes(), value)?;
        Ok(())
    }
}

/// A file found changed since it was checked, hashed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rehashed {
    /// As found under the folder walked (a snapshot link, say).
    pub path: PathBuf,
    /// Whether its bytes still hash to the recorded digest; if so, the
    /// record now carries the new stamp.
    pub matches: bool,
    pub record: Record,
    /// The stamp the bytes hashed had.
    pub stamp: Stamp,
}

/// Hashes again every recorded file under `path` that changed since it was
/// checked; files never recorded, or unchanged, are not read. A file known
/// to differ and unchanged since is reported without hashing it again.
pub fn rehash_changed(path: &Path, fingerprints: &Fingerprints) -> Vec<Rehashed> {
    files_under(path)
        .into_iter()
        .filter_map(|file| match fingerprints.check(&file) {
            Check::Changed(record) => rehash(file, record, fingerprints),
            Check::Differs(record) => Some(Rehashed {
                path: file,
                matches: false,
                stamp: record.stamp,
                record,
            }),
            Check::Unrecorded | Check::Same => None,
        })
        .collect()
}

/// Hashes `file` again; the stamp is taken first, so a write racing the
/// hash leaves the file changed for the next check.
fn rehash(file: PathBuf, record: Record, fingerprints: &Fingerprints) -> Option<Rehashed> {
    let hashed = std::fs::metadata(&file)
        .map(|meta| Stamp::of(&meta))
        .and_then(|stamp| Ok((stamp, digest_file(&file, record.kind)?)));
    let (stamp, digest) = match hashed {
        Ok(hashed) => hashed,
        Err(err) => {
            // The load that reads it reports what is wrong with it.
            tracing::warn!(file = %file.display(), "cannot hash a changed file again: {err}");
            return None;
        }
    };
    let matches = digest == record.digest;
    if matches {
        let checked = Record {
            stamp,
            differs: false,
            ..record.clone()
        };
        if let Err(err) = file
            .canonicalize()
            .and_then(|real| fingerprints.put(&real, &checked))
        {
            tracing::warn!(file = %file.display(), "cannot record the file as checked: {err}");
        }
    }
    Some(Rehashed {
        path: file,
        matches,
        record,
        stamp,
    })
}

/// The files under `path` (itself when it is a file), symlinks to files
/// followed, as a load would read them; links to folders are not entered,
/// so a planted loop cannot hold the walk. Sorted.
pub fn files_under(path: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    collect(path, &mut files);
    files.sort();
    files
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    let Ok(own) = std::fs::symlink_metadata(path) else {
        return;
    };
    if own.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            collect(&entry.path(), out);
        }
    } else if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        out.push(path.to_path_buf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Fingerprints) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        (dir, Fingerprints::new(db.open_tree(TREE).unwrap()))
    }

    #[test]
    fn digests_match_sha256_and_git_blob_ids() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello\n").unwrap();
        assert_eq!(
            digest_file(&file, DigestKind::Sha256).unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        // `git hash-object` of the same bytes.
        assert_eq!(
            digest_file(&file, DigestKind::GitBlob).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
    }

    #[test]
    fn a_rewrite_of_the_same_size_is_a_change() {
        let (dir, store) = store();
        let file = dir.path().join("weights.bin");
        std::fs::write(&file, vec![1u8; 8192]).unwrap();
        assert_eq!(store.check(&file), Check::Unrecorded);
        let digest = digest_file(&file, DigestKind::Sha256).unwrap();
        store.record(&file, DigestKind::Sha256, &digest).unwrap();
        assert_eq!(store.check(&file), Check::Same);

        let mut bytes = vec![1u8; 8192];
        bytes[4000] = 2;
        std::fs::write(&file, &bytes).unwrap();
        let Check::Changed(record) = store.check(&file) else {
            panic!("a same-size rewrite went unnoticed");
        };
        assert_eq!(record.digest, digest);
        assert!(store.check(&file).is_change());
    }

    #[test]
    fn restoring_the_mtime_does_not_hide_a_change() {
        let (dir, store) = store();
        let file = dir.path().join("weights.bin");
        std::fs::write(&file, vec![1u8; 4096]).unwrap();
        store.record(&file, DigestKind::Sha256, "d").unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        // The ctime moves on with the clock; make sure it can tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, vec![3u8; 4096]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(matches!(store.check(&file), Check::Changed(_)));
    }

    #[test]
    fn records_follow_links_to_the_real_file() {
        let (dir, store) = store();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let (blob, link) = (files.join("blob"), files.join("snapshot-file"));
        std::fs::write(&blob, b"bytes").unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        // A link to a folder is not entered: a loop cannot hold the walk.
        std::os::unix::fs::symlink(&files, files.join("loop")).unwrap();
        store.record(&link, DigestKind::GitBlob, "d").unwrap();
        assert_eq!(store.check(&blob), Check::Same);
        assert_eq!(files_under(&files), [blob.clone(), link.clone()]);
    }

    #[test]
    fn only_changed_files_are_hashed_again() {
        let (dir, store) = store();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let (same, touched, edited, unknown) = (
            files.join("same.bin"),
            files.join("touched.bin"),
            files.join("edited.bin"),
            files.join("unknown.bin"),
        );
        for file in [&same, &touched, &edited, &unknown] {
            std::fs::write(file, b"original").unwrap();
            let digest = digest_file(file, DigestKind::Sha256).unwrap();
            if file != &unknown {
                store.record(file, DigestKind::Sha256, &digest).unwrap();
            }
        }
        std::fs::write(&touched, b"original").unwrap();
        std::fs::write(&edited, b"0riginal").unwrap();
        std::fs::write(&unknown, b"whatever").unwrap();
        let found = rehash_changed(&files, &store);
        let outcomes: Vec<(&Path, bool)> = found
            .iter()
            .map(|r| (r.path.as_path(), r.matches))
            .collect();
        assert_eq!(
            outcomes,
            [(edited.as_path(), false), (touched.as_path(), true)]
        );
        // The touched file's record now has its new stamp; the edited one
        // keeps the old, so it is found again until something is done.
        assert_eq!(store.check(&touched), Check::Same);
        assert!(matches!(store.check(&edited), Check::Changed(_)));
        let edited_again = rehash_changed(&files, &store);
        assert_eq!(edited_again.len(), 1);
        assert_eq!(edited_again[0].path, edited);
    }

    #[test]
    fn a_known_difference_is_kept_until_recorded_again() {
        let (dir, store) = store();
        let file = dir.path().join("local.safetensors");
        std::fs::write(&file, b"verified").unwrap();
        store.record(&file, DigestKind::Sha256, "old").unwrap();
        std::fs::write(&file, b"edited!!").unwrap();
        let Check::Changed(record) = store.check(&file) else {
            panic!("not changed")
        };
        let stamp = Stamp::of(&std::fs::metadata(&file).unwrap());
        store.record_difference(&file, record, stamp).unwrap();
        let Check::Differs(record) = store.check(&file) else {
            panic!("the difference was forgotten")
        };
        assert_eq!(record.digest, "old");
        store.record(&file, DigestKind::Sha256, "new").unwrap();
        assert_eq!(store.check(&file), Check::Same);
    }
}
