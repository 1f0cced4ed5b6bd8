//! DPM-Solver++ 2M (diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`): a second-order
//! multistep solver on the data prediction, first order on the first step
//! and, for short runs, the last.

use candle_core::Tensor;

use super::{
    alpha_sigma, checked_timesteps, predicted_original, spaced_timesteps, unsupported, Prediction,
    Sampler, Schedulers, Spacing, StepNoise,
};
use crate::engine::image::ImageError;

/// How the second-order term is formed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(super) struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    solver: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The data predictions of the last two steps, newest last.
    history: Vec<Tensor>,
}

/// `log(alpha) - log(sigma)` of a sigma: infinite at sigma 0.
fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma) = alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

impl DpmSolver {
    pub(super) fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        config.check_plain_sigmas()?;
        let json = &config.json;
        // diffusers maps UniPC's and other solvers' types to midpoint.
        let solver = match json.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => return Err(unsupported(format!("solver_type {other:?}"))),
        };
        let train = config.train_steps();
        let spacing = config.spacing(Spacing::Linspace)?;
        let timesteps = multistep_timesteps(spacing, train, steps, json.steps_offset)?;
        Ok(DpmSolver {
            sigmas: config.sigmas_at(&timesteps)?,
            timesteps,
            prediction: config.prediction,
            solver,
            lower_order_final: json.lower_order_final.unwrap_or(true),
            euler_at_final: json.euler_at_final.unwrap_or(false),
            final_sigma_zero: config.final_sigma()? == 0.0,
            history: Vec::with_capacity(2),
        })
    }

    /// Whether step `index` falls back to first order: diffusers does so
    /// for the first step, and for the last one of a short run or one
    /// ending at sigma 0.
    fn first_order(&self, index: usize) -> bool {
        let steps = self.timesteps.len();
        let last = index + 1 == steps
            && (self.euler_at_final
                || (self.lower_order_final && steps < 15)
                || self.final_sigma_zero);
        self.history.len() < 2 || last
    }

    fn first_order_update(&self, index: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (s, t) = (self.sigmas[index], self.sigmas[index + 1]);
        let (alpha_t, sigma_t) = alpha_sigma(t);
        let (_, sigma_s) = alpha_sigma(s);
        let h = lambda(t) - lambda(s);
        let data = &self.history[self.history.len() - 1];
        (sample * (sigma_t / sigma_s))? - (data * (alpha_t * ((-h).exp() - 1.0)))?
    }

    fn second_order_update(&self, index: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (t, s0, s1) = (
            self.sigmas[index + 1],
            self.sigmas[index],
            self.sigmas[index - 1],
        );
        let (alpha_t, sigma_t) = alpha_sigma(t);
        let (_, sigma_s0) = alpha_sigma(s0);
        let h = lambda(t) - lambda(s0);
        let r0 = (lambda(s0) - lambda(s1)) / h;
        let (m0, m1) = (&self.history[1], &self.history[0]);
        let d1 = ((m0 - m1)? * (1.0 / r0))?;
        let phi = alpha_t * ((-h).exp() - 1.0);
        let base = ((sample * (sigma_t / sigma_s0))? - (m0 * phi)?)?;
        match self.solver {
            SolverType::Midpoint => base - (d1 * (0.5 * phi))?,
            SolverType::Heun => base + (d1 * (alpha_t * (((-h).exp() - 1.0) / h + 1.0)))?,
        }
    }
}

/// The timesteps of the multistep solvers: `steps + 1` points spread and
/// the last dropped, rounded to integers.
pub(super) fn multistep_timesteps(
    spacing: Spacing,
    train: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<f64>, ImageError> {
    let timesteps = spaced_timesteps(spacing, train, steps, offset, true)
        .into_iter()
        .map(f64::round_ties_even)
        .collect();
    checked_timesteps(timesteps, train)
}

impl Sampler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn StepNoise,
    ) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        let data = predicted_original(self.prediction, output, sample, alpha, sigma)?;
        if self.history.len() == 2 {
            self.history.remove(0);
        }
        self.history.push(data);
        if self.first_order(index) {
            self.first_order_update(index, sample)
        } else {
            self.second_order_update(index, sample)
        }
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        index: usize,
    ) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        (original * alpha)? + (noise * sigma)?
    }
}
