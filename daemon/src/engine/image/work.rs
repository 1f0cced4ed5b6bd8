//! The computing a picture takes, estimated before it runs from the shapes
//! of the networks. On the CPU a large picture, many steps or many
//! pictures can take hours; a memory bound does not see that, so a request
//! whose estimate exceeds `scheduler.max_job_s` is refused up front,
//! naming the parameter to lower and how far.
//!
//! A network's cost is counted from its weights: a weight is used once per
//! position of the level it runs at (a 3x3 convolution's 9 taps are 9
//! weights), so a pass is `2 × Σ weights × positions` operations, plus
//! `4 × positions² × channels` for each self-attention.

use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::weights::TensorMap;
use crate::validate::ValidationError;

/// The share of the CPU's matrix-product speed that a whole denoising step
/// reaches (convolutions, norms and memory-bound element-wise work
/// included). Measured on the SD1.5-shaped bench pipeline; see
/// BENCHMARKS.md.
const CPU_EFFICIENCY: f64 = 0.5;

/// A network's weights and self-attentions by the number of positions they
/// run over, as a multiple of the network's base count.
#[derive(Debug, Clone, Default)]
pub struct Network {
    /// `(positions scale, weights)`.
    weights: Vec<(f64, u64)>,
    /// `(positions scale, channels)` of each self-attention.
    attentions: Vec<(f64, u64)>,
}

impl Network {
    /// Reads `tensors`: `scale_of` gives the positions scale of a tensor
    /// by name (`None`: not run per position, such as time embeddings),
    /// and `is_self_query` picks the query weights of self-attentions.
    pub fn of(
        tensors: &TensorMap,
        scale_of: impl Fn(&str) -> Option<f64>,
        is_self_query: impl Fn(&str) -> bool,
    ) -> Self {
        let mut network = Network::default();
        for (name, tensor) in tensors {
            let Some(scale) = scale_of(name) else {
                continue;
            };
            network.weights.push((scale, tensor.elem_count() as u64));
            if is_self_query(name) {
                let channels = tensor.dims().first().copied().unwrap_or(0);
                network.attentions.push((scale, channels as u64));
            }
        }
        network
    }

    /// The weights used per position, scales applied.
    pub fn weights(&self) -> f64 {
        self.weights
            .iter()
            .map(|&(scale, w)| scale * w as f64)
            .sum()
    }

    /// Floating-point operations of one pass over `positions` at scale 1.
    pub fn flops(&self, positions: f64) -> f64 {
        let products: f64 = self
            .weights
            .iter()
            .map(|&(scale, weights)| 2.0 * weights as f64 * positions * scale)
            .sum();
        let attention: f64 = self
            .attentions
            .iter()
            .map(|&(scale, channels)| 4.0 * (positions * scale).powi(2) * channels as f64)
            .sum();
        products + attention
    }
}

/// The level of a diffusers UNet's tensor (`levels` resolution levels,
/// level `l` at `4^-l` of the input's positions).
pub fn unet_scale(name: &str, levels: usize) -> Option<f64> {
    let level = if let Some(rest) = name.strip_prefix("down_blocks.") {
        block_index(rest)?
    } else if let Some(rest) = name.strip_prefix("up_blocks.") {
        levels.checked_sub(1 + block_index(rest)?)?
    } else if name.starts_with("mid_block.") {
        levels.checked_sub(1)?
    } else if name.starts_with("conv_in.") || name.starts_with("conv_out.") {
        0
    } else {
        return None;
    };
    Some(0.25f64.powi(level as i32))
}

/// The positions scale of a VAE decoder's tensor, relative to the latent:
/// its up blocks run at `4^j` of the latent's positions, the last at the
/// picture's.
pub fn vae_decoder_scale(name: &str, levels: usize) -> Option<f64> {
    let rest = name.strip_prefix("decoder.")?;
    let level = if let Some(rest) = rest.strip_prefix("up_blocks.") {
        block_index(rest)?
    } else if rest.starts_with("conv_out.") {
        levels.checked_sub(1)?
    } else if rest.starts_with("mid_block.") || rest.starts_with("conv_in.") {
        0
    } else {
        return None;
    };
    Some(4f64.powi(level as i32))
}

fn block_index(rest: &str) -> Option<usize> {
    rest.split('.').next()?.parse().ok()
}

/// A diffusers VAE's decoder (`decoder.` keys of `tensors`).
pub fn vae_decoder(tensors: &TensorMap) -> Network {
    let levels = block_levels(tensors, "decoder.up_blocks.");
    Network::of(
        tensors,
        |name| vae_decoder_scale(name, levels),
        |name| {
            name.starts_with("decoder.mid_block.attentions.")
                && (name.ends_with("to_q.weight") || name.ends_with("query.weight"))
        },
    )
}

/// How many resolution levels a network's `prefix.N.` blocks span.
pub fn block_levels(tensors: &TensorMap, prefix: &str) -> usize {
    tensors
        .keys()
        .filter_map(|name| block_index(name.strip_prefix(prefix)?))
        .max()
        .map_or(1, |last| last + 1)
}

/// What a run costs: the work of one denoising step (all pictures, all
/// guidance passes), of decoding one picture, and how many of each.
#[derive(Debug, Clone, Copy)]
pub struct RunCost {
    /// The text encoders, once a run.
    pub encode_flops: f64,
    pub step_flops: f64,
    pub decode_flops: f64,
    pub steps: usize,
    pub count: usize,
}

impl RunCost {
    fn seconds(&self, steps: usize, count: usize, per_s: f64) -> f64 {
        let per_picture_step = self.step_flops / self.count.max(1) as f64;
        let flops = (per_picture_step * steps as f64 + self.decode_flops) * count as f64;
        (self.encode_flops + flops) / per_s
    }

    /// The seconds the whole run is estimated to take on this CPU.
    pub fn cpu_seconds(&self) -> f64 {
        self.seconds(self.steps, self.count, cpu_flops_per_s())
    }

    /// Refuses a run the CPU would not finish within `limit_s`, naming
    /// `size` when one step of one picture is already too much, else
    /// `steps` or `count` with the most that would fit.
    pub fn check_cpu(&self, limit_s: u64) -> Result<(), ValidationError> {
        self.check(limit_s, cpu_flops_per_s())
    }

    fn check(&self, limit_s: u64, per_s: f64) -> Result<(), ValidationError> {
        let estimate = self.seconds(self.steps, self.count, per_s);
        if estimate <= limit_s as f64 {
            return Ok(());
        }
        let limit = limit_s as f64;
        let one_step = self.seconds(1, 1, per_s);
        let all_steps = self.seconds(self.steps, 1, per_s);
        let (field, max) = if one_step > limit {
            ("size", None)
        } else if all_steps > limit {
            let step = one_step - self.seconds(0, 1, per_s);
            let decode = self.seconds(0, 1, per_s);
            ("steps", Some(((limit - decode) / step).floor() as u64))
        } else {
            ("count", Some((limit / all_steps).floor() as u64))
        };
        let message = format!(
            "this run would take about {} on this CPU, over scheduler.max_job_s ({limit_s} s){}",
            human_seconds(estimate),
            max.map_or(String::new(), |max| format!("; at most {max} would fit"))
        );
        let limit = match max {
            Some(max) => json!({"max": max, "scheduler.max_job_s": limit_s}),
            None => json!({"scheduler.max_job_s": limit_s, "estimated_s": estimate.round()}),
        };
        Err(ValidationError::new(field, message).with_limit(limit))
    }
}

fn human_seconds(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// What this CPU's whole denoising steps reach, in operations a second:
/// a matrix product timed once, scaled by [`CPU_EFFICIENCY`].
pub fn cpu_flops_per_s() -> f64 {
    static MEASURED: OnceLock<f64> = OnceLock::new();
    *MEASURED.get_or_init(|| matmul_flops_per_s().unwrap_or(1e10) * CPU_EFFICIENCY)
}

/// The best of three 512-square f32 products, after a warm-up.
fn matmul_flops_per_s() -> candle_core::Result<f64> {
    const N: usize = 512;
    let a = Tensor::ones((N, N), candle_core::DType::F32, &Device::Cpu)?;
    a.matmul(&a)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        a.matmul(&a)?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * (N * N * N) as f64 / best.max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(names: &[(&str, &[usize])]) -> TensorMap {
        names
            .iter()
            .map(|(name, shape)| {
                let tensor = Tensor::zeros(*shape, candle_core::DType::F32, &Device::Cpu).unwrap();
                (name.to_string(), tensor)
            })
            .collect()
    }

    #[test]
    fn weights_count_at_their_level_and_attention_is_quadratic() {
        let map = tensors(&[
            ("conv_in.weight", &[4, 4, 3, 3]),
            ("down_blocks.1.resnets.0.conv1.weight", &[8, 8, 3, 3]),
            (
                "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                &[8, 8],
            ),
            ("time_embedding.linear_1.weight", &[32, 4]),
        ]);
        let levels = block_levels(&map, "up_blocks.").max(2);
        let unet = Network::of(
            &map,
            |n| unet_scale(n, levels),
            |n| n.ends_with("attn1.to_q.weight"),
        );
        let positions = 16.0;
        let expected =
            2.0 * 144.0 * 16.0 + 2.0 * 576.0 * 4.0 + 2.0 * 64.0 * 4.0 + 4.0 * 4.0f64.powi(2) * 8.0;
        assert_eq!(unet.flops(positions), expected);
        let doubled = unet.flops(2.0 * positions);
        assert!(
            doubled > 2.0 * expected,
            "attention grows faster than the rest"
        );
    }

    #[test]
    fn vae_decoder_blocks_run_at_growing_sizes() {
        assert_eq!(
            vae_decoder_scale("decoder.mid_block.resnets.0.conv1.weight", 4),
            Some(1.0)
        );
        assert_eq!(
            vae_decoder_scale("decoder.up_blocks.2.resnets.0.conv1.weight", 4),
            Some(16.0)
        );
        assert_eq!(vae_decoder_scale("decoder.conv_out.weight", 4), Some(64.0));
        assert_eq!(vae_decoder_scale("encoder.conv_in.weight", 4), None);
    }

    #[test]
    fn too_much_work_names_the_parameter_to_lower() {
        // One step of one picture: 10 s; its decode: 5 s.
        let cost = |steps, count| RunCost {
            encode_flops: 0.0,
            step_flops: 10.0 * count as f64,
            decode_flops: 5.0,
            steps,
            count,
        };
        assert!(cost(10, 2).check(300, 1.0).is_ok());
        let steps = cost(40, 1).check(300, 1.0).unwrap_err();
        assert_eq!(steps.field, "steps");
        assert_eq!(steps.limit.as_ref().unwrap()["max"], 29);
        let count = cost(20, 4).check(300, 1.0).unwrap_err();
        assert_eq!(count.field, "count");
        assert_eq!(count.limit.as_ref().unwrap()["max"], 1);
        let size = cost(1, 1).check(10, 1.0).unwrap_err();
        assert_eq!(size.field, "size");
        assert!(
            size.message.contains("scheduler.max_job_s (10 s)"),
            "{}",
            size.message
        );
    }

    #[test]
    fn the_cpu_is_measured_once_and_plausibly() {
        let speed = cpu_flops_per_s();
        assert!(speed > 1e8 && speed < 1e14, "{speed}");
        assert_eq!(speed, cpu_flops_per_s());
    }
}
