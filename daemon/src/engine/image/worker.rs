//! The thread that owns one loaded image pipeline, fed generation jobs
//! through a channel like the text worker: it reports every stage's
//! progress, stops midway when cancelled, and writes the pictures as PNGs,
//! all of a request's or none.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::Instant;

use base64::Engine as _;
use modeld_wire::types::{FinishReason, GenerateEvent, ImageFile, ImageStage, ImagesDone};

use super::request::ValidImage;
use super::{output, GeneratedImage, ImageError, ImagePipeline};
use crate::engine::cancel::Cancellation;
use crate::engine::interrupt;
use crate::engine::{EngineError, WorkerEvent};

/// One image generation: the request, where its events go, and a way to
/// stop it.
pub struct ImageJob {
    pub request: ValidImage,
    pub events: tokio::sync::mpsc::Sender<WorkerEvent>,
    pub cancel: Cancellation,
}

pub struct ImageWorker {
    pub pipeline: std::sync::Arc<ImagePipeline>,
    pub device: candle_core::Device,
    pub device_name: String,
}

impl ImageWorker {
    /// Runs jobs in order until every sender is gone; the pipeline is
    /// dropped, and its memory freed, when this returns.
    pub fn run(self, jobs: mpsc::Receiver<ImageJob>) {
        for job in jobs {
            let last = self.generate(&job);
            let _ = job.events.blocking_send(last);
        }
    }

    /// Refuses a request whose attention would not fit in the device's
    /// free memory, naming what it needs, instead of letting the
    /// allocation abort the daemon.
    fn check_memory(&self, request: &ValidImage) -> Result<(), EngineError> {
        let needed = self.pipeline.attention_bytes(&request.request);
        // Unknown free memory is not zero: the run goes ahead.
        let Some(available) = crate::engine::devices::free_bytes(&self.device) else {
            return Ok(());
        };
        if needed > available {
            return Err(EngineError::InsufficientMemory {
                device: self.device_name.clone(),
                needed,
                available,
                in_use: 0,
            });
        }
        Ok(())
    }

    /// On the CPU, refuses a run estimated to take longer than
    /// `scheduler.max_job_s`, naming what to lower, instead of starting
    /// what the deadline would stop anyway.
    fn check_work(&self, request: &ValidImage) -> Result<(), EngineError> {
        if !self.device.is_cpu() {
            return Ok(());
        }
        let cost = self.pipeline.run_cost(&request.request);
        let estimated_s = cost.cpu_seconds();
        tracing::debug!(model = %request.model, ?cost, estimated_s, "image run cost");
        Ok(cost.check_cpu(request.max_job_s)?)
    }

    fn generate(&self, job: &ImageJob) -> Result<GenerateEvent, EngineError> {
        self.pipeline.check(&job.request.request)?;
        self.check_work(&job.request)?;
        self.check_memory(&job.request)?;
        let started = Instant::now();
        let mut progress = |stage: ImageStage, step: usize, steps: usize| {
            if job.cancel.is_requested() {
                return ControlFlow::Break(());
            }
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let event = GenerateEvent::Progress {
                stage,
                step,
                steps,
                elapsed_ms,
            };
            // A closed channel means the client is gone: stop for nobody.
            match job.events.blocking_send(Ok(event)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        };
        let run = interrupt::during(&job.cancel, || {
            self.pipeline.generate(&job.request.request, &mut progress)
        });
        let generate_ms = started.elapsed().as_millis() as u64;
        let pictures = match run {
            Ok(pictures) => pictures,
            // Whatever a stop midway broke is not an error of the model.
            Err(_) if job.cancel.is_requested() => return Ok(self.stopped(job, generate_ms)),
            Err(ImageError::Cancelled) => return Ok(self.stopped(job, generate_ms)),
            Err(err) => return Err(err.into()),
        };
        // Settled before anything is written: a cancel that came first
        // means no file, and one that comes later is refused, so a cancel
        // answered `true` never leaves pictures behind.
        if !job.cancel.settle() {
            return Ok(self.stopped(job, generate_ms));
        }
        let images = write_all(&job.request, &pictures)?;
        let write_ms = (started.elapsed().as_millis() as u64).saturating_sub(generate_ms);
        Ok(self.done(job, images, generate_ms, write_ms))
    }

    /// The final event of a run stopped before its pictures were written.
    fn stopped(&self, job: &ImageJob, generate_ms: u64) -> GenerateEvent {
        self.done(job, Vec::new(), generate_ms, 0)
    }

    /// The final event; without images it says the run was cancelled.
    fn done(
        &self,
        job: &ImageJob,
        images: Vec<ImageFile>,
        generate_ms: u64,
        write_ms: u64,
    ) -> GenerateEvent {
        let request = &job.request.request;
        let finish_reason = if images.is_empty() {
            FinishReason::Cancelled
        } else {
            FinishReason::Length
        };
        GenerateEvent::Images(ImagesDone {
            done: true,
            model: job.request.model.clone(),
            mode: None,
            seed: request.seed,
            size: format!("{}x{}", request.width, request.height),
            steps: self.pipeline.steps_run(request),
            scheduler: self.pipeline.scheduler_name(request).into(),
            images,
            generate_ms,
            write_ms,
            finish_reason,
            video: None,
            videos: Vec::new(),
        })
    }
}

/// Writes every picture under the request's output folder, all or none.
fn write_all(
    request: &ValidImage,
    pictures: &[GeneratedImage],
) -> Result<Vec<ImageFile>, EngineError> {
    let now = crate::util::unix_now();
    let seed_of = |index: usize| request.request.seed.wrapping_add(index as u64);
    let stem_of = |index: usize| output::file_stem(now, seed_of(index), index);
    let encoded = pictures
        .iter()
        .enumerate()
        .map(|(index, picture)| {
            output::encode_png(picture).map_err(|message| EngineError::Output {
                path: request.output_dir.join(format!("{}.png", stem_of(index))),
                message,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pending: Vec<output::Pending> = encoded
        .iter()
        .enumerate()
        .map(|(index, bytes)| output::Pending {
            stem: stem_of(index),
            bytes,
        })
        .collect();
    let paths =
        output::write_all(&request.output_dir, &pending).map_err(|err| EngineError::Output {
            message: err.source.to_string(),
            path: err.path,
        })?;
    let files = paths.into_iter().zip(pictures).zip(&encoded).enumerate();
    Ok(files
        .map(|(index, ((path, picture), bytes))| ImageFile {
            path,
            seed: seed_of(index),
            width: picture.width,
            height: picture.height,
            base64: request
                .inline
                .then(|| base64::engine::general_purpose::STANDARD.encode(bytes)),
        })
        .collect())
}
