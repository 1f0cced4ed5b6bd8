//! One client connection: read request lines, run up to a configured number
//! concurrently, and write replies and stream notifications back in the
//! order they are produced. A vanished client only ends its own tasks; a
//! slow or idle one is timed out, and so is one that stops reading its
//! replies; during shutdown every new request is answered with
//! `shutting_down`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::{Frame, LineCodec};
use crate::auth::{self, Caller};
use crate::config::ServerConfig;
use crate::rpc::dispatch::{
    shutting_down_response, timeout_response, too_large_response, Dispatcher, Stream,
};
use crate::state::{AppState, GaugeGuard};

/// Reply lines a connection may queue before its producers wait for the client.
const OUTBOX: usize = 256;

/// What a connection shares with the server: the daemon, the dispatcher,
/// who is calling, and the tracker of work the server waits for at shutdown.
pub struct ConnContext {
    pub state: Arc<AppState>,
    pub dispatcher: Arc<Dispatcher>,
    pub caller: Arc<Caller>,
    pub work: TaskTracker,
    /// Cancelled at the very end of a shutdown, once work is done: the
    /// connection then writes out what is queued for it and closes.
    pub closing: CancellationToken,
}

pub async fn serve_connection(stream: UnixStream, context: ConnContext) {
    let ConnContext {
        state,
        dispatcher,
        caller,
        work,
        closing,
    } = context;
    let _gauge = GaugeGuard::new(&state.stats.connections);
    let server = state.config().server.clone();
    let (read_half, write_half) = stream.into_split();
    let (outbox, outbox_rx) = mpsc::channel::<String>(OUTBOX);
    let gone = CancellationToken::new();
    let stall = Duration::from_secs(server.write_timeout_s);
    let writer = tokio::spawn(write_lines(write_half, outbox_rx, stall, gone.clone()));
    let mut frames = FramedRead::new(read_half, LineCodec::new(server.max_request_bytes));
    let permits = Arc::new(Semaphore::new(server.max_in_flight_per_connection));
    let busy = Arc::new(AtomicUsize::new(0));
    let stop_streams = CancellationToken::new();
    let shutdown = state.shutdown_token();

    let mut watchdog = Watchdog::new(&server);
    loop {
        let frame = tokio::select! {
            biased;
            _ = closing.cancelled() => break,
            _ = gone.cancelled() => break,
            frame = frames.next() => frame,
            _ = tokio::time::sleep(WATCHDOG_TICK) => {
                let partial = !frames.read_buffer().is_empty();
                match watchdog.check(partial, busy.load(Ordering::Relaxed) > 0) {
                    Some(Expired::PartialLine) => {
                        let _ = outbox.send(timeout_response(server.read_timeout_s)).await;
                        break;
                    }
                    Some(Expired::Idle) => break,
                    None => continue,
                }
            }
        };
        watchdog.on_line();
        let line = match frame {
            Some(Ok(Frame::Line(line))) => line,
            Some(Ok(Frame::TooLong)) => {
                let reply = too_large_response(server.max_request_bytes);
                if outbox.send(reply).await.is_err() {
                    break;
                }
                continue;
            }
            None | Some(Err(_)) => break,
        };
        // Once stopping, every new request is answered, not dropped: the
        // connection stays open until the process exits.
        if shutdown.is_cancelled() {
            if let Some(reply) = shutting_down_response(&line) {
                let _ = outbox.send(reply).await;
            }
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let request = Request {
            dispatcher: dispatcher.clone(),
            caller: caller.clone(),
            outbox: outbox.clone(),
            work: work.clone(),
            stop_streams: stop_streams.clone(),
            busy: BusyCount::new(&busy),
        };
        work.spawn(request.run(line, permit));
    }

    // A client that left has its streams stopped; what it had in flight
    // still runs to its end on the shared work tracker.
    stop_streams.cancel();
    drop(outbox);
    let _ = writer.await;
}

/// One request line on its way through the dispatcher.
struct Request {
    dispatcher: Arc<Dispatcher>,
    caller: Arc<Caller>,
    outbox: mpsc::Sender<String>,
    work: TaskTracker,
    stop_streams: CancellationToken,
    busy: BusyCount,
}

impl Request {
    async fn run(self, line: bytes::BytesMut, permit: tokio::sync::OwnedSemaphorePermit) {
        let handled = auth::scope(
            self.caller.clone(),
            self.dispatcher.handle(&line, &self.caller),
        )
        .await;
        drop(permit);
        if let Some(reply) = handled.reply {
            let _ = self.outbox.send(reply).await;
        }
        for stream in handled.streams {
            let busy = self.busy.clone();
            let forwarded = forward(stream, self.outbox.clone(), self.stop_streams.clone());
            self.work.spawn(async move {
                forwarded.await;
                drop(busy);
            });
        }
    }
}

/// Counts a connection's requests and streams in progress while alive.
struct BusyCount(Arc<AtomicUsize>);

impl BusyCount {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        BusyCount(count.clone())
    }
}

impl Clone for BusyCount {
    fn clone(&self) -> Self {
        BusyCount::new(&self.0)
    }
}

impl Drop for BusyCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often a connection checks its timeouts.
const WATCHDOG_TICK: Duration = Duration::from_millis(500);

enum Expired {
    PartialLine,
    Idle,
}

/// Decides when a connection has waited too long: a started request line
/// must arrive in full within `read_timeout_s`, and a connection with
/// nothing in flight, no stream and no partial line closes after
/// `idle_timeout_s` (0: never). Slow-drip clients cannot hold slots.
struct Watchdog {
    read: Duration,
    idle: Option<Duration>,
    partial_since: Option<Instant>,
    idle_since: Option<Instant>,
}

impl Watchdog {
    fn new(server: &ServerConfig) -> Self {
        Watchdog {
            read: Duration::from_secs(server.read_timeout_s),
            idle: (server.idle_timeout_s > 0).then(|| Duration::from_secs(server.idle_timeout_s)),
            partial_since: None,
            idle_since: Some(Instant::now()),
        }
    }

    /// A whole line arrived: both clocks start again.
    fn on_line(&mut self) {
        self.partial_since = None;
        self.idle_since = None;
    }

    fn check(&mut self, partial: bool, busy: bool) -> Option<Expired> {
        let now = Instant::now();
        if partial {
            self.idle_since = None;
            let since = *self.partial_since.get_or_insert(now);
            return (now - since >= self.read).then_some(Expired::PartialLine);
        }
        self.partial_since = None;
        if busy {
            self.idle_since = None;
            return None;
        }
        let since = *self.idle_since.get_or_insert(now);
        let idle = self.idle?;
        (now - since >= idle).then_some(Expired::Idle)
    }
}

/// Copies a subscription's notifications to the connection until either
/// side ends; on `stop`, what is already queued is still delivered.
async fn forward(mut stream: Stream, outbox: mpsc::Sender<String>, stop: CancellationToken) {
    loop {
        let message: Option<Box<RawValue>> = tokio::select! {
            message = stream.recv() => message,
            _ = stop.cancelled() => break,
        };
        let Some(message) = message else { return };
        if outbox.send(message.get().to_string()).await.is_err() {
            return;
        }
    }
    while let Ok(message) = stream.try_recv() {
        if outbox.send(message.get().to_string()).await.is_err() {
            return;
        }
    }
}

/// Bytes of queued lines gathered into one write.
const WRITE_CHUNK: usize = 64 << 10;

/// Writes queued lines, gathering what is queued into one write so replies
/// are prompt under light load and batched under heavy load. A client that
/// takes none of its replies for `stall` is treated as gone: the writer
/// stops and cancels `gone`, which closes the connection, stops its
/// streams and so cancels its generations. A client that stops reading can
/// then hold up the job queue for `stall` at most.
async fn write_lines(
    mut half: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<String>,
    stall: Duration,
    gone: CancellationToken,
) {
    let mut buffer = Vec::with_capacity(WRITE_CHUNK);
    while let Some(line) = outbox.recv().await {
        let mut next = Some(line);
        while let Some(line) = next {
            buffer.extend_from_slice(line.as_bytes());
            buffer.push(b'\n');
            next = if buffer.len() < WRITE_CHUNK {
                outbox.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(failed) = write_progressing(&mut half, &buffer, stall).await {
            if failed == WriteFailed::Stalled {
                tracing::warn!(
                    seconds = stall.as_secs(),
                    "a client took none of its replies in time; closing its connection"
                );
            }
            gone.cancel();
            return;
        }
        buffer.clear();
    }
    let _ = half.shutdown().await;
}

#[derive(Debug, PartialEq, Eq)]
enum WriteFailed {
    /// The client took nothing for the whole stall limit.
    Stalled,
    /// The client closed its end, or the socket failed.
    Closed,
}

/// Writes all of `bytes`, as long as each write makes progress within
/// `stall`: a slow reader is fine, one that stopped reading is not.
async fn write_progressing(
    half: &mut OwnedWriteHalf,
    mut bytes: &[u8],
    stall: Duration,
) -> Result<(), WriteFailed> {
    while !bytes.is_empty() {
        match tokio::time::timeout(stall, half.write(bytes)).await {
            Err(_) => return Err(WriteFailed::Stalled),
            Ok(Ok(0) | Err(_)) => return Err(WriteFailed::Closed),
            Ok(Ok(written)) => bytes = &bytes[written..],
        }
    }
    Ok(())
}
