//! One new token's attention in f32 on the CPU, read where the keys and
//! values lie in the KV cache, which holds f32 or f16.
//!
//! Through candle, a decode step's attention was two tiny matrix products
//! per sequence and layer, each paying the blocked product's set-up, and a
//! copy of every cached value into a contiguous tensor: a fifth of a small
//! model's step. Here each query head walks its key head's rows once for
//! the scores and once for the weighted values, with no copies.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use half::f16;

use super::Out;

/// What the attention of every sequence of a batch shares.
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies each score, before any soft-capping.
    pub scale: f32,
    /// `tanh(score / cap) * cap` when set.
    pub softcap: Option<f32>,
}

impl Heads {
    /// A query's dot product with a key as the softmax takes it: scaled,
    /// then soft-capped where the model caps.
    #[inline(always)]
    fn score(&self, dot: f32) -> f32 {
        let scaled = dot * self.scale;
        match self.softcap {
            Some(cap) => (scaled / cap).tanh() * cap,
            None => scaled,
        }
    }
}

/// One sequence's new token: `q` `[1, heads, 1, d]` against its `k` and
/// `v` `[1, kv_heads, len, d]` (any strides with contiguous rows, as the
/// cache's views are).
pub struct Sequence {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Keys before this position are out of the sliding window.
    pub first_visible: usize,
}

/// A value of the KV cache as the attention reads it.
trait Cached: Copy + Send + Sync + 'static {
    fn of(storage: &Storage) -> Option<&[Self]>;
    fn f32(self) -> f32;
    /// Eight values from `at` as f32 lanes.
    ///
    /// # Safety
    /// Eight values from `at` are readable, and the CPU has AVX2 and F16C:
    /// this is inlined into functions compiled for them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn eight(at: *const Self) -> std::arch::x86_64::__m256;
}

impl Cached for f32 {
    fn of(storage: &Storage) -> Option<&[Self]> {
        match storage {
            Storage::Cpu(CpuStorage::F32(data)) => Some(data),
            _ => None,
        }
    }

    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn eight(at: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: as the caller promises.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(at) }
    }
}

impl Cached for f16 {
    fn of(storage: &Storage) -> Option<&[Self]> {
        match storage {
            Storage::Cpu(CpuStorage::F16(data)) => Some(data),
            _ => None,
        }
    }

    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn eight(at: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: as the caller promises; f16 is its bits.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i)) }
    }
}

/// A sequence's tensors as rows, and the positions of its visible keys.
type Views<'a, T> = (
    Rows<'a, f32>,
    Rows<'a, T>,
    Rows<'a, T>,
    std::ops::Range<usize>,
);

/// The attention of every sequence, `[batch, 1, heads * d]`, or `None`
/// when the queries are not f32 on the CPU, or the keys and values not
/// both f32 or both f16.
pub fn attend(batch: &[Sequence], spec: &Heads) -> Result<Option<Tensor>> {
    match batch.first().map(|s| s.k.dtype()) {
        Some(candle_core::DType::F16) => attend_cached::<f16>(batch, spec),
        _ => attend_cached::<f32>(batch, spec),
    }
}

/// [`attend`] over a cache of `T`. Each (sequence, key head) is one task
/// on the decode pool: on the caller alone, eight sequences' attention
/// left the other threads idle.
fn attend_cached<T: Cached>(batch: &[Sequence], spec: &Heads) -> Result<Option<Tensor>> {
    let (heads, d, kv_heads) = (spec.heads, spec.head_dim, spec.kv_heads);
    let guards: Vec<_> = batch
        .iter()
        .map(|s| [&s.q, &s.k, &s.v].map(Tensor::storage_and_layout))
        .collect();
    let mut views: Vec<Views<T>> = Vec::with_capacity(batch.len());
    for ([q, k, v], sequence) in guards.iter().zip(batch) {
        let (Some(qd), Some(kd), Some(vd)) = (f32::of(&q.0), T::of(&k.0), T::of(&v.0)) else {
            return Ok(None);
        };
        let len = k.1.dims().get(2).copied().unwrap_or(0);
        views.push((
            Rows::of(qd, q.1, d)?,
            Rows::of(kd, k.1, d)?,
            Rows::of(vd, v.1, d)?,
            sequence.first_visible.min(len)..len,
        ));
    }
    let group = heads / kv_heads;
    let mut out = vec![0f32; batch.len() * heads * d];
    let slots = Out(out.as_mut_ptr());
    let task = |t: usize| {
        let (n, kv) = (t / kv_heads, t % kv_heads);
        let first_head = kv * group;
        // SAFETY: each task writes the heads of one key head of one
        // sequence, inside `out` and disjoint from every other task's.
        let out = unsafe { slots.range((n * heads + first_head) * d, group * d) };
        heads_of(&views[n], spec, first_head..first_head + group, out);
    };
    super::pool::global().run(batch.len() * kv_heads, &task);
    let shape = (batch.len(), 1, heads * d);
    Ok(Some(Tensor::from_vec(
        out,
        shape,
        &candle_core::Device::Cpu,
    )?))
}

/// Query heads `range` of one sequence into `out`, with AVX2, FMA and
/// F16C where the CPU has them.
fn heads_of<T: Cached>(
    views: &Views<T>,
    spec: &Heads,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::features::x86() != super::features::X86::None {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above.
        unsafe { heads_avx2(views, spec, range, out) };
        return;
    }
    heads_with(views, spec, range, out, dot);
}

/// [`heads_with`] compiled for AVX2, FMA and F16C, where its loops vectorize
/// eight lanes wide and `mul_add` is one instruction; head sizes of 16 to
/// 128 take [`heads_in_registers`] instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn heads_avx2<T: Cached>(
    views: &Views<T>,
    spec: &Heads,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    match spec.head_dim {
        16 => heads_in_registers::<2, T>(views, spec, range, out),
        32 => heads_in_registers::<4, T>(views, spec, range, out),
        64 => heads_in_registers::<8, T>(views, spec, range, out),
        128 => heads_in_registers::<16, T>(views, spec, range, out),
        _ => heads_with(views, spec, range, out, |a, b| dot_avx2(a, b)),
    }
}

/// Heads of `8 * L` values with the query and the weighted sum held in
/// registers, and the scores of four keys computed side by side and
/// summed across lanes together. Calling a dot product per key, with the
/// weighted sum in memory, took 80 cycles per head and key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn heads_in_registers<const L: usize, T: Cached>(
    (q, k, v, visible): &Views<T>,
    spec: &Heads,
    range: std::ops::Range<usize>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let group = spec.heads / spec.kv_heads;
    let mut scores = vec![0f32; visible.len()];
    for (h, out) in range.zip(out.chunks_exact_mut(8 * L)) {
        let kv = h / group;
        let query = load::<L, f32>(q.row(h, 0));
        let keys = visible.clone().map(|j| k.row(kv, j));
        scores_of(&query, keys, &mut scores);
        for score in scores.iter_mut() {
            *score = spec.score(*score);
        }
        softmax(&mut scores);
        let mut sum = [_mm256_setzero_ps(); L];
        for (j, p) in visible.clone().zip(&scores) {
            let row = v.row(kv, j);
            ask_ahead::<L, T>(row);
            let (p, values) = (_mm256_set1_ps(*p), load::<L, T>(row));
            for (sum, x) in sum.iter_mut().zip(values) {
                *sum = _mm256_fmadd_ps(p, x, *sum);
            }
        }
        for (sum, out) in sum.iter().zip(out.chunks_exact_mut(8)) {
            // SAFETY: `out` holds eight f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *sum) };
        }
    }
}

/// Asks for the cache lines of the row 2 KiB past `row`: a key head's
/// rows lie one after another in the cache, and one core's prefetchers
/// stop at each 4 KiB page, which left the attention waiting on memory.
#[inline(always)]
fn ask_ahead<const L: usize, T>(row: &[T]) {
    for line in (0..8 * L * size_of::<T>()).step_by(64) {
        super::prefetch_ahead(row, line);
    }
}

/// A row of `8 * L` values as f32 vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn load<const L: usize, T: Cached>(row: &[T]) -> [std::arch::x86_64::__m256; L] {
    use std::arch::x86_64::*;
    assert!(row.len() >= 8 * L);
    let mut out = [_mm256_setzero_ps(); L];
    for (l, out) in out.iter_mut().enumerate() {
        // SAFETY: eight values from `8 * l` lie inside the row; this
        // function has the features.
        *out = unsafe { T::eight(row.as_ptr().add(8 * l)) };
    }
    out
}

/// `scores[i]`: the query dotted with key `i`, four keys at a time, then
/// one at a time; each key's lanes are summed in the same order either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn scores_of<'a, const L: usize, T: Cached>(
    query: &[std::arch::x86_64::__m256; L],
    mut keys: impl Iterator<Item = &'a [T]>,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut key = || {
        let key = keys.next().expect("a key per score");
        assert!(key.len() >= 8 * L);
        ask_ahead::<L, T>(key);
        key.as_ptr()
    };
    let full = scores.len() / 4 * 4;
    let (fours, rest) = scores.split_at_mut(full);
    for four in fours.chunks_exact_mut(4) {
        let rows = [key(), key(), key(), key()];
        let mut acc = [_mm256_setzero_ps(); 4];
        for (l, q) in query.iter().enumerate() {
            for (acc, row) in acc.iter_mut().zip(rows) {
                // SAFETY: each key holds `8 * L` values, checked above.
                *acc = _mm256_fmadd_ps(*q, unsafe { T::eight(row.add(8 * l)) }, *acc);
            }
        }
        four.copy_from_slice(&lane_sums(acc));
    }
    for score in rest {
        let row = key();
        let mut acc = _mm256_setzero_ps();
        for (l, q) in query.iter().enumerate() {
            // SAFETY: as above.
            acc = _mm256_fmadd_ps(*q, unsafe { T::eight(row.add(8 * l)) }, acc);
        }
        *score = lane_sums([
            acc,
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
            _mm256_setzero_ps(),
        ])[0];
    }
}

/// Each vector's eight lanes summed: pairwise across the four, giving
/// [s0, s1, s2, s3] in each 128-bit half, then the halves added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lane_sums(acc: [std::arch::x86_64::__m256; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let pairs = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
    );
    let sums = _mm_add_ps(
        _mm256_castps256_ps128(pairs),
        _mm256_extractf128_ps::<1>(pairs),
    );
    let mut out = [0f32; 4];
    // SAFETY: `out` holds four f32.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// Two accumulators of eight lanes, then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_avx2<T: Cached>(a: &[f32], b: &[T]) -> f32 {
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
                    T::eight(pb.add(at + 8 * k)),
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
    let tail: f32 = a[body..n]
        .iter()
        .zip(&b[body..n])
        .map(|(x, y)| x * y.f32())
        .sum();
    _mm_cvtss_f32(one) + tail
}

/// Without FMA in the build's baseline, `mul_add` here calls the library
/// per value: this runs inlined into [`heads_avx2`] wherever it can.
#[inline(always)]
fn heads_with<T: Cached>(
    (q, k, v, visible): &Views<T>,
    spec: &Heads,
    range: std::ops::Range<usize>,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[T]) -> f32,
) {
    let group = spec.heads / spec.kv_heads;
    let mut scores = vec![0f32; visible.end];
    for (h, out) in range.zip(out.chunks_exact_mut(spec.head_dim)) {
        let kv = h / group;
        let query = q.row(h, 0);
        for j in visible.clone() {
            scores[j] = spec.score(dot(query, k.row(kv, j)));
        }
        softmax(&mut scores[visible.clone()]);
        for j in visible.clone() {
            let (p, values) = (scores[j], v.row(kv, j));
            for (o, x) in out.iter_mut().zip(values) {
                *o = p.mul_add(x.f32(), *o);
            }
        }
    }
}

/// Rows of `d` values of a `[1, heads, positions, d]` view.
struct Rows<'a, T> {
    data: &'a [T],
    start: usize,
    head_stride: usize,
    position_stride: usize,
    d: usize,
}

impl<'a, T> Rows<'a, T> {
    fn of(data: &'a [T], layout: &Layout, d: usize) -> Result<Self> {
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

    fn row(&self, head: usize, position: usize) -> &'a [T] {
        &self.data[self.at(head, position)..][..self.d]
    }
}

/// A dot product in eight lanes, where the CPU has no AVX2.
fn dot<T: Cached>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y.f32())
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y.f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// In place, as candle's: less the maximum, exponentiated, over their
/// sum. The exponentials are a loop of their own, which vectorizes.
#[inline(always)]
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    for s in scores.iter_mut() {
        *s = crate::engine::math::exp(*s - max);
    }
    let sum: f32 = scores.iter().sum();
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
    /// a soft cap; at head sizes with registers of their own (64, 16) and
    /// one without (20), and key counts that are not a multiple of four;
    /// with an f32 cache and an f16 one.
    #[test]
    fn matches_candle_on_a_strided_cache_view() {
        for dtype in [DType::F32, DType::F16] {
            for (d, len) in [(20, 9), (64, 11), (16, 4)] {
                matches_candle_at(d, len, dtype);
            }
        }
    }

    fn matches_candle_at(d: usize, len: usize, dtype: DType) {
        let device = Device::Cpu;
        let (heads, kv_heads, capacity) = (6, 2, 16);
        let q = Tensor::randn(0f32, 1., (1, heads, 1, d), &device).unwrap();
        let cached = || {
            Tensor::randn(0f32, 1., (1, kv_heads, capacity, d), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (k_all, v_all) = (cached(), cached());
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
            };
            let want = reference(&q, &k, &v, &spec, first_visible);
            let one = Sequence {
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                first_visible,
            };
            let got = attend(&[one], &spec).unwrap().unwrap().squeeze(1).unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()[0][0];
            assert!(
                diff < 1e-5,
                "{dtype:?}, d {d}, softcap {softcap:?}: off by {diff}"
            );
        }
    }

    /// A batch's rows are each sequence's alone, bit for bit, whichever
    /// thread ran which task, from an f32 cache and from an f16 one.
    #[test]
    fn a_batch_is_each_sequence_alone() {
        for dtype in [DType::F32, DType::F16] {
            a_batch_is_each_sequence_alone_in(dtype);
        }
    }

    fn a_batch_is_each_sequence_alone_in(dtype: DType) {
        let device = Device::Cpu;
        let (heads, kv_heads, d) = (4, 2, 16);
        let spec = Heads {
            heads,
            kv_heads,
            head_dim: d,
            scale: 0.25,
            softcap: None,
        };
        let sequence = |len: usize, first_visible: usize| Sequence {
            q: Tensor::randn(0f32, 1., (1, heads, 1, d), &device).unwrap(),
            k: Tensor::randn(0f32, 1., (1, kv_heads, len, d), &device)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap(),
            v: Tensor::randn(0f32, 1., (1, kv_heads, len, d), &device)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap(),
            first_visible,
        };
        let batch = [sequence(5, 0), sequence(40, 2), sequence(1, 0)];
        let together = attend(&batch, &spec).unwrap().unwrap();
        for (i, one) in batch.into_iter().enumerate() {
            let alone = attend(&[one], &spec).unwrap().unwrap();
            let row = together.narrow(0, i, 1).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(&row), bits(&alone), "{dtype:?}, sequence {i}");
        }
    }

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, spec: &Heads, first_visible: usize) -> Tensor {
        let group = spec.heads / spec.kv_heads;
        let len = k.dim(2).unwrap();
        let k = k.narrow(2, first_visible, len - first_visible).unwrap();
        let v = v.narrow(2, first_visible, len - first_visible).unwrap();
        let q = q.reshape((spec.kv_heads, group, spec.head_dim)).unwrap();
        let (k, v) = (
            k.to_dtype(DType::F32).unwrap(),
            v.to_dtype(DType::F32).unwrap(),
        );
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
