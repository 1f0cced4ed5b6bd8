//! OpenAI's request and reply shapes, translated to and from `generate`.
//! A request is read as a JSON object first: parameters modeld does not
//! support are refused by name (400, `param` naming them) unless they hold
//! the value that changes nothing (`n: 1`, `frequency_penalty: 0`, ...),
//! and any other unknown field is refused too, so nothing is silently
//! ignored. What remains becomes `generate` parameters, which the daemon
//! validates as it does for JSON-RPC.

use modeld_wire::types::{FinishReason, GenerateEvent, ImagesDone};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::HttpError;
use crate::state::AppState;

/// A request body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, HttpError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HttpError::bad_param(
            "body",
            "the body must be a JSON object",
        )),
        Err(err) => Err(HttpError::bad_param("body", format!("invalid JSON: {err}"))),
    }
}

/// A parameter modeld does not implement, and the values that ask for
/// nothing beyond what it does (a client library may always send them).
struct Unsupported {
    name: &'static str,
    neutral: fn(&Value) -> bool,
}

fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}
fn is_zero(v: &Value) -> bool {
    v.as_f64() == Some(0.0)
}
fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}
fn is_empty(v: &Value) -> bool {
    v.as_array().is_some_and(Vec::is_empty) || v.as_object().is_some_and(Map::is_empty)
}
fn is_text_format(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("text")
}
fn is_none_choice(v: &Value) -> bool {
    v.as_str() == Some("none")
}
fn never(_: &Value) -> bool {
    false
}

const CHAT_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "n",
        neutral: is_one,
    },
    Unsupported {
        name: "frequency_penalty",
        neutral: is_zero,
    },
    Unsupported {
        name: "presence_penalty",
        neutral: is_zero,
    },
    Unsupported {
        name: "logprobs",
        neutral: is_false,
    },
    Unsupported {
        name: "top_logprobs",
        neutral: is_zero,
    },
    Unsupported {
        name: "logit_bias",
        neutral: is_empty,
    },
    Unsupported {
        name: "tools",
        neutral: is_empty,
    },
    Unsupported {
        name: "tool_choice",
        neutral: is_none_choice,
    },
    Unsupported {
        name: "parallel_tool_calls",
        neutral: never,
    },
    Unsupported {
        name: "functions",
        neutral: is_empty,
    },
    Unsupported {
        name: "function_call",
        neutral: is_none_choice,
    },
    Unsupported {
        name: "response_format",
        neutral: is_text_format,
    },
    Unsupported {
        name: "audio",
        neutral: never,
    },
    Unsupported {
        name: "modalities",
        neutral: never,
    },
    Unsupported {
        name: "prediction",
        neutral: never,
    },
];

const COMPLETION_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "n",
        neutral: is_one,
    },
    Unsupported {
        name: "best_of",
        neutral: is_one,
    },
    Unsupported {
        name: "echo",
        neutral: is_false,
    },
    Unsupported {
        name: "frequency_penalty",
        neutral: is_zero,
    },
    Unsupported {
        name: "presence_penalty",
        neutral: is_zero,
    },
    Unsupported {
        name: "logprobs",
        neutral: is_zero,
    },
    Unsupported {
        name: "logit_bias",
        neutral: is_empty,
    },
    Unsupported {
        name: "suffix",
        neutral: never,
    },
];

const IMAGE_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        name: "quality",
        neutral: |v| matches!(v.as_str(), Some("auto" | "standard")),
    },
    Unsupported {
        name: "style",
        neutral: never,
    },
    Unsupported {
        name: "background",
        neutral: |v| v.as_str() == Some("auto"),
    },
    Unsupported {
        name: "moderation",
        neutral: never,
    },
    Unsupported {
        name: "output_format",
        neutral: |v| v.as_str() == Some("png"),
    },
    Unsupported {
        name: "output_compression",
        neutral: never,
    },
    Unsupported {
        name: "mask",
        neutral: never,
    },
    Unsupported {
        name: "input_fidelity",
        neutral: never,
    },
];

/// Drops nulls and neutral values of unsupported parameters, and refuses
/// the first unsupported parameter that asks for something.
fn refuse_unsupported(
    map: &mut Map<String, Value>,
    table: &[Unsupported],
) -> Result<(), HttpError> {
    map.retain(|_, value| !value.is_null());
    for entry in table {
        let Some(value) = map.get(entry.name) else {
            continue;
        };
        if !(entry.neutral)(value) {
            return Err(HttpError::bad_param(
                entry.name,
                format!("modeld does not support {} = {value}", entry.name),
            ));
        }
        map.remove(entry.name);
    }
    Ok(())
}

/// Decodes what is left; an unknown or mistyped field is refused by name.
fn decode<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, HttpError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|err| {
        let path = err.path().to_string();
        let message = err.inner().to_string();
        let param = match path.as_str() {
            "." => message.split('`').nth(1).unwrap_or("body").to_string(),
            _ => path,
        };
        HttpError::bad_param(param, message)
    })
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(one) => vec![one],
            Stop::Many(many) => many,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completion requests share (serde cannot refuse unknown
/// fields through `flatten`, so each request lists them).
struct Sampling {
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<Stop>,
    seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    /// An end-user id for abuse tracking; modeld knows its callers.
    #[serde(default, rename = "user")]
    _user: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<Stop>,
    seed: Option<u64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// A message's content: text, or parts of which only text ones are read.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: Option<Stop>,
    seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// The shared fields of a chat or completion request.
macro_rules! common_of {
    ($request:expr) => {
        Common {
            model: $request.model,
            stream: $request.stream,
            stream_options: $request.stream_options,
            sampling: Sampling {
                max_tokens: $request.max_tokens,
                max_completion_tokens: $request.max_completion_tokens,
                temperature: $request.temperature,
                top_p: $request.top_p,
                stop: $request.stop,
                seed: $request.seed,
            },
        }
    };
}

/// Which OpenAI endpoint a text generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Chat,
    Completion,
}

/// A text generation to run: `generate` parameters and how to answer.
pub struct TextCall {
    pub flavour: Flavour,
    pub params: Value,
    /// The model or mode name the client gave, echoed in replies.
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
}

/// `model` as `generate` takes it: a mode's name goes in `mode`.
fn target(state: &AppState, name: &str) -> (&'static str, Value) {
    let is_mode = state.loaded_modes().modes.modes.contains_key(name);
    (if is_mode { "mode" } else { "model" }, json!(name))
}

pub fn chat(state: &AppState, body: &[u8]) -> Result<TextCall, HttpError> {
    let mut map = object(body)?;
    refuse_unsupported(&mut map, CHAT_UNSUPPORTED)?;
    let request: ChatRequest = decode(map)?;
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.into_iter().enumerate() {
        let content = message.content.text(i)?;
        messages.push(json!({"role": message.role, "content": content}));
    }
    let input = ("messages", Value::Array(messages));
    text_call(state, Flavour::Chat, common_of!(request), input)
}

pub fn completion(state: &AppState, body: &[u8]) -> Result<TextCall, HttpError> {
    let mut map = object(body)?;
    refuse_unsupported(&mut map, COMPLETION_UNSUPPORTED)?;
    let request: CompletionRequest = decode(map)?;
    let prompt = match request.prompt {
        Prompt::One(prompt) => prompt,
        Prompt::Many(mut many) if many.len() == 1 => many.remove(0),
        Prompt::Many(_) => {
            return Err(HttpError::bad_param(
                "prompt",
                "modeld takes one prompt per request",
            ))
        }
    };
    let input = ("prompt", json!(prompt));
    text_call(state, Flavour::Completion, common_of!(request), input)
}

/// What chat and completion requests share beside their input.
struct Common {
    model: String,
    stream: bool,
    stream_options: Option<StreamOptions>,
    sampling: Sampling,
}

/// A text generation from a request's shared fields and its input
/// (`messages` or `prompt`) under its `generate` name.
fn text_call(
    state: &AppState,
    flavour: Flavour,
    common: Common,
    (name, input): (&str, Value),
) -> Result<TextCall, HttpError> {
    let mut params = sampling(common.sampling)?;
    params.insert(name.into(), input);
    let (key, value) = target(state, &common.model);
    params.insert(key.into(), value);
    Ok(TextCall {
        flavour,
        params: Value::Object(params),
        model: common.model,
        stream: common.stream,
        include_usage: common.stream_options.unwrap_or_default().include_usage,
    })
}

impl Content {
    fn text(self, index: usize) -> Result<String, HttpError> {
        let parts = match self {
            Content::Text(text) => return Ok(text),
            Content::Parts(parts) => parts,
        };
        let mut text = String::new();
        for part in parts {
            match (part.kind.as_str(), part.text) {
                ("text", Some(piece)) => text.push_str(&piece),
                (kind, _) => {
                    return Err(HttpError::bad_param(
                        format!("messages[{index}].content"),
                        format!("modeld reads only text content parts, not {kind:?}"),
                    ))
                }
            }
        }
        Ok(text)
    }
}

/// Sampling parameters under their `generate` names.
fn sampling(sampling: Sampling) -> Result<Map<String, Value>, HttpError> {
    let mut params = Map::new();
    let max_tokens = match (sampling.max_tokens, sampling.max_completion_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(HttpError::bad_param(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens disagree; give one",
            ))
        }
        (a, b) => a.or(b),
    };
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            params.insert(key.to_string(), value);
        }
    };
    put("max_tokens", max_tokens.map(|n| json!(n)));
    put("temperature", sampling.temperature.map(|t| json!(t)));
    put("top_p", sampling.top_p.map(|p| json!(p)));
    put("seed", sampling.seed.map(|s| json!(s)));
    put("stop", sampling.stop.map(|s| json!(s.into_vec())));
    Ok(params)
}

/// OpenAI's finish reasons: an end-of-sequence token and a stop string
/// are both `stop`. A generation cancelled by an administrator ended
/// early too, which `stop` describes best among OpenAI's reasons.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// What a finished text generation reports.
pub struct Finished {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

impl Finished {
    /// The final event, if it is a text one.
    pub fn of(event: GenerateEvent) -> Option<Finished> {
        match event {
            GenerateEvent::Done {
                text,
                prompt_tokens,
                completion_tokens,
                finish_reason,
                ..
            } => Some(Finished {
                text,
                prompt_tokens,
                completion_tokens,
                finish_reason,
            }),
            _ => None,
        }
    }

    pub fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// Identifies a reply: the endpoint's prefix and the job's id.
pub struct Reply<'a> {
    pub flavour: Flavour,
    pub id: String,
    pub created: u64,
    pub model: &'a str,
}

impl Reply<'_> {
    /// The whole answer of a request that did not stream.
    pub fn complete(&self, done: &Finished) -> Value {
        let reason = finish_reason(done.finish_reason);
        let choice = match self.flavour {
            Flavour::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Flavour::Completion => json!({
                "index": 0, "text": done.text, "logprobs": null, "finish_reason": reason,
            }),
        };
        self.envelope(false, vec![choice], Some(done.usage()))
    }

    /// One streamed piece: text, the end (`finish`), or the usage alone.
    pub fn chunk(&self, text: Option<&str>, finish: Option<FinishReason>) -> Value {
        let reason = finish.map(finish_reason);
        let choice = match self.flavour {
            Flavour::Chat => {
                let delta = match text {
                    Some(text) => json!({"content": text}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Flavour::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason,
            }),
        };
        self.envelope(true, vec![choice], None)
    }

    /// The chat stream's first chunk, which names the role.
    pub fn role_chunk(&self) -> Value {
        let choice = json!({
            "index": 0, "delta": {"role": "assistant", "content": ""},
            "logprobs": null, "finish_reason": null,
        });
        self.envelope(true, vec![choice], None)
    }

    /// `stream_options.include_usage`: a last chunk with no choices.
    pub fn usage_chunk(&self, done: &Finished) -> Value {
        self.envelope(true, Vec::new(), Some(done.usage()))
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let object = match (self.flavour, chunk) {
            (Flavour::Chat, false) => "chat.completion",
            (Flavour::Chat, true) => "chat.completion.chunk",
            (Flavour::Completion, _) => "text_completion",
        };
        let mut reply = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(usage) = usage {
            reply["usage"] = usage;
        } else if chunk {
            reply["usage"] = Value::Null;
        }
        reply
    }
}

/// `/v1/images/generations` and `/v1/images/edits`: OpenAI's fields and
/// modeld's own (`steps`, `guidance`, `seed`, `negative_prompt`,
/// `scheduler`, and `strength` for edits).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRequest {
    prompt: String,
    model: Option<String>,
    n: Option<u32>,
    size: Option<String>,
    response_format: Option<String>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
    steps: Option<u32>,
    guidance: Option<f64>,
    seed: Option<u64>,
    negative_prompt: Option<String>,
    scheduler: Option<String>,
    strength: Option<f64>,
}

/// `generate` parameters for an image request; `init_image` (base64 PNG)
/// makes it img2img. Pictures always come back inline, as `b64_json`.
pub fn image(
    state: &AppState,
    mut map: Map<String, Value>,
    init_image: Option<String>,
) -> Result<Value, HttpError> {
    refuse_unsupported(&mut map, IMAGE_UNSUPPORTED)?;
    if init_image.is_none() && map.contains_key("strength") {
        return Err(HttpError::bad_param(
            "strength",
            "strength goes with an image to edit",
        ));
    }
    let request: ImageRequest = decode(map)?;
    if let Some(format) = request
        .response_format
        .as_deref()
        .filter(|f| *f != "b64_json")
    {
        return Err(HttpError::bad_param(
            "response_format",
            format!("modeld returns pictures inline: use b64_json, not {format:?}"),
        ));
    }
    let mut params = json!({
        "prompt": request.prompt,
        "inline": true,
        "count": request.n,
        "size": request.size,
        "steps": request.steps,
        "guidance": request.guidance,
        "seed": request.seed,
        "negative_prompt": request.negative_prompt,
        "scheduler": request.scheduler,
        "init_image": init_image,
        "strength": request.strength,
    });
    let Value::Object(fields) = &mut params else {
        unreachable!("a JSON object literal")
    };
    fields.retain(|_, value| !value.is_null());
    // Without a model the request runs in the current mode, as in JSON-RPC.
    if let Some(model) = &request.model {
        let (key, value) = target(state, model);
        fields.insert(key.into(), value);
    }
    Ok(params)
}

/// The images reply: every picture's PNG as base64.
pub fn images_reply(done: ImagesDone) -> Value {
    let data: Vec<Value> = done
        .images
        .into_iter()
        .map(|image| json!({"b64_json": image.base64.unwrap_or_default()}))
        .collect();
    json!({"created": crate::util::unix_now(), "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neutral_values_pass_and_others_are_named() {
        let mut map = object(
            br#"{"n": 1, "frequency_penalty": 0, "logprobs": false, "tools": [], "user": null}"#,
        )
        .unwrap();
        refuse_unsupported(&mut map, CHAT_UNSUPPORTED).unwrap();
        assert!(map.is_empty(), "{map:?}");
        for (body, param) in [
            (r#"{"n": 2}"#, "n"),
            (r#"{"tools": [{"type": "function"}]}"#, "tools"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (
                r#"{"response_format": {"type": "json_schema"}}"#,
                "response_format",
            ),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
        ] {
            let mut map = object(body.as_bytes()).unwrap();
            let err = refuse_unsupported(&mut map, CHAT_UNSUPPORTED).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let map = object(br#"{"model": "m", "messages": [], "bogus": 1}"#).unwrap();
        let err = decode::<ChatRequest>(map).err().expect("refused");
        assert_eq!(err.param.as_deref(), Some("bogus"), "{}", err.message);
        let map = object(br#"{"model": "m", "messages": [], "temperature": "hot"}"#).unwrap();
        let err = decode::<ChatRequest>(map).err().expect("refused");
        assert_eq!(err.param.as_deref(), Some("temperature"), "{}", err.message);
    }
}
