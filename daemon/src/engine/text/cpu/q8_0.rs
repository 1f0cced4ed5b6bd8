//! Q8_0, Q5_0 and Q4_0 weights (blocks of 32 values of 8, 5 or 4 bits and
//! an f16 scale) dotted with activations quantized to Q8_0, as llama.cpp
//! does. Q5_0 is what llama.cpp's Q4_K_M falls back to for rows that are
//! not whole 256-value super-blocks (all of a 576-wide model's attention).
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

/// The weight block formats, each an f16 scale and 32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 32 int8 values.
    Q8_0,
    /// 16 bytes of 4-bit values (low nibbles first), offset by 8.
    Q4_0,
    /// 32 high bits, then 16 bytes of low nibbles, offset by 16.
    Q5_0,
}

impl Format {
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q5_0 => 22,
        }
    }

    /// Block `block`'s values as signed integers.
    fn values(self, block: &[u8]) -> [i8; BLOCK] {
        match self {
            Format::Q8_0 => std::array::from_fn(|i| block[2 + i] as i8),
            Format::Q4_0 => std::array::from_fn(|i| {
                let byte = block[2 + i % 16];
                let low = if i < 16 { byte & 0xF } else { byte >> 4 };
                low as i8 - 8
            }),
            Format::Q5_0 => {
                let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                std::array::from_fn(|i| {
                    let byte = block[6 + i % 16];
                    let low = if i < 16 { byte & 0xF } else { byte >> 4 };
                    (low | (((high >> i) & 1) as u8) << 4) as i8 - 16
                })
            }
        }
    }
}

/// Activation rows quantized to Q8_0: values and per-block scales.
pub struct Q8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    inputs: usize,
    /// For the AVX-512 kernel, which has no byte sign instruction: the
    /// values plus 128, as unsigned bytes, each pair of blocks interleaved
    /// four bytes at a time (see [`interleave_pairs`]).
    unsigned: Vec<u8>,
}

/// Bytes per row of [`Q8Rows::unsigned`]: 64 per pair of blocks.
fn pair_row_bytes(inputs: usize) -> usize {
    (inputs / BLOCK).div_ceil(2) * 2 * BLOCK
}

/// Each pair of blocks as the AVX-512 kernel lays it in a register: the
/// first block's four-byte groups in the even 32-bit lanes, the second's
/// in the odd ones, so that the even and odd sums alternate lane by lane
/// and each lane pair's scales come from one 64-bit broadcast. A lone last
/// block pairs with zeros (128 unsigned).
fn interleave_pairs(values: &[i8], inputs: usize) -> Vec<u8> {
    let width = pair_row_bytes(inputs);
    let mut out = vec![0x80u8; values.len() / inputs * width];
    for (row, out) in values.chunks_exact(inputs).zip(out.chunks_exact_mut(width)) {
        for (b, block) in row.chunks_exact(BLOCK).enumerate() {
            let (pair, second) = (b / 2, b % 2);
            for (g, group) in block.chunks_exact(4).enumerate() {
                let at = pair * 2 * BLOCK + (2 * g + second) * 4;
                for (o, v) in out[at..at + 4].iter_mut().zip(group) {
                    *o = *v as u8 ^ 0x80;
                }
            }
        }
    }
    out
}

impl Q8Rows {
    /// As llama.cpp's reference: scale `max|x| / 127` rounded to f16,
    /// values rounded half away from zero.
    pub fn quantize(x: &[f32], inputs: usize) -> Self {
        let mut values = vec![0i8; x.len()];
        let maxima = super::quantize_blocks(x, BLOCK, &mut values);
        let scales = maxima
            .iter()
            .map(|max| f16::from_f32(max / 127.0).to_f32())
            .collect();
        Self::from_parts(values, scales, inputs)
    }

    fn from_parts(values: Vec<i8>, scales: Vec<f32>, inputs: usize) -> Self {
        let mut rows = Q8Rows {
            values,
            scales,
            inputs,
            unsigned: Vec::new(),
        };
        if super::features::x86() == super::features::X86::Avx512Vnni {
            rows.unsigned = interleave_pairs(&rows.values, inputs);
        }
        rows
    }

    fn rows(&self) -> usize {
        self.values.len() / self.inputs
    }
}

/// Weight rows `first..` of a `format` matrix in `bytes`, each dotted
/// with every activation row: fills `out[f * rows + r]`. The instruction
/// set is picked once per call, and the loops live inside each kernel.
pub fn dot_features(format: Format, bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::features::{x86, X86};
        let kernel = match x86() {
            X86::Avx512Vnni => x86_64::features_avx512,
            X86::AvxVnni => x86_64::features_avxvnni,
            X86::Avx2 => x86_64::features_avx2,
            X86::None => return portable_features(format, bytes, first, acts, out),
        };
        // SAFETY: the CPU has the features of the kernel picked for it.
        unsafe { kernel(format, bytes, first, acts, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable_features(format, bytes, first, acts, out);
}

fn portable_features(format: Format, bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut [f32]) {
    let (rows, row_bytes) = (acts.rows(), acts.inputs / BLOCK * format.block_bytes());
    super::for_each_tile(
        bytes,
        first,
        row_bytes,
        rows,
        rows,
        out,
        |weights, _, sums| portable_tile(format, weights, acts, 0, sums),
    );
}

/// The same sums in plain Rust: per block an integer dot product, scaled
/// and added into one of two running sums by the block's parity, as the
/// vector paths do lane by lane.
fn portable_tile(format: Format, weights: &[u8], acts: &Q8Rows, first_row: usize, out: &mut [f32]) {
    let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
    for (i, slot) in out.iter_mut().enumerate() {
        let row = first_row + i;
        let mut lanes = [[0f32; 8]; 2];
        for b in 0..blocks {
            let block = &weights[b * size..][..size];
            let w = format.values(block);
            let scale = f16::from_le_bytes([block[0], block[1]]).to_f32_const()
                * acts.scales[row * blocks + b];
            let x = &acts.values[(row * blocks + b) * BLOCK..][..BLOCK];
            for (lane, sum) in lanes[b % 2].iter_mut().enumerate() {
                let dot: i32 = (0..4)
                    .map(|k| w[lane * 4 + k] as i32 * x[lane * 4 + k] as i32)
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
    use super::{Format, Q8Rows, BLOCK};
    use crate::engine::text::cpu::prefetch_ahead;
    use std::arch::x86_64::*;

    /// Block `block`'s 32 values as signed bytes.
    #[target_feature(enable = "avx2")]
    fn values(format: Format, block: &[u8]) -> __m256i {
        assert!(block.len() >= format.block_bytes());
        let p = block.as_ptr();
        match format {
            // SAFETY: the block holds 34 bytes.
            Format::Q8_0 => unsafe { _mm256_loadu_si256(p.add(2) as *const __m256i) },
            Format::Q4_0 => {
                let nibbles = nibbles(block, 2);
                _mm256_sub_epi8(nibbles, _mm256_set1_epi8(8))
            }
            Format::Q5_0 => {
                let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                let low = nibbles(block, 6);
                _mm256_sub_epi8(
                    _mm256_or_si256(low, bits_to_sixteens(high)),
                    _mm256_set1_epi8(16),
                )
            }
        }
    }

    /// 16 bytes at `at` as 32 values: low nibbles, then high nibbles.
    #[target_feature(enable = "avx2")]
    fn nibbles(block: &[u8], at: usize) -> __m256i {
        assert!(at + 16 <= block.len());
        // SAFETY: 16 bytes from `at` are inside the block.
        let bytes = unsafe { _mm_loadu_si128(block.as_ptr().add(at) as *const __m128i) };
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes);
        _mm256_and_si256(both, _mm256_set1_epi8(0xF))
    }

    /// Byte `i` is 16 where bit `i` of `bits` is set, else 0.
    #[target_feature(enable = "avx2")]
    fn bits_to_sixteens(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            ),
        );
        let select = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// Generates one kernel per instruction set: `$dot` turns a block's
    /// absolute weights and sign-adjusted activations into eight 32-bit
    /// sums of four products each. `$body` is monomorphic in the format
    /// so that decoding a block folds to its few instructions.
    macro_rules! kernel {
        ($name:ident, $body:ident, $tile:ident, $features:literal, |$a:ident, $b:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name(
                format: Format,
                bytes: &[u8],
                first: usize,
                acts: &Q8Rows,
                out: &mut [f32],
            ) {
                match format {
                    Format::Q8_0 => $body::<0>(bytes, first, acts, out),
                    Format::Q4_0 => $body::<1>(bytes, first, acts, out),
                    Format::Q5_0 => $body::<2>(bytes, first, acts, out),
                }
            }

            #[target_feature(enable = $features)]
            fn $body<const FORMAT: u8>(bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut [f32]) {
                let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
                let (rows, blocks, size) = (acts.rows(), acts.inputs / BLOCK, format.block_bytes());
                assert!(
                    acts.values.len() >= rows * acts.inputs && acts.scales.len() >= rows * blocks
                );
                let row_bytes = blocks * size;
                // A fixed row count keeps the sums in registers.
                super::super::for_each_tile(
                    bytes,
                    first,
                    row_bytes,
                    rows,
                    4,
                    out,
                    |weights, first_row, sums| match sums.len() {
                        1 => $tile::<FORMAT, 1>(weights, acts, first_row, sums),
                        2 => $tile::<FORMAT, 2>(weights, acts, first_row, sums),
                        3 => $tile::<FORMAT, 3>(weights, acts, first_row, sums),
                        _ => $tile::<FORMAT, 4>(weights, acts, first_row, sums),
                    },
                );
            }

            /// One weight row with `N` activation rows from `first_row`;
            /// even and odd blocks add into separate sums.
            #[target_feature(enable = $features)]
            fn $tile<const FORMAT: u8, const N: usize>(
                weights: &[u8],
                acts: &Q8Rows,
                first_row: usize,
                sums: &mut [f32],
            ) {
                let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
                let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
                assert!(sums.len() == N && (first_row + N) * blocks <= acts.scales.len());
                assert!(acts.values.len() >= (first_row + N) * acts.inputs);
                let mut even = [_mm256_setzero_ps(); N];
                let mut odd = [_mm256_setzero_ps(); N];
                let add_block = |b: usize, acc: &mut [__m256; N]| {
                    let block = &weights[b * size..][..size];
                    let bits = u16::from_le_bytes([block[0], block[1]]);
                    let w = values(format, block);
                    let w_scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
                    let abs_w = _mm256_sign_epi8(w, w);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let at = (first_row + i) * blocks + b;
                        // SAFETY: `at` is a block of a row inside `acts`,
                        // checked against its length above.
                        let (x, x_scale) = unsafe {
                            (
                                _mm256_loadu_si256(
                                    acts.values.as_ptr().add(at * BLOCK) as *const __m256i
                                ),
                                *acts.scales.get_unchecked(at),
                            )
                        };
                        let signed_x = _mm256_sign_epi8(x, w);
                        let ($a, $b) = (abs_w, signed_x);
                        let products = _mm256_cvtepi32_ps($dot);
                        let scale = _mm256_set1_ps(w_scale * x_scale);
                        *acc = _mm256_fmadd_ps(scale, products, *acc);
                    }
                };
                let mut b = 0;
                while b + 2 <= blocks {
                    // Two blocks span at most two cache lines.
                    prefetch_ahead(weights, b * size);
                    prefetch_ahead(weights, b * size + 64);
                    add_block(b, &mut even);
                    add_block(b + 1, &mut odd);
                    b += 2;
                }
                if b < blocks {
                    add_block(b, &mut even);
                }
                for ((slot, even), odd) in sums.iter_mut().zip(even).zip(odd) {
                    let sum = _mm256_add_ps(even, odd);
                    let mut lanes = [0f32; 8];
                    // SAFETY: `lanes` holds eight f32.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
                    *slot = super::super::f32::horizontal(lanes);
                }
            }
        };
    }

    kernel!(
        features_avx2,
        body_avx2,
        tile_avx2,
        "avx2,fma,f16c",
        |a, b| _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    );
    kernel!(
        features_avxvnni,
        body_avxvnni,
        tile_avxvnni,
        "avx2,fma,f16c,avxvnni",
        |a, b| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    );

    /// The AVX-512 kernel: two blocks per register, interleaved four bytes
    /// at a time (see [`super::interleave_pairs`]), so that the even and
    /// odd lanes hold the even and odd sums of the 256-bit kernels, lane
    /// for lane. AVX-512 has no byte
    /// sign instruction, so it multiplies the activations plus 128
    /// (unsigned) by the signed weights, starting each sum from -128 times
    /// its four weights: the same integers exactly.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn features_avx512(
        format: Format,
        bytes: &[u8],
        first: usize,
        acts: &Q8Rows,
        out: &mut [f32],
    ) {
        match format {
            Format::Q8_0 => body_avx512::<0>(bytes, first, acts, out),
            Format::Q4_0 => body_avx512::<1>(bytes, first, acts, out),
            Format::Q5_0 => body_avx512::<2>(bytes, first, acts, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn body_avx512<const FORMAT: u8>(bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut [f32]) {
        let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
        let (rows, blocks, size) = (acts.rows(), acts.inputs / BLOCK, format.block_bytes());
        assert!(
            acts.unsigned.len() >= rows * super::pair_row_bytes(acts.inputs),
            "activations without their unsigned form"
        );
        let row_bytes = blocks * size;
        // A fixed row count keeps the sums in registers.
        super::super::for_each_tile(
            bytes,
            first,
            row_bytes,
            rows,
            8,
            out,
            |weights, first_row, sums| match sums.len() {
                1 => tile_avx512::<FORMAT, 1>(weights, acts, first_row, sums),
                2 => tile_avx512::<FORMAT, 2>(weights, acts, first_row, sums),
                3 => tile_avx512::<FORMAT, 3>(weights, acts, first_row, sums),
                4 => tile_avx512::<FORMAT, 4>(weights, acts, first_row, sums),
                5 => tile_avx512::<FORMAT, 5>(weights, acts, first_row, sums),
                6 => tile_avx512::<FORMAT, 6>(weights, acts, first_row, sums),
                7 => tile_avx512::<FORMAT, 7>(weights, acts, first_row, sums),
                _ => tile_avx512::<FORMAT, 8>(weights, acts, first_row, sums),
            },
        );
    }

    /// One weight row with `N` activation rows from `first_row`.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_avx512<const FORMAT: u8, const N: usize>(
        weights: &[u8],
        acts: &Q8Rows,
        first_row: usize,
        sums: &mut [f32],
    ) {
        let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
        let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
        let width = super::pair_row_bytes(acts.inputs);
        assert!(sums.len() == N && weights.len() >= blocks * size);
        assert!(acts.unsigned.len() >= (first_row + N) * width);
        assert!(acts.scales.len() >= (first_row + N) * blocks);
        // Lane 2g takes the first block's group g, lane 2g + 1 the second's.
        let interleave = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        let mut acc = [_mm512_setzero_ps(); N];
        // The even lanes take every block's sums, the odd lanes only the
        // second of a pair: a lone last block leaves the odd sums as they are.
        let add_pair =
            |p: usize, w: __m512i, w_scale: __m512, lanes: __mmask16, acc: &mut [__m512; N]| {
                let offset = _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), w),
                );
                for (i, acc) in acc.iter_mut().enumerate() {
                    let row = first_row + i;
                    // SAFETY: pair `p` of `row` lies inside both activation
                    // forms, checked against their lengths above; a lone last
                    // block reads its one scale.
                    let (x, x_scale) = unsafe {
                        let at = acts.unsigned.as_ptr().add(row * width + p * 2 * BLOCK);
                        let scales = acts.scales.as_ptr().add(row * blocks + 2 * p);
                        let x_scale = if lanes == 0xFFFF {
                            let pair = (scales as *const f64).read_unaligned();
                            _mm512_castpd_ps(_mm512_set1_pd(pair))
                        } else {
                            _mm512_broadcast_f32x2(_mm_set_ss(*scales))
                        };
                        (_mm512_loadu_si512(at as *const __m512i), x_scale)
                    };
                    let products = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(offset, x, w));
                    let scale = _mm512_mul_ps(w_scale, x_scale);
                    *acc = _mm512_mask3_fmadd_ps(scale, products, *acc, lanes);
                }
            };
        let pair_of = |first: __m256i, second: __m256i, h0: f32, h1: f32| {
            let w = _mm512_permutex2var_epi32(
                _mm512_castsi256_si512(first),
                interleave,
                _mm512_castsi256_si512(second),
            );
            let scales = _mm_unpacklo_ps(_mm_set_ss(h0), _mm_set_ss(h1));
            (w, _mm512_broadcast_f32x2(scales))
        };
        for p in 0..blocks / 2 {
            let at = 2 * p * size;
            // Two blocks span at most two cache lines.
            prefetch_ahead(weights, at);
            prefetch_ahead(weights, at + 64);
            let (first, second) = (&weights[at..][..size], &weights[at + size..][..size]);
            let (w, w_scale) = pair_of(
                values(format, first),
                values(format, second),
                half(first),
                half(second),
            );
            add_pair(p, w, w_scale, 0xFFFF, &mut acc);
        }
        if blocks % 2 == 1 {
            let last = &weights[(blocks - 1) * size..][..size];
            let zero = _mm256_setzero_si256();
            let (w, w_scale) = pair_of(values(format, last), zero, half(last), 0.0);
            add_pair(blocks / 2, w, w_scale, 0x5555, &mut acc);
        }
        for (slot, acc) in sums.iter_mut().zip(acc) {
            let mut both = [0f32; 16];
            // SAFETY: `both` holds sixteen f32.
            unsafe { _mm512_storeu_ps(both.as_mut_ptr(), acc) };
            // The even and odd sums of each group, as the 256-bit kernels
            // add them.
            let lanes = std::array::from_fn(|g| both[2 * g] + both[2 * g + 1]);
            *slot = super::super::f32::horizontal(lanes);
        }
    }

    /// A block's f16 scale.
    #[target_feature(enable = "f16c")]
    fn half(block: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([block[0], block[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nine rows fill one 8-row tile and start another; 288 inputs are an
    /// odd number of blocks, which the 512-bit kernel ends alone.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        for inputs in [256, 288] {
            let x: Vec<f32> = (0..ROWS * inputs)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let acts = Q8Rows::quantize(&x, inputs);
            for format in [Format::Q8_0, Format::Q4_0, Format::Q5_0] {
                let size = format.block_bytes();
                let mut weights = Vec::new();
                for b in 0..inputs / BLOCK {
                    weights.extend(f16::from_f32(0.01 * (b + 1) as f32).to_le_bytes());
                    weights.extend((0..size - 2).map(|i| ((i * 29 + b * 7) % 255) as u8));
                }
                check_paths(format, &weights, &acts);
            }
        }
    }

    /// The plain values of a block decode as the format says.
    #[test]
    fn block_values_follow_the_formats() {
        let mut q5 = vec![0u8, 0, 0b0000_0001, 0, 0, 0b1000_0000];
        q5.extend([0x21u8; 16]);
        let values = Format::Q5_0.values(&q5);
        assert_eq!(
            (values[0], values[1], values[16], values[31]),
            (1, -15, -14, 2)
        );
        let q4: Vec<u8> = [0u8, 0].into_iter().chain([0xF0u8; 16]).collect();
        let values = Format::Q4_0.values(&q4);
        assert_eq!((values[0], values[16]), (-8, 7));
    }

    const ROWS: usize = 9;

    fn check_paths(format: Format, weights: &[u8], acts: &Q8Rows) {
        let mut portable = [0f32; ROWS];
        portable_tile(format, weights, acts, 0, &mut portable);
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::features::{x86, X86};
            let best = x86();
            let mut got = [0f32; ROWS];
            let same = |got: [f32; ROWS]| got.map(f32::to_bits) == portable.map(f32::to_bits);
            // SAFETY: each path runs only when the CPU has its features.
            unsafe {
                if best != X86::None {
                    x86_64::features_avx2(format, weights, 0, acts, &mut got);
                    assert!(same(got), "{format:?} AVX2");
                }
                if best == X86::Avx512Vnni {
                    x86_64::features_avx512(format, weights, 0, acts, &mut got);
                    assert!(same(got), "{format:?} AVX-512 VNNI");
                }
                if std::is_x86_feature_detected!("avxvnni") && best != X86::None {
                    x86_64::features_avxvnni(format, weights, 0, acts, &mut got);
                    assert!(same(got), "{format:?} AVX-VNNI");
                }
            }
        }
        // One row alone equals its place in the tile.
        let inputs = acts.inputs;
        let row = Q8Rows::from_parts(
            acts.values[2 * inputs..3 * inputs].to_vec(),
            acts.scales[2 * inputs / BLOCK..3 * inputs / BLOCK].to_vec(),
            inputs,
        );
        let mut alone = [0f32; 1];
        dot_features(format, weights, 0, &row, &mut alone);
        assert_eq!(alone[0].to_bits(), portable[2].to_bits(), "{format:?}");
    }
}
