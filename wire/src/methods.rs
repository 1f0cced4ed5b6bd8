//! Method and notification names: the one list of everything the daemon answers.

pub const STATUS: &str = "status";
pub const VRAM: &str = "vram";
pub const SHUTDOWN: &str = "shutdown";
pub const RELOAD: &str = "reload";

pub const MODELS_REGISTER: &str = "models.register";
pub const MODELS_LIST: &str = "models.list";
pub const MODELS_GET: &str = "models.get";
pub const MODELS_REMOVE: &str = "models.remove";

/// Subscribing returns a subscription id; each event then arrives as a
/// notification named [`EVENTS_NOTIFICATION`].
pub const EVENTS_SUBSCRIBE: &str = "events.subscribe";
pub const EVENTS_UNSUBSCRIBE: &str = "events.unsubscribe";
pub const EVENTS_NOTIFICATION: &str = "events";
