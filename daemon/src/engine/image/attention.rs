//! Scaled dot-product attention on the CPU without the quadratic score
//! tensor. Queries go through in blocks, each block's scores in a buffer
//! its thread keeps, so a run allocates (and the kernel faults in) nothing
//! larger than `QUERY_BLOCK × keys` floats per thread, whatever the
//! picture's size; the softmax's exponentials are a polynomial the
//! compiler vectorizes. Other devices take the unfused path.

use std::cell::RefCell;

use crate::engine::interrupt;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::conv::with_f32;

/// Query rows per block at most: a block's scores for 4096 keys are 1 MiB.
const QUERY_BLOCK: usize = 64;

/// Scores per block at most (4 MiB), so that very long rows (the VAE's
/// attention over a large picture's every position) take fewer rows.
const BLOCK_SCORES: usize = 1 << 20;

thread_local! {
    /// One block's scores, kept between blocks and runs.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `softmax(q · kᵀ × scale) · v` over `(batch, heads, tokens, head_dim)`
/// f32 tensors, in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !q.device().is_cpu() {
        let scores = (q.matmul(&k.t()?)? * scale)?;
        return candle_nn::ops::softmax_last_dim(&scores)?.matmul(v);
    }
    let (batch, heads, queries, dim) = q.dims4()?;
    let keys = k.dim(2)?;
    let shape = Shape { queries, keys, dim };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let out = with_f32(&q, |q| {
        with_f32(&k, |k| {
            with_f32(&v, |v| Ok(cpu_attention(q, k, v, shape, scale as f32)))
        })
    })?;
    // A stop skips the blocks left; what they would have held is dropped.
    interrupt::check()?;
    Tensor::from_vec(out, (batch, heads, queries, dim), &Device::Cpu)
}

/// `(batch, seq, heads × head_dim)` → `(batch, heads, seq, head_dim)` in
/// f32, where attention is computed whatever the model's dtype.
pub fn split_heads(heads: usize, xs: &Tensor) -> Result<Tensor> {
    let (batch, seq, dim) = xs.dims3()?;
    xs.reshape((batch, seq, heads, dim / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(DType::F32)
}

/// `(batch, heads, seq, head_dim)` → `shape` (batch, seq, heads ×
/// head_dim) at `dtype`: the inverse of `split_heads`.
pub fn merge_heads(xs: &Tensor, dtype: DType, shape: (usize, usize, usize)) -> Result<Tensor> {
    xs.to_dtype(dtype)?.transpose(1, 2)?.reshape(shape)
}

/// Softmax of `scores` applied to `v`, heads merged back into `shape`
/// (batch, seq, dim) at `dtype`.
pub fn attend(
    scores: &Tensor,
    v: &Tensor,
    dtype: DType,
    shape: (usize, usize, usize),
) -> Result<Tensor> {
    let out = candle_nn::ops::softmax_last_dim(scores)?.matmul(v)?;
    merge_heads(&out, dtype, shape)
}

/// The sizes of one head's attention.
#[derive(Debug, Clone, Copy)]
struct Shape {
    queries: usize,
    keys: usize,
    dim: usize,
}

/// Every head of `q`, `k`, `v` (row-major `[heads][tokens][dim]`), heads
/// and query blocks spread over rayon's threads.
fn cpu_attention(q: &[f32], k: &[f32], v: &[f32], shape: Shape, scale: f32) -> Vec<f32> {
    let Shape { queries, keys, dim } = shape;
    let mut out = vec![0f32; q.len()];
    if queries == 0 || dim == 0 {
        return out;
    }
    // rayon's threads do not see the caller's job: take it along.
    let job = interrupt::current();
    let stopped = || job.as_ref().is_some_and(|job| job.is_requested());
    out.par_chunks_mut(queries * dim)
        .enumerate()
        .for_each(|(head, out)| {
            let q = &q[head * queries * dim..][..queries * dim];
            let k = &k[head * keys * dim..][..keys * dim];
            let v = &v[head * keys * dim..][..keys * dim];
            let rows = (BLOCK_SCORES / keys.max(1)).clamp(1, QUERY_BLOCK);
            out.par_chunks_mut(rows * dim)
                .enumerate()
                .for_each(|(block, out)| {
                    if stopped() {
                        return;
                    }
                    let q = &q[block * rows * dim..][..out.len()];
                    attend_block(q, k, v, out, shape, scale);
                });
        });
    out
}

/// One block of query rows: scores into the thread's buffer, softmax in
/// place, then the weighted sum of `v` into `out`, normalized per row.
fn attend_block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], shape: Shape, scale: f32) {
    let Shape { keys, dim, .. } = shape;
    let rows = q.len() / dim;
    SCORES.with(|scores| {
        let mut scores = scores.borrow_mut();
        scores.resize(rows * keys, 0.0);
        // SAFETY: every pointer and stride stays inside its slice:
        // `scores` is rows × keys, `q` rows × dim, `k` keys × dim read as
        // its transpose, `v` keys × dim and `out` rows × dim, all
        // row-major; `dst` is written only.
        unsafe {
            gemm::gemm(
                rows,
                keys,
                dim,
                scores.as_mut_ptr(),
                1,
                keys as isize,
                false,
                q.as_ptr(),
                1,
                dim as isize,
                k.as_ptr(),
                dim as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let sums = softmax_rows(&mut scores, keys);
        // SAFETY: as above.
        unsafe {
            gemm::gemm(
                rows,
                dim,
                keys,
                out.as_mut_ptr(),
                1,
                dim as isize,
                false,
                scores.as_ptr(),
                1,
                keys as isize,
                v.as_ptr(),
                1,
                dim as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, sum) in out.chunks_exact_mut(dim).zip(sums) {
            let inverse = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inverse);
        }
    });
}

/// Each row of `scores` (`keys` wide) as its unnormalized softmax, using
/// the widest vector instructions the CPU has; returns the rows' sums.
fn softmax_rows(scores: &mut [f32], keys: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { softmax_rows_avx2(scores, keys) };
        }
    }
    softmax_rows_with(scores, keys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(scores: &mut [f32], keys: usize) -> Vec<f32> {
    softmax_rows_with(scores, keys)
}

/// Plain loops only: an iterator adapter that is not inlined would be
/// compiled without the caller's target features.
#[inline(always)]
fn softmax_rows_with(scores: &mut [f32], keys: usize) -> Vec<f32> {
    let mut sums = Vec::with_capacity(scores.len() / keys);
    for row in scores.chunks_exact_mut(keys) {
        sums.push(softmax_unnormalized(row));
    }
    sums
}

/// Lanes of the reductions below, so the compiler keeps them in vectors.
const LANES: usize = 8;

/// `row[i] = exp(row[i] − max(row))`; returns their sum.
#[inline(always)]
fn softmax_unnormalized(row: &mut [f32]) -> f32 {
    let max = lanes_fold(row, f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = crate::engine::math::exp(*x - max);
    }
    lanes_fold(row, 0.0, |a, b| a + b)
}

/// `values` folded with `op` over `LANES` running accumulators, then across
/// them.
#[inline(always)]
fn lanes_fold(values: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = op(*lane, x);
        }
    }
    let folded = lanes.into_iter().fold(init, &op);
    rest.iter().fold(folded, |a, &b| op(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::image::test_support::max_abs_diff;

    /// Odd sizes (a last block shorter than the others, keys not a
    /// multiple of the lanes, rows so long that a block holds fewer of
    /// them) against the unfused maths.
    #[test]
    fn blocked_attention_matches_the_unfused_product() {
        let device = Device::Cpu;
        for (queries, keys, dim) in [(150, 77, 8), (64, 64, 4), (3, 200, 40), (150, 30_000, 2)] {
            let q = Tensor::randn(0f32, 1.0, (2, 3, queries, dim), &device).expect("q");
            let k = Tensor::randn(0f32, 1.0, (2, 3, keys, dim), &device).expect("k");
            let v = Tensor::randn(0f32, 1.0, (2, 3, keys, dim), &device).expect("v");
            let scale = (dim as f64).powf(-0.5);
            let fused = attention(&q, &k, &v, scale).expect("fused");
            let scores = (q.matmul(&k.t().expect("t")).expect("qk") * scale).expect("scale");
            let unfused = candle_nn::ops::softmax_last_dim(&scores)
                .and_then(|p| p.matmul(&v))
                .expect("unfused");
            let diff = max_abs_diff(&fused, &unfused);
            assert!(diff < 1e-5, "{queries}x{keys}x{dim}: {diff}");
        }
    }
}
