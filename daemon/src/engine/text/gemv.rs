//! Products of a few rows with an f32 weight matrix on the CPU: what a
//! decode step of a batch of sequences is made of.
//!
//! gemm packs the whole weight matrix on every call when the left side has
//! more than one row, which costs several times the read of the weights
//! that a decode step is bound by. Here each weight row is read once, from
//! memory into cache, and dotted with every input row while it is there;
//! the output features are split across rayon's threads. Each output is the
//! same dot product whatever the number of rows, so a sequence's logits are
//! bit for bit the same alone and in a batch.

use rayon::prelude::*;

/// Output features one task computes: a few hundred KiB of weights.
const FEATURES_PER_TASK: usize = 64;

/// `x` (`rows × inputs`, row-major) times the transpose of `w`
/// (`features × inputs`, row-major): `rows × features`, row-major.
pub fn few_rows(x: &[f32], rows: usize, w: &[f32], features: usize, inputs: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * inputs);
    debug_assert_eq!(w.len(), features * inputs);
    // Computed feature-major, so each task writes one contiguous block.
    let mut by_feature = vec![0f32; features * rows];
    by_feature
        .par_chunks_mut(FEATURES_PER_TASK * rows)
        .enumerate()
        .for_each(|(task, block)| {
            let first = task * FEATURES_PER_TASK;
            let count = block.len() / rows;
            let weights = &w[first * inputs..(first + count) * inputs];
            dot_block(x, rows, weights, inputs, block);
        });
    let mut out = vec![0f32; rows * features];
    for (feature, values) in by_feature.chunks_exact(rows).enumerate() {
        for (row, value) in values.iter().enumerate() {
            out[row * features + feature] = *value;
        }
    }
    out
}

/// Fills `block` (`count × rows`) with each weight row dotted with each
/// input row, using the widest vector instructions the CPU has.
fn dot_block(x: &[f32], rows: usize, weights: &[f32], inputs: usize, block: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // Safety: the CPU has the features the function is compiled for.
            unsafe { dot_block_avx2(x, rows, weights, inputs, block) };
            return;
        }
    }
    dot_block_with::<false>(x, rows, weights, inputs, block);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2(
    x: &[f32],
    rows: usize,
    weights: &[f32],
    inputs: usize,
    block: &mut [f32],
) {
    dot_block_with::<true>(x, rows, weights, inputs, block);
}

#[inline(always)]
fn dot_block_with<const FMA: bool>(
    x: &[f32],
    rows: usize,
    weights: &[f32],
    inputs: usize,
    block: &mut [f32],
) {
    let count = block.len() / rows;
    let mut feature = 0;
    while feature + 2 <= count {
        dot_features::<FMA, 2>(x, rows, weights, inputs, block, feature);
        feature += 2;
    }
    if feature < count {
        dot_features::<FMA, 1>(x, rows, weights, inputs, block, feature);
    }
}

/// `W` weight rows from `first`, dotted with every input row, four input
/// rows at a time: each vector of weights loaded feeds `4 × W` sums.
#[inline(always)]
fn dot_features<const FMA: bool, const W: usize>(
    x: &[f32],
    rows: usize,
    weights: &[f32],
    inputs: usize,
    block: &mut [f32],
    first: usize,
) {
    let w: [&[f32]; W] = std::array::from_fn(|i| &weights[(first + i) * inputs..][..inputs]);
    let mut row = 0;
    while row + 4 <= rows {
        let xs: [&[f32]; 4] = std::array::from_fn(|j| &x[(row + j) * inputs..][..inputs]);
        let sums = tile::<FMA, W, 4>(w, xs);
        for (i, per_row) in sums.iter().enumerate() {
            for (j, sum) in per_row.iter().enumerate() {
                block[(first + i) * rows + row + j] = *sum;
            }
        }
        row += 4;
    }
    while row < rows {
        let xs = [&x[row * inputs..][..inputs]];
        let sums = tile::<FMA, W, 1>(w, xs);
        for (i, per_row) in sums.iter().enumerate() {
            block[(first + i) * rows + row] = per_row[0];
        }
        row += 1;
    }
}

/// Lanes summed separately, so the compiler keeps them in vector registers
/// (it may not reorder floating-point sums itself).
const LANES: usize = 8;

/// Dot products of `W` weight rows with `X` input rows of equal length.
/// A sum depends only on its two rows, never on `W` or `X`.
#[inline(always)]
fn tile<const FMA: bool, const W: usize, const X: usize>(
    w: [&[f32]; W],
    x: [&[f32]; X],
) -> [[f32; X]; W] {
    let len = x[0].len();
    let body = len - len % LANES;
    let mut acc = [[[0f32; LANES]; X]; W];
    let mut at = 0;
    while at < body {
        let wv: [[f32; LANES]; W] = std::array::from_fn(|i| lanes(w[i], at));
        let xv: [[f32; LANES]; X] = std::array::from_fn(|j| lanes(x[j], at));
        for i in 0..W {
            for j in 0..X {
                for lane in 0..LANES {
                    acc[i][j][lane] = if FMA {
                        wv[i][lane].mul_add(xv[j][lane], acc[i][j][lane])
                    } else {
                        acc[i][j][lane] + wv[i][lane] * xv[j][lane]
                    };
                }
            }
        }
        at += LANES;
    }
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let mut sum = 0f32;
            for lane in acc[i][j] {
                sum += lane;
            }
            for k in body..len {
                sum += w[i][k] * x[j][k];
            }
            sum
        })
    })
}

#[inline(always)]
fn lanes(row: &[f32], at: usize) -> [f32; LANES] {
    row[at..at + LANES].try_into().expect("LANES values")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product_and_is_the_same_for_any_row_count() {
        let (rows, features, inputs) = (5, 300, 100);
        let x: Vec<f32> = (0..rows * inputs)
            .map(|i| ((i * 7) % 13) as f32 / 13.0)
            .collect();
        let w: Vec<f32> = (0..features * inputs)
            .map(|i| ((i * 5) % 11) as f32 / 11.0 - 0.5)
            .collect();
        let out = few_rows(&x, rows, &w, features, inputs);
        for r in 0..rows {
            for f in 0..features {
                let expected: f32 = (0..inputs)
                    .map(|i| x[r * inputs + i] * w[f * inputs + i])
                    .sum();
                assert!((out[r * features + f] - expected).abs() < 1e-4);
            }
        }
        let alone = few_rows(&x[2 * inputs..3 * inputs], 1, &w, features, inputs);
        assert_eq!(alone, out[2 * features..3 * features]);
    }
}
