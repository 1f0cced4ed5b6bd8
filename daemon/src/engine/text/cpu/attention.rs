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
    let group = heads.heads / heads.kv_heads;
    let mut out = vec![0f32; heads.heads * d];
    let mut scores = vec![0f32; len];
    for (h, out) in out.chunks_exact_mut(d).enumerate() {
        let kv = h / group;
        let query = q.row(h, 0);
        let visible = heads.first_visible.min(len)..len;
        for j in visible.clone() {
            let score = dot(query, k.row(kv, j)) * heads.scale;
            scores[j] = match heads.softcap {
                Some(cap) => (score / cap).tanh() * cap,
                None => score,
            };
        }
        softmax(&mut scores[visible.clone()]);
        for j in visible {
            let (p, values) = (scores[j], v.row(kv, j));
            // Plain products and sums: `mul_add` without FMA in the
            // build's baseline would call the library per value.
            for (o, x) in out.iter_mut().zip(values) {
                *o += p * x;
            }
        }
    }
    Ok(Some(Tensor::from_vec(
        out,
        (1, heads.heads * d),
        &candle_core::Device::Cpu,
    )?))
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

/// A dot product in sixteen lanes, so that it vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
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
