//! Euler (diffusers' `EulerDiscreteScheduler`, no churn): the probability
//! flow ODE in sigma space, one Euler step per timestep.

use candle_core::Tensor;

use super::{
    checked_timesteps, spaced_timesteps, Prediction, Sampler, Schedulers, Spacing, StepNoise,
};
use crate::engine::image::ImageError;

/// The timesteps (fractional with linspace spacing) and their sigmas
/// shared by both Euler schedulers, with the final sigma appended.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
    pub prediction: Prediction,
}

impl SigmaSchedule {
    pub fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        config.check_euler_sigmas()?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let train = config.train_steps();
        let timesteps = spaced_timesteps(spacing, train, steps, config.json.steps_offset, false);
        let timesteps = checked_timesteps(timesteps, train)?;
        let sigmas = config.sigmas_at(&timesteps)?;
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        // diffusers: the noisiest sigma itself with linspace/trailing
        // spacing, the variance-preserving scale with leading.
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: config.prediction,
        })
    }

    /// The UNet sees the sample scaled back to unit variance.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[index];
        sample / (sigma * sigma + 1.0).sqrt()
    }

    /// The predicted clean sample at `sigma` from the UNet's output.
    pub fn denoised(
        &self,
        output: &Tensor,
        sample: &Tensor,
        sigma: f64,
    ) -> candle_core::Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => sample - (output * sigma)?,
            Prediction::Velocity => {
                let skip = (sample / (sigma * sigma + 1.0))?;
                (output * (-sigma / (sigma * sigma + 1.0).sqrt()))? + skip
            }
            Prediction::Sample => Ok(output.clone()),
        }
    }

    /// Noise at step `index`'s sigma over the clean `original`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        original + (noise * self.sigmas[index])?
    }
}

pub(super) struct Euler {
    schedule: SigmaSchedule,
}

impl Euler {
    pub(super) fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        Ok(Euler {
            schedule: SigmaSchedule::new(config, steps)?,
        })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> candle_core::Result<Tensor> {
        self.schedule.scale_model_input(sample, index)
    }

    fn step(
        &mut self,
        output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor> {
        let sigma = self.schedule.sigmas[index];
        let denoised = self.schedule.denoised(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        sample + (derivative * (self.schedule.sigmas[index + 1] - sigma))?
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        self.schedule.add_noise(original, noise, index)
    }
}
