//! DDIM (eta 0): deterministic, on integer timesteps.
//!
//! Re-implemented rather than taken from candle because candle's
//! `DDIMSchedulerConfig` has no `set_alpha_to_one`, `clip_sample` or
//! trained betas.

use candle_core::Tensor;

use super::{
    checked_timesteps, spaced_timesteps, Prediction, Sampler, Schedulers, Spacing, StepNoise,
};
use crate::engine::image::ImageError;

/// DDIM's fixed part: cumulative alphas and the step rules.
#[derive(Debug, Clone)]
pub struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    steps_offset: usize,
    prediction: Prediction,
    spacing: Spacing,
    clip_sample: Option<f64>,
}

impl Ddim {
    pub(super) fn new(config: &Schedulers) -> Result<Self, ImageError> {
        let json = &config.json;
        let alphas_cumprod = config.alphas_cumprod.clone();
        let final_alpha_cumprod = if json.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Ddim {
            final_alpha_cumprod,
            alphas_cumprod,
            steps_offset: json.steps_offset,
            prediction: config.prediction,
            spacing: config.spacing(Spacing::Leading)?,
            clip_sample: json
                .clip_sample
                .unwrap_or(true)
                .then_some(json.clip_sample_range),
        })
    }

    fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The timesteps of a run of `steps` steps, noisiest first.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>, ImageError> {
        let train = self.train_steps();
        let timesteps = spaced_timesteps(self.spacing, train, steps, self.steps_offset, false)
            .into_iter()
            .map(f64::round_ties_even)
            .collect();
        Ok(checked_timesteps(timesteps, train)?
            .into_iter()
            .map(|t| t as usize)
            .collect())
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

/// A DDIM run: its timesteps as the UNet sees them.
pub(super) struct DdimRun {
    ddim: Ddim,
    timesteps: Vec<usize>,
    unet_timesteps: Vec<f64>,
}

impl DdimRun {
    pub(super) fn new(ddim: Ddim, steps: usize) -> Result<Self, ImageError> {
        let timesteps = ddim.timesteps(steps)?;
        Ok(DdimRun {
            unet_timesteps: timesteps.iter().map(|t| *t as f64).collect(),
            timesteps,
            ddim,
        })
    }
}

impl Sampler for DdimRun {
    fn timesteps(&self) -> &[f64] {
        &self.unet_timesteps
    }

    fn step(
        &mut self,
        output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor> {
        let steps = self.timesteps.len();
        self.ddim.step(output, self.timesteps[index], steps, sample)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        let alpha = self.ddim.alphas_cumprod[self.timesteps[index]];
        (original * alpha.sqrt())? + (noise * (1.0 - alpha).sqrt())?
    }
}
