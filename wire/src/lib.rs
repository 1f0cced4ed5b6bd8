//! Wire protocol of modeld: the JSON-RPC method names, parameter and reply
//! types, error kinds, default socket discovery and a small blocking client.
//!
//! Both the daemon and `modelctl` use these definitions, so a field renamed
//! here is renamed on both sides of the socket at once.

pub mod client;
pub mod error;
pub mod methods;
pub mod paths;
pub mod types;

pub use client::{Client, ClientError, Subscription};
pub use error::{ErrorKind, RpcErrorObject};
