//! Parameter and reply types of every method, serialized as JSON objects,
//! one module per area; everything is re-exported here.
//!
//! Parameter structs reject unknown fields so that a typo in a script is an
//! error naming the field instead of a silently ignored option.

mod admin;
mod bytes;
mod cache;
mod engine;
mod events;
mod files;
mod jobs;
mod models;

pub use admin::*;
pub use bytes::*;
pub use cache::*;
pub use engine::*;
pub use events::*;
pub use files::*;
pub use jobs::*;
pub use models::*;
