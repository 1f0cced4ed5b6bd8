//! Products with GGML-quantized weight rows (Q8_0, Q4_0/1, Q5_0/1 and the
//! k-quants), read where they lie in the mapped file.
//!
//! Activations are quantized once per product, to the block type each
//! weight type dots with (8 bits per 32 or per 256 values), as llama.cpp
//! does; each weight row is then dotted with every activation row while it
//! is in cache: Q8_0, Q5_0, Q4_0, Q4_K, Q5_K and Q6_K by modeld's own
//! kernels ([`super::q8_0`], [`super::kquants`]), Q4_1, Q5_1, Q2_K and
//! Q3_K by candle's dot products. A dot product depends only on its two
//! rows, so a sequence's results are the same alone and in a batch.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;

use super::kquants::{self, K8Rows, Kind};
use super::q8_0::{Format, Q8Rows};

/// The weight types the CPU decode runs without dequantizing.
pub fn supported(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// Whether modeld's own kernels run `dtype` (the others go through
/// candle's dot products).
pub fn has_own_kernel(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q8_0 | Q4_0 | Q5_0 | Q4K | Q5K | Q6K)
}

/// Activation rows quantized for one family of weight types.
pub enum Activations {
    /// For Q8_0 weights, whose kernel is modeld's own.
    Rows8(Q8Rows),
    /// For Q4_K, Q5_K and Q6_K weights, whose kernels are modeld's own.
    K8(K8Rows),
    Q8_1(Vec<BlockQ8_1>),
    Q8K(Vec<BlockQ8K>),
}

/// Which activation blocks weights of `dtype` are dotted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivationKind {
    Rows8,
    K8,
    Q8_1,
    Q8K,
}

pub fn activation_kind(dtype: GgmlDType) -> ActivationKind {
    use GgmlDType::*;
    match dtype {
        Q4_1 | Q5_1 => ActivationKind::Q8_1,
        Q4K | Q5K | Q6K => ActivationKind::K8,
        Q2K | Q3K => ActivationKind::Q8K,
        Q8_0 | Q4_0 | Q5_0 => ActivationKind::Rows8,
        _ => unreachable!("{dtype:?} is not a quantized type the CPU decode reads"),
    }
}

/// `rows` rows of `inputs` values each, quantized to `kind`'s blocks.
pub fn quantize(kind: ActivationKind, x: &[f32], inputs: usize) -> Activations {
    match kind {
        ActivationKind::Rows8 => Activations::Rows8(Q8Rows::quantize(x, inputs)),
        ActivationKind::K8 => Activations::K8(K8Rows::quantize(x, inputs)),
        ActivationKind::Q8_1 => Activations::Q8_1(quantize_rows(x, inputs)),
        ActivationKind::Q8K => Activations::Q8K(quantize_rows(x, inputs)),
    }
}

fn quantize_rows<B: GgmlType>(x: &[f32], inputs: usize) -> Vec<B> {
    let per_row = inputs / B::BLCK_SIZE;
    let rows = x.len() / inputs;
    let mut blocks = vec![B::zeros(); rows * per_row];
    for (row, out) in x.chunks_exact(inputs).zip(blocks.chunks_exact_mut(per_row)) {
        B::from_float(row, out);
    }
    blocks
}

/// The block format of a Q8_0-family type; `None` for the other types.
pub fn q8_format(dtype: GgmlDType) -> Option<Format> {
    match dtype {
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q4_0 => Some(Format::Q4_0),
        _ => None,
    }
}

/// The k-quant kind of `dtype` that modeld's kernels read; `None` for the
/// other types.
pub fn k_kind(dtype: GgmlDType) -> Option<Kind> {
    match dtype {
        GgmlDType::Q4K => Some(Kind::Q4K),
        GgmlDType::Q5K => Some(Kind::Q5K),
        GgmlDType::Q6K => Some(Kind::Q6K),
        _ => None,
    }
}

/// Weight rows `first..first + count` of a `dtype` matrix of `inputs`
/// columns stored in `bytes`, dotted with every activation row; fills
/// `out[f * rows + r]`. The Q8_0 family is not here: its kernels hand each
/// sum to a [`super::q8_0::Sums`] (`q8_0::dot_into`, through the caller's sink).
pub fn dot_features(
    dtype: GgmlDType,
    bytes: &[u8],
    inputs: usize,
    first: usize,
    acts: &Activations,
    out: &mut [f32],
) {
    use GgmlDType::*;
    match (dtype, acts) {
        (Q4_1, Activations::Q8_1(a)) => dot::<BlockQ4_1>(bytes, inputs, first, a, out),
        (Q5_1, Activations::Q8_1(a)) => dot::<BlockQ5_1>(bytes, inputs, first, a, out),
        (Q2K, Activations::Q8K(a)) => dot::<BlockQ2K>(bytes, inputs, first, a, out),
        (Q3K, Activations::Q8K(a)) => dot::<BlockQ3K>(bytes, inputs, first, a, out),
        (Q4K, Activations::K8(a)) => kquants::dot_features(Kind::Q4K, bytes, first, a, out),
        (Q5K, Activations::K8(a)) => kquants::dot_features(Kind::Q5K, bytes, first, a, out),
        (Q6K, Activations::K8(a)) => kquants::dot_features(Kind::Q6K, bytes, first, a, out),
        _ => unreachable!(
            "{dtype:?} weights are dotted with their own activation blocks, \
             the Q8_0 family through q8_0::dot_into"
        ),
    }
}

fn dot<T: GgmlType>(
    bytes: &[u8],
    inputs: usize,
    first: usize,
    acts: &[T::VecDotType],
    out: &mut [f32],
) {
    let per_row = inputs / T::BLCK_SIZE;
    let blocks = blocks::<T>(bytes);
    let rows = acts.len() / per_row;
    for (f, sums) in out.chunks_exact_mut(rows).enumerate() {
        let weights = &blocks[(first + f) * per_row..][..per_row];
        for (sum, act) in sums.iter_mut().zip(acts.chunks_exact(per_row)) {
            *sum = T::vec_dot(inputs, weights, act);
        }
    }
}

/// `bytes` seen as blocks of `T`; [`super::MappedFile::matrix`] checked
/// the length and the alignment when it was made.
fn blocks<T: GgmlType>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "quantized weights misaligned"
    );
    // SAFETY: GGML blocks are `repr(C)` structs of integers and halves,
    // valid for any bit pattern; length and alignment are checked above.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

/// Alignment the blocks of `dtype` need in memory.
pub fn alignment(dtype: GgmlDType) -> usize {
    use GgmlDType::*;
    match dtype {
        Q4_0 => std::mem::align_of::<BlockQ4_0>(),
        Q4_1 => std::mem::align_of::<BlockQ4_1>(),
        Q5_0 => std::mem::align_of::<BlockQ5_0>(),
        Q5_1 => std::mem::align_of::<BlockQ5_1>(),
        Q8_0 => std::mem::align_of::<BlockQ8_0>(),
        Q2K => std::mem::align_of::<BlockQ2K>(),
        Q3K => std::mem::align_of::<BlockQ3K>(),
        Q4K => std::mem::align_of::<BlockQ4K>(),
        Q5K => std::mem::align_of::<BlockQ5K>(),
        Q6K => std::mem::align_of::<BlockQ6K>(),
        _ => 4,
    }
}

/// Row `index` of a `dtype` matrix of `inputs` columns, as f32.
pub fn dequantize_row(
    dtype: GgmlDType,
    bytes: &[u8],
    inputs: usize,
    index: usize,
    out: &mut [f32],
) {
    use GgmlDType::*;
    match dtype {
        Q4_0 => row::<BlockQ4_0>(bytes, inputs, index, out),
        Q4_1 => row::<BlockQ4_1>(bytes, inputs, index, out),
        Q5_0 => row::<BlockQ5_0>(bytes, inputs, index, out),
        Q5_1 => row::<BlockQ5_1>(bytes, inputs, index, out),
        Q8_0 => row::<BlockQ8_0>(bytes, inputs, index, out),
        Q2K => row::<BlockQ2K>(bytes, inputs, index, out),
        Q3K => row::<BlockQ3K>(bytes, inputs, index, out),
        Q4K => row::<BlockQ4K>(bytes, inputs, index, out),
        Q5K => row::<BlockQ5K>(bytes, inputs, index, out),
        Q6K => row::<BlockQ6K>(bytes, inputs, index, out),
        _ => unreachable!("{dtype:?} is not a quantized type the CPU decode reads"),
    }
}

fn row<T: GgmlType>(bytes: &[u8], inputs: usize, index: usize, out: &mut [f32]) {
    let per_row = inputs / T::BLCK_SIZE;
    T::to_float(&blocks::<T>(bytes)[index * per_row..][..per_row], out);
}

/// `x` (`rows × inputs`) times the transpose of all the weights, for
/// prompts over the types without a kernel of ours: candle's blocked
/// product, which quantizes `x` itself.
pub fn matmul(
    dtype: GgmlDType,
    bytes: &[u8],
    x: &[f32],
    rows: usize,
    features: usize,
    inputs: usize,
) -> candle_core::Result<Vec<f32>> {
    use candle_core::quantized::k_quants::matmul as mm;
    use GgmlDType::*;
    let mut out = vec![0f32; rows * features];
    let mkn = (rows, inputs, features);
    match dtype {
        Q4_1 => mm::<BlockQ4_1>(mkn, x, blocks(bytes), &mut out),
        Q5_1 => mm::<BlockQ5_1>(mkn, x, blocks(bytes), &mut out),
        Q2K => mm::<BlockQ2K>(mkn, x, blocks(bytes), &mut out),
        Q3K => mm::<BlockQ3K>(mkn, x, blocks(bytes), &mut out),
        _ => unreachable!("{dtype:?} prompts run through modeld's own kernels"),
    }?;
    Ok(out)
}
