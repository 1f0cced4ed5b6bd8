//! `bench runners`: the cost of running a diffusers pipeline through
//! modeld's bundled diffusers runner (`runners/diffusers_runner.py`, a child
//! process speaking JSON lines) against calling diffusers directly in one
//! Python process, on the CPU, in the same run: the tiny Qwen-Image fixture
//! (`tests/fixtures/tiny-qwen-image/t2i`, which has no native family) and
//! the random SD1.5-shaped pipeline of `bench images` (forced onto the
//! runner with `"runner": "diffusers"`, and also run on modeld's native
//! path). Then a runner restart after a `kill -9`, while idle and in the
//! middle of a generation.
//!
//! - first load: modeld's `load` call as the client times it (spawning the
//!   interpreter, the runner's hello, importing torch and diffusers,
//!   `from_pretrained`, ready) against the direct script's spawn until it
//!   has its pipeline (interpreter start, the same imports, the same
//!   `from_pretrained`);
//! - first and warm generate: the client's wall time of a `generate` call
//!   (queue, validation, the runner's conversation, base64 PNG over the
//!   pipe, writing the file) against the direct call plus encoding and
//!   saving the same PNG;
//! - per step: (last denoise mark − first) / (steps − 1) of each warm call,
//!   from the progress events' `elapsed_ms` on the modeld side and from
//!   `callback_on_step_end` timestamps on the direct side.
//!
//! Each modeld path is compared in phases: a fresh direct process and a
//! fresh modeld load side by side (which loads first alternates), a first
//! call on each, then warm calls alternating between the two, so that both
//! meet the machine's load alike; medians over the warm calls. Everything
//! is pinned to one CPU unless `--all-cpus` (see `pin_to_one_cpu`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modeld_e2e::Daemon;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::median;

/// The direct side: the pipeline loaded and called in-process the way the
/// runner does it (`DiffusionPipeline.from_pretrained` in float32, the
/// guidance as `true_cfg_scale` where the pipeline takes it, a CPU
/// generator seeded with the seed, `output_type="np"`, the same uint8
/// conversion), the picture saved as a PNG. Prints a `loaded` line, then a
/// `round` line per `go` line on stdin, with the step marks in ms from the
/// call's start; exits when stdin closes.
const DIRECT_SCRIPT: &str = r#"
import json, os, sys, time

os.environ["HF_HUB_OFFLINE"] = "1"


def main():
    model, out, size, steps, guidance, seed, prompt, negative = sys.argv[1:9]
    width, height = (int(x) for x in size.split("x"))
    steps, guidance, seed = int(steps), float(guidance), int(seed)
    started = time.perf_counter()
    import inspect

    import numpy as np
    import torch
    import diffusers
    from PIL import Image

    imported = time.perf_counter()
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    print(json.dumps({"type": "loaded", "import_s": imported - started,
                      "from_pretrained_s": loaded - imported}), flush=True)
    sig = inspect.signature(pipe.__call__).parameters
    guidance_arg = "true_cfg_scale" if "true_cfg_scale" in sig else "guidance_scale"
    r = 0
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        marks = []

        def on_step(p, i, t, kwargs):
            marks.append(time.perf_counter())
            return kwargs

        begun = time.perf_counter()
        result = pipe(prompt=prompt, negative_prompt=negative, width=width, height=height,
                      num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np", callback_on_step_end=on_step, **{guidance_arg: guidance})
        u8 = np.clip((result.images[0] * 255).round(), 0, 255).astype(np.uint8)
        Image.fromarray(u8).save(os.path.join(out, "direct-%d.png" % r))
        ended = time.perf_counter()
        r += 1
        print(json.dumps({"type": "round", "marks_ms": [(m - begun) * 1000 for m in marks],
                          "generate_s": ended - begun}), flush=True)


main()
"#;

const PROMPT: &str = "a lighthouse made of model caches";
const NEGATIVE: &str = "blurry, low quality";

/// One pipeline and how it is run.
struct Case {
    label: &'static str,
    dir: PathBuf,
    /// The registered names it is compared on: through the runner first,
    /// then natively where it has a native family.
    paths: Vec<(&'static str, &'static str)>,
    size: &'static str,
    steps: usize,
    guidance: f64,
    seed: u64,
    /// Phases per modeld path (a fresh direct process and a fresh load
    /// each), alternating which of the two loads first.
    processes: usize,
    /// Warm calls per phase, after the first, alternating which goes first.
    warm: usize,
}

/// One path's figures over its phases.
#[derive(Default)]
struct Figures {
    load_s: Vec<f64>,
    first_s: Vec<f64>,
    warm_s: Vec<f64>,
    step_s: Vec<f64>,
    /// modeld only: per step from the client's receipt of the progress
    /// events (microseconds), a check on the millisecond `elapsed_ms`.
    client_step_s: Vec<f64>,
}

/// One call: its wall time and its steps' mean from the marks.
struct Call {
    wall_s: f64,
    step_s: f64,
    client_step_s: f64,
}

/// The CPU every process of the bench is pinned to, unless `--all-cpus`.
const PINNED_CPU: usize = 1;

pub fn run(python: &str, images_script: &Path, tiny_sd: &Path, all_cpus: bool) {
    // modeld is built (when stale) before the pinning, on every CPU.
    modeld_e2e::bin_dir();
    if !all_cpus {
        pin_to_one_cpu();
    }
    let work = tempfile::tempdir().expect("temp dir");
    let script = work.path().join("bench_runners_direct.py");
    std::fs::write(&script, DIRECT_SCRIPT).expect("script");
    let pictures = work.path().join("direct");
    std::fs::create_dir_all(&pictures).expect("pictures dir");
    // The interpreter, torch and diffusers in the page cache before anything
    // is timed.
    let warmed = Command::new(python)
        .args(["-c", "import torch, diffusers, transformers"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        warmed,
        "{python} cannot import torch, diffusers, transformers"
    );
    let sd15 = work.path().join("sd15-random");
    super::make_sd15(python, images_script, &sd15, tiny_sd);

    let config = format!("[runners]\npython = \"{python}\"\n");
    let daemon = Daemon::start_configured(&config, &[]);
    let tiny = modeld_e2e::fixtures_dir().join("tiny-qwen-image/t2i");
    register(&daemon, json!({"name": "qwen", "local_path": tiny}));
    register(
        &daemon,
        json!({"name": "sd15-runner", "local_path": sd15, "runner": "diffusers"}),
    );
    register(&daemon, json!({"name": "sd15-native", "local_path": sd15}));

    let cases = [
        Case {
            label: "tiny Qwen-Image (fixture), 48x32, true CFG 4.0",
            dir: tiny,
            paths: vec![("qwen", "modeld runner")],
            size: "48x32",
            steps: 30,
            guidance: 4.0,
            seed: 7,
            processes: 2,
            warm: 5,
        },
        Case {
            label: "SD1.5-shaped, random weights, 256x256, CFG 7.5",
            dir: sd15,
            paths: vec![
                ("sd15-runner", "modeld runner"),
                ("sd15-native", "modeld native"),
            ],
            size: "256x256",
            steps: 4,
            guidance: 7.5,
            seed: 0,
            processes: 1,
            warm: 3,
        },
    ];
    let cpus = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|c| c.trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "{}; CPUs allowed to the bench and its children: {cpus}\n",
        load_line()
    );
    println!("Diffusers pipelines on the CPU, float32, one picture per call: through modeld (its diffusers runner, and natively for SD1.5) against diffusers called directly in one Python process, the two loaded side by side and their calls alternating; medians; per step = (last denoise mark - first) / (steps - 1) of each warm call\n");
    println!("| model | steps | path | phases x warm calls | first load s | first generate s | warm generate s | s/step | load - direct s | warm generate / direct | s/step / direct |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for case in &cases {
        for &(name, path) in &case.paths {
            let (mut direct, mut ours) = (Figures::default(), Figures::default());
            for process in 0..case.processes {
                let direct_first = process % 2 == 0;
                let import = phase(
                    &daemon,
                    (python, &script, &pictures),
                    case,
                    name,
                    direct_first,
                    (&mut direct, &mut ours),
                );
                notes.push(format!(
                    "{} beside {path}: direct load {:.2} s = interpreter start, import torch and diffusers {:.2} s, from_pretrained {:.2} s",
                    case.label,
                    direct.load_s.last().copied().unwrap_or(f64::NAN),
                    import.0,
                    import.1
                ));
            }
            let beside = match case.paths.len() {
                1 => "diffusers, direct".to_string(),
                _ => format!("diffusers, direct (beside {path})"),
            };
            for (label, figures) in [(beside.as_str(), &direct), (path, &ours)] {
                println!(
                    "| {} | {} | {label} | {} x {} | {:.2} | {:.3} | {:.3} | {:.4} | {:+.2} | {:.3}x | {:.3}x |",
                    case.label,
                    case.steps,
                    case.processes,
                    case.warm,
                    median(&figures.load_s),
                    median(&figures.first_s),
                    median(&figures.warm_s),
                    median(&figures.step_s),
                    median(&figures.load_s) - median(&direct.load_s),
                    median(&figures.warm_s) / median(&direct.warm_s),
                    median(&figures.step_s) / median(&direct.step_s),
                );
            }
            notes.push(format!(
                "{} {path}: per step from the client's receipt of the progress events {:.4} s (elapsed_ms gives {:.4} s); warm calls' s/step, in call order: {} {}, {path} {}",
                case.label,
                median(&ours.client_step_s),
                median(&ours.step_s),
                beside,
                listed(&direct.step_s),
                listed(&ours.step_s)
            ));
        }
    }
    println!();
    for note in notes {
        println!("{note}");
    }
    println!("\n{}\n", load_line());
    println!("Runner restart after kill -9 of the runner process (the daemon's child in /proc)\n");
    println!(
        "| model | runner killed | what the next generate did | s | the generate after that s |"
    );
    println!("|---|---|---|---|---|");
    for case in &cases {
        restart(&daemon, case);
    }
    println!("\n{}", load_line());
}

fn listed(values: &[f64]) -> String {
    let values: Vec<String> = values.iter().map(|v| format!("{v:.4}")).collect();
    values.join(" ")
}

/// Pins this process, before it has started any thread, to one
/// CPU: every process it starts inherits that, so torch (both sides) and
/// the daemon's rayon pool each run one thread. On this shared 2-core
/// machine a 2-thread torch step waits at every operation's barrier for
/// a thread that another build has descheduled: the tiny pipeline's step
/// varied between 12 and 700 ms, against 4 to 6 ms on one pinned core.
fn pin_to_one_cpu() {
    let pinned = Command::new("taskset")
        .args(["-p", "-c", &PINNED_CPU.to_string()])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(pinned, "taskset could not pin the bench (use --all-cpus)");
}

fn register(daemon: &Daemon, params: Value) {
    daemon
        .call("models.register", params)
        .expect("models.register");
}

fn load_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!("load average (/proc/loadavg): {}", load.trim())
}

/// A client that waits as long as a CPU call may take.
fn patient_client(daemon: &Daemon) -> modeld_wire::Client {
    let client = daemon.client();
    client
        .set_read_timeout(Some(Duration::from_secs(1800)))
        .expect("timeout");
    client
}

fn params(case: &Case, model: &str) -> Value {
    json!({"model": model, "prompt": PROMPT, "negative_prompt": NEGATIVE,
           "size": case.size, "steps": case.steps, "guidance": case.guidance,
           "seed": case.seed})
}

/// The per-step figure of one call's denoise marks (ms from its start).
fn per_step(marks_ms: &[f64]) -> f64 {
    match marks_ms {
        [first, .., last] => (last - first) / (marks_ms.len() - 1) as f64 / 1000.0,
        _ => f64::NAN,
    }
}

/// A direct diffusers process with its pipeline loaded.
struct Direct {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Direct {
    /// Starts the script and waits for its pipeline: the load's wall time,
    /// and the script's own import and `from_pretrained` seconds.
    fn start(
        python: &str,
        script: &Path,
        pictures: &Path,
        case: &Case,
    ) -> (Direct, f64, (f64, f64)) {
        let spawned = Instant::now();
        let mut child = Command::new(python)
            .arg(script)
            .arg(&case.dir)
            .arg(pictures)
            .args([
                case.size.to_string(),
                case.steps.to_string(),
                case.guidance.to_string(),
                case.seed.to_string(),
                PROMPT.to_string(),
                NEGATIVE.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run python");
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut direct = Direct {
            child,
            stdin,
            lines,
        };
        let loaded = direct.next("loaded");
        let load_s = spawned.elapsed().as_secs_f64();
        let seconds = |key: &str| loaded[key].as_f64().unwrap_or(f64::NAN);
        let parts = (seconds("import_s"), seconds("from_pretrained_s"));
        (direct, load_s, parts)
    }

    /// The next message of type `kind` from the script.
    fn next(&mut self, kind: &str) -> Value {
        for line in self.lines.by_ref() {
            let line = line.expect("direct script output");
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if message["type"] == kind {
                return message;
            }
        }
        panic!("the direct script ended before its {kind} line");
    }

    fn call(&mut self) -> Call {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"go\n")
            .and_then(|_| stdin.flush())
            .expect("ask the direct script for a call");
        let round = self.next("round");
        let marks: Vec<f64> = serde_json::from_value(round["marks_ms"].clone()).expect("marks");
        Call {
            wall_s: round["generate_s"].as_f64().expect("generate_s"),
            step_s: per_step(&marks),
            client_step_s: f64::NAN,
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

type DirectSide<'a> = (&'a str, &'a Path, &'a Path);

/// One phase: a fresh direct process and a fresh modeld load of `name`
/// (in the order `direct_first` says), a first call on each, then
/// `case.warm` warm calls on each, alternating which goes first. Returns
/// the direct script's import and `from_pretrained` seconds.
fn phase(
    daemon: &Daemon,
    (python, script, pictures): DirectSide,
    case: &Case,
    name: &str,
    direct_first: bool,
    (direct, ours): (&mut Figures, &mut Figures),
) -> (f64, f64) {
    let mut client = patient_client(daemon);
    let load_ours = |client: &mut modeld_wire::Client, ours: &mut Figures| {
        let started = Instant::now();
        client
            .call_value("load", json!({"name": name}))
            .expect("load");
        ours.load_s.push(started.elapsed().as_secs_f64());
    };
    if !direct_first {
        load_ours(&mut client, ours);
    }
    let (mut process, load_s, parts) = Direct::start(python, script, pictures, case);
    direct.load_s.push(load_s);
    if direct_first {
        load_ours(&mut client, ours);
    }
    let params = params(case, name);
    for round in 0..=case.warm {
        let mut calls = [None, None];
        let order = match (round + usize::from(!direct_first)) % 2 {
            0 => [0, 1],
            _ => [1, 0],
        };
        for side in order {
            calls[side] = Some(match side {
                0 => process.call(),
                _ => modeld_call(&mut client, &params).expect("generate"),
            });
        }
        for (figures, call) in [(&mut *direct, &calls[0]), (&mut *ours, &calls[1])] {
            let call = call.as_ref().expect("both sides called");
            if round == 0 {
                figures.first_s.push(call.wall_s);
            } else {
                figures.warm_s.push(call.wall_s);
                figures.step_s.push(call.step_s);
                figures.client_step_s.push(call.client_step_s);
            }
        }
    }
    drop(process);
    client
        .call_value("unload", json!({"name": name}))
        .expect("unload");
    parts
}

/// One `generate` to its end: its wall time and per-step figure, or what
/// ended it otherwise.
fn modeld_call(client: &mut modeld_wire::Client, params: &Value) -> Result<Call, String> {
    let started = Instant::now();
    let (mut marks, mut received) = (Vec::new(), Vec::new());
    let stream = client
        .subscribe("generate", params)
        .map_err(|e| failure(e.kind(), &e.to_string()))?;
    for event in stream {
        let event = event.map_err(|e| failure(e.kind(), &e.to_string()))?;
        if event["event"] == "progress" && event["stage"] == "denoise" {
            marks.push(event["elapsed_ms"].as_f64().expect("elapsed_ms"));
            received.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        if event["event"] == "error" {
            let error = &event["error"];
            return Err(failure(
                error["data"]["kind"].as_str(),
                error["message"].as_str().unwrap_or(""),
            ));
        }
        if event["done"] == true {
            if event["images"].as_array().is_none_or(|i| i.is_empty()) {
                return Err(format!("no picture: {event}"));
            }
            return Ok(Call {
                wall_s: started.elapsed().as_secs_f64(),
                step_s: per_step(&marks),
                client_step_s: per_step(&received),
            });
        }
    }
    Err("the stream ended without a final event".into())
}

/// An error for a table cell: its kind and its message's first line.
fn failure(kind: Option<&str>, message: &str) -> String {
    format!("{} ({})", first_line(message), kind.unwrap_or("?"))
}

/// The runner processes among the daemon's children.
fn runner_pids(daemon: &Daemon) -> Vec<i32> {
    let parent = daemon.pid().as_raw();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("?");
        let ppid: i32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_runner = String::from_utf8_lossy(&cmdline).contains("diffusers_runner");
        if ppid == parent && state != "Z" && is_runner {
            found.push(pid);
        }
    }
    found
}

fn kill_runner(daemon: &Daemon) {
    let pids = runner_pids(daemon);
    assert_eq!(pids.len(), 1, "one runner expected: {pids:?}");
    kill(Pid::from_raw(pids[0]), Signal::SIGKILL).expect("kill -9 the runner");
}

/// Kills the loaded runner while it is idle and while it draws, and times
/// what the next calls take.
fn restart(daemon: &Daemon, case: &Case) {
    let name = case.paths[0].0;
    let params = params(case, name);
    let mut client = patient_client(daemon);
    client
        .call_value("load", json!({"name": name}))
        .expect("load");
    modeld_call(&mut client, &params).expect("a first generate");

    // Idle: the runner dies between jobs.
    kill_runner(daemon);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let next = modeld_call(&mut client, &params);
    let next_s = started.elapsed().as_secs_f64();
    let then = modeld_call(&mut client, &params).expect("the generate after");
    println!(
        "| {} | idle, between jobs | {} | {next_s:.2} | {:.2} |",
        case.label,
        outcome(&next),
        then.wall_s
    );

    // During a generation: killed after the first denoising step.
    let mut stream = client.subscribe("generate", &params).expect("generate");
    for event in stream.by_ref() {
        let event = event.expect("event");
        if event["event"] == "progress" && event["stage"] == "denoise" {
            break;
        }
    }
    kill_runner(daemon);
    let killed = Instant::now();
    let mut ended = String::from("the stream ended without a final event");
    for event in stream {
        match event {
            Err(err) => {
                ended = format!("failed: {}", failure(err.kind(), &err.to_string()));
                break;
            }
            Ok(event) if event["event"] == "error" => {
                let error = &event["error"];
                let message = error["message"].as_str().unwrap_or("");
                ended = format!(
                    "failed: {}",
                    failure(error["data"]["kind"].as_str(), message)
                );
                break;
            }
            Ok(event) if event["done"] == true => {
                ended = format!("ended: {}", event["finish_reason"]);
                break;
            }
            Ok(_) => {}
        }
    }
    let failed_s = killed.elapsed().as_secs_f64();
    let then = modeld_call(&mut client, &params).expect("the generate after the crash");
    println!(
        "| {} | after step 1 of a generate | the running job {ended} (after {failed_s:.2} s) | {failed_s:.2} | {:.2} |",
        case.label, then.wall_s
    );
    client
        .call_value("unload", json!({"name": name}))
        .expect("unload");
}

fn outcome(result: &Result<Call, String>) -> String {
    match result {
        Ok(_) => "drew the picture (a fresh runner)".into(),
        Err(err) => format!("failed: {err}"),
    }
}

/// The first line of an error without the runner's stderr tail, shortened
/// for a table cell.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    let line = line
        .split("; its stderr")
        .next()
        .unwrap_or("")
        .replace('|', "/");
    match line.char_indices().nth(160) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}
