//! What a runner says it accepts, and a `generate` request checked against
//! it: a parameter the runner does not declare, a value of the wrong type
//! or past a limit is refused naming the field and the limit, before the
//! runner ever sees it.

use std::collections::BTreeMap;

use base64::Engine as _;
use modeld_wire::types::GenerateParams;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::validate::ValidationError;

/// One declared parameter (see runners/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub kind: ParamKind,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub multiple_of: Option<u64>,
    pub max_pixels: Option<u64>,
    pub max_length: Option<usize>,
    pub max_items: Option<usize>,
    pub choices: Option<Vec<String>>,
    #[serde(default)]
    pub required: bool,
    pub default: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    String,
    Integer,
    Number,
    Boolean,
    Size,
    Image,
    Images,
}

/// A runner's declaration: parameter name → spec.
pub type Declared = BTreeMap<String, ParamSpec>;

/// Parameters that are fields of `generate` itself, never `options`.
const STANDARD: [&str; 21] = [
    "prompt",
    "negative_prompt",
    "size",
    "steps",
    "guidance",
    "seed",
    "count",
    "scheduler",
    "init_image",
    "strength",
    "max_sequence_length",
    "frames",
    "inline",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repeat_penalty",
    "repeat_last_n",
    "stop",
];

/// The most base64 characters one picture may have (48 MiB of PNG).
const MAX_PICTURE_CHARS: usize = 64 << 20;

/// The request's parameters as a runner receives them: the standard ones
/// from their fields, the rest from `options`; `seed` and `count` always.
pub fn runner_params(
    params: &GenerateParams,
    seed: u64,
    declared: &Declared,
) -> Result<Map<String, Value>, ValidationError> {
    let mut given = standard_params(params);
    for (name, value) in params.options.iter().flatten() {
        if STANDARD.contains(&name.as_str()) {
            return Err(ValidationError::new(
                format!("options.{name}"),
                format!("{name} is a parameter of its own; set it outside options"),
            ));
        }
        given.insert(name.clone(), value.clone());
    }
    given.insert("seed".into(), json!(seed));
    given.entry("count".to_string()).or_insert(json!(1));
    for (name, value) in &given {
        let spec = declared
            .get(name)
            .ok_or_else(|| undeclared(name, declared))?;
        check(name, value, spec)?;
    }
    if let Some((name, _)) = declared
        .iter()
        .find(|(name, spec)| spec.required && !given.contains_key(*name))
    {
        return Err(ValidationError::new(
            name.as_str(),
            format!("this model's runner needs {name}"),
        ));
    }
    Ok(given)
}

/// The standard `generate` fields the request set, by name. Text
/// parameters are kept too, so that a runner that does not declare them
/// refuses them by name.
/// `inline` is modeld's own (it answers with the PNG bytes) and is not sent.
fn standard_params(p: &GenerateParams) -> Map<String, Value> {
    let fields = [
        ("prompt", json!(p.prompt)),
        ("negative_prompt", json!(p.negative_prompt)),
        ("size", json!(p.size)),
        ("steps", json!(p.steps)),
        ("guidance", json!(p.guidance)),
        ("count", json!(p.count)),
        ("scheduler", json!(p.scheduler)),
        ("init_image", json!(p.init_image)),
        ("strength", json!(p.strength)),
        ("max_sequence_length", json!(p.max_sequence_length)),
        ("frames", json!(p.frames)),
        ("messages", json!(p.messages)),
        ("max_tokens", json!(p.max_tokens)),
        ("temperature", json!(p.temperature)),
        ("top_p", json!(p.top_p)),
        ("top_k", json!(p.top_k)),
        ("repeat_penalty", json!(p.repeat_penalty)),
        ("repeat_last_n", json!(p.repeat_last_n)),
        ("stop", json!(p.stop)),
    ];
    fields
        .into_iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

fn undeclared(name: &str, declared: &Declared) -> ValidationError {
    let known: Vec<&str> = declared.keys().map(String::as_str).collect();
    ValidationError::new(
        name,
        format!(
            "this model's runner does not take {name}; it takes {}",
            known.join(", ")
        ),
    )
    .with_limit(json!({"accepted": known}))
}

/// Checks one value against its spec.
fn check(name: &str, value: &Value, spec: &ParamSpec) -> Result<(), ValidationError> {
    match spec.kind {
        ParamKind::String => check_string(name, value, spec),
        ParamKind::Integer => check_number(name, value, spec, true),
        ParamKind::Number => check_number(name, value, spec, false),
        ParamKind::Boolean => match value.is_boolean() {
            true => Ok(()),
            false => Err(ValidationError::new(
                name,
                format!("{name} must be true or false"),
            )),
        },
        ParamKind::Size => check_size(name, value, spec),
        ParamKind::Image => check_pictures(name, value, spec, false),
        ParamKind::Images => check_pictures(name, value, spec, true),
    }
}

/// The spec's limits as the error's `limit`.
fn limits(spec: &ParamSpec) -> Value {
    let mut limit = Map::new();
    let entries = [
        ("min", spec.min.map(|v| json!(v))),
        ("max", spec.max.map(|v| json!(v))),
        ("multiple_of", spec.multiple_of.map(|v| json!(v))),
        ("max_pixels", spec.max_pixels.map(|v| json!(v))),
        ("max_length", spec.max_length.map(|v| json!(v))),
        ("max_items", spec.max_items.map(|v| json!(v))),
        ("choices", spec.choices.as_ref().map(|v| json!(v))),
    ];
    for (key, value) in entries {
        if let Some(value) = value {
            limit.insert(key.to_string(), value);
        }
    }
    Value::Object(limit)
}

fn refuse(name: &str, message: String, spec: &ParamSpec) -> ValidationError {
    ValidationError::new(name, message).with_limit(limits(spec))
}

fn check_string(name: &str, value: &Value, spec: &ParamSpec) -> Result<(), ValidationError> {
    let Some(text) = value.as_str() else {
        return Err(refuse(name, format!("{name} must be a string"), spec));
    };
    if let Some(max) = spec.max_length.filter(|max| text.chars().count() > *max) {
        return Err(refuse(
            name,
            format!("{name} is longer than {max} characters"),
            spec,
        ));
    }
    if let Some(choices) = spec
        .choices
        .as_ref()
        .filter(|c| !c.iter().any(|c| c == text))
    {
        return Err(refuse(
            name,
            format!("{name} {text:?} is not one of {}", choices.join(", ")),
            spec,
        ));
    }
    Ok(())
}

fn check_number(
    name: &str,
    value: &Value,
    spec: &ParamSpec,
    integer: bool,
) -> Result<(), ValidationError> {
    let number = match (integer, value) {
        (true, Value::Number(n)) if n.is_u64() || n.is_i64() => n.as_f64(),
        (false, Value::Number(n)) => n.as_f64(),
        _ => None,
    };
    let kind = if integer { "an integer" } else { "a number" };
    let Some(number) = number.filter(|n| n.is_finite()) else {
        return Err(refuse(name, format!("{name} must be {kind}"), spec));
    };
    check_range(name, number, spec)?;
    let multiple = spec.multiple_of.filter(|m| *m > 0);
    if let Some(multiple) = multiple.filter(|m| integer && !(number as u64).is_multiple_of(*m)) {
        return Err(refuse(
            name,
            format!("{name} {number} is not a multiple of {multiple}"),
            spec,
        ));
    }
    Ok(())
}

fn check_range(name: &str, number: f64, spec: &ParamSpec) -> Result<(), ValidationError> {
    let below = spec.min.is_some_and(|min| number < min);
    let above = spec.max.is_some_and(|max| number > max);
    if below || above {
        let range = match (spec.min, spec.max) {
            (Some(min), Some(max)) => format!("{min} to {max}"),
            (Some(min), None) => format!("at least {min}"),
            (None, Some(max)) => format!("at most {max}"),
            (None, None) => String::new(),
        };
        return Err(refuse(
            name,
            format!("{name} {number} is out of range ({range})"),
            spec,
        ));
    }
    Ok(())
}

fn check_size(name: &str, value: &Value, spec: &ParamSpec) -> Result<(), ValidationError> {
    let parsed = value.as_str().and_then(|size| {
        let (w, h) = size.split_once(['x', 'X'])?;
        Some((w.trim().parse::<u64>().ok()?, h.trim().parse::<u64>().ok()?))
    });
    let Some((width, height)) = parsed else {
        return Err(refuse(
            name,
            format!("{name} must be WIDTHxHEIGHT, such as \"512x512\""),
            spec,
        ));
    };
    for (side, length) in [("width", width), ("height", height)] {
        check_range(name, length as f64, spec).map_err(|mut err| {
            err.message = format!("{side} {}", err.message);
            err
        })?;
        if let Some(multiple) = spec.multiple_of.filter(|m| *m > 0 && length % m != 0) {
            return Err(refuse(
                name,
                format!("{side} {length} is not a multiple of {multiple}"),
                spec,
            ));
        }
    }
    if let Some(max) = spec.max_pixels.filter(|max| width * height > *max) {
        return Err(refuse(
            name,
            format!("{width}x{height} is more than {max} pixels"),
            spec,
        ));
    }
    Ok(())
}

/// One base64 PNG, or (for `images`) a list of them: each must be a PNG
/// whose header fits `max_pixels`.
fn check_pictures(
    name: &str,
    value: &Value,
    spec: &ParamSpec,
    many: bool,
) -> Result<(), ValidationError> {
    let pictures: Vec<&Value> = match value {
        Value::Array(items) if many => items.iter().collect(),
        Value::Array(_) => {
            return Err(refuse(
                name,
                format!("{name} takes one picture for this model, not a list"),
                spec,
            ))
        }
        other => vec![other],
    };
    if pictures.is_empty() {
        return Err(refuse(name, format!("{name} is an empty list"), spec));
    }
    if let Some(max) = spec.max_items.filter(|max| pictures.len() > *max) {
        return Err(refuse(
            name,
            format!("{name} has {} pictures; at most {max}", pictures.len()),
            spec,
        ));
    }
    for (index, picture) in pictures.into_iter().enumerate() {
        let field = if many && value.is_array() {
            format!("{name}[{index}]")
        } else {
            name.to_string()
        };
        check_picture(&field, picture, spec)?;
    }
    Ok(())
}

fn check_picture(field: &str, value: &Value, spec: &ParamSpec) -> Result<(), ValidationError> {
    let Some(text) = value.as_str() else {
        return Err(refuse(field, format!("{field} must be a base64 PNG"), spec));
    };
    if text.len() > MAX_PICTURE_CHARS {
        return Err(ValidationError::new(
            field,
            format!("{field} is longer than {MAX_PICTURE_CHARS} base64 characters"),
        )
        .with_limit(json!({"max_length": MAX_PICTURE_CHARS})));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| refuse(field, format!("{field} is not base64: {e}"), spec))?;
    let (width, height) = png_size(&bytes)
        .ok_or_else(|| refuse(field, format!("{field} is not a PNG picture"), spec))?;
    if let Some(max) = spec.max_pixels.filter(|max| width * height > *max) {
        return Err(refuse(
            field,
            format!("{field} is {width}x{height}, more than {max} pixels"),
            spec,
        ));
    }
    Ok(())
}

/// A PNG's width and height from its header, without decoding it.
pub fn png_size(bytes: &[u8]) -> Option<(u64, u64)> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    Some((info.width as u64, info.height as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Declared {
        serde_json::from_value(json!({
            "prompt": {"type": "string", "max_length": 10, "required": true},
            "size": {"type": "size", "min": 16, "max": 256, "multiple_of": 16, "max_pixels": 16384},
            "steps": {"type": "integer", "min": 1, "max": 10},
            "guidance": {"type": "number", "min": 0, "max": 20},
            "seed": {"type": "integer", "min": 0},
            "count": {"type": "integer", "min": 1, "max": 4},
            "shift": {"type": "number", "min": 0, "max": 10},
            "init_image": {"type": "images", "max_items": 2, "max_pixels": 64}
        }))
        .unwrap()
    }

    fn request(extra: Value) -> GenerateParams {
        let mut value = json!({"model": "m", "prompt": "a cat"});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    fn refused(extra: Value) -> ValidationError {
        runner_params(&request(extra.clone()), 7, &declared()).expect_err(&extra.to_string())
    }

    fn tiny_png(width: u32, height: u32) -> String {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer
            .write_image_data(&vec![0; (width * height * 3) as usize])
            .unwrap();
        drop(writer);
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_request_within_the_declaration_gets_seed_and_count() {
        let extra = json!({"size": "48x32", "steps": 3, "options": {"shift": 2.5}});
        let sent = runner_params(&request(extra), 7, &declared()).unwrap();
        assert_eq!(sent["seed"], 7);
        assert_eq!(sent["count"], 1);
        assert_eq!(sent["shift"], 2.5);
        assert_eq!(sent["size"], "48x32");
    }

    #[test]
    fn each_limit_is_named_with_its_field() {
        let cases = [
            (json!({"steps": 11}), "steps", "max"),
            (json!({"steps": 0}), "steps", "min"),
            (json!({"guidance": 20.5}), "guidance", "max"),
            (json!({"size": "40x32"}), "size", "multiple_of"),
            (json!({"size": "272x16"}), "size", "max"),
            (json!({"size": "256x256"}), "size", "max_pixels"),
            (json!({"count": 5}), "count", "max"),
            (
                json!({"prompt": "a very long prompt"}),
                "prompt",
                "max_length",
            ),
            (json!({"options": {"shift": 11}}), "shift", "max"),
        ];
        for (extra, field, limit) in cases {
            let err = refused(extra.clone());
            assert_eq!(err.field, field, "{extra}: {err:?}");
            let given = err.limit.as_ref().and_then(|l| l.get(limit));
            assert!(given.is_some(), "{extra}: {err:?}");
        }
    }

    #[test]
    fn undeclared_parameters_are_refused_by_name() {
        assert_eq!(refused(json!({"strength": 0.5})).field, "strength");
        assert_eq!(refused(json!({"max_tokens": 5})).field, "max_tokens");
        assert_eq!(refused(json!({"options": {"flow": 1}})).field, "flow");
        let err = refused(json!({"options": {"steps": 2}}));
        assert_eq!(err.field, "options.steps");
    }

    #[test]
    fn pictures_are_checked_one_by_one() {
        let ok = json!({"init_image": [tiny_png(8, 8), tiny_png(4, 4)]});
        runner_params(&request(ok), 1, &declared()).unwrap();
        let big = json!({"init_image": [tiny_png(4, 4), tiny_png(9, 8)]});
        assert_eq!(refused(big).field, "init_image[1]");
        let three = json!({"init_image": [tiny_png(1, 1), tiny_png(1, 1), tiny_png(1, 1)]});
        assert_eq!(refused(three).field, "init_image");
        assert_eq!(
            refused(json!({"init_image": "bm90IGEgcG5n"})).field,
            "init_image"
        );
    }

    #[test]
    fn a_required_parameter_must_be_given() {
        let params = GenerateParams {
            model: "m".into(),
            ..Default::default()
        };
        let err = runner_params(&params, 1, &declared()).unwrap_err();
        assert_eq!(err.field, "prompt");
    }
}
