//! `load`, `unload` and `generate`: the engine's methods. A model that is
//! not resident is loaded on first use, and its files pulled if need be.

use std::sync::Arc;

use jsonrpsee::types::Params;
use jsonrpsee::{PendingSubscriptionSink, SubscriptionSink};
use modeld_wire::types::{
    GenerateEvent, GenerateParams, LoadParams, LoadReply, NameParams, UnloadReply,
};
use tokio::sync::mpsc;

use crate::auth::Forbidden;
use crate::config::AutoSwitch;
use crate::engine::request::ValidRequest;
use crate::engine::Placement;
use crate::loader;
use crate::rpc::error::wire_object;
use crate::rpc::{decode_params, ApiError};
use crate::scheduler::JobEvent;
use crate::state::AppState;
use crate::validate::{valid_name, ValidationError};

pub async fn load(state: Arc<AppState>, params: LoadParams) -> Result<LoadReply, ApiError> {
    let name = valid_name(&params.name)?;
    let placement = Placement::choose(
        &state.engine.devices,
        params.device.as_deref(),
        params.dtype.as_deref(),
    )?;
    let outcome = loader::load_checked(&state, &name, None, Some(placement)).await?;
    Ok(LoadReply {
        model: outcome.loaded.model,
        already_loaded: outcome.loaded.already_loaded,
        changed_files: outcome.changed_files,
    })
}

/// Queued like any job, so it waits for generations ahead of it.
pub async fn unload(state: Arc<AppState>, params: NameParams) -> Result<UnloadReply, ApiError> {
    let name = valid_name(&params.name)?;
    let capacity = state.config().scheduler.queue_size;
    let reply = state.scheduler.submit_unload(name.clone(), capacity)?;
    let freed_bytes = reply
        .await
        .map_err(|_| ApiError::Internal("the unload job was dropped".into()))?
        .map_err(ApiError::Job)?;
    tracing::info!(model = %name, freed_bytes, "model unloaded");
    Ok(UnloadReply { name, freed_bytes })
}

pub async fn generate(
    params: Params<'static>,
    pending: PendingSubscriptionSink,
    state: Arc<AppState>,
) {
    let (job, mut receiver, queue_events) = match submit(&params, &state) {
        Ok(queued) => queued,
        Err(err) => return pending.reject(err).await,
    };
    let started = match queue_events {
        true => first_event_telling_places(&state, job, pending, &mut receiver).await,
        false => first_event(pending, &mut receiver).await,
    };
    let Some((first, sink)) = started else { return };
    let mut next = first;
    loop {
        let Some(event) = next.take() else { return };
        let last = !matches!(
            event,
            Ok(GenerateEvent::Token { .. } | GenerateEvent::Progress { .. })
        );
        if !send(&sink, as_wire(event)).await || last {
            // Dropping the receiver tells the scheduler the client is gone.
            return;
        }
        next = tokio::select! {
            event = receiver.recv() => event,
            _ = sink.closed() => return,
        };
    }
}

/// The job's first event and the accepted subscription. The first event
/// comes after the job's turn, tokenizing and prefill: a request that
/// cannot run (too long, no chat template, cancelled while queued) is
/// refused outright instead of accepted and then failed.
async fn first_event(
    pending: PendingSubscriptionSink,
    receiver: &mut mpsc::Receiver<JobEvent>,
) -> Option<(Option<JobEvent>, SubscriptionSink)> {
    let first = receiver.recv().await;
    if let Some(Err(err)) = first {
        pending.reject(ApiError::Job(err)).await;
        return None;
    }
    Some((first, pending.accept().await.ok()?))
}

/// How often a waiting job's place is looked at.
const PLACE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// [`first_event`], telling the client its place whenever it changes
/// while the job waits. The subscription is accepted at the first place
/// told; a job that never waited is refused or accepted as usual.
async fn first_event_telling_places(
    state: &AppState,
    job: u64,
    pending: PendingSubscriptionSink,
    receiver: &mut mpsc::Receiver<JobEvent>,
) -> Option<(Option<JobEvent>, SubscriptionSink)> {
    let mut pending = Some(pending);
    let mut sink: Option<SubscriptionSink> = None;
    let mut told = None;
    loop {
        let place = tokio::select! {
            event = receiver.recv() => {
                return match (sink, pending) {
                    (Some(sink), _) => Some((event, sink)),
                    (None, Some(pending)) => first_event_of(event, pending).await,
                    (None, None) => None,
                };
            }
            _ = tokio::time::sleep(PLACE_POLL) => state.scheduler.position(job),
        };
        let Some(place) = place.filter(|p| told != Some((p.position, p.ahead))) else {
            continue;
        };
        if sink.is_none() {
            sink = Some(pending.take()?.accept().await.ok()?);
        }
        let event = GenerateEvent::Queued {
            position: place.position,
            ahead: place.ahead,
            eta_s: place.eta_s,
        };
        if !send(sink.as_ref()?, event).await {
            return None;
        }
        told = Some((place.position, place.ahead));
    }
}

/// The job's first event, already received, with the subscription
/// accepted, or refused when the event is an error.
async fn first_event_of(
    event: Option<JobEvent>,
    pending: PendingSubscriptionSink,
) -> Option<(Option<JobEvent>, SubscriptionSink)> {
    if let Some(Err(err)) = event {
        pending.reject(ApiError::Job(err)).await;
        return None;
    }
    Some((event, pending.accept().await.ok()?))
}

/// Sends one event; false when the client is gone.
async fn send(sink: &SubscriptionSink, event: GenerateEvent) -> bool {
    let Ok(message) = serde_json::value::to_raw_value(&event) else {
        return false;
    };
    sink.send(message).await.is_ok()
}

/// The event as the client gets it: a job's error takes wire form here.
fn as_wire(event: JobEvent) -> GenerateEvent {
    event.unwrap_or_else(|err| GenerateEvent::Error {
        done: true,
        error: wire_object(&ApiError::Job(err)),
    })
}

/// Validates and queues the request. With neither `model` nor `mode` it
/// runs in the mode that will be current when its turn comes.
/// Also says whether the client asked to hear its place in the queue.
fn submit(
    params: &Params<'static>,
    state: &AppState,
) -> Result<(u64, mpsc::Receiver<JobEvent>, bool), ApiError> {
    let params: GenerateParams = decode_params(params)?;
    let queue_events = params.queue_events.unwrap_or(false);
    let (job, receiver) = submit_params(params, state)?;
    Ok((job, receiver, queue_events))
}

fn submit_params(
    params: GenerateParams,
    state: &AppState,
) -> Result<(u64, mpsc::Receiver<JobEvent>), ApiError> {
    let capacity = state.config().scheduler.queue_size;
    if params.model.is_empty() && params.mode.is_none() {
        return state.scheduler.submit_generate_with(capacity, |effective| {
            let mode = effective.ok_or_else(|| {
                ValidationError::new(
                    "model",
                    "give a model or a mode: no mode is current or queued to run in",
                )
            })?;
            validate(
                GenerateParams {
                    mode: Some(mode),
                    ..params
                },
                state,
            )
        });
    }
    let (request, mode) = validate(params, state)?;
    let policy = state.config().modes.auto_switch;
    state.scheduler.submit_generate_with(capacity, |effective| {
        may_switch(policy, effective.as_deref(), mode.as_deref())?;
        Ok::<_, ApiError>((request, mode))
    })
}

/// Refuses a request that would switch the daemon's mode when
/// `modes.auto_switch` keeps switching to administrators.
fn may_switch(
    policy: AutoSwitch,
    effective: Option<&str>,
    wanted: Option<&str>,
) -> Result<(), ApiError> {
    let switches = wanted.is_some_and(|wanted| effective != Some(wanted));
    let caller = crate::auth::current();
    let admin = caller.as_ref().is_none_or(|caller| caller.admin);
    if !switches || admin || policy == AutoSwitch::Everyone {
        return Ok(());
    }
    Err(ApiError::Forbidden(Forbidden {
        method: modeld_wire::methods::GENERATE.to_string(),
        uid: caller.map_or(0, |caller| caller.uid),
        why: "it names a mode other than the current one, and modes.auto_switch = \"admin\" lets only administrators switch modes",
    }))
}

/// Checks the request; a `mode` supplies the model and default parameters.
fn validate(
    mut params: GenerateParams,
    state: &AppState,
) -> Result<(ValidRequest, Option<String>), ApiError> {
    let mode = match params.mode.take() {
        Some(name) => {
            let mode = state.mode(&name)?;
            let key = mode.model_key();
            if !params.model.is_empty() && params.model != key && params.model != mode.model_text {
                return Err(ValidationError::new(
                    "model",
                    format!(
                        "mode {name:?} runs {:?}; leave model out or name that one",
                        mode.model_text
                    ),
                )
                .into());
            }
            // Validated under the mode's name; the engine key (which uses
            // '+' so it can never clash with a registered name) is set after.
            params.model = name.clone();
            Some((name, key, mode.defaults, mode.image_defaults))
        }
        None => {
            // Unknown models are refused before anything is queued.
            state
                .registry
                .get(&valid_name(&params.model).map_err(|mut e| {
                    e.field = "model".into();
                    e
                })?)?;
            None
        }
    };
    let mut request = match &mode {
        Some((_, _, text, image)) => ValidRequest::new(params, text, image)?,
        None => ValidRequest::try_from(params)?,
    };
    let max_job_s = state.config().scheduler.max_job_s;
    request.set_image_limits(&state.image_output_dir(), max_job_s);
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let mode = mode.map(|(name, key, _, _)| {
        request.set_model(key);
        name
    });
    Ok((request, mode))
}
