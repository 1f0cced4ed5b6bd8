//! An image request as the client sent it, and its validated form: every
//! later step may trust `ValidImageRequest`'s sizes, steps and guidance.

use base64::Engine as _;
use modeld_wire::types::InitImages;
use serde_json::json;

use super::sd::scheduler::SchedulerKind;
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
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// The most base64 characters an `init_image` may have (12 MiB of PNG).
pub const MAX_INIT_IMAGE_CHARS: usize = 16 << 20;

/// An img2img starting picture: `width × height` RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Which of the parameters that have defaults the client (or its mode)
/// set, so that a family with other defaults (FLUX) applies its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Given {
    pub steps: bool,
    pub guidance: bool,
}

/// The most T5 tokens a request may ask for (FLUX was trained with 512).
pub const MAX_SEQUENCE_LENGTH: u32 = 512;

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
    pub scheduler: Option<String>,
    pub init_image: Option<InitImage>,
    pub strength: Option<f64>,
    pub given: Given,
    /// FLUX: T5's token budget.
    pub max_sequence_length: Option<u32>,
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
    /// `None`: the pipeline's default scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// img2img: the picture, as big as `width × height`.
    pub init_image: Option<InitImage>,
    /// img2img: the fraction of `steps` run from the noised picture.
    pub strength: f64,
    pub given: Given,
    /// FLUX: T5's token budget; `None` for the model's default.
    pub max_sequence_length: Option<usize>,
}

impl ValidImageRequest {
    /// The denoising steps that run: all of them, or for img2img the last
    /// `floor(steps × strength)` (diffusers' `get_timesteps`).
    pub fn steps_run(&self) -> usize {
        match self.init_image {
            None => self.steps,
            Some(_) => ((self.steps as f64 * self.strength) as usize).min(self.steps),
        }
    }

    /// Refuses img2img whose `strength` leaves no step to run. Each family
    /// counts the steps its own way (FLUX keeps the fraction SD floors),
    /// and FLUX's default steps are its own, so the family calls this.
    pub fn check_runs_a_step(&self, steps: usize, steps_run: usize) -> Result<(), ValidationError> {
        if self.init_image.is_none() || steps_run > 0 {
            return Ok(());
        }
        let strength = self.strength;
        Err(rejected(
            "strength",
            format!("{strength} of {steps} steps runs no step; it must be at least 1/steps"),
            json!({"min": 1.0 / steps.max(1) as f64, "max": 1}),
        ))
    }

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

fn check_scheduler(name: Option<&str>) -> Result<Option<SchedulerKind>, ValidationError> {
    let Some(name) = name else {
        return Ok(None);
    };
    SchedulerKind::from_name(name).map(Some).ok_or_else(|| {
        let names = SchedulerKind::names();
        rejected(
            "scheduler",
            format!("{name:?} is not one of {}", names.join(", ")),
            json!({ "one_of": names }),
        )
    })
}

/// `strength` in (0, 1], with at least one step left to run.
fn check_strength(value: f64) -> Result<f64, ValidationError> {
    if !value.is_finite() || value <= 0.0 || value > 1.0 {
        return Err(rejected(
            "strength",
            format!("{value} must be more than 0 and at most 1"),
            json!({"min_exclusive": 0, "max": 1}),
        ));
    }
    Ok(value)
}

/// The picture must be the request's size.
fn check_init_image(image: &InitImage, width: usize, height: usize) -> Result<(), ValidationError> {
    if (image.width as usize, image.height as usize) != (width, height) {
        return Err(rejected(
            "init_image",
            format!(
                "the picture is {}x{} but size is {width}x{height}; leave size out to use the picture's",
                image.width, image.height
            ),
            json!({"width": width, "height": height}),
        ));
    }
    Ok(())
}

impl TryFrom<ImageRequest> for ValidImageRequest {
    type Error = ValidationError;

    fn try_from(request: ImageRequest) -> Result<Self, ValidationError> {
        check_text("prompt", &request.prompt)?;
        if let Some(negative) = &request.negative_prompt {
            check_text("negative_prompt", negative)?;
        }
        let width = check_side("width", request.width)?;
        let height = check_side("height", request.height)?;
        let steps = check_range("steps", request.steps, MAX_STEPS)?;
        let strength = match (&request.init_image, request.strength) {
            (None, Some(_)) => {
                return Err(ValidationError::new(
                    "strength",
                    "strength applies only with an init_image",
                ))
            }
            (None, None) => DEFAULT_STRENGTH,
            (Some(image), strength) => {
                check_init_image(image, width, height)?;
                check_strength(strength.unwrap_or(DEFAULT_STRENGTH))?
            }
        };
        Ok(ValidImageRequest {
            width,
            height,
            steps,
            guidance: check_guidance(request.guidance)?,
            count: check_range("count", request.count, MAX_COUNT)?,
            scheduler: check_scheduler(request.scheduler.as_deref())?,
            max_sequence_length: request
                .max_sequence_length
                .map(|n| check_range("max_sequence_length", n, MAX_SEQUENCE_LENGTH))
                .transpose()?,
            given: request.given,
            prompt: request.prompt,
            negative_prompt: request.negative_prompt,
            seed: request.seed,
            init_image: request.init_image,
            strength,
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
    /// `scheduler.max_job_s` when the request was made: on the CPU, a run
    /// estimated to take longer is refused before it starts.
    pub max_job_s: u64,
}

fn bad_image(message: String) -> ValidationError {
    rejected(
        "init_image",
        message,
        json!({"max_base64_chars": MAX_INIT_IMAGE_CHARS, "max_side": MAX_SIDE}),
    )
}

/// An `init_image`: base64 of an 8- or 16-bit grey, grey-alpha, RGB, RGBA
/// or palette PNG of at most `MAX_SIDE` pixels a side; alpha is dropped
/// (as PIL's `convert("RGB")`).
pub fn decode_init_image(base64: &str) -> Result<InitImage, ValidationError> {
    if base64.len() > MAX_INIT_IMAGE_CHARS {
        return Err(bad_image(format!(
            "{} base64 characters, more than {MAX_INIT_IMAGE_CHARS}",
            base64.len()
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64.trim())
        .map_err(|e| bad_image(format!("not base64: {e}")))?;
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let not_png = |e: png::DecodingError| bad_image(format!("not a PNG: {e}"));
    let mut reader = decoder.read_info().map_err(not_png)?;
    let (width, height) = (reader.info().width, reader.info().height);
    // Checked before the pixels are allocated.
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(bad_image(format!(
            "{width}x{height} pixels, more than {MAX_SIDE} a side"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad_image("the PNG's size overflows".into()))?;
    let mut pixels = vec![0; size];
    let frame = reader.next_frame(&mut pixels).map_err(not_png)?;
    let channels = frame.color_type.samples();
    let rgb = pixels[..frame.buffer_size()]
        .chunks_exact(channels)
        .flat_map(|px| match channels {
            1 | 2 => [px[0], px[0], px[0]],
            _ => [px[0], px[1], px[2]],
        })
        .collect();
    Ok(InitImage { width, height, rgb })
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
        let init_image = match params.init_image.as_ref().map(InitImages::all).as_deref() {
            None => None,
            Some([one]) => Some(decode_init_image(one)?),
            Some(_) => return Err(rejected(
                "init_image",
                "this model takes one starting picture; lists are for edit pipelines on runners"
                    .into(),
                json!({"max_items": 1}),
            )),
        };
        let (width, height) = match (&params.size, &init_image) {
            (Some(size), _) => parse_size(size)?,
            (None, Some(image)) => (image.width, image.height),
            (None, None) => parse_size(DEFAULT_SIZE)?,
        };
        let request = ImageRequest {
            prompt,
            negative_prompt: params.negative_prompt.clone(),
            width,
            height,
            steps: params.steps.unwrap_or(DEFAULT_STEPS),
            guidance: params.guidance.unwrap_or(DEFAULT_GUIDANCE),
            seed,
            count: params.count.unwrap_or(1),
            scheduler: params.scheduler.clone(),
            init_image,
            strength: params.strength,
            given: Given {
                steps: params.steps.is_some(),
                guidance: params.guidance.is_some(),
            },
            max_sequence_length: params.max_sequence_length,
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
            max_job_s: u64::MAX,
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
            scheduler: None,
            init_image: None,
            strength: None,
            given: Given::default(),
            max_sequence_length: None,
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

    fn picture(width: u32, height: u32) -> InitImage {
        InitImage {
            width,
            height,
            rgb: vec![0; (width * height * 3) as usize],
        }
    }

    #[test]
    fn an_unknown_scheduler_is_refused_listing_the_names() {
        let error = refused(|r| r.scheduler = Some("pndm".into()));
        assert_eq!(error.field, "scheduler");
        assert!(
            error
                .message
                .contains("ddim, euler, euler_a, ddpm, dpmpp_2m, unipc"),
            "{error}"
        );
        let mut r = request();
        r.scheduler = Some("euler_a".into());
        let valid = ValidImageRequest::try_from(r).expect("valid");
        assert_eq!(valid.scheduler, Some(SchedulerKind::EulerAncestral));
    }

    #[test]
    fn img2img_checks_strength_and_the_picture_size() {
        let with_picture = |r: &mut ImageRequest| r.init_image = Some(picture(512, 512));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            let error = refused(|r| {
                with_picture(r);
                r.strength = Some(bad);
            });
            assert_eq!(error.field, "strength", "{bad}");
        }
        let mut r = request();
        with_picture(&mut r);
        (r.steps, r.strength) = (4, Some(0.2));
        let none_run = ValidImageRequest::try_from(r).expect("each family counts the steps");
        let error = none_run
            .check_runs_a_step(4, none_run.steps_run())
            .expect_err("SD floors 0.8 steps to none");
        assert_eq!(error.field, "strength");
        assert!(error.message.contains("runs no step"), "{error}");
        assert_eq!(refused(|r| r.strength = Some(0.5)).field, "strength");
        let error = refused(|r| r.init_image = Some(picture(256, 512)));
        assert_eq!(error.field, "init_image");
        let mut r = request();
        with_picture(&mut r);
        r.steps = 10;
        let valid = ValidImageRequest::try_from(r).expect("valid");
        assert_eq!((valid.strength, valid.steps_run()), (DEFAULT_STRENGTH, 7));
    }

    fn png_base64(width: u32, height: u32, color: png::ColorType, pixels: &[u8]) -> String {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(pixels))
            .expect("png");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn init_images_decode_to_rgb_dropping_alpha() {
        let rgba = png_base64(2, 1, png::ColorType::Rgba, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let image = decode_init_image(&rgba).expect("decodes");
        assert_eq!((image.width, image.height), (2, 1));
        assert_eq!(image.rgb, [1, 2, 3, 5, 6, 7]);
        let grey = png_base64(1, 1, png::ColorType::Grayscale, &[9]);
        assert_eq!(decode_init_image(&grey).expect("decodes").rgb, [9, 9, 9]);
    }

    #[test]
    fn bad_init_images_are_refused_naming_the_limit() {
        for bad in [
            "not base64!",
            "aGVsbG8=",
            &"A".repeat(MAX_INIT_IMAGE_CHARS + 4),
        ] {
            let error = decode_init_image(bad).expect_err("refused");
            assert_eq!(error.field, "init_image");
            assert_eq!(
                error.limit,
                Some(json!({"max_base64_chars": MAX_INIT_IMAGE_CHARS, "max_side": MAX_SIDE}))
            );
        }
        let wide = png_base64(
            MAX_SIDE + 8,
            1,
            png::ColorType::Grayscale,
            &vec![0; (MAX_SIDE + 8) as usize],
        );
        let error = decode_init_image(&wide).expect_err("too wide");
        assert!(error.message.contains("a side"), "{error}");
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
