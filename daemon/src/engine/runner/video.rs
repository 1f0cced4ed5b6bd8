//! A runner's videos on disk: each one a folder of numbered PNG frames,
//! plus `video.mp4` when `ffmpeg` is on the daemon's PATH. A folder is
//! filled under a hidden name and renamed whole (never over an existing
//! one), so a client sees every frame of a video or none; a failure
//! removes every folder of the request.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modeld_wire::types::VideoFiles;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use crate::engine::image::output::{self, file_stem, partial_name, WriteError};

/// Frames per second of the MP4 (Wan2.1 renders at 16).
const MP4_FPS: u32 = 16;
/// How long ffmpeg may take for one video before it is given up.
const FFMPEG_TIMEOUT: Duration = Duration::from_secs(300);
const NAME_ATTEMPTS: usize = 1000;

/// One video to write: its seed and its frames' PNG bytes, in order.
pub struct PendingVideo {
    pub seed: u64,
    pub frames: Vec<Vec<u8>>,
}

/// Writes every video of one request into `dir`, all or none.
pub fn write_videos(dir: &Path, videos: &[PendingVideo]) -> Result<Vec<VideoFiles>, WriteError> {
    std::fs::create_dir_all(dir).map_err(|err| at(dir, err))?;
    let now = crate::util::unix_now();
    let mut written: Vec<VideoFiles> = Vec::with_capacity(videos.len());
    for (index, video) in videos.iter().enumerate() {
        let stem = file_stem(now, video.seed, index);
        match write_video(dir, &stem, video) {
            Ok(files) => written.push(files),
            Err(err) => {
                for files in &written {
                    let _ = std::fs::remove_dir_all(&files.dir);
                }
                return Err(err);
            }
        }
    }
    if let Ok(folder) = std::fs::File::open(dir) {
        let _ = folder.sync_all();
    }
    Ok(written)
}

fn write_video(dir: &Path, stem: &str, video: &PendingVideo) -> Result<VideoFiles, WriteError> {
    let partial = dir.join(partial_name(stem, ""));
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(&partial)
        .map_err(|err| at(&partial, err))?;
    let filled = fill(&partial, video).and_then(|mp4| {
        let folder = rename_free(&partial, dir, stem)?;
        Ok((folder, mp4))
    });
    let (folder, mp4) = match filled {
        Ok(done) => done,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(err);
        }
    };
    let frames = (0..video.frames.len())
        .map(|frame| folder.join(frame_name(frame)))
        .collect();
    Ok(VideoFiles {
        mp4: mp4.then(|| folder.join("video.mp4")),
        dir: folder,
        frames,
        seed: video.seed,
    })
}

fn frame_name(frame: usize) -> String {
    format!("frame-{frame:05}.png")
}

/// Writes the frames and, where ffmpeg can, the MP4; says whether the MP4
/// was made.
fn fill(folder: &Path, video: &PendingVideo) -> Result<bool, WriteError> {
    for (frame, bytes) in video.frames.iter().enumerate() {
        let path = folder.join(frame_name(frame));
        write_synced(&path, bytes).map_err(|err| at(&path, err))?;
    }
    let made = ffmpeg().is_some_and(|ffmpeg| encode_mp4(&ffmpeg, folder));
    if let Ok(handle) = std::fs::File::open(folder) {
        let _ = handle.sync_all();
    }
    Ok(made)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)?;
    output::write_synced(file, bytes)
}

/// Gives the finished folder its name; `RENAME_NOREPLACE` never replaces
/// a folder that appeared meanwhile.
fn rename_free(from: &Path, dir: &Path, stem: &str) -> Result<PathBuf, WriteError> {
    for attempt in 0..NAME_ATTEMPTS {
        let to = match attempt {
            0 => dir.join(stem),
            n => dir.join(format!("{stem}-{n}")),
        };
        match renameat2(AT_FDCWD, from, AT_FDCWD, &to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(to),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(err) => return Err(at(&to, std::io::Error::from(err))),
        }
    }
    let taken = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "every name is taken");
    Err(at(&dir.join(stem), taken))
}

/// `ffmpeg` on the daemon's PATH, if there is one.
fn ffmpeg() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("ffmpeg"))
        .find(|candidate| candidate.is_file())
}

/// Encodes the folder's frames as `video.mp4`; a failure only logs, since
/// the frames are the video's content and the MP4 a convenience.
fn encode_mp4(ffmpeg: &Path, folder: &Path) -> bool {
    let spawned = Command::new(ffmpeg)
        .current_dir(folder)
        .args(["-nostdin", "-loglevel", "error", "-framerate"])
        .arg(MP4_FPS.to_string())
        .args(["-i", "frame-%05d.png", "-pix_fmt", "yuv420p", "video.mp4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            tracing::warn!("cannot run ffmpeg: {err}; the video has frames only");
            return false;
        }
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return true,
            Ok(Some(status)) => {
                tracing::warn!("ffmpeg failed ({status}); the video has frames only");
                let _ = std::fs::remove_file(folder.join("video.mp4"));
                return false;
            }
            Ok(None) if started.elapsed() < FFMPEG_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(folder.join("video.mp4"));
                tracing::warn!("ffmpeg took too long; the video has frames only");
                return false;
            }
        }
    }
}

fn at(path: &Path, source: std::io::Error) -> WriteError {
    WriteError {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_video_appears_whole_under_a_free_name() {
        let dir = tempfile::tempdir().unwrap();
        let video = PendingVideo {
            seed: 3,
            frames: vec![b"one".to_vec(), b"two".to_vec()],
        };
        let first = write_videos(dir.path(), &[video]).unwrap();
        assert_eq!(first[0].frames.len(), 2);
        assert_eq!(std::fs::read(&first[0].frames[1]).unwrap(), b"two");
        let again = PendingVideo {
            seed: 3,
            frames: vec![b"x".to_vec()],
        };
        let second = write_videos(dir.path(), &[again]).unwrap();
        assert_ne!(first[0].dir, second[0].dir);
        let hidden = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with('.'));
        assert!(!hidden, "no partial folder is left");
    }

    #[test]
    fn a_crash_s_partial_folder_is_removed_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join(partial_name("x", ""));
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join("frame-00000.png"), b"half").unwrap();
        assert_eq!(crate::engine::image::output::remove_partials(dir.path()), 1);
        assert!(!partial.exists());
    }
}
