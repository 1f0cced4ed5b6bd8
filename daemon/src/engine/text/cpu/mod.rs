//! The CPU's decode products: a few activation rows (one per sequence of
//! the batch) times weight matrices that are f32 or GGML-quantized, read
//! once per step, split into small tasks over [`pool`]'s threads.
//!
//! Weights that need no conversion are used where they lie in the mapped
//! model file ([`Mapped`]): a load maps the file instead of copying it,
//! and pages come in as the first token reads them. They count as the
//! daemon's resident memory once read, like any page of the page cache
//! that a process maps.

pub mod attention;
mod f32;
mod features;
pub mod gate;
mod kpacked;
mod kquants;
pub mod mapped;
mod packed;
pub mod pool;
#[cfg(target_arch = "x86_64")]
mod prompt;
mod q8_0;
pub mod quant;

pub use kpacked::KPacked;
pub use mapped::{Mapped, MappedFile, PromptRunning, SettleOnDrop};
pub use packed::Packed;

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, Storage, Tensor};

/// Bytes of weights one task reads at most. A task reads its rows front to
/// back, and each starts its stream cold: at two threads, f32 decode took
/// 29.3 ms a step with 32 KiB tasks and 26.3 ms with 512 KiB ones (the
/// 135M shape). A thread that loses its core holds back the product by
/// the task it claimed; the pool then leaves products to the caller alone
/// for a while, so beside a busy neighbour both sizes decoded alike.
const TASK_BYTES: usize = 512 * 1024;

/// A product is cut into at least this many tasks per thread, so that
/// the threads finish it together.
const TASKS_PER_THREAD: usize = 2;

/// Weight rows that the quantized kernels dot at once.
const KERNEL_ROWS: usize = 16;

/// Products reading fewer bytes of weights run on the calling thread alone:
/// waking the others would cost more than the work.
const MIN_SHARED_BYTES: usize = 128 * 1024;

/// Products with at most this many rows run here; longer ones (prompts)
/// go to blocked matrix products.
pub const MAX_ROWS: usize = 16;

/// How far ahead of a kernel's sums its weights are asked for. One core's
/// hardware prefetchers stop at each 4 KiB page and keep too few lines in
/// flight: asking 2 KiB ahead read 11 GB/s as 14 on one core, and 22 as 27
/// on two, of this machine's memory.
const PREFETCH_BYTES: usize = 2048;

/// Asks for the cache line `PREFETCH_BYTES` past `at` bytes into
/// `weights`.
#[inline(always)]
fn prefetch_ahead<T>(weights: &[T], at: usize) {
    prefetch_at(weights, at + PREFETCH_BYTES);
}

/// Asks for the cache line `at` bytes into `weights`. It may lie past the
/// slice: the address is only computed, with wrapping arithmetic, and
/// prefetches never fault.
#[inline(always)]
fn prefetch_at<T>(weights: &[T], at: usize) {
    prefetch_into::<T, false>(weights, at);
}

/// [`prefetch_at`] into the second-level cache only. The repacked Q8_0
/// kernels ask for eight lines a block, and most of their samples sat on
/// those prefetches, waiting for room among the first-level cache's few
/// outstanding misses. Asking the second level made a 135M Q8_0 step a
/// few percent faster at one thread and at eight sequences, and left one
/// sequence at two threads where it was; the f32 and k-quant kernels did
/// not gain from it.
#[inline(always)]
fn prefetch_to_l2_at<T>(weights: &[T], at: usize) {
    prefetch_into::<T, true>(weights, at);
}

/// The prefetch of both: into the first-level cache, or with `L2` the
/// second only.
#[inline(always)]
fn prefetch_into<T, const L2: bool>(weights: &[T], at: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let line = (weights.as_ptr() as *const i8).wrapping_add(at);
        // SAFETY: a prefetch reads nothing the program can observe.
        unsafe {
            if L2 {
                _mm_prefetch::<_MM_HINT_T1>(line)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(line)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (weights, at);
}

/// `f` of a tensor's values, borrowed where they lie, when it is
/// contiguous f32 on the CPU; `None` otherwise, for callers that then take
/// candle's way.
pub fn with_contiguous_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&values[start..end]))
}

/// Values from which quantizing activations is split across the pool: a
/// prompt chunk's took a seventh of its prefill on one thread while the
/// others waited. A decode step's few rows take microseconds alone.
const SHARED_QUANTIZE_VALUES: usize = 16 * 1024;

/// Quantizes `x` to bytes in blocks of `block` values, each scaled by
/// `127 / max|x|` and rounded half away from zero; returns each block's
/// `max|x|`. Blocks are independent, so which thread takes which changes
/// nothing.
fn quantize_blocks(x: &[f32], block: usize, values: &mut [i8]) -> Vec<f32> {
    let mut maxima = vec![0f32; x.len() / block];
    if x.len() < SHARED_QUANTIZE_VALUES {
        quantize_blocks_into(x, block, values, &mut maxima);
        return maxima;
    }
    let per_task = (maxima.len().div_ceil(8)).max(1);
    let parts: Vec<std::sync::Mutex<BlockRun>> = x
        .chunks(per_task * block)
        .zip(values.chunks_mut(per_task * block))
        .zip(maxima.chunks_mut(per_task))
        .map(|((x, values), maxima)| std::sync::Mutex::new((x, values, maxima)))
        .collect();
    pool::global().run(parts.len(), &|t| {
        // Each task locks only its own part, so this never waits.
        let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        let (x, values, maxima) = &mut *part;
        quantize_blocks_into(x, block, values, maxima);
    });
    drop(parts);
    maxima
}

/// A task's run of blocks: the values, their bytes and their maxima.
type BlockRun<'a> = (&'a [f32], &'a mut [i8], &'a mut [f32]);

/// One thread's blocks, compiled for AVX2 where the CPU has it, since
/// `f32::round` is a library call per value in the build's baseline.
fn quantize_blocks_into(x: &[f32], block: usize, values: &mut [i8], maxima: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features::x86() != features::X86::None {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { quantize_blocks_avx2(x, block, values, maxima) };
    }
    quantize_blocks_with(x, block, values, maxima)
}

/// [`quantize_blocks_with`] in AVX2 intrinsics, for blocks of a multiple
/// of 32 values: the compiler's vectorization of the plain loop kept a
/// scalar maximum per block (NaN-aware `f32::max`, lane by lane), and
/// quantizing took about a sixteenth of an eight-sequence decode step, on
/// the caller while the other threads waited. The arithmetic is the plain
/// loop's, so the bytes and maxima are the same bit for bit; a block with
/// a NaN or an infinity takes the plain loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_blocks_avx2(x: &[f32], block: usize, values: &mut [i8], maxima: &mut [f32]) {
    if !block.is_multiple_of(32) {
        return quantize_blocks_with(x, block, values, maxima);
    }
    let blocks = x.chunks_exact(block).zip(values.chunks_exact_mut(block));
    for ((block, out), slot) in blocks.zip(maxima.iter_mut()) {
        let max = x86_quantize::max_abs(block);
        if !max.is_finite() {
            quantize_blocks_with(block, block.len(), out, std::slice::from_mut(slot));
            continue;
        }
        let inverse = if max == 0.0 { 0.0 } else { 127.0 / max };
        // No value is NaN or infinite, and none is larger than `max`.
        x86_quantize::scaled_bytes(block, inverse, out);
        *slot = max;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_quantize {
    use std::arch::x86_64::*;

    /// `max|x|` of a block of a multiple of 8 values; NaN or infinite
    /// when the block holds either (the caller then takes the plain loop).
    #[target_feature(enable = "avx2")]
    pub fn max_abs(block: &[f32]) -> f32 {
        assert!(block.len().is_multiple_of(8));
        let sign = _mm256_set1_ps(-0.0);
        let (mut max, mut nan) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for eight in block.chunks_exact(8) {
            // SAFETY: eight f32.
            let v = unsafe { _mm256_loadu_ps(eight.as_ptr()) };
            max = _mm256_max_ps(max, _mm256_andnot_ps(sign, v));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        if _mm256_movemask_ps(nan) != 0 {
            return f32::NAN;
        }
        let four = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
        let two = _mm_max_ps(four, _mm_movehl_ps(four, four));
        let one = _mm_max_ss(two, _mm_movehdup_ps(two));
        _mm_cvtss_f32(one)
    }

    /// Each value times `inverse`, rounded half away from zero, as bytes.
    /// The values must be finite and the products within ±127.5.
    #[target_feature(enable = "avx2")]
    pub fn scaled_bytes(block: &[f32], inverse: f32, out: &mut [i8]) {
        assert!(block.len().is_multiple_of(32) && out.len() == block.len());
        let (sign, half, one) = (
            _mm256_set1_ps(-0.0),
            _mm256_set1_ps(0.5),
            _mm256_set1_ps(1.0),
        );
        let scale = _mm256_set1_ps(inverse);
        let whole = |eight: &[f32; 8]| {
            // SAFETY: eight f32.
            let v = _mm256_mul_ps(unsafe { _mm256_loadu_ps(eight.as_ptr()) }, scale);
            let truncated = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
            let fraction = _mm256_andnot_ps(sign, _mm256_sub_ps(v, truncated));
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(fraction, half);
            let step = _mm256_or_ps(_mm256_and_ps(v, sign), one);
            _mm256_cvttps_epi32(_mm256_add_ps(truncated, _mm256_and_ps(away, step)))
        };
        // packs works within each 128-bit lane: this puts the four
        // vectors' eight-byte runs back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (x, out) in block.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            let eight = |n: usize| -> &[f32; 8] { x[8 * n..][..8].try_into().expect("eight") };
            let low = _mm256_packs_epi32(whole(eight(0)), whole(eight(1)));
            let high = _mm256_packs_epi32(whole(eight(2)), whole(eight(3)));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(low, high), order);
            // SAFETY: 32 bytes.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes) };
        }
    }
}

#[inline(always)]
fn quantize_blocks_with(x: &[f32], block: usize, values: &mut [i8], maxima: &mut [f32]) {
    let blocks = x.chunks_exact(block).zip(values.chunks_exact_mut(block));
    for ((block, out), slot) in blocks.zip(maxima.iter_mut()) {
        let max = max_abs(block);
        let inverse = if max == 0.0 { 0.0 } else { 127.0 / max };
        if max.is_finite() {
            for (q, v) in out.iter_mut().zip(block) {
                // SAFETY: `|v| <= max` and no NaN (whose maximum is NaN),
                // so the rounded value is a whole number within ±127 (a
                // saturating cast does not vectorize).
                *q = unsafe { round_half_away(v * inverse).to_int_unchecked::<i32>() } as i8;
            }
        } else {
            for (q, v) in out.iter_mut().zip(block) {
                *q = round_half_away(v * inverse) as i8;
            }
        }
        *slot = max;
    }
}

/// `max|x|` of a block, or NaN where the block holds a NaN, so that the
/// block takes the saturating path rather than converting a NaN unchecked.
/// Eight running maxima vectorize where one, a chain of dependent scalar
/// steps, did not: quantizing a prompt's activations took a tenth of its
/// prefill. The maximum is the same in any order.
#[inline(always)]
fn max_abs(block: &[f32]) -> f32 {
    let (mut lanes, mut nan) = ([0f32; 8], [false; 8]);
    let chunks = block.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for ((m, n), v) in lanes.iter_mut().zip(nan.iter_mut()).zip(chunk) {
            *m = m.max(v.abs());
            *n |= v.is_nan();
        }
    }
    let max = tail.iter().fold(0f32, |m, v| m.max(v.abs()));
    if nan.contains(&true) || tail.iter().any(|v| v.is_nan()) {
        return f32::NAN;
    }
    lanes.iter().fold(max, |m, v| m.max(*v))
}

/// `x.round()` from a truncation, which vectorizes: the fraction
/// `x - trunc(x)` is exact, and at one half or more the sum moves away
/// from zero.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    let whole = x.trunc();
    if (x - whole).abs() >= 0.5 {
        whole + 1f32.copysign(x)
    } else {
        whole
    }
}

/// Weights of `features × inputs` values, row-major.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    F32(&'a [f32]),
    /// GGML blocks of the given type.
    Quant(GgmlDType, &'a [u8]),
    /// Q8_0 or Q5_0 blocks repacked for the kernels.
    Packed(&'a Packed),
    /// Q4_K, Q5_K or Q6_K blocks repacked for the kernel.
    PackedK(&'a KPacked),
}

impl Source<'_> {
    fn row_bytes(&self, inputs: usize) -> usize {
        match self {
            Source::F32(_) => inputs * 4,
            Source::Quant(dtype, _) => inputs / dtype.block_size() * dtype.type_size(),
            Source::Packed(p) => p.row_bytes(),
            Source::PackedK(p) => p.row_bytes(),
        }
    }

    /// The activation blocks quantized weights are dotted with.
    fn activation_kind(&self) -> Option<quant::ActivationKind> {
        match self {
            Source::F32(_) => None,
            Source::Quant(dtype, _) => Some(quant::activation_kind(*dtype)),
            Source::Packed(_) => Some(quant::ActivationKind::Rows8),
            Source::PackedK(_) => Some(quant::ActivationKind::K8),
        }
    }
}

/// One weight matrix of a product and its output width.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub source: Source<'a>,
    pub features: usize,
}

/// A raw output pointer that tasks write disjoint ranges through.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each task writes only its own slots, through `range`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// The range lies inside the buffer, which outlives the slice, and no
    /// one else touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [f32] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// The loops every quantized kernel shares: each weight row of `out`'s
/// features (`row_bytes` each, from row `first` of `bytes`) with the
/// activation rows in tiles of at most `width`, as
/// `tile(weights, first_row, sums)`; `out` holds `rows` sums per feature.
#[inline(always)]
fn for_each_tile(
    bytes: &[u8],
    first: usize,
    row_bytes: usize,
    rows: usize,
    width: usize,
    out: &mut [f32],
    mut tile: impl FnMut(&[u8], usize, &mut [f32]),
) {
    for (f, sums) in out.chunks_exact_mut(rows).enumerate() {
        let weights = &bytes[(first + f) * row_bytes..][..row_bytes];
        for (t, sums) in sums.chunks_mut(width).enumerate() {
            tile(weights, t * width, sums);
        }
    }
}

/// A prompt's `x` (`rows × inputs`) times the transpose of f32 weights
/// `w` (`features × inputs`) by [`prompt::product`]: `None` where the CPU
/// lacks its instructions, and the caller takes the `gemm` crate.
pub fn prompt_f32(
    x: &[f32],
    rows: usize,
    w: &[f32],
    features: usize,
    inputs: usize,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    return prompt::product(x, rows, w, features, inputs);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, rows, w, features, inputs);
        None
    }
}

/// `x` (`rows × inputs`, row-major) times the transpose of each part:
/// one `rows × features` result per part, all computed in one dispatch
/// so that a layer's q/k/v (or gate/up) cost one wake of the threads.
pub fn few_rows(parts: &[Part], x: &[f32], rows: usize, inputs: usize) -> Vec<Vec<f32>> {
    debug_assert_eq!(x.len(), rows * inputs);
    let acts = quantized_activations(parts, x, inputs);
    let mut outputs: Vec<Vec<f32>> = parts
        .iter()
        .map(|p| vec![0f32; p.features * rows])
        .collect();
    let outs: Vec<Out> = outputs.iter_mut().map(|v| Out(v.as_mut_ptr())).collect();
    let mut tasks = Vec::new();
    for (n, part) in parts.iter().enumerate() {
        let step = features_per_task(part.source.row_bytes(inputs), part.features);
        for first in (0..part.features).step_by(step) {
            tasks.push((n, first, step.min(part.features - first)));
        }
    }
    let work = |t: usize| {
        let (n, first, count) = tasks[t];
        let features = parts[n].features;
        // SAFETY: tasks cover disjoint feature ranges of their part's
        // buffer, in every row, and the buffer outlives the pool run.
        let row = |r: usize| unsafe { outs[n].range(r * features + first, count) };
        let mut columns = Columns {
            out: outs[n],
            rows,
            stride: features,
            first,
            count,
        };
        if sink_into(parts[n].source, &acts, first, &mut columns) {
            return;
        }
        if rows == 1 {
            dot_features(parts[n].source, x, inputs, first, &acts, row(0));
            return;
        }
        // The other kernels write feature-major sums; each task turns its
        // own into rows while they are in cache, rather than one thread
        // turning every output after the product.
        SCRATCH.with_borrow_mut(|sums| {
            sums.resize(count * rows, 0.0);
            dot_features(parts[n].source, x, inputs, first, &acts, sums);
            for r in 0..rows {
                // Indexing each feature's sums, where `skip().step_by()`
                // compiled to a loop several times as long.
                for (slot, sums) in row(r).iter_mut().zip(sums.chunks_exact(rows)) {
                    *slot = sums[r];
                }
            }
        });
    };
    let bytes: usize = parts
        .iter()
        .map(|p| p.features * p.source.row_bytes(inputs))
        .sum();
    if bytes < MIN_SHARED_BYTES {
        (0..tasks.len()).for_each(work);
    } else {
        pool::global().run(tasks.len(), &work);
    }
    outputs
}

/// A task's weight rows `first..first + count` in every row of a
/// row-major `rows × features` output, which the kernels of the Q8_0
/// family and of the repacked k-quants write straight into: going through
/// feature-major sums and turning them into rows cost a twentieth of an
/// 8-sequence decode step.
struct Columns {
    out: Out,
    rows: usize,
    /// The output's row length: every feature of the part.
    stride: usize,
    first: usize,
    count: usize,
}

impl q8_0::Sums for Columns {
    fn features(&self) -> usize {
        self.count
    }

    #[inline(always)]
    fn put(&mut self, feature: usize, row: usize, sum: f32) {
        assert!(feature < self.count && row < self.rows);
        // SAFETY: inside the output, checked above, and in this task's
        // own columns, which no other task writes.
        unsafe { *self.out.0.add(row * self.stride + self.first + feature) = sum };
    }
}

/// Sums of a Q8_0-family part (as the file stores it or repacked) or a
/// repacked k-quant part into `out`, whose kernels write any sink;
/// `false` for the other parts.
fn sink_into(
    source: Source,
    acts: &[(quant::ActivationKind, quant::Activations)],
    first: usize,
    out: &mut impl q8_0::Sums,
) -> bool {
    match source {
        Source::Packed(p) => packed::dot_into(p, first, rows8(acts), out),
        Source::PackedK(p) => kpacked::dot_into(p, first, k8_rows(acts), out),
        Source::Quant(dtype, bytes) => match (quant::q8_format(dtype), quant::k_kind(dtype)) {
            (Some(format), _) => q8_0::dot_into(format, bytes, first, rows8(acts), out),
            (None, Some(kind)) if kpacked::worth_it() => {
                let rows = k8_rows(acts);
                // A decode step's few rows read the file's layout faster
                // than they could pack it.
                if rows.rows() <= MAX_ROWS {
                    return false;
                }
                kpacked::dot_file_rows(kind, bytes, first, rows, out);
            }
            _ => return false,
        },
        Source::F32(_) => return false,
    }
    true
}

/// The activations quantized for the Q8_0 family.
fn rows8(acts: &[(quant::ActivationKind, quant::Activations)]) -> &q8_0::Q8Rows {
    match activations(acts, quant::ActivationKind::Rows8) {
        quant::Activations::Rows8(rows) => rows,
        _ => unreachable!("Rows8 activations are Q8Rows"),
    }
}

/// The activations quantized for the k-quants.
fn k8_rows(acts: &[(quant::ActivationKind, quant::Activations)]) -> &kquants::K8Rows {
    match activations(acts, quant::ActivationKind::K8) {
        quant::Activations::K8(rows) => rows,
        _ => unreachable!("K8 activations are K8Rows"),
    }
}

/// The activations quantized for `kind`, which [`quantized_activations`]
/// made for every part.
fn activations(
    acts: &[(quant::ActivationKind, quant::Activations)],
    kind: quant::ActivationKind,
) -> &quant::Activations {
    let (_, a) = acts
        .iter()
        .find(|(k, _)| *k == kind)
        .expect("activations quantized for every part");
    a
}

thread_local! {
    /// A task's feature-major sums before they go to their rows.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weight rows per task of a product of `features` rows: about
/// [`TASK_BYTES`], at most a share of the rows that leaves every thread
/// [`TASKS_PER_THREAD`] tasks, in whole sets of the sixteen rows that the
/// quantized kernels take at a time.
fn features_per_task(row_bytes: usize, features: usize) -> usize {
    let by_bytes = (TASK_BYTES / row_bytes.max(1)).clamp(1, 256);
    let shared = features.div_ceil(pool::global().threads() * TASKS_PER_THREAD);
    by_bytes.min(shared.max(1)).next_multiple_of(KERNEL_ROWS)
}

/// The activations quantized once for each block type the parts need.
fn quantized_activations(
    parts: &[Part],
    x: &[f32],
    inputs: usize,
) -> Vec<(quant::ActivationKind, quant::Activations)> {
    let mut acts: Vec<(quant::ActivationKind, quant::Activations)> = Vec::new();
    for kind in parts.iter().filter_map(|p| p.source.activation_kind()) {
        if !acts.iter().any(|(k, _)| *k == kind) {
            acts.push((kind, quant::quantize(kind, x, inputs)));
        }
    }
    acts
}

fn dot_features(
    source: Source,
    x: &[f32],
    inputs: usize,
    first: usize,
    acts: &[(quant::ActivationKind, quant::Activations)],
    out: &mut [f32],
) {
    match source {
        Source::F32(w) => f32::dot_features(w, inputs, first, x, out),
        Source::Quant(dtype, bytes) if quant::q8_format(dtype).is_none() => {
            let a = activations(acts, quant::activation_kind(dtype));
            quant::dot_features(dtype, bytes, inputs, first, a, out);
        }
        Source::Quant(..) | Source::Packed(_) | Source::PackedK(_) => {
            let rows = x.len() / inputs;
            let mut sums = q8_0::FeatureMajor { out, rows };
            assert!(sink_into(source, acts, first, &mut sums));
        }
    }
}

#[cfg(test)]
mod tests;
