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

/// Writes `bytes` as `dir/<stem>.png` with mode 0640, creating `dir` if
/// needed. An existing file is never overwritten: the same request twice
/// within a second gets `<stem>-1.png`, and so on.
pub fn write_png(dir: &Path, stem: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for attempt in 0..NAME_ATTEMPTS {
        let path = match attempt {
            0 => dir.join(format!("{stem}.png")),
            n => dir.join(format!("{stem}-{n}.png")),
        };
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path);
        let mut file = match opened {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            other => other?,
        };
        // Set again: the mode given to `open` is narrowed by the umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        return Ok(path);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("{NAME_ATTEMPTS} files named {stem}*.png exist already"),
    ))
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

    #[test]
    fn a_taken_name_gets_a_suffix_and_files_are_0640() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_png(dir.path(), "a", b"1").unwrap();
        let second = write_png(dir.path(), "a", b"2").unwrap();
        assert_eq!(first.file_name().unwrap(), "a.png");
        assert_eq!(second.file_name().unwrap(), "a-1.png");
        assert_eq!(std::fs::read(&first).unwrap(), b"1");
        let mode = std::fs::metadata(&second).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
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
