//! Seeded initial latents: standard normal noise from a small counter-based
//! generator, so one seed gives the same picture on every device and run
//! without touching any device-global random state.

use candle_core::{Device, Tensor};

/// Where the noise a run draws after its initial latents comes from (the
/// stochastic schedulers' steps, img2img's posterior sample): the
/// request's seeds in a run, the reference's draws in the tests.
pub trait StepNoise {
    /// Standard normal noise shaped like `like`.
    fn noise(&mut self, like: &Tensor) -> candle_core::Result<Tensor>;
}

/// SplitMix64: a 64-bit generator with good statistical quality for noise.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// `len` standard normal values for `seed` (Box–Muller).
pub fn standard_normal(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    let mut values = Vec::with_capacity(len + 1);
    while values.len() < len {
        let radius = (-2.0 * rng.next_unit().ln()).sqrt();
        let angle = std::f64::consts::TAU * rng.next_unit();
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(len);
    values
}

/// The seed of draw `draw` for the picture seeded `seed`: a SplitMix64
/// mix, so the draws of one picture and those of its neighbours in a batch
/// (`seed + 1`, ...) are unrelated streams.
pub fn draw_seed(seed: u64, draw: u64) -> u64 {
    let mut rng = SplitMix64(seed ^ draw.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64()
}

/// The noise a run draws after its initial latents (img2img's posterior
/// sample, the stochastic schedulers' per-step noise): draw `k` of
/// picture `i` is seeded by `draw_seed(seed + i, k + 1)`, so each picture
/// of a batch can still be reproduced on its own.
pub struct SeededNoise {
    seed: u64,
    draws: u64,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        SeededNoise { seed, draws: 0 }
    }
}

impl StepNoise for SeededNoise {
    fn noise(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        self.draws += 1;
        let count = like.dim(0)?;
        let per_image = like.elem_count() / count.max(1);
        let values: Vec<f32> = (0..count as u64)
            .flat_map(|i| {
                let seed = draw_seed(self.seed.wrapping_add(i), self.draws);
                standard_normal(seed, per_image)
            })
            .collect();
        Tensor::from_vec(values, like.shape(), &Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_different_seed_different_noise() {
        assert_eq!(standard_normal(7, 1001), standard_normal(7, 1001));
        assert_ne!(standard_normal(7, 16), standard_normal(8, 16));
    }

    #[test]
    fn seeded_draws_differ_per_draw_and_repeat_per_seed() {
        let like = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let draw = |noise: &mut SeededNoise| noise.noise(&like).unwrap().flatten_all().unwrap();
        let (mut a, mut b) = (SeededNoise::new(5), SeededNoise::new(5));
        let first = draw(&mut a).to_vec1::<f32>().unwrap();
        assert_eq!(first, draw(&mut b).to_vec1::<f32>().unwrap());
        assert_ne!(first, draw(&mut a).to_vec1::<f32>().unwrap());
        // Picture 1 of seed 5 draws what picture 0 of seed 6 draws.
        let alone = draw(&mut SeededNoise::new(6)).to_vec1::<f32>().unwrap();
        assert_eq!(first[12..], alone[..12]);
    }

    #[test]
    fn noise_is_standard_normal() {
        let values = standard_normal(42, 200_000);
        let n = values.len() as f64;
        let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (*v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }
}
