//! The inference engine: which models are resident, loading and unloading
//! them, and handing generation jobs to the worker that owns each model.

pub mod cancel;
pub mod chat;
pub mod lora;
pub mod model;
pub mod sampling;
mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device};
use modeld_wire::types::{GenerateEvent, LoadedModel, LoraInfo};
use tokenizers::Tokenizer;

use self::cancel::Cancellation;
use self::chat::ChatTemplate;
use self::model::{read_gguf_header, ModelSpec, TextModel, Weights};
use self::sampling::ValidGenerate;
use self::worker::{Job, Worker};

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
    #[error("the model needs about {needed} bytes; {in_use} of the {budget}-byte memory budget are held by models in use")]
    InsufficientMemory {
        needed: u64,
        budget: u64,
        in_use: u64,
    },
    #[error("inference failed: {0}")]
    Candle(String),
}

impl From<candle_core::Error> for EngineError {
    /// Keeps the message and drops the backtrace candle may attach: it
    /// belongs in a debugger, not in a client's error reply.
    fn from(err: candle_core::Error) -> Self {
        let text = err.to_string();
        EngineError::Candle(text.lines().next().unwrap_or_default().to_string())
    }
}

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
    pub fn choose(device: Option<&str>, dtype: Option<&str>) -> Result<Self, EngineError> {
        let wanted = device.unwrap_or(
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                "cuda:0"
            } else {
                "cpu"
            },
        );
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
                (Device::new_cuda(index)?, format!("cuda:{index}"))
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
pub struct LoadRequest {
    pub name: String,
    /// A model directory or a `.gguf` file.
    pub path: PathBuf,
    pub loras: Vec<LoraInfo>,
    pub placement: Placement,
    /// Unload after this long unused.
    pub keep_alive: Option<std::time::Duration>,
}

pub struct Loaded {
    pub model: LoadedModel,
    pub already_loaded: bool,
    pub evicted: Vec<String>,
}

/// A model in memory and the channel to its worker.
pub struct Resident {
    pub info: LoadedModel,
    keep_alive: Option<std::time::Duration>,
    last_used: Mutex<Instant>,
    busy: std::sync::atomic::AtomicUsize,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
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

    fn is_busy(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a generation; events arrive on `events`, the last with `done`.
    pub fn submit(
        &self,
        request: ValidGenerate,
        events: tokio::sync::mpsc::Sender<GenerateEvent>,
        cancel: Cancellation,
    ) -> Result<(), EngineError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let sender = jobs
            .as_ref()
            .ok_or_else(|| EngineError::NotLoaded(self.info.name.clone()))?;
        sender
            .send(Job {
                request,
                events,
                cancel,
            })
            .map_err(|_| EngineError::NotLoaded(self.info.name.clone()))
    }
}

#[derive(Default)]
pub struct Engine {
    resident: Mutex<HashMap<String, Arc<Resident>>>,
    /// Loads run one at a time: two loads of one model must not both load it,
    /// and memory measurements must not overlap.
    loading: tokio::sync::Mutex<()>,
}

impl Engine {
    pub fn get(&self, name: &str) -> Option<Arc<Resident>> {
        self.resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<LoadedModel> {
        let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        let mut models: Vec<LoadedModel> = resident.values().map(|r| r.info.clone()).collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        models
    }

    /// Loads a model unless it is resident already, first unloading idle
    /// models (least recently used first) when `budget` would be exceeded.
    /// Returns its description, whether it was already there, and what was
    /// evicted.
    pub async fn load(
        &self,
        request: LoadRequest,
        budget: Option<u64>,
    ) -> Result<Loaded, EngineError> {
        let _one_at_a_time = self.loading.lock().await;
        if let Some(resident) = self.get(&request.name) {
            resident.touch();
            return Ok(Loaded {
                model: resident.info.clone(),
                already_loaded: true,
                evicted: Vec::new(),
            });
        }
        let path = request.path.clone();
        let weights = tokio::task::spawn_blocking(move || Weights::find(&path))
            .await
            .map_err(|e| EngineError::Files(format!("load task failed: {e}")))??;
        let estimate = weights.bytes() + weights.bytes() / 5;
        let evicted = match budget {
            Some(budget) => self.make_room(estimate, budget).await?,
            None => Vec::new(),
        };
        let keep_alive = request.keep_alive;
        let resident = tokio::task::spawn_blocking(move || {
            start_worker(
                request.name,
                &request.path,
                &request.loras,
                request.placement,
            )
        })
        .await
        .map_err(|e| EngineError::Files(format!("load task failed: {e}")))??;
        let mut resident = resident;
        resident.keep_alive = keep_alive;
        let info = resident.info.clone();
        self.resident
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(info.name.clone(), Arc::new(resident));
        Ok(Loaded {
            model: info,
            already_loaded: false,
            evicted,
        })
    }

    /// Unloads idle models, least recently used first, until `needed` more
    /// bytes fit in `budget`; refuses when even that is not enough.
    async fn make_room(&self, needed: u64, budget: u64) -> Result<Vec<String>, EngineError> {
        let mut evicted = Vec::new();
        loop {
            let (in_use, victim) = {
                let resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
                let in_use: u64 = resident.values().map(|r| r.info.estimated_bytes).sum();
                let victim = resident
                    .values()
                    .filter(|r| !r.is_busy())
                    .min_by_key(|r| r.last_used())
                    .map(|r| r.info.name.clone());
                (in_use, victim)
            };
            if in_use + needed <= budget {
                return Ok(evicted);
            }
            let Some(victim) = victim else {
                return Err(EngineError::InsufficientMemory {
                    needed,
                    budget,
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
        let before = rss_bytes();
        // Closing the channel ends the worker after the jobs already queued.
        resident
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let thread = resident
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(before.saturating_sub(rss_bytes()))
    }
}

/// A model built from its files, with what generation needs to know.
struct Built {
    model: TextModel,
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
            let model = TextModel::load(&spec, files, loras, placement.dtype, &placement.device)?;
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
            let model = TextModel::load_gguf(file, content, header.arch, &placement.device)?;
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

/// Loads the model at `path` (a directory, or a `.gguf` file with its
/// tokenizer beside it) and starts the thread that will own it.
fn start_worker(
    name: String,
    path: &Path,
    loras: &[LoraInfo],
    placement: Placement,
) -> Result<Resident, EngineError> {
    let started = Instant::now();
    let before = rss_bytes();
    let weights = Weights::find(path)?;
    let dir = if path.is_file() {
        path.parent().unwrap_or(Path::new("/"))
    } else {
        path
    };
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
    let chat_template = ChatTemplate::read(dir)?;
    let file_bytes = weights.bytes();
    let built = build(&weights, dir, loras, &placement)?;
    let info = LoadedModel {
        name: name.clone(),
        arch: built.arch.to_string(),
        device: placement.device_name.clone(),
        dtype: built.dtype,
        path: path.to_path_buf(),
        estimated_bytes: file_bytes + file_bytes / 5,
        measured_bytes: rss_bytes().saturating_sub(before),
        load_ms: started.elapsed().as_millis() as u64,
        loaded_at: crate::registry::unix_now(),
        context_length: built.context_length,
    };
    let worker = Worker {
        model: built.model,
        tokenizer,
        device: placement.device,
        dtype: placement.dtype,
        eos_ids: built.eos_ids,
        context_length: built.context_length,
        chat_template,
    };
    let (jobs, queue) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("model-{name}"))
        .spawn(move || worker.run(queue))
        .map_err(|e| EngineError::Files(format!("cannot start the model thread: {e}")))?;
    tracing::info!(model = %name, arch = %info.arch, ms = info.load_ms, "model loaded");
    Ok(Resident {
        info,
        keep_alive: None,
        last_used: Mutex::new(Instant::now()),
        busy: std::sync::atomic::AtomicUsize::new(0),
        jobs: Mutex::new(Some(jobs)),
        thread: Mutex::new(Some(thread)),
    })
}

/// The process's resident memory, from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    crate::gpu::proc_kib_field(&status, "VmRSS")
}
