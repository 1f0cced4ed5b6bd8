//! The job queue: generations, mode switches and unloads start in arrival
//! order. Generations on one loaded text model (in one mode) run together,
//! up to `scheduler.max_batch`, and the model's worker decodes them as one
//! batch; any other job waits until the running ones have finished, and
//! jobs behind it wait for it. A generation naming a mode other than the
//! one that will be current when it runs gets a switch queued before it.
//! The queue is bounded; a full queue refuses new work with `queue_full`. A
//! job, once accepted, runs exactly once unless it is cancelled (or, at
//! shutdown, refused while still queued); how it ended is kept in
//! [`history`].

pub mod error;
mod eta;
pub mod history;
mod metrics_timing;
pub mod ticket;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modeld_wire::types::{Event, FinishReason, GenerateEvent, JobInfo, QueueStatus, SwitchReply};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::engine::cancel::{Cancellation, Stop};
use crate::engine::request::ValidRequest;
use crate::engine::WorkerEvent;
use crate::loader;
use crate::state::AppState;
pub use error::{JobError, JobEvent};
pub use eta::Place;
use history::History;
pub use history::{JobOutcome, JobStage, SwitchFailure};

/// Events a client may leave unread before generation waits for it.
const EVENT_BUFFER: usize = 256;

/// How often a job waiting behind running ones is looked at again.
const RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

pub enum Work {
    Generate {
        /// Boxed: both kinds' validated requests make it the largest job.
        request: Box<ValidRequest>,
        mode: Option<String>,
        events: mpsc::Sender<JobEvent>,
    },
    Switch {
        to: String,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<u64, Arc<JobError>>>,
    },
    /// Unloads a model whose keep-alive ran out, if it still has.
    Expire {
        name: String,
    },
}

/// Every second, queues the unload of models idle past their keep-alive.
/// Through the queue, so it never races a generation.
pub async fn expire_idle_models(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        if state.is_shutting_down() {
            return;
        }
        for name in state.engine.expired() {
            state.scheduler.submit_expire(name);
        }
    }
}

/// A running generation: where its events go and how it is cancelled.
struct GenerateJob {
    id: u64,
    mode: Option<String>,
    events: mpsc::Sender<JobEvent>,
    cancel: Cancellation,
    /// `scheduler.max_job_s` when the job started.
    max_job_s: u64,
}

impl GenerateJob {
    /// Tells the client why the generation could not run, unless a stop
    /// came first: then it is told why it was stopped.
    async fn fail(&self, err: JobError) -> JobOutcome {
        let event = if self.cancel.settle() {
            Err(Arc::new(err))
        } else {
            self.stopped_event()
        };
        let outcome = JobOutcome::of_event(&event).unwrap_or(JobOutcome::Cancelled);
        let _ = self.events.send(event).await;
        outcome
    }

    /// The final event of a job that was stopped before it ended.
    fn stopped_event(&self) -> JobEvent {
        let err = match self.cancel.stopped() {
            Some(Stop::TimedOut) => JobError::TimedOut {
                job: self.id,
                limit_s: self.max_job_s,
            },
            Some(Stop::ShutDown) => JobError::ShuttingDown,
            Some(Stop::Cancelled) | None => JobError::Cancelled { job: self.id },
        };
        Err(Arc::new(err))
    }

    /// A worker's event as the client gets it: the final one names the
    /// mode, and settles the job, so a stop acknowledged before that
    /// decides the ending. A run cancelled or stopped by a shutdown keeps
    /// its final event, with `finish_reason: cancelled` (and the text so
    /// far); a timed out one ends with the `timeout` error.
    fn as_sent(&self, event: WorkerEvent) -> JobEvent {
        let last = !matches!(
            event,
            Ok(GenerateEvent::Token { .. } | GenerateEvent::Progress { .. })
        );
        let stopped = last && !self.cancel.settle();
        let stop = if stopped { self.cancel.stopped() } else { None };
        let mut event = match (stop, event) {
            (Some(Stop::TimedOut), _) | (Some(_), Err(_)) => return self.stopped_event(),
            (None, Err(err)) => return Err(Arc::new(err.into())),
            (_, Ok(event)) => event,
        };
        let cancelled = stop.is_some();
        match &mut event {
            GenerateEvent::Token { .. }
            | GenerateEvent::Progress { .. }
            | GenerateEvent::Queued { .. }
            | GenerateEvent::Error { .. } => {}
            GenerateEvent::Images(done) => {
                done.mode = self.mode.clone();
                if cancelled {
                    done.finish_reason = FinishReason::Cancelled;
                    // Whatever a worker wrote is not the client's any more:
                    // a cancelled job never lists pictures.
                    done.images.clear();
                }
            }
            GenerateEvent::Done {
                mode,
                finish_reason,
                ..
            } => {
                *mode = self.mode.clone();
                if cancelled {
                    *finish_reason = FinishReason::Cancelled;
                }
            }
        }
        Ok(event)
    }
}

struct Queued {
    info: JobInfo,
    work: Work,
}

/// A job that has started, and how to stop it.
struct Running {
    info: JobInfo,
    cancel: Cancellation,
    /// A generation's client, told `shutting_down` if the job outlives
    /// the shutdown.
    events: Option<mpsc::Sender<JobEvent>>,
    /// For the ETAs of the jobs behind it.
    cost: eta::Cost,
    started: std::time::Instant,
}

struct QueueState {
    /// Set at shutdown: new jobs are refused from then on.
    closed: bool,
    jobs: VecDeque<Queued>,
    /// Several only when they are generations batched on one model.
    running: Vec<Running>,
    current_mode: Option<String>,
    history: History,
}

pub struct Scheduler {
    queue: Mutex<QueueState>,
    wake: Notify,
    /// Woken whenever a job finishes, for those waiting on one.
    job_ended: Notify,
    next_id: AtomicU64,
    /// Measured rates, for queued jobs' ETAs.
    rates: eta::Rates,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            queue: Mutex::new(QueueState {
                closed: false,
                jobs: VecDeque::new(),
                running: Vec::new(),
                current_mode: None,
                history: History::default(),
            }),
            wake: Notify::new(),
            job_ended: Notify::new(),
            next_id: AtomicU64::new(1),
            rates: eta::Rates::default(),
        }
    }
}

/// A queued job's info with its place and ETA.
fn placed(info: &JobInfo, place: Place) -> JobInfo {
    JobInfo {
        position: Some(place.position),
        ahead: Some(place.ahead),
        eta_s: place.eta_s.map(|s| s.ceil() as u64),
        ..info.clone()
    }
}

/// What a cancelled generation's client is told, as its stream's last event.
fn cancelled_event(job: u64) -> JobEvent {
    Err(Arc::new(JobError::Cancelled { job }))
}

impl Work {
    /// How the job shows in `status`.
    fn describe(&self, id: u64) -> JobInfo {
        let (kind, mode, model) = match self {
            Work::Generate { request, mode, .. } => {
                ("generate", mode.clone(), Some(request.model.clone()))
            }
            Work::Switch { to } => ("switch", Some(to.clone()), None),
            Work::Unload { name, .. } | Work::Expire { name } => {
                ("unload", None, Some(name.clone()))
            }
        };
        JobInfo {
            id,
            kind: kind.into(),
            mode,
            model,
            running: false,
            // Jobs are submitted from a request's task; background work
            // (keep-alive expiry, the default mode) has no caller.
            uid: crate::auth::current().map(|caller| caller.uid),
            position: None,
            ahead: None,
            eta_s: None,
        }
    }
}

impl QueueState {
    fn push(&mut self, id: u64, work: Work) {
        let info = work.describe(id);
        self.jobs.push_back(Queued { info, work });
    }

    /// The mode in force once every queued switch, and the one running,
    /// has run.
    fn effective_mode(&self) -> Option<String> {
        let running_switch = self
            .running
            .iter()
            .find(|r| r.info.kind == "switch")
            .and_then(|r| r.info.mode.clone());
        self.jobs
            .iter()
            .rev()
            .find_map(|job| match &job.work {
                Work::Switch { to } => Some(to.clone()),
                _ => None,
            })
            .or(running_switch)
            .or_else(|| self.current_mode.clone())
    }

    fn ahead(&self) -> usize {
        self.jobs.len() + self.running.len()
    }

    fn job(&self, id: u64) -> Option<(JobInfo, JobStage)> {
        if let Some(running) = self.running.iter().find(|r| r.info.id == id) {
            let info = JobInfo {
                running: true,
                ..running.info.clone()
            };
            return Some((info, JobStage::Running));
        }
        if let Some(job) = self.jobs.iter().find(|job| job.info.id == id) {
            return Some((job.info.clone(), JobStage::Queued));
        }
        self.history.get(id)
    }
}

impl Scheduler {
    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the generation `plan` makes from the mode that will be current
    /// when it runs (after the switches already queued). `plan` runs under
    /// the queue's lock, so no switch can slip in between. Its error is the
    /// caller's own type, which holds the queue's refusals too.
    pub fn submit_generate_with<E: From<JobError>>(
        &self,
        capacity: usize,
        plan: impl FnOnce(Option<String>) -> Result<(ValidRequest, Option<String>), E>,
    ) -> Result<(u64, mpsc::Receiver<JobEvent>), E> {
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let mut queue = self.lock();
        if queue.closed {
            return Err(JobError::ShuttingDown.into());
        }
        let effective = queue.effective_mode();
        let (request, mode) = plan(effective.clone())?;
        let switch_to = mode.clone().filter(|m| effective.as_ref() != Some(m));
        let needed = 1 + usize::from(switch_to.is_some());
        if queue.jobs.len() + needed > capacity {
            return Err(JobError::QueueFull { capacity }.into());
        }
        if let Some(to) = switch_to {
            queue.push(self.id(), Work::Switch { to });
        }
        let id = self.id();
        queue.push(
            id,
            Work::Generate {
                request: Box::new(request),
                mode,
                events,
            },
        );
        drop(queue);
        ticket::note(id);
        self.wake.notify_one();
        Ok((id, receiver))
    }

    pub fn submit_switch(&self, to: String, capacity: usize) -> Result<SwitchReply, JobError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(JobError::ShuttingDown);
        }
        if queue.jobs.len() >= capacity {
            return Err(JobError::QueueFull { capacity });
        }
        let reply = SwitchReply {
            queued: true,
            job: self.id(),
            from: queue.effective_mode(),
            to: to.clone(),
            ahead: queue.ahead(),
            state: modeld_wire::types::JobState::Queued,
        };
        queue.push(reply.job, Work::Switch { to });
        drop(queue);
        self.wake.notify_one();
        Ok(reply)
    }

    pub fn submit_unload(
        &self,
        name: String,
        capacity: usize,
    ) -> Result<oneshot::Receiver<Result<u64, Arc<JobError>>>, JobError> {
        let (reply, receiver) = oneshot::channel();
        let mut queue = self.lock();
        if queue.closed {
            return Err(JobError::ShuttingDown);
        }
        if queue.jobs.len() >= capacity {
            return Err(JobError::QueueFull { capacity });
        }
        queue.push(self.id(), Work::Unload { name, reply });
        drop(queue);
        self.wake.notify_one();
        Ok(receiver)
    }

    /// Queues an expiry unless one for the same model is already waiting.
    /// Expiries do not count against the capacity: they only free memory.
    pub fn submit_expire(&self, name: String) {
        let mut queue = self.lock();
        let waiting = queue
            .jobs
            .iter()
            .any(|job| matches!(&job.work, Work::Expire { name: n } if *n == name));
        if waiting {
            return;
        }
        queue.push(self.id(), Work::Expire { name });
        drop(queue);
        self.wake.notify_one();
    }

    /// Cancels a queued job, or stops a running generation. True only when
    /// the job's client will be told `cancelled`: false when no such job
    /// is waiting or running, or a running one has already ended.
    pub fn cancel(&self, id: u64) -> bool {
        let mut queue = self.lock();
        if let Some(index) = queue.jobs.iter().position(|job| job.info.id == id) {
            let job = queue.jobs.remove(index).expect("index is in range");
            queue.history.record(job.info, JobOutcome::Cancelled);
            drop(queue);
            self.job_ended.notify_waiters();
            match job.work {
                Work::Generate { events, .. } => {
                    let _ = events.try_send(cancelled_event(id));
                }
                Work::Unload { reply, .. } => {
                    let _ = reply.send(Err(Arc::new(JobError::Cancelled { job: id })));
                }
                Work::Switch { .. } | Work::Expire { .. } => {}
            }
            return true;
        }
        queue
            .running
            .iter()
            .find(|r| r.info.id == id && r.info.kind == "generate")
            .is_some_and(|r| r.cancel.request())
    }

    /// Shutdown: closes the queue to new jobs and refuses every queued one
    /// with `shutting_down`; the running job goes on.
    pub fn refuse_queued(&self) {
        let refused = Arc::new(JobError::ShuttingDown);
        let jobs = {
            let mut queue = self.lock();
            queue.closed = true;
            let jobs = std::mem::take(&mut queue.jobs);
            for job in &jobs {
                let outcome = JobOutcome::Failed(refused.clone());
                queue.history.record(job.info.clone(), outcome);
            }
            jobs
        };
        self.job_ended.notify_waiters();
        for job in jobs {
            match job.work {
                Work::Generate { events, .. } => {
                    let _ = events.try_send(Err(refused.clone()));
                }
                Work::Unload { reply, .. } => {
                    let _ = reply.send(Err(refused.clone()));
                }
                Work::Switch { .. } | Work::Expire { .. } => {}
            }
        }
        self.wake.notify_one();
    }

    /// Shutdown after the grace period: stops the running jobs, whose
    /// clients see `finish_reason: cancelled`.
    pub fn cancel_running(&self) {
        for running in &self.lock().running {
            running.cancel.stop(Stop::ShutDown);
        }
    }

    /// The very end of a shutdown: a generation still running (stuck in
    /// one long operation) has its client told `shutting_down` now, so no
    /// client sees its connection close without a final event.
    pub fn abandon_running(&self) {
        let refused = Arc::new(JobError::ShuttingDown);
        for running in &self.lock().running {
            if let Some(events) = &running.events {
                let _ = events.try_send(Err(refused.clone()));
            }
        }
    }

    pub fn status(&self, capacity: usize) -> QueueStatus {
        let queue = self.lock();
        let running = queue.running.iter().map(|r| JobInfo {
            running: true,
            ..r.info.clone()
        });
        let places = self.places(&queue);
        let queued = queue
            .jobs
            .iter()
            .zip(places)
            .map(|(job, place)| placed(&job.info, place));
        QueueStatus {
            capacity,
            current_mode: queue.current_mode.clone(),
            jobs: running.chain(queued).collect(),
            last_switch_error: None,
        }
    }

    /// The last mode switch that failed, for `status`.
    pub fn last_switch_failure(&self) -> Option<SwitchFailure> {
        self.lock().history.last_switch_failure()
    }

    /// A job queued (with its place), running, or among the last finished
    /// ones.
    pub fn job(&self, id: u64) -> Option<(JobInfo, JobStage)> {
        let queue = self.lock();
        let (info, stage) = queue.job(id)?;
        let index = queue.jobs.iter().position(|job| job.info.id == id);
        let place = index.and_then(|index| self.places(&queue).get(index).copied());
        Some((
            place.map_or(info.clone(), |place| placed(&info, place)),
            stage,
        ))
    }

    /// Waits until job `id` has finished and returns how it ended; `None`
    /// when no such job is known.
    pub async fn wait(&self, id: u64) -> Option<JobOutcome> {
        loop {
            // Registered before looking, so an ending in between still wakes us.
            let ended = self.job_ended.notified();
            match self.job(id)? {
                (_, JobStage::Finished { outcome, .. }) => return Some(outcome),
                (_, JobStage::Queued | JobStage::Running) => ended.await,
            }
        }
    }

    /// Where queued job `id` stands (see [`Place`]); `None` once it has
    /// started or ended.
    pub fn position(&self, id: u64) -> Option<Place> {
        let queue = self.lock();
        let index = queue.jobs.iter().position(|job| job.info.id == id)?;
        self.places(&queue).get(index).copied()
    }

    /// Every queued job's place and ETA, in queue order.
    fn places(&self, queue: &QueueState) -> Vec<Place> {
        let running: Vec<_> = queue.running.iter().map(|r| (&r.cost, r.started)).collect();
        let queued: Vec<_> = queue
            .jobs
            .iter()
            .map(|job| eta::Cost::of(&job.work))
            .collect();
        eta::places(&self.rates, &running, &queued)
    }

    pub fn current_mode(&self) -> Option<String> {
        self.lock().current_mode.clone()
    }

    /// Takes the next job and marks it running, if it may start now: when
    /// nothing runs, or when it is a text generation that joins the
    /// generations running on the same model and mode (`batches` says
    /// whether a model is a resident text model) and the batch has room.
    fn next(
        &self,
        max_batch: usize,
        batches: impl Fn(&str) -> bool,
    ) -> Option<(Queued, Cancellation)> {
        let mut queue = self.lock();
        let front = queue.jobs.front()?;
        if !queue.running.is_empty() {
            let joins = match &front.work {
                Work::Generate { request, mode, .. } => {
                    queue.running.len() < max_batch
                        && request.text.is_ok()
                        && queue.running.iter().all(|r| {
                            r.info.kind == "generate"
                                && r.info.model.as_ref() == Some(&request.model)
                                && r.info.mode == *mode
                        })
                        && batches(&request.model)
                }
                _ => false,
            };
            if !joins {
                return None;
            }
        }
        let job = queue.jobs.pop_front().expect("front exists");
        let cancel = Cancellation::new();
        let events = match &job.work {
            Work::Generate { events, .. } => Some(events.clone()),
            _ => None,
        };
        queue.running.push(Running {
            info: job.info.clone(),
            cancel: cancel.clone(),
            events,
            cost: eta::Cost::of(&job.work),
            started: std::time::Instant::now(),
        });
        Some((job, cancel))
    }

    /// Whether a queued job waits behind running ones: it may be able to
    /// join them once their model has loaded.
    fn waits_behind_running(&self) -> bool {
        let queue = self.lock();
        !queue.running.is_empty() && !queue.jobs.is_empty()
    }

    /// Job `id` is over: it leaves `running` and enters the history at
    /// once, so it is never missing from both.
    fn finished(&self, id: u64, outcome: JobOutcome) {
        let mut queue = self.lock();
        if let Some(index) = queue.running.iter().position(|r| r.info.id == id) {
            let running = queue.running.swap_remove(index);
            let took = running.started.elapsed().as_secs_f64();
            self.rates.job(&running.cost, took);
            queue.history.record(running.info, outcome);
        }
        drop(queue);
        self.job_ended.notify_waiters();
        self.wake.notify_one();
    }

    /// Starts jobs until shutdown; at shutdown, jobs still queued are
    /// refused (see [`Scheduler::refuse_queued`]) and the running ones are
    /// waited for.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>) {
        let shutdown = state.shutdown_token();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.try_join_next().is_some() {}
            if shutdown.is_cancelled() {
                self.refuse_queued();
                break;
            }
            let max_batch = state.config().scheduler.max_batch;
            let batches = |model: &str| state.engine.get(model).is_some_and(|r| r.runs_text());
            let Some((job, cancel)) = self.next(max_batch, batches) else {
                // A job waiting behind a model still loading is looked at
                // again shortly: the load ends without waking the queue.
                let recheck = self.waits_behind_running();
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(RECHECK), if recheck => {}
                }
                continue;
            };
            let this = self.clone();
            let state = state.clone();
            running.spawn(async move {
                let id = job.info.id;
                let outcome = this.execute(&state, id, job.work, cancel).await;
                this.finished(id, outcome);
            });
        }
        while running.join_next().await.is_some() {}
    }

    async fn execute(
        &self,
        state: &Arc<AppState>,
        id: u64,
        work: Work,
        cancel: Cancellation,
    ) -> JobOutcome {
        match work {
            Work::Switch { to } => match self.switch(state, &to).await {
                Ok(()) => JobOutcome::Done,
                Err(err) => {
                    tracing::warn!(mode = %to, "mode switch failed: {err}");
                    JobOutcome::Failed(Arc::new(err))
                }
            },
            Work::Unload { name, reply } => {
                let result = state
                    .engine
                    .unload(&name)
                    .await
                    .map_err(|err| Arc::new(JobError::from(err)));
                let outcome = match &result {
                    Ok(_) => JobOutcome::Done,
                    Err(err) => JobOutcome::Failed(err.clone()),
                };
                let _ = reply.send(result);
                outcome
            }
            Work::Expire { name } => {
                if state.engine.expired().contains(&name) {
                    tracing::info!(model = %name, "keep-alive ran out; unloading");
                    let _ = state.engine.unload(&name).await;
                }
                JobOutcome::Done
            }
            Work::Generate {
                request,
                mode,
                events,
            } => {
                let job = GenerateJob {
                    id,
                    mode,
                    events,
                    cancel,
                    max_job_s: state.config().scheduler.max_job_s,
                };
                match self.generate(state, *request, &job).await {
                    Ok(outcome) => outcome,
                    Err(err) => job.fail(err).await,
                }
            }
        }
    }

    async fn switch(&self, state: &Arc<AppState>, to: &str) -> Result<(), JobError> {
        let mode = state.mode(to)?;
        loader::ensure_loaded(state, &mode.model_key(), Some(&mode), None).await?;
        let from = {
            let mut queue = self.lock();
            queue.current_mode.replace(to.to_string())
        };
        tracing::info!(?from, to, "mode switched");
        state.emit(Event::ModeSwitched {
            from,
            to: to.to_string(),
        });
        Ok(())
    }

    async fn generate(
        &self,
        state: &Arc<AppState>,
        request: ValidRequest,
        job: &GenerateJob,
    ) -> Result<JobOutcome, JobError> {
        let mode_config = match &job.mode {
            Some(name) => {
                // The switch queued before this job normally did this already.
                if self.current_mode().as_deref() != Some(name) {
                    self.switch(state, name).await?;
                }
                Some(state.mode(name)?)
            }
            None => None,
        };
        let resident = loader::resident(state, &request.model, mode_config.as_ref()).await?;
        let _busy = resident.busy();
        if job.cancel.is_requested() {
            return Err(JobError::Cancelled { job: job.id });
        }
        let mut timing = metrics_timing::Timing::new(&request.model);
        let (sender, mut receiver) = mpsc::channel(EVENT_BUFFER);
        resident.submit(request, sender, job.cancel.clone())?;
        let mut outcome = JobOutcome::Failed(Arc::new(JobError::WorkerStopped));
        let deadline = tokio::time::sleep(Duration::from_secs(job.max_job_s));
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                event = receiver.recv() => event,
                // The worker sees the stop within a second and ends the
                // stream itself, with the reason settled here.
                _ = &mut deadline, if !job.cancel.is_requested() => {
                    job.cancel.stop(Stop::TimedOut);
                    continue;
                }
            };
            // The worker drops its sender after the last event.
            let Some(event) = event else { break };
            let event = job.as_sent(event);
            timing.saw(&event, &self.rates);
            outcome = JobOutcome::of_event(&event).unwrap_or(outcome);
            if job.events.send(event).await.is_err() {
                // The client is gone: stop generating for nobody.
                job.cancel.request();
            }
        }
        Ok(outcome)
    }
}
