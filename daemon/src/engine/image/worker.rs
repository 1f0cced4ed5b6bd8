//! The thread that owns one loaded image pipeline, fed generation jobs
//! through a channel like the text worker: it reports every denoising step,
//! stops between steps when cancelled, and writes the pictures as PNGs.

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::Instant;

use base64::Engine as _;
use modeld_wire::types::{FinishReason, GenerateEvent, ImageFile, ImagesDone};

use super::request::ValidImage;
use super::{output, GeneratedImage, ImageError, ImagePipeline};
use crate::engine::cancel::Cancellation;
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

    fn generate(&self, job: &ImageJob) -> Result<GenerateEvent, EngineError> {
        self.pipeline.check(&job.request.request)?;
        self.check_memory(&job.request)?;
        let started = Instant::now();
        let mut progress = |step: usize, steps: usize| {
            if job.cancel.is_requested() {
                return ControlFlow::Break(());
            }
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let event = GenerateEvent::Progress {
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
        let pictures = match self.pipeline.generate(&job.request.request, &mut progress) {
            Ok(pictures) => pictures,
            Err(ImageError::Cancelled) => {
                let generate_ms = started.elapsed().as_millis() as u64;
                return Ok(self.done(job, Vec::new(), generate_ms, 0));
            }
            Err(err) => return Err(err.into()),
        };
        let generate_ms = started.elapsed().as_millis() as u64;
        let images = write_all(&job.request, &pictures)?;
        let write_ms = (started.elapsed().as_millis() as u64).saturating_sub(generate_ms);
        Ok(self.done(job, images, generate_ms, write_ms))
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
        })
    }
}

/// Writes every picture under the request's output folder.
fn write_all(
    request: &ValidImage,
    pictures: &[GeneratedImage],
) -> Result<Vec<ImageFile>, EngineError> {
    let now = crate::util::unix_now();
    pictures
        .iter()
        .enumerate()
        .map(|(index, picture)| {
            let seed = request.request.seed.wrapping_add(index as u64);
            let stem = output::file_stem(now, seed, index);
            let failed = |message: String| EngineError::Output {
                path: request.output_dir.join(format!("{stem}.png")),
                message,
            };
            let bytes = output::encode_png(picture).map_err(failed)?;
            let path = output::write_png(&request.output_dir, &stem, &bytes)
                .map_err(|e| failed(e.to_string()))?;
            Ok(ImageFile {
                path,
                seed,
                width: picture.width,
                height: picture.height,
                base64: request
                    .inline
                    .then(|| base64::engine::general_purpose::STANDARD.encode(&bytes)),
            })
        })
        .collect()
}
