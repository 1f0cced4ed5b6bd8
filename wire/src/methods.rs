//! Method and notification names: the one list of everything the daemon answers.

pub const STATUS: &str = "status";
pub const VRAM: &str = "vram";
pub const SHUTDOWN: &str = "shutdown";
pub const RELOAD: &str = "reload";

pub const MODELS_REGISTER: &str = "models.register";
pub const MODELS_LIST: &str = "models.list";
pub const MODELS_GET: &str = "models.get";
pub const MODELS_REMOVE: &str = "models.remove";
pub const MODELS_SOURCE: &str = "models.source";

/// A subscription: its notifications ([`MODELS_PULL_NOTIFICATION`]) carry
/// `PullEvent`s, the last with `done: true`.
pub const MODELS_PULL: &str = "models.pull";
pub const MODELS_PULL_UNSUBSCRIBE: &str = "models.pull.unsubscribe";
pub const MODELS_PULL_NOTIFICATION: &str = "models.pull.progress";

/// Subscribing returns a subscription id; each event then arrives as a
/// notification named [`EVENTS_NOTIFICATION`].
pub const EVENTS_SUBSCRIBE: &str = "events.subscribe";
pub const EVENTS_UNSUBSCRIBE: &str = "events.unsubscribe";
pub const EVENTS_NOTIFICATION: &str = "events";

pub const MODES_LIST: &str = "modes.list";
pub const MODES_RELOAD: &str = "modes.reload";
pub const SWITCH_MODE: &str = "switch_mode";
pub const JOBS_CANCEL: &str = "jobs.cancel";
pub const JOBS_GET: &str = "jobs.get";

pub const CACHE_SCAN: &str = "cache.scan";
pub const CACHE_DUPLICATES: &str = "cache.duplicates";
pub const CACHE_CONSOLIDATE: &str = "cache.consolidate";
pub const CACHE_CLEAN: &str = "cache.clean";
pub const CACHE_RM: &str = "cache.rm";

pub const LOAD: &str = "load";
pub const UNLOAD: &str = "unload";
/// A subscription: notifications [`GENERATE_NOTIFICATION`] carry
/// `GenerateEvent`s, the last with `done: true`.
pub const GENERATE: &str = "generate";
pub const GENERATE_UNSUBSCRIBE: &str = "generate.unsubscribe";
pub const GENERATE_NOTIFICATION: &str = "generate.token";

/// The Prometheus text of the daemon's metrics, as `GET /metrics` serves it.
pub const METRICS: &str = "metrics";
