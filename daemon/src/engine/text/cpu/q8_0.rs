//! Q8_0 weights (blocks of 32 int8 values and an f16 scale) dotted with
//! activations quantized the same way, as llama.cpp does.
//!
//! candle's dot product converts both f16 scales through a function call
//! per 32 values, which made it compute-bound at a fifth of the memory's
//! speed. Here the activations' scales are f32 already, the weights' are
//! converted inline, and up to four activation rows share each weight
//! block while it is in registers: AVX-512 VNNI or AVX-VNNI multiply-adds
//! where the CPU has them, AVX2 otherwise, chosen at run time. Every path
//! computes the same integer sums (the values lie in ±127, so no 16-bit
//! sum saturates) and adds them in the same order, so a row's result does
//! not depend on the batch or on the instructions used.

use half::f16;

pub const BLOCK: usize = 32;
/// Bytes of one weight block: the f16 scale, then 32 values.
const BLOCK_BYTES: usize = 34;

/// Activation rows quantized to Q8_0: values and per-block scales.
pub struct Q8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    inputs: usize,
}

impl Q8Rows {
    /// As llama.cpp's reference: scale `max|x| / 127` rounded to f16,
    /// values rounded half away from zero.
    pub fn quantize(x: &[f32], inputs: usize) -> Self {
        let mut values = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        for (block, out) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = f16::from_f32(max / 127.0).to_f32();
            let inverse = if max == 0.0 { 0.0 } else { 127.0 / max };
            for (q, v) in out.iter_mut().zip(block) {
                *q = (v * inverse).round() as i8;
            }
            scales.push(scale);
        }
        Q8Rows {
            values,
            scales,
            inputs,
        }
    }

    fn rows(&self) -> usize {
        self.values.len() / self.inputs
    }
}

/// Weight rows `first..` of a Q8_0 matrix in `bytes`, each dotted with
/// every activation row: fills `out[f * rows + r]`.
pub fn dot_features(bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut [f32]) {
    let rows = acts.rows();
    let row_bytes = acts.inputs / BLOCK * BLOCK_BYTES;
    for (f, sums) in out.chunks_exact_mut(rows).enumerate() {
        let weights = &bytes[(first + f) * row_bytes..][..row_bytes];
        let mut r = 0;
        while r < rows {
            let tile = (rows - r).min(4);
            dot_tile(weights, acts, r, &mut sums[r..r + tile]);
            r += tile;
        }
    }
}

/// One weight row with activation rows `first_row..first_row + out.len()`.
fn dot_tile(weights: &[u8], acts: &Q8Rows, first_row: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::features::{x86, X86};
        match x86() {
            // SAFETY: each arm runs only on a CPU with its features.
            X86::Avx512Vnni => {
                return unsafe { x86_64::tile_avx512vnni(weights, acts, first_row, out) }
            }
            X86::AvxVnni => return unsafe { x86_64::tile_avxvnni(weights, acts, first_row, out) },
            X86::Avx2 => return unsafe { x86_64::tile_avx2(weights, acts, first_row, out) },
            X86::None => {}
        }
    }
    portable_tile(weights, acts, first_row, out);
}

/// The same sums in plain Rust: per block an integer dot product, scaled
/// and added into one of two running sums by the block's parity, as the
/// vector paths do lane by lane.
fn portable_tile(weights: &[u8], acts: &Q8Rows, first_row: usize, out: &mut [f32]) {
    let blocks = acts.inputs / BLOCK;
    for (i, slot) in out.iter_mut().enumerate() {
        let row = first_row + i;
        let mut lanes = [[0f32; 8]; 2];
        for b in 0..blocks {
            let block = &weights[b * BLOCK_BYTES..][..BLOCK_BYTES];
            let scale =
                f16::from_le_bytes([block[0], block[1]]).to_f32() * acts.scales[row * blocks + b];
            let x = &acts.values[(row * blocks + b) * BLOCK..][..BLOCK];
            for (lane, sum) in lanes[b % 2].iter_mut().enumerate() {
                let dot: i32 = (0..4)
                    .map(|k| block[2 + lane * 4 + k] as i8 as i32 * x[lane * 4 + k] as i32)
                    .sum();
                *sum = scale.mul_add(dot as f32, *sum);
            }
        }
        let mut lanes8 = [0f32; 8];
        for (lane, v) in lanes8.iter_mut().enumerate() {
            *v = lanes[0][lane] + lanes[1][lane];
        }
        *slot = super::f32::horizontal(lanes8);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use super::{Q8Rows, BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// Generates one tile kernel per instruction set: `$dot` turns a
    /// block's absolute weights and sign-adjusted activations into eight
    /// 32-bit sums of four products each.
    macro_rules! tile_kernel {
        ($name:ident, $features:literal, |$a:ident, $b:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(weights: &[u8], acts: &Q8Rows, first_row: usize, out: &mut [f32]) {
                let blocks = acts.inputs / BLOCK;
                assert!(weights.len() >= blocks * BLOCK_BYTES && out.len() <= 4);
                assert!(acts.values.len() >= (first_row + out.len()) * acts.inputs);
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                let wp = weights.as_ptr();
                for b in 0..blocks {
                    // SAFETY: block `b` of this row is inside `weights`.
                    let (bits, w) = unsafe {
                        let block = wp.add(b * BLOCK_BYTES);
                        (
                            u16::from_le_bytes([*block, *block.add(1)]),
                            _mm256_loadu_si256(block.add(2) as *const __m256i),
                        )
                    };
                    let w_scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
                    let abs_w = _mm256_sign_epi8(w, w);
                    for (i, acc) in acc.iter_mut().enumerate().take(out.len()) {
                        let at = (first_row + i) * blocks + b;
                        // SAFETY: row `first_row + i` is inside `acts`.
                        let x = unsafe {
                            _mm256_loadu_si256(
                                acts.values.as_ptr().add(at * BLOCK) as *const __m256i
                            )
                        };
                        let signed_x = _mm256_sign_epi8(x, w);
                        let ($a, $b) = (abs_w, signed_x);
                        let sums = _mm256_cvtepi32_ps($dot);
                        let scale = _mm256_set1_ps(w_scale * acts.scales[at]);
                        acc[b % 2] = _mm256_fmadd_ps(scale, sums, acc[b % 2]);
                    }
                }
                for (slot, acc) in out.iter_mut().zip(acc) {
                    let sum = _mm256_add_ps(acc[0], acc[1]);
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds eight f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
                    *slot = super::super::f32::horizontal(lanes);
                }
            }
        };
    }

    tile_kernel!(tile_avx2, "avx2,fma,f16c", |a, b| _mm256_madd_epi16(
        _mm256_maddubs_epi16(a, b),
        _mm256_set1_epi16(1)
    ));
    tile_kernel!(tile_avxvnni, "avx2,fma,f16c,avxvnni", |a, b| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    });
    tile_kernel!(
        tile_avx512vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |a, b| _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let inputs = 256;
        let x: Vec<f32> = (0..4 * inputs)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let acts = Q8Rows::quantize(&x, inputs);
        let mut weights = Vec::new();
        for b in 0..inputs / BLOCK {
            weights.extend(f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
            weights.extend((0..BLOCK).map(|i| ((i * 29 + b * 7) % 255) as u8));
        }
        let mut portable = [0f32; 4];
        portable_tile(&weights, &acts, 0, &mut portable);
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::features::{x86, X86};
            let best = x86();
            let mut got = [0f32; 4];
            // SAFETY: each path runs only when the CPU has its features.
            unsafe {
                if best != X86::None {
                    x86_64::tile_avx2(&weights, &acts, 0, &mut got);
                    assert_eq!(got.map(f32::to_bits), portable.map(f32::to_bits), "AVX2");
                }
                if best == X86::Avx512Vnni {
                    x86_64::tile_avx512vnni(&weights, &acts, 0, &mut got);
                    assert_eq!(
                        got.map(f32::to_bits),
                        portable.map(f32::to_bits),
                        "AVX-512 VNNI"
                    );
                }
                if std::is_x86_feature_detected!("avxvnni") && best != X86::None {
                    x86_64::tile_avxvnni(&weights, &acts, 0, &mut got);
                    assert_eq!(
                        got.map(f32::to_bits),
                        portable.map(f32::to_bits),
                        "AVX-VNNI"
                    );
                }
            }
            // One row alone equals its place in the tile.
            let mut alone = [0f32; 1];
            dot_tile(&weights, &acts, 2, &mut alone);
            assert_eq!(alone[0].to_bits(), portable[2].to_bits());
        }
    }
}
