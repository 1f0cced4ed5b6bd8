//! The inference engine: which models are resident, loading and unloading
//! them, and handing generation jobs to the worker that owns each model.

pub mod cancel;
pub mod devices;
pub mod estimate;
pub mod image;
pub mod interrupt;
pub mod math;
pub mod request;
pub mod runner;
pub mod text;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device};
use modeld_wire::types::{GenerateEvent, LoadedModel, LoraInfo};
use tokenizers::Tokenizer;

use self::cancel::Cancellation;
pub use self::devices::Devices;
use self::image::worker::{ImageJob, ImageWorker};
use self::image::{ImageError, ImageLoad, ImagePipeline};
use self::request::ValidRequest;
use self::runner::worker::{RunnerJob, RunnerLoad, RunnerWork, RunnerWorker};
use self::runner::RunnerFailure;
use self::text::chat::ChatTemplate;
use self::text::decoder::Decoder;
use self::text::model::{read_gguf_header, ModelSpec, Weights};
use self::text::worker::{Job, Worker};
use crate::validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model files: {0}")]
    Files(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("this model has no chat template; send a prompt instead of messages")]
    NoChatTemplate,
    #[error("the prompt encodes to no tokens")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus max_tokens {max_tokens} exceeds the context length of {context}")]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("{0}")]
    Device(String),
    #[error("model {0:?} is not loaded")]
    NotLoaded(String),
    #[error("the model needs about {needed} bytes on {device}, which has {available} free for it ({in_use} held by models in use)")]
    InsufficientMemory {
        device: String,
        needed: u64,
        available: u64,
        in_use: u64,
    },
    #[error(transparent)]
    BadFile(#[from] BadFile),
    #[error("inference failed: {0}")]
    Candle(String),
    /// A request this model's kind cannot run, or bad image parameters.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("cannot write {}: {message}", path.display())]
    Output { path: PathBuf, message: String },
    #[error("generation cancelled")]
    Cancelled,
    /// A runner process failed to start, load or answer.
    #[error(transparent)]
    Runner(Box<RunnerFailure>),
}

impl From<ImageError> for EngineError {
    /// The image pipeline's errors in the engine's terms: the one place
    /// they are mapped. Candle errors stay `Candle`; a load turns them into
    /// a bad file with [`EngineError::in_file`], as for text models.
    fn from(err: ImageError) -> Self {
        match err {
            ImageError::Files(message) => EngineError::Files(message),
            ImageError::Unsupported(message) => EngineError::Unsupported(message),
            ImageError::Tokenizer(message) => EngineError::Tokenizer(message),
            err @ (ImageError::LoraNoMatch { .. } | ImageError::LoraShape { .. }) => {
                EngineError::Unsupported(err.to_string())
            }
            err @ ImageError::LoraChanged { .. } => EngineError::Files(err.to_string()),
            ImageError::Cancelled => EngineError::Cancelled,
            ImageError::Invalid(err) => EngineError::Invalid(err),
            ImageError::Candle(err) => EngineError::from(err),
        }
    }
}

/// A model file that cannot be read as what it claims to be: truncated,
/// corrupt, or not matching the model's config.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}{}", path.display(), repair_note(repair))]
pub struct BadFile {
    pub path: PathBuf,
    pub message: String,
    /// What was tried to repair it, when something was.
    pub repair: Option<String>,
}

fn repair_note(repair: &Option<String>) -> String {
    repair
        .as_deref()
        .map(|note| format!(" ({note})"))
        .unwrap_or_default()
}

impl BadFile {
    pub fn new(path: &Path, message: impl ToString) -> Self {
        BadFile {
            path: path.to_path_buf(),
            message: message.to_string(),
            repair: None,
        }
    }

    /// The same failure, saying what was tried to repair it.
    pub fn noting(mut self, repair: impl Into<String>) -> Self {
        self.repair = Some(repair.into());
        self
    }

    /// A candle error met while reading `fallback`: the file candle names,
    /// if it names one, is the bad one.
    pub fn from_candle(err: candle_core::Error, fallback: &Path) -> Self {
        let (path, inner) = match err {
            candle_core::Error::WithPath { inner, path } => (path, *inner),
            other => (fallback.to_path_buf(), other),
        };
        BadFile::new(&path, first_line(&inner.to_string()))
    }
}

impl From<candle_core::Error> for EngineError {
    /// Keeps the message and drops the backtrace candle may attach: it
    /// belongs in a debugger, not in a client's error reply.
    fn from(err: candle_core::Error) -> Self {
        EngineError::Candle(first_line(&err.to_string()))
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

impl EngineError {
    /// A candle failure while building a model from `file` is a bad file,
    /// not a failed inference; other errors pass unchanged.
    pub fn in_file(self, file: &Path) -> Self {
        match self {
            EngineError::Candle(message) => EngineError::BadFile(BadFile::new(file, message)),
            other => other,
        }
    }
}

/// What a worker streams for one generation: tokens, progress and a final
/// event, or the error that ended it. The error stays typed until the RPC
/// layer gives it wire form; both kinds of worker send these.
pub type WorkerEvent = Result<GenerateEvent, EngineError>;

/// Where and in what precision a model runs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    pub device_name: String,
    pub dtype: DType,
}

impl Placement {
    /// Parses `cpu` / `cuda` / `cuda:N` and `f32` / `f16` / `bf16`. Without
    /// a choice: the first GPU when built with CUDA and one is present.
    pub fn choose(
        devices: &Devices,
        device: Option<&str>,
        dtype: Option<&str>,
    ) -> Result<Self, EngineError> {
        let wanted = device.unwrap_or(if devices::gpu_count() > 0 {
            "cuda:0"
        } else {
            "cpu"
        });
        let (device, device_name) = match wanted {
            "cpu" => (Device::Cpu, "cpu".to_string()),
            other => {
                let index = match other.strip_prefix("cuda") {
                    Some("") => 0,
                    Some(rest) => rest
                        .strip_prefix(':')
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| {
                            EngineError::Device(format!(
                                "device {other:?}: expected cpu, cuda or cuda:N"
                            ))
                        })?,
                    None => {
                        return Err(EngineError::Device(format!(
                            "device {other:?}: expected cpu, cuda or cuda:N"
                        )))
                    }
                };
                if !cfg!(feature = "cuda") {
                    return Err(EngineError::Device(
                        "this modeld was built without CUDA (cargo build --features cuda)".into(),
                    ));
                }
                (devices.cuda(index)?, format!("cuda:{index}"))
            }
        };
        let dtype = match dtype {
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
            Some("f32") => DType::F32,
            Some("f16") => DType::F16,
            Some("bf16") => DType::BF16,
            Some(other) => {
                return Err(EngineError::Device(format!(
                    "dtype {other:?}: expected f32, f16 or bf16"
                )))
            }
        };
        Ok(Placement {
            device,
            device_name,
            dtype,
        })
    }
}

/// What to load and how.
#[derive(Clone)]
pub struct LoadRequest {
    pub name: String,
    /// A model directory or a `.gguf` file.
    pub path: PathBuf,
    pub loras: Vec<LoraInfo>,
    pub placement: Placement,
    /// Unload after this long unused.
    pub keep_alive: Option<std::time::Duration>,
    /// Generations a text model runs together at most.
    pub max_batch: usize,
    /// An image model's components kept in files apart from it.
    pub parts: image::ImageParts,
    /// Run by this runner process instead of natively.
    pub runner: Option<runner::process::Launch>,
}

pub struct Loaded {
    pub model: LoadedModel,
    pub already_loaded: bool,
    pub evicted: Vec<String>,
}

/// How much memory models may take on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// A fixed size per device (`scheduler.memory_budget = "12G"`).
    Fixed(u64),
    /// What the device has free right now, less a reserve (`"auto"`).
    Live,
}

/// Memory kept free under a live budget: CUDA's workspaces, the daemon's
/// own heap, the rest of the system.
const LIVE_RESERVE: u64 = 512 << 20;

/// The channel to a resident model's worker, by the kind of model.
enum WorkerQueue {
    Text(mpsc::Sender<Job>),
    Image(mpsc::Sender<ImageJob>),
    Runner(mpsc::Sender<RunnerWork>),
}

/// A model in memory and the channel to its worker.
pub struct Resident {
    pub info: LoadedModel,
    device: Device,
    keep_alive: Option<std::time::Duration>,
    last_used: Mutex<Instant>,
    busy: std::sync::atomic::AtomicUsize,
    jobs: Mutex<Option<WorkerQueue>>,
    /// The worker thread; a runner's says what its process held.
    thread: Mutex<Option<JoinHandle<Option<u64>>>>,
    /// A runner model's liveness: cleared when its process died, so the
    /// next request starts a fresh one.
    alive: Option<Arc<AtomicBool>>,
    /// A runner model's launch, when its runner can swap LoRAs in place.
    swappable: Option<runner::process::Launch>,
    /// An image model's pipeline, shared with its worker, from which
    /// another LoRA set of the same base is derived in memory.
    pipeline: Mutex<Option<Arc<ImagePipeline>>>,
    /// An image model's components kept apart, part of what it is.
    parts: image::ImageParts,
}

/// Marks a resident model busy while it lives, so it is never evicted or
/// expired mid-job, and records the use when dropped.
pub struct BusyGuard(Arc<Resident>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Resident {
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        BusyGuard(self.clone())
    }

    /// Whether the model is a text model, whose worker batches generations.
    pub fn runs_text(&self) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        matches!(jobs.as_ref(), Some(WorkerQueue::Text(_)))
    }

    /// False once a runner model's process has died.
    fn is_alive(&self) -> bool {
        self.alive
            .as_ref()
            .is_none_or(|alive| alive.load(Ordering::SeqCst))
    }

    fn is_busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a generation as this model's kind runs it; a request only
    /// the other kind can run is refused naming its parameter. Events
    /// arrive on `events`, the last with `done`.
    pub fn submit(
        &self,
        request: ValidRequest,
        events: tokio::sync::mpsc::Sender<WorkerEvent>,
        cancel: Cancellation,
    ) -> Result<(), EngineError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let queue = jobs
            .as_ref()
            .ok_or_else(|| EngineError::NotLoaded(self.info.name.clone()))?;
        let sent = match queue {
            WorkerQueue::Text(sender) => sender
                .send(Job {
                    request: request.text?,
                    events,
                    cancel,
                })
                .is_ok(),
            WorkerQueue::Image(sender) => sender
                .send(ImageJob {
                    request: request.image?,
                    events,
                    cancel,
                })
                .is_ok(),
            WorkerQueue::Runner(sender) => sender
                .send(RunnerWork::Generate(Box::new(RunnerJob {
                    request: request.runner,
                    events,
                    cancel,
                })))
                .is_ok(),
        };
        if !sent {
            return Err(EngineError::NotLoaded(self.info.name.clone()));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct Engine {
    pub devices: Devices,
    resident: Mutex<HashMap<String, Arc<Resident>>>,
    /// Loads run one at a time: two loads of one model must not both load it,
    /// and memory measurements must not overlap.
    loading: tokio::sync::Mutex<()>,
}

impl Engine {
    pub fn get(&self, name: &str) -> Option<Arc<Resident>> {
        self.forget_dead();
        self.resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Drops runner models whose process died: they are no longer loaded,
    /// and the next request for one starts a fresh runner.
    fn forget_dead(&self) {
        let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        resident.retain(|name, model| {
            let alive = model.is_alive();
            if !alive {
                tracing::warn!(model = %name, "its runner died; the model is unloaded");
            }
            alive
        });
    }

    pub fn list(&self) -> Vec<LoadedModel> {
        self.forget_dead();
        let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        let mut models: Vec<LoadedModel> = resident.values().map(|r| r.info.clone()).collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        models
    }

    /// Loads a model unless it is resident already, first unloading idle
    /// models (least recently used first) when `budget` would be exceeded.
    /// Returns its description, whether it was already there, and what was
    /// evicted.
    pub async fn load(&self, request: LoadRequest, budget: Budget) -> Result<Loaded, EngineError> {
        let _one_at_a_time = self.loading.lock().await;
        if let Some(resident) = self.get(&request.name) {
            resident.touch();
            return Ok(Loaded {
                model: resident.info.clone(),
                already_loaded: true,
                evicted: Vec::new(),
            });
        }
        self.forget_dead();
        if request.runner.is_some() {
            return self.load_runner(request, budget).await;
        }
        if let Some(loaded) = self.remerge(&request).await? {
            return Ok(loaded);
        }
        let (path, mut parts) = (request.path.clone(), request.parts.clone());
        // On the CPU the encoders are in system memory either way.
        parts.offload_text_encoders &= !request.placement.device.is_cpu();
        let dtype = request.placement.dtype;
        let (files, estimate) = tokio::task::spawn_blocking(move || inspect(&path, &parts, dtype))
            .await
            .map_err(|e| EngineError::Files(format!("load task failed: {e}")))??;
        let evicted = self
            .make_room(&request.placement, estimate.total(), budget)
            .await?;
        let keep_alive = request.keep_alive;
        self.start_and_admit(
            move || start_worker(&request, files, estimate),
            keep_alive,
            evicted,
        )
        .await
    }

    /// Runs `start` (a worker or a runner coming up) off the async threads
    /// and admits the model it made.
    async fn start_and_admit(
        &self,
        start: impl FnOnce() -> Result<Resident, EngineError> + Send + 'static,
        keep_alive: Option<std::time::Duration>,
        evicted: Vec<String>,
    ) -> Result<Loaded, EngineError> {
        let resident = tokio::task::spawn_blocking(start)
            .await
            .map_err(|e| EngineError::Files(format!("load task failed: {e}")))??;
        Ok(Loaded {
            model: self.admit(resident, keep_alive),
            already_loaded: false,
            evicted,
        })
    }

    /// Starts the model's runner process and loads the model through it,
    /// after making room for its estimate like any model.
    async fn load_runner(
        &self,
        request: LoadRequest,
        budget: Budget,
    ) -> Result<Loaded, EngineError> {
        if let Some(loaded) = self.swap_runner_loras(&request).await? {
            return Ok(loaded);
        }
        let load = runner_load(&request)?;
        let estimated_bytes = load.estimated_bytes;
        let evicted = self
            .make_room(&request.placement, estimated_bytes, budget)
            .await?;
        let keep_alive = request.keep_alive;
        self.start_and_admit(move || start_runner(&request, load), keep_alive, evicted)
            .await
    }

    /// Another LoRA set of an idle runner model of the same files, runner
    /// and placement, whose runner declared it can swap adapters: put in
    /// place by that runner, which then serves under the new name. `None`
    /// when there is no such model (the caller starts a runner).
    async fn swap_runner_loras(
        &self,
        request: &LoadRequest,
    ) -> Result<Option<Loaded>, EngineError> {
        let Some(sibling) = self.swappable_sibling(request) else {
            return Ok(None);
        };
        let started = Instant::now();
        let (done, outcome) = mpsc::channel();
        let sent = {
            let jobs = sibling.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let swap = RunnerWork::SwapLoras {
                loras: request.loras.clone(),
                done,
            };
            matches!(jobs.as_ref(), Some(WorkerQueue::Runner(sender)) if sender.send(swap).is_ok())
        };
        if !sent {
            return Ok(None);
        }
        let outcome = tokio::task::spawn_blocking(move || outcome.recv())
            .await
            .map_err(|e| EngineError::Files(format!("load task failed: {e}")))?;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(_) => return Ok(None),
        }
        let renamed = self.rename_runner(&sibling, request, started);
        tracing::info!(model = %request.name, from = %sibling.info.name, "LoRAs swapped in the running runner");
        Ok(Some(Loaded {
            model: self.admit(renamed, request.keep_alive),
            already_loaded: false,
            evicted: vec![sibling.info.name.clone()],
        }))
    }

    fn swappable_sibling(&self, request: &LoadRequest) -> Option<Arc<Resident>> {
        let dtype = format!("{:?}", request.placement.dtype).to_lowercase();
        let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        resident
            .values()
            .find(|r| {
                let same_runner = r.swappable.as_ref().zip(request.runner.as_ref());
                same_runner.is_some_and(|(theirs, ours)| theirs.same_runner(ours))
                    && r.info.path == request.path
                    && r.parts == request.parts
                    && r.info.device == request.placement.device_name
                    && r.info.dtype == dtype
                    && !r.is_busy()
            })
            .cloned()
    }

    /// The sibling's runner under the new request's name and LoRAs; the
    /// sibling leaves the resident set.
    fn rename_runner(
        &self,
        sibling: &Arc<Resident>,
        request: &LoadRequest,
        started: Instant,
    ) -> Resident {
        self.resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sibling.info.name);
        let jobs = taken(&sibling.jobs);
        let thread = taken(&sibling.thread);
        let mut info = sibling.info.clone();
        info.name = request.name.clone();
        info.loras = request.loras.clone();
        info.load_ms = started.elapsed().as_millis() as u64;
        info.loaded_at = crate::util::unix_now();
        Resident {
            info,
            device: sibling.device.clone(),
            keep_alive: None,
            last_used: Mutex::new(Instant::now()),
            busy: std::sync::atomic::AtomicUsize::new(0),
            jobs: Mutex::new(jobs),
            thread: Mutex::new(thread),
            alive: sibling.alive.clone(),
            swappable: sibling.swappable.clone(),
            pipeline: Mutex::new(None),
            parts: sibling.parts.clone(),
        }
    }

    /// Makes a freshly loaded model resident, unloaded after `keep_alive`
    /// unused; returns its description.
    fn admit(
        &self,
        mut resident: Resident,
        keep_alive: Option<std::time::Duration>,
    ) -> LoadedModel {
        resident.keep_alive = keep_alive;
        let info = resident.info.clone();
        self.resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.clone(), Arc::new(resident));
        info
    }

    /// An image model with another LoRA set of a resident, idle image model
    /// (the same files, device and dtype) is derived from that one in
    /// memory, which it then replaces: the base is not read from disk
    /// again, and only the tensors whose adapters change are computed.
    /// `None` when there is no such model, or an adapter to unmerge changed
    /// on disk: the model is then loaded from its files.
    async fn remerge(&self, request: &LoadRequest) -> Result<Option<Loaded>, EngineError> {
        let Some((sibling, base)) = self.idle_sibling(request) else {
            return Ok(None);
        };
        let started = Instant::now();
        let (device, loras) = (request.placement.device.clone(), request.loras.clone());
        let derive = move || {
            let before = devices::used_bytes(&device);
            base.with_loras(&loras).map(|pipeline| (pipeline, before))
        };
        let (pipeline, before) = match tokio::task::spawn_blocking(derive)
            .await
            .map_err(|e| EngineError::Files(format!("load task failed: {e}")))?
        {
            Ok(derived) => derived,
            Err(err @ ImageError::LoraChanged { .. }) => {
                tracing::warn!(model = %request.name, "{err}; loading the base from its files");
                return Ok(None);
            }
            Err(err) => return Err(EngineError::from(err).in_file(&request.path)),
        };
        self.unload_resident(&sibling.name).await?;
        let measure = request.placement.device.clone();
        let after = tokio::task::spawn_blocking(move || devices::used_bytes(&measure))
            .await
            .unwrap_or(before);
        let measured_bytes = (sibling.measured_bytes + after).saturating_sub(before);
        tracing::info!(model = %request.name, from = %sibling.name, ms = started.elapsed().as_millis() as u64, "LoRAs re-merged in memory");
        let image = ImageBuilt {
            pipeline,
            estimated_bytes: sibling.estimated_bytes,
            measured_bytes,
            started,
        };
        let resident = image_resident(request, image)?;
        Ok(Some(Loaded {
            model: self.admit(resident, request.keep_alive),
            already_loaded: false,
            evicted: vec![sibling.name],
        }))
    }

    /// An idle resident image model of `request`'s files on its device at
    /// its dtype, and its pipeline.
    fn idle_sibling(&self, request: &LoadRequest) -> Option<(LoadedModel, Arc<ImagePipeline>)> {
        let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        resident.values().find_map(|r| {
            let fits = r.info.path == request.path
                && r.parts == request.parts
                && r.info.device == request.placement.device_name
                && !r.is_busy();
            let pipeline = r
                .pipeline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .filter(|p| fits && p.dtype() == request.placement.dtype)?;
            Some((r.info.clone(), pipeline))
        })
    }

    /// Unloads idle models on the placement's device, least recently used
    /// first, until `needed` more bytes fit there; refuses, naming the
    /// device, when even that is not enough.
    async fn make_room(
        &self,
        placement: &Placement,
        needed: u64,
        budget: Budget,
    ) -> Result<Vec<String>, EngineError> {
        let mut evicted = Vec::new();
        loop {
            let (in_use, victim) = {
                let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
                let here: Vec<&Arc<Resident>> = resident
                    .values()
                    .filter(|r| r.info.device == placement.device_name)
                    .collect();
                let in_use: u64 = here.iter().map(|r| r.info.estimated_bytes).sum();
                let victim = here
                    .iter()
                    .filter(|r| !r.is_busy())
                    .min_by_key(|r| r.last_used())
                    .map(|r| r.info.name.clone());
                (in_use, victim)
            };
            let available = match budget {
                Budget::Fixed(size) => size.saturating_sub(in_use),
                Budget::Live => match devices::free_bytes(&placement.device) {
                    Some(free) => free.saturating_sub(LIVE_RESERVE),
                    None => {
                        // Unknown is not zero: let the load try; running
                        // out of memory there is caught and answered.
                        tracing::warn!(device = %placement.device_name, "free memory unknown; loading without a budget check");
                        return Ok(evicted);
                    }
                },
            };
            if needed <= available {
                return Ok(evicted);
            }
            let Some(victim) = victim else {
                return Err(EngineError::InsufficientMemory {
                    device: placement.device_name.clone(),
                    needed,
                    available,
                    in_use,
                });
            };
            tracing::info!(model = %victim, "evicting the least recently used idle model");
            self.unload_resident(&victim).await?;
            evicted.push(victim);
        }
    }

    /// Idle models whose keep-alive has run out.
    pub fn expired(&self) -> Vec<String> {
        let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        resident
            .values()
            .filter(|r| !r.is_busy())
            .filter(|r| {
                r.keep_alive
                    .is_some_and(|ttl| r.last_used().elapsed() >= ttl)
            })
            .map(|r| r.info.name.clone())
            .collect()
    }

    /// Drops the model once its queued jobs finish; returns the resident
    /// memory released.
    pub async fn unload(&self, name: &str) -> Result<u64, EngineError> {
        let _one_at_a_time = self.loading.lock().await;
        self.unload_resident(name).await
    }

    async fn unload_resident(&self, name: &str) -> Result<u64, EngineError> {
        let resident = self
            .resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| EngineError::NotLoaded(name.to_string()))?;
        let device = resident.device.clone();
        // Measured while the worker still holds the model: closing its
        // channel below lets it end and drop the weights at any moment.
        let measure = device.clone();
        let before = tokio::task::spawn_blocking(move || devices::used_bytes(&measure))
            .await
            .unwrap_or(0);
        // Closing the channel ends the worker after the jobs already queued;
        // the worker then holds the last reference to an image pipeline.
        taken(&resident.jobs);
        taken(&resident.pipeline);
        let thread = taken(&resident.thread);
        tokio::task::spawn_blocking(move || {
            let held = thread.and_then(|thread| thread.join().ok().flatten());
            if let Some(held) = held {
                // A runner's process is gone, and with it what it held.
                return held;
            }
            // The worker dropped the weights and caches; hand them back.
            devices::release(&device);
            before.saturating_sub(devices::used_bytes(&device))
        })
        .await
        .map_err(|e| EngineError::Files(format!("unload task failed: {e}")))
    }
}

/// What a model's files are: a text model's weights, or an image model.
enum ModelFiles {
    Text(Weights),
    Image,
}

/// Finds out what kind of model `path` holds and estimates its memory.
fn inspect(
    path: &Path,
    parts: &image::ImageParts,
    dtype: DType,
) -> Result<(ModelFiles, estimate::Estimate), EngineError> {
    if is_image_model(path) {
        let estimate = estimate::image_estimate(path, parts, dtype)?;
        return Ok((ModelFiles::Image, estimate));
    }
    let weights = Weights::find(path)?;
    let estimate = estimate::estimate(&weights, model_dir(path), dtype)?;
    Ok((ModelFiles::Text(weights), estimate))
}

/// A diffusers folder (it has `model_index.json`), or a single-file
/// `.safetensors` SD checkpoint or FLUX transformer.
fn is_image_model(path: &Path) -> bool {
    image::Family::of(path).is_some()
}

/// The directory holding a model's config and tokenizer.
fn model_dir(path: &Path) -> &Path {
    if path.is_file() {
        path.parent().unwrap_or(Path::new("/"))
    } else {
        path
    }
}

/// A model built from its files, with what generation needs to know.
struct Built {
    model: Decoder,
    arch: &'static str,
    dtype: String,
    context_length: usize,
    eos_ids: Vec<u32>,
}

fn build(
    weights: &Weights,
    dir: &Path,
    loras: &[LoraInfo],
    placement: &Placement,
) -> Result<Built, EngineError> {
    match weights {
        Weights::Safetensors(files) => {
            let spec = ModelSpec::read(dir)?;
            let model = text::build::from_safetensors(
                &spec,
                files,
                loras,
                placement.dtype,
                &placement.device,
            )
            .map_err(|e| e.in_file(&weights.path()))?;
            Ok(Built {
                model,
                arch: spec.arch,
                dtype: format!("{:?}", placement.dtype).to_lowercase(),
                context_length: spec.context_length,
                eos_ids: spec.eos_ids,
            })
        }
        Weights::Gguf(_) if !loras.is_empty() => Err(EngineError::Unsupported(
            "LoRA adapters apply to safetensors models, not GGUF".into(),
        )),
        Weights::Gguf(file) => {
            let (content, header) = read_gguf_header(file)?;
            let model = text::gguf::from_gguf(file, content, header.arch, &placement.device)
                .map_err(|e| e.in_file(file))?;
            // A config.json beside the file may name more end-of-sequence ids.
            let mut eos_ids: Vec<u32> = header.eos_id.into_iter().collect();
            if let Ok(spec) = ModelSpec::read(dir) {
                eos_ids.extend(spec.eos_ids);
            }
            Ok(Built {
                model,
                arch: header.arch,
                dtype: "gguf".to_string(),
                context_length: header.context_length.unwrap_or(4096),
                eos_ids,
            })
        }
    }
}

/// Loads the model at `path` (a text model's directory, or a `.gguf` file
/// with its tokenizer beside it; an image model's diffusers folder or
/// single-file checkpoint) and starts the thread that will own it.
fn start_worker(
    request: &LoadRequest,
    files: ModelFiles,
    estimate: estimate::Estimate,
) -> Result<Resident, EngineError> {
    match files {
        ModelFiles::Text(weights) => {
            let text = TextLoad {
                weights,
                loras: &request.loras,
                max_batch: request.max_batch,
            };
            let (name, placement) = (request.name.clone(), request.placement.clone());
            start_text_worker(name, &request.path, text, estimate, placement)
        }
        ModelFiles::Image => start_image_worker(request, &estimate),
    }
}

/// Runs `build` on the placement's device and measures what it took. A
/// panic inside candle (it unwraps some CUDA errors) is caught here: out of
/// memory becomes `InsufficientMemory`, anything else a load failure, and
/// what the attempt allocated is handed back either way.
fn build_measured<T>(
    placement: &Placement,
    estimate: &estimate::Estimate,
    build: impl FnOnce() -> Result<T, EngineError>,
) -> Result<(T, u64), EngineError> {
    let before = devices::used_bytes(&placement.device);
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build));
    let built = match attempt {
        Ok(Ok(built)) => built,
        Ok(Err(err)) => {
            devices::release(&placement.device);
            return Err(out_of_memory(err, placement, estimate.total()));
        }
        Err(panic) => {
            devices::release(&placement.device);
            let message = panic_message(panic.as_ref());
            let err = EngineError::Files(format!("loading failed inside candle: {message}"));
            return Err(out_of_memory(err, placement, estimate.total()));
        }
    };
    let measured = devices::used_bytes(&placement.device).saturating_sub(before);
    Ok((built, measured))
}

/// The thread that owns model `name`, running `work`.
fn spawn_model_thread(
    name: &str,
    work: impl FnOnce() -> Option<u64> + Send + 'static,
) -> Result<JoinHandle<Option<u64>>, EngineError> {
    std::thread::Builder::new()
        .name(format!("model-{name}"))
        .spawn(work)
        .map_err(|e| EngineError::Files(format!("cannot start the model thread: {e}")))
}

fn resident(
    info: LoadedModel,
    device: Device,
    queue: WorkerQueue,
    thread: JoinHandle<Option<u64>>,
    pipeline: Option<Arc<ImagePipeline>>,
) -> Resident {
    tracing::info!(model = %info.name, arch = %info.arch, ms = info.load_ms, "model loaded");
    Resident {
        info,
        device,
        keep_alive: None,
        last_used: Mutex::new(Instant::now()),
        busy: std::sync::atomic::AtomicUsize::new(0),
        jobs: Mutex::new(Some(queue)),
        thread: Mutex::new(Some(thread)),
        alive: None,
        swappable: None,
        pipeline: Mutex::new(pipeline),
        parts: image::ImageParts::default(),
    }
}

/// What loading a text model takes beyond its name, path and placement.
struct TextLoad<'a> {
    weights: Weights,
    loras: &'a [LoraInfo],
    max_batch: usize,
}

fn start_text_worker(
    name: String,
    path: &Path,
    load: TextLoad,
    estimate: estimate::Estimate,
    placement: Placement,
) -> Result<Resident, EngineError> {
    let TextLoad {
        weights,
        loras,
        max_batch,
    } = load;
    let started = Instant::now();
    let dir = model_dir(path);
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tokenizer_path).map_err(|e| BadFile::new(&tokenizer_path, e))?;
    let chat_template = ChatTemplate::read(dir)?;
    let (built, measured_bytes) = build_measured(&placement, &estimate, || {
        build(&weights, dir, loras, &placement)
    })?;
    let info = LoadedModel {
        name: name.clone(),
        arch: built.arch.to_string(),
        device: placement.device_name.clone(),
        dtype: built.dtype,
        path: path.to_path_buf(),
        estimated_bytes: estimate.total(),
        kv_cache_bytes: estimate.kv_cache,
        measured_bytes,
        load_ms: started.elapsed().as_millis() as u64,
        loaded_at: crate::util::unix_now(),
        context_length: built.context_length,
        loras: loras.to_vec(),
    };
    // The batch may fill the KV cache the budget counted for this model.
    let per_token = built.model.shape.kv_bytes_per_token(built.model.kv_dtype);
    let kv_tokens = (estimate.kv_cache / per_token.max(1)) as usize;
    let worker = Worker {
        model: built.model,
        tokenizer,
        eos_ids: built.eos_ids,
        context_length: built.context_length,
        chat_template,
        max_batch,
        kv_tokens,
    };
    let (jobs, queue) = mpsc::channel();
    let thread = spawn_model_thread(&name, move || {
        worker.run(queue);
        None
    })?;
    Ok(resident(
        info,
        placement.device,
        WorkerQueue::Text(jobs),
        thread,
        None,
    ))
}

/// Loads an image pipeline (see `ImagePipeline::load`).
fn build_image(request: &LoadRequest) -> Result<ImagePipeline, EngineError> {
    let placement = &request.placement;
    let options = ImageLoad {
        device: placement.device.clone(),
        dtype: placement.dtype,
        loras: request.loras.clone(),
    };
    let path = &request.path;
    ImagePipeline::load(path, &request.parts, &options)
        .map_err(|err| EngineError::from(err).in_file(path))
}

fn start_image_worker(
    request: &LoadRequest,
    estimate: &estimate::Estimate,
) -> Result<Resident, EngineError> {
    let started = Instant::now();
    let placement = &request.placement;
    let (pipeline, measured_bytes) = build_measured(placement, estimate, || build_image(request))?;
    let image = ImageBuilt {
        pipeline,
        estimated_bytes: estimate.total(),
        measured_bytes,
        started,
    };
    image_resident(request, image)
}

/// An image pipeline just built, its memory (estimated and measured) and
/// when its load began.
struct ImageBuilt {
    pipeline: ImagePipeline,
    estimated_bytes: u64,
    measured_bytes: u64,
    started: Instant,
}

/// Starts the thread that owns `built`, the pipeline `request` asked for.
fn image_resident(request: &LoadRequest, built: ImageBuilt) -> Result<Resident, EngineError> {
    let placement = &request.placement;
    let info = LoadedModel {
        name: request.name.clone(),
        arch: built.pipeline.arch().to_string(),
        device: placement.device_name.clone(),
        dtype: format!("{:?}", placement.dtype).to_lowercase(),
        path: request.path.clone(),
        estimated_bytes: built.estimated_bytes,
        kv_cache_bytes: 0,
        measured_bytes: built.measured_bytes,
        load_ms: built.started.elapsed().as_millis() as u64,
        loaded_at: crate::util::unix_now(),
        context_length: 0,
        loras: built.pipeline.loras(),
    };
    let pipeline = Arc::new(built.pipeline);
    let worker = ImageWorker {
        pipeline: pipeline.clone(),
        device: placement.device.clone(),
        device_name: placement.device_name.clone(),
    };
    let (jobs, queue) = mpsc::channel();
    let thread = spawn_model_thread(&request.name, move || {
        worker.run(queue);
        None
    })?;
    let mut resident = resident(
        info,
        placement.device.clone(),
        WorkerQueue::Image(jobs),
        thread,
        Some(pipeline),
    );
    resident.parts = request.parts.clone();
    Ok(resident)
}

/// An error whose text says the device ran out of memory becomes
/// `InsufficientMemory` with the device's figures; others pass unchanged.
fn out_of_memory(err: EngineError, placement: &Placement, needed: u64) -> EngineError {
    let text = err.to_string().to_lowercase();
    if text.contains("out_of_memory") || text.contains("out of memory") {
        return EngineError::InsufficientMemory {
            device: placement.device_name.clone(),
            needed,
            available: devices::free_bytes(&placement.device).unwrap_or(0),
            in_use: 0,
        };
    }
    err
}

/// The text of a caught panic, first line only.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    first_line(text)
}

/// What the runner is told to load: the pipeline folder and the single
/// file that replaces its transformer, on which device, at which dtype.
fn runner_load(request: &LoadRequest) -> Result<RunnerLoad, EngineError> {
    let launch = request.runner.clone().expect("a runner request");
    let (pipeline, transformer) = match request.path.is_file() {
        true => (request.parts.config_dir.clone(), Some(request.path.clone())),
        false => (Some(request.path.clone()), None),
    };
    let placement = &request.placement;
    let gpu = match &placement.device {
        Device::Cpu => None,
        _ => Some(
            placement
                .device_name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        ),
    };
    let (dtype, dtype_bytes) = match placement.dtype {
        DType::F16 => ("float16", 2),
        DType::BF16 => ("bfloat16", 2),
        _ => ("float32", 4),
    };
    Ok(RunnerLoad {
        model: request.name.clone(),
        estimated_bytes: runner::estimate_bytes(
            pipeline.as_deref(),
            transformer.as_deref(),
            dtype_bytes,
        ),
        launch,
        pipeline,
        transformer,
        loras: request.loras.clone(),
        gpu,
        device_name: placement.device_name.clone(),
        dtype,
    })
}

/// Starts the thread that owns the runner; it starts the process (which
/// dies with that thread) and loads the model, and the load's outcome
/// comes back here.
fn start_runner(request: &LoadRequest, load: RunnerLoad) -> Result<Resident, EngineError> {
    let started = Instant::now();
    let (ready_sender, ready) = mpsc::channel();
    let (jobs, queue) = mpsc::channel();
    let estimated_bytes = load.estimated_bytes;
    let thread = spawn_model_thread(&request.name, move || {
        let (worker, info) = match RunnerWorker::start(load) {
            Ok(started) => started,
            Err(err) => {
                let _ = ready_sender.send(Err(err));
                return None;
            }
        };
        let measured = runner::memory::held_bytes(info.pid, worker.on_gpu());
        let alive = worker.alive.clone();
        if ready_sender.send(Ok((info, measured, alive))).is_err() {
            return Some(0);
        }
        worker.run(queue)
    })?;
    let (ready, measured_bytes, alive) = match ready.recv() {
        Ok(Ok(ready)) => ready,
        Ok(Err(err)) => {
            let _ = thread.join();
            return Err(err);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(EngineError::Files(
                "the runner's thread ended during the load".into(),
            ));
        }
    };
    let placement = &request.placement;
    let info = LoadedModel {
        name: request.name.clone(),
        arch: ready.class,
        device: placement.device_name.clone(),
        dtype: format!("{:?}", placement.dtype).to_lowercase(),
        path: request.path.clone(),
        estimated_bytes,
        kv_cache_bytes: 0,
        measured_bytes,
        load_ms: started.elapsed().as_millis() as u64,
        loaded_at: crate::util::unix_now(),
        context_length: 0,
        loras: request.loras.clone(),
    };
    let mut resident = resident(
        info,
        placement.device.clone(),
        WorkerQueue::Runner(jobs),
        thread,
        None,
    );
    resident.alive = Some(alive);
    if ready.swap_loras {
        resident.swappable = request.runner.clone();
    }
    resident.parts = request.parts.clone();
    Ok(resident)
}

/// What a resident's slot held, leaving it empty.
fn taken<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}
