//! DDPM (diffusers' `DDPMScheduler`): ancestral sampling of the posterior
//! between consecutive timesteps of the run, with fresh noise each step.

use candle_core::Tensor;

use super::{
    checked_timesteps, predicted_original, spaced_timesteps, unsupported, Prediction, Sampler,
    Schedulers, Spacing, StepNoise,
};
use crate::engine::image::ImageError;

/// The posterior variance the noise is drawn with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variance {
    /// The true posterior variance (clamped away from 0).
    Small,
    /// The step's beta.
    Large,
}

pub(super) struct Ddpm {
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    prediction: Prediction,
    clip_sample: Option<f64>,
    variance: Variance,
}

impl Ddpm {
    pub(super) fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        let json = &config.json;
        // "fixed_small_log" draws with exp(log(v) / 2), the same deviation.
        let variance = match json.variance_type.as_deref() {
            None | Some("fixed_small") | Some("fixed_small_log") => Variance::Small,
            Some("fixed_large") => Variance::Large,
            Some(other) => return Err(unsupported(format!("variance_type {other:?}"))),
        };
        let train = config.train_steps();
        let spacing = config.spacing(Spacing::Leading)?;
        let timesteps = spaced_timesteps(spacing, train, steps, json.steps_offset, false)
            .into_iter()
            .map(f64::round_ties_even)
            .collect();
        Ok(Ddpm {
            alphas_cumprod: config.alphas_cumprod.clone(),
            timesteps: checked_timesteps(timesteps, train)?,
            prediction: config.prediction,
            clip_sample: json
                .clip_sample
                .unwrap_or(true)
                .then_some(json.clip_sample_range),
            variance,
        })
    }

    /// `(ᾱ_t, ᾱ_prev)` at step `index`: the next timestep of the run is
    /// the previous one of the chain, clean (ᾱ = 1) after the last.
    fn alphas(&self, index: usize) -> (f64, f64) {
        let alpha = self.alphas_cumprod[self.timesteps[index] as usize];
        let previous = self
            .timesteps
            .get(index + 1)
            .map_or(1.0, |t| self.alphas_cumprod[*t as usize]);
        (alpha, previous)
    }

    fn deviation(&self, index: usize) -> f64 {
        let (alpha, previous) = self.alphas(index);
        let beta = 1.0 - alpha / previous;
        let variance = match self.variance {
            Variance::Small => ((1.0 - previous) / (1.0 - alpha) * beta).max(1e-20),
            Variance::Large => beta,
        };
        variance.sqrt()
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor> {
        let (alpha, previous) = self.alphas(index);
        let (beta, beta_previous) = (1.0 - alpha, 1.0 - previous);
        let current_alpha = alpha / previous;
        let original =
            predicted_original(self.prediction, output, sample, alpha.sqrt(), beta.sqrt())?;
        let original = match self.clip_sample {
            Some(range) => original.clamp(-range, range)?,
            None => original,
        };
        let original_coeff = previous.sqrt() * (1.0 - current_alpha) / beta;
        let sample_coeff = current_alpha.sqrt() * beta_previous / beta;
        let mean = ((original * original_coeff)? + (sample * sample_coeff)?)?;
        // diffusers adds no noise on the way to timestep 0's output.
        if self.timesteps[index] == 0.0 {
            return Ok(mean);
        }
        mean + (noise.noise(output)? * self.deviation(index))?
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        let alpha = self.alphas_cumprod[self.timesteps[index] as usize];
        (original * alpha.sqrt())? + (noise * (1.0 - alpha).sqrt())?
    }
}
