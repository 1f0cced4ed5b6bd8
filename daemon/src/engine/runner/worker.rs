//! The thread that owns one runner process: it starts the runner, loads
//! the model through it, then feeds it generation jobs one at a time,
//! turning its progress and pictures into the same events and files a
//! native image model gives. A runner that breaks the protocol (exits,
//! writes garbage or an oversized line, goes silent) fails the job it was
//! running with its stderr tail, is killed, and leaves the model unloaded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use modeld_wire::types::{
    FinishReason, GenerateEvent, GenerateParams, ImageFile, ImageStage, ImagesDone,
};
use serde_json::{json, Map, Value};

use super::params::{png_size, runner_params, Declared};
use super::process::{inside, Launch, Line, RunnerProcess};
use super::video::{write_videos, PendingVideo};
use super::{RunnerFailure, RunnerStage, PROTOCOL_VERSION};
use crate::engine::cancel::Cancellation;
use crate::engine::image::output;
use crate::engine::{EngineError, WorkerEvent};
use crate::validate::ValidationError;

/// A generation for a runner model: the request as the client sent it
/// (with its mode's defaults), checked against the runner's declaration
/// only once the runner has said what it accepts.
#[derive(Debug, Clone)]
pub struct RunnerRequest {
    pub model: String,
    pub params: GenerateParams,
    pub seed: u64,
    pub output_dir: PathBuf,
}

pub struct RunnerJob {
    pub request: RunnerRequest,
    pub events: tokio::sync::mpsc::Sender<WorkerEvent>,
    pub cancel: Cancellation,
}

/// What the engine sends a runner's thread: a generation, or another LoRA
/// set to put in place (only to a runner that declared `swap_loras`).
pub enum RunnerWork {
    Generate(Box<RunnerJob>),
    SwapLoras {
        loras: Vec<modeld_wire::types::LoraInfo>,
        done: mpsc::Sender<Result<(), EngineError>>,
    },
}

/// What to load and where.
#[derive(Debug, Clone)]
pub struct RunnerLoad {
    pub model: String,
    pub launch: Launch,
    /// The diffusers pipeline folder, if the model has one.
    pub pipeline: Option<PathBuf>,
    /// A single file replacing the pipeline's transformer.
    pub transformer: Option<PathBuf>,
    pub loras: Vec<modeld_wire::types::LoraInfo>,
    /// `None` on the CPU.
    pub gpu: Option<usize>,
    pub device_name: String,
    pub dtype: &'static str,
    pub estimated_bytes: u64,
}

/// What the runner said when it became ready.
#[derive(Debug, Clone)]
pub struct Ready {
    pub class: String,
    pub video: bool,
    pub pid: u32,
    /// The runner can replace its LoRAs without a restart.
    pub swap_loras: bool,
}

/// A picture (or a video's frame) as the runner sent it.
type Pictures = BTreeMap<(usize, usize), Vec<u8>>;

pub struct RunnerWorker {
    process: RunnerProcess,
    load: RunnerLoad,
    declared: Declared,
    video: bool,
    next_job: u64,
    /// Cleared when the runner has died: the engine then forgets the model.
    pub alive: Arc<AtomicBool>,
}

/// A failure that ends the runner, or one that only ends the job.
enum Failure {
    Fatal(String),
    Job(EngineError),
}

impl RunnerWorker {
    /// Starts the runner and loads the model; on failure the runner is
    /// killed and reaped before the error returns.
    pub fn start(load: RunnerLoad) -> Result<(RunnerWorker, Ready), EngineError> {
        let alive = Arc::new(AtomicBool::new(true));
        let started = RunnerProcess::start(&load.launch, &load.model, load.gpu, alive.clone());
        let process = started.map_err(|err| {
            let what = format!("could not be started: {}: {err}", load.launch.command[0]);
            failure(&load, RunnerStage::Start, what, String::new())
        })?;
        let mut worker = RunnerWorker {
            process,
            load,
            declared: Declared::new(),
            video: false,
            next_job: 0,
            alive,
        };
        match worker.handshake() {
            Ok(ready) => Ok((worker, ready)),
            Err((stage, what)) => Err(worker.fail(stage, what)),
        }
    }

    pub fn on_gpu(&self) -> bool {
        self.load.gpu.is_some()
    }

    /// Kills the runner and describes why, with its stderr tail.
    fn fail(mut self, stage: RunnerStage, what: String) -> EngineError {
        let stderr = self.process.stderr_tail();
        self.alive.store(false, Ordering::SeqCst);
        let load = self.load.clone();
        self.process.kill();
        if let Some(err) = out_of_memory(&load, &what) {
            return err;
        }
        failure(&load, stage, what, stderr)
    }

    fn handshake(&mut self) -> Result<Ready, (RunnerStage, String)> {
        let start = self.load.launch.start_timeout;
        let hello = self
            .expect(start, "runners.start_timeout_s")
            .map_err(|what| (RunnerStage::Start, what))?;
        self.hello(&hello)
            .map_err(|what| (RunnerStage::Start, what))?;
        let message = self.load_message();
        if !self.process.send(&message) {
            return Err((RunnerStage::Load, self.gone("before it was sent the model")));
        }
        let wait = self.load.launch.load_timeout;
        let ready = self
            .expect(wait, "runners.load_timeout_s")
            .map_err(|what| (RunnerStage::Load, what))?;
        self.ready(&ready).map_err(|what| (RunnerStage::Load, what))
    }

    fn hello(&mut self, hello: &Map<String, Value>) -> Result<(), String> {
        match kind(hello) {
            "hello" => {}
            "error" => return Err(reported(hello)),
            other => return Err(format!("began with {other:?} instead of hello")),
        }
        let protocol = hello.get("protocol").and_then(Value::as_u64);
        if protocol != Some(PROTOCOL_VERSION) {
            return Err(format!(
                "speaks protocol {}, and modeld speaks {PROTOCOL_VERSION}",
                protocol.map_or("(none)".to_string(), |p| p.to_string())
            ));
        }
        self.declared = declaration(hello)?;
        Ok(())
    }

    fn load_message(&self) -> Value {
        let loras = loras_message(&self.load.loras);
        json!({
            "type": "load",
            "model": self.load.model,
            "pipeline": self.load.pipeline,
            "transformer": self.load.transformer,
            "device": if self.load.gpu.is_some() { "cuda" } else { "cpu" },
            "dtype": self.load.dtype,
            "loras": loras,
            "scratch_dir": self.load.launch.scratch_dir,
        })
    }

    fn ready(&mut self, ready: &Map<String, Value>) -> Result<Ready, String> {
        match kind(ready) {
            "ready" => {}
            "error" => return Err(reported(ready)),
            other => return Err(format!("answered the load with {other:?} instead of ready")),
        }
        if ready.contains_key("params") {
            self.declared = declaration(ready)?;
        }
        self.video = ready.get("output").and_then(Value::as_str) == Some("video");
        let swap_loras = ready.get("swap_loras").and_then(Value::as_bool) == Some(true);
        Ok(Ready {
            swap_loras,
            class: ready
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or(&self.load.launch.runner)
                .to_string(),
            video: self.video,
            pid: self.process.pid,
        })
    }

    /// The next protocol message within `wait` (log lines are logged and
    /// skipped); anything else is why the runner is being given up.
    fn expect(&mut self, wait: Duration, key: &str) -> Result<Map<String, Value>, String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.process.next_line(left) {
                Some(Line::Message(message)) if kind(&message) == "log" => self.log(&message),
                Some(Line::Message(message)) => return Ok(message),
                Some(Line::Bad(what)) => return Err(what),
                Some(Line::Closed) => return Err(self.gone("")),
                None => return Err(format!("said nothing for {} s ({key})", wait.as_secs())),
            }
        }
    }

    fn log(&self, message: &Map<String, Value>) {
        let text = message.get("message").and_then(Value::as_str).unwrap_or("");
        tracing::info!(target: "modeld::runner", "[{}] {text}", self.load.model);
    }

    /// How the runner went away, once it did.
    fn gone(&mut self, when: &str) -> String {
        // Give a runner that closed its output a moment to finish exiting.
        for _ in 0..50 {
            if let Some(status) = self.process.exit_status() {
                return format!("{status}{}", prefixed(when));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        format!("closed its output{}", prefixed(when))
    }

    /// Runs jobs until the engine closes the channel or the runner dies;
    /// then stops it. Returns the memory given back.
    pub fn run(mut self, work: mpsc::Receiver<RunnerWork>) -> Option<u64> {
        for item in work.iter() {
            let job = match item {
                RunnerWork::Generate(job) => job,
                RunnerWork::SwapLoras { loras, done } => match self.swap_loras(loras) {
                    Ok(()) => {
                        let _ = done.send(Ok(()));
                        continue;
                    }
                    Err(what) => {
                        let _ = done.send(Err(self.fail(RunnerStage::Load, what)));
                        return Some(0);
                    }
                },
            };
            match self.generate(&job) {
                Ok(event) => {
                    let _ = job.events.blocking_send(Ok(event));
                }
                Err(Failure::Job(err)) => {
                    let _ = job.events.blocking_send(Err(err));
                }
                Err(Failure::Fatal(what)) => {
                    let err = self.fail(RunnerStage::Generate, what);
                    let _ = job.events.blocking_send(Err(err));
                    return Some(0);
                }
            }
        }
        Some(self.stop())
    }

    /// Puts another LoRA set in place; a runner that cannot is given up.
    fn swap_loras(&mut self, loras: Vec<modeld_wire::types::LoraInfo>) -> Result<(), String> {
        let message = json!({"type": "loras", "loras": loras_message(&loras)});
        if !self.process.send(&message) {
            return Err(self.gone("when it was sent new LoRAs"));
        }
        let wait = self.load.launch.load_timeout;
        let ready = self.expect(wait, "runners.load_timeout_s")?;
        self.ready(&ready)?;
        self.load.loras = loras;
        Ok(())
    }

    /// Stops the runner; what it held is what is freed.
    fn stop(self) -> u64 {
        let held = super::memory::held_bytes(self.process.pid, self.load.gpu.is_some());
        let grace = self.load.launch.stop_grace;
        let pid = self.process.pid;
        self.alive.store(false, Ordering::SeqCst);
        self.process.stop(grace);
        super::memory::wait_gpu_released(pid, self.load.gpu.is_some());
        held
    }

    fn generate(&mut self, job: &RunnerJob) -> Result<GenerateEvent, Failure> {
        let request = &job.request;
        let params = runner_params(&request.params, request.seed, &self.declared)
            .map_err(|err| Failure::Job(EngineError::Invalid(err)))?;
        let started = Instant::now();
        if job.cancel.is_requested() {
            return Ok(self.stopped(request, &params, 0));
        }
        self.next_job += 1;
        let id = self.next_job;
        let message = json!({"type": "generate", "job": id, "params": params});
        if !self.process.send(&message) {
            return Err(Failure::Fatal(self.gone("when it was sent a job")));
        }
        let pictures = match self.converse(job, id, started)? {
            Some(pictures) => pictures,
            None => return Ok(self.stopped(request, &params, elapsed_ms(started))),
        };
        let generate_ms = elapsed_ms(started);
        // Settled before anything is written, as for native pictures.
        if !job.cancel.settle() {
            return Ok(self.stopped(request, &params, generate_ms));
        }
        let written = self
            .write(request, &params, pictures)
            .map_err(Failure::Job)?;
        let write_ms = elapsed_ms(started).saturating_sub(generate_ms);
        Ok(self.done(request, &params, written, generate_ms, write_ms))
    }

    /// Relays the runner's messages for job `id` until it ends; `None`
    /// when it was cancelled.
    fn converse(
        &mut self,
        job: &RunnerJob,
        id: u64,
        started: Instant,
    ) -> Result<Option<Pictures>, Failure> {
        let mut pictures = Pictures::new();
        let mut heard = Instant::now();
        let mut cancel_sent = false;
        let silence = self.load.launch.step_timeout;
        loop {
            if job.cancel.is_requested() && !cancel_sent {
                cancel_sent = true;
                self.process.send(&json!({"type": "cancel", "job": id}));
            }
            let message = match self.process.next_line(Duration::from_millis(50)) {
                None if heard.elapsed() > silence => {
                    return Err(Failure::Fatal(format!(
                        "said nothing for {} s during a generation (runners.step_timeout_s)",
                        silence.as_secs()
                    )))
                }
                None => continue,
                Some(Line::Message(message)) => message,
                Some(Line::Bad(what)) => return Err(Failure::Fatal(what)),
                Some(Line::Closed) => return Err(Failure::Fatal(self.gone("during a generation"))),
            };
            heard = Instant::now();
            if message
                .get("job")
                .and_then(Value::as_u64)
                .is_some_and(|j| j != id)
            {
                continue;
            }
            match kind(&message) {
                "progress" => {
                    let event = progress(&message, started);
                    // A closed channel means the client is gone: stop for nobody.
                    if job.events.blocking_send(Ok(event)).is_err() && !cancel_sent {
                        job.cancel.request();
                    }
                }
                "image" => self.take_picture(&message, &mut pictures)?,
                "done" => return Ok(Some(pictures)),
                "cancelled" => return Ok(None),
                "error" => return Err(Failure::Job(self.job_error(&message))),
                "log" => self.log(&message),
                _ => {}
            }
        }
    }

    /// Keeps one picture: base64 bytes in the line, or a file the runner
    /// wrote directly inside its scratch folder (read, then removed).
    fn take_picture(
        &mut self,
        message: &Map<String, Value>,
        pictures: &mut Pictures,
    ) -> Result<(), Failure> {
        let index = message.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        let frame = message.get("frame").and_then(Value::as_u64).unwrap_or(0) as usize;
        let bytes = match (message.get("png"), message.get("path")) {
            (Some(Value::String(png)), _) => base64::engine::general_purpose::STANDARD
                .decode(png)
                .map_err(|e| Failure::Fatal(format!("sent a picture that is not base64: {e}")))?,
            (_, Some(Value::String(name))) => self.read_scratch(name)?,
            _ => {
                return Err(Failure::Fatal(
                    "sent an image message without png or path".into(),
                ))
            }
        };
        if png_size(&bytes).is_none() {
            return Err(Failure::Fatal(format!(
                "sent picture {index} (frame {frame}) that is not a PNG"
            )));
        }
        if pictures.len() >= MAX_PICTURES {
            return Err(Failure::Fatal(format!(
                "sent more than {MAX_PICTURES} pictures"
            )));
        }
        pictures.insert((index, frame), bytes);
        Ok(())
    }

    /// A picture file named by the runner: only a plain file directly in
    /// the scratch folder, never through a link.
    fn read_scratch(&self, name: &str) -> Result<Vec<u8>, Failure> {
        let scratch = &self.load.launch.scratch_dir;
        let path = inside(scratch, name).ok_or_else(|| {
            Failure::Fatal(format!(
                "named a picture {name:?} outside its scratch folder"
            ))
        })?;
        let bytes = read_no_follow(&path, self.load.launch.max_line_bytes).map_err(|e| {
            Failure::Fatal(format!("named a picture {name:?} that cannot be read: {e}"))
        })?;
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }

    fn job_error(&self, message: &Map<String, Value>) -> EngineError {
        let text = message
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        match message.get("kind").and_then(Value::as_str) {
            Some("invalid_params") => {
                let field = message
                    .get("field")
                    .and_then(Value::as_str)
                    .unwrap_or("params");
                EngineError::Invalid(ValidationError::new(field, text))
            }
            Some("insufficient_memory") => EngineError::InsufficientMemory {
                device: self.load.device_name.clone(),
                needed: self.load.estimated_bytes,
                available: 0,
                in_use: 0,
            },
            _ => EngineError::Runner(Box::new(RunnerFailure {
                runner: self.load.launch.runner.clone(),
                model: self.load.model.clone(),
                class: self.load.launch.class.clone(),
                stage: RunnerStage::Generate,
                what: format!("reported an error: {text}"),
                stderr: String::new(),
                key: None,
            })),
        }
    }

    fn write(
        &self,
        request: &RunnerRequest,
        params: &Map<String, Value>,
        pictures: Pictures,
    ) -> Result<Written, EngineError> {
        let count = params.get("count").and_then(Value::as_u64).unwrap_or(1) as usize;
        let output = |err: output::WriteError| EngineError::Output {
            message: err.source.to_string(),
            path: err.path,
        };
        let seed_of = |index: usize| request.seed.wrapping_add(index as u64);
        if self.video {
            let videos: Vec<PendingVideo> = (0..count)
                .map(|index| PendingVideo {
                    seed: seed_of(index),
                    frames: frames_of(&pictures, index),
                })
                .filter(|video| !video.frames.is_empty())
                .collect();
            let videos = write_videos(&request.output_dir, &videos).map_err(output)?;
            return Ok(Written::Videos(videos));
        }
        let now = crate::util::unix_now();
        let kept: Vec<(usize, Vec<u8>)> = pictures
            .into_iter()
            .map(|((index, _), bytes)| (index, bytes))
            .collect();
        let pending: Vec<output::Pending> = kept
            .iter()
            .map(|(index, bytes)| output::Pending {
                stem: output::file_stem(now, seed_of(*index), *index),
                bytes,
            })
            .collect();
        let paths = output::write_all(&request.output_dir, &pending).map_err(output)?;
        let inline = request.params.inline.unwrap_or(false);
        let files = paths
            .into_iter()
            .zip(&kept)
            .map(|(path, (index, bytes))| {
                let (width, height) = png_size(bytes).unwrap_or((0, 0));
                ImageFile {
                    path,
                    seed: seed_of(*index),
                    width: width as usize,
                    height: height as usize,
                    base64: inline.then(|| base64::engine::general_purpose::STANDARD.encode(bytes)),
                }
            })
            .collect();
        Ok(Written::Images(files))
    }

    fn stopped(
        &self,
        request: &RunnerRequest,
        params: &Map<String, Value>,
        ms: u64,
    ) -> GenerateEvent {
        self.done(request, params, Written::Images(Vec::new()), ms, 0)
    }

    fn done(
        &self,
        request: &RunnerRequest,
        params: &Map<String, Value>,
        written: Written,
        generate_ms: u64,
        write_ms: u64,
    ) -> GenerateEvent {
        let (images, videos) = match written {
            Written::Images(images) => (images, Vec::new()),
            Written::Videos(videos) => (Vec::new(), videos),
        };
        let finish_reason = match images.is_empty() && videos.is_empty() {
            true => FinishReason::Cancelled,
            false => FinishReason::Length,
        };
        let size = params
            .get("size")
            .and_then(Value::as_str)
            .map(str::to_string);
        let size = size
            .or_else(|| images.first().map(|i| format!("{}x{}", i.width, i.height)))
            .unwrap_or_default();
        GenerateEvent::Images(ImagesDone {
            done: true,
            model: request.model.clone(),
            mode: None,
            seed: request.seed,
            size,
            steps: params.get("steps").and_then(Value::as_u64).unwrap_or(0) as usize,
            scheduler: String::new(),
            images,
            generate_ms,
            write_ms,
            finish_reason,
            video: videos.first().cloned(),
            videos,
        })
    }
}

/// The most pictures (frames included) one job may send.
const MAX_PICTURES: usize = 100_000;

enum Written {
    Images(Vec<ImageFile>),
    Videos(Vec<modeld_wire::types::VideoFiles>),
}

fn loras_message(loras: &[modeld_wire::types::LoraInfo]) -> Vec<Value> {
    loras
        .iter()
        .map(
            |lora| json!({"name": lora.adapter_name, "path": lora.path, "strength": lora.strength}),
        )
        .collect()
}

fn frames_of(pictures: &Pictures, index: usize) -> Vec<Vec<u8>> {
    pictures
        .range((index, 0)..(index + 1, 0))
        .map(|(_, bytes)| bytes.clone())
        .collect()
}

fn progress(message: &Map<String, Value>, started: Instant) -> GenerateEvent {
    let stage = match message.get("stage").and_then(Value::as_str) {
        Some("encode") => ImageStage::Encode,
        Some("decode") => ImageStage::Decode,
        _ => ImageStage::Denoise,
    };
    let number = |key| message.get(key).and_then(Value::as_u64).unwrap_or(0) as usize;
    GenerateEvent::Progress {
        stage,
        step: number("step"),
        steps: number("steps"),
        elapsed_ms: elapsed_ms(started),
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}

fn kind(message: &Map<String, Value>) -> &str {
    message.get("type").and_then(Value::as_str).unwrap_or("")
}

/// An `error` message's text, as the runner's own words.
fn reported(message: &Map<String, Value>) -> String {
    let text = message
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("(no message)");
    match message.get("kind").and_then(Value::as_str) {
        Some("insufficient_memory") => format!("ran out of memory: {text}"),
        _ => format!("reported: {text}"),
    }
}

fn declaration(message: &Map<String, Value>) -> Result<Declared, String> {
    let params = message.get("params").cloned().unwrap_or(json!({}));
    serde_json::from_value(params).map_err(|e| format!("declared its parameters wrongly: {e}"))
}

fn prefixed(when: &str) -> String {
    match when {
        "" => String::new(),
        when => format!(" {when}"),
    }
}

fn failure(load: &RunnerLoad, stage: RunnerStage, what: String, stderr: String) -> EngineError {
    let key = match stage {
        RunnerStage::Start => Some(load.launch.command_key.clone()),
        _ => None,
    };
    EngineError::Runner(Box::new(RunnerFailure {
        runner: load.launch.runner.clone(),
        model: load.model.clone(),
        class: load.launch.class.clone(),
        stage,
        what,
        stderr,
        key,
    }))
}

/// A load the runner said ran out of memory is answered as a native one.
fn out_of_memory(load: &RunnerLoad, what: &str) -> Option<EngineError> {
    what.starts_with("ran out of memory")
        .then(|| EngineError::InsufficientMemory {
            device: load.device_name.clone(),
            needed: load.estimated_bytes,
            available: 0,
            in_use: 0,
        })
}

/// Reads a regular file without following a link, at most `max` bytes.
fn read_no_follow(path: &std::path::Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(std::io::Error::other("larger than runners.max_line_bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_named_by_a_runner_is_never_read_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not yours").unwrap();
        let link = dir.path().join("picture.png");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(read_no_follow(&link, 1 << 20).is_err());
        std::fs::write(dir.path().join("real.png"), b"bytes").unwrap();
        assert_eq!(
            read_no_follow(&dir.path().join("real.png"), 1 << 20).unwrap(),
            b"bytes"
        );
        assert!(read_no_follow(&dir.path().join("real.png"), 2).is_err());
    }
}
