//! Benchmarks of the real daemon, reported as ratios against a baseline
//! measured in the same run (this machine is shared and noisy).
//!
//! `cargo run --release -p modeld-e2e --bin bench -- rpc [--calls N]`:
//! round-trip latency of `status` over the daemon's socket with 1 and 64
//! concurrent clients, against a bare Unix-socket line echo server.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- download [--mib N]`:
//! `models.pull` of an N MiB file from the loopback fake hub (HTTP, hashing,
//! fsync, cache layout) against a raw loopback TCP copy of the same bytes
//! into a file on the same disk.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- generate [--tokens N]`:
//! load time of a synthetic 8-layer llama (random weights, the tiny-llama
//! tokenizer) against a raw read of its weight file, and CPU greedy decode
//! speed as the engine reports it and as a streaming client sees it.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- batch [--tokens N]`:
//! aggregate CPU decode throughput of 1, 4 and 8 concurrent clients on one
//! synthetic ~135M-parameter llama, with continuous batching and with
//! `max_batch = 1` (jobs one after another), plus batch-1 decode on one
//! thread against two, in f32 and Q8_0.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- families [--tokens N]`:
//! aggregate CPU decode throughput of 1 and 8 concurrent clients on a
//! Gemma-2-shaped and a Phi-3-shaped synthetic model against a Llama of the
//! same shape (same projections; Gemma 2 ties its embeddings and adds two
//! norms a layer, Phi-3 fuses its projections), measured in turn.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- cache [--repos N] [--mib N]`:
//! `cache.scan` of a synthetic HF cache of N repos against huggingface_hub's
//! `scan_cache_dir` on the same cache (when installed), and the hashing of
//! `cache.duplicates` over two N-MiB copies against `sha256sum`.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- images [--python PATH] [--steps N]`:
//! CPU image generation (seconds per denoising step, pictures per second,
//! peak resident memory) of the tiny-sd fixture at 64x64 and of a random
//! SD1.5-shaped pipeline at 256x256 for N steps (default 2), on modeld and
//! on diffusers in the same run. The Python interpreter (default `python3`,
//! or `$MODELD_BENCH_PYTHON`) must have torch, diffusers and transformers:
//! it also builds the SD1.5-shaped pipeline; without them only modeld's
//! tiny-sd figures are printed, with a note. A FLUX-shaped pipeline (FLUX.1's
//! blocks at a reduced width and depth, random weights) runs on modeld.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- runners [--python PATH] [--all-cpus]`:
//! the tiny Qwen-Image fixture and the random SD1.5-shaped pipeline on the
//! CPU through modeld's bundled diffusers runner (the daemon's
//! `[runners] python` is PATH) against diffusers called directly in one
//! Python process with the same parameters, and SD1.5 on modeld's native
//! path too: first load, first and warm generate, seconds per step, and a
//! runner's restart after a `kill -9`, idle and mid-generation. PATH must
//! have torch, diffusers and transformers. Everything runs pinned to one
//! CPU (one torch and one rayon thread) unless `--all-cpus`; see
//! `bench_runners.rs`.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- http [--tokens N] [--rounds N]`:
//! the HTTP front door against the JSON-RPC socket on one daemon and one
//! synthetic 8-layer llama: streaming tokens/s over SSE
//! (`/v1/completions`, `stream: true`) and over `generate`
//! subscriptions with 1 and 8 concurrent clients, time to first token,
//! and 64 concurrent streams held to their end, counting errors; HTTP and
//! RPC rounds alternate, medians of N rounds (default 9); see
//! `bench_http.rs`.
//!
//! `cargo run --release -p modeld-e2e --bin bench -- cpu [--shapes 135m|1.1b|both] [--tokens N] [--rounds N] [--sections decode,ttft,batch] [--python PATH]`:
//! CPU decode against llama.cpp (llama-cpp-python in PATH, default
//! `python3` or `$MODELD_BENCH_PYTHON`) on random SmolLM-135M- and
//! TinyLlama-1.1B-shaped llamas in f32, Q8_0 and Q4_K_M: tokens/s at one
//! thread and at all cores, quiet and beside a busy neighbour (in a session
//! of its own and in the daemon's, against a streaming ceiling), time to first
//! token after a cold load, and modeld's 8 batched clients against 1; the
//! engines' rounds alternate, best of N (default 3); see `bench_cpu.rs`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use modeld_e2e::fakehub::FakeHub;
use modeld_e2e::Daemon;

#[path = "../bench_cancel.rs"]
mod bench_cancel;
#[path = "../bench_cpu.rs"]
mod bench_cpu;
#[path = "../bench_families.rs"]
mod bench_families;
#[path = "../bench_http.rs"]
mod bench_http;
#[path = "../bench_neighbour.rs"]
mod bench_neighbour;
#[path = "../bench_runners.rs"]
mod bench_runners;

const REQUEST: &str = r#"{"jsonrpc":"2.0","id":1,"method":"status"}"#;

const USAGE: &str = "usage: bench rpc [--calls N] | download [--mib N] | generate [--tokens N] | batch [--tokens N] | families [--tokens N] | cache [--repos N] [--mib N] | images [--python PATH] [--steps N] | cancel [--python PATH] | runners [--python PATH] [--all-cpus] | http [--tokens N] [--rounds N] | cpu [--shapes 135m|1.1b|both] [--tokens N] [--rounds N] [--sections decode,ttft,batch] [--python PATH]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A bench runs for minutes: asking how to call one must not start it.
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let calls = flag(&args, "--calls").unwrap_or(2000);
    match args.first().map(String::as_str) {
        Some("rpc") => rpc(calls),
        Some("echo-server") => echo_server(Path::new(&args[1])),
        Some("download") => download(flag(&args, "--mib").unwrap_or(256)),
        Some("generate") => generate(flag(&args, "--tokens").unwrap_or(128)),
        Some("batch") => batch(flag(&args, "--tokens").unwrap_or(48)),
        Some("families") => bench_families::run(flag(&args, "--tokens").unwrap_or(64)),
        Some("cache") => cache(
            flag(&args, "--repos").unwrap_or(1000),
            flag(&args, "--mib").unwrap_or(256),
        ),
        Some("images") => images(&python(&args), flag(&args, "--steps").unwrap_or(2)),
        Some("cancel") => cancel(&python(&args)),
        Some("runners") => runners(&python(&args), args.iter().any(|a| a == "--all-cpus")),
        Some("http") => bench_http::run(
            flag(&args, "--tokens").unwrap_or(64),
            flag(&args, "--rounds").unwrap_or(9),
        ),
        Some("cpu") => bench_cpu::run(bench_cpu::Options::parse(&args, python(&args))),
        Some("spin") => bench_neighbour::spin(),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<usize> {
    let index = args.iter().position(|a| a == name)?;
    args.get(index + 1)?.parse().ok()
}

fn rpc(calls: usize) {
    let daemon = Daemon::start();
    let echo = EchoProcess::start();
    println!("RPC round trip: `status` on modeld vs a bare Unix-socket line echo process");
    println!("{calls} calls per client, best of {ROUNDS} interleaved rounds; latencies in microseconds\n");
    println!("| clients | server | p50 µs | p99 µs | calls/s | p50 ratio | p99 ratio |");
    println!("|---|---|---|---|---|---|---|");
    for clients in [1, 64] {
        let mut echo_rounds = Vec::new();
        let mut modeld_rounds = Vec::new();
        for _ in 0..ROUNDS {
            echo_rounds.push(measure(&echo.socket, clients, calls));
            modeld_rounds.push(measure(&daemon.socket, clients, calls));
        }
        let echo = Stats::best(echo_rounds);
        let modeld = Stats::best(modeld_rounds);
        for (name, stats) in [("echo", &echo), ("modeld", &modeld)] {
            println!(
                "| {clients} | {name} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.1}x |",
                stats.p50,
                stats.p99,
                stats.rate,
                stats.p50 / echo.p50,
                stats.p99 / echo.p99
            );
        }
    }
}

const ROUNDS: usize = 3;

struct Stats {
    p50: f64,
    p99: f64,
    rate: f64,
}

impl Stats {
    /// The round with the lowest median: the least disturbed by neighbours.
    fn best(rounds: Vec<Stats>) -> Stats {
        rounds
            .into_iter()
            .min_by(|a, b| a.p50.total_cmp(&b.p50))
            .expect("at least one round")
    }
}

/// The baseline server, in its own process like the daemon.
struct EchoProcess {
    child: std::process::Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl EchoProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("echo.sock");
        let child = std::process::Command::new(std::env::current_exe().expect("own path"))
            .arg("echo-server")
            .arg(&socket)
            .spawn()
            .expect("start echo server");
        while UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
        EchoProcess {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `clients` threads, each making `calls` sequential round trips.
fn measure(socket: &Path, clients: usize, calls: usize) -> Stats {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_path_buf();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let stream = UnixStream::connect(&socket).expect("connect");
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let mut latencies = Vec::with_capacity(calls);
                // Warm up the connection before timing.
                for _ in 0..10 {
                    round_trip(&mut writer, &mut reader, &mut line);
                }
                barrier.wait();
                for _ in 0..calls {
                    let start = Instant::now();
                    round_trip(&mut writer, &mut reader, &mut line);
                    latencies.push(start.elapsed());
                }
                latencies
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client"))
        .collect();
    let elapsed = start.elapsed();
    all.sort();
    let micros = |q: f64| all[((all.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Stats {
        p50: micros(0.50),
        p99: micros(0.99),
        rate: all.len() as f64 / elapsed.as_secs_f64(),
    }
}

fn round_trip(writer: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &mut String) {
    writer.write_all(REQUEST.as_bytes()).expect("write");
    writer.write_all(b"\n").expect("write");
    line.clear();
    reader.read_line(line).expect("read");
    assert!(!line.contains("\"error\""), "error reply: {line}");
}

/// The baseline: a thread per connection echoing each line back.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind echo socket");
    {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if writer.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    }
}

fn download(mib: usize) {
    let hub = FakeHub::start();
    // Incompressible, deterministic content.
    let bytes = pseudo_random(mib << 20, 0x2545f4914f6cdd1du64);
    hub.add_repo("bench/big", vec![("model.safetensors".into(), bytes)]);
    let sha = hub.sha256_of("bench/big", "model.safetensors");
    let endpoint = hub.endpoint();
    println!("Download of a {mib} MiB file over loopback; best of {ROUNDS} rounds\n");
    println!("| path | seconds | MiB/s | ratio |");
    println!("|---|---|---|---|");
    let mut raw_best = f64::MAX;
    let mut pull_best = f64::MAX;
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().expect("temp dir");
        raw_best = raw_best.min(raw_copy(hub.addr, &sha, &dir.path().join("copy")));
        let daemon = Daemon::start_configured("", &[("HF_ENDPOINT", &endpoint)]);
        daemon
            .call(
                "models.register",
                serde_json::json!({"name": "big", "repo": "bench/big"}),
            )
            .expect("register");
        let start = Instant::now();
        daemon.pull(serde_json::json!({"name": "big"}));
        pull_best = pull_best.min(start.elapsed().as_secs_f64());
    }
    for (name, seconds) in [("raw TCP copy", raw_best), ("modeld pull", pull_best)] {
        println!(
            "| {name} | {seconds:.3} | {:.0} | {:.2}x |",
            mib as f64 / seconds,
            seconds / raw_best
        );
    }
}

/// GETs the file's CDN path with a bare socket and writes the body to disk.
fn raw_copy(addr: std::net::SocketAddr, sha: &str, out: &Path) -> f64 {
    use std::io::Read;
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(stream, "GET /cdn/{sha} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut file = std::fs::File::create(out).expect("create");
    let mut buf = vec![0u8; 1 << 20];
    let mut header_done = false;
    loop {
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if !header_done {
            let end = chunk
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("one read holds the header");
            chunk = &chunk[end + 4..];
            header_done = true;
        }
        file.write_all(chunk).expect("write");
    }
    file.sync_all().expect("sync");
    start.elapsed().as_secs_f64()
}

/// A random llama big enough to time on a CPU.
fn synthetic_llama(dir: &Path) -> u64 {
    let shape = modeld_e2e::synthetic::Shape {
        hidden: 512,
        intermediate: 1408,
        layers: 8,
        heads: 8,
        kv_heads: 4,
    };
    modeld_e2e::synthetic::write_model(dir, "llama", shape)
}

fn generate(tokens: usize) {
    let daemon = Daemon::start();
    let dir = daemon.dir.path().join("synthetic-llama");
    let size = synthetic_llama(&dir);
    daemon
        .call(
            "models.register",
            serde_json::json!({"name": "synth", "local_path": dir}),
        )
        .expect("register");
    let weights = dir.join("model.safetensors");
    println!("Synthetic llama: 8 layers, hidden 512, {:.1} MiB of f32 weights; CPU, greedy, {tokens} tokens", size as f64 / (1u64 << 20) as f64);
    println!("best of {ROUNDS} rounds (page cache warm for both load and read)\n");
    let mut read_best = f64::MAX;
    let mut load_best = f64::MAX;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let bytes = std::fs::read(&weights).expect("read weights");
        read_best = read_best.min(start.elapsed().as_secs_f64());
        drop(bytes);
        let reply = daemon
            .call("load", serde_json::json!({"name": "synth"}))
            .expect("load");
        load_best = load_best.min(reply["model"]["load_ms"].as_f64().unwrap_or(0.0) / 1000.0);
        daemon
            .call("unload", serde_json::json!({"name": "synth"}))
            .expect("unload");
    }
    daemon
        .call("load", serde_json::json!({"name": "synth"}))
        .expect("load");
    let mut engine_best = 0f64;
    let mut client_best = 0f64;
    let mut prefill_best = 0f64;
    for _ in 0..ROUNDS {
        let mut client = daemon.client();
        let start = Instant::now();
        let mut first_token = None;
        let mut done = serde_json::Value::Null;
        let params = serde_json::json!({"model": "synth", "prompt": "The application uses a", "max_tokens": tokens});
        for event in client.subscribe("generate", params).expect("generate") {
            let event = event.expect("event");
            if first_token.is_none() {
                first_token = Some(Instant::now());
            }
            if event["done"] == true {
                done = event;
            }
        }
        let streamed =
            start.elapsed().as_secs_f64() - (first_token.expect("a token") - start).as_secs_f64();
        let completion = done["completion_tokens"].as_f64().unwrap_or(0.0);
        engine_best = engine_best.max(done["decode_tokens_per_s"].as_f64().unwrap_or(0.0));
        prefill_best = prefill_best.max(done["prefill_tokens_per_s"].as_f64().unwrap_or(0.0));
        client_best = client_best.max((completion - 1.0) / streamed);
    }
    println!("| measure | value | ratio |");
    println!("|---|---|---|");
    println!(
        "| raw read of the weights | {:.1} ms | 1.00x |",
        read_best * 1000.0
    );
    println!(
        "| modeld load (mmap, build model) | {:.1} ms | {:.2}x |",
        load_best * 1000.0,
        load_best / read_best
    );
    println!("| prefill (engine) | {prefill_best:.0} tok/s | |");
    println!("| decode (engine) | {engine_best:.1} tok/s | 1.00x |");
    println!(
        "| decode (streaming client) | {client_best:.1} tok/s | {:.2}x |",
        client_best / engine_best
    );
}

/// A daemon with the synthetic model `synth` loaded from `weights`.
fn daemon_with(config: &str, env: &[(&str, &str)], weights: &Path) -> Daemon {
    let daemon = Daemon::start_configured(config, env);
    let params = serde_json::json!({"name": "synth", "local_path": weights});
    daemon.call("models.register", params).expect("register");
    daemon
        .call("load", serde_json::json!({"name": "synth"}))
        .expect("load");
    daemon
}

/// Completion tokens per second of all `clients` generating `tokens`
/// greedy tokens at once, each from its own prompt.
fn aggregate(daemon: &Daemon, clients: usize, tokens: usize) -> f64 {
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let mut client = daemon.client();
            let start = start.clone();
            std::thread::spawn(move || {
                let params = serde_json::json!({"model": "synth",
                    "prompt": format!("client {i} asks about the cache"),
                    "max_tokens": tokens, "temperature": 0});
                start.wait();
                let mut completion = 0.0;
                for event in client.subscribe("generate", params).expect("generate") {
                    let event = event.expect("event");
                    if event["done"] == true {
                        completion = event["completion_tokens"].as_f64().unwrap_or(0.0);
                    }
                }
                completion
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let total: f64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    total / began.elapsed().as_secs_f64()
}

fn batch(tokens: usize) {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("synth");
    let shape = modeld_e2e::synthetic::Shape {
        hidden: 1024,
        intermediate: 2816,
        layers: 12,
        heads: 16,
        kv_heads: 4,
    };
    let size = modeld_e2e::synthetic::write_model(&dir, "llama", shape);
    // Random weights may pick the end token early; every client should
    // generate all its tokens.
    modeld_e2e::synthetic::make_never_ending(&dir, 4096);
    let q8 = work.path().join("synth-q8/synth.gguf");
    std::fs::create_dir_all(q8.parent().unwrap()).expect("q8 dir");
    for file in ["tokenizer.json", "config.json"] {
        std::fs::copy(dir.join(file), q8.parent().unwrap().join(file)).expect("copy");
    }
    modeld_e2e::gguf::write_llama_gguf(&dir, &q8, modeld_e2e::gguf::GgufType::Q8_0)
        .expect("q8 gguf");
    println!(
        "Synthetic llama: 12 layers, hidden 1024, {:.0} MiB of f32 weights; CPU ({} threads), greedy, {tokens} tokens per client, best of {ROUNDS}\n",
        size as f64 / (1u64 << 20) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let batched = daemon_with("", &[], &dir);
    let serial = daemon_with("[scheduler]\nmax_batch = 1\n", &[], &dir);
    println!("| clients | one at a time tok/s | batched tok/s | batched / one at a time | batched / 1 client |");
    println!("|---|---|---|---|---|");
    let mut one_client = 0.0;
    for clients in [1, 4, 8] {
        let mut serial_best = 0f64;
        let mut batched_best = 0f64;
        for _ in 0..ROUNDS {
            serial_best = serial_best.max(aggregate(&serial, clients, tokens));
            batched_best = batched_best.max(aggregate(&batched, clients, tokens));
        }
        if clients == 1 {
            one_client = batched_best;
        }
        println!(
            "| {clients} | {serial_best:.1} | {batched_best:.1} | {:.2}x | {:.2}x |",
            batched_best / serial_best,
            batched_best / one_client
        );
    }
    drop((batched, serial));
    println!("\n| weights | 1 thread tok/s | 2 threads tok/s | 2 / 1 | 8 clients tok/s | 8 clients / 1 |");
    println!("|---|---|---|---|---|---|");
    for (name, weights) in [("f32", dir.as_path()), ("Q8_0", q8.as_path())] {
        let one_thread = daemon_with("", &[("RAYON_NUM_THREADS", "1")], weights);
        let two_threads = daemon_with("", &[("RAYON_NUM_THREADS", "2")], weights);
        let (mut single, mut double, mut eight) = (0f64, 0f64, 0f64);
        for _ in 0..ROUNDS {
            single = single.max(aggregate(&one_thread, 1, tokens));
            double = double.max(aggregate(&two_threads, 1, tokens));
            eight = eight.max(aggregate(&two_threads, 8, tokens));
        }
        println!(
            "| {name} | {single:.1} | {double:.1} | {:.2}x | {eight:.1} | {:.2}x |",
            double / single,
            eight / double
        );
    }
}

/// Best wall time of `runs` calls of `f`, in seconds.
fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn synthetic_cache(root: &Path, repos: usize) {
    for i in 0..repos {
        let repo = root.join(format!("models--org--model-{i:04}"));
        for (rev, commit) in [(0u8, "a"), (1u8, "b")] {
            let commit = commit.repeat(40);
            let snapshot = repo.join("snapshots").join(&commit);
            std::fs::create_dir_all(&snapshot).expect("snapshot");
            std::fs::create_dir_all(repo.join("blobs")).expect("blobs");
            for (name, size) in [
                ("config.json", 600usize),
                ("model.safetensors", 4096),
                ("tokenizer.json", 2048),
            ] {
                let blob = format!("{i:08x}{rev:02x}{:054x}", name.len());
                std::fs::write(repo.join("blobs").join(&blob), vec![rev; size]).expect("blob");
                std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name))
                    .expect("link");
            }
            std::fs::create_dir_all(repo.join("refs")).expect("refs");
            std::fs::write(
                repo.join("refs").join(if rev == 0 { "main" } else { "v2" }),
                &commit,
            )
            .expect("ref");
        }
    }
}

fn cache(repos: usize, mib: usize) {
    let daemon = Daemon::start();
    let hub = daemon.hf_cache();
    synthetic_cache(&hub, repos);
    println!("cache.scan of {repos} repos (2 revisions, 3 files each) vs huggingface_hub.scan_cache_dir; best of {ROUNDS}\n");
    println!("| what | seconds | ratio |");
    println!("|---|---|---|");
    let ours = best_of(ROUNDS, || {
        daemon
            .call("cache.scan", serde_json::json!({}))
            .expect("scan");
    });
    println!("| modeld cache.scan (RPC) | {ours:.3} | 1.00x |");
    let script =
        "import sys; from huggingface_hub import scan_cache_dir; scan_cache_dir(sys.argv[1])";
    let available = std::process::Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .status()
        .is_ok_and(|s| s.success());
    if available {
        let theirs = best_of(ROUNDS, || {
            let status = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(&hub)
                .status()
                .expect("python3");
            assert!(status.success());
        });
        println!(
            "| huggingface_hub scan_cache_dir (incl. interpreter start) | {theirs:.3} | {:.2}x |",
            theirs / ours
        );
    }

    // Two copies of the same bytes in an otherwise empty daemon: size
    // matches, so both are hashed, and nothing else is.
    let daemon = Daemon::start();
    let dir = daemon.dir.path().join("models");
    std::fs::create_dir_all(&dir).expect("model root");
    let bytes = pseudo_random(mib << 20, 0x9e3779b97f4a7c15u64);
    std::fs::write(dir.join("a.safetensors"), &bytes).expect("copy a");
    std::fs::write(dir.join("b.safetensors"), &bytes).expect("copy b");
    drop(bytes);
    std::fs::write(
        daemon.dir.path().join("modes.toml"),
        format!("model_root = \"{}\"\n", dir.display()),
    )
    .expect("modes");
    daemon
        .call("modes.reload", serde_json::json!({}))
        .expect("reload");
    println!("\nHashing two {mib} MiB copies (page cache warm)\n");
    println!("| what | seconds | MiB/s | ratio |");
    println!("|---|---|---|---|");
    let sha256sum = best_of(ROUNDS, || {
        let status = std::process::Command::new("sha256sum")
            .arg(dir.join("a.safetensors"))
            .arg(dir.join("b.safetensors"))
            .stdout(std::process::Stdio::null())
            .status()
            .expect("sha256sum");
        assert!(status.success());
    });
    let ours = best_of(ROUNDS, || {
        let reply = daemon
            .call("cache.duplicates", serde_json::json!({}))
            .expect("duplicates");
        assert_eq!(reply["groups"].as_array().map(Vec::len), Some(1));
    });
    let total = (2 * mib) as f64;
    println!(
        "| sha256sum (one process, sequential) | {sha256sum:.3} | {:.0} | 1.00x |",
        total / sha256sum
    );
    println!(
        "| modeld cache.duplicates (parallel) | {ours:.3} | {:.0} | {:.2}x |",
        total / ours,
        ours / sha256sum
    );
}

/// Incompressible, deterministic bytes (xorshift).
fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The interpreter for the diffusers side: `--python`, else
/// `$MODELD_BENCH_PYTHON`, else `python3`.
fn python(args: &[String]) -> String {
    let flagged = args
        .iter()
        .position(|a| a == "--python")
        .and_then(|i| args.get(i + 1).cloned());
    flagged
        .or_else(|| std::env::var("MODELD_BENCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into())
}

const IMAGES_SCRIPT: &str = include_str!("bench_images.py");

/// An engine's figures for one model: the best of its rounds.
struct ImageRun {
    load_s: f64,
    /// The median seconds between consecutive step ends (spin-waiting
    /// thread pools stall now and then on this shared machine; the median
    /// ignores those steps).
    step_s: f64,
    images_per_s: f64,
    peak_rss: u64,
}

/// One call's figures: its step intervals and its whole time.
struct Round {
    step_s: Vec<f64>,
    generate_s: f64,
}

/// One engine process: its load time, its calls and its peak memory.
struct ProcessRun {
    load_s: f64,
    rounds: Vec<Round>,
    peak_rss: u64,
}

impl ImageRun {
    /// The best figures over several processes of one engine.
    fn best(runs: &[ProcessRun]) -> Self {
        let rounds = runs.iter().flat_map(|run| &run.rounds);
        let step_s = rounds
            .clone()
            .map(|r| median(&r.step_s))
            .fold(f64::MAX, f64::min);
        let generate_s = rounds.map(|r| r.generate_s).fold(f64::MAX, f64::min);
        ImageRun {
            load_s: runs.iter().map(|r| r.load_s).fold(f64::MAX, f64::min),
            step_s,
            images_per_s: IMAGE_COUNT as f64 / generate_s,
            peak_rss: runs.iter().map(|r| r.peak_rss).max().unwrap_or(0),
        }
    }
}

/// One bench model: where it is and how it is run.
struct ImageCase {
    label: &'static str,
    dir: std::path::PathBuf,
    size: usize,
    steps: usize,
    /// Fresh processes per engine, alternating between the engines so
    /// both meet the machine's load alike.
    processes: usize,
    /// Calls per process.
    rounds: usize,
    /// Whether diffusers runs the same model in the same run.
    compare: bool,
}

const IMAGE_COUNT: usize = 1;
const IMAGE_GUIDANCE: f64 = 7.5;

fn images(python: &str, steps: usize) {
    let steps = steps.max(2);
    let work = tempfile::tempdir().expect("temp dir");
    let script = work.path().join("bench_images.py");
    std::fs::write(&script, IMAGES_SCRIPT).expect("script");
    let fixture = modeld_e2e::fixtures_dir().join("tiny-sd");
    let has_diffusers = std::process::Command::new(python)
        .args(["-c", "import diffusers, transformers, torch"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cases = vec![ImageCase {
        label: "tiny-sd fixture, 64x64",
        dir: fixture.clone(),
        size: 64,
        steps: 20,
        processes: ROUNDS,
        rounds: ROUNDS,
        compare: has_diffusers,
    }];
    if has_diffusers {
        let dir = work.path().join("sd15-random");
        make_sd15(python, &script, &dir, &fixture);
        cases.push(ImageCase {
            label: "SD1.5-shaped, random weights, 256x256",
            dir,
            size: 256,
            steps,
            processes: 2,
            rounds: 1,
            compare: true,
        });
    } else {
        println!("note: {python} lacks torch/diffusers/transformers: diffusers and the SD1.5-shaped pipeline are skipped\n");
    }
    let flux = work.path().join("flux-shaped");
    let shape = modeld_e2e::synthetic::FluxShape {
        heads: 8,
        double_blocks: 2,
        single_blocks: 4,
    };
    let bytes = modeld_e2e::synthetic::write_flux(&flux, shape);
    println!(
        "FLUX-shaped transformer: {} heads x 128, {} double + {} single blocks, {:.0} MiB f32, random weights, the tiny-flux encoders and VAE (scale 2, so 64x64 pixels are FLUX's 256 image tokens); T5 512 tokens\n",
        shape.heads, shape.double_blocks, shape.single_blocks, bytes as f64 / (1u64 << 20) as f64
    );
    cases.push(ImageCase {
        label: "FLUX-shaped, 64x64 (256 tokens)",
        dir: flux,
        size: 64,
        steps: steps.max(4),
        processes: 2,
        rounds: 2,
        compare: has_diffusers,
    });
    println!("CPU image generation, DDIM for SD (flow-matching Euler for FLUX), guidance {IMAGE_GUIDANCE}, {IMAGE_COUNT} picture per call, float32; processes of the two engines alternate; best of all calls\n");
    println!("| model | steps | engine | processes x calls | load s | s/step | images/s | peak RSS | s/step ratio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for case in &cases {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..case.processes {
            if case.compare {
                theirs.push(diffusers_image_run(python, &script, case));
            }
            ours.push(modeld_image_run(case));
        }
        let ours = ImageRun::best(&ours);
        let theirs = case.compare.then(|| ImageRun::best(&theirs));
        let base = theirs.as_ref().map_or(ours.step_s, |t| t.step_s);
        for (engine, run) in [("diffusers", theirs.as_ref()), ("modeld", Some(&ours))] {
            let Some(run) = run else { continue };
            println!(
                "| {} | {} | {engine} | {} x {} | {:.2} | {:.3} | {:.3} | {:.0} MiB | {:.2}x |",
                case.label,
                case.steps,
                case.processes,
                case.rounds,
                run.load_s,
                run.step_s,
                run.images_per_s,
                run.peak_rss as f64 / (1u64 << 20) as f64,
                run.step_s / base
            );
        }
    }
}

/// Writes the SD1.5-shaped random pipeline to `dir` with the bench script,
/// taking the tokenizer and scheduler config from the tiny-sd `fixture`.
fn make_sd15(python: &str, script: &Path, dir: &Path, fixture: &Path) {
    let built = std::process::Command::new(python)
        .arg(script)
        .arg("make-sd15")
        .arg(dir)
        .arg(fixture.join("tokenizer"))
        .arg(fixture.join("scheduler/scheduler_config.json"))
        .status()
        .expect("run python");
    assert!(
        built.success(),
        "building the SD1.5-shaped pipeline failed (needs torch, diffusers)"
    );
}

/// `bench cancel`: see `bench_cancel.rs`.
fn cancel(python: &str) {
    let work = tempfile::tempdir().expect("temp dir");
    let script = work.path().join("bench_images.py");
    std::fs::write(&script, IMAGES_SCRIPT).expect("script");
    bench_cancel::run(python, &script, &modeld_e2e::fixtures_dir().join("tiny-sd"));
}

/// `bench runners`: see `bench_runners.rs`.
fn runners(python: &str, all_cpus: bool) {
    let work = tempfile::tempdir().expect("temp dir");
    let script = work.path().join("bench_images.py");
    std::fs::write(&script, IMAGES_SCRIPT).expect("script");
    let tiny_sd = modeld_e2e::fixtures_dir().join("tiny-sd");
    bench_runners::run(python, &script, &tiny_sd, all_cpus);
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The daemon's resident high-water mark (`VmHWM`), in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn modeld_image_run(case: &ImageCase) -> ProcessRun {
    let daemon = Daemon::start();
    daemon
        .call(
            "models.register",
            serde_json::json!({"name": "bench-sd", "local_path": case.dir}),
        )
        .expect("register");
    let mut client = daemon.client();
    client
        .set_read_timeout(Some(Duration::from_secs(1800)))
        .expect("timeout");
    let reply = client
        .call_value("load", serde_json::json!({"name": "bench-sd"}))
        .expect("load");
    let load_s = reply["model"]["load_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    let params = serde_json::json!({
        "model": "bench-sd",
        "prompt": "a lighthouse at dusk, oil painting",
        "size": format!("{0}x{0}", case.size),
        "steps": case.steps,
        "guidance": IMAGE_GUIDANCE,
        "count": IMAGE_COUNT,
        "seed": 0,
    });
    let rounds: Vec<Round> = (0..case.rounds)
        .map(|_| modeld_round(&mut client, &params))
        .collect();
    ProcessRun {
        load_s,
        rounds,
        peak_rss: peak_rss(daemon.pid().as_raw()),
    }
}

/// One `generate`: the times between its progress events, and its
/// `generate_ms` (text encoding, denoising, decoding).
fn modeld_round(client: &mut modeld_wire::Client, params: &serde_json::Value) -> Round {
    let mut marks = Vec::new();
    let mut done = serde_json::Value::Null;
    for event in client.subscribe("generate", params).expect("generate") {
        let event = event.expect("event");
        if event["event"] == "progress" && event["stage"] == "denoise" {
            marks.push(Instant::now());
        }
        if event["done"] == true {
            done = event;
        }
    }
    Round {
        step_s: marks
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect(),
        generate_s: done["generate_ms"].as_f64().expect("generate_ms") / 1000.0,
    }
}

fn diffusers_image_run(python: &str, script: &Path, case: &ImageCase) -> ProcessRun {
    let output = std::process::Command::new(python)
        .arg(script)
        .arg("run")
        .arg(&case.dir)
        .args([
            case.size.to_string(),
            case.steps.to_string(),
            IMAGE_COUNT.to_string(),
            IMAGE_GUIDANCE.to_string(),
            case.rounds.to_string(),
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run python");
    assert!(output.status.success(), "the diffusers run failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().expect("a result line");
    let result: serde_json::Value = serde_json::from_str(line).expect("result json");
    let rounds: Vec<Round> = result["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .map(|round| Round {
            step_s: serde_json::from_value(round["step_s"].clone()).expect("step_s"),
            generate_s: round["generate_s"].as_f64().expect("generate_s"),
        })
        .collect();
    ProcessRun {
        load_s: result["load_s"].as_f64().expect("load_s"),
        rounds,
        peak_rss: result["peak_rss_bytes"].as_u64().expect("peak"),
    }
}
