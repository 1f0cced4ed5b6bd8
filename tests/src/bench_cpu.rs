//! `bench cpu`: modeld's CPU text decode against llama.cpp (through
//! llama-cpp-python) on the same random-weight Llama shapes and the same
//! GGUF files, the two engines' rounds alternating in one run.
//!
//! Two shapes are built in a temporary folder: SmolLM-135M's (tied
//! embeddings) and TinyLlama-1.1B's, both with a 49152-token vocabulary, as
//! f32 safetensors and as f32, Q8_0 and (by llama.cpp's own quantizer)
//! Q4_K_M GGUF files. The vocabulary is one word per id (`t1234`), written
//! both as modeld's `tokenizer.json` and as the GGUF's SentencePiece-style
//! token list, so one prompt string gives modeld the very ids that the
//! llama.cpp side is handed directly. Neither engine may stop early: modeld's
//! end id is out of the vocabulary and the llama.cpp loop ignores its own.
//!
//! Sections: decode tokens/s at one thread and at all cores, quiet and with
//! one busy neighbour process in a session of its own and in the daemon's,
//! beside the streaming ceiling of `bench_neighbour.rs`; time to first
//! token after a cold load with the page cache warm; 8 batched clients
//! against 1 (modeld only). Each figure is the best of `--rounds`. modeld's
//! speed is what a client sees of its token events; llama.cpp's is timed in
//! the helper around its `llama_decode` calls (`bench_llama.py`).
//!
//! Where llama.cpp's default buffer types fault on a quantized file (a
//! virtual machine that advertises AMX but traps its instructions, or a
//! llama.cpp built for instructions this CPU lacks), the helper runs with
//! `use_extra_bufts` off and the bench says so, with the helper's exit
//! status. Only the first is helped by that: a build for instructions the
//! CPU lacks dies again in its first decode (SIGILL), and needs a build
//! for this CPU (BENCHMARKS gives one).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value as Meta;
use modeld_e2e::gguf::{write_gguf_with, GgufType};
use modeld_e2e::synthetic::{make_never_ending, write_llama, Shape, Vocab};
use modeld_e2e::Daemon;
use serde_json::{json, Value};

use crate::bench_neighbour::{Ceiling, Neighbour, Session};

const SCRIPT: &str = include_str!("bench_llama.py");
const VOCAB: usize = 49152;
/// Ids below this are `<unk>`, `<s>`, `</s>` and the 256 byte tokens.
const FIRST_WORD: usize = 3 + 256;
const PROMPT_TOKENS: usize = 35;
const CONTEXT: usize = 4096;
const BATCH_CLIENTS: usize = 8;
/// How long llama.cpp decodes beside the neighbour, at most (after the
/// step that passes it).
const LLAMA_BESIDE_SECONDS: f64 = 10.0;

/// What the command line asks for.
pub struct Options {
    pub shapes: Vec<&'static ShapeSpec>,
    pub tokens: usize,
    pub rounds: usize,
    pub python: String,
    /// Which of `decode`, `ttft` and `batch` to run.
    pub sections: Vec<String>,
}

impl Options {
    /// `--shapes 135m|1.1b|both`, `--tokens N`, `--rounds N` and
    /// `--sections decode,ttft,batch` (all three unless given).
    pub fn parse(args: &[String], python: String) -> Self {
        const FLAGS: [&str; 5] = ["--shapes", "--tokens", "--rounds", "--sections", "--python"];
        // A misspelt flag would otherwise run a quarter hour with defaults.
        if let Some(unknown) = args
            .iter()
            .find(|a| a.starts_with('-') && !FLAGS.contains(&a.as_str()))
        {
            eprintln!("bench cpu: unknown flag {unknown}; the flags are {FLAGS:?}");
            std::process::exit(2);
        }
        let value = |name: &str| {
            let index = args.iter().position(|a| a == name)?;
            args.get(index + 1).cloned()
        };
        let shapes = match value("--shapes").as_deref() {
            None | Some("both") => SHAPES.iter().collect(),
            Some(key) => {
                let found = SHAPES.iter().find(|s| s.key == key);
                vec![found.unwrap_or_else(|| panic!("--shapes: 135m, 1.1b or both, not {key}"))]
            }
        };
        let number =
            |name: &str, default| value(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Options {
            shapes,
            tokens: number("--tokens", 128),
            rounds: number("--rounds", 3).max(1),
            python,
            sections: sections(value("--sections")),
        }
    }
}

fn sections(given: Option<String>) -> Vec<String> {
    let all = ["decode", "ttft", "batch"];
    let Some(given) = given else {
        return all.map(String::from).to_vec();
    };
    let sections: Vec<String> = given.split(',').map(|s| s.trim().to_string()).collect();
    if let Some(bad) = sections.iter().find(|s| !all.contains(&s.as_str())) {
        panic!("--sections: a list of decode, ttft and batch, not {bad}");
    }
    sections
}

/// A named model shape.
pub struct ShapeSpec {
    key: &'static str,
    label: &'static str,
    shape: Shape,
    tied: bool,
}

static SHAPES: [ShapeSpec; 2] = [
    ShapeSpec {
        key: "135m",
        label: "135M",
        shape: Shape {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
        },
        tied: true,
    },
    ShapeSpec {
        key: "1.1b",
        label: "1.1B",
        shape: Shape {
            hidden: 2048,
            intermediate: 5632,
            layers: 22,
            heads: 32,
            kv_heads: 4,
        },
        tied: false,
    },
];

pub fn run(options: Options) {
    let work = tempfile::Builder::new()
        .prefix("bench-cpu")
        .tempdir()
        .expect("temp dir");
    let script = work.path().join("bench_llama.py");
    std::fs::write(&script, SCRIPT).expect("script");
    let llama_ok = llama_available(&options.python);
    let threads = thread_counts();
    println!(
        "CPU decode, modeld vs llama.cpp: greedy, a {PROMPT_TOKENS}-token prompt, {} tokens timed after the first, best of {} interleaved rounds; threads {threads:?}\n",
        options.tokens, options.rounds
    );
    for &spec in &options.shapes {
        // Each shape's tables come when it is done, so a later failure
        // (disk, memory) loses nothing measured before it.
        let mut report = Report::default();
        let files = ModelFiles::build(spec, work.path(), &options.python, &script, llama_ok);
        let llama = llama_ok.then(|| LlamaSide::probe(&options.python, &script, &files));
        let bench = Bench::start(&files, &threads, &options, llama.as_ref());
        let wanted = |name: &str| options.sections.iter().any(|s| s == name);
        if wanted("decode") {
            bench.decode_section(&mut report);
        }
        if wanted("ttft") {
            bench.ttft_section(&mut report);
        }
        if spec.key == "135m" && wanted("batch") {
            bench.batch_section(&mut report);
        }
        // The next shape's files need the disk space more than these do.
        drop(bench);
        std::fs::remove_dir_all(work.path().join(spec.key)).expect("remove the model files");
        report.print(&threads);
        println!();
    }
}

/// Whether `python` can import llama_cpp; prints why not when it cannot.
fn llama_available(python: &str) -> bool {
    let probe = Command::new(python)
        .args([
            "-c",
            "import llama_cpp, numpy; print(llama_cpp.__version__)",
        ])
        .output();
    match probe {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout);
            println!(
                "llama.cpp: llama-cpp-python {} from {python}",
                version.trim()
            );
            true
        }
        Ok(out) => {
            let error = String::from_utf8_lossy(&out.stderr);
            let last = error.lines().last().unwrap_or("").to_string();
            println!("note: `import llama_cpp` fails in {python} ({last}): modeld runs alone, Q4_K_M is skipped");
            false
        }
        Err(err) => {
            println!("note: cannot run {python} ({err}): modeld runs alone, Q4_K_M is skipped");
            false
        }
    }
}

/// One thread, and every core when there is more than one.
fn thread_counts() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all > 1 {
        vec![1, all]
    } else {
        vec![1]
    }
}

/// The 1-minute load average, as /proc/loadavg gives it.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().unwrap_or("?").to_string()
}

// ---------------------------------------------------------------------------
// The vocabulary and the prompt.

/// The text of token `id`: SentencePiece's specials and byte tokens first,
/// then one plain word per id.
fn token(id: usize) -> String {
    match id {
        0 => "<unk>".into(),
        1 => "<s>".into(),
        2 => "</s>".into(),
        3..FIRST_WORD => format!("<0x{:02X}>", id - 3),
        _ => format!("t{id}"),
    }
}

/// llama.cpp's token types: unknown 2, control 3, byte 6, normal 1.
fn token_type(id: usize) -> i32 {
    match id {
        0 => 2,
        1 | 2 => 3,
        3..FIRST_WORD => 6,
        _ => 1,
    }
}

/// The tokenizer metadata llama.cpp needs to load the file.
fn vocab_metadata() -> Vec<(String, Meta)> {
    let all = |f: &dyn Fn(usize) -> Meta| Meta::Array((0..VOCAB).map(f).collect());
    vec![
        ("tokenizer.ggml.model".into(), Meta::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            all(&|id| Meta::String(token(id))),
        ),
        (
            "tokenizer.ggml.scores".into(),
            all(&|id| Meta::F32(-(id as f32))),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            all(&|id| Meta::I32(token_type(id))),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Meta::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Meta::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(false)),
    ]
}

/// modeld's tokenizer: a word-level vocabulary split on whitespace, with no
/// BOS added, so `prompt_text(ids)` encodes to exactly `ids`.
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, Value> =
        (0..VOCAB).map(|id| (token(id), json!(id))).collect();
    let special = |id: usize| {
        json!({"id": id, "content": token(id), "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0), special(1), special(2)],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer");
}

/// Fixed, spread-out word ids; `salt` gives each batched client its own.
fn prompt_ids(salt: usize) -> Vec<u32> {
    let words = VOCAB - FIRST_WORD;
    (0..PROMPT_TOKENS)
        .map(|i| (FIRST_WORD + (i * 7919 + salt * 104_729 + 13) % words) as u32)
        .collect()
}

fn prompt_text(ids: &[u32]) -> String {
    let words: Vec<String> = ids.iter().map(|&id| token(id as usize)).collect();
    words.join(" ")
}

// ---------------------------------------------------------------------------
// The model files.

/// One way to run a shape: modeld's model (a folder or a GGUF file) and the
/// GGUF file llama.cpp runs beside it.
struct Format {
    label: &'static str,
    /// The name registered in modeld.
    model: String,
    modeld_path: PathBuf,
    llama_path: PathBuf,
}

/// A shape written to disk in every format.
struct ModelFiles {
    spec: &'static ShapeSpec,
    formats: Vec<Format>,
}

impl ModelFiles {
    fn build(
        spec: &'static ShapeSpec,
        work: &Path,
        python: &str,
        script: &Path,
        llama_ok: bool,
    ) -> Self {
        let started = Instant::now();
        let dir = work.join(spec.key);
        let vocab = Vocab {
            size: VOCAB,
            tied: spec.tied,
        };
        let bytes = write_llama(&dir, spec.shape, vocab);
        write_tokenizer(&dir);
        make_never_ending(&dir, CONTEXT);
        let f32_gguf = gguf(&dir, "model-f32.gguf", GgufType::F32);
        let q8 = gguf(&dir, "model-q8_0.gguf", GgufType::Q8_0);
        let format = |label, tag: &str, modeld: &Path, llama: &Path| Format {
            label,
            model: format!("{}-{tag}", spec.key),
            modeld_path: modeld.to_path_buf(),
            llama_path: llama.to_path_buf(),
        };
        let mut formats = vec![
            format("f32 (safetensors)", "f32-st", &dir, &f32_gguf),
            format("f32 (GGUF)", "f32-gguf", &f32_gguf, &f32_gguf),
            format("Q8_0", "q8_0", &q8, &q8),
        ];
        if llama_ok {
            if let Some(q4) = quantize_q4_k_m(python, script, &f32_gguf) {
                formats.push(format("Q4_K_M", "q4_k_m", &q4, &q4));
            }
        }
        println!(
            "{}-shaped llama: {:.1}M parameters, {:.0} MiB f32, files written in {:.0} s",
            spec.label,
            bytes as f64 / 4e6,
            bytes as f64 / (1u64 << 20) as f64,
            started.elapsed().as_secs_f64()
        );
        ModelFiles { spec, formats }
    }
}

fn gguf(dir: &Path, name: &str, kind: GgufType) -> PathBuf {
    let path = dir.join(name);
    write_gguf_with(dir, &path, kind, vocab_metadata()).expect("write gguf");
    path
}

/// llama.cpp's Q4_K_M of `f32`, or None (with the reason printed).
fn quantize_q4_k_m(python: &str, script: &Path, f32: &Path) -> Option<PathBuf> {
    let out = f32.with_file_name("model-q4_k_m.gguf");
    let result = Command::new(python)
        .arg(script)
        .arg("quantize")
        .arg(f32)
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match result {
        Ok(output) if output.status.success() => Some(out),
        Ok(output) => {
            let error = String::from_utf8_lossy(&output.stderr);
            let last = error.lines().last().unwrap_or("").to_string();
            println!("note: llama.cpp's Q4_K_M quantizer failed ({last}): Q4_K_M skipped");
            None
        }
        Err(err) => {
            println!("note: cannot run the quantizer ({err}): Q4_K_M skipped");
            None
        }
    }
}

/// Reads `path` (a file, or a folder's files) so the page cache holds it.
fn warm_page_cache(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        let entries = std::fs::read_dir(path).expect("model dir").flatten();
        entries
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    for file in files {
        let mut reader = std::fs::File::open(&file).expect("open weights");
        std::io::copy(&mut reader, &mut std::io::sink()).expect("read weights");
    }
}

// ---------------------------------------------------------------------------
// The engines.

/// How the llama.cpp helper runs: its script and flags.
struct LlamaSide {
    script: PathBuf,
    flags: Vec<&'static str>,
}

impl LlamaSide {
    /// llama.cpp's defaults, unless they fault on a quantized file: some
    /// virtual machines advertise AMX, which llama.cpp's extra buffer type
    /// then uses, and trap its instructions. Then the extra buffer types
    /// (AMX, and weight repacking with them) are turned off, with a note.
    fn probe(python: &str, script: &Path, files: &ModelFiles) -> Self {
        let mut quantized = files.formats.iter().filter(|f| !f.label.starts_with("f32"));
        let faulty = quantized.find_map(|f| {
            let status = Command::new(python)
                .arg(script)
                .arg("probe")
                .arg(&f.llama_path)
                .stderr(Stdio::null())
                .status();
            match status {
                Ok(status) if status.success() => None,
                Ok(status) => Some((f, status.to_string())),
                Err(e) => Some((f, e.to_string())),
            }
        });
        let flags = match faulty {
            Some((format, status)) => {
                println!("note: llama.cpp with its default buffer types fails on {} here ({status}: AMX advertised but trapped, or a build for instructions this CPU lacks?): it runs with use_extra_bufts off (no AMX, no weight repacking)", format.label);
                vec!["--no-extra-bufts"]
            }
            None => Vec::new(),
        };
        LlamaSide {
            script: script.to_path_buf(),
            flags,
        }
    }
}

/// The llama.cpp side: `bench_llama.py serve`, one JSON line each way.
struct LlamaCpp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LlamaCpp {
    fn start(python: &str, side: &LlamaSide) -> Self {
        let mut child = Command::new(python)
            .arg(&side.script)
            .arg("serve")
            .args(&side.flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the llama.cpp helper");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        LlamaCpp {
            child,
            stdin,
            stdout,
        }
    }

    fn request(&mut self, request: Value) -> Value {
        writeln!(self.stdin, "{request}").expect("write to the helper");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the helper");
        if line.is_empty() {
            let status = self.child.wait().expect("wait for the helper");
            panic!("the llama.cpp helper exited ({status}) on {request}");
        }
        let reply: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("helper: {line:?}"));
        assert!(
            reply["error"].is_null(),
            "llama.cpp failed: {}",
            reply["error"]
        );
        reply
    }

    fn load(&mut self, path: &Path, threads: usize, n_ctx: usize) {
        self.request(json!({"op": "load", "path": path, "threads": threads, "n_ctx": n_ctx}));
    }

    /// `steps` greedy steps, or fewer when they pass `seconds`.
    fn decode(&mut self, steps: usize, seconds: Option<f64>) -> Decode {
        let reply = self.request(json!({"op": "decode", "prompt": prompt_ids(0),
            "tokens": steps, "seconds": seconds}));
        let tokens: Vec<u32> = serde_json::from_value(reply["tokens"].clone()).expect("tokens");
        Decode {
            tok_s: (tokens.len() - 1) as f64 / reply["decode_s"].as_f64().expect("decode_s"),
            tokens,
        }
    }

    fn ttft(&mut self, path: &Path, threads: usize) -> FirstToken {
        let reply = self.request(json!({"op": "ttft", "path": path, "threads": threads,
            "n_ctx": 256, "prompt": prompt_ids(0)}));
        let get = |key: &str| reply[key].as_f64().expect("seconds");
        FirstToken {
            load_s: get("load_s"),
            first_s: get("first_s"),
        }
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One decode run's speed and greedy tokens.
struct Decode {
    tok_s: f64,
    tokens: Vec<u32>,
}

/// A cold load's parts: loading, then the prompt's first token.
#[derive(Clone, Copy)]
struct FirstToken {
    load_s: f64,
    first_s: f64,
}

impl FirstToken {
    fn total(&self) -> f64 {
        self.load_s + self.first_s
    }
}

/// A connection that waits as long as a big model's load takes.
fn client(daemon: &Daemon) -> modeld_wire::Client {
    let client = daemon.client();
    client
        .set_read_timeout(Some(Duration::from_secs(1800)))
        .expect("timeout");
    client
}

/// Greedy `steps + 1` tokens of `prompt` on modeld; the speed counts the
/// `steps` after the first, as the client sees them arrive.
fn modeld_decode(daemon: &Daemon, model: &str, prompt: &[u32], steps: usize) -> Decode {
    let mut client = client(daemon);
    let params = json!({"model": model, "prompt": prompt_text(prompt),
        "max_tokens": steps + 1, "temperature": 0});
    let (mut first, mut last, mut done) = (None, None, Value::Null);
    for event in client.subscribe("generate", params).expect("generate") {
        let event = event.expect("event");
        if event["event"] == "token" {
            first.get_or_insert_with(Instant::now);
            last = Some(Instant::now());
        }
        if event["done"] == true {
            done = event;
        }
    }
    assert_eq!(
        done["prompt_tokens"],
        json!(prompt.len()),
        "prompt tokenized otherwise: {done}"
    );
    assert_eq!(
        done["completion_tokens"],
        json!(steps + 1),
        "stopped early: {done}"
    );
    let elapsed = (last.expect("a token") - first.expect("a token")).as_secs_f64();
    Decode {
        tok_s: steps as f64 / elapsed,
        tokens: serde_json::from_value(done["token_ids"].clone()).expect("token_ids"),
    }
}

/// modeld's cold start: `load`, then a 1-token generate to its token.
fn modeld_first_token(daemon: &Daemon, model: &str) -> FirstToken {
    let mut client = client(daemon);
    let start = Instant::now();
    client
        .call_value("load", json!({"name": model}))
        .expect("load");
    let loaded = Instant::now();
    let params = json!({"model": model, "prompt": prompt_text(&prompt_ids(0)), "max_tokens": 1, "temperature": 0});
    let mut first = None;
    for event in client.subscribe("generate", params).expect("generate") {
        if event.expect("event")["event"] == "token" {
            first.get_or_insert_with(Instant::now);
        }
    }
    let first = first.expect("a token");
    drop(client);
    unload(daemon, model);
    FirstToken {
        load_s: (loaded - start).as_secs_f64(),
        first_s: (first - loaded).as_secs_f64(),
    }
}

fn load(daemon: &Daemon, model: &str) {
    client(daemon)
        .call_value("load", json!({"name": model}))
        .expect("load");
}

fn unload(daemon: &Daemon, model: &str) {
    client(daemon)
        .call_value("unload", json!({"name": model}))
        .expect("unload");
}

/// Completion tokens per second of `clients` generating at once.
fn aggregate(daemon: &Daemon, model: &str, clients: usize, steps: usize) -> f64 {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let mut client = client(daemon);
            let barrier = barrier.clone();
            let params = json!({"model": model, "prompt": prompt_text(&prompt_ids(i)),
                "max_tokens": steps, "temperature": 0});
            std::thread::spawn(move || {
                barrier.wait();
                let events = client.subscribe("generate", params).expect("generate");
                let done = events
                    .map(|e| e.expect("event"))
                    .find(|e| e["done"] == true);
                done.and_then(|d| d["completion_tokens"].as_f64())
                    .unwrap_or(0.0)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let total: f64 = threads.into_iter().map(|t| t.join().expect("client")).sum();
    total / started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------
// The sections.

/// A shape's files, one daemon per thread count, and the llama.cpp helper.
struct Bench<'a> {
    files: &'a ModelFiles,
    daemons: Vec<(usize, Daemon)>,
    llama: Option<std::cell::RefCell<LlamaCpp>>,
    options: &'a Options,
}

impl<'a> Bench<'a> {
    fn start(
        files: &'a ModelFiles,
        threads: &[usize],
        options: &'a Options,
        llama: Option<&LlamaSide>,
    ) -> Self {
        let daemons = threads.iter().map(|&n| (n, daemon(files, n))).collect();
        let llama = llama.map(|l| std::cell::RefCell::new(LlamaCpp::start(&options.python, l)));
        Bench {
            files,
            daemons,
            llama,
            options,
        }
    }

    fn n_ctx(&self) -> usize {
        (PROMPT_TOKENS + self.options.tokens + 16).max(256)
    }

    /// Formats grouped by the GGUF file llama.cpp runs for them.
    fn groups(&self) -> Vec<Vec<&Format>> {
        let mut groups: Vec<Vec<&Format>> = Vec::new();
        for format in &self.files.formats {
            match groups
                .iter_mut()
                .find(|g| g[0].llama_path == format.llama_path)
            {
                Some(group) => group.push(format),
                None => groups.push(vec![format]),
            }
        }
        groups
    }

    fn decode_section(&self, report: &mut Report) {
        let all = self.daemons.last().map_or(1, |(n, _)| *n);
        let ceilings: Vec<Ceiling> = self
            .groups()
            .iter()
            .map(|group| {
                let bytes = std::fs::metadata(&group[0].llama_path).expect("weights");
                Ceiling::measure(bytes.len() as usize, all)
            })
            .collect();
        for (threads, daemon) in &self.daemons {
            for (group, ceiling) in self.groups().iter().zip(&ceilings) {
                println!(
                    "decode: {} {} at {threads} thread(s); load average {}",
                    self.files.spec.label,
                    group[0].label,
                    load_average()
                );
                let rows = self.decode_group(daemon, *threads, group);
                report.decode.extend(rows.into_iter().map(|mut row| {
                    row.ceiling = (*threads == all).then_some(*ceiling);
                    row
                }));
            }
        }
    }

    /// Quiet rounds, then rounds beside a busy neighbour in each session, of
    /// every format in `group` and llama.cpp, alternating.
    fn decode_group(&self, daemon: &Daemon, threads: usize, group: &[&Format]) -> Vec<DecodeRow> {
        for format in group {
            load(daemon, &format.model);
        }
        if let Some(llama) = &self.llama {
            llama
                .borrow_mut()
                .load(&group[0].llama_path, threads, self.n_ctx());
        }
        let quiet = self.rounds(daemon, group, None);
        // llama.cpp's threads spin at a barrier after every operation, so
        // beside the neighbour it can run at a hundredth of its speed, and a
        // full run would take many minutes.
        let beside = Session::BOTH.map(|session| {
            let _neighbour = Neighbour::start(session);
            self.rounds(daemon, group, Some(LLAMA_BESIDE_SECONDS))
        });
        for format in group {
            unload(daemon, &format.model);
        }
        group
            .iter()
            .enumerate()
            .map(|(i, format)| DecodeRow {
                shape: self.files.spec.label,
                format: format.label,
                threads,
                quiet: quiet.speeds(i),
                beside: beside.each_ref().map(|rounds| rounds.speeds(i)),
                ceiling: None,
                same: same_tokens(&quiet.tokens[i], quiet.reference(i)),
            })
            .collect()
    }

    /// The best of the rounds for each engine, in turn within each round;
    /// llama.cpp stops early after `llama_seconds`, when given.
    fn rounds(&self, daemon: &Daemon, group: &[&Format], llama_seconds: Option<f64>) -> Rounds {
        let steps = self.options.tokens;
        let mut best = Rounds::new(group.len());
        for _ in 0..self.options.rounds {
            for (i, format) in group.iter().enumerate() {
                let run = modeld_decode(daemon, &format.model, &prompt_ids(0), steps);
                best.modeld[i] = best.modeld[i].max(run.tok_s);
                best.tokens[i] = run.tokens;
            }
            if let Some(llama) = &self.llama {
                let run = llama.borrow_mut().decode(steps, llama_seconds);
                best.llama = Some(best.llama.unwrap_or(0.0).max(run.tok_s));
                best.llama_tokens = Some(run.tokens);
            }
        }
        best
    }

    /// Cold loads at all cores, the files read beforehand.
    fn ttft_section(&self, report: &mut Report) {
        let (threads, daemon) = self.daemons.last().expect("a daemon");
        println!(
            "first token: {} at {threads} thread(s); load average {}",
            self.files.spec.label,
            load_average()
        );
        for format in &self.files.formats {
            warm_page_cache(&format.modeld_path);
            warm_page_cache(&format.llama_path);
        }
        for group in self.groups() {
            let (ours, theirs) = self.first_token_rounds(daemon, *threads, &group);
            for (format, ours) in group.iter().zip(ours) {
                report.ttft.push(TtftRow {
                    shape: self.files.spec.label,
                    format: format.label,
                    modeld: ours,
                    llama: theirs,
                });
            }
        }
    }

    fn first_token_rounds(
        &self,
        daemon: &Daemon,
        threads: usize,
        group: &[&Format],
    ) -> (Vec<FirstToken>, Option<FirstToken>) {
        let mut ours: Vec<Option<FirstToken>> = vec![None; group.len()];
        let mut theirs: Option<FirstToken> = None;
        let better = |old: Option<FirstToken>, new: FirstToken| match old {
            Some(old) if old.total() <= new.total() => Some(old),
            _ => Some(new),
        };
        for _ in 0..self.options.rounds {
            for (i, format) in group.iter().enumerate() {
                ours[i] = better(ours[i], modeld_first_token(daemon, &format.model));
            }
            if let Some(llama) = &self.llama {
                let run = llama.borrow_mut().ttft(&group[0].llama_path, threads);
                theirs = better(theirs, run);
            }
        }
        (
            ours.into_iter().map(|t| t.expect("a round")).collect(),
            theirs,
        )
    }

    /// 1 client against 8 on modeld at all cores, f32 and Q8_0.
    fn batch_section(&self, report: &mut Report) {
        let (_, daemon) = self.daemons.last().expect("a daemon");
        println!(
            "batching: {}; load average {}",
            self.files.spec.label,
            load_average()
        );
        let chosen = self
            .files
            .formats
            .iter()
            .filter(|f| f.label == "f32 (safetensors)" || f.label == "Q8_0");
        for format in chosen {
            load(daemon, &format.model);
            let (mut one, mut many) = (0f64, 0f64);
            for _ in 0..self.options.rounds {
                one = one.max(aggregate(daemon, &format.model, 1, self.options.tokens));
                many = many.max(aggregate(
                    daemon,
                    &format.model,
                    BATCH_CLIENTS,
                    self.options.tokens,
                ));
            }
            unload(daemon, &format.model);
            report
                .batch
                .push((self.files.spec.label, format.label, one, many));
        }
    }
}

/// A daemon at `threads` rayon threads with every format registered.
fn daemon(files: &ModelFiles, threads: usize) -> Daemon {
    let count = threads.to_string();
    let daemon = Daemon::start_configured("", &[("RAYON_NUM_THREADS", &count)]);
    for format in &files.formats {
        let params = json!({"name": format.model, "local_path": format.modeld_path});
        daemon.call("models.register", params).expect("register");
    }
    daemon
}

/// The best speeds of a set of rounds, and the last tokens of each engine.
struct Rounds {
    modeld: Vec<f64>,
    tokens: Vec<Vec<u32>>,
    llama: Option<f64>,
    llama_tokens: Option<Vec<u32>>,
}

impl Rounds {
    /// What format `i`'s tokens are compared with: llama.cpp's, or without
    /// it the group's first format's (f32 GGUF against safetensors).
    fn reference(&self, i: usize) -> Option<&[u32]> {
        match &self.llama_tokens {
            Some(tokens) => Some(tokens),
            None if i > 0 => Some(&self.tokens[0]),
            None => None,
        }
    }

    fn speeds(&self, i: usize) -> Speeds {
        Speeds {
            modeld: self.modeld[i],
            llama: self.llama,
        }
    }

    fn new(formats: usize) -> Self {
        Rounds {
            modeld: vec![0.0; formats],
            tokens: vec![Vec::new(); formats],
            llama: None,
            llama_tokens: None,
        }
    }
}

/// "yes", or where the two greedy sequences part, or "-" with nothing to
/// compare.
fn same_tokens(ours: &[u32], theirs: Option<&[u32]>) -> String {
    let Some(theirs) = theirs else {
        return "-".into();
    };
    match ours.iter().zip(theirs).position(|(a, b)| a != b) {
        None if ours.len() == theirs.len() => "yes".into(),
        None => format!("lengths {} and {}", ours.len(), theirs.len()),
        Some(index) => format!("no, from token {index}"),
    }
}

// ---------------------------------------------------------------------------
// The tables.

/// Both engines' decode tokens/s in one setting.
#[derive(Clone, Copy)]
struct Speeds {
    modeld: f64,
    llama: Option<f64>,
}

impl Speeds {
    /// Each engine's speed over its speed in `base`.
    fn over(self, base: Speeds) -> Speeds {
        Speeds {
            modeld: self.modeld / base.modeld,
            llama: self.llama.zip(base.llama).map(|(s, b)| s / b),
        }
    }
}

struct DecodeRow {
    shape: &'static str,
    format: &'static str,
    threads: usize,
    quiet: Speeds,
    /// Beside the neighbour, in `Session::BOTH`'s order.
    beside: [Speeds; 2],
    /// At all cores: the streaming ceiling beside the neighbour.
    ceiling: Option<Ceiling>,
    same: String,
}

impl DecodeRow {
    fn beside(&self, session: Session) -> Speeds {
        let index = Session::BOTH.iter().position(|s| *s == session);
        self.beside[index.expect("a session")]
    }
}

struct TtftRow {
    shape: &'static str,
    format: &'static str,
    modeld: FirstToken,
    llama: Option<FirstToken>,
}

#[derive(Default)]
struct Report {
    decode: Vec<DecodeRow>,
    ttft: Vec<TtftRow>,
    /// Shape, format, 1 client's and 8 clients' aggregate tok/s.
    batch: Vec<(&'static str, &'static str, f64, f64)>,
}

fn or_dash(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    or_dash(theirs.map(|t| ours / t), 2)
}

impl Report {
    fn print(&self, threads: &[usize]) {
        self.print_decode();
        self.print_scaling(threads);
        self.print_neighbour();
        self.print_ttft();
        self.print_batch();
    }

    fn print_decode(&self) {
        println!("\nDecode tokens/s (ratio: modeld / llama.cpp; same: the greedy tokens of both engines, or without llama.cpp of f32 GGUF and safetensors)\n");
        println!(
            "| shape | format | threads | modeld tok/s | llama.cpp tok/s | ratio | same tokens |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &self.decode {
            println!(
                "| {} | {} | {} | {:.1} | {} | {} | {} |",
                r.shape,
                r.format,
                r.threads,
                r.quiet.modeld,
                or_dash(r.quiet.llama, 1),
                ratio(r.quiet.modeld, r.quiet.llama),
                r.same
            );
        }
    }

    fn print_scaling(&self, threads: &[usize]) {
        let Some(&all) = threads.last().filter(|&&n| n > 1) else {
            return;
        };
        println!("\nAll cores ({all}) / one core, decode tokens/s\n");
        println!("| shape | format | modeld | llama.cpp |");
        println!("|---|---|---|---|");
        for one in self.decode.iter().filter(|r| r.threads == 1) {
            let Some(many) = self.same_at(one, all) else {
                continue;
            };
            let scaling = many.quiet.over(one.quiet);
            println!(
                "| {} | {} | {:.2} | {} |",
                one.shape,
                one.format,
                scaling.modeld,
                or_dash(scaling.llama, 2)
            );
        }
    }

    fn print_neighbour(&self) {
        println!("\nDecode tokens/s beside one busy neighbour process in a session of its own or in the daemon's (vs quiet: the same engine at the same threads without it)\n");
        println!("| shape | format | threads | neighbour's session | modeld tok/s | llama.cpp tok/s | ratio | modeld vs quiet | llama.cpp vs quiet |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &self.decode {
            for session in Session::BOTH {
                let busy = r.beside(session);
                let kept = busy.over(r.quiet);
                println!(
                    "| {} | {} | {} | {} | {:.1} | {} | {} | {:.2} | {} |",
                    r.shape,
                    r.format,
                    r.threads,
                    session.label(),
                    busy.modeld,
                    or_dash(busy.llama, 1),
                    ratio(busy.modeld, busy.llama),
                    kept.modeld,
                    or_dash(kept.llama, 2)
                );
            }
        }
        self.print_neighbour_goal();
    }

    /// All cores beside the neighbour over one quiet core, against the
    /// ceiling of threads that read the same bytes and never wait.
    fn print_neighbour_goal(&self) {
        println!("\nAll cores beside the neighbour / one core quiet, decode tokens/s (ceiling: threads streaming the GGUF file's bytes, each its own part, never waiting, over one thread quiet)\n");
        println!("| shape | format | neighbour's session | modeld | llama.cpp | ceiling |");
        println!("|---|---|---|---|---|---|");
        for many in &self.decode {
            let Some(ceiling) = &many.ceiling else {
                continue;
            };
            let Some(one) = self.same_at(many, 1) else {
                continue;
            };
            for session in Session::BOTH {
                let goal = many.beside(session).over(one.quiet);
                println!(
                    "| {} | {} | {} | {:.2} | {} | {:.2} |",
                    many.shape,
                    many.format,
                    session.label(),
                    goal.modeld,
                    or_dash(goal.llama, 2),
                    ceiling.get(session)
                );
            }
        }
    }

    /// The decode row of `row`'s shape and format at `threads`.
    fn same_at(&self, row: &DecodeRow, threads: usize) -> Option<&DecodeRow> {
        self.decode
            .iter()
            .find(|r| r.threads == threads && r.shape == row.shape && r.format == row.format)
    }

    fn print_ttft(&self) {
        println!("\nTime to first token after a cold load, all cores, page cache warm; seconds (ratio: modeld / llama.cpp, totals)\n");
        println!("| shape | format | modeld load | modeld first token | modeld total | llama.cpp load | llama.cpp first token | llama.cpp total | ratio |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &self.ttft {
            let theirs = |f: fn(&FirstToken) -> f64| or_dash(r.llama.as_ref().map(f), 3);
            println!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |",
                r.shape,
                r.format,
                r.modeld.load_s,
                r.modeld.first_s,
                r.modeld.total(),
                theirs(|t| t.load_s),
                theirs(|t| t.first_s),
                theirs(FirstToken::total),
                ratio(r.modeld.total(), r.llama.as_ref().map(FirstToken::total))
            );
        }
    }

    fn print_batch(&self) {
        if self.batch.is_empty() {
            return;
        }
        println!("\nmodeld, {BATCH_CLIENTS} batched clients vs 1, all cores, aggregate completion tokens/s\n");
        println!("| shape | format | 1 client | {BATCH_CLIENTS} clients | {BATCH_CLIENTS} / 1 |");
        println!("|---|---|---|---|---|");
        for (shape, format, one, many) in &self.batch {
            println!(
                "| {shape} | {format} | {one:.1} | {many:.1} | {:.2} |",
                many / one
            );
        }
    }
}
