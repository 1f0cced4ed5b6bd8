//! Text generations over HTTP: the whole answer at once, or streamed as
//! server-sent events (`data:` chunks, then `data: [DONE]`). A streaming
//! request that waits in the queue gets comment lines with its place
//! (`: queued position N`), so clients and proxies keep the connection
//! open. A client that leaves, at any point, has its job cancelled: while
//! queued through its ticket, while running because its subscription ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use modeld_wire::error::RpcErrorObject;
use modeld_wire::types::GenerateEvent;
use tokio::sync::mpsc;

use super::bridge::{self, Events};
use super::error::HttpError;
use super::openai::{Finished, Reply, TextCall};
use super::Http;
use crate::auth::Caller;
use crate::scheduler::ticket::JobTicket;
use crate::state::AppState;

/// Cancels the request's job when dropped before the job ended: the
/// client went away.
pub struct CancelOnDrop {
    state: Arc<AppState>,
    ticket: Arc<JobTicket>,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new(state: &Arc<AppState>) -> Self {
        CancelOnDrop {
            state: state.clone(),
            ticket: Arc::new(JobTicket::default()),
            armed: true,
        }
    }

    pub fn ticket(&self) -> Arc<JobTicket> {
        self.ticket.clone()
    }

    /// The job ended on its own: nothing to cancel.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// The reply id: the job's, so logs and `jobs.get` can be matched.
    fn reply_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.ticket.job().unwrap_or_default())
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.ticket.job().filter(|_| self.armed) {
            if self.state.scheduler.cancel(job) {
                tracing::info!(job, "HTTP client left; job cancelled");
            }
        }
    }
}

fn prefix(call: &TextCall) -> &'static str {
    match call.flavour {
        super::openai::Flavour::Chat => "chatcmpl",
        super::openai::Flavour::Completion => "cmpl",
    }
}

/// Runs a text generation and answers once it is done.
pub async fn complete(http: Arc<Http>, caller: Arc<Caller>, call: TextCall) -> Response {
    let mut guard = CancelOnDrop::new(&http.state);
    let started = bridge::generate(
        &http.dispatcher,
        &caller,
        call.params.clone(),
        guard.ticket(),
    );
    let mut events = match started.await {
        Ok(events) => events,
        Err(err) => return HttpError::from(err).into_response(),
    };
    while let Some(event) = events.next().await {
        match event {
            GenerateEvent::Token { .. } | GenerateEvent::Progress { .. } => continue,
            GenerateEvent::Error { error, .. } => {
                guard.disarm();
                return HttpError::from(error).into_response();
            }
            other => {
                guard.disarm();
                return match Finished::of(other) {
                    Some(done) => Json(reply(&call, &guard).complete(&done)).into_response(),
                    None => not_text(&call.model).into_response(),
                };
            }
        }
    }
    HttpError::internal("the generation ended without a final event").into_response()
}

fn reply<'a>(call: &'a TextCall, guard: &CancelOnDrop) -> Reply<'a> {
    Reply {
        flavour: call.flavour,
        id: guard.reply_id(prefix(call)),
        created: crate::util::unix_now(),
        model: &call.model,
    }
}

fn not_text(model: &str) -> HttpError {
    HttpError::bad_param(
        "model",
        format!("{model:?} is an image model: use /v1/images/generations"),
    )
}

type Pending = Pin<Box<dyn Future<Output = Result<Events, RpcErrorObject>> + Send>>;

/// How often a queued stream looks at its place in the queue.
const QUEUE_TICK: Duration = Duration::from_millis(250);

/// A queued stream repeats its place at least this often, even unchanged.
const QUEUE_REMINDER: Duration = Duration::from_secs(5);

/// Events an SSE response may hold before its producer waits for the
/// client.
const SSE_BUFFER: usize = 64;

/// Streams a text generation as server-sent events. Errors known before
/// the job is queued or starts get their own status; once the job waits
/// in the queue the response has begun (200), and a later error comes as
/// a `data: {"error": ...}` event.
pub async fn stream(http: Arc<Http>, caller: Arc<Caller>, call: TextCall) -> Response {
    let guard = CancelOnDrop::new(&http.state);
    let ticket = guard.ticket();
    let mut pending: Pending = {
        let (http, params) = (http.clone(), call.params.clone());
        Box::pin(async move { bridge::generate(&http.dispatcher, &caller, params, ticket).await })
    };
    let start = loop {
        tokio::select! {
            started = &mut pending => match started {
                Ok(events) => break Start::Accepted(events),
                Err(err) => return HttpError::from(err).into_response(),
            },
            _ = tokio::time::sleep(QUEUE_TICK) => {
                let queued = guard.ticket.job().and_then(|id| http.state.scheduler.position(id));
                if queued.is_some() {
                    break Start::Queued(pending);
                }
            }
        }
    };
    let (sender, receiver) = mpsc::channel(SSE_BUFFER);
    let stall = Duration::from_secs(http.state.config().server.write_timeout_s);
    let producer = Producer {
        http,
        call,
        guard,
        sender,
        stall,
    };
    tokio::spawn(producer.run(start));
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok::<Event, Infallible>(event), receiver))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

enum Start {
    Accepted(Events),
    Queued(Pending),
}

/// Writes one stream's events to its response body.
struct Producer {
    http: Arc<Http>,
    call: TextCall,
    guard: CancelOnDrop,
    sender: mpsc::Sender<Event>,
    /// `server.write_timeout_s`: a client that takes nothing this long is
    /// gone.
    stall: Duration,
}

/// The client left (or stopped reading): stop, and cancel the job.
struct Gone;

impl Producer {
    async fn run(mut self, start: Start) {
        // Returning early drops the guard, which cancels the job.
        let _ = self.produce(start).await;
    }

    async fn produce(&mut self, start: Start) -> Result<(), Gone> {
        let mut events = match start {
            Start::Accepted(events) => events,
            Start::Queued(pending) => match self.wait_in_queue(pending).await? {
                Ok(events) => events,
                Err(err) => {
                    self.guard.disarm();
                    return self.error(HttpError::from(err)).await;
                }
            },
        };
        if self.call.flavour == super::openai::Flavour::Chat {
            let chunk = self.reply().role_chunk();
            self.data(chunk.to_string()).await?;
        }
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = self.sender.closed() => return Err(Gone),
            };
            let Some(event) = event else {
                return self
                    .error(HttpError::internal("the generation ended early"))
                    .await;
            };
            match event {
                GenerateEvent::Token { text, .. } => {
                    let chunk = self.reply().chunk(Some(&text), None);
                    self.data(chunk.to_string()).await?;
                }
                GenerateEvent::Progress { .. } => {}
                GenerateEvent::Error { error, .. } => {
                    self.guard.disarm();
                    return self.error(HttpError::from(error)).await;
                }
                other => {
                    self.guard.disarm();
                    return self.finish(other).await;
                }
            }
        }
    }

    /// Reports the job's place while it waits, until it starts.
    async fn wait_in_queue(
        &mut self,
        mut pending: Pending,
    ) -> Result<Result<Events, RpcErrorObject>, Gone> {
        let mut told: Option<(usize, Instant)> = None;
        loop {
            let job = self.guard.ticket.job();
            let place = job.and_then(|id| self.http.state.scheduler.position(id));
            if let Some(place) = place {
                let position = place.position;
                let due = told
                    .is_none_or(|(last, at)| last != position || at.elapsed() >= QUEUE_REMINDER);
                if due {
                    let eta = place.eta_s.map_or("unknown".into(), |s| s.to_string());
                    let ahead = place.ahead;
                    let line = format!("queued position {position} ahead {ahead} eta_s {eta}");
                    self.send(Event::default().comment(line)).await?;
                    told = Some((position, Instant::now()));
                }
            }
            tokio::select! {
                started = &mut pending => return Ok(started),
                _ = tokio::time::sleep(QUEUE_TICK) => {}
                _ = self.sender.closed() => return Err(Gone),
            }
        }
    }

    async fn finish(&mut self, event: GenerateEvent) -> Result<(), Gone> {
        let Some(done) = Finished::of(event) else {
            return self.error(not_text(&self.call.model)).await;
        };
        let reply = self.reply();
        self.data(reply.chunk(None, Some(done.finish_reason)).to_string())
            .await?;
        if self.call.include_usage {
            self.data(reply.usage_chunk(&done).to_string()).await?;
        }
        self.data("[DONE]".to_string()).await
    }

    async fn error(&mut self, err: HttpError) -> Result<(), Gone> {
        self.data(err.body().to_string()).await?;
        self.data("[DONE]".to_string()).await
    }

    fn reply(&self) -> Reply<'_> {
        reply(&self.call, &self.guard)
    }

    async fn data(&self, data: String) -> Result<(), Gone> {
        self.send(Event::default().data(data)).await
    }

    async fn send(&self, event: Event) -> Result<(), Gone> {
        match tokio::time::timeout(self.stall, self.sender.send(event)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Gone),
            Err(_) => {
                tracing::warn!(
                    seconds = self.stall.as_secs(),
                    "an HTTP client took none of its stream in time; cancelling its job"
                );
                Err(Gone)
            }
        }
    }
}
