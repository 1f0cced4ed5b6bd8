//! A fake Hugging Face Hub on 127.0.0.1 for tests: the endpoints hf-hub and
//! huggingface_hub call (repo info, recursive tree, HEAD/GET `resolve` with
//! the LFS redirect to a CDN path, byte ranges), served from in-memory
//! repos, with fault injection and a log of every request.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sha1::Sha1;
use sha2::{Digest, Sha256};

#[derive(Clone)]
struct FakeFile {
    path: String,
    bytes: Arc<Vec<u8>>,
    sha256: String,
    git_oid: String,
    lfs: bool,
}

struct FakeRepo {
    commit: String,
    files: Vec<FakeFile>,
    /// Requests need this bearer token.
    token: Option<String>,
}

/// One logged request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, FakeRepo>,
    log: Vec<Request>,
    /// Cut the connection after this many body bytes, for the next N bodies.
    cut_after: Option<(u64, usize)>,
    /// Serve flipped bytes for the next N bodies.
    corrupt: usize,
    /// Answer every request with this status, for the next N requests.
    fail_status: Option<(u16, usize)>,
    /// Body bytes per second; `None` is unthrottled.
    throttle: Option<u64>,
    /// Sizes HEAD reports instead of the real ones, by file path.
    claimed_sizes: HashMap<String, u64>,
}

pub struct FakeHub {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn git_oid(bytes: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(format!("blob {}\0", bytes.len()).as_bytes());
    sha1.update(bytes);
    hex::encode(sha1.finalize())
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake hub");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &state);
                });
            }
        });
        FakeHub { addr, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves every file of `dir` as `repo`; `.safetensors` files are LFS.
    /// Returns the commit id.
    pub fn add_repo_from_dir(&self, repo: &str, dir: &Path) -> String {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).expect("fixture dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.push((name, std::fs::read(&path).expect("read fixture")));
        }
        self.add_repo(repo, files)
    }

    pub fn add_repo(&self, repo: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let files: Vec<FakeFile> = files
            .into_iter()
            .map(|(path, bytes)| FakeFile {
                lfs: path.ends_with(".safetensors") || path.ends_with(".gguf"),
                sha256: sha256_hex(&bytes),
                git_oid: git_oid(&bytes),
                path,
                bytes: Arc::new(bytes),
            })
            .collect();
        let commit = git_oid(repo.as_bytes());
        self.state.lock().unwrap().repos.insert(
            repo.to_string(),
            FakeRepo {
                commit: commit.clone(),
                files,
                token: None,
            },
        );
        commit
    }

    /// Makes `repo` gated: requests without `token` get 401.
    pub fn gate(&self, repo: &str, token: &str) {
        self.state
            .lock()
            .unwrap()
            .repos
            .get_mut(repo)
            .expect("repo")
            .token = Some(token.into());
    }

    pub fn cut_after(&self, bytes: u64, times: usize) {
        self.state.lock().unwrap().cut_after = Some((bytes, times));
    }

    pub fn corrupt(&self, times: usize) {
        self.state.lock().unwrap().corrupt = times;
    }

    pub fn fail_with(&self, status: u16, times: usize) {
        self.state.lock().unwrap().fail_status = Some((status, times));
    }

    /// Makes HEAD requests report `size` for `path`, as a huge file would.
    pub fn claim_size(&self, path: &str, size: u64) {
        self.state
            .lock()
            .unwrap()
            .claimed_sizes
            .insert(path.into(), size);
    }

    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        self.state.lock().unwrap().throttle = bytes_per_sec;
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    /// Body bytes requested of `file` (GETs of its resolve or CDN path).
    pub fn downloads_of(&self, sha256_or_path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(sha256_or_path))
            .collect()
    }

    pub fn sha256_of(&self, repo: &str, path: &str) -> String {
        let state = self.state.lock().unwrap();
        let repo = state.repos.get(repo).expect("repo");
        repo.files
            .iter()
            .find(|f| f.path == path)
            .expect("file")
            .sha256
            .clone()
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

enum Body {
    Empty,
    Json(String),
    Bytes(Arc<Vec<u8>>, std::ops::Range<u64>),
}

impl Reply {
    fn status(status: u16, error_code: Option<&str>) -> Reply {
        let mut headers = Vec::new();
        if let Some(code) = error_code {
            headers.push(("X-Error-Code".into(), code.into()));
        }
        Reply {
            status,
            headers,
            body: Body::Json(json!({"error": error_code.unwrap_or("error")}).to_string()),
        }
    }

    fn json(value: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: Body::Json(value.to_string()),
        }
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    let request = Request {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    let reply = {
        let mut state = state.lock().unwrap();
        state.log.push(request.clone());
        route(&mut state, &request)
    };
    write_reply(stream, state, &method, reply)
}

fn route(state: &mut State, request: &Request) -> Reply {
    if let Some((status, times)) = state.fail_status {
        state.fail_status = (times > 1).then_some((status, times - 1));
        return Reply::status(status, None);
    }
    let path = percent_decode(&request.path);
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return cdn(state, sha, request);
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        return api(state, rest, request);
    }
    if let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") {
        return resolve(state, repo, rest, request);
    }
    Reply::status(404, None)
}

fn authorized(repo: &FakeRepo, request: &Request) -> bool {
    match &repo.token {
        None => true,
        Some(token) => request.authorization.as_deref() == Some(&format!("Bearer {token}")),
    }
}

fn api(state: &State, rest: &str, request: &Request) -> Reply {
    let (repo_id, kind, revision) = if let Some((repo, rev)) = rest.split_once("/revision/") {
        (repo, "info", rev)
    } else if let Some((repo, rev)) = rest.split_once("/tree/") {
        (repo, "tree", rev)
    } else {
        return Reply::status(404, None);
    };
    let Some(repo) = state.repos.get(repo_id) else {
        return Reply::status(404, Some("RepoNotFound"));
    };
    if !authorized(repo, request) {
        return Reply::status(401, Some("GatedRepo"));
    }
    if revision != "main" && revision != repo.commit {
        return Reply::status(404, Some("RevisionNotFound"));
    }
    if kind == "info" {
        let siblings: Vec<_> = repo
            .files
            .iter()
            .map(|f| json!({"rfilename": f.path}))
            .collect();
        return Reply::json(json!({"id": repo_id, "sha": repo.commit, "siblings": siblings}));
    }
    let entries: Vec<_> = repo
        .files
        .iter()
        .map(|f| {
            let mut entry =
                json!({"type": "file", "oid": f.git_oid, "size": f.bytes.len(), "path": f.path});
            if f.lfs {
                entry["lfs"] = json!({"oid": f.sha256, "size": f.bytes.len(), "pointerSize": 134});
            }
            entry
        })
        .collect();
    Reply::json(json!(entries))
}

fn resolve(state: &State, repo_id: &str, rest: &str, request: &Request) -> Reply {
    let Some(repo) = state.repos.get(repo_id) else {
        return Reply::status(404, Some("RepoNotFound"));
    };
    if !authorized(repo, request) {
        return Reply::status(401, Some("GatedRepo"));
    }
    let Some((revision, file_path)) = rest.split_once('/') else {
        return Reply::status(404, None);
    };
    if revision != "main" && revision != repo.commit {
        return Reply::status(404, Some("RevisionNotFound"));
    }
    let Some(file) = repo.files.iter().find(|f| f.path == file_path) else {
        return Reply::status(404, Some("EntryNotFound"));
    };
    let size = state
        .claimed_sizes
        .get(&file.path)
        .copied()
        .unwrap_or(file.bytes.len() as u64)
        .to_string();
    let mut headers = vec![("X-Repo-Commit".to_string(), repo.commit.clone())];
    if file.lfs {
        headers.push(("Location".into(), format!("/cdn/{}", file.sha256)));
        headers.push(("X-Linked-Etag".into(), format!("\"{}\"", file.sha256)));
        headers.push(("X-Linked-Size".into(), size));
        headers.push(("ETag".into(), format!("\"{}\"", git_oid(b"pointer"))));
        return Reply {
            status: 302,
            headers,
            body: Body::Empty,
        };
    }
    headers.push(("ETag".into(), format!("\"{}\"", file.git_oid)));
    ranged(file, request, headers)
}

fn cdn(state: &State, sha: &str, request: &Request) -> Reply {
    let file = state
        .repos
        .values()
        .flat_map(|r| r.files.iter())
        .find(|f| f.sha256 == sha);
    match file {
        Some(file) => ranged(file, request, vec![("ETag".into(), format!("\"{sha}\""))]),
        None => Reply::status(404, None),
    }
}

/// A 200, or a 206 for `Range: bytes=N-`.
fn ranged(file: &FakeFile, request: &Request, mut headers: Vec<(String, String)>) -> Reply {
    let len = file.bytes.len() as u64;
    let start = request
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    match start {
        Some(start) if start >= len => Reply::status(416, None),
        Some(start) => {
            headers.push((
                "Content-Range".into(),
                format!("bytes {start}-{}/{len}", len - 1),
            ));
            Reply {
                status: 206,
                headers,
                body: Body::Bytes(file.bytes.clone(), start..len),
            }
        }
        None => Reply {
            status: 200,
            headers,
            body: Body::Bytes(file.bytes.clone(), 0..len),
        },
    }
}

fn write_reply(
    mut stream: TcpStream,
    state: &Mutex<State>,
    method: &str,
    reply: Reply,
) -> std::io::Result<()> {
    let body: &[u8] = match &reply.body {
        Body::Empty => &[],
        Body::Json(text) => text.as_bytes(),
        Body::Bytes(bytes, range) => &bytes[range.start as usize..range.end as usize],
    };
    let content_length = body.len();
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {content_length}\r\nConnection: close\r\n",
        reply.status
    );
    if matches!(reply.body, Body::Json(_)) {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if method == "HEAD" || body.is_empty() {
        return Ok(());
    }
    let is_file = matches!(reply.body, Body::Bytes(..));
    let (limit, corrupt, throttle) = {
        let mut state = state.lock().unwrap();
        let limit = match state.cut_after {
            Some((bytes, times)) if is_file && body.len() as u64 > bytes => {
                state.cut_after = (times > 1).then_some((bytes, times - 1));
                Some(bytes)
            }
            _ => None,
        };
        let corrupt = is_file && state.corrupt > 0;
        if corrupt {
            state.corrupt -= 1;
        }
        (limit, corrupt, state.throttle)
    };
    let mut data = body.to_vec();
    if corrupt {
        for byte in data.iter_mut().step_by(97) {
            *byte ^= 0xff;
        }
    }
    if let Some(limit) = limit {
        data.truncate(limit as usize);
    }
    match throttle {
        None => stream.write_all(&data)?,
        Some(rate) => {
            let chunk = (rate / 20).max(1) as usize;
            for piece in data.chunks(chunk) {
                stream.write_all(piece)?;
                stream.flush()?;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    stream.flush()?;
    // Closing with bytes missing is what a dropped connection looks like.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
