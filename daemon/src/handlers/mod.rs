//! Method handlers, one module per command group. Each is a plain async
//! function from typed parameters to a typed reply; `rpc` does the rest.

pub mod admin;
pub mod cache;
pub mod engine;
pub mod events;
pub mod metrics;
pub mod models;
pub mod modes;
pub mod pull;
pub mod vram;
