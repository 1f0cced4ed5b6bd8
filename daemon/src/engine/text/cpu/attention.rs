//! One new token's attention in f32 on the CPU, read where the keys and
//! values lie in the KV cache, which holds f32 or f16.
//!
//! Through candle, a decode step's attention was two tiny matrix products
//! per sequence and layer, each paying the blocked product's set-up, and a
//! copy of every cached value into a contiguous tensor: a fifth of a small
//! model's step. Here the query heads that share a key head walk its rows
//! together, once for the scores and once for the weighted values, with no
//! copies; long sequences are cut into parts that run on several threads
//! and are combined after, as flash-decoding does on GPUs.

use std::ops::Range;

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

/// Visible keys one task reads at most. A long sequence's attention is
/// cut into parts of this many keys, each a task of its own whose results
/// are combined after, so that one sequence keeps every thread busy. Where
/// the cuts fall depends only on the sequence's visible keys, so its
/// result is the same alone and in a batch.
const PART_KEYS: usize = 128;

/// Query heads that one pass over a part's keys serves: each key and
/// value is read and widened to f32 once for all of them, where a pass per
/// head read them once per head.
const HEADS_PER_PASS: usize = 4;

/// A sequence's tensors as rows, and the positions of its visible keys.
struct Views<'a, T> {
    q: Rows<'a, f32>,
    k: Rows<'a, T>,
    v: Rows<'a, T>,
    visible: Range<usize>,
}

/// Which kernels run: the best the CPU has, or the portable ones (which
/// the tests compare the others with).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

impl Kernels {
    /// Whether rows of `d` values take the AVX2 kernels: the best is
    /// asked for, the CPU has AVX2, FMA and F16C, and `d` is a multiple of
    /// eight lanes.
    #[cfg(target_arch = "x86_64")]
    fn avx2(self, d: usize) -> bool {
        self == Kernels::Best
            && super::features::x86() != super::features::X86::None
            && d.is_multiple_of(8)
    }
}

/// The attention of every sequence, `[batch, 1, heads * d]`, or `None`
/// when the queries are not f32 on the CPU, or the keys and values not
/// both f32 or both f16.
pub fn attend(batch: &[Sequence], spec: &Heads) -> Result<Option<Tensor>> {
    attend_with(batch, spec, Kernels::Best)
}

fn attend_with(batch: &[Sequence], spec: &Heads, kernels: Kernels) -> Result<Option<Tensor>> {
    match batch.first().map(|s| s.k.dtype()) {
        Some(candle_core::DType::F16) => attend_cached::<f16>(batch, spec, kernels),
        _ => attend_cached::<f32>(batch, spec, kernels),
    }
}

/// One task: the query heads of key head `kv` of one sequence against
/// `keys`, written to the partial results from slot `slot` on.
struct Task {
    sequence: usize,
    kv: usize,
    keys: Range<usize>,
    slot: usize,
}

/// [`attend`] over a cache of `T`. Each (sequence, part of its keys, key
/// head) is one task on the decode pool; the caller then combines each
/// sequence's parts.
fn attend_cached<T: Cached>(
    batch: &[Sequence],
    spec: &Heads,
    kernels: Kernels,
) -> Result<Option<Tensor>> {
    let d = spec.head_dim;
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
        views.push(Views {
            q: Rows::of(qd, q.1, d)?,
            k: Rows::of(kd, k.1, d)?,
            v: Rows::of(vd, v.1, d)?,
            visible: sequence.first_visible.min(len)..len,
        });
    }
    let (tasks, first_part) = plan(&views, spec);
    let slots = first_part[batch.len()] * spec.heads;
    let (mut weighted, mut stats) = (vec![0f32; slots * d], vec![0f32; slots * 2]);
    let (weighted_out, stats_out) = (Out(weighted.as_mut_ptr()), Out(stats.as_mut_ptr()));
    let group = spec.heads / spec.kv_heads;
    let run = |t: usize| {
        let task = &tasks[t];
        // SAFETY: each task writes the slots of its own part and key
        // head, inside both buffers and disjoint from every other task's.
        let (weighted, stats) = unsafe {
            (
                weighted_out.range(task.slot * d, group * d),
                stats_out.range(task.slot * 2, group * 2),
            )
        };
        part_of(&views[task.sequence], spec, task, kernels, weighted, stats);
    };
    super::pool::global().run(tasks.len(), &run);
    let out = combine(&weighted, &stats, &first_part, spec);
    let shape = (batch.len(), 1, spec.heads * d);
    Ok(Some(Tensor::from_vec(
        out,
        shape,
        &candle_core::Device::Cpu,
    )?))
}

/// The tasks of a batch, and where each sequence's parts begin among all
/// parts (one more entry than sequences). Slot `part * heads + h` holds
/// query head `h`'s result for that part.
fn plan<T>(views: &[Views<T>], spec: &Heads) -> (Vec<Task>, Vec<usize>) {
    let group = spec.heads / spec.kv_heads;
    let mut tasks = Vec::new();
    let mut first_part = vec![0];
    for (sequence, view) in views.iter().enumerate() {
        let mut part = first_part[sequence];
        for start in view.visible.clone().step_by(PART_KEYS) {
            let keys = start..(start + PART_KEYS).min(view.visible.end);
            for kv in 0..spec.kv_heads {
                let slot = part * spec.heads + kv * group;
                let keys = keys.clone();
                tasks.push(Task {
                    sequence,
                    kv,
                    keys,
                    slot,
                });
            }
            part += 1;
        }
        first_part.push(part);
    }
    (tasks, first_part)
}

/// Each query head's attention from its parts': their weighted values,
/// rescaled to the largest of their maxima, over the weights' total. A
/// sequence with no visible keys attends to nothing: zeros.
fn combine(weighted: &[f32], stats: &[f32], first_part: &[usize], spec: &Heads) -> Vec<f32> {
    let (heads, d) = (spec.heads, spec.head_dim);
    let batch = first_part.len() - 1;
    let mut out = vec![0f32; batch * heads * d];
    for (n, row) in out.chunks_exact_mut(heads * d).enumerate() {
        let parts = first_part[n]..first_part[n + 1];
        for (h, out) in row.chunks_exact_mut(d).enumerate() {
            let slots = parts.clone().map(|part| part * heads + h);
            let max = slots
                .clone()
                .map(|s| stats[2 * s])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for s in slots {
                let scale = match stats[2 * s] {
                    m if m == max => 1.0,
                    m => crate::engine::math::exp(m - max),
                };
                total += scale * stats[2 * s + 1];
                for (o, x) in out.iter_mut().zip(&weighted[s * d..][..d]) {
                    *o += scale * x;
                }
            }
            if total > 0.0 {
                for o in out.iter_mut() {
                    *o /= total;
                }
            }
        }
    }
    out
}

/// One task: the scores of its key head's query heads against its keys,
/// exponentiated from their maximum, then the values they weigh, unscaled.
/// `weighted` gets `d` values per query head, `stats` each head's maximum
/// and its exponentials' sum.
fn part_of<T: Cached>(
    view: &Views<T>,
    spec: &Heads,
    task: &Task,
    kernels: Kernels,
    weighted: &mut [f32],
    stats: &mut [f32],
) {
    let (group, d, n) = (spec.heads / spec.kv_heads, spec.head_dim, task.keys.len());
    let mut scores = vec![0f32; group * n];
    let first_head = task.kv * group;
    for heads in passes(group) {
        let scores = &mut scores[heads.start * n..heads.end * n];
        dot_keys(view, task, first_head + heads.start, scores, kernels);
    }
    for (scores, stats) in scores.chunks_exact_mut(n).zip(stats.chunks_exact_mut(2)) {
        let (max, sum) = exponentiate(scores, spec);
        stats.copy_from_slice(&[max, sum]);
    }
    for heads in passes(group) {
        let weights = &scores[heads.start * n..heads.end * n];
        let out = &mut weighted[heads.start * d..heads.end * d];
        weigh_values(view, task, weights, out, kernels);
    }
}

/// A key head's query heads, `HEADS_PER_PASS` at a time.
fn passes(group: usize) -> impl Iterator<Item = Range<usize>> {
    (0..group)
        .step_by(HEADS_PER_PASS)
        .map(move |first| first..(first + HEADS_PER_PASS).min(group))
}

/// Scores as the softmax takes them (scaled, then capped), replaced by
/// `exp(score - max)`; returns that maximum and the exponentials' sum.
/// The exponentials are a loop of their own, which vectorizes.
#[inline(always)]
fn exponentiate(scores: &mut [f32], spec: &Heads) -> (f32, f32) {
    for s in scores.iter_mut() {
        *s = spec.score(*s);
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    for s in scores.iter_mut() {
        *s = crate::engine::math::exp(*s - max);
    }
    (max, scores.iter().sum())
}

/// Asks for the cache lines of the row `PREFETCH_BYTES` past `row`: a key
/// head's rows lie one after another in the cache, and one core's
/// prefetchers stop at each 4 KiB page, which left the attention waiting
/// on memory.
#[inline(always)]
fn ask_ahead<T>(row: &[T]) {
    for line in (0..size_of_val(row)).step_by(64) {
        super::prefetch_ahead(row, line);
    }
}

/// `scores[h * n + i]`: query head `first_head + h` dotted with key
/// `keys.start + i`, for the `scores.len() / n` (at most
/// `HEADS_PER_PASS`) heads from `first_head`.
fn dot_keys<T: Cached>(
    view: &Views<T>,
    task: &Task,
    first_head: usize,
    scores: &mut [f32],
    kernels: Kernels,
) {
    let (q, k, kv, keys) = (&view.q, &view.k, task.kv, task.keys.clone());
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2(k.d) {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above. Each
        // pass takes as many keys at once as keeps four sums in flight.
        unsafe {
            match scores.len() / keys.len() {
                1 => x86::dot_keys::<4, 1, T>(q, k, kv, first_head, keys, scores),
                2 => x86::dot_keys::<2, 2, T>(q, k, kv, first_head, keys, scores),
                3 => x86::dot_keys::<1, 3, T>(q, k, kv, first_head, keys, scores),
                _ => x86::dot_keys::<1, 4, T>(q, k, kv, first_head, keys, scores),
            }
        }
        return;
    }
    let n = keys.len();
    for (h, scores) in scores.chunks_exact_mut(n).enumerate() {
        let query = q.row(first_head + h, 0);
        for (score, j) in scores.iter_mut().zip(keys.clone()) {
            *score = dot(query, k.row(kv, j));
        }
    }
}

/// `out[h * d..][..d]`: the values of `keys` weighed by
/// `weights[h * n..][..n]`, for each of the `weights.len() / n` heads.
fn weigh_values<T: Cached>(
    view: &Views<T>,
    task: &Task,
    weights: &[f32],
    out: &mut [f32],
    kernels: Kernels,
) {
    let (v, kv, keys) = (&view.v, task.kv, task.keys.clone());
    let heads = weights.len() / keys.len();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    #[cfg(target_arch = "x86_64")]
    if kernels.avx2(v.d) {
        // Eight running sums of eight lanes: as many vectors of each row
        // at once as the heads leave room for in the registers.
        let width = [8, 4, 2, 1]
            .into_iter()
            .find(|w| heads * w <= 8 && v.d.is_multiple_of(8 * w))
            .unwrap_or(1);
        // SAFETY: the CPU has AVX2, FMA and F16C, checked above.
        unsafe {
            match (heads, width) {
                (1, 8) => x86::weigh_values::<1, 8, T>(v, kv, keys, weights, out),
                (1, 4) => x86::weigh_values::<1, 4, T>(v, kv, keys, weights, out),
                (1, 2) => x86::weigh_values::<1, 2, T>(v, kv, keys, weights, out),
                (1, _) => x86::weigh_values::<1, 1, T>(v, kv, keys, weights, out),
                (2, 4) => x86::weigh_values::<2, 4, T>(v, kv, keys, weights, out),
                (2, 2) => x86::weigh_values::<2, 2, T>(v, kv, keys, weights, out),
                (2, _) => x86::weigh_values::<2, 1, T>(v, kv, keys, weights, out),
                (3, 2) => x86::weigh_values::<3, 2, T>(v, kv, keys, weights, out),
                (3, _) => x86::weigh_values::<3, 1, T>(v, kv, keys, weights, out),
                (_, 2) => x86::weigh_values::<4, 2, T>(v, kv, keys, weights, out),
                _ => x86::weigh_values::<4, 1, T>(v, kv, keys, weights, out),
            }
        }
        return;
    }
    let (n, d) = (keys.len(), v.d);
    for (weights, out) in weights.chunks_exact(n).zip(out.chunks_exact_mut(d)) {
        out.fill(0.0);
        for (p, j) in weights.iter().zip(keys.clone()) {
            for (o, x) in out.iter_mut().zip(v.row(kv, j)) {
                *o += p * x.f32();
            }
        }
    }
}

/// The AVX2 kernels: head sizes that are a multiple of eight, in vectors
/// of eight f32 lanes.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{ask_ahead, Cached, Rows};

    /// [`super::dot_keys`] for `H` heads, `K` keys at a time: each key's
    /// eight lanes are widened once and dotted with every head's.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `k.d` is a multiple of eight.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_keys<const K: usize, const H: usize, T: Cached>(
        q: &Rows<f32>,
        k: &Rows<T>,
        kv: usize,
        first_head: usize,
        keys: Range<usize>,
        scores: &mut [f32],
    ) {
        let n = keys.len();
        assert!(K * H <= 4 && scores.len() >= H * n);
        let queries: [&[f32]; H] = std::array::from_fn(|h| q.row(first_head + h, 0));
        let key = |i: usize| {
            let row = k.row(kv, keys.start + i);
            ask_ahead(row);
            row
        };
        let whole = n / K * K;
        for i in (0..whole).step_by(K) {
            let rows: [&[T]; K] = std::array::from_fn(|r| key(i + r));
            // SAFETY: every row and query holds `d` values.
            let sums = unsafe { dot_rows::<K, H, T>(&queries, rows) };
            for r in 0..K {
                for h in 0..H {
                    scores[h * n + i + r] = sums[r * H + h];
                }
            }
        }
        for i in whole..n {
            // SAFETY: as above.
            let sums = unsafe { dot_rows::<1, H, T>(&queries, [key(i)]) };
            for h in 0..H {
                scores[h * n + i] = sums[h];
            }
        }
    }

    /// `K` rows dotted with `H` queries: sum `r * H + h` is row `r` with
    /// query `h`. Each sum runs along its lanes in the same order whatever
    /// `K` and `H` are, so a score does not depend on its neighbours.
    ///
    /// # Safety
    /// As [`dot_keys`]'s, and every row and query holds the same multiple
    /// of eight values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows<const K: usize, const H: usize, T: Cached>(
        queries: &[&[f32]; H],
        rows: [&[T]; K],
    ) -> [f32; 4] {
        let lanes = queries[0].len() / 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        for l in 0..lanes {
            // SAFETY: eight values from `8 * l` lie inside each row.
            let x: [__m256; K] =
                std::array::from_fn(|r| unsafe { T::eight(rows[r].as_ptr().add(8 * l)) });
            for (h, query) in queries.iter().enumerate() {
                // SAFETY: as above, for the query.
                let q = unsafe { _mm256_loadu_ps(query.as_ptr().add(8 * l)) };
                for (r, x) in x.iter().enumerate() {
                    acc[r * H + h] = _mm256_fmadd_ps(q, *x, acc[r * H + h]);
                }
            }
        }
        lane_sums(acc)
    }

    /// Each vector's eight lanes summed: pairwise across the four, giving
    /// [s0, s1, s2, s3] in each 128-bit half, then the halves added.
    #[target_feature(enable = "avx2")]
    fn lane_sums(acc: [__m256; 4]) -> [f32; 4] {
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

    /// [`super::weigh_values`] for `H` heads, `8 * W` values of the rows
    /// at a time: each value vector is widened once for every head, and
    /// the `H * W` running sums stay in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `v.d` is a multiple of `8 * W`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weigh_values<const H: usize, const W: usize, T: Cached>(
        v: &Rows<T>,
        kv: usize,
        keys: Range<usize>,
        weights: &[f32],
        out: &mut [f32],
    ) {
        let (n, d) = (keys.len(), v.d);
        assert!(d.is_multiple_of(8 * W) && weights.len() >= H * n && out.len() >= H * d);
        for slice in (0..d).step_by(8 * W) {
            let mut acc = [[_mm256_setzero_ps(); W]; H];
            for (i, j) in keys.clone().enumerate() {
                let row = v.row(kv, j);
                if slice == 0 {
                    ask_ahead(row);
                }
                let p: [__m256; H] = std::array::from_fn(|h| _mm256_set1_ps(weights[h * n + i]));
                for w in 0..W {
                    // SAFETY: `slice + 8 * w + 8 <= d`, the row's length.
                    let x = unsafe { T::eight(row.as_ptr().add(slice + 8 * w)) };
                    for (acc, p) in acc.iter_mut().zip(&p) {
                        acc[w] = _mm256_fmadd_ps(*p, x, acc[w]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (w, acc) in acc.iter().enumerate() {
                    let at = &mut out[h * d + slice + 8 * w..][..8];
                    // SAFETY: `at` holds eight f32.
                    unsafe { _mm256_storeu_ps(at.as_mut_ptr(), *acc) };
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// Against the same attention written with candle's operations, on a
    /// cache view with room past its length, with a window and a soft cap,
    /// by both kernels: at head sizes of 16, 64, 96 and 128 and one that is
    /// not a multiple of eight (20); with 1 to 8 query heads per key head
    /// (8 and 5 take two passes); with key counts that are not a multiple
    /// of four, and past one part; with an f32 cache and an f16 one.
    #[test]
    fn matches_candle_on_a_strided_cache_view() {
        let cases = [
            (20, 9, 6, 2),
            (64, 11, 6, 2),
            (16, 4, 6, 2),
            (64, 300, 6, 2),
            (128, 130, 4, 4),
            (96, 37, 2, 1),
            (64, 70, 16, 2),
            (16, 257, 10, 2),
            (32, 5, 8, 2),
        ];
        for dtype in [DType::F32, DType::F16] {
            for (d, len, heads, kv_heads) in cases {
                for kernels in [Kernels::Best, Kernels::Portable] {
                    matches_candle_at(d, len, (heads, kv_heads), dtype, kernels);
                }
            }
        }
    }

    fn matches_candle_at(
        d: usize,
        len: usize,
        (heads, kv_heads): (usize, usize),
        dtype: DType,
        kernels: Kernels,
    ) {
        let device = Device::Cpu;
        let capacity = len + 5;
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
            let got = attend_with(&[one], &spec, kernels)
                .unwrap()
                .unwrap()
                .squeeze(1)
                .unwrap();
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
                "{dtype:?}, d {d}, {len} keys, {heads}/{kv_heads} heads, softcap {softcap:?}: off by {diff}"
            );
        }
    }

    /// A sequence with no visible key attends to nothing, as the
    /// softmax's empty sum leaves it.
    #[test]
    fn no_visible_key_gives_zeros() {
        let device = Device::Cpu;
        let spec = Heads {
            heads: 2,
            kv_heads: 1,
            head_dim: 8,
            scale: 1.0,
            softcap: None,
        };
        let one = Sequence {
            q: Tensor::ones((1, 2, 1, 8), DType::F32, &device).unwrap(),
            k: Tensor::ones((1, 1, 3, 8), DType::F32, &device).unwrap(),
            v: Tensor::ones((1, 1, 3, 8), DType::F32, &device).unwrap(),
            first_visible: 3,
        };
        let out = attend(&[one], &spec).unwrap().unwrap();
        let values = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values, vec![0f32; 16]);
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
        let batch = [
            sequence(5, 0),
            sequence(40, 2),
            sequence(1, 0),
            sequence(300, 7),
        ];
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
