//! The denoising schedulers: diffusers' maths re-implemented, configured
//! from `scheduler/scheduler_config.json`.
//!
//! diffusers' schedulers share the beta schedule keys, so any of them runs
//! on any pipeline's config, with each scheduler's own defaults for the keys
//! the config lacks (as `SchedulerClass.from_config(pipe.scheduler.config)`
//! does). A request picks one by name; without one the pipeline runs the
//! scheduler its config's `_class_name` names when it is one of these, else
//! DDIM.

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod unipc;

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::ImageError;

pub use self::ddim::Ddim;

/// `scheduler_config.json`: the keys any supported scheduler reads. Keys
/// whose default differs between schedulers stay `None` when absent.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerJson {
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// DDPM: `fixed_small` (default), `fixed_small_log` or `fixed_large`.
    #[serde(default)]
    pub variance_type: Option<String>,
    /// UniPC: multistep order (default 2). DPM++ 2M is order 2 by name.
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// DPM-Solver: `midpoint` (default) or `heun`; UniPC: `bh1` or `bh2`.
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    /// `zero` (default) or `sigma_min`: the sigma after the last step.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub interpolation_type: Option<String>,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub timestep_type: Option<String>,
    #[serde(default)]
    pub predict_x0: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    #[serde(default)]
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: `-Infinity` (written as null here) unless it clips.
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
}

impl SchedulerJson {
    /// Reads a `scheduler_config.json` as diffusers writes it: Python's
    /// `json.dumps` spells infinities and NaN bare (DPM-Solver's
    /// `lambda_min_clipped: -Infinity`), which strict JSON refuses; they
    /// are read as null.
    pub fn read(path: &Path) -> Result<Self, ImageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ImageError::Files(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&python_constants_as_null(&text))
            .map_err(|e| ImageError::Files(format!("{}: {e}", path.display())))
    }
}

/// `text` with `-Infinity`, `Infinity` and `NaN` outside strings replaced
/// by `null`.
fn python_constants_as_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            let constant = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|word| rest.starts_with(word));
            if let Some(word) = constant {
                out.push_str("null");
                rest = &rest[word.len()..];
                continue;
            }
        }
        match c {
            '"' if !escaped => in_string = !in_string,
            _ => {}
        }
        escaped = in_string && c == '\\' && !escaped;
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The schedulers a request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    Ddpm,
    DpmPp2m,
    UniPc,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddpm,
        SchedulerKind::DpmPp2m,
        SchedulerKind::UniPc,
    ];

    /// The name requests and modes use.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::UniPc => "unipc",
        }
    }

    /// diffusers' class for this scheduler.
    fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The accepted names, for error messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.into_iter().map(Self::name).collect()
    }

    /// The scheduler a config's `_class_name` names, DDIM for the others
    /// (PNDM, LMS, ...) and for none.
    pub fn default_for(json: &SchedulerJson) -> Self {
        let class = json.class_name.as_deref().unwrap_or_default();
        Self::ALL
            .into_iter()
            .find(|kind| kind.class_name() == class)
            .unwrap_or(SchedulerKind::Ddim)
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

pub use crate::engine::image::noise::StepNoise;

/// One run of a scheduler over a fixed number of steps; the multistep
/// schedulers keep their history here.
pub trait Sampler {
    /// The timesteps the UNet sees, noisiest first.
    fn timesteps(&self) -> &[f64];

    /// The scale of the initial noise (sigma-based schedulers start from
    /// noise larger than standard normal).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet's input for `sample` at step `index`.
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    /// The sample after step `index`, given the UNet's `output` for it.
    fn step(
        &mut self,
        output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor>;

    /// `original` noised to the level of step `index` (img2img's start).
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor>;
}

/// The configuration every scheduler shares, checked once at load.
#[derive(Debug, Clone)]
pub struct Schedulers {
    json: SchedulerJson,
    alphas_cumprod: Vec<f64>,
    prediction: Prediction,
    default: SchedulerKind,
}

pub(crate) fn unsupported(what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("scheduler/scheduler_config.json: {what}"))
}

impl Schedulers {
    pub fn new(json: SchedulerJson) -> Result<Self, ImageError> {
        if json.thresholding || json.rescale_betas_zero_snr {
            return Err(unsupported(
                "thresholding and rescale_betas_zero_snr are not supported",
            ));
        }
        let prediction = match json.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::Velocity,
            "sample" => Prediction::Sample,
            other => return Err(unsupported(format!("prediction_type {other:?}"))),
        };
        let alphas_cumprod = alphas_cumprod(&betas(&json)?);
        let schedulers = Schedulers {
            default: SchedulerKind::default_for(&json),
            json,
            alphas_cumprod,
            prediction,
        };
        // The default must run; others are refused when a request names them.
        schedulers.start(schedulers.default, 1)?;
        Ok(schedulers)
    }

    pub fn default_kind(&self) -> SchedulerKind {
        self.default
    }

    /// A fresh run of `kind` over `steps` steps.
    pub fn start(&self, kind: SchedulerKind, steps: usize) -> Result<Box<dyn Sampler>, ImageError> {
        let train = self.alphas_cumprod.len();
        if steps == 0 || steps > train {
            return Err(unsupported(format!(
                "{steps} steps with {train} training timesteps"
            )));
        }
        let sampler: Box<dyn Sampler> = match kind {
            SchedulerKind::Ddim => Box::new(ddim::DdimRun::new(Ddim::new(self)?, steps)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(self, steps)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler_ancestral::EulerAncestral::new(self, steps)?)
            }
            SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(self, steps)?),
            SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolver::new(self, steps)?),
            SchedulerKind::UniPc => Box::new(unipc::UniPc::new(self, steps)?),
        };
        Ok(sampler)
    }

    /// The spacing the config names, or `default` when it names none.
    fn spacing(&self, default: Spacing) -> Result<Spacing, ImageError> {
        match self.json.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some("linspace") => Ok(Spacing::Linspace),
            Some(other) => Err(unsupported(format!("timestep_spacing {other:?}"))),
        }
    }

    fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Karras, exponential, beta, flow and Lu sigmas and a clipped lambda
    /// change the sigma schedules: refused.
    fn check_plain_sigmas(&self) -> Result<(), ImageError> {
        let json = &self.json;
        for (key, set) in [
            ("use_karras_sigmas", json.use_karras_sigmas),
            ("use_exponential_sigmas", json.use_exponential_sigmas),
            ("use_beta_sigmas", json.use_beta_sigmas),
            ("use_flow_sigmas", json.use_flow_sigmas),
            ("use_lu_lambdas", json.use_lu_lambdas),
        ] {
            if set == Some(true) {
                return Err(unsupported(format!("{key} is not supported")));
            }
        }
        if let Some(lambda) = json.lambda_min_clipped {
            return Err(unsupported(format!("lambda_min_clipped {lambda}")));
        }
        Ok(())
    }

    /// Euler's own keys: log-linear interpolation and continuous
    /// timesteps are refused.
    fn check_euler_sigmas(&self) -> Result<(), ImageError> {
        self.check_plain_sigmas()?;
        if let Some(other) = self
            .json
            .interpolation_type
            .as_deref()
            .filter(|t| *t != "linear")
        {
            return Err(unsupported(format!("interpolation_type {other:?}")));
        }
        if let Some(other) = self
            .json
            .timestep_type
            .as_deref()
            .filter(|t| *t != "discrete")
        {
            return Err(unsupported(format!("timestep_type {other:?}")));
        }
        Ok(())
    }

    /// The sigma after the last step: 0, or the smallest training sigma.
    fn final_sigma(&self) -> Result<f64, ImageError> {
        match self.json.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(0.0),
            Some("sigma_min") => Ok(sigma_of(self.alphas_cumprod[0])),
            Some(other) => Err(unsupported(format!("final_sigmas_type {other:?}"))),
        }
    }

    /// The sigmas at `timesteps` (linearly interpolated between training
    /// timesteps, as `np.interp`), then the final sigma.
    fn sigmas_at(&self, timesteps: &[f64]) -> Result<Vec<f64>, ImageError> {
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|t| {
                let low = t.floor() as usize;
                let high = (low + 1).min(self.train_steps() - 1);
                let (a, b) = (
                    sigma_of(self.alphas_cumprod[low]),
                    sigma_of(self.alphas_cumprod[high]),
                );
                a + (b - a) * (t - low as f64)
            })
            .collect();
        sigmas.push(self.final_sigma()?);
        Ok(sigmas)
    }
}

/// The noise-to-signal ratio of a cumulative alpha.
fn sigma_of(alpha_cumprod: f64) -> f64 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// `(alpha_t, sigma_t)` of a sigma: the signal and noise scales of the
/// variance-preserving process at that noise level.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The predicted clean sample from the UNet's `output`, for a sample
/// `alpha · x0 + sigma · noise`.
fn predicted_original(
    prediction: Prediction,
    output: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> candle_core::Result<Tensor> {
    match prediction {
        Prediction::Epsilon => (sample - (output * sigma)?)? / alpha,
        Prediction::Velocity => (sample * alpha)? - (output * sigma)?,
        Prediction::Sample => Ok(output.clone()),
    }
}

/// `steps` timesteps, noisiest first, unrounded (Euler keeps linspace's
/// fractions; the others round them half to even, as numpy); `extra` spreads `steps + 1` points and drops the last, as
/// the multistep solvers do.
fn spaced_timesteps(
    spacing: Spacing,
    train: usize,
    steps: usize,
    offset: usize,
    extra: bool,
) -> Vec<f64> {
    let points = steps + usize::from(extra);
    match spacing {
        Spacing::Leading => {
            let ratio = train / points;
            (0..points)
                .rev()
                .take(steps)
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train as f64 / steps as f64;
            (0..steps)
                .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
        Spacing::Linspace => (0..points)
            .rev()
            .take(steps)
            .map(|i| linspace_point(train, points, i))
            .collect(),
    }
}

/// `np.linspace(0, train - 1, points)[i]`.
fn linspace_point(train: usize, points: usize, i: usize) -> f64 {
    if points == 1 {
        return 0.0;
    }
    i as f64 * (train - 1) as f64 / (points - 1) as f64
}

/// Integer timesteps within the training range, or the config's offset
/// pushed them out of it.
fn checked_timesteps(timesteps: Vec<f64>, train: usize) -> Result<Vec<f64>, ImageError> {
    if timesteps.iter().any(|t| *t < 0.0 || *t >= train as f64) {
        return Err(unsupported(format!(
            "steps_offset or spacing pushes timesteps outside 0..{train}"
        )));
    }
    Ok(timesteps)
}

fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut product = 1.0;
    betas
        .iter()
        .map(|beta| {
            product *= 1.0 - beta;
            product
        })
        .collect()
}

/// The training betas the config describes.
fn betas(json: &SchedulerJson) -> Result<Vec<f64>, ImageError> {
    let n = json.num_train_timesteps;
    if let Some(trained) = &json.trained_betas {
        return Ok(trained.clone());
    }
    if n < 2 {
        return Err(unsupported(format!("num_train_timesteps {n}")));
    }
    let lerp = |a: f64, b: f64, i: usize| a + (b - a) * i as f64 / (n - 1) as f64;
    match json.beta_schedule.as_str() {
        "linear" => Ok((0..n)
            .map(|i| lerp(json.beta_start, json.beta_end, i))
            .collect()),
        "scaled_linear" => Ok((0..n)
            .map(|i| lerp(json.beta_start.sqrt(), json.beta_end.sqrt(), i).powi(2))
            .collect()),
        "squaredcos_cap_v2" => Ok(cosine_betas(n)),
        other => Err(unsupported(format!("beta_schedule {other:?}"))),
    }
}

/// The "squaredcos_cap_v2" (Glide cosine) schedule.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn one() -> f64 {
    1.0
}
fn epsilon() -> String {
    "epsilon".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> SchedulerJson {
        let mut json = serde_json::json!({
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        });
        json.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        serde_json::from_value(json).expect("config")
    }

    #[test]
    fn the_default_follows_the_class_name_else_ddim() {
        for (class, kind) in [
            (
                "EulerAncestralDiscreteScheduler",
                SchedulerKind::EulerAncestral,
            ),
            ("DPMSolverMultistepScheduler", SchedulerKind::DpmPp2m),
            ("UniPCMultistepScheduler", SchedulerKind::UniPc),
            ("PNDMScheduler", SchedulerKind::Ddim),
        ] {
            let json = config(serde_json::json!({ "_class_name": class }));
            assert_eq!(SchedulerKind::default_for(&json), kind, "{class}");
        }
        assert_eq!(
            SchedulerKind::default_for(&config(serde_json::json!({}))),
            SchedulerKind::Ddim
        );
    }

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(SchedulerKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(SchedulerKind::from_name("pndm"), None);
    }

    #[test]
    fn spacings_match_diffusers() {
        // Values from diffusers 0.42 for 1000 training steps.
        assert_eq!(
            spaced_timesteps(Spacing::Leading, 1000, 5, 1, false),
            [801.0, 601.0, 401.0, 201.0, 1.0]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Leading, 1000, 5, 1, true),
            [831.0, 665.0, 499.0, 333.0, 167.0]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Trailing, 1000, 5, 0, false),
            [999.0, 799.0, 599.0, 399.0, 199.0]
        );
        assert_eq!(
            spaced_timesteps(Spacing::Linspace, 1000, 5, 0, false),
            [999.0, 749.25, 499.5, 249.75, 0.0]
        );
        let rounded: Vec<f64> = spaced_timesteps(Spacing::Linspace, 1000, 5, 0, true)
            .into_iter()
            .map(f64::round_ties_even)
            .collect();
        assert_eq!(rounded, [999.0, 799.0, 599.0, 400.0, 200.0]);
    }

    #[test]
    fn diffusers_bare_infinities_read_as_null() {
        let text = r#"{"lambda_min_clipped": -Infinity, "x": "NaN -Infinity \" NaN", "y": [NaN, Infinity]}"#;
        let value: serde_json::Value =
            serde_json::from_str(&python_constants_as_null(text)).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"lambda_min_clipped": null, "x": "NaN -Infinity \" NaN", "y": [null, null]})
        );
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(
            &path,
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity}"#,
        )
        .expect("write");
        let json = SchedulerJson::read(&path).expect("reads");
        assert_eq!(json.lambda_min_clipped, None);
        assert_eq!(SchedulerKind::default_for(&json), SchedulerKind::DpmPp2m);
    }

    #[test]
    fn unsupported_sigma_schedules_are_refused_by_name() {
        let schedulers = Schedulers::new(config(serde_json::json!({
            "use_karras_sigmas": true
        })))
        .expect("DDIM ignores karras sigmas");
        let error = schedulers
            .start(SchedulerKind::Euler, 4)
            .err()
            .expect("refused");
        assert!(error.to_string().contains("use_karras_sigmas"), "{error}");
    }
}
