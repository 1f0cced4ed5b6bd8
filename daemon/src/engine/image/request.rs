//! An image request as the client sent it, and its validated form: every
//! later step may trust `ValidImageRequest`'s sizes, steps and guidance.

use serde_json::json;

use crate::validate::ValidationError;

pub const MIN_SIDE: u32 = 8;
pub const MAX_SIDE: u32 = 2048;
pub const SIDE_MULTIPLE: u32 = 8;
pub const MAX_STEPS: u32 = 150;
pub const MAX_GUIDANCE: f64 = 100.0;
pub const MAX_COUNT: u32 = 8;
pub const MAX_PROMPT_CHARS: usize = 8192;
/// What an image request gets when neither it nor its mode says otherwise.
pub const DEFAULT_SIZE: &str = "512x512";
pub const DEFAULT_STEPS: u32 = 4;
pub const DEFAULT_GUIDANCE: f64 = 1.0;

/// An image request before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f64,
    pub seed: u64,
    pub count: u32,
}

/// An image request whose every field is within its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub count: usize,
}

impl ValidImageRequest {
    /// Whether the UNet runs on [uncond, prompt] pairs (diffusers: guidance > 1).
    pub fn classifier_free_guidance(&self) -> bool {
        self.guidance > 1.0
    }
}

fn rejected(field: &str, message: String, limit: serde_json::Value) -> ValidationError {
    ValidationError {
        field: field.into(),
        message,
        limit: Some(limit),
    }
}

fn check_side(field: &str, value: u32) -> Result<usize, ValidationError> {
    if !(MIN_SIDE..=MAX_SIDE).contains(&value) || !value.is_multiple_of(SIDE_MULTIPLE) {
        return Err(rejected(
            field,
            format!(
                "{value} must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}"
            ),
            json!({"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": SIDE_MULTIPLE}),
        ));
    }
    Ok(value as usize)
}

fn check_range(field: &str, value: u32, max: u32) -> Result<usize, ValidationError> {
    if !(1..=max).contains(&value) {
        return Err(rejected(
            field,
            format!("{value} must be between 1 and {max}"),
            json!({"min": 1, "max": max}),
        ));
    }
    Ok(value as usize)
}

fn check_text(field: &str, value: &str) -> Result<(), ValidationError> {
    let chars = value.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(rejected(
            field,
            format!("{chars} characters, more than {MAX_PROMPT_CHARS}"),
            json!({"max": MAX_PROMPT_CHARS}),
        ));
    }
    Ok(())
}

fn check_guidance(value: f64) -> Result<f64, ValidationError> {
    if !value.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&value) {
        return Err(rejected(
            "guidance",
            format!("{value} must be between 0 and {MAX_GUIDANCE}"),
            json!({"min": 0, "max": MAX_GUIDANCE}),
        ));
    }
    Ok(value)
}

impl TryFrom<ImageRequest> for ValidImageRequest {
    type Error = ValidationError;

    fn try_from(request: ImageRequest) -> Result<Self, ValidationError> {
        check_text("prompt", &request.prompt)?;
        if let Some(negative) = &request.negative_prompt {
            check_text("negative_prompt", negative)?;
        }
        Ok(ValidImageRequest {
            width: check_side("width", request.width)?,
            height: check_side("height", request.height)?,
            steps: check_range("steps", request.steps, MAX_STEPS)?,
            guidance: check_guidance(request.guidance)?,
            count: check_range("count", request.count, MAX_COUNT)?,
            prompt: request.prompt,
            negative_prompt: request.negative_prompt,
            seed: request.seed,
        })
    }
}

/// A generation for an image model's worker: the pipeline's request, the
/// model it names, where its pictures go and whether they come back inline.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidImage {
    pub model: String,
    pub request: ValidImageRequest,
    pub inline: bool,
    pub output_dir: std::path::PathBuf,
}

/// `"WxH"` as `(width, height)`; anything else is refused naming `size`.
pub fn parse_size(size: &str) -> Result<(u32, u32), ValidationError> {
    let parsed = size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.ok_or_else(|| {
        rejected(
            "size",
            format!("{size:?} is not WIDTHxHEIGHT, such as \"512x512\""),
            json!({"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": SIDE_MULTIPLE}),
        )
    })
}

impl ValidImage {
    /// Validates the image side of `generate` parameters; sizes are
    /// refused under the name the client used, `size`. The caller sets
    /// `output_dir`.
    pub fn from_params(
        params: &modeld_wire::types::GenerateParams,
        model: String,
        seed: u64,
    ) -> Result<Self, ValidationError> {
        let prompt = params
            .prompt
            .clone()
            .ok_or_else(|| ValidationError::new("prompt", "an image model needs a prompt"))?;
        let (width, height) = parse_size(params.size.as_deref().unwrap_or(DEFAULT_SIZE))?;
        let request = ImageRequest {
            prompt,
            negative_prompt: params.negative_prompt.clone(),
            width,
            height,
            steps: params.steps.unwrap_or(DEFAULT_STEPS),
            guidance: params.guidance.unwrap_or(DEFAULT_GUIDANCE),
            seed,
            count: params.count.unwrap_or(1),
        };
        let request = ValidImageRequest::try_from(request).map_err(|mut err| {
            if err.field == "width" || err.field == "height" {
                err.message = format!("{} {}", err.field, err.message);
                err.field = "size".into();
            }
            err
        })?;
        Ok(ValidImage {
            model,
            request,
            inline: params.inline.unwrap_or(false),
            output_dir: std::path::PathBuf::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ImageRequest {
        ImageRequest {
            prompt: "a cat".into(),
            negative_prompt: None,
            width: 512,
            height: 512,
            steps: 30,
            guidance: 7.5,
            seed: 1,
            count: 1,
        }
    }

    fn refused(change: impl FnOnce(&mut ImageRequest)) -> ValidationError {
        let mut r = request();
        change(&mut r);
        ValidImageRequest::try_from(r).expect_err("must be refused")
    }

    #[test]
    fn a_request_within_limits_is_accepted() {
        let valid = ValidImageRequest::try_from(request()).expect("valid");
        assert_eq!(
            (valid.width, valid.height, valid.steps, valid.count),
            (512, 512, 30, 1)
        );
        assert!(valid.classifier_free_guidance());
    }

    type Change = Box<dyn FnOnce(&mut ImageRequest)>;

    #[test]
    fn each_field_out_of_range_is_named_with_its_limit() {
        let cases: [(&str, Change, serde_json::Value); 9] = [
            (
                "width",
                Box::new(|r| r.width = 500),
                json!({"min": 8, "max": 2048, "multiple_of": 8}),
            ),
            (
                "width",
                Box::new(|r| r.width = 4096),
                json!({"min": 8, "max": 2048, "multiple_of": 8}),
            ),
            (
                "height",
                Box::new(|r| r.height = 0),
                json!({"min": 8, "max": 2048, "multiple_of": 8}),
            ),
            (
                "steps",
                Box::new(|r| r.steps = 0),
                json!({"min": 1, "max": 150}),
            ),
            (
                "steps",
                Box::new(|r| r.steps = 151),
                json!({"min": 1, "max": 150}),
            ),
            (
                "guidance",
                Box::new(|r| r.guidance = -0.5),
                json!({"min": 0, "max": 100.0}),
            ),
            (
                "guidance",
                Box::new(|r| r.guidance = f64::NAN),
                json!({"min": 0, "max": 100.0}),
            ),
            (
                "count",
                Box::new(|r| r.count = 9),
                json!({"min": 1, "max": 8}),
            ),
            (
                "negative_prompt",
                Box::new(|r| r.negative_prompt = Some("x".repeat(9000))),
                json!({"max": 8192}),
            ),
        ];
        for (field, change, limit) in cases {
            let error = refused(change);
            assert_eq!(error.field, field, "{error}");
            assert_eq!(error.limit, Some(limit), "{error}");
        }
    }

    #[test]
    fn guidance_of_one_or_less_runs_without_an_unconditional_pass() {
        let mut r = request();
        r.guidance = 1.0;
        assert!(!ValidImageRequest::try_from(r)
            .expect("valid")
            .classifier_free_guidance());
    }
}
