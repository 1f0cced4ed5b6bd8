//! Generated pictures as PNG files: named by time, seed and index, readable
//! by the daemon's group only (0640).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::GeneratedImage;

/// Encodes `image` as an 8-bit RGB PNG.
pub fn encode_png(image: &GeneratedImage) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&image.rgb)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// `20261130-051900-seed42-0`: UTC time of the request, the picture's own
/// seed, and its index in the request (the stem of the PNG's name).
pub fn file_stem(unix_secs: u64, seed: u64, index: usize) -> String {
    let (days, secs) = (unix_secs / 86_400, unix_secs % 86_400);
    let (year, month, day) = civil_date(days as i64);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}-seed{seed}-{index}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 as a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Tries for a free name before giving up: one request per second per
/// seed rarely needs more than a second.
const NAME_ATTEMPTS: usize = 1000;

/// How a picture's file is named while it is written: hidden, and marked
/// as the daemon's, so start-up can remove what a crash left behind.
const PARTIAL_SUFFIX: &str = ".modeld-partial";

/// One picture to write: its name's stem and its PNG bytes.
pub struct Pending<'a> {
    pub stem: String,
    pub bytes: &'a [u8],
}

/// Writes every picture of one request into `dir` (created if needed), or
/// none: each goes to a hidden temporary file, is synced, and only once
/// all are complete are they given their names (mode 0640). An existing
/// file is never overwritten: the same request twice within a second gets
/// `<stem>-1.png`, and so on. On any error, every file of the batch is
/// removed again, so a full disk or a failed rename leaves nothing.
pub fn write_all(dir: &Path, pictures: &[Pending<'_>]) -> Result<Vec<PathBuf>, WriteError> {
    std::fs::create_dir_all(dir).map_err(|err| WriteError::at(dir, err))?;
    let mut partial = Vec::with_capacity(pictures.len());
    let result = write_partials(dir, pictures, &mut partial).and_then(|()| {
        let mut named = Vec::with_capacity(partial.len());
        let result = name_all(dir, &partial, pictures, &mut named);
        if result.is_err() {
            remove_all(&named);
        }
        result.map(|()| named)
    });
    remove_all(&partial);
    let named = result?;
    // The names themselves must survive a power cut, not only the bytes.
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(named)
}

/// A file this module could not write, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl WriteError {
    fn at(path: &Path, source: std::io::Error) -> Self {
        WriteError {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn write_partials(
    dir: &Path,
    pictures: &[Pending<'_>],
    partial: &mut Vec<PathBuf>,
) -> Result<(), WriteError> {
    for picture in pictures {
        let path = dir.join(format!(".{}.png{PARTIAL_SUFFIX}", picture.stem));
        let (file, path) = create_new(&path)?;
        partial.push(path.clone());
        write_synced(file, picture.bytes).map_err(|err| WriteError::at(&path, err))?;
    }
    Ok(())
}

/// Creates `path` for writing, or a free variant of it (`…-N`) when taken.
fn create_new(path: &Path) -> Result<(std::fs::File, PathBuf), WriteError> {
    for attempt in 0..NAME_ATTEMPTS {
        let candidate = match attempt {
            0 => path.to_path_buf(),
            n => path.with_extension(format!("{n}{PARTIAL_SUFFIX}")),
        };
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&candidate);
        match opened {
            Ok(file) => return Ok((file, candidate)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(WriteError::at(&candidate, err)),
        }
    }
    let taken = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "every name is taken");
    Err(WriteError::at(path, taken))
}

/// Writes `bytes` to a freshly created file, mode 0640, and syncs them.
pub fn write_synced(mut file: std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    // Set again: the mode given to `open` is narrowed by the umask.
    file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Gives each complete temporary file its final name. A hard link, not a
/// rename, so a name that appeared meanwhile is never replaced.
fn name_all(
    dir: &Path,
    partial: &[PathBuf],
    pictures: &[Pending<'_>],
    named: &mut Vec<PathBuf>,
) -> Result<(), WriteError> {
    for (from, picture) in partial.iter().zip(pictures) {
        named.push(link_free_name(from, dir, &picture.stem)?);
    }
    Ok(())
}

fn link_free_name(from: &Path, dir: &Path, stem: &str) -> Result<PathBuf, WriteError> {
    for attempt in 0..NAME_ATTEMPTS {
        let path = match attempt {
            0 => dir.join(format!("{stem}.png")),
            n => dir.join(format!("{stem}-{n}.png")),
        };
        match std::fs::hard_link(from, &path) {
            Ok(()) => return Ok(path),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(WriteError::at(&path, err)),
        }
    }
    let taken = std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{NAME_ATTEMPTS} files named {stem}*.png exist already"),
    );
    Err(WriteError::at(&dir.join(format!("{stem}.png")), taken))
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

/// Removes the temporary files a crash left in `dir`: only regular files
/// with this module's marker, never anything a link points to. Returns
/// how many were removed.
pub fn remove_partials(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| is_partial(&entry.file_name().to_string_lossy()))
        .filter(|entry| match entry.file_type() {
            Ok(kind) if kind.is_file() => std::fs::remove_file(entry.path()).is_ok(),
            Ok(kind) if kind.is_dir() => remove_partial_dir(&entry.path()),
            _ => false,
        })
        .count()
}

/// A video's folder a crash left half-written: its regular files, then
/// the folder; anything else inside (a link, a folder) keeps it.
fn remove_partial_dir(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok()
}

/// The hidden name a file or folder has while it is written.
pub fn partial_name(stem: &str, extension: &str) -> String {
    format!(".{stem}{extension}{PARTIAL_SUFFIX}")
}

fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_utc_time_seed_and_index() {
        // 2026-11-30 05:19:00 UTC.
        assert_eq!(file_stem(1_796_015_940, 42, 0), "20261130-051900-seed42-0");
        assert_eq!(file_stem(0, 7, 3), "19700101-000000-seed7-3");
    }

    fn write(dir: &Path, stems: &[&str], bytes: &[u8]) -> Result<Vec<PathBuf>, WriteError> {
        let pending: Vec<Pending> = stems
            .iter()
            .map(|stem| Pending {
                stem: stem.to_string(),
                bytes,
            })
            .collect();
        write_all(dir, &pending)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_taken_name_gets_a_suffix_and_files_are_0640() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), &["a"], b"1").unwrap();
        let second = write(dir.path(), &["a", "b"], b"2").unwrap();
        assert_eq!(first[0].file_name().unwrap(), "a.png");
        assert_eq!(second[0].file_name().unwrap(), "a-1.png");
        assert_eq!(std::fs::read(&first[0]).unwrap(), b"1");
        let mode = std::fs::metadata(&second[1]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            names(dir.path()),
            ["a-1.png", "a.png", "b.png"],
            "no temporaries left"
        );
    }

    #[test]
    fn a_failed_batch_leaves_no_file_at_all() {
        let dir = tempfile::tempdir().unwrap();
        // A stem naming a folder that does not exist fails the second
        // picture after the first was complete.
        let err = write(dir.path(), &["fine", "missing/x"], b"png").unwrap_err();
        assert!(err.path.to_string_lossy().contains("missing"), "{err}");
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn start_up_removes_only_the_daemons_own_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".a.png.modeld-partial"), b"").unwrap();
        std::fs::write(dir.path().join("keep.png"), b"x").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let target = dir.path().join("target.modeld-partial");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(".link.modeld-partial")).unwrap();
        assert_eq!(remove_partials(dir.path()), 1);
        assert_eq!(
            names(dir.path()),
            [
                ".hidden",
                ".link.modeld-partial",
                "keep.png",
                "target.modeld-partial"
            ]
        );
    }

    #[test]
    fn pngs_decode_to_the_same_pixels() {
        let image = GeneratedImage {
            width: 2,
            height: 1,
            rgb: vec![1, 2, 3, 250, 251, 252],
        };
        let bytes = encode_png(&image).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&pixels[..info.buffer_size()], image.rgb.as_slice());
    }
}
