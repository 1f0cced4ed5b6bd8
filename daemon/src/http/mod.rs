//! The HTTP front door: an OpenAI-compatible API (`/v1/...`), `/health`,
//! `/ready` and `/metrics`, on the TCP addresses and Unix sockets of
//! `[http] listen` (or `--http`). Every API request becomes a JSON-RPC
//! call through the daemon's own dispatcher ([`bridge`]), so it meets the
//! same authorization, validation, queue and error kinds; only the shapes
//! differ ([`openai`]), and the status codes ([`error`]). Limits mirror
//! `[server]`: body size, connections, header read time and write stalls.

pub mod auth;
pub mod bridge;
pub mod error;
pub mod openai;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, MatchedPath, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use modeld_wire::types::{GenerateEvent, ModelList, ModesReply};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use self::auth::{Keys, KeysError, Peer};
use self::error::HttpError;
use crate::auth::Caller;
use crate::config::{Config, ListenAddr};
use crate::rpc::dispatch::Dispatcher;
use crate::server::{BoundSocket, PerUid, SocketError, UidSlot};
use crate::state::AppState;

/// Why the HTTP front door cannot start; the daemon refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("http.listen has TCP addresses but no http.keys_file and no allow_anonymous: nobody could call it")]
    NoKeys,
}

enum Listener {
    Tcp(TcpListener, bool),
    Unix(BoundSocket),
}

/// Listeners bound and keys read at start-up, before the daemon says it
/// is ready: a bad address or an exposed keys file stops it there.
pub struct Prepared {
    listeners: Vec<(String, Listener)>,
    keys: Keys,
}

impl Prepared {
    /// Binds `[http] listen`; `None` when it is empty (the default).
    pub async fn bind(config: &Config) -> Result<Option<Prepared>, HttpStartError> {
        let http = &config.http;
        let addrs = http.listeners().unwrap_or_default();
        if addrs.is_empty() {
            return Ok(None);
        }
        let keys = match &http.keys_file {
            Some(path) => Keys::load(path)?,
            None => Keys::default(),
        };
        let tcp = addrs.iter().any(|a| matches!(a, ListenAddr::Tcp(_)));
        if tcp && http.keys_file.is_none() && !http.allow_anonymous {
            return Err(HttpStartError::NoKeys);
        }
        let mut listeners = Vec::new();
        for addr in addrs {
            let listener = bind_one(&addr, config).await?;
            listeners.push((addr.to_string(), listener));
        }
        Ok(Some(Prepared { listeners, keys }))
    }
}

async fn bind_one(addr: &ListenAddr, config: &Config) -> Result<Listener, HttpStartError> {
    match addr {
        ListenAddr::Tcp(socket) => {
            let listener =
                TcpListener::bind(socket)
                    .await
                    .map_err(|source| HttpStartError::Bind {
                        addr: addr.to_string(),
                        source,
                    })?;
            Ok(Listener::Tcp(listener, socket.ip().is_loopback()))
        }
        ListenAddr::Unix(path) => {
            let server = &config.server;
            let bound = BoundSocket::bind(
                path,
                server.socket_mode_bits(),
                server.socket_group.as_deref(),
            )?;
            Ok(Listener::Unix(bound))
        }
    }
}

/// What every HTTP handler shares.
pub struct Http {
    pub state: Arc<AppState>,
    pub dispatcher: Arc<Dispatcher>,
    keys: Keys,
}

/// Serves until the daemon stops, then lets responses in flight finish
/// (their jobs are cancelled after `shutdown_grace_s` like any other).
pub async fn serve(prepared: Prepared, state: Arc<AppState>, dispatcher: Arc<Dispatcher>) {
    let server = state.config().server.clone();
    let http = Arc::new(Http {
        state: state.clone(),
        dispatcher,
        keys: prepared.keys,
    });
    let app = router(http, server.max_request_bytes);
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let per_uid = PerUid::default();
    let connections = TaskTracker::new();
    let stop = state.shutdown_token();
    let mut accepting = Vec::new();
    for (addr, listener) in prepared.listeners {
        tracing::info!(%addr, "HTTP listening");
        let accept = Accept {
            app: app.clone(),
            state: state.clone(),
            slots: slots.clone(),
            per_uid: per_uid.clone(),
            connections: connections.clone(),
        };
        accepting.push(tokio::spawn(accept.run(listener)));
    }
    stop.cancelled().await;
    for task in &accepting {
        task.abort();
    }
    for task in accepting {
        // Dropping the listeners removes the Unix sockets.
        let _ = task.await;
    }
    connections.close();
    finish(
        &state,
        &connections,
        Duration::from_secs(server.shutdown_grace_s),
    )
    .await;
}

/// How long cancelled jobs' streams get to deliver their last events.
const FINAL_EVENTS: Duration = Duration::from_secs(3);

/// Shutdown: responses in flight get the grace period, as JSON-RPC
/// requests do; then running jobs are cancelled (which ends their streams)
/// and the connections get a last moment to write that out.
async fn finish(state: &AppState, connections: &TaskTracker, grace: Duration) {
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_ok()
    {
        return;
    }
    state.scheduler.cancel_running();
    if tokio::time::timeout(FINAL_EVENTS, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("{} HTTP connections did not finish", connections.len());
    }
}

fn router(http: Arc<Http>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/images/generations", post(images))
        .route("/v1/images/edits", post(image_edits))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(http.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route_layer(middleware::from_fn_with_state(http.clone(), gate))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(http)
}

/// Accepts one listener's connections within `server.max_connections`.
struct Accept {
    app: Router,
    state: Arc<AppState>,
    slots: Arc<Semaphore>,
    per_uid: PerUid,
    connections: TaskTracker,
}

impl Accept {
    async fn run(self, listener: Listener) {
        loop {
            let accepted = match &listener {
                Listener::Tcp(tcp, loopback) => tcp.accept().await.map(|(stream, _)| {
                    let peer = Peer::Tcp {
                        loopback: *loopback,
                    };
                    self.start(stream, peer, None)
                }),
                Listener::Unix(bound) => bound
                    .listener
                    .accept()
                    .await
                    .map(|(stream, _)| self.start_unix(stream)),
            };
            if let Err(err) = accepted {
                // Usually EMFILE: back off instead of spinning.
                tracing::warn!("HTTP accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// A Unix connection: its caller from the kernel, within
    /// `server.max_connections_per_uid`, as on the JSON-RPC socket.
    fn start_unix(&self, stream: tokio::net::UnixStream) {
        let server = self.state.config().server.clone();
        let caller = match Caller::of(&stream, &server) {
            Ok(caller) => caller,
            Err(err) => return tracing::warn!("cannot read the HTTP peer's credentials: {err}"),
        };
        let Some(uid_slot) = self.per_uid.take(caller.uid, server.per_uid_limit()) else {
            let uid = caller.uid;
            return tracing::warn!(
                uid,
                "HTTP connection refused: server.max_connections_per_uid"
            );
        };
        self.start(stream, Peer::Unix(Arc::new(caller)), Some(uid_slot));
    }

    /// Serves one connection, or closes it at once when every slot is
    /// taken (the client sees the connection close).
    fn start<S>(&self, stream: S, peer: Peer, uid_slot: Option<UidSlot>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!("HTTP connection refused: server.max_connections reached");
            return;
        };
        let server = self.state.config().server.clone();
        let service = self
            .app
            .clone()
            .map_request(move |mut request: Request<_>| {
                request.extensions_mut().insert(peer.clone());
                request
            });
        let stop = self.state.shutdown_token();
        self.connections.spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(server.read_timeout_s));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop((slot, uid_slot));
        });
    }
}

/// Every routed request: refused with 503 once the daemon is stopping,
/// and counted by endpoint and status.
async fn gate(State(http): State<Arc<Http>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |path| path.as_str().to_string());
    let response = if http.state.is_shutting_down() {
        HttpError::from(crate::rpc::error::wire_object(
            &crate::rpc::ApiError::ShuttingDown,
        ))
        .into_response()
    } else {
        next.run(request).await
    };
    crate::metrics::http_request(&endpoint, response.status().as_u16());
    response
}

/// The API's requests: the caller from the peer or the key, or 401.
async fn authenticate(State(http): State<Arc<Http>>, mut request: Request, next: Next) -> Response {
    let Some(peer) = request.extensions().get::<Peer>().cloned() else {
        return HttpError::internal("no peer").into_response();
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let allow_anonymous = http.state.config().http.allow_anonymous;
    match auth::resolve(&peer, authorization, &http.keys, allow_anonymous) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(auth::Refused::Missing) => {
            HttpError::unauthorized("an API key is needed: Authorization: Bearer KEY")
                .into_response()
        }
        Err(auth::Refused::WrongKey) => {
            HttpError::unauthorized("the API key is not valid").into_response()
        }
    }
}

async fn not_found(request: Request) -> Response {
    let mut err = HttpError::bad_param(
        "path",
        format!("no such endpoint: {}", request.uri().path()),
    );
    err.status = StatusCode::NOT_FOUND;
    err.code = "not_found".into();
    err.into_response()
}

/// Alive: the process answers.
async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready for work: not stopping, and the default mode (if one is set) is
/// the current one. The store is open and the config loaded, or the
/// daemon would not be serving.
async fn ready(State(http): State<Arc<Http>>) -> Response {
    let state = &http.state;
    let default = state.loaded_modes().modes.default_mode.clone();
    let current = state.scheduler.current_mode();
    let waiting = default
        .as_ref()
        .filter(|mode| current.as_ref() != Some(mode));
    let body = json!({
        "ready": waiting.is_none(),
        "current_mode": current,
        "default_mode": default,
    });
    match waiting {
        None => Json(body).into_response(),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
    }
}

/// Registered models (`owned_by: modeld`) and modes (`owned_by:
/// modeld-mode`), each usable as `model`.
async fn models(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Json<Value>, HttpError> {
    let dispatcher = &http.dispatcher;
    let list: ModelList = bridge::call(
        dispatcher,
        &caller,
        modeld_wire::methods::MODELS_LIST,
        json!({}),
    )
    .await?;
    let modes: ModesReply = bridge::call(
        dispatcher,
        &caller,
        modeld_wire::methods::MODES_LIST,
        json!({}),
    )
    .await?;
    let models = list.models.into_iter().map(|model| {
        json!({"id": model.name, "object": "model", "created": model.registered_at, "owned_by": "modeld"})
    });
    let modes = modes.modes.into_iter().map(|mode| {
        json!({"id": mode.name, "object": "model", "created": modes.loaded_at, "owned_by": "modeld-mode"})
    });
    Ok(Json(
        json!({"object": "list", "data": models.chain(modes).collect::<Vec<_>>()}),
    ))
}

async fn chat(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    text(http, caller, body, openai::chat).await
}

async fn completions(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    text(http, caller, body, openai::completion).await
}

/// Reads a text generation request (`parse`) and answers it, whole or
/// streamed.
async fn text(
    http: Arc<Http>,
    caller: Arc<Caller>,
    body: Result<Bytes, BytesRejection>,
    parse: fn(&AppState, &[u8]) -> Result<openai::TextCall, HttpError>,
) -> Response {
    let call = match read_body(body).and_then(|body| parse(&http.state, &body)) {
        Ok(call) => call,
        Err(err) => return err.into_response(),
    };
    match call.stream {
        true => sse::stream(http, caller, call).await,
        false => sse::complete(http, caller, call).await,
    }
}

/// The body, or why axum could not read it (413 beyond the limit).
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, HttpError> {
    body.map_err(|err| HttpError::rejected(err.status(), err.body_text()))
}

async fn images(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, HttpError> {
    let params = openai::image(&http.state, openai::object(&read_body(body)?)?, None)?;
    run_images(&http, &caller, params).await
}

/// `multipart/form-data` with `image` (a PNG) and the fields of
/// `/v1/images/generations`: img2img from that picture.
async fn image_edits(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, HttpError> {
    let mut form = form.map_err(|err| HttpError::rejected(err.status(), err.body_text()))?;
    use base64::Engine;
    let mut fields = Map::new();
    let mut image = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|err| HttpError::rejected(err.status(), err.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|err| HttpError::rejected(err.status(), err.body_text()))?;
        if name == "image" || name == "image[]" {
            if image.is_some() {
                return Err(HttpError::bad_param(
                    "image",
                    "modeld edits one image per request",
                ));
            }
            image = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
            continue;
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        fields.insert(name, form_value(text));
    }
    let image =
        image.ok_or_else(|| HttpError::bad_param("image", "the image to edit is missing"))?;
    let params = openai::image(&http.state, fields, Some(image))?;
    run_images(&http, &caller, params).await
}

/// A form field's text: numbers as numbers, so `steps=20` decodes.
fn form_value(text: String) -> Value {
    match serde_json::from_str::<serde_json::Number>(&text) {
        Ok(number) => Value::Number(number),
        Err(_) => Value::String(text),
    }
}

async fn run_images(
    http: &Http,
    caller: &Arc<Caller>,
    params: Value,
) -> Result<Json<Value>, HttpError> {
    let mut guard = sse::CancelOnDrop::new(&http.state);
    let mut events = bridge::generate(&http.dispatcher, caller, params, guard.ticket()).await?;
    while let Some(event) = events.next().await {
        match event {
            GenerateEvent::Token { .. }
            | GenerateEvent::Progress { .. }
            | GenerateEvent::Queued { .. } => continue,
            GenerateEvent::Images(done) => {
                guard.disarm();
                return Ok(Json(openai::images_reply(done)));
            }
            GenerateEvent::Error { error, .. } => {
                guard.disarm();
                return Err(error.into());
            }
            GenerateEvent::Done { model, .. } => {
                guard.disarm();
                return Err(HttpError::bad_param(
                    "model",
                    format!("{model:?} is a text model: use /v1/chat/completions"),
                ));
            }
        }
    }
    Err(HttpError::internal(
        "the generation ended without a final event",
    ))
}

/// The Prometheus text, from the JSON-RPC `metrics` method.
async fn metrics(
    State(http): State<Arc<Http>>,
    Extension(caller): Extension<Arc<Caller>>,
) -> Result<Response, HttpError> {
    let reply: modeld_wire::types::MetricsReply = bridge::call(
        &http.dispatcher,
        &caller,
        modeld_wire::methods::METRICS,
        json!({}),
    )
    .await?;
    let content_type = [(header::CONTENT_TYPE, reply.content_type)];
    Ok((content_type, reply.text).into_response())
}
