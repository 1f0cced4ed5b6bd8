//! UniPC (diffusers' `UniPCMultistepScheduler`, `predict_x0`): a multistep
//! predictor (UniP) on the data prediction, and a corrector (UniC) that
//! refines each sample once the UNet has seen it.

use candle_core::Tensor;

use super::dpm_solver::multistep_timesteps;
use super::{
    alpha_sigma, predicted_original, unsupported, Prediction, Sampler, Schedulers, Spacing,
    StepNoise,
};
use crate::engine::image::ImageError;

/// The bias function B(h) of the update.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Bh1,
    Bh2,
}

pub(super) struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    variant: Variant,
    order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The data predictions of the last `order` steps, newest last.
    history: Vec<Tensor>,
    /// The sample the last predictor started from, and its order.
    last: Option<(Tensor, usize)>,
}

fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma) = alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

impl UniPc {
    pub(super) fn new(config: &Schedulers, steps: usize) -> Result<Self, ImageError> {
        config.check_plain_sigmas()?;
        let json = &config.json;
        if json.predict_x0 == Some(false) {
            return Err(unsupported("predict_x0 false is not supported"));
        }
        // diffusers maps DPM-Solver's solver types to bh2.
        let variant = match json.solver_type.as_deref() {
            Some("bh1") => Variant::Bh1,
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => Variant::Bh2,
            Some(other) => return Err(unsupported(format!("solver_type {other:?}"))),
        };
        let order = json.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(unsupported(format!("solver_order {order} (1 to 3)")));
        }
        let train = config.train_steps();
        let spacing = config.spacing(Spacing::Linspace)?;
        let timesteps = multistep_timesteps(spacing, train, steps, json.steps_offset)?;
        Ok(UniPc {
            sigmas: config.sigmas_at(&timesteps)?,
            timesteps,
            prediction: config.prediction,
            variant,
            order,
            lower_order_final: json.lower_order_final.unwrap_or(true),
            disable_corrector: json.disable_corrector.clone(),
            history: Vec::with_capacity(order),
            last: None,
        })
    }

    /// The update from `sample` at sigma `from` to sigma `to` of `order`,
    /// with `earlier[k]` the sigma of `history[len - 2 - k]`; `this` is
    /// the corrector's new data prediction (`None` for the predictor).
    fn update(
        &self,
        sample: &Tensor,
        (from, to): (f64, f64),
        earlier: &[f64],
        this: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(to);
        let (_, sigma_s0) = alpha_sigma(from);
        let lambda_s0 = lambda(from);
        let h = lambda(to) - lambda_s0;
        let m0 = &self.history[self.history.len() - 1];
        let mut rks = Vec::with_capacity(earlier.len() + 1);
        let mut differences = Vec::with_capacity(earlier.len());
        for (k, sigma) in earlier.iter().enumerate() {
            let rk = (lambda(*sigma) - lambda_s0) / h;
            let mi = &self.history[self.history.len() - 2 - k];
            differences.push(((mi - m0)? / rk)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.variant {
            Variant::Bh1 => hh,
            Variant::Bh2 => hh.exp_m1(),
        };
        let (r, b) = order_conditions(&rks, hh, b_h);
        let base = ((sample * (sigma_t / sigma_s0))? - (m0 * (alpha_t * h_phi_1))?)?;
        let rhos = match this {
            None if rks.len() == 2 => vec![0.5],
            None => solve(&minor(&r), &b[..b.len() - 1]),
            Some(_) if rks.len() == 1 => vec![0.5],
            Some(_) => solve(&r, &b),
        };
        let mut residual = (m0.zeros_like())?;
        for (rho, difference) in rhos.iter().zip(&differences) {
            residual = (residual + (difference * *rho)?)?;
        }
        if let Some(model_t) = this {
            let last_rho = rhos[rhos.len() - 1];
            residual = (residual + ((model_t - m0)? * last_rho)?)?;
        }
        base - (residual * (alpha_t * b_h))?
    }

    /// The corrector's order and history sigmas for step `index`.
    fn earlier_sigmas(&self, index: usize, order: usize, corrector: bool) -> Vec<f64> {
        let back = usize::from(corrector);
        (1..order).map(|k| self.sigmas[index - k - back]).collect()
    }
}

/// UniPC's order conditions: rows `rks^(i-1)` and the right-hand side
/// `b_i` from the phi functions of `hh`.
fn order_conditions(rks: &[f64], hh: f64, b_h: f64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut h_phi_k = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    let (mut r, mut b) = (Vec::new(), Vec::new());
    for i in 1..=rks.len() {
        r.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (r, b)
}

/// The matrix without its last row and column.
fn minor(matrix: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = matrix.len() - 1;
    matrix[..n].iter().map(|row| row[..n].to_vec()).collect()
}

/// `x` with `a · x = b`, by Gaussian elimination with partial pivoting
/// (at most 3 × 3 here).
fn solve(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, value)| {
            let mut row = row.clone();
            row.push(*value);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|x, y| m[*x][col].abs().total_cmp(&m[*y][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let factor = row[col] / pivot_row[col];
            for (value, pivot) in row.iter_mut().zip(&pivot_row).skip(col) {
                *value -= factor * pivot;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let known: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - known) / m[row][row];
    }
    x
}

impl Sampler for UniPc {
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
        let mut sample = sample.clone();
        if let Some((last, order)) = &self.last {
            if index > 0 && !self.disable_corrector.contains(&(index - 1)) {
                let earlier = self.earlier_sigmas(index, *order, true);
                let sigmas = (self.sigmas[index - 1], self.sigmas[index]);
                sample = self.update(last, sigmas, &earlier, Some(&data))?;
            }
        }
        if self.history.len() == self.order {
            self.history.remove(0);
        }
        self.history.push(data);
        let wanted = if self.lower_order_final {
            self.order.min(self.timesteps.len() - index)
        } else {
            self.order
        };
        // Warm-up: no more history than the steps taken so far.
        let order = wanted.min(self.history.len());
        let earlier = self.earlier_sigmas(index, order, false);
        let sigmas = (self.sigmas[index], self.sigmas[index + 1]);
        let next = self.update(&sample, sigmas, &earlier, None)?;
        self.last = Some((sample, order));
        Ok(next)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_inverts_a_small_system() {
        let a = vec![
            vec![1.0, 1.0, 1.0],
            vec![0.0, 2.0, 5.0],
            vec![2.0, 5.0, -1.0],
        ];
        let x = solve(&a, &[6.0, -4.0, 27.0]);
        for (got, want) in x.iter().zip([5.0, 3.0, -2.0]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
    }
}
