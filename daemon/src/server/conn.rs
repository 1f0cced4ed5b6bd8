//! One client connection: read request lines, run up to a configured number
//! concurrently, and write replies and stream notifications back in the
//! order they are produced. A vanished client only ends its own tasks.

use std::sync::Arc;

use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::codec::{Frame, LineCodec};
use crate::rpc::dispatch::{too_large_response, Dispatcher, Stream};
use crate::state::{AppState, GaugeGuard};

/// Reply lines a connection may queue before its producers wait for the client.
const OUTBOX: usize = 256;

pub async fn serve_connection(
    stream: UnixStream,
    state: Arc<AppState>,
    dispatcher: Arc<Dispatcher>,
) {
    let _gauge = GaugeGuard::new(&state.stats.connections);
    let server = state.config().server.clone();
    let (read_half, write_half) = stream.into_split();
    let (outbox, outbox_rx) = mpsc::channel::<String>(OUTBOX);
    let writer = tokio::spawn(write_lines(write_half, outbox_rx));
    let mut frames = FramedRead::new(read_half, LineCodec::new(server.max_request_bytes));
    let permits = Arc::new(Semaphore::new(server.max_in_flight_per_connection));
    let requests = TaskTracker::new();
    let streams = TaskTracker::new();
    let stop_streams = CancellationToken::new();
    let shutdown = state.shutdown_token();

    loop {
        let frame = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            frame = frames.next() => frame,
        };
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
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let dispatcher = dispatcher.clone();
        let outbox = outbox.clone();
        let streams = streams.clone();
        let stop_streams = stop_streams.clone();
        requests.spawn(async move {
            let handled = dispatcher.handle(&line).await;
            drop(permit);
            if let Some(reply) = handled.reply {
                let _ = outbox.send(reply).await;
            }
            for stream in handled.streams {
                streams.spawn(forward(stream, outbox.clone(), stop_streams.clone()));
            }
        });
    }

    // In-flight requests finish and are answered. On shutdown, streams run
    // to their own end (the server bounds the wait); a client that left
    // has its streams stopped.
    requests.close();
    requests.wait().await;
    if !shutdown.is_cancelled() {
        stop_streams.cancel();
    }
    streams.close();
    streams.wait().await;
    drop(outbox);
    let _ = writer.await;
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

/// Writes queued lines, flushing whenever the queue runs dry so replies are
/// prompt under light load and batched under heavy load.
async fn write_lines(half: OwnedWriteHalf, mut outbox: mpsc::Receiver<String>) {
    let mut writer = BufWriter::new(half);
    while let Some(line) = outbox.recv().await {
        let mut next = Some(line);
        while let Some(line) = next {
            if writer.write_all(line.as_bytes()).await.is_err()
                || writer.write_all(b"\n").await.is_err()
            {
                return;
            }
            next = outbox.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}
