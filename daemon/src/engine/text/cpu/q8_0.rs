//! Q8_0, Q5_0 and Q4_0 weights (blocks of 32 values of 8, 5 or 4 bits and
//! an f16 scale) dotted with activations quantized to Q8_0, as llama.cpp
//! does. Q5_0 is what llama.cpp's Q4_K_M falls back to for rows that are
//! not whole 256-value super-blocks (all of a 576-wide model's attention).
//!
//! candle's dot product converts both f16 scales through a function call
//! per 32 values, which made it compute-bound at a fifth of the memory's
//! speed. Here the vector kernels take the same block of sixteen weight
//! rows (eight in 256-bit registers) and transpose it in registers, so
//! that each 32-bit lane holds one weight row: eight multiply-adds with an
//! activation's four bytes broadcast give sixteen whole block sums, which
//! are converted and scaled once. Every activation row of the batch reuses
//! the transposed block. Converting each block's eight partial sums for
//! every activation row, as before, made eight rows cost three times one.
//! AVX-512 VNNI, AVX-VNNI or AVX2 is chosen at run time. Every path
//! computes the same integer block sums and adds them to a weight row's
//! sum block after block, so a result depends neither on the batch nor on
//! the instructions used.

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

/// Activation rows quantized to Q8_0: values and per-block scales, kept
/// block by block (block 0 of every row, then block 1, ...), so that a
/// kernel that takes one block of several rows finds them side by side and
/// steps from row to row by a constant, where indexing each row's blocks
/// cost a dozen instructions per row and block.
pub struct Q8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    inputs: usize,
    rows: usize,
    /// -128 times each block's sum, on CPUs with AVX-512 VNNI (empty
    /// elsewhere): the AVX-512 kernel, which has no byte
    /// sign instruction, multiplies the weights plus 128 (unsigned) by the
    /// signed activations and starts each block's sum here, to get the
    /// same integers exactly.
    offsets: Vec<i32>,
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

    /// From rows of `inputs` values one after another and their blocks'
    /// scales in the same order.
    fn from_parts(values: Vec<i8>, scales: Vec<f32>, inputs: usize) -> Self {
        let rows = values.len() / inputs;
        let (values, scales) = block_major(values, scales, rows, inputs / BLOCK);
        // Only the AVX-512 kernel reads them; the others would pay for
        // them in every product.
        let offsets = if super::features::x86() == super::features::X86::Avx512Vnni {
            values
                .chunks_exact(BLOCK)
                .map(|block| -128 * block.iter().map(|v| *v as i32).sum::<i32>())
                .collect()
        } else {
            Vec::new()
        };
        Q8Rows {
            values,
            scales,
            inputs,
            rows,
            offsets,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The index of row `row`'s block `b` among all blocks; row `row + 1`'s
    /// is the next.
    #[inline(always)]
    pub fn at(&self, row: usize, b: usize) -> usize {
        b * self.rows + row
    }

    /// Row `row`'s block `b`: its values and scale.
    #[inline(always)]
    pub fn block(&self, row: usize, b: usize) -> (&[i8; BLOCK], f32) {
        let at = self.at(row, b);
        let values = self.values[at * BLOCK..][..BLOCK]
            .try_into()
            .expect("a block is 32 values");
        (values, self.scales[at])
    }

    /// Checks that rows `first..first + n` are here (with their offsets
    /// where `offsets`), so that a kernel may then read their blocks with
    /// [`Q8Rows::block_at`] and [`Q8Rows::block_and_offset_at`].
    pub fn assert_rows(&self, first: usize, n: usize, offsets: bool) {
        let blocks = self.rows * (self.inputs / BLOCK);
        assert!(
            first + n <= self.rows,
            "activation rows {first}+{n} of {}",
            self.rows
        );
        assert!(self.scales.len() == blocks && self.values.len() == blocks * BLOCK);
        assert!(!offsets || self.offsets.len() == blocks, "no VNNI offsets");
    }

    /// Block `at`'s values, as eight groups of four bytes, and its scale.
    ///
    /// # Safety
    /// `at` is [`Q8Rows::at`] of a row and block that
    /// [`Q8Rows::assert_rows`] checked.
    #[inline(always)]
    pub unsafe fn block_at(&self, at: usize) -> (*const i32, f32) {
        // SAFETY: as the caller promises, `at` is below the block count.
        unsafe {
            (
                self.values.as_ptr().add(at * BLOCK) as *const i32,
                *self.scales.get_unchecked(at),
            )
        }
    }

    /// [`Q8Rows::block_at`] and the block's offset, for the AVX-512
    /// kernels ([`Q8Rows::offsets`]).
    ///
    /// # Safety
    /// As [`Q8Rows::block_at`], with the offsets checked.
    #[inline(always)]
    pub unsafe fn block_and_offset_at(&self, at: usize) -> (*const i32, f32, i32) {
        // SAFETY: as the caller promises.
        unsafe {
            let (values, scale) = self.block_at(at);
            (values, scale, *self.offsets.get_unchecked(at))
        }
    }
}

/// Row-major blocks reordered block by block: row `r`'s block `b` moves
/// from `r * blocks + b` to `b * rows + r`.
fn block_major(
    values: Vec<i8>,
    scales: Vec<f32>,
    rows: usize,
    blocks: usize,
) -> (Vec<i8>, Vec<f32>) {
    if rows <= 1 {
        return (values, scales);
    }
    let (mut by_block, mut block_scales) = (vec![0i8; values.len()], vec![0f32; scales.len()]);
    for (from, (block, scale)) in values.chunks_exact(BLOCK).zip(&scales).enumerate() {
        let to = (from % blocks) * rows + from / blocks;
        by_block[to * BLOCK..][..BLOCK].copy_from_slice(block);
        block_scales[to] = *scale;
    }
    (by_block, block_scales)
}

/// Where a product's sums go: `put(f, r, sum)` for the task's weight row
/// `f` (from its first) and activation row `r`.
pub trait Sums {
    /// The task's weight rows.
    fn features(&self) -> usize;
    fn put(&mut self, feature: usize, row: usize, sum: f32);
}

/// Sums feature by feature, `out[f * rows + r]`, the other kernels' order.
pub struct FeatureMajor<'a> {
    pub out: &'a mut [f32],
    pub rows: usize,
}

impl Sums for FeatureMajor<'_> {
    fn features(&self) -> usize {
        self.out.len() / self.rows
    }

    #[inline(always)]
    fn put(&mut self, feature: usize, row: usize, sum: f32) {
        self.out[feature * self.rows + row] = sum;
    }
}

/// Weight rows `first..` of a `format` matrix in `bytes`, each dotted
/// with every activation row, into `out`. The instruction set is picked
/// once per call, and the loops live inside each kernel.
pub fn dot_into<S: Sums>(format: Format, bytes: &[u8], first: usize, acts: &Q8Rows, out: &mut S) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::features::{x86, X86};
        let kernel = match x86() {
            X86::Avx512Vnni => x86_64::features_avx512::<S>,
            X86::AvxVnni => x86_64::features_avxvnni::<S>,
            X86::Avx2 => x86_64::features_avx2::<S>,
            X86::None => return portable_features(format, bytes, first, acts, out),
        };
        // SAFETY: the CPU has the features of the kernel picked for it.
        unsafe { kernel(format, bytes, first, acts, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable_features(format, bytes, first, acts, out);
}

pub(super) fn portable_features<S: Sums>(
    format: Format,
    bytes: &[u8],
    first: usize,
    acts: &Q8Rows,
    out: &mut S,
) {
    let (rows, row_bytes) = (acts.rows(), acts.inputs / BLOCK * format.block_bytes());
    let mut sums = vec![0f32; rows];
    for f in 0..out.features() {
        let weights = &bytes[(first + f) * row_bytes..][..row_bytes];
        portable_tile(format, weights, acts, 0, &mut sums);
        for (r, sum) in sums.iter().enumerate() {
            out.put(f, r, *sum);
        }
    }
}

/// The same sums in plain Rust: per block an integer dot product, scaled
/// and added into the weight row's sum, block after block, as each lane
/// of the vector paths does.
fn portable_tile(format: Format, weights: &[u8], acts: &Q8Rows, first_row: usize, out: &mut [f32]) {
    let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
    for (i, slot) in out.iter_mut().enumerate() {
        let row = first_row + i;
        let mut sum = 0f32;
        for b in 0..blocks {
            let block = &weights[b * size..][..size];
            let w = format.values(block);
            let (x, x_scale) = acts.block(row, b);
            let scale = f16::from_le_bytes([block[0], block[1]]).to_f32_const() * x_scale;
            let dot: i32 = w.iter().zip(x).map(|(w, x)| *w as i32 * *x as i32).sum();
            sum = scale.mul_add(dot as f32, sum);
        }
        *slot = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use super::{Format, Q8Rows, Sums, BLOCK};
    use crate::engine::text::cpu::prefetch_at;
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

    /// Block `b` of the first `LANES` weight rows in `rows`, as vectors
    /// of its values, and its scales' f16 bits. Gathering the scales with
    /// a vector gather was slower than these plain loads.
    ///
    /// # Safety
    /// The CPU must have avx2: this is inlined into kernels
    /// compiled for them.
    #[inline(always)]
    unsafe fn block_of_rows<const LANES: usize>(
        format: Format,
        rows: &[u8],
        row_bytes: usize,
        b: usize,
    ) -> ([__m256i; LANES], [u16; LANES]) {
        // SAFETY: the caller vouches for the CPU's features.
        unsafe {
            let size = format.block_bytes();
            let at = b * size;
            assert!(LANES * row_bytes <= rows.len() && at + size <= row_bytes);
            // Loops, not `array::from_fn`, whose closure was not inlined.
            let (mut vectors, mut bits) = ([_mm256_setzero_si256(); LANES], [0u16; LANES]);
            for k in 0..LANES {
                let block = &rows[k * row_bytes + at..][..size];
                vectors[k] = values(format, block);
                bits[k] = u16::from_le_bytes([block[0], block[1]]);
            }
            (vectors, bits)
        }
    }

    /// Block `b` of the first eight weight rows in `rows`, transposed:
    /// lane `j` of vector `s` holds bytes `4s..4s + 4` of row `j`'s block;
    /// and their scales.
    ///
    /// # Safety
    /// The CPU must have avx2,fma,f16c: this is inlined into kernels
    /// compiled for them.
    #[inline(always)]
    unsafe fn eight_rows(
        format: Format,
        rows: &[u8],
        row_bytes: usize,
        b: usize,
    ) -> ([__m256i; 8], __m256) {
        // SAFETY: the caller vouches for the CPU's features.
        unsafe {
            let (r, bits) = block_of_rows::<8>(format, rows, row_bytes, b);
            // `bits` holds eight u16.
            let scales = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr() as *const __m128i));
            (transpose_8x8(r), scales)
        }
    }

    /// The first two stages of an 8x8 transpose of 32-bit lanes, which
    /// stay within each 128-bit quarter: pairs of 32-bit lanes of rows
    /// `r`, then pairs of 64-bit lanes. The same for 256- and 512-bit
    /// registers, given their unpack instructions.
    macro_rules! within_quarters {
        ($r:expr, $lo32:ident, $hi32:ident, $lo64:ident, $hi64:ident) => {{
            let r = $r;
            let t = [
                $lo32(r[0], r[1]),
                $hi32(r[0], r[1]),
                $lo32(r[2], r[3]),
                $hi32(r[2], r[3]),
                $lo32(r[4], r[5]),
                $hi32(r[4], r[5]),
                $lo32(r[6], r[7]),
                $hi32(r[6], r[7]),
            ];
            [
                $lo64(t[0], t[2]),
                $hi64(t[0], t[2]),
                $lo64(t[1], t[3]),
                $hi64(t[1], t[3]),
                $lo64(t[4], t[6]),
                $hi64(t[4], t[6]),
                $lo64(t[5], t[7]),
                $hi64(t[5], t[7]),
            ]
        }};
    }

    /// The usual 8x8 transpose of 32-bit lanes: pairs of 32-bit lanes,
    /// then of 64-bit lanes within each 128-bit half, then the halves.
    ///
    /// # Safety
    /// The CPU must have avx2: this is inlined into kernels
    /// compiled for them.
    #[inline(always)]
    unsafe fn transpose_8x8(r: [__m256i; 8]) -> [__m256i; 8] {
        // SAFETY: the caller vouches for the CPU's features.
        unsafe {
            // `u[s]` holds lane `s` of rows 0-3 in its low half and lane
            // `s + 4` in its high half; `u[s + 4]` the same of rows 4-7.
            let u = within_quarters!(
                r,
                _mm256_unpacklo_epi32,
                _mm256_unpackhi_epi32,
                _mm256_unpacklo_epi64,
                _mm256_unpackhi_epi64
            );
            let mut out = [_mm256_setzero_si256(); 8];
            for s in 0..4 {
                out[s] = _mm256_permute2x128_si256::<0x20>(u[s], u[s + 4]);
                out[s + 4] = _mm256_permute2x128_si256::<0x31>(u[s], u[s + 4]);
            }
            out
        }
    }

    /// Dots every weight row from `first` with every activation row,
    /// `LANES` weight rows and `TILE` activation rows at a time:
    /// `tile(rows, first_row, sums)` fills `sums[i][j]` for activation row
    /// `first_row + i` and weight row `j` in `rows`. A last partial set of
    /// weight rows is copied after zeros' rows, whose sums are dropped.
    #[inline(always)]
    fn by_tiles<const LANES: usize, const TILE: usize>(
        bytes: &[u8],
        first: usize,
        row_bytes: usize,
        acts: &Q8Rows,
        out: &mut impl Sums,
        mut tile: impl FnMut(&[u8], usize, &mut [[f32; LANES]; TILE]),
    ) {
        let rows = acts.rows();
        let features = out.features();
        let mut padded = Vec::new();
        for f in (0..features).step_by(LANES) {
            let count = LANES.min(features - f);
            let mut weights = &bytes[(first + f) * row_bytes..][..count * row_bytes];
            if count < LANES {
                padded.resize(LANES * row_bytes, 0);
                padded[..weights.len()].copy_from_slice(weights);
                weights = &padded;
            }
            for first_row in (0..rows).step_by(TILE) {
                let mut sums = [[0f32; LANES]; TILE];
                tile(weights, first_row, &mut sums);
                for (i, sums) in sums.iter().enumerate().take(rows - first_row) {
                    for (j, sum) in sums.iter().enumerate().take(count) {
                        out.put(f + j, first_row + i, *sum);
                    }
                }
            }
        }
    }

    /// Asks for the next set of `LANES` weight rows (`LANES * size` bytes
    /// of it per block), so that it streams in while this set is dotted
    /// column by column, which the hardware prefetchers do not follow.
    #[inline(always)]
    fn prefetch_next<const LANES: usize>(rows: &[u8], row_bytes: usize, size: usize, b: usize) {
        let next = LANES * row_bytes + b * LANES * size;
        for line in (0..LANES * size).step_by(64) {
            prefetch_at(rows, next + line);
        }
    }

    /// Generates the 256-bit kernels: `$dot` adds to `$acc` the four-byte
    /// dot products of absolute weights `$a` and sign-adjusted activations
    /// `$b`, lane by lane. `$body` is monomorphic in the format so that
    /// decoding a block folds to its few instructions.
    macro_rules! kernel {
        ($name:ident, $body:ident, $tile:ident, $features:literal,
         |$acc:ident, $a:ident, $b:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name<S: Sums>(
                format: Format,
                bytes: &[u8],
                first: usize,
                acts: &Q8Rows,
                out: &mut S,
            ) {
                match format {
                    Format::Q8_0 => $body::<0>(bytes, first, acts, out),
                    Format::Q4_0 => $body::<1>(bytes, first, acts, out),
                    Format::Q5_0 => $body::<2>(bytes, first, acts, out),
                }
            }

            #[target_feature(enable = $features)]
            fn $body<const FORMAT: u8>(
                bytes: &[u8],
                first: usize,
                acts: &Q8Rows,
                out: &mut impl Sums,
            ) {
                let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
                let row_bytes = acts.inputs / BLOCK * format.block_bytes();
                let rows = acts.rows();
                // A fixed row count keeps the sums in registers.
                by_tiles::<8, 4>(
                    bytes,
                    first,
                    row_bytes,
                    acts,
                    out,
                    |w, first_row, sums| match rows - first_row {
                        1 => $tile::<FORMAT, 1>(w, acts, first_row, sums),
                        2 => $tile::<FORMAT, 2>(w, acts, first_row, sums),
                        3 => $tile::<FORMAT, 3>(w, acts, first_row, sums),
                        _ => $tile::<FORMAT, 4>(w, acts, first_row, sums),
                    },
                );
            }

            /// Eight weight rows with `N` activation rows from `first_row`;
            /// the next set of weight rows is asked for meanwhile.
            #[target_feature(enable = $features)]
            fn $tile<const FORMAT: u8, const N: usize>(
                weights: &[u8],
                acts: &Q8Rows,
                first_row: usize,
                sums: &mut [[f32; 8]; 4],
            ) {
                let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
                let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
                let row_bytes = blocks * size;
                assert!(N <= 4);
                acts.assert_rows(first_row, N, false);
                let mut acc = [_mm256_setzero_ps(); N];
                for b in 0..blocks {
                    prefetch_next::<8>(weights, row_bytes, size, b);
                    // SAFETY: this kernel is compiled for AVX2, FMA and F16C.
                    let (w, w_scales) = unsafe { eight_rows(format, weights, row_bytes, b) };
                    let mut abs_w = w;
                    for w in &mut abs_w {
                        *w = _mm256_sign_epi8(*w, *w);
                    }
                    let first = acts.at(first_row, b);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: the rows were checked above.
                        let (x, x_scale) = unsafe { acts.block_at(first + i) };
                        let mut dot = _mm256_setzero_si256();
                        for s in 0..8 {
                            // SAFETY: as above; four bytes of the block.
                            let four = _mm256_set1_epi32(unsafe { x.add(s).read_unaligned() });
                            let ($acc, $a, $b) = (dot, abs_w[s], _mm256_sign_epi8(four, w[s]));
                            dot = $dot;
                        }
                        let scale = _mm256_mul_ps(w_scales, _mm256_set1_ps(x_scale));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                    }
                }
                for (sums, acc) in sums.iter_mut().zip(acc) {
                    // SAFETY: `sums` holds eight f32.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), acc) };
                }
            }
        };
    }

    kernel!(
        features_avx2,
        body_avx2,
        tile_avx2,
        "avx2,fma,f16c",
        |acc, a, b| _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
        )
    );
    kernel!(
        features_avxvnni,
        body_avxvnni,
        tile_avxvnni,
        "avx2,fma,f16c,avxvnni",
        |acc, a, b| _mm256_dpbusd_avx_epi32(acc, a, b)
    );

    /// Block `b` of the first sixteen weight rows in `rows` transposed, as
    /// [`eight_rows`] does for eight.
    ///
    /// # Safety
    /// The CPU must have avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c:
    /// this is inlined into kernels compiled for them.
    #[inline(always)]
    unsafe fn sixteen_rows(
        format: Format,
        rows: &[u8],
        row_bytes: usize,
        b: usize,
    ) -> ([__m512i; 8], __m512) {
        // SAFETY: the caller vouches for the CPU's features.
        unsafe {
            let (block, bits) = block_of_rows::<16>(format, rows, row_bytes, b);
            // `bits` holds sixteen u16.
            let scales = _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr() as *const __m256i));
            // Rows k and k + 8 side by side, then the 8x8 transpose of
            // `transpose_8x8` in both 256-bit halves at once.
            let mut r = [_mm512_setzero_si512(); 8];
            for (k, r) in r.iter_mut().enumerate() {
                *r = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block[k]), block[k + 8]);
            }
            // By 128-bit quarters, `u[s]` holds lane `s` of rows 0-3, lane
            // `s + 4` of rows 0-3, lane `s` of rows 8-11 and lane `s + 4` of
            // rows 8-11; `u[s + 4]` the same of rows 4-7 and 12-15.
            let u = within_quarters!(
                r,
                _mm512_unpacklo_epi32,
                _mm512_unpackhi_epi32,
                _mm512_unpacklo_epi64,
                _mm512_unpackhi_epi64
            );
            // The even quarters of both for lane `s`, the odd ones for `s + 4`.
            let even = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
            let odd = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
            let mut out = [_mm512_setzero_si512(); 8];
            for s in 0..4 {
                out[s] = _mm512_permutex2var_epi64(u[s], even, u[s + 4]);
                out[s + 4] = _mm512_permutex2var_epi64(u[s], odd, u[s + 4]);
            }
            (out, scales)
        }
    }

    /// The AVX-512 kernel: sixteen weight rows per register. AVX-512 has
    /// no byte sign instruction, so it multiplies the weights plus 128
    /// (unsigned) by the signed activations, starting each block's sum
    /// from -128 times its activations' sum ([`Q8Rows::offsets`]): the
    /// same integers exactly.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn features_avx512<S: Sums>(
        format: Format,
        bytes: &[u8],
        first: usize,
        acts: &Q8Rows,
        out: &mut S,
    ) {
        match format {
            Format::Q8_0 => body_avx512::<0>(bytes, first, acts, out),
            Format::Q4_0 => body_avx512::<1>(bytes, first, acts, out),
            Format::Q5_0 => body_avx512::<2>(bytes, first, acts, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn body_avx512<const FORMAT: u8>(
        bytes: &[u8],
        first: usize,
        acts: &Q8Rows,
        out: &mut impl Sums,
    ) {
        let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
        let row_bytes = acts.inputs / BLOCK * format.block_bytes();
        let rows = acts.rows();
        // A fixed row count keeps the sums in registers.
        by_tiles::<16, 16>(bytes, first, row_bytes, acts, out, |w, first_row, sums| {
            tile_rows::<FORMAT>(w, acts, first_row, rows - first_row, sums)
        });
    }

    /// The first `count` (at least one) activation rows from `first_row`
    /// with sixteen weight rows: sixteen at once where there are, which
    /// transposes each weight block once for a prompt's sixteen rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_rows<const FORMAT: u8>(
        w: &[u8],
        acts: &Q8Rows,
        first_row: usize,
        count: usize,
        sums: &mut [[f32; 16]],
    ) {
        match count {
            1 => tile_avx512::<FORMAT, 1>(w, acts, first_row, sums),
            2 => tile_avx512::<FORMAT, 2>(w, acts, first_row, sums),
            3 => tile_avx512::<FORMAT, 3>(w, acts, first_row, sums),
            4 => tile_avx512::<FORMAT, 4>(w, acts, first_row, sums),
            5 => tile_avx512::<FORMAT, 5>(w, acts, first_row, sums),
            6 => tile_avx512::<FORMAT, 6>(w, acts, first_row, sums),
            7 => tile_avx512::<FORMAT, 7>(w, acts, first_row, sums),
            8 => tile_avx512::<FORMAT, 8>(w, acts, first_row, sums),
            9..=15 => {
                tile_avx512::<FORMAT, 8>(w, acts, first_row, sums);
                tile_rows::<FORMAT>(w, acts, first_row + 8, count - 8, &mut sums[8..]);
            }
            _ => tile_avx512::<FORMAT, 16>(w, acts, first_row, sums),
        }
    }

    /// Sixteen weight rows with `N` activation rows from `first_row`; the
    /// next set of weight rows is asked for meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_avx512<const FORMAT: u8, const N: usize>(
        weights: &[u8],
        acts: &Q8Rows,
        first_row: usize,
        sums: &mut [[f32; 16]],
    ) {
        let format = [Format::Q8_0, Format::Q4_0, Format::Q5_0][FORMAT as usize];
        let (blocks, size) = (acts.inputs / BLOCK, format.block_bytes());
        let row_bytes = blocks * size;
        assert!(N <= sums.len());
        acts.assert_rows(first_row, N, true);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            prefetch_next::<16>(weights, row_bytes, size, b);
            // SAFETY: this kernel is compiled for AVX-512.
            let (w, w_scales) = unsafe { sixteen_rows(format, weights, row_bytes, b) };
            let mut biased = w;
            for w in &mut biased {
                *w = _mm512_xor_si512(*w, _mm512_set1_epi8(-128));
            }
            let first = acts.at(first_row, b);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the rows and their offsets were checked above.
                let (x, x_scale, offset) = unsafe { acts.block_and_offset_at(first + i) };
                let mut dot = _mm512_set1_epi32(offset);
                for (s, biased) in biased.iter().enumerate() {
                    // SAFETY: as above; four bytes of the block.
                    let four = _mm512_set1_epi32(unsafe { x.add(s).read_unaligned() });
                    dot = _mm512_dpbusd_epi32(dot, *biased, four);
                }
                let scale = _mm512_mul_ps(w_scales, _mm512_set1_ps(x_scale));
                *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
            }
        }
        for (sums, acc) in sums.iter_mut().zip(acc) {
            // SAFETY: `sums` holds sixteen f32.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Twenty-nine activation rows fill a 16-row tile, then an 8-row one,
    /// then five rows (and seven 4-row tiles and one row in 256 bits), and
    /// nineteen weight rows fill a 16-row (and two 8-row) register and
    /// start another; the widths are odd and even block counts.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        for inputs in [256, 288, 576] {
            let x: Vec<f32> = (0..ROWS * inputs)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let acts = Q8Rows::quantize(&x, inputs);
            for format in [Format::Q8_0, Format::Q4_0, Format::Q5_0] {
                let size = format.block_bytes();
                let mut weights = Vec::new();
                for b in 0..FEATURES * inputs / BLOCK {
                    weights.extend(f16::from_f32(0.01 * (b % 23 + 1) as f32).to_le_bytes());
                    weights.extend((0..size - 2).map(|i| ((i * 29 + b * 7) % 255) as u8));
                }
                check_paths(format, &weights, &acts);
            }
        }
    }

    /// Kept block by block, each row's blocks are still its own: the same
    /// values and scales as the row quantized alone.
    #[test]
    fn a_rows_blocks_are_its_own_quantized_alone() {
        let inputs = 96;
        let x: Vec<f32> = (0..5 * inputs)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / (1 + i / inputs) as f32)
            .collect();
        let acts = Q8Rows::quantize(&x, inputs);
        assert_eq!((acts.rows(), acts.at(1, 0), acts.at(0, 1)), (5, 1, 5));
        for (r, row) in x.chunks_exact(inputs).enumerate() {
            let alone = Q8Rows::quantize(row, inputs);
            for b in 0..inputs / BLOCK {
                assert_eq!(acts.block(r, b), alone.block(0, b), "row {r}, block {b}");
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

    const ROWS: usize = 29;
    const FEATURES: usize = 19;

    fn check_paths(format: Format, weights: &[u8], acts: &Q8Rows) {
        let mut portable = [0f32; ROWS * FEATURES];
        fn sums(out: &mut [f32]) -> FeatureMajor<'_> {
            FeatureMajor { out, rows: ROWS }
        }
        portable_features(format, weights, 0, acts, &mut sums(&mut portable));
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::features::{x86, X86};
            let best = x86();
            let mut got = [0f32; ROWS * FEATURES];
            let same = |got: &[f32]| {
                got.iter()
                    .map(|v| v.to_bits())
                    .eq(portable.map(f32::to_bits))
            };
            // SAFETY: each path runs only when the CPU has its features.
            unsafe {
                if best != X86::None {
                    x86_64::features_avx2(format, weights, 0, acts, &mut sums(&mut got));
                    assert!(same(&got), "{format:?} AVX2");
                }
                if best == X86::Avx512Vnni {
                    x86_64::features_avx512(format, weights, 0, acts, &mut sums(&mut got));
                    assert!(same(&got), "{format:?} AVX-512 VNNI");
                    // A task that starts mid-matrix, on a part of a register.
                    let mut part = [0f32; ROWS * 5];
                    x86_64::features_avx512(format, weights, 14, acts, &mut sums(&mut part));
                    assert!(part
                        .iter()
                        .map(|v| v.to_bits())
                        .eq(portable[14 * ROWS..].iter().map(|v| v.to_bits())));
                }
                if std::is_x86_feature_detected!("avxvnni") && best != X86::None {
                    x86_64::features_avxvnni(format, weights, 0, acts, &mut sums(&mut got));
                    assert!(same(&got), "{format:?} AVX-VNNI");
                }
            }
        }
        // One row alone equals its place in the batch.
        let inputs = acts.inputs;
        let blocks: Vec<_> = (0..inputs / BLOCK).map(|b| acts.block(2, b)).collect();
        let row = Q8Rows::from_parts(
            blocks
                .iter()
                .flat_map(|(values, _)| values.iter().copied())
                .collect(),
            blocks.iter().map(|(_, scale)| *scale).collect(),
            inputs,
        );
        let mut alone = [0f32; FEATURES];
        dot_into(
            format,
            weights,
            0,
            &row,
            &mut FeatureMajor {
                out: &mut alone,
                rows: 1,
            },
        );
        let batched = (0..FEATURES).map(|f| portable[f * ROWS + 2].to_bits());
        assert!(alone.iter().map(|v| v.to_bits()).eq(batched), "{format:?}");
    }
}
