//! Q4_K, Q5_K and Q6_K weights (super-blocks of 256 values with 6- or
//! 8-bit sub-block scales) dotted with activations quantized to 8 bits
//! per 256 values, the k-quants of the files people download (Q4_K_M mixes
//! Q4_K and Q6_K; Q5_K_M Q5_K and Q6_K).
//!
//! For each super-block the integer sum of scale × weight × activation is
//! computed exactly (AVX2 when the CPU has it, plain Rust otherwise), then
//! turned into floats in one fixed order of scalar operations shared by
//! every path. So a row's result is the same on any path, alone or in a
//! batch. candle's own k-quant dot products were compute-bound at a fifth
//! of the memory's speed; these read up to four activation rows per
//! weight super-block while it is in registers.

use half::f16;

pub const SUPER: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4K,
    Q5K,
    Q6K,
}

impl Kind {
    pub fn block_bytes(self) -> usize {
        match self {
            Kind::Q4K => 144,
            Kind::Q5K => 176,
            Kind::Q6K => 210,
        }
    }
}

/// Activation rows quantized to 8 bits per 256 values, with each group
/// of 16 values' sum for the weights' offsets and minimums.
pub struct K8Rows {
    values: Vec<i8>,
    scales: Vec<f32>,
    sums16: Vec<i32>,
    /// Per row and super-block, four words: word `k` holds the sums of
    /// 32-value sub-blocks `2k` and `2k + 1` as its low and high 16 bits
    /// (each within ±32 × 127), which the repacked kernel multiplies by
    /// pairs of minimums in one instruction.
    pair_sums: Vec<i32>,
    inputs: usize,
}

impl K8Rows {
    pub fn quantize(x: &[f32], inputs: usize) -> Self {
        let mut values = vec![0i8; x.len()];
        let maxima = super::quantize_blocks(x, SUPER, &mut values);
        let scales = maxima.iter().map(|max| max / 127.0).collect();
        let sums16 = values
            .chunks_exact(16)
            .map(|g| g.iter().map(|v| *v as i32).sum::<i32>())
            .collect::<Vec<_>>();
        let pair_sums = sums16
            .chunks_exact(4)
            .map(|s| {
                let half = |a: i32, b: i32| (a + b) as i16 as u16 as u32;
                (half(s[0], s[1]) | half(s[2], s[3]) << 16) as i32
            })
            .collect();
        K8Rows {
            values,
            scales,
            sums16,
            pair_sums,
            inputs,
        }
    }

    pub fn rows(&self) -> usize {
        self.values.len() / self.inputs
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Row `row`'s values in super-block `b`.
    pub fn block(&self, row: usize, b: usize) -> &[i8; SUPER] {
        let supers = self.inputs / SUPER;
        let values = &self.values[(row * supers + b) * SUPER..][..SUPER];
        values.try_into().expect("a super-block")
    }

    /// Row `row`'s scale in super-block `b`.
    pub fn scale(&self, row: usize, b: usize) -> f32 {
        self.scales[row * self.inputs / SUPER + b]
    }

    /// The sums of row `row`'s sixteen 16-value groups in super-block `b`.
    pub fn sums16(&self, row: usize, b: usize) -> &[i32; 16] {
        let at = (row * self.inputs / SUPER + b) * 16;
        self.sums16[at..][..16].try_into().expect("sixteen sums")
    }

    /// Row `row`'s [`K8Rows::pair_sums`] words in super-block `b`.
    pub fn pair_sums(&self, row: usize, b: usize) -> &[i32; 4] {
        let at = (row * self.inputs / SUPER + b) * 4;
        self.pair_sums[at..][..4].try_into().expect("four words")
    }
}

/// Weight rows `first..` of a `kind` matrix in `bytes`, each dotted with
/// every activation row: fills `out[f * rows + r]`.
pub fn dot_features(kind: Kind, bytes: &[u8], first: usize, acts: &K8Rows, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::features::x86() != super::features::X86::None {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2::dot_features(kind, bytes, first, acts, out) };
    }
    features_with(kind, bytes, first, acts, out, &Portable);
}

/// The super-block integer sums of one instruction set.
trait Sums {
    fn q4k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4];
    fn q5k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4];
    fn q6k(&self, block: &[u8], scales: &[i8; 16], rows: [&[i8]; 4], n: usize) -> [i32; 4];
}

struct Portable;

impl Sums for Portable {
    fn q4k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        portable_q4k(block, scales, rows, n)
    }
    fn q5k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        portable_q5k(block, scales, rows, n)
    }
    fn q6k(&self, block: &[u8], scales: &[i8; 16], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        portable_q6k(block, scales, rows, n)
    }
}

/// The loops over features and tiles of four rows, inlined into each
/// instruction set's entry so that the sums inline too.
#[inline(always)]
fn features_with(
    kind: Kind,
    bytes: &[u8],
    first: usize,
    acts: &K8Rows,
    out: &mut [f32],
    sums: &impl Sums,
) {
    let row_bytes = acts.inputs / SUPER * kind.block_bytes();
    super::for_each_tile(
        bytes,
        first,
        row_bytes,
        acts.rows(),
        4,
        out,
        |weights, first_row, out| dot_tile(kind, weights, acts, first_row, out, sums),
    );
}

/// Adds a Q6_K super-block to a row's sum: `total` is the exact integer
/// sum of scale × (weight - 32) × activation, `y` the activations' scale.
/// Every path, file layout or repacked, ends with these operations in
/// this order, which keeps their results the same bit for bit.
#[inline(always)]
pub fn add_q6k(acc: f32, y: f32, d: f32, total: i32) -> f32 {
    (d * y).mul_add(total as f32, acc)
}

/// Adds a Q4_K or Q5_K super-block to a row's sum: `sum` is the exact
/// integer sum of scale × weight × activation, `min_sum` of minimum ×
/// activation, each with its half (`d`, `dmin`); as [`add_q6k`].
#[inline(always)]
pub fn add_q4k(acc: f32, y: f32, (d, sum): (f32, i32), (dmin, min_sum): (f32, i32)) -> f32 {
    let acc = (d * y).mul_add(sum as f32, acc);
    (-(dmin * y)).mul_add(min_sum as f32, acc)
}

/// The 6-bit scales and minimums of a Q4_K or Q5_K super-block, as
/// llama.cpp packs them into 12 bytes.
pub fn scales_and_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            scales[j] = packed[j] & 63;
            mins[j] = packed[j + 4] & 63;
        } else {
            scales[j] = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
            mins[j] = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
        }
    }
    (scales, mins)
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    // The const conversion inlines; `to_f32` calls out to detect F16C.
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32_const()
}

/// One weight row with activation rows `first_row..first_row + out.len()`.
#[inline(always)]
fn dot_tile(
    kind: Kind,
    weights: &[u8],
    acts: &K8Rows,
    first_row: usize,
    out: &mut [f32],
    s: &impl Sums,
) {
    let supers = acts.inputs / SUPER;
    let mut acc = [0f32; 4];
    for b in 0..supers {
        let at = b * kind.block_bytes();
        // A super-block spans at most four cache lines.
        for line in 0..4 {
            super::prefetch_ahead(weights, at + line * 64);
        }
        let block = &weights[at..][..kind.block_bytes()];
        let rows: [&[i8]; 4] =
            std::array::from_fn(|i| acts.block(first_row + i.min(out.len() - 1), b).as_slice());
        match kind {
            Kind::Q6K => {
                let scales: [i8; 16] = std::array::from_fn(|k| block[192 + k] as i8);
                let sums = s.q6k(block, &scales, rows, out.len());
                let d = half_at(block, 208);
                for (i, acc) in acc.iter_mut().enumerate().take(out.len()) {
                    let row = first_row + i;
                    let groups = acts.sums16(row, b);
                    let offset: i32 = scales.iter().zip(groups).map(|(s, g)| *s as i32 * g).sum();
                    *acc = add_q6k(*acc, acts.scale(row, b), d, sums[i] - 32 * offset);
                }
            }
            Kind::Q4K | Kind::Q5K => {
                let (scales, mins) = scales_and_mins(&block[4..16]);
                let sums = if kind == Kind::Q4K {
                    s.q4k(block, &scales, rows, out.len())
                } else {
                    s.q5k(block, &scales, rows, out.len())
                };
                let (d, dmin) = (half_at(block, 0), half_at(block, 2));
                for (i, acc) in acc.iter_mut().enumerate().take(out.len()) {
                    let row = first_row + i;
                    let groups = acts.sums16(row, b);
                    let min_sum: i32 = (0..8)
                        .map(|k| mins[k] as i32 * (groups[2 * k] + groups[2 * k + 1]))
                        .sum();
                    *acc = add_q4k(*acc, acts.scale(row, b), (d, sums[i]), (dmin, min_sum));
                }
            }
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Value `l` (0 to 255) of a super-block as stored, before its scale and
/// offset: 4 bits for Q4_K, 5 for Q5_K, 6 for Q6_K.
#[inline(always)]
pub(super) fn quant_at(kind: Kind, block: &[u8], l: usize) -> u8 {
    match kind {
        Kind::Q4K | Kind::Q5K => {
            let q = if kind == Kind::Q4K {
                &block[16..144]
            } else {
                &block[48..176]
            };
            let (chunk, at) = (l / 64, l % 64);
            let byte = q[chunk * 32 + at % 32];
            let low = if at < 32 { byte & 0xF } else { byte >> 4 };
            if kind == Kind::Q4K {
                return low;
            }
            low | ((block[16 + at % 32] >> (l / 32)) & 1) << 4
        }
        Kind::Q6K => {
            let (half, at) = (l / 128, l % 128);
            let (quarter, i) = (at / 32, at % 32);
            let low = block[half * 64 + (quarter % 2) * 32 + i];
            let low = if quarter < 2 { low & 0xF } else { low >> 4 };
            let high = (block[128 + half * 32 + i] >> (2 * quarter)) & 3;
            low | (high << 4)
        }
    }
}

fn portable_q4k(block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
    portable_sums(rows, n, |l| {
        quant_at(Kind::Q4K, block, l) as i32 * scales[l / 32] as i32
    })
}

fn portable_q5k(block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
    portable_sums(rows, n, |l| {
        quant_at(Kind::Q5K, block, l) as i32 * scales[l / 32] as i32
    })
}

fn portable_q6k(block: &[u8], scales: &[i8; 16], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
    portable_sums(rows, n, |l| {
        quant_at(Kind::Q6K, block, l) as i32 * scales[l / 16] as i32
    })
}

/// Σ weight(l) · y[l] for each row, `weight` giving scale · q at `l`.
fn portable_sums(rows: [&[i8]; 4], n: usize, weight: impl Fn(usize) -> i32) -> [i32; 4] {
    let weights: Vec<i32> = (0..SUPER).map(weight).collect();
    std::array::from_fn(|r| {
        if r >= n {
            return 0;
        }
        weights
            .iter()
            .zip(rows[r])
            .map(|(w, y)| w * *y as i32)
            .sum()
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{features_with, K8Rows, Kind, Sums, SUPER};
    use std::arch::x86_64::*;

    struct Avx2;

    impl Sums for Avx2 {
        #[inline(always)]
        fn q4k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
            // SAFETY: only reached from `dot_features`, on a CPU with AVX2.
            unsafe { sums_q4k(block, scales, rows, n) }
        }
        #[inline(always)]
        fn q5k(&self, block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
            // SAFETY: as above.
            unsafe { sums_q5k(block, scales, rows, n) }
        }
        #[inline(always)]
        fn q6k(&self, block: &[u8], scales: &[i8; 16], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
            // SAFETY: as above.
            unsafe { sums_q6k(block, scales, rows, n) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_features(kind: Kind, bytes: &[u8], first: usize, acts: &K8Rows, out: &mut [f32]) {
        features_with(kind, bytes, first, acts, out, &Avx2);
    }

    #[target_feature(enable = "avx2")]
    fn load(bytes: &[u8], at: usize) -> __m256i {
        assert!(at + 32 <= bytes.len());
        // SAFETY: 32 bytes from `at` are inside `bytes`.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().add(at) as *const __m256i) }
    }

    #[target_feature(enable = "avx2")]
    fn load_i8(values: &[i8], at: usize) -> __m256i {
        assert!(at + 32 <= values.len() && values.len() >= SUPER);
        // SAFETY: 32 values from `at` are inside `values`.
        unsafe { _mm256_loadu_si256(values.as_ptr().add(at) as *const __m256i) }
    }

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256i) -> i32 {
        let quad = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let pair = _mm_add_epi32(quad, _mm_shuffle_epi32::<0b01_00_11_10>(quad));
        let one = _mm_add_epi32(pair, _mm_shuffle_epi32::<0b10_11_00_01>(pair));
        _mm_cvtsi128_si32(one)
    }

    /// 32 unsigned weights (each below 64) times 32 activations, each
    /// 16-value half weighted by its own scale: eight 32-bit sums.
    #[target_feature(enable = "avx2")]
    fn scaled(q: __m256i, y: __m256i, scale_low: i16, scale_high: i16) -> __m256i {
        let pairs = _mm256_maddubs_epi16(q, y);
        let scales = _mm256_set_m128i(_mm_set1_epi16(scale_high), _mm_set1_epi16(scale_low));
        _mm256_madd_epi16(pairs, scales)
    }

    /// Adds, for each row, the products of the 32 weights `q` with the
    /// row's activations at `at`.
    #[target_feature(enable = "avx2")]
    fn add_rows(
        acc: &mut [__m256i; 4],
        q: __m256i,
        rows: &[&[i8]; 4],
        n: usize,
        at: usize,
        scales: (i16, i16),
    ) {
        for (sum, row) in acc.iter_mut().zip(rows).take(n) {
            let y = load_i8(row, at);
            *sum = _mm256_add_epi32(*sum, scaled(q, y, scales.0, scales.1));
        }
    }

    #[target_feature(enable = "avx2")]
    pub fn sums_q4k(block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        let mask = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_si256(); 4];
        for chunk in 0..4 {
            let q = load(block, 16 + chunk * 32);
            let low = _mm256_and_si256(q, mask);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
            let (s0, s1) = (scales[2 * chunk] as i16, scales[2 * chunk + 1] as i16);
            add_rows(&mut acc, low, &rows, n, chunk * 64, (s0, s0));
            add_rows(&mut acc, high, &rows, n, chunk * 64 + 32, (s1, s1));
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2")]
    pub fn sums_q5k(block: &[u8], scales: &[u8; 8], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        let (mask, one) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(1));
        let qh = load(block, 16);
        let mut acc = [_mm256_setzero_si256(); 4];
        for chunk in 0..4 {
            let q = load(block, 48 + chunk * 32);
            let shift = _mm_cvtsi32_si128(2 * chunk as i32);
            let bit_low = _mm256_and_si256(_mm256_srl_epi16(qh, shift), one);
            let shift = _mm_cvtsi32_si128(2 * chunk as i32 + 1);
            let bit_high = _mm256_and_si256(_mm256_srl_epi16(qh, shift), one);
            let low = _mm256_or_si256(_mm256_and_si256(q, mask), _mm256_slli_epi16::<4>(bit_low));
            let high = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask),
                _mm256_slli_epi16::<4>(bit_high),
            );
            let (s0, s1) = (scales[2 * chunk] as i16, scales[2 * chunk + 1] as i16);
            add_rows(&mut acc, low, &rows, n, chunk * 64, (s0, s0));
            add_rows(&mut acc, high, &rows, n, chunk * 64 + 32, (s1, s1));
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2")]
    pub fn sums_q6k(block: &[u8], scales: &[i8; 16], rows: [&[i8]; 4], n: usize) -> [i32; 4] {
        let (mask, three) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        let mut acc = [_mm256_setzero_si256(); 4];
        for half in 0..2 {
            let (ql0, ql1) = (load(block, half * 64), load(block, half * 64 + 32));
            let qh = load(block, 128 + half * 32);
            let lows = [
                _mm256_and_si256(ql0, mask),
                _mm256_and_si256(ql1, mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), mask),
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), mask),
            ];
            let highs = [
                _mm256_and_si256(qh, three),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), three),
                _mm256_and_si256(_mm256_srli_epi16::<4>(qh), three),
                _mm256_and_si256(_mm256_srli_epi16::<6>(qh), three),
            ];
            for quarter in 0..4 {
                let q = _mm256_or_si256(lows[quarter], _mm256_slli_epi16::<4>(highs[quarter]));
                let s = half * 8 + quarter * 2;
                let pair = (scales[s] as i16, scales[s + 1] as i16);
                add_rows(&mut acc, q, &rows, n, half * 128 + quarter * 32, pair);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_and_portable_sums_agree() {
        let block: Vec<u8> = (0..210).map(|i| ((i * 73 + 11) % 256) as u8).collect();
        let acts: Vec<Vec<i8>> = (0..4)
            .map(|r| {
                (0..SUPER)
                    .map(|i| ((i * 31 + r * 17) % 255) as i8)
                    .collect()
            })
            .collect();
        let rows: [&[i8]; 4] = std::array::from_fn(|r| acts[r].as_slice());
        let (scales, _) = scales_and_mins(&block[4..16]);
        let six: [i8; 16] = std::array::from_fn(|k| block[192 + k] as i8);
        #[cfg(target_arch = "x86_64")]
        if super::super::features::x86() != super::super::features::X86::None {
            // SAFETY: the CPU has AVX2, checked above.
            unsafe {
                assert_eq!(
                    avx2::sums_q4k(&block, &scales, rows, 4),
                    portable_q4k(&block, &scales, rows, 4)
                );
                assert_eq!(
                    avx2::sums_q5k(&block, &scales, rows, 4),
                    portable_q5k(&block, &scales, rows, 4)
                );
                assert_eq!(
                    avx2::sums_q6k(&block, &six, rows, 4),
                    portable_q6k(&block, &six, rows, 4)
                );
            }
        }
    }
}
