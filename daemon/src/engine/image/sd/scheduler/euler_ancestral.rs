//! Euler ancestral (diffusers' `EulerAncestralDiscreteScheduler`): an
//! Euler step down to a lower sigma, then fresh noise back up to the next
//! step's sigma.

use candle_core::Tensor;

use super::euler::SigmaSchedule;
use super::{unsupported, Prediction, Sampler, Schedulers, StepNoise};
use crate::engine::image::ImageError;

pub(super) struct EulerAncestral {
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    pub(super) fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        let schedule = SigmaSchedule::new(config, steps)?;
        // diffusers raises NotImplementedError for this one.
        if schedule.prediction == Prediction::Sample {
            return Err(unsupported("prediction_type \"sample\" with euler_a"));
        }
        Ok(EulerAncestral { schedule })
    }
}

impl Sampler for EulerAncestral {
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
        noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor> {
        let (from, to) = (self.schedule.sigmas[index], self.schedule.sigmas[index + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let denoised = self.schedule.denoised(output, sample, from)?;
        let derivative = ((sample - denoised)? / from)?;
        let previous = (sample + (derivative * (down - from))?)?;
        previous + (noise.noise(output)? * up)?
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
