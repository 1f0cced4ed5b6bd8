//! The HTTP front door (issue 23): auth on each kind of listener, the
//! OpenAI shapes through the real `openai` Python package, SSE through
//! curl and a raw socket, queue comments, 429, clients that leave, and
//! `/metrics` through `prometheus_client`'s parser.
//!
//! The Python packages come from the venv `.ci/run` creates in
//! `target/py-http`; without it these tests are skipped with a note,
//! unless `MODELD_REQUIRE_HTTP_CLIENTS=1` (set by `.ci/run`) makes that a
//! failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use modeld_e2e::synthetic::register_slow_model;
use modeld_e2e::{modeld_bin, Daemon};
use serde_json::{json, Value};
use tempfile::TempDir;

const KEY: &str = "sk-modeld-test-alice";
const USER_KEY: &str = "sk-modeld-test-bob";

/// A daemon with an HTTP listener on loopback, one on a Unix socket, and
/// a keys file (alice is an administrator, bob is not).
struct Front {
    daemon: Daemon,
    addr: SocketAddr,
    unix: PathBuf,
    _keys: TempDir,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn keys_file(mode: u32) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let text = format!(
        "[keys]\n\"{KEY}\" = {{ name = \"alice\", admin = true }}\n\"{USER_KEY}\" = {{ name = \"bob\" }}\n"
    );
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    (dir, path)
}

fn start(extra: &str) -> Front {
    let (keys, path) = keys_file(0o600);
    let port = free_port();
    let unix = keys.path().join("http.sock");
    let config = format!(
        "[http]\nlisten = [\"127.0.0.1:{port}\", \"unix:{}\"]\nkeys_file = \"{}\"\n{extra}",
        unix.display(),
        path.display()
    );
    let daemon = Daemon::start_configured(&config, &[]);
    Front {
        daemon,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        unix,
        _keys: keys,
    }
}

/// Registers tiny-llama with a chat template (the fixture has none).
fn register_chat_llama(daemon: &Daemon) {
    let dir = daemon.register_fixture("tiny-llama");
    let path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["chat_template"] =
        json!("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:");
    std::fs::write(&path, config.to_string()).unwrap();
}

/// A response read to its end (`Connection: close`).
struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

fn raw_request(method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: modeld\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn read_response(mut stream: impl Read) -> Response {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut response = Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    };
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        response.body = dechunk(&response.body);
    }
    response
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

fn tcp(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(raw_request(method, path, key, body).as_bytes())
        .unwrap();
    read_response(stream)
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job_state(daemon: &Daemon, job: u64) -> String {
    let info = daemon.call("jobs.get", json!({"job": job})).unwrap();
    info["state"].as_str().unwrap().to_string()
}

#[test]
fn a_keys_file_others_can_read_stops_the_daemon() {
    let (dir, path) = keys_file(0o644);
    let config = dir.path().join("modeld.toml");
    let port = free_port();
    let text = format!(
        "[http]\nlisten = [\"127.0.0.1:{port}\"]\nkeys_file = \"{}\"\n",
        path.display()
    );
    std::fs::write(&config, text).unwrap();
    let output = Command::new(modeld_bin())
        .arg("--socket")
        .arg(dir.path().join("modeld.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&config)
        .env("HF_HOME", dir.path().join("hf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("keys.toml") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

#[test]
fn tcp_callers_need_a_valid_key_and_the_unix_socket_its_uid() {
    let front = start("[server]\nusers_may_generate = false\n");
    front.daemon.register_fixture("tiny-llama");
    let missing = tcp(front.addr, "GET", "/v1/models", None, None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert_eq!(missing.json()["error"]["type"], "authentication_error");
    let wrong = tcp(front.addr, "GET", "/v1/models", Some("sk-nope"), None);
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    let right = tcp(front.addr, "GET", "/v1/models", Some(KEY), None);
    assert_eq!(right.status, 200, "{}", right.body);
    assert_eq!(right.json()["data"][0]["id"], "tiny-llama");
    assert_eq!(right.json()["data"][0]["owned_by"], "modeld");
    // A key holder who is no administrator is held to the same rules as
    // a uid outside the admin group: here, users may not generate.
    let body = json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2});
    let refused = tcp(
        front.addr,
        "POST",
        "/v1/completions",
        Some(USER_KEY),
        Some(&body),
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(refused.json()["error"]["type"], "permission_error");
    let admin = tcp(
        front.addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(&body),
    );
    assert_eq!(admin.status, 200, "{}", admin.body);
    // The Unix listener takes the peer's uid: this test's user, the
    // daemon's own, so no key is needed.
    let mut stream = UnixStream::connect(&front.unix).unwrap();
    stream
        .write_all(raw_request("GET", "/v1/models", None, None).as_bytes())
        .unwrap();
    let unix = read_response(stream);
    assert_eq!(unix.status, 200, "{}", unix.body);
    // Health needs no key.
    assert_eq!(tcp(front.addr, "GET", "/health", None, None).status, 200);
    assert_eq!(tcp(front.addr, "GET", "/ready", None, None).status, 200);
}

#[test]
fn anonymous_callers_are_let_in_only_on_loopback_listeners() {
    let open = free_port();
    let local = free_port();
    let config = format!(
        "[http]\nlisten = [\"0.0.0.0:{open}\", \"127.0.0.1:{local}\"]\nallow_anonymous = true\n"
    );
    let daemon = Daemon::start_configured(&config, &[]);
    let remote = tcp(
        SocketAddr::from(([127, 0, 0, 1], open)),
        "GET",
        "/v1/models",
        None,
        None,
    );
    assert_eq!(remote.status, 401, "{}", remote.body);
    let loopback = tcp(
        SocketAddr::from(([127, 0, 0, 1], local)),
        "GET",
        "/v1/models",
        None,
        None,
    );
    assert_eq!(loopback.status, 200, "{}", loopback.body);
    drop(daemon);
}

#[test]
fn unsupported_parameters_and_unknown_models_get_openai_errors() {
    let front = start("[server]\nmax_request_bytes = 4096\n");
    register_chat_llama(&front.daemon);
    let messages = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"model": "tiny-llama", "messages": messages, "tools": [{"type": "function"}]}),
            400,
            "tools",
        ),
        (
            json!({"model": "tiny-llama", "messages": messages, "n": 2}),
            400,
            "n",
        ),
        (
            json!({"model": "tiny-llama", "messages": messages, "frequency_penalty": 0.5}),
            400,
            "frequency_penalty",
        ),
        (
            json!({"model": "tiny-llama", "messages": messages, "response_format": {"type": "json_schema"}}),
            400,
            "response_format",
        ),
        (
            json!({"model": "tiny-llama", "messages": messages, "bogus": true}),
            400,
            "bogus",
        ),
        // The daemon's own validation, as JSON-RPC has it.
        (
            json!({"model": "tiny-llama", "messages": messages, "top_p": 2}),
            400,
            "top_p",
        ),
        (json!({"model": "nope", "messages": messages}), 404, "model"),
    ];
    for (body, status, param) in cases {
        let response = tcp(
            front.addr,
            "POST",
            "/v1/chat/completions",
            Some(KEY),
            Some(&body),
        );
        assert_eq!(response.status, status, "{body}: {}", response.body);
        let error = &response.json()["error"];
        assert_eq!(error["param"], param, "{body}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(
            error["type"].is_string() && error["code"].is_string(),
            "{error}"
        );
    }
    // A body over server.max_request_bytes: 413, in the same shape.
    let long = json!({"model": "tiny-llama", "prompt": "x".repeat(5000)});
    let response = tcp(
        front.addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(&long),
    );
    assert_eq!(response.status, 413, "{}", response.body);
    assert_eq!(response.json()["error"]["code"], "request_too_large");
    // Neutral values of unsupported parameters ask for nothing: accepted.
    let neutral = json!({"model": "tiny-llama", "messages": messages, "n": 1,
        "presence_penalty": 0, "max_tokens": 2});
    let response = tcp(
        front.addr,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(&neutral),
    );
    assert_eq!(response.status, 200, "{}", response.body);
}

/// Every `data:` payload of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn chat_streams_as_sse_chunks_ending_with_done() {
    let front = start("");
    register_chat_llama(&front.daemon);
    let request = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "Model Loading"}],
        "max_tokens": 12, "temperature": 0});
    let whole = tcp(
        front.addr,
        "POST",
        "/v1/chat/completions",
        Some(KEY),
        Some(&request),
    );
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["usage"]["completion_tokens"], 12, "{whole}");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let output = Command::new("curl")
        .args(["-sN", "--max-time", "60", "-H"])
        .arg(format!("Authorization: Bearer {KEY}"))
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(streamed.to_string())
        .arg(format!("http://{}/v1/chat/completions", front.addr))
        .output()
        .expect("curl must be installed");
    let body = String::from_utf8_lossy(&output.stdout);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let pieces: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        pieces, text,
        "greedy: the stream adds up to the whole answer"
    );
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("length"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12, "{usage}");
}

/// Reads from `stream` until `needle` shows; returns what was read.
fn read_until(stream: &mut impl Read, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The job id in a reply id such as `cmpl-7`.
fn job_of(text: &str) -> u64 {
    let start = text.find("cmpl-").expect("a reply id") + 5;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

#[test]
fn a_client_that_leaves_mid_stream_has_its_job_cancelled() {
    let front = start("");
    register_slow_model(&front.daemon, "slow");
    let request = json!({"model": "slow", "prompt": "a", "max_tokens": 4000, "stream": true});
    let mut stream = TcpStream::connect(front.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(raw_request("POST", "/v1/completions", Some(KEY), Some(&request)).as_bytes())
        .unwrap();
    let seen = read_until(&mut stream, "\"text\":\"");
    let job = job_of(&seen);
    assert_eq!(job_state(&front.daemon, job), "running");
    drop(stream);
    wait_until("the job to be cancelled", || {
        job_state(&front.daemon, job) == "cancelled"
    });
}

#[test]
fn a_queued_stream_hears_its_place_and_a_full_queue_answers_429() {
    let front = start("[scheduler]\nqueue_size = 1\nmax_batch = 1\n");
    register_slow_model(&front.daemon, "slow");
    // One long generation runs; the queue (one place) is empty.
    let mut running = front.daemon.client();
    let params = json!({"model": "slow", "prompt": "a", "max_tokens": 4000});
    let _events = running.subscribe("generate", params).ok();
    wait_until("the first generation to run", || {
        let status = front.daemon.call("status", json!({})).unwrap();
        status["queue"]["jobs"][0]["running"] == true
    });
    let request = json!({"model": "slow", "prompt": "a", "max_tokens": 4, "stream": true});
    let mut queued = TcpStream::connect(front.addr).unwrap();
    queued
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    queued
        .write_all(raw_request("POST", "/v1/completions", Some(KEY), Some(&request)).as_bytes())
        .unwrap();
    let seen = read_until(&mut queued, ": queued position 1");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    // The queue is full now.
    let full = tcp(
        front.addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(&json!({"model": "slow", "prompt": "b"})),
    );
    assert_eq!(full.status, 429, "{}", full.body);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(full.json()["error"]["code"], "queue_full");
    // The queued client leaves: its job is cancelled before it ever runs.
    let status = front.daemon.call("status", json!({})).unwrap();
    let job = status["queue"]["jobs"][1]["id"].as_u64().unwrap();
    drop(queued);
    wait_until("the queued job to be cancelled", || {
        job_state(&front.daemon, job) == "cancelled"
    });
}

/// The Python of the venv `.ci/run` makes, or `None` (skip) when it is
/// missing and not required.
fn venv_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-http/bin/python");
    if python.exists() {
        return Some(python);
    }
    let required = std::env::var("MODELD_REQUIRE_HTTP_CLIENTS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "MODELD_REQUIRE_HTTP_CLIENTS=1 but {} is missing: run .ci/run, or create the venv with the openai and prometheus-client packages",
        python.display()
    );
    eprintln!("skipped: no {} (see .ci/run)", python.display());
    None
}

fn run_python(python: &Path, script: &str, env: &[(&str, String)]) -> String {
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python failed:\n{stdout}\n{stderr}"
    );
    stdout
}

const OPENAI_SCRIPT: &str = r#"
import os, openai
base = os.environ["BASE"]
client = openai.OpenAI(base_url=base, api_key=os.environ["KEY"], max_retries=0)
ids = [m.id for m in client.models.list()]
assert "tiny-llama" in ids, ids
messages = [{"role": "user", "content": "Model Loading"}]
whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
text = whole.choices[0].message.content
assert text and whole.usage.completion_tokens == 10, whole
assert whole.choices[0].finish_reason == "length", whole
pieces, usage = [], None
for chunk in client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(pieces) == text, (pieces, text)
assert usage.completion_tokens == 10, usage
done = client.completions.create(model="tiny-llama", prompt="Model Loading", max_tokens=5, seed=1)
assert done.choices[0].text and done.usage.completion_tokens == 5, done
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model="tiny-llama", prompt="Model Loading", max_tokens=5, stream=True) if c.choices)
assert streamed == done.choices[0].text, (streamed, done)
try:
    client.chat.completions.create(model="tiny-llama", messages=messages, tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    raise SystemExit("tools were accepted")
except openai.BadRequestError as err:
    assert err.status_code == 400 and err.param == "tools", err
try:
    client.chat.completions.create(model="nope", messages=messages)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as err:
    assert err.status_code == 404, err
try:
    openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as err:
    assert err.status_code == 401, err
image = client.images.generate(model="tiny-sd", prompt="a red square", size="64x64", n=1,
                               response_format="b64_json", extra_body={"steps": 2, "seed": 7})
import base64
png = base64.b64decode(image.data[0].b64_json)
assert png.startswith(b"\x89PNG"), png[:8]
edited = client.images.edit(model="tiny-sd", image=("in.png", png, "image/png"), prompt="a blue square",
                            extra_body={"steps": 2, "strength": 0.5, "seed": 7})
assert base64.b64decode(edited.data[0].b64_json).startswith(b"\x89PNG")
print("OK")
"#;

#[test]
fn the_openai_python_client_works_against_modeld() {
    let Some(python) = venv_python() else { return };
    let front = start("");
    register_chat_llama(&front.daemon);
    front.daemon.register_fixture("tiny-sd");
    let base = format!("http://{}/v1", front.addr);
    let out = run_python(
        &python,
        OPENAI_SCRIPT,
        &[("BASE", base), ("KEY", KEY.to_string())],
    );
    assert!(out.contains("OK"), "{out}");
}

const METRICS_SCRIPT: &str = r#"
import os, urllib.request
from prometheus_client.parser import text_string_to_metric_families
request = urllib.request.Request(os.environ["URL"], headers={"Authorization": "Bearer " + os.environ["KEY"]})
text = urllib.request.urlopen(request).read().decode()
families = {f.name: f for f in text_string_to_metric_families(text)}
for name in ["modeld_http_requests", "modeld_rpc_requests", "modeld_jobs", "modeld_queue_depth",
             "modeld_prompt_tokens", "modeld_completion_tokens", "modeld_time_to_first_token_seconds",
             "modeld_time_per_token_seconds", "modeld_load_seconds", "modeld_resident_model_bytes",
             "modeld_device_memory_bytes", "modeld_downloaded_bytes", "modeld_evictions",
             "modeld_jobs_running", "modeld_uptime_seconds"]:
    assert name in families, (name, sorted(families))
samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
assert samples[("modeld_completion_tokens_total", (("model", "tiny-llama"),))] == 3, samples
assert samples[("modeld_jobs_total", (("kind", "generate"), ("state", "done")))] >= 1, samples
resident = [k for k in samples if k[0] == "modeld_resident_model_bytes"]
assert resident, samples
print("OK")
"#;

#[test]
fn metrics_parse_with_prometheus_client_and_match_the_rpc_method() {
    let front = start("");
    front.daemon.register_fixture("tiny-llama");
    let body = json!({"model": "tiny-llama", "prompt": "Model Loading", "max_tokens": 3});
    let done = tcp(
        front.addr,
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(&body),
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let scraped = tcp(front.addr, "GET", "/metrics", Some(KEY), None);
    assert_eq!(scraped.status, 200);
    assert!(scraped
        .header("content-type")
        .is_some_and(|t| t.contains("openmetrics")));
    assert!(
        scraped
            .body
            .contains("modeld_completion_tokens_total{model=\"tiny-llama\"} 3"),
        "{}",
        scraped.body
    );
    let rpc = front.daemon.call("metrics", json!({})).unwrap();
    let text = rpc["text"].as_str().unwrap();
    assert!(
        text.contains("modeld_completion_tokens_total{model=\"tiny-llama\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("modeld_rpc_requests_total{method=\"generate\",outcome=\"ok\"}"),
        "{text}"
    );
    let Some(python) = venv_python() else { return };
    let url = format!("http://{}/metrics", front.addr);
    let out = run_python(
        &python,
        METRICS_SCRIPT,
        &[("URL", url), ("KEY", KEY.to_string())],
    );
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn sigterm_ends_http_streams_within_the_grace_period() {
    let mut front = start("[server]\nshutdown_grace_s = 1\n");
    register_slow_model(&front.daemon, "slow");
    let request = json!({"model": "slow", "prompt": "a", "max_tokens": 4000, "stream": true});
    let mut stream = TcpStream::connect(front.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(raw_request("POST", "/v1/completions", Some(KEY), Some(&request)).as_bytes())
        .unwrap();
    read_until(&mut stream, "\"text\":\"");
    let started = Instant::now();
    front.daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // The stream ends properly: its last chunk, then [DONE].
    read_until(&mut stream, "data: [DONE]");
    let status = front.daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!front.unix.exists(), "the HTTP socket is removed");
}

#[test]
fn a_client_that_leaves_before_a_whole_answer_has_its_job_cancelled() {
    let front = start("");
    register_slow_model(&front.daemon, "slow");
    let request = json!({"model": "slow", "prompt": "a", "max_tokens": 4000});
    let mut stream = TcpStream::connect(front.addr).unwrap();
    stream
        .write_all(raw_request("POST", "/v1/completions", Some(KEY), Some(&request)).as_bytes())
        .unwrap();
    let mut job = 0;
    wait_until("the generation to run", || {
        let status = front.daemon.call("status", json!({})).unwrap();
        job = status["queue"]["jobs"][0]["id"].as_u64().unwrap_or(0);
        status["queue"]["jobs"][0]["running"] == true
    });
    drop(stream);
    wait_until("the job to be cancelled", || {
        job_state(&front.daemon, job) == "cancelled"
    });
}
