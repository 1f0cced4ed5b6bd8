//! Flow matching as diffusers' `FluxPipeline` runs it: sigmas from 1 down
//! to 1/steps, shifted toward noise by an amount that grows with the
//! picture's token count (`mu`) or by a fixed `shift`, then Euler steps
//! `x += (σ_next − σ) · v`.

use super::config::FlowMatchJson;

/// The shift exponent for a picture of `image_tokens` packed latents:
/// linear between the scheduler's base and max shift (diffusers'
/// `calculate_shift`).
pub fn mu(json: &FlowMatchJson, image_tokens: usize) -> f64 {
    let (base_len, max_len) = (
        json.base_image_seq_len as f64,
        json.max_image_seq_len as f64,
    );
    let slope = (json.max_shift - json.base_shift) / (max_len - base_len);
    let intercept = json.base_shift - slope * base_len;
    image_tokens as f64 * slope + intercept
}

/// The sigmas of a `steps`-step run, with the final 0: diffusers'
/// `np.linspace(1, 1/steps, steps)`, then `set_timesteps(sigmas, mu)`,
/// which works in f32.
pub fn sigmas(json: &FlowMatchJson, steps: usize, image_tokens: usize) -> Vec<f32> {
    let mut sigmas: Vec<f32> = linspace(1.0, 1.0 / steps as f64, steps)
        .into_iter()
        .map(|s| s as f32)
        .collect();
    if json.use_dynamic_shifting {
        // A Python float against an f32 array stays f32 (NumPy 2).
        let scale = mu(json, image_tokens).exp() as f32;
        for sigma in &mut sigmas {
            *sigma = scale / (scale + (1.0 / *sigma - 1.0));
        }
    } else {
        let shift = json.shift as f32;
        for sigma in &mut sigmas {
            *sigma = shift * *sigma / (1.0 + (shift - 1.0) * *sigma);
        }
    }
    if let Some(terminal) = json.shift_terminal {
        stretch_to_terminal(&mut sigmas, terminal as f32);
    }
    sigmas.push(0.0);
    sigmas
}

/// The timesteps the transformer is told: σ × `num_train_timesteps`.
pub fn timesteps(json: &FlowMatchJson, sigmas: &[f32]) -> Vec<f32> {
    let scale = json.num_train_timesteps as f32;
    sigmas[..sigmas.len() - 1]
        .iter()
        .map(|s| s * scale)
        .collect()
}

/// diffusers' `stretch_shift_to_terminal`: rescales `1 − σ` so the last
/// sigma lands on `terminal`.
fn stretch_to_terminal(sigmas: &mut [f32], terminal: f32) {
    let Some(&last) = sigmas.last() else {
        return;
    };
    let factor = (1.0 - last) / (1.0 - terminal);
    for sigma in sigmas {
        *sigma = 1.0 - (1.0 - *sigma) / factor;
    }
}

/// NumPy's `linspace(start, stop, count)` in f64.
fn linspace(start: f64, stop: f64, count: usize) -> Vec<f64> {
    if count == 1 {
        return vec![start];
    }
    let step = (stop - start) / (count - 1) as f64;
    (0..count)
        .map(|i| {
            if i == count - 1 {
                stop
            } else {
                start + i as f64 * step
            }
        })
        .collect()
}

/// img2img: the index of the first step run for `strength` (diffusers'
/// `FluxImg2ImgPipeline.get_timesteps`, which keeps the fractional part
/// of `steps × strength` where the SD pipelines floor it).
pub fn first_step(steps: usize, strength: f64) -> usize {
    let kept = (steps as f64 * strength).min(steps as f64);
    ((steps as f64 - kept).max(0.0)) as usize
}
