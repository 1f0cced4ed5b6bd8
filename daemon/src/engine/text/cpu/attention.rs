//! One new token's attention in f32 on the CPU, read where the keys and
//! values lie in the KV cache.
//!
//! Through candle, a decode step's attention was two tiny matrix products
//! per sequence and layer, each paying the blocked product's set-up, and a
//! copy of every cached value into a contiguous tensor: a fifth of a small
//! model's step. Here each query head walks its key head's rows once for
//! the scores and once for the weighted values, with no copies.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// What the attention of one sequence needs besides its tensors.
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies each score, before any soft-capping.
    pub scale: f32,
    /// `tanh(score / cap) * cap` when set.
    pub softcap: Option<f32>,
    /// Keys before this position are out of the sliding window.
    pub first_visible: usize,
}

/// `q` `[1, heads, 1, d]` against `k` and `v` `[1, kv_heads, len, d]` (any
/// strides with contiguous rows, as the cache's views are): returns
/// `[1, heads * d]`, or `None` when a tensor is not f32 on the CPU.
pub fn attend_one(q: &Tensor, k: &Tensor, v: &Tensor, heads: &Heads) -> Result<Option<Tensor>> {
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (Some(q_data), Some(k_data), Some(v_data)) =
        (f32s(&q_storage), f32s(&k_storage), f32s(&v_storage))
    else {
        return Ok(None);
    };
    let d = heads.head_dim;
    let q = Rows::of(q_data, q_layout, d)?;
    let (k, v) = (
        Rows::of(k_data, k_layout, d)?,
        Rows::of(v_data, v_layout, d)?,
    );
    let len = k_layout.dims()[2];
    let mut out = vec![0f32; heads.heads * d];
    #[cfg(target_arch = "x86_64")]
    if super::features::x86() != super::features::X86::None {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        unsafe { all_heads_avx2(&q, &k, &v, len, heads, &mut out) };
        return Ok(Some(output(out, heads)?));
    }
    all_heads(&q, &k, &v, len, heads, &mut out, dot);
    Ok(Some(output(out, heads)?))
}

fn output(out: Vec<f32>, heads: &Heads) -> Result<Tensor> {
    let width = heads.heads * heads.head_dim;
    Tensor::from_vec(out, (1, width), &candle_core::Device::Cpu)
}

/// [`all_heads`] compiled for AVX2 and FMA, where its loops vectorize
/// eight lanes wide and `mul_add` is one instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn all_heads_avx2(q: &Rows, k: &Rows, v: &Rows, len: usize, heads: &Heads, out: &mut [f32]) {
    all_heads(q, k, v, len, heads, out, |a, b| dot_avx2(a, b))
}

/// Two accumulators of eight lanes, then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let body = n - n % 16;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut at = 0;
    while at < body {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: `at + 8 * k + 8 <= body <= n` for both rows.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(at + 8 * k)),
                    _mm256_loadu_ps(pb.add(at + 8 * k)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        at += 16;
    }
    let sum = _mm256_add_ps(acc[0], acc[1]);
    let quad = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let one = _mm_add_ss(pair, _mm_movehdup_ps(pair));
    let tail: f32 = a[body..n].iter().zip(&b[body..n]).map(|(x, y)| x * y).sum();
    _mm_cvtss_f32(one) + tail
}

/// Without FMA in the build's baseline, `mul_add` here calls the library
/// per value: this runs inlined into [`all_heads_avx2`] wherever it can.
#[inline(always)]
fn all_heads(
    q: &Rows,
    k: &Rows,
    v: &Rows,
    len: usize,
    heads: &Heads,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let group = heads.heads / heads.kv_heads;
    let mut scores = vec![0f32; len];
    let visible = heads.first_visible.min(len)..len;
    for (h, out) in out.chunks_exact_mut(heads.head_dim).enumerate() {
        let kv = h / group;
        let query = q.row(h, 0);
        for j in visible.clone() {
            let score = dot(query, k.row(kv, j)) * heads.scale;
            scores[j] = match heads.softcap {
                Some(cap) => (score / cap).tanh() * cap,
                None => score,
            };
        }
        softmax(&mut scores[visible.clone()]);
        for j in visible.clone() {
            let (p, values) = (scores[j], v.row(kv, j));
            for (o, x) in out.iter_mut().zip(values) {
                *o = p.mul_add(*x, *o);
            }
        }
    }
}

fn f32s(storage: &Storage) -> Option<&[f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(data)) => Some(data),
        _ => None,
    }
}

/// Rows of `d` values of a `[1, heads, positions, d]` view.
struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    head_stride: usize,
    position_stride: usize,
    d: usize,
}

impl<'a> Rows<'a> {
    fn of(data: &'a [f32], layout: &Layout, d: usize) -> Result<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 4 || dims[3] != d || stride[3] != 1 {
            candle_core::bail!("attention: expected [1, heads, positions, {d}] rows, got {dims:?} with strides {stride:?}");
        }
        let rows = Rows {
            data,
            start: layout.start_offset(),
            head_stride: stride[1],
            position_stride: stride[2],
            d,
        };
        let last = rows.at(dims[1].saturating_sub(1), dims[2].saturating_sub(1)) + d;
        if dims[1] > 0 && dims[2] > 0 && last > data.len() {
            candle_core::bail!("attention: a view past its storage");
        }
        Ok(rows)
    }

    fn at(&self, head: usize, position: usize) -> usize {
        self.start + head * self.head_stride + position * self.position_stride
    }

    fn row(&self, head: usize, position: usize) -> &'a [f32] {
        &self.data[self.at(head, position)..][..self.d]
    }
}

/// A dot product in eight lanes, where the CPU has no AVX2.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// In place, as candle's: less the maximum, exponentiated, over their sum.
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Against the same attention written with candle's operations, on a
    /// cache view with room past its length, grouped heads, a window and
    /// a soft cap.
    #[test]
    fn matches_candle_on_a_strided_cache_view() {
        let device = Device::Cpu;
        let (heads, kv_heads, d, len, capacity) = (6, 2, 20, 9, 16);
        let q = Tensor::randn(0f32, 1., (1, heads, 1, d), &device).unwrap();
        let k_all = Tensor::randn(0f32, 1., (1, kv_heads, capacity, d), &device).unwrap();
        let v_all = Tensor::randn(0f32, 1., (1, kv_heads, capacity, d), &device).unwrap();
        let (k, v) = (
            k_all.narrow(2, 0, len).unwrap(),
            v_all.narrow(2, 0, len).unwrap(),
        );
        for (softcap, first_visible) in [(None, 0), (Some(5.0f32), 3)] {
            let spec = Heads {
                heads,
                kv_heads,
                head_dim: d,
                scale: 0.125,
                softcap,
                first_visible,
            };
            let got = attend_one(&q, &k, &v, &spec).unwrap().unwrap();
            let want = reference(&q, &k, &v, &spec);
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()[0][0];
            assert!(diff < 1e-5, "softcap {softcap:?}: off by {diff}");
        }
    }

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, spec: &Heads) -> Tensor {
        let group = spec.heads / spec.kv_heads;
        let len = k.dim(2).unwrap();
        let k = k
            .narrow(2, spec.first_visible, len - spec.first_visible)
            .unwrap();
        let v = v
            .narrow(2, spec.first_visible, len - spec.first_visible)
            .unwrap();
        let q = q.reshape((spec.kv_heads, group, spec.head_dim)).unwrap();
        let k = k.squeeze(0).unwrap().contiguous().unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * spec.scale as f64).unwrap();
        if let Some(cap) = spec.softcap {
            scores = ((scores / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let v = v.squeeze(0).unwrap().contiguous().unwrap();
        weights
            .matmul(&v)
            .unwrap()
            .reshape((1, spec.heads * spec.head_dim))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }
}
