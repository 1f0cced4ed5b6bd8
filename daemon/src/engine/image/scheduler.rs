//! The DDIM scheduler (eta 0), configured from `scheduler/scheduler_config.json`.
//!
//! Re-implemented here rather than taken from candle because candle's
//! `DDIMSchedulerConfig` has no `set_alpha_to_one`, `clip_sample` or
//! trained betas. The beta schedule keys are shared by diffusers' schedulers,
//! so a pipeline shipping e.g. a PNDM config runs DDIM on the same betas,
//! with diffusers' DDIM defaults for the keys that config lacks.

use candle_core::Tensor;
use serde::Deserialize;

use super::ImageError;

/// `scheduler_config.json`, with `DDIMScheduler`'s defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerJson {
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
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default = "leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prediction {
    Epsilon,
    Velocity,
    Sample,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The scheduler's fixed part: cumulative alphas and the step rules.
#[derive(Debug, Clone)]
pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    steps_offset: usize,
    prediction: Prediction,
    spacing: Spacing,
    clip_sample: Option<f64>,
}

fn unsupported(what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("scheduler/scheduler_config.json: {what}"))
}

impl Ddim {
    pub fn new(json: &SchedulerJson) -> Result<Self, ImageError> {
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
        let spacing = match json.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => return Err(unsupported(format!("timestep_spacing {other:?}"))),
        };
        let betas = betas(json)?;
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut product = 1.0;
        for beta in betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        let final_alpha_cumprod = if json.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            steps_offset: json.steps_offset,
            prediction,
            spacing,
            clip_sample: json.clip_sample.then_some(json.clip_sample_range),
        })
    }

    fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The timesteps of a run of `steps` steps, noisiest first.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>, ImageError> {
        let train = self.train_steps();
        if steps == 0 || steps > train {
            return Err(unsupported(format!(
                "{steps} steps with {train} training timesteps"
            )));
        }
        let timesteps: Vec<usize> = match self.spacing {
            Spacing::Leading => (0..steps)
                .rev()
                .map(|i| i * (train / steps) + self.steps_offset)
                .collect(),
            Spacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                (0..steps)
                    .map(|i| (train as f64 - i as f64 * ratio).round() as usize - 1)
                    .collect()
            }
            Spacing::Linspace => (0..steps)
                .rev()
                .map(|i| linspace_point(train, steps, i))
                .collect(),
        };
        if timesteps.iter().any(|t| *t >= train) {
            return Err(unsupported(format!(
                "steps_offset {} pushes timesteps past {train}",
                self.steps_offset
            )));
        }
        Ok(timesteps)
    }

    /// One DDIM step (eta 0) from `sample` at `timestep` given the UNet's
    /// `output`: the sample at the previous timestep of a `steps`-step run.
    pub fn step(
        &self,
        output: &Tensor,
        timestep: usize,
        steps: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha_t = self.alphas_cumprod[timestep];
        let alpha_prev = timestep
            .checked_sub(self.train_steps() / steps)
            .map_or(self.final_alpha_cumprod, |prev| self.alphas_cumprod[prev]);
        let (original, epsilon) = self.split_prediction(output, alpha_t, sample)?;
        let original = match self.clip_sample {
            Some(range) => original.clamp(-range, range)?,
            None => original,
        };
        (original * alpha_prev.sqrt())? + (epsilon * (1.0 - alpha_prev).sqrt())?
    }

    /// The predicted clean sample and noise, from whatever the UNet predicts.
    fn split_prediction(
        &self,
        output: &Tensor,
        alpha_t: f64,
        sample: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let beta_t = 1.0 - alpha_t;
        match self.prediction {
            Prediction::Epsilon => {
                let original = ((sample - (output * beta_t.sqrt())?)? / alpha_t.sqrt())?;
                Ok((original, output.clone()))
            }
            Prediction::Velocity => {
                let original = ((sample * alpha_t.sqrt())? - (output * beta_t.sqrt())?)?;
                let epsilon = ((output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?;
                Ok((original, epsilon))
            }
            Prediction::Sample => {
                let epsilon = ((sample - (output * alpha_t.sqrt())?)? / beta_t.sqrt())?;
                Ok((output.clone(), epsilon))
            }
        }
    }
}

/// `np.linspace(0, train - 1, steps).round()[i]`.
fn linspace_point(train: usize, steps: usize, i: usize) -> usize {
    if steps == 1 {
        return 0;
    }
    (i as f64 * (train - 1) as f64 / (steps - 1) as f64).round() as usize
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
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn epsilon() -> String {
    "epsilon".into()
}
fn leading() -> String {
    "leading".into()
}
