//! The daemon's Prometheus series, kept with the `prometheus-client` crate
//! in one process-wide registry. Counters and histograms are updated where
//! things happen (the scheduler, the loader, downloads, the front doors);
//! gauges of the present (queue, resident models, device memory) are set
//! from a snapshot when the text is read, by `handlers::metrics`. A leaf:
//! it imports nothing from the crate, so any layer may record into it.

use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResidentLabels {
    model: String,
    device: String,
    measure: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    measure: String,
}

type Seconds = Family<ModelLabels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

struct Series {
    http_requests: Family<HttpLabels, Counter>,
    rpc_requests: Family<RpcLabels, Counter>,
    jobs: Family<JobLabels, Counter>,
    queue_depth: Gauge,
    jobs_running: Gauge,
    prompt_tokens: Family<ModelLabels, Counter>,
    completion_tokens: Family<ModelLabels, Counter>,
    images: Family<ModelLabels, Counter>,
    steps: Family<ModelLabels, Counter>,
    first_token: Seconds,
    per_token: Seconds,
    load: Seconds,
    switches: Family<OutcomeLabels, Counter>,
    resident: Family<ResidentLabels, Gauge>,
    device_memory: Family<DeviceLabels, Gauge>,
    downloaded: Counter,
    evictions: Counter,
    uptime: FloatGauge,
}

/// Token times from 1 ms to about 16 s.
fn token_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Load times from 50 ms to about 14 minutes.
fn load_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 15))
}

struct Metrics {
    registry: Registry,
    series: Series,
}

static METRICS: LazyLock<Mutex<Metrics>> = LazyLock::new(|| Mutex::new(Metrics::new()));

impl Metrics {
    fn new() -> Self {
        let series = Series {
            http_requests: Family::default(),
            rpc_requests: Family::default(),
            jobs: Family::default(),
            queue_depth: Gauge::default(),
            jobs_running: Gauge::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            images: Family::default(),
            steps: Family::default(),
            first_token: Family::new_with_constructor(token_histogram),
            per_token: Family::new_with_constructor(token_histogram),
            load: Family::new_with_constructor(load_histogram),
            switches: Family::default(),
            resident: Family::default(),
            device_memory: Family::default(),
            downloaded: Counter::default(),
            evictions: Counter::default(),
            uptime: FloatGauge::default(),
        };
        let mut registry = Registry::with_prefix("modeld");
        let s = &series;
        registry.register(
            "http_requests",
            "HTTP requests by endpoint and status code",
            s.http_requests.clone(),
        );
        registry.register("rpc_requests", "JSON-RPC calls by method and outcome (ok or the error kind); the HTTP API's calls included", s.rpc_requests.clone());
        registry.register(
            "jobs",
            "Finished jobs by kind and final state",
            s.jobs.clone(),
        );
        registry.register(
            "queue_depth",
            "Jobs waiting in the queue",
            s.queue_depth.clone(),
        );
        registry.register("jobs_running", "Jobs running", s.jobs_running.clone());
        registry.register(
            "prompt_tokens",
            "Prompt tokens of finished text generations",
            s.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Tokens generated",
            s.completion_tokens.clone(),
        );
        registry.register("images", "Pictures generated", s.images.clone());
        registry.register(
            "denoising_steps",
            "Denoising steps run, per request",
            s.steps.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From a generation's start (its model resident) to its first token",
            s.first_token.clone(),
        );
        registry.register(
            "time_per_token_seconds",
            "Between consecutive tokens of a generation",
            s.per_token.clone(),
        );
        registry.register("load_seconds", "Time to load a model", s.load.clone());
        registry.register(
            "mode_switches",
            "Mode switches by outcome",
            s.switches.clone(),
        );
        registry.register(
            "resident_model_bytes",
            "Resident models' memory, estimated and measured, on their device",
            s.resident.clone(),
        );
        registry.register(
            "device_memory_bytes",
            "Device memory: total, used and free (cpu: total and available)",
            s.device_memory.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Bytes downloaded from the Hub",
            s.downloaded.clone(),
        );
        registry.register(
            "evictions",
            "Idle models unloaded to make room for another",
            s.evictions.clone(),
        );
        registry.register(
            "uptime_seconds",
            "Seconds since the daemon started",
            s.uptime.clone(),
        );
        Metrics { registry, series }
    }
}

fn with<R>(record: impl FnOnce(&Series) -> R) -> R {
    let metrics = METRICS.lock().unwrap_or_else(|e| e.into_inner());
    record(&metrics.series)
}

fn model(name: &str) -> ModelLabels {
    ModelLabels {
        model: name.to_string(),
    }
}

pub fn http_request(endpoint: &str, status: u16) {
    let labels = HttpLabels {
        endpoint: endpoint.to_string(),
        status,
    };
    with(|s| s.http_requests.get_or_create(&labels).inc());
}

/// A JSON-RPC call's outcome: `ok`, or its error kind.
pub fn rpc_request(method: &str, outcome: &str) {
    let labels = RpcLabels {
        method: method.to_string(),
        outcome: outcome.to_string(),
    };
    with(|s| s.rpc_requests.get_or_create(&labels).inc());
}

/// A job ended: `state` is `done`, `failed` or `cancelled`.
pub fn job_finished(kind: &str, state: &str) {
    let labels = JobLabels {
        kind: kind.to_string(),
        state: state.to_string(),
    };
    with(|s| s.jobs.get_or_create(&labels).inc());
}

pub fn text_done(name: &str, prompt_tokens: usize, completion_tokens: usize) {
    with(|s| {
        s.prompt_tokens
            .get_or_create(&model(name))
            .inc_by(prompt_tokens as u64);
        s.completion_tokens
            .get_or_create(&model(name))
            .inc_by(completion_tokens as u64);
    });
}

pub fn images_done(name: &str, images: usize, steps: usize) {
    with(|s| {
        s.images.get_or_create(&model(name)).inc_by(images as u64);
        s.steps.get_or_create(&model(name)).inc_by(steps as u64);
    });
}

pub fn first_token(name: &str, after: Duration) {
    with(|s| {
        s.first_token
            .get_or_create(&model(name))
            .observe(after.as_secs_f64())
    });
}

pub fn next_token(name: &str, after: Duration) {
    with(|s| {
        s.per_token
            .get_or_create(&model(name))
            .observe(after.as_secs_f64())
    });
}

pub fn model_loaded(name: &str, took: Duration, evicted: usize) {
    with(|s| {
        s.load
            .get_or_create(&model(name))
            .observe(took.as_secs_f64());
        s.evictions.inc_by(evicted as u64);
    });
}

pub fn mode_switch(ok: bool) {
    let outcome = if ok { "done" } else { "failed" };
    let labels = OutcomeLabels {
        outcome: outcome.to_string(),
    };
    with(|s| s.switches.get_or_create(&labels).inc());
}

pub fn downloaded(bytes: u64) {
    with(|s| s.downloaded.inc_by(bytes));
}

/// The present, as the caller read it when the text is asked for.
#[derive(Default)]
pub struct Snapshot {
    pub queued: usize,
    pub running: usize,
    /// (model, device, estimated bytes, measured bytes)
    pub resident: Vec<(String, String, u64, u64)>,
    /// (device, measure, bytes)
    pub devices: Vec<(String, &'static str, u64)>,
    pub uptime: Duration,
}

/// The Prometheus text of every series, with `now`'s gauges.
pub fn encode(now: Snapshot) -> String {
    let metrics = METRICS.lock().unwrap_or_else(|e| e.into_inner());
    let s = &metrics.series;
    s.queue_depth.set(now.queued as i64);
    s.jobs_running.set(now.running as i64);
    s.uptime.set(now.uptime.as_secs_f64());
    // Models unloaded and devices gone since the last read disappear.
    s.resident.clear();
    for (model, device, estimated, measured) in now.resident {
        for (measure, bytes) in [("estimated", estimated), ("measured", measured)] {
            let labels = ResidentLabels {
                model: model.clone(),
                device: device.clone(),
                measure: measure.to_string(),
            };
            s.resident.get_or_create(&labels).set(bytes as i64);
        }
    }
    s.device_memory.clear();
    for (device, measure, bytes) in now.devices {
        let labels = DeviceLabels {
            device,
            measure: measure.to_string(),
        };
        s.device_memory.get_or_create(&labels).set(bytes as i64);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
        .expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_in_the_text() {
        http_request("/v1/models", 200);
        rpc_request("status", "ok");
        first_token("m", Duration::from_millis(20));
        let text = encode(Snapshot {
            queued: 3,
            resident: vec![("m".into(), "cpu".into(), 10, 12)],
            ..Snapshot::default()
        });
        for needle in [
            "modeld_http_requests_total{endpoint=\"/v1/models\",status=\"200\"}",
            "modeld_rpc_requests_total{method=\"status\",outcome=\"ok\"}",
            "modeld_queue_depth 3",
            "modeld_time_to_first_token_seconds_bucket{",
            "modeld_resident_model_bytes{model=\"m\",device=\"cpu\",measure=\"measured\"} 12",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
