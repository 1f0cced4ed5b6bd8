//! The JSON-RPC surface: every method is registered here, and [`route`] does
//! the parameter decoding and error mapping for all of them, so handlers are
//! plain async functions from typed parameters to typed replies.

pub mod dispatch;
pub mod error;

use std::future::Future;
use std::sync::Arc;

use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::RpcModule;
use modeld_wire::methods;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::handlers;
use crate::state::AppState;
use crate::validate::ValidationError;
pub use error::ApiError;

pub type Module = RpcModule<Arc<AppState>>;

/// Registers every method of the daemon.
pub fn build_module(state: Arc<AppState>) -> Module {
    let mut module = RpcModule::new(state);
    route(&mut module, methods::STATUS, handlers::admin::status);
    route(&mut module, methods::SHUTDOWN, handlers::admin::shutdown);
    route(&mut module, methods::RELOAD, handlers::admin::reload);
    route(&mut module, methods::VRAM, handlers::vram::vram);
    route(&mut module, methods::METRICS, handlers::metrics::metrics);
    route(
        &mut module,
        methods::MODELS_REGISTER,
        handlers::models::register,
    );
    route(&mut module, methods::MODELS_LIST, handlers::models::list);
    route(&mut module, methods::MODELS_GET, handlers::models::get);
    route(
        &mut module,
        methods::MODELS_REMOVE,
        handlers::models::remove,
    );
    route(&mut module, methods::MODELS_SOURCE, handlers::pull::source);
    route(&mut module, methods::LOAD, handlers::engine::load);
    route(&mut module, methods::CACHE_SCAN, handlers::cache::scan);
    route(
        &mut module,
        methods::CACHE_DUPLICATES,
        handlers::cache::duplicates,
    );
    route(
        &mut module,
        methods::CACHE_CONSOLIDATE,
        handlers::cache::consolidate,
    );
    route(&mut module, methods::CACHE_CLEAN, handlers::cache::clean);
    route(&mut module, methods::CACHE_RM, handlers::cache::remove);
    route(&mut module, methods::MODES_LIST, handlers::modes::list);
    route(&mut module, methods::MODES_RELOAD, handlers::modes::reload);
    route(&mut module, methods::SWITCH_MODE, handlers::modes::switch);
    route(&mut module, methods::JOBS_CANCEL, handlers::modes::cancel);
    route(&mut module, methods::JOBS_GET, handlers::modes::get_job);
    route(&mut module, methods::UNLOAD, handlers::engine::unload);
    stream(
        &mut module,
        [
            methods::GENERATE,
            methods::GENERATE_NOTIFICATION,
            methods::GENERATE_UNSUBSCRIBE,
        ],
        handlers::engine::generate,
    );
    stream(
        &mut module,
        [
            methods::MODELS_PULL,
            methods::MODELS_PULL_NOTIFICATION,
            methods::MODELS_PULL_UNSUBSCRIBE,
        ],
        handlers::pull::pull,
    );
    stream(
        &mut module,
        [
            methods::EVENTS_SUBSCRIBE,
            methods::EVENTS_NOTIFICATION,
            methods::EVENTS_UNSUBSCRIBE,
        ],
        handlers::events::subscribe,
    );
    module
}

/// Registers a streaming method: `[subscribe, notification, unsubscribe]`
/// names, and a handler that accepts or rejects the pending subscription.
fn stream<F, Fut>(module: &mut Module, names: [&'static str; 3], handler: F)
where
    F: Fn(Params<'static>, jsonrpsee::PendingSubscriptionSink, Arc<AppState>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let [subscribe, notification, unsubscribe] = names;
    module
        .register_subscription(
            subscribe,
            notification,
            unsubscribe,
            move |params, pending, state, _| {
                // jsonrpsee runs the handler on a task of its own: carry the
                // caller over, as `route` handlers see it, and the HTTP
                // front door's ticket for the job it queues.
                let caller = crate::auth::current();
                let ticket = crate::scheduler::ticket::current();
                let work = handler(params, pending, (*state).clone());
                async move {
                    let work = async move {
                        match ticket {
                            Some(ticket) => crate::scheduler::ticket::scope(ticket, work).await,
                            None => work.await,
                        }
                    };
                    match caller {
                        Some(caller) => crate::auth::scope(caller, work).await,
                        None => work.await,
                    }
                }
            },
        )
        .expect("method names are unique");
}

/// Registers `handler` under `name`: decodes its parameters into `P`,
/// refuses new work during shutdown, and maps its error to the wire.
fn route<P, R, F, Fut>(module: &mut Module, name: &'static str, handler: F)
where
    P: DeserializeOwned + Send + 'static,
    R: Serialize + Clone + 'static,
    F: Fn(Arc<AppState>, P) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R, ApiError>> + Send + 'static,
{
    module
        .register_async_method(name, move |params, state, _| {
            let handler = handler.clone();
            async move {
                let params = decode_params::<P>(&params).map_err(ApiError::from)?;
                handler((*state).clone(), params)
                    .await
                    .map_err(ErrorObjectOwned::from)
            }
        })
        .expect("method names are unique");
}

/// Decodes by-name (object) or by-position (array) parameters; absent
/// parameters decode as an empty object. Errors name the offending field.
pub fn decode_params<P: DeserializeOwned>(params: &Params) -> Result<P, ValidationError> {
    let text = params.as_str().unwrap_or("{}");
    let text = if text.trim() == "null" { "{}" } else { text };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        let field = if path == "." {
            backticked(&message).unwrap_or_else(|| "params".to_string())
        } else {
            path
        };
        ValidationError::new(field, message)
    })
}

/// The first `name` quoted in backticks in a serde message, such as the
/// field of "missing field `name`".
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// Parameters of methods that take none: `{}`, `[]`, `null` or absent.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use modeld_wire::types::{NameParams, RegisterParams};

    fn decode<P: DeserializeOwned>(json: Option<&'static str>) -> Result<P, ValidationError> {
        decode_params(&Params::new(json))
    }

    #[test]
    fn absent_params_are_an_empty_object() {
        decode::<NoParams>(None).unwrap();
        decode::<NoParams>(Some("null")).unwrap();
        decode::<NoParams>(Some("[]")).unwrap();
        assert!(decode::<NoParams>(Some(r#"{"x":1}"#)).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let err = decode::<NameParams>(Some("{}")).unwrap_err();
        assert_eq!(err.field, "name");
        let err = decode::<NameParams>(Some(r#"{"name":5}"#)).unwrap_err();
        assert_eq!(err.field, "name");
        let err =
            decode::<RegisterParams>(Some(r#"{"name":"a","estimated_size":-1}"#)).unwrap_err();
        assert_eq!(err.field, "estimated_size");
    }
}
