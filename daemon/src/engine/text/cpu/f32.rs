//! f32 dot products of weight rows with a few activation rows.
//!
//! Decode is bound by reading the weights, so each weight row is read from
//! memory once and dotted with every activation row while it sits in L1.
//! A dot product's arithmetic (four 8-lane accumulators over 32-value
//! chunks, summed the same way, then the tail) depends only on its two
//! rows, so a sequence's logits are bit for bit the same alone and in any
//! batch, on any number of threads.

/// Values per chunk: four accumulators of eight lanes.
const CHUNK: usize = 32;

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    super::features::x86() != super::features::X86::None
}

/// Weight rows `first..` of `w` (rows of `inputs`), each dotted with
/// every row of `x`: fills `out[f * rows + r]`, with the instruction set
/// picked once for all of them.
pub fn dot_features(w: &[f32], inputs: usize, first: usize, x: &[f32], out: &mut [f32]) {
    let rows = x.len() / inputs;
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA, checked above.
            unsafe { avx2::dot_features(w, inputs, first, x, rows, out) };
            return;
        }
    }
    for (f, sums) in out.chunks_exact_mut(rows).enumerate() {
        portable_dot_rows(&w[(first + f) * inputs..][..inputs], x, sums);
    }
}

fn portable_dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    let n = w.len();
    for (r, slot) in out.iter_mut().enumerate() {
        *slot = portable_dot(w, &x[r * n..(r + 1) * n]);
    }
}

/// The same order of sums as the AVX2 kernel, without fused multiply-adds.
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let body = a.len() - a.len() % CHUNK;
    let mut acc = [[0f32; 8]; 4];
    for at in (0..body).step_by(CHUNK) {
        for (k, lanes) in acc.iter_mut().enumerate() {
            for (lane, sum) in lanes.iter_mut().enumerate() {
                let i = at + k * 8 + lane;
                *sum += a[i] * b[i];
            }
        }
    }
    let mut lanes = [0f32; 8];
    for (lane, sum) in lanes.iter_mut().enumerate() {
        *sum = (acc[0][lane] + acc[1][lane]) + (acc[2][lane] + acc[3][lane]);
    }
    let mut total = horizontal(lanes);
    for i in body..a.len() {
        total += a[i] * b[i];
    }
    total
}

/// Sums eight lanes pairwise, as the AVX2 kernel's reduction does.
pub(super) fn horizontal(l: [f32; 8]) -> f32 {
    let quad = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let pair = [quad[0] + quad[2], quad[1] + quad[3]];
    pair[0] + pair[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{horizontal, CHUNK};
    use crate::engine::text::cpu::prefetch_ahead;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_features(
        w: &[f32],
        inputs: usize,
        first: usize,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        for (f, sums) in out.chunks_exact_mut(rows).enumerate() {
            dot_rows(&w[(first + f) * inputs..][..inputs], x, sums);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
        let n = w.len();
        let rows = out.len();
        assert!(
            x.len() >= rows * n,
            "activation rows shorter than the weights"
        );
        let mut r = 0;
        while r + 2 <= rows {
            let (a, b) = dot2(w, &x[r * n..(r + 1) * n], &x[(r + 1) * n..(r + 2) * n]);
            out[r] = a;
            out[r + 1] = b;
            r += 2;
        }
        if r < rows {
            out[r] = dot1(w, &x[r * n..(r + 1) * n]);
        }
    }

    /// One weight row with one activation row.
    #[target_feature(enable = "avx2,fma")]
    fn dot1(w: &[f32], x: &[f32]) -> f32 {
        let body = w.len() - w.len() % CHUNK;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut at = 0;
        while at < body {
            // A chunk is two cache lines.
            prefetch_ahead(w, at * 4);
            prefetch_ahead(w, at * 4 + 64);
            for (k, sum) in acc.iter_mut().enumerate() {
                // SAFETY: `at + k * 8 + 8 <= body <= len` for both rows.
                let (wv, xv) = unsafe {
                    (
                        _mm256_loadu_ps(wp.add(at + k * 8)),
                        _mm256_loadu_ps(xp.add(at + k * 8)),
                    )
                };
                *sum = _mm256_fmadd_ps(wv, xv, *sum);
            }
            at += CHUNK;
        }
        finish(acc, w, x, body)
    }

    /// One weight row with two activation rows: each weight vector loaded
    /// once feeds both, with the same per-row arithmetic as [`dot1`].
    #[target_feature(enable = "avx2,fma")]
    fn dot2(w: &[f32], x0: &[f32], x1: &[f32]) -> (f32, f32) {
        let body = w.len() - w.len() % CHUNK;
        let (wp, p0, p1) = (w.as_ptr(), x0.as_ptr(), x1.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut at = 0;
        while at < body {
            // A chunk is two cache lines.
            prefetch_ahead(w, at * 4);
            prefetch_ahead(w, at * 4 + 64);
            for k in 0..4 {
                let i = at + k * 8;
                // SAFETY: `i + 8 <= body <= len` for the three rows.
                let (wv, v0, v1) = unsafe {
                    (
                        _mm256_loadu_ps(wp.add(i)),
                        _mm256_loadu_ps(p0.add(i)),
                        _mm256_loadu_ps(p1.add(i)),
                    )
                };
                a0[k] = _mm256_fmadd_ps(wv, v0, a0[k]);
                a1[k] = _mm256_fmadd_ps(wv, v1, a1[k]);
            }
            at += CHUNK;
        }
        (finish(a0, w, x0, body), finish(a1, w, x1, body))
    }

    /// Reduces the accumulators as the portable kernel does, then adds the
    /// tail past the last whole chunk.
    #[target_feature(enable = "avx2,fma")]
    fn finish(acc: [__m256; 4], w: &[f32], x: &[f32], body: usize) -> f32 {
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut total = horizontal(lanes);
        for i in body..w.len() {
            total = w[i].mul_add(x[i], total);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 17.0)
            .collect()
    }

    #[test]
    fn matches_a_plain_sum_and_each_row_alone() {
        for n in [1, 31, 32, 100, 576] {
            let w = values(n, 1);
            let x = values(5 * n, 2);
            let mut out = [0f32; 5];
            dot_features(&w, n, 0, &x, &mut out);
            for (r, got) in out.iter().enumerate() {
                let row = &x[r * n..(r + 1) * n];
                let plain: f32 = w.iter().zip(row).map(|(a, b)| a * b).sum();
                assert!(
                    (got - plain).abs() < 1e-3,
                    "n {n} row {r}: {got} vs {plain}"
                );
                let mut alone = [0f32];
                dot_features(&w, n, 0, row, &mut alone);
                assert_eq!(alone[0].to_bits(), got.to_bits(), "n {n} row {r}");
            }
        }
    }
}
