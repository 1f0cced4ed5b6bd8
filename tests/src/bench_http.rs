//! `bench http`: the HTTP front door (issue 23) against the JSON-RPC
//! socket on one daemon and one loaded model: streaming completion tokens
//! per second with 1 and 8 concurrent clients, time to first token, and
//! 64 concurrent SSE clients held to their end.
//!
//! HTTP clients are written here over `std::net::TcpStream`: HTTP/1.1,
//! `POST /v1/completions` with `stream: true`, the chunked body decoded
//! and its SSE `data:` lines parsed with serde_json, one connection per
//! request. A token is one SSE chunk that carries a choice and no
//! `finish_reason` (the daemon writes one per engine `token` event); the
//! stream's `usage` chunk must agree. RPC clients are `modeld_wire::Client`
//! on the daemon's Unix socket, `generate` subscriptions, counting `token`
//! events. Both sides connect before the clients are released together,
//! send the same prompts (client i's prompt is the same on both) with the
//! same greedy parameters, and parse every event as JSON; the first token
//! is timed from the request's write. HTTP and RPC rounds alternate, the
//! order flipping every round, and the figures are medians over rounds.
//! Time to first token is also measured alone: single-client requests of
//! one token, alternating between the paths.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use modeld_e2e::synthetic::{self, Shape};
use modeld_e2e::Daemon;
use serde_json::{json, Value};

use super::{daemon_with, median};

/// How long a client waits for any byte before it counts an error.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq)]
enum Door {
    Rpc,
    Http,
}

impl Door {
    fn name(self) -> &'static str {
        match self {
            Door::Rpc => "RPC socket",
            Door::Http => "HTTP SSE",
        }
    }
}

/// What one client saw of its stream.
struct Stream {
    tokens: usize,
    /// From the request's write to the first token.
    first: Option<Duration>,
    /// `: queued ...` comments (HTTP) or `queued` events (RPC).
    queued: usize,
    error: Option<String>,
}

/// One round: every client started together.
struct Round {
    tok_s: f64,
    /// The median of the clients' times to first token, in seconds.
    ttft: f64,
    ttft_max: f64,
    errors: usize,
    first_error: Option<String>,
    queued: usize,
}

pub fn run(tokens: usize, rounds: usize) {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("synth");
    let shape = Shape {
        hidden: 512,
        intermediate: 1408,
        layers: 8,
        heads: 8,
        kv_heads: 4,
    };
    let size = synthetic::write_model(&dir, "llama", shape);
    // Random weights may pick the end token early; every client should
    // generate all its tokens.
    synthetic::make_never_ending(&dir, 4096);
    let port = free_port();
    let config = format!("[http]\nlisten = [\"127.0.0.1:{port}\"]\nallow_anonymous = true\n");
    let daemon = daemon_with(&config, &[], &dir);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_http(addr);
    println!(
        "Synthetic llama: {} layers, hidden {}, {:.0} MiB of f32 weights; CPU ({} threads), \
         greedy, {tokens} tokens per client, one daemon (default config plus an [http] \
         loopback listener); HTTP and RPC rounds alternate; medians of {rounds} rounds \
         (64 clients: {} rounds)",
        shape.layers,
        shape.hidden,
        size as f64 / (1u64 << 20) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        rounds.div_ceil(3).max(1),
    );
    println!("load average at the start: {}\n", loadavg());
    // Warm-up, not counted: the first generation pays for page faults.
    for path in [Door::Rpc, Door::Http] {
        let round = measure(path, &daemon, addr, 2, tokens);
        assert_eq!(round.errors, 0, "warm-up: {:?}", round.first_error);
    }
    println!("| clients | RPC tok/s | HTTP tok/s | HTTP / RPC (medians) | HTTP / RPC per round: median (min-max) | RPC TTFT ms | HTTP TTFT ms | TTFT overhead ms | errors |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for clients in [1, 8] {
        let (rpc, http) = interleaved(&daemon, addr, clients, tokens, rounds);
        let ratios: Vec<f64> = rpc
            .iter()
            .zip(&http)
            .map(|(r, h)| h.tok_s / r.tok_s)
            .collect();
        let rate = |rounds: &[Round]| median(&rounds.iter().map(|r| r.tok_s).collect::<Vec<_>>());
        let ttft =
            |rounds: &[Round]| median(&rounds.iter().map(|r| r.ttft).collect::<Vec<_>>()) * 1e3;
        let errors: usize = rpc.iter().chain(&http).map(|r| r.errors).sum();
        println!(
            "| {clients} | {:.1} | {:.1} | {:.3}x | {:.3}x ({:.3}-{:.3}) | {:.2} | {:.2} | {:+.2} | {errors} |",
            rate(&rpc),
            rate(&http),
            rate(&http) / rate(&rpc),
            median(&ratios),
            ratios.iter().copied().fold(f64::MAX, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
            ttft(&rpc),
            ttft(&http),
            ttft(&http) - ttft(&rpc),
        );
        report_errors(rpc.iter().chain(&http));
    }
    first_token(&daemon, addr, rounds * 5);
    let many = 64;
    let (rpc, http) = interleaved(&daemon, addr, many, tokens, rounds.div_ceil(3).max(1));
    println!("\n{many} concurrent clients (scheduler.max_batch 8: the others wait in the queue)\n");
    println!("| path | rounds | tok/s (median) | errors | TTFT median ms | TTFT max ms | queue notes per round |");
    println!("|---|---|---|---|---|---|---|");
    for (path, rounds) in [(Door::Rpc, &rpc), (Door::Http, &http)] {
        let pick = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {} | {} | {:.1} | {} | {:.0} | {:.0} | {:.0} |",
            path.name(),
            rounds.len(),
            pick(|r| r.tok_s),
            rounds.iter().map(|r| r.errors).sum::<usize>(),
            pick(|r| r.ttft) * 1e3,
            pick(|r| r.ttft_max) * 1e3,
            pick(|r| r.queued as f64),
        );
    }
    report_errors(rpc.iter().chain(&http));
    let ratio = |f: fn(&Round) -> f64| {
        median(&http.iter().map(f).collect::<Vec<_>>())
            / median(&rpc.iter().map(f).collect::<Vec<_>>())
    };
    println!("\nHTTP / RPC at {many} clients: {:.3}x", ratio(|r| r.tok_s));
    println!("load average at the end: {}", loadavg());
}

/// Time to first token alone: `pairs` single-client requests of one
/// token on each path, alternating, the order flipped every pair.
fn first_token(daemon: &Daemon, addr: SocketAddr, pairs: usize) {
    let (rpc, http) = interleaved(daemon, addr, 1, 1, pairs);
    let ms = |rounds: &[Round]| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r.ttft * 1e3).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (rpc_ms, http_ms) = (ms(&rpc), ms(&http));
    let diffs: Vec<f64> = rpc
        .iter()
        .zip(&http)
        .map(|(r, h)| (h.ttft - r.ttft) * 1e3)
        .collect();
    let quantile = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "\nTime to first token: 1 client, max_tokens 1, {pairs} requests on each path, alternating\n"
    );
    println!("| path | median ms | p10 ms | p90 ms | errors |");
    println!("|---|---|---|---|---|");
    for (path, rounds, v) in [(Door::Rpc, &rpc, &rpc_ms), (Door::Http, &http, &http_ms)] {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            path.name(),
            median(v),
            quantile(v, 0.1),
            quantile(v, 0.9),
            rounds.iter().map(|r| r.errors).sum::<usize>()
        );
    }
    println!(
        "\nHTTP - RPC: {:+.2} ms (medians), {:+.2} ms (median of paired differences); {:.3}x",
        median(&http_ms) - median(&rpc_ms),
        median(&diffs),
        median(&http_ms) / median(&rpc_ms)
    );
    report_errors(rpc.iter().chain(&http));
}

/// `rounds` rounds of each path at `clients`, alternating, the order
/// flipped every round.
fn interleaved(
    daemon: &Daemon,
    addr: SocketAddr,
    clients: usize,
    tokens: usize,
    rounds: usize,
) -> (Vec<Round>, Vec<Round>) {
    let (mut rpc, mut http) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Door::Http, Door::Rpc]
        } else {
            [Door::Rpc, Door::Http]
        };
        for path in order {
            let result = measure(path, daemon, addr, clients, tokens);
            match path {
                Door::Rpc => rpc.push(result),
                Door::Http => http.push(result),
            }
        }
    }
    (rpc, http)
}

fn report_errors<'a>(rounds: impl Iterator<Item = &'a Round>) {
    for error in rounds.filter_map(|r| r.first_error.as_ref()) {
        println!("error: {error}");
    }
}

fn prompt(client: usize) -> String {
    format!("client {client} asks about the cache")
}

/// `clients` streams at once on `path`; aggregate completion tokens per
/// second from their release to the last one's end.
fn measure(path: Door, daemon: &Daemon, addr: SocketAddr, clients: usize, tokens: usize) -> Round {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            match path {
                Door::Rpc => {
                    let client = daemon.client();
                    client
                        .set_read_timeout(Some(READ_TIMEOUT))
                        .expect("timeout");
                    std::thread::spawn(move || rpc_stream(client, &barrier, i, tokens))
                }
                Door::Http => std::thread::spawn(move || http_stream(addr, &barrier, i, tokens)),
            }
        })
        .collect();
    barrier.wait();
    let began = Instant::now();
    let streams: Vec<Stream> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let wall = began.elapsed().as_secs_f64();
    let total: usize = streams.iter().map(|s| s.tokens).sum();
    let firsts: Vec<f64> = streams
        .iter()
        .filter_map(|s| s.first.map(|d| d.as_secs_f64()))
        .collect();
    let mut errors = 0;
    let mut first_error = None;
    for stream in &streams {
        let error = stream.error.clone().or_else(|| {
            (stream.tokens != tokens).then(|| format!("{} tokens of {tokens}", stream.tokens))
        });
        if let Some(error) = error {
            errors += 1;
            first_error.get_or_insert(format!("{} ({clients} clients): {error}", path.name()));
        }
    }
    Round {
        tok_s: total as f64 / wall,
        ttft: median(&firsts),
        ttft_max: firsts.iter().copied().fold(0.0, f64::max),
        errors,
        first_error,
        queued: streams.iter().map(|s| s.queued).sum(),
    }
}

fn rpc_stream(
    mut client: modeld_wire::Client,
    barrier: &Barrier,
    i: usize,
    tokens: usize,
) -> Stream {
    let params = json!({"model": "synth", "prompt": prompt(i), "max_tokens": tokens,
        "temperature": 0});
    let mut stream = Stream {
        tokens: 0,
        first: None,
        queued: 0,
        error: None,
    };
    barrier.wait();
    let sent = Instant::now();
    let subscription = match client.subscribe("generate", params) {
        Ok(subscription) => subscription,
        Err(err) => {
            stream.error = Some(format!("generate: {err}"));
            return stream;
        }
    };
    for event in subscription {
        let event = match event {
            Ok(event) => event,
            Err(err) => {
                stream.error = Some(format!("stream: {err}"));
                return stream;
            }
        };
        match event["event"].as_str() {
            Some("token") => {
                stream.first.get_or_insert_with(|| sent.elapsed());
                stream.tokens += 1;
            }
            Some("queued") => stream.queued += 1,
            Some("error") => stream.error = Some(event["error"].to_string()),
            _ => {}
        }
    }
    stream
}

fn http_stream(addr: SocketAddr, barrier: &Barrier, i: usize, tokens: usize) -> Stream {
    let mut stream = Stream {
        tokens: 0,
        first: None,
        queued: 0,
        error: None,
    };
    let connected = TcpStream::connect(addr).and_then(|socket| {
        socket.set_read_timeout(Some(READ_TIMEOUT))?;
        socket.set_nodelay(true)?;
        Ok(socket)
    });
    barrier.wait();
    let sent = Instant::now();
    if let Err(err) = connected.and_then(|socket| read_sse(socket, i, tokens, sent, &mut stream)) {
        stream.error.get_or_insert(format!("http: {err}"));
    }
    stream
}

/// Sends the streaming completion and reads its events into `stream`.
fn read_sse(
    mut socket: TcpStream,
    i: usize,
    tokens: usize,
    sent: Instant,
    stream: &mut Stream,
) -> io::Result<()> {
    let body = json!({"model": "synth", "prompt": prompt(i), "max_tokens": tokens,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(socket);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "in the head"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else {
        Box::new(reader)
    };
    if status != "200" {
        let mut text = String::new();
        let _ = body.read_to_string(&mut text);
        stream.error = Some(format!("status {status}: {text}"));
        return Ok(());
    }
    let mut usage = None;
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            stream.error = Some("the stream ended without [DONE]".into());
            return Ok(());
        }
        let text = line.trim_end();
        if text.starts_with(':') {
            stream.queued += 1;
            continue;
        }
        let Some(data) = text.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim_start();
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {data}")))?;
        if chunk.get("error").is_some() {
            stream.error = Some(data.to_string());
            continue;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u["completion_tokens"].as_u64();
        }
        let is_token = chunk["choices"]
            .get(0)
            .is_some_and(|choice| choice["finish_reason"].is_null());
        if is_token {
            stream.first.get_or_insert_with(|| sent.elapsed());
            stream.tokens += 1;
        }
    }
    if usage != Some(stream.tokens as u64) && stream.error.is_none() {
        stream.error = Some(format!(
            "{} token chunks, usage says {usage:?}",
            stream.tokens
        ));
    }
    Ok(())
}

/// An HTTP/1.1 chunked body as plain bytes.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no last chunk",
                ));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "inside a chunk",
            ));
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// Waits until `GET /health` answers.
fn wait_for_http(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = TcpStream::connect(addr).and_then(|mut socket| {
            socket.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut reply = String::new();
            socket.read_to_string(&mut reply)?;
            Ok(reply.starts_with("HTTP/1.1 200"))
        });
        if ok.unwrap_or(false) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP listener never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn loadavg() -> String {
    std::fs::read_to_string(Path::new("/proc/loadavg"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
