//! A `generate` request validated for whichever kind of model runs it. The
//! kind is known only once the model is resident, so a request is checked
//! as text and as image generation up front; parameters of one kind make
//! the other refuse it, naming the parameter.

use modeld_wire::types::{GenerateParams, GenerationDefaults, ImageDefaults};

use super::image::request::ValidImage;
use super::runner::worker::RunnerRequest;
use super::text::sampling::ValidGenerate;
use crate::validate::{valid_name, ValidationError};

/// Parameters only text generation reads, by name.
fn text_only(p: &GenerateParams) -> Option<&'static str> {
    [
        ("messages", p.messages.is_some()),
        ("max_tokens", p.max_tokens.is_some()),
        ("temperature", p.temperature.is_some()),
        ("top_p", p.top_p.is_some()),
        ("top_k", p.top_k.is_some()),
        ("repeat_penalty", p.repeat_penalty.is_some()),
        ("repeat_last_n", p.repeat_last_n.is_some()),
        ("stop", p.stop.is_some()),
    ]
    .into_iter()
    .find_map(|(name, set)| set.then_some(name))
}

/// Parameters only image generation reads, by name.
fn image_only(p: &GenerateParams) -> Option<&'static str> {
    [
        ("negative_prompt", p.negative_prompt.is_some()),
        ("size", p.size.is_some()),
        ("steps", p.steps.is_some()),
        ("guidance", p.guidance.is_some()),
        ("count", p.count.is_some()),
        ("inline", p.inline.is_some()),
        ("scheduler", p.scheduler.is_some()),
        ("init_image", p.init_image.is_some()),
        ("strength", p.strength.is_some()),
        ("max_sequence_length", p.max_sequence_length.is_some()),
        ("frames", p.frames.is_some()),
        ("options", p.options.is_some()),
    ]
    .into_iter()
    .find_map(|(name, set)| set.then_some(name))
}

/// Fills an image request's unset size, steps, guidance and scheduler
/// from `defaults` (a mode's image defaults). An img2img request's size
/// comes from its picture, never from the mode.
pub fn apply_image_defaults(
    mut params: GenerateParams,
    defaults: &ImageDefaults,
) -> GenerateParams {
    if params.init_image.is_none() {
        params.size = params.size.or_else(|| defaults.default_size.clone());
    }
    params.scheduler = params
        .scheduler
        .or_else(|| defaults.default_scheduler.clone());
    params.steps = params.steps.or(defaults.default_steps);
    params.guidance = params.guidance.or(defaults.default_guidance);
    params
}

/// Fills a text request's unset fields from `defaults` (a mode's).
pub fn apply_defaults(mut params: GenerateParams, defaults: &GenerationDefaults) -> GenerateParams {
    params.max_tokens = params.max_tokens.or(defaults.max_tokens);
    params.temperature = params.temperature.or(defaults.temperature);
    params.top_p = params.top_p.or(defaults.top_p);
    params.top_k = params.top_k.or(defaults.top_k);
    params.seed = params.seed.or(defaults.seed);
    params.repeat_penalty = params.repeat_penalty.or(defaults.repeat_penalty);
    params.repeat_last_n = params.repeat_last_n.or(defaults.repeat_last_n);
    params.stop = params.stop.or_else(|| defaults.stop.clone());
    params
}

/// A generation as a text model and as an image model would run it; the
/// side that cannot run holds the error its model will answer with.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub model: String,
    pub text: Result<ValidGenerate, ValidationError>,
    pub image: Result<ValidImage, ValidationError>,
    /// For a runner model: checked against what its runner declares once
    /// it is running.
    pub runner: RunnerRequest,
}

impl ValidRequest {
    /// Names the engine key the request runs on (a mode's model key).
    pub fn set_model(&mut self, model: String) {
        if let Ok(text) = &mut self.text {
            text.model = model.clone();
        }
        if let Ok(image) = &mut self.image {
            image.model = model.clone();
        }
        self.runner.model = model.clone();
        self.model = model;
    }

    /// Where an image request's pictures are written, and how long its
    /// run may be estimated to take on the CPU.
    pub fn set_image_limits(&mut self, dir: &std::path::Path, max_job_s: u64) {
        if let Ok(image) = &mut self.image {
            image.output_dir = dir.to_path_buf();
            image.max_job_s = max_job_s;
        }
        self.runner.output_dir = dir.to_path_buf();
    }
}

impl TryFrom<GenerateParams> for ValidRequest {
    type Error = ValidationError;

    /// The request without a mode's defaults.
    fn try_from(params: GenerateParams) -> Result<Self, ValidationError> {
        Self::new(
            params,
            &GenerationDefaults::default(),
            &ImageDefaults::default(),
        )
    }
}

impl ValidRequest {
    /// Validates `params`, each kind with its own defaults filled in (a
    /// mode's text defaults never turn an image request into a text one).
    /// Mixing both kinds' parameters, or a bad value for the kind the
    /// parameters ask for, is refused at once; a request fitting both (a
    /// prompt and a seed) is kept both ways.
    pub fn new(
        params: GenerateParams,
        text_defaults: &GenerationDefaults,
        image_defaults: &ImageDefaults,
    ) -> Result<Self, ValidationError> {
        let model = valid_name(&params.model).map_err(|mut e| {
            e.field = "model".into();
            e
        })?;
        let (text_field, image_field) = (text_only(&params), image_only(&params));
        if let (Some(text_field), Some(image_field)) = (text_field, image_field) {
            return Err(ValidationError::new(
                image_field,
                format!("{image_field} is an image parameter and {text_field} a text one; a request is one or the other"),
            ));
        }
        let seed = params
            .seed
            .or(text_defaults.seed)
            .unwrap_or_else(super::text::sampling::random_seed);
        let params = GenerateParams {
            seed: Some(seed),
            ..params
        };
        let runner = RunnerRequest {
            model: model.clone(),
            params: apply_image_defaults(params.clone(), image_defaults),
            seed,
            output_dir: Default::default(),
        };
        let image = match text_field {
            Some(field) => Err(ValidationError::new(
                field,
                format!("{field} applies to text models; this model generates images"),
            )),
            None => native_image(&runner.params, model.clone(), seed),
        };
        let text = match image_field {
            Some(field) => Err(ValidationError::new(
                field,
                format!("{field} applies to image models; this model generates text"),
            )),
            None => ValidGenerate::try_from(apply_defaults(params, text_defaults)),
        };
        // A bad image parameter is refused once the model is resident:
        // a runner model may accept what native image models do not.
        match (&text, &image) {
            (Err(err), _) if text_field.is_some() => Err(err.clone()),
            (Err(err), Err(_)) if image_field.is_none() => Err(err.clone()),
            _ => Ok(ValidRequest {
                model,
                text,
                image,
                runner,
            }),
        }
    }
}

/// The image side for native models, which have no `frames` or `options`.
fn native_image(
    params: &GenerateParams,
    model: String,
    seed: u64,
) -> Result<ValidImage, ValidationError> {
    for (field, set) in [
        ("frames", params.frames.is_some()),
        ("options", params.options.is_some()),
    ] {
        if set {
            return Err(ValidationError::new(
                field,
                format!("{field} applies to models run by a runner; this model runs natively"),
            ));
        }
    }
    ValidImage::from_params(params, model, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(extra: serde_json::Value) -> GenerateParams {
        let mut value = serde_json::json!({"model": "m", "prompt": "a cat"});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_bare_prompt_fits_both_kinds_with_one_seed() {
        let request = ValidRequest::try_from(params(serde_json::json!({}))).unwrap();
        let (text, image) = (request.text.unwrap(), request.image.unwrap());
        assert_eq!(text.seed, image.request.seed);
        assert_eq!((image.request.width, image.request.steps), (512, 4));
    }

    #[test]
    fn one_kinds_parameter_makes_the_other_refuse_naming_it() {
        let text = ValidRequest::try_from(params(serde_json::json!({"max_tokens": 4}))).unwrap();
        assert_eq!(text.image.unwrap_err().field, "max_tokens");
        let image = ValidRequest::try_from(params(serde_json::json!({"size": "64x64"}))).unwrap();
        assert_eq!(image.text.unwrap_err().field, "size");
    }

    #[test]
    fn each_kind_gets_its_own_mode_defaults() {
        let text_defaults = GenerationDefaults {
            max_tokens: Some(9),
            ..Default::default()
        };
        let image_defaults = ImageDefaults {
            default_size: Some("64x32".into()),
            default_steps: Some(7),
            default_guidance: None,
            default_scheduler: None,
        };
        let request = ValidRequest::new(
            params(serde_json::json!({})),
            &text_defaults,
            &image_defaults,
        )
        .unwrap();
        let image = request.image.unwrap().request;
        assert_eq!((image.width, image.height, image.steps), (64, 32, 7));
        assert_eq!(image.guidance, 1.0);
        assert_eq!(request.text.unwrap().max_tokens, 9);
        let explicit = params(serde_json::json!({"steps": 2}));
        let request = ValidRequest::new(explicit, &text_defaults, &image_defaults).unwrap();
        assert_eq!(request.image.unwrap().request.steps, 2);
    }

    #[test]
    fn mixed_parameters_are_refused_at_once_and_bad_image_values_by_the_model() {
        let mixed = params(serde_json::json!({"max_tokens": 4, "steps": 2}));
        assert_eq!(ValidRequest::try_from(mixed).unwrap_err().field, "steps");
        for (bad, field) in [
            (serde_json::json!({"size": "63x64"}), "size"),
            (serde_json::json!({"size": "big"}), "size"),
            (serde_json::json!({"steps": 0}), "steps"),
            (serde_json::json!({"guidance": 101.0}), "guidance"),
            (serde_json::json!({"count": 9}), "count"),
            (serde_json::json!({"frames": 5}), "frames"),
        ] {
            // A runner model may take what native ones refuse, so the
            // resident model's kind decides: native ones refuse it by name.
            let request = ValidRequest::try_from(params(bad.clone())).expect("deferred");
            let native = request.image.unwrap_err();
            assert_eq!(native.field, field, "{bad}");
            assert!(
                native.limit.is_some() || field == "frames",
                "{bad}: {native}"
            );
            assert_eq!(request.text.unwrap_err().field, field, "{bad}");
            assert!(request.runner.params.seed.is_some(), "{bad}");
        }
    }
}
