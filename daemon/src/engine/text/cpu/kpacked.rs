//! Q4_K, Q5_K and Q6_K weights repacked once at load, sixteen rows to a
//! group, for an AVX-512 VNNI kernel that dots all sixteen at once, as
//! [`super::packed`] does for Q8_0.
//!
//! The file's layout is read one weight row at a time ([`super::kquants`]):
//! per super-block its nibbles are split, its 6-bit scales unpacked and
//! its sums gathered across a register, about 50 cycles for 144 bytes,
//! so that a Q4_K_M step at the 1.1B shape ran at 7 GB/s where the
//! repacked Q8_0 kernel read 11. Here each 32-bit lane of a register holds
//! four values of one of sixteen rows. Per super-block a group stores:
//! - 32 lines of nibbles: line `L` holds, for row `j` at bytes `4j..4j + 4`,
//!   values `4L..4L + 4` in the low nibbles and `128 + 4L..` in the high
//!   ones;
//! - Q5_K's fifth bits in 8 lines (bit `k` of line `h`'s byte `4j + i` is
//!   that of value `4(h + 8k) + i`), or Q6_K's fifth and sixth bits in 16
//!   (bits `2k` and `2k + 1` of line `h`, value `4(h + 16k) + i`);
//! - four lines of scales: Q4_K and Q5_K's eight scales as bytes,
//!   sub-block by sub-block and row by row, then their minimums two by two
//!   (row `j`'s pair `k` at bytes `128 + 32k + 2j`), ready for 16-bit
//!   multiply-adds; Q6_K's sixteen signed scales the same way;
//! - one line of the rows' halves: `d`, then Q4_K and Q5_K's `dmin`.
//!
//! A sub-block's sums come from VNNI's byte products, are multiplied by
//! the rows' scales as 32-bit integers, and are exactly the integer sums
//! of the file layout's kernels; they become floats by the same
//! operations in the same order ([`kquants::add_q4k`], [`kquants::add_q6k`]),
//! so a product gives the file layout's results bit for bit, alone or in
//! a batch.

use half::f16;

use super::kquants::{self, K8Rows, Kind, SUPER};
use super::packed::{groups, in_huge_pages, Line, GROUP};
use super::q8_0::Sums;

/// Lines of nibbles per super-block of a group: 16 rows of 128 bytes.
const NIBBLE_LINES: usize = 32;

/// Lines of scales (and minimums) per super-block of a group.
const SCALE_LINES: usize = 4;

/// A `features × inputs` k-quant matrix in groups of [`GROUP`] rows.
pub struct KPacked {
    kind: Kind,
    /// Group by group, super-block by super-block, the block's lines.
    lines: Vec<Line>,
    features: usize,
    inputs: usize,
}

impl std::fmt::Debug for KPacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, features, inputs) = (self.kind, self.features, self.inputs);
        write!(f, "packed {kind:?} {features}x{inputs}")
    }
}

/// Bits above the nibble in each of `kind`'s values.
const fn high_bits(kind: Kind) -> usize {
    match kind {
        Kind::Q4K => 0,
        Kind::Q5K => 1,
        Kind::Q6K => 2,
    }
}

/// The line of a block where its scales start, after the nibbles and the
/// high bits (eight lines per bit).
const fn scales_line(kind: Kind) -> usize {
    NIBBLE_LINES + 8 * high_bits(kind)
}

/// Lines per super-block of a group: 37 for Q4_K (2,368 bytes for the
/// file's 2,304), 45 for Q5_K (2,880 for 2,816), 53 for Q6_K (3,392 for
/// 3,360).
const fn lines_per_block(kind: Kind) -> usize {
    scales_line(kind) + SCALE_LINES + 1
}

/// Whether this CPU's kernels read k-quants repacked: only the AVX-512
/// VNNI kernel does, so other CPUs keep the file's layout.
pub fn worth_it() -> bool {
    use super::features::{x86, X86};
    x86() == X86::Avx512Vnni
}

impl KPacked {
    /// Repacks `bytes`, the `kind` matrix as the file stores it, a group
    /// at a time, as [`super::Packed::group_by_group`] does: `next(done)`
    /// hears after each group how many of `bytes` are repacked, and stops
    /// the work (`None`) by returning `false`. The rows that fill the last
    /// group are zeros.
    pub fn group_by_group(
        kind: Kind,
        bytes: &[u8],
        features: usize,
        inputs: usize,
        mut next: impl FnMut(usize) -> bool,
    ) -> Option<Self> {
        assert!(inputs.is_multiple_of(SUPER), "rows of whole super-blocks");
        let supers = inputs / SUPER;
        let row_bytes = supers * kind.block_bytes();
        assert_eq!(bytes.len(), features * row_bytes);
        let per_block = lines_per_block(kind);
        let mut lines = in_huge_pages(features.div_ceil(GROUP) * supers * per_block);
        let mut group_lines = Vec::new();
        for (g, group) in bytes.chunks(GROUP * row_bytes).enumerate() {
            pack_group(kind, group, supers, &mut group_lines);
            lines.extend_from_slice(&group_lines);
            if !next(g * GROUP * row_bytes + group.len()) {
                return None;
            }
        }
        Some(KPacked {
            kind,
            lines,
            features,
            inputs,
        })
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// The bytes the file's layout takes for a row, the measure that
    /// splits products into tasks.
    pub fn row_bytes(&self) -> usize {
        self.inputs / SUPER * self.kind.block_bytes()
    }

    /// Super-block `b` of group `g`.
    #[inline(always)]
    fn block(&self, g: usize, b: usize) -> &[Line] {
        let per_block = lines_per_block(self.kind);
        let at = (g * self.inputs / SUPER + b) * per_block;
        &self.lines[at..][..per_block]
    }
}

/// Up to [`GROUP`] rows of `supers` super-blocks each, as the file stores
/// them, into `lines`, which it resizes: the rows that fill the group are
/// zeros.
fn pack_group(kind: Kind, group: &[u8], supers: usize, lines: &mut Vec<Line>) {
    let per_block = lines_per_block(kind);
    lines.clear();
    lines.resize(supers * per_block, Line([0; 64]));
    for (j, row) in group.chunks_exact(supers * kind.block_bytes()).enumerate() {
        for (b, block) in row.chunks_exact(kind.block_bytes()).enumerate() {
            pack_block(kind, block, j, &mut lines[b * per_block..][..per_block]);
        }
    }
}

/// Byte `at` of a run of lines.
fn byte(lines: &[Line], at: usize) -> u8 {
    lines[at / 64].0[at % 64]
}

fn byte_mut(lines: &mut [Line], at: usize) -> &mut u8 {
    &mut lines[at / 64].0[at % 64]
}

/// Row `j`'s super-block `block`, as the file stores it, into its group's
/// `lines` for that super-block.
///
/// Each line's four bytes for the row are computed straight from the
/// file's runs of 32 bytes, in loops that compile to vector code, and
/// stored as one word. Spreading the 256 values one byte at a time packed
/// Q6_K at 1.1 GB/s, so that a load's first prompt ran longer on the
/// file's slower layout while the repacking thread took a core.
fn pack_block(kind: Kind, block: &[u8], j: usize, lines: &mut [Line]) {
    let (nibbles, high) = line_words(kind, block);
    for (line, word) in lines.iter_mut().zip(nibbles.chunks_exact(4)) {
        line.0[4 * j..][..4].copy_from_slice(word);
    }
    let high_lines = &mut lines[NIBBLE_LINES..][..8 * high_bits(kind)];
    for (line, word) in high_lines.iter_mut().zip(high.chunks_exact(4)) {
        line.0[4 * j..][..4].copy_from_slice(word);
    }
    let (scales, halves) = lines[scales_line(kind)..].split_at_mut(SCALE_LINES);
    match kind {
        Kind::Q6K => {
            for k in 0..16 {
                *byte_mut(scales, 16 * k + j) = block[192 + k];
            }
            halves[0].0[2 * j..][..2].copy_from_slice(&block[208..210]);
        }
        Kind::Q4K | Kind::Q5K => {
            let (sc, mins) = kquants::scales_and_mins(&block[4..16]);
            for k in 0..8 {
                *byte_mut(scales, 16 * k + j) = sc[k];
                *byte_mut(scales, 128 + 32 * (k / 2) + 2 * j + k % 2) = mins[k];
            }
            halves[0].0[2 * j..][..2].copy_from_slice(&block[0..2]);
            halves[0].0[32 + 2 * j..][..2].copy_from_slice(&block[2..4]);
        }
    }
}

/// A super-block's row in its group's lines, word by word: the nibble
/// lines' 128 bytes (line `L`'s word is bytes `4L..4L + 4`), then the
/// high-bit lines' (none for Q4_K, 32 bytes for Q5_K, 64 for Q6_K).
fn line_words(kind: Kind, block: &[u8]) -> ([u8; 128], [u8; 64]) {
    let half =
        |bytes: &[u8], at: usize| -> [u8; 32] { bytes[at..at + 32].try_into().expect("32 bytes") };
    let mut nibbles = [0u8; 128];
    let mut high = [0u8; 64];
    // Line `L` pairs value `4L + i` (low nibble) with `128 + 4L + i`
    // (high). Q4_K and Q5_K keep values `64c..64c + 64` in bytes
    // `32c..32c + 32`, low nibbles first; Q6_K keeps values
    // `128h + 32q + i` in byte `64h + 32(q % 2) + i`, nibble `q / 2`.
    let (q, order) = match kind {
        Kind::Q4K => (
            &block[16..144],
            [(0, false), (0, true), (32, false), (32, true)],
        ),
        Kind::Q5K => (
            &block[48..176],
            [(0, false), (0, true), (32, false), (32, true)],
        ),
        Kind::Q6K => (
            &block[..128],
            [(0, false), (32, false), (0, true), (32, true)],
        ),
    };
    for (out, (at, upper)) in nibbles.chunks_exact_mut(32).zip(order) {
        let pair = pair_nibbles(&half(q, at), &half(q, 64 + at), upper);
        out.copy_from_slice(&pair);
    }
    match kind {
        Kind::Q4K => {}
        // The fifth bit of value `4h + 32k + i` is bit `k` of byte `4h + i`
        // of the file's 32 bytes of fifth bits: line `h`'s word as it is.
        Kind::Q5K => high[..32].copy_from_slice(&block[16..48]),
        Kind::Q6K => {
            let (first, second) = (half(block, 128), half(block, 160));
            high[..32].copy_from_slice(&pair_crumbs(&first, &second, 0));
            high[32..].copy_from_slice(&pair_crumbs(&first, &second, 2));
        }
    }
    (nibbles, high)
}

/// Byte by byte, the low (or, when `upper`, the high) nibbles of `low`
/// under those of `high`.
fn pair_nibbles(low: &[u8; 32], high: &[u8; 32], upper: bool) -> [u8; 32] {
    let mut out = [0u8; 32];
    for ((out, low), high) in out.iter_mut().zip(low).zip(high) {
        *out = if upper {
            (low >> 4) | (high & 0xF0)
        } else {
            (low & 0xF) | (high << 4)
        };
    }
    out
}

/// Q6_K's high bits for eight lines: in the file, byte `i` of a half's 32
/// holds the two high bits of its four quarters' value `i`, two bits per
/// quarter. Line `h < 8` takes quarters 0 and 2 of value `4h + i` from
/// both halves (`shift` 0), line `8 + h` quarters 1 and 3 (`shift` 2),
/// as bits `2k..2k + 2` for `k` = quarter pair then half.
fn pair_crumbs(first: &[u8; 32], second: &[u8; 32], shift: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    for ((out, a), b) in out.iter_mut().zip(first).zip(second) {
        let crumb = |byte: u8, at: u32| (byte >> at) & 3;
        *out = crumb(*a, shift)
            | crumb(*a, shift + 4) << 2
            | crumb(*b, shift) << 4
            | crumb(*b, shift + 4) << 6;
    }
    out
}

/// Weight rows `first..first + out.features()` of `packed` dotted with
/// every activation row; `first` starts a group, as every product task
/// does.
pub fn dot_into<S: Sums>(packed: &KPacked, first: usize, acts: &K8Rows, out: &mut S) {
    assert!(first.is_multiple_of(GROUP), "a task starts a group");
    assert!(first + out.features() <= packed.features && acts.inputs() == packed.inputs);
    #[cfg(target_arch = "x86_64")]
    if worth_it() {
        // SAFETY: the CPU has AVX-512 with VNNI.
        return unsafe { x86_64::avx512(packed, first, acts, out) };
    }
    portable(packed, first, acts, out);
}

thread_local! {
    /// The group that [`dot_file_rows`] packs, reused so that it stays in
    /// cache and never costs fresh pages.
    static PACKING: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Weight rows `first..first + out.features()` of a `kind` matrix as the
/// file stores it (`bytes`), dotted with every activation row by the
/// repacked kernel: each group of sixteen rows is packed just before the
/// kernel reads it, into a buffer of the thread's own.
///
/// This is how a prompt reads a matrix that the repacking thread has not
/// reached yet. Packing costs about a fifth of a nanosecond per byte of
/// weights, once per product; the file layout's kernel, which decodes
/// each super-block again for every four activation rows, cost a 35-token
/// prompt about 3 ns per byte of the model against 0.6 for the repacked
/// one. The sums are the file layout's bit for bit, as the repacked
/// copy's are.
pub fn dot_file_rows<S: Sums>(kind: Kind, bytes: &[u8], first: usize, acts: &K8Rows, out: &mut S) {
    assert!(first.is_multiple_of(GROUP), "a task starts a group");
    let supers = acts.inputs() / SUPER;
    let row_bytes = supers * kind.block_bytes();
    let count = out.features();
    assert!((first + count) * row_bytes <= bytes.len());
    PACKING.with_borrow_mut(|lines| {
        for start in (0..count).step_by(GROUP) {
            let rows = GROUP.min(count - start);
            let group = &bytes[(first + start) * row_bytes..][..rows * row_bytes];
            pack_group(kind, group, supers, lines);
            let packed = KPacked {
                kind,
                lines: std::mem::take(lines),
                features: rows,
                inputs: acts.inputs(),
            };
            dot_into(&packed, 0, acts, &mut Shifted { out, by: start });
            *lines = packed.lines;
        }
    });
}

/// A sink seen from `by` features on: one group of a task's rows.
struct Shifted<'a, S> {
    out: &'a mut S,
    by: usize,
}

impl<S: Sums> Sums for Shifted<'_, S> {
    fn features(&self) -> usize {
        GROUP.min(self.out.features() - self.by)
    }

    #[inline(always)]
    fn put(&mut self, feature: usize, row: usize, sum: f32) {
        self.out.put(self.by + feature, row, sum);
    }
}

/// The same sums in plain Rust, row by row, for CPUs without the kernel
/// (which never repack) and as the kernel's check.
fn portable<S: Sums>(packed: &KPacked, first: usize, acts: &K8Rows, out: &mut S) {
    for (g, f, rows) in groups(first, out.features()) {
        for j in 0..rows {
            for r in 0..acts.rows() {
                let sum = (0..packed.inputs / SUPER).fold(0f32, |sum, b| {
                    let block = Block {
                        kind: packed.kind,
                        lines: packed.block(g, b),
                        j,
                    };
                    block.add_to(sum, acts, r, b)
                });
                out.put(f + j, r, sum);
            }
        }
    }
}

/// Row `j` of one super-block of a group, for [`portable`].
struct Block<'a> {
    kind: Kind,
    lines: &'a [Line],
    j: usize,
}

impl Block<'_> {
    /// Value `l`, before scale and offset.
    fn quant(&self, l: usize) -> i32 {
        let (kind, lines, j) = (self.kind, self.lines, self.j);
        let (step, i) = (l / 4, l % 4);
        let nibble = (byte(lines, (step % 32) * 64 + 4 * j + i) >> (4 * (l / 128))) & 0xF;
        let high = 8 * high_bits(kind);
        if high == 0 {
            return nibble as i32;
        }
        let at = (32 + step % high) * 64 + 4 * j + i;
        let bits = byte(lines, at) >> (high_bits(kind) * (step / high));
        let mask = (1 << high_bits(kind)) - 1;
        (nibble | (bits & mask) << 4) as i32
    }

    /// Byte `at` of the scale lines.
    fn scale_byte(&self, at: usize) -> u8 {
        byte(&self.lines[scales_line(self.kind)..], at)
    }

    /// Half `n` (`d`, then `dmin`) of the row.
    fn half(&self, n: usize) -> f32 {
        let at = 64 * SCALE_LINES + 32 * n + 2 * self.j;
        f16::from_le_bytes([self.scale_byte(at), self.scale_byte(at + 1)]).to_f32_const()
    }

    /// `sum` plus the block's products with activation row `r`'s
    /// super-block `b`.
    fn add_to(&self, sum: f32, acts: &K8Rows, r: usize, b: usize) -> f32 {
        let (y, j) = (acts.block(r, b), self.j);
        let dot = |from: usize, len: usize| -> i32 {
            (from..from + len)
                .map(|l| self.quant(l) * y[l] as i32)
                .sum()
        };
        if self.kind == Kind::Q6K {
            let groups = acts.sums16(r, b);
            let total = (0..16)
                .map(|k| {
                    self.scale_byte(16 * k + j) as i8 as i32 * (dot(16 * k, 16) - 32 * groups[k])
                })
                .sum();
            return kquants::add_q6k(sum, acts.scale(r, b), self.half(0), total);
        }
        let scaled = (0..8)
            .map(|k| self.scale_byte(16 * k + j) as i32 * dot(32 * k, 32))
            .sum();
        let pairs = acts.pair_sums(r, b);
        let min_sum = (0..8)
            .map(|k| {
                let min = self.scale_byte(128 + 32 * (k / 2) + 2 * j + k % 2) as i32;
                min * (pairs[k / 2] >> (16 * (k % 2))) as i16 as i32
            })
            .sum();
        let halves = ((self.half(0), scaled), (self.half(1), min_sum));
        kquants::add_q4k(sum, acts.scale(r, b), halves.0, halves.1)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use super::super::packed::{x86_64::put, AHEAD};
    use super::{groups, high_bits, lines_per_block, scales_line, KPacked, Kind, Line, Sums};
    use super::{K8Rows, GROUP, SUPER};
    use crate::engine::text::cpu::prefetch_to_l2_at;
    use std::arch::x86_64::*;

    /// Activation rows a tile takes at most. A round holds sixteen value
    /// registers, and each row an integer and a float sum; at eight rows
    /// that is 32 registers with the scales, so the float sums, touched
    /// once per super-block, already go to the stack and back.
    const TILE: usize = 8;

    /// The kernel: a group's sixteen rows in one register, up to [`TILE`]
    /// activation rows at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn avx512<S: Sums>(p: &KPacked, first: usize, acts: &K8Rows, out: &mut S) {
        match p.kind {
            Kind::Q4K => body::<S, 0>(p, first, acts, out),
            Kind::Q5K => body::<S, 1>(p, first, acts, out),
            Kind::Q6K => body::<S, 2>(p, first, acts, out),
        }
    }

    /// [`avx512`] for a kind with `HIGH` bits above the nibble.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn body<S: Sums, const HIGH: usize>(p: &KPacked, first: usize, acts: &K8Rows, out: &mut S) {
        assert_eq!(high_bits(p.kind), HIGH);
        let rows = acts.rows();
        for (g, f, wanted) in groups(first, out.features()) {
            for first_row in (0..rows).step_by(TILE) {
                let count = TILE.min(rows - first_row);
                let mut sums = [[0f32; GROUP]; TILE];
                tile_rows::<HIGH>(p, g, acts, first_row, count, &mut sums);
                put(out, &sums, f, wanted, first_row, count);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_rows<const HIGH: usize>(
        p: &KPacked,
        g: usize,
        acts: &K8Rows,
        first_row: usize,
        count: usize,
        sums: &mut [[f32; GROUP]; TILE],
    ) {
        match count {
            1 => tile::<1, HIGH>(p, g, acts, first_row, sums),
            2 => tile::<2, HIGH>(p, g, acts, first_row, sums),
            3 => tile::<3, HIGH>(p, g, acts, first_row, sums),
            4 => tile::<4, HIGH>(p, g, acts, first_row, sums),
            5 => tile::<5, HIGH>(p, g, acts, first_row, sums),
            6 => tile::<6, HIGH>(p, g, acts, first_row, sums),
            7 => tile::<7, HIGH>(p, g, acts, first_row, sums),
            _ => tile::<8, HIGH>(p, g, acts, first_row, sums),
        }
    }

    /// `N` activation rows from `first_row` with group `g`, super-block by
    /// super-block: the integer sums, then the float steps of
    /// [`super::kquants::add_q4k`] or [`super::kquants::add_q6k`], lane by
    /// lane.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile<const N: usize, const HIGH: usize>(
        p: &KPacked,
        g: usize,
        acts: &K8Rows,
        first_row: usize,
        sums: &mut [[f32; GROUP]; TILE],
    ) {
        assert!(N <= TILE && first_row + N <= acts.rows());
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..p.inputs / SUPER {
            let lines = p.block(g, b);
            for line in 0..lines_per_block(p.kind) {
                prefetch_to_l2_at(lines, AHEAD + 64 * line);
            }
            let scales = &lines[scales_line(p.kind)..];
            // SAFETY: a block's last line holds the sixteen halves `d`,
            // then Q4_K and Q5_K's sixteen `dmin`.
            let (d, dmin) = unsafe {
                let halves = scales[4].0.as_ptr() as *const __m256i;
                (
                    _mm512_cvtph_ps(_mm256_load_si256(halves)),
                    _mm512_cvtph_ps(_mm256_load_si256(halves.add(1))),
                )
            };
            let y: [&[i8; SUPER]; N] = std::array::from_fn(|i| acts.block(first_row + i, b));
            // SAFETY: this kernel is compiled for AVX-512 with VNNI.
            let (ints, mins) = unsafe {
                if HIGH == 2 {
                    let ints = q6k_sums::<N>(lines, scales, &y, acts, first_row, b);
                    (ints, [_mm512_setzero_si512(); 4])
                } else {
                    (q4k_sums::<N, HIGH>(lines, scales, &y), min_pairs(scales))
                }
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                let y_scale = _mm512_set1_ps(acts.scale(first_row + i, b));
                *acc =
                    _mm512_fmadd_ps(_mm512_mul_ps(d, y_scale), _mm512_cvtepi32_ps(ints[i]), *acc);
                if HIGH < 2 {
                    // SAFETY: as above.
                    let min_sum = unsafe { min_sum(&mins, acts.pair_sums(first_row + i, b)) };
                    *acc = _mm512_fnmadd_ps(
                        _mm512_mul_ps(dmin, y_scale),
                        _mm512_cvtepi32_ps(min_sum),
                        *acc,
                    );
                }
            }
        }
        for (sums, acc) in sums.iter_mut().zip(acc) {
            // SAFETY: `sums` holds sixteen f32.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), acc) };
        }
    }

    /// Bytes `at..at + 4` of an activation super-block, broadcast to
    /// every lane.
    #[inline(always)]
    fn four(y: &[i8; SUPER], at: usize) -> i32 {
        let b = &y[at..at + 4];
        i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    /// Line `at` of a block, in a register.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn line(lines: &[Line], at: usize) -> __m512i {
        let line: &Line = &lines[at];
        // SAFETY: a line is 64 bytes aligned to 64; the callers are
        // compiled for AVX-512.
        unsafe { _mm512_load_si512(line.0.as_ptr() as *const __m512i) }
    }

    /// Sub-block `k`'s sixteen scales (bytes, unsigned or `SIGNED`) as
    /// 32-bit lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn scale_lanes<const SIGNED: bool>(scales: &[Line], k: usize) -> __m512i {
        assert!(k < 16 && scales.len() >= 4);
        // SAFETY: sixteen bytes inside the four scale lines; the callers
        // are compiled for AVX-512.
        unsafe {
            let bytes = _mm_load_si128((scales.as_ptr() as *const __m128i).add(k));
            if SIGNED {
                _mm512_cvtepi8_epi32(bytes)
            } else {
                _mm512_cvtepu8_epi32(bytes)
            }
        }
    }

    /// A round's sixteen value registers: lines `8r..8r + 8`'s low
    /// nibbles (values `32r..32r + 32`) then high ones (`128 + 32r..`),
    /// with their high bits from the lines after the nibbles.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn round_values<const HIGH: usize>(lines: &[Line], r: usize) -> [__m512i; 16] {
        // A loop, not `array::from_fn`: a closure does not inherit the
        // caller's target features, and its intrinsics became calls.
        // SAFETY: the callers are compiled for AVX-512.
        unsafe {
            let mut values = [_mm512_setzero_si512(); 16];
            let low = _mm512_set1_epi8(0x0F);
            for (v, value) in values.iter_mut().enumerate() {
                let (s, upper) = (v % 8, v / 8);
                let nibbles = line(lines, 8 * r + s);
                let nibble = if upper == 0 {
                    _mm512_and_si512(nibbles, low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(nibbles), low)
                };
                *value = match HIGH {
                    0 => nibble,
                    1 => {
                        // Value step 8r + s (+ 32 for the upper half) has
                        // its bit in line s, at bit r (or 4 + r).
                        let bit = _mm512_set1_epi8(1 << (4 * upper + r));
                        let set = _mm512_test_epi8_mask(line(lines, 32 + s), bit);
                        _mm512_mask_add_epi8(nibble, set, nibble, _mm512_set1_epi8(16))
                    }
                    _ => {
                        // Step 8r + s (+ 32) has its two bits in line
                        // 8(r % 2) + s at bits 2(r / 2) (+ 4).
                        let bits = line(lines, 32 + 8 * (r % 2) + s);
                        let shift = 2 * (r / 2) + 4 * upper;
                        let top = _mm512_and_si512(
                            match shift {
                                0 => _mm512_slli_epi16::<4>(bits),
                                2 => _mm512_slli_epi16::<2>(bits),
                                4 => bits,
                                _ => _mm512_srli_epi16::<2>(bits),
                            },
                            _mm512_set1_epi8(0x30),
                        );
                        _mm512_or_si512(nibble, top)
                    }
                };
            }
            values
        }
    }

    /// Q4_K's or Q5_K's sums of scale × weight × activation, per row of
    /// the group, for each activation row.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn q4k_sums<const N: usize, const HIGH: usize>(
        lines: &[Line],
        scales: &[Line],
        y: &[&[i8; SUPER]; N],
    ) -> [__m512i; N] {
        // SAFETY: the callers are compiled for AVX-512 with VNNI.
        unsafe {
            let mut ints = [_mm512_setzero_si512(); N];
            for r in 0..4 {
                let w = round_values::<HIGH>(lines, r);
                let (low, high) = (
                    scale_lanes::<false>(scales, r),
                    scale_lanes::<false>(scales, 4 + r),
                );
                for (ints, y) in ints.iter_mut().zip(y) {
                    let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for s in 0..8 {
                        let at = 4 * (8 * r + s);
                        a = _mm512_dpbusd_epi32(a, w[s], _mm512_set1_epi32(four(y, at)));
                        b = _mm512_dpbusd_epi32(b, w[8 + s], _mm512_set1_epi32(four(y, 128 + at)));
                    }
                    let scaled =
                        _mm512_add_epi32(_mm512_mullo_epi32(a, low), _mm512_mullo_epi32(b, high));
                    *ints = _mm512_add_epi32(*ints, scaled);
                }
            }
            ints
        }
    }

    /// Q4_K's or Q5_K's minimums, pair `k` of each row in a 32-bit lane
    /// of register `k`, as 16-bit integers.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn min_pairs(scales: &[Line]) -> [__m512i; 4] {
        assert!(scales.len() >= 4);
        // SAFETY: the minimums' four 32-byte runs are the second half of
        // the four scale lines, aligned to 32; the CPU has the features.
        unsafe {
            let runs = (scales.as_ptr() as *const __m256i).add(4);
            let mut mins = [_mm512_setzero_si512(); 4];
            for (k, mins) in mins.iter_mut().enumerate() {
                *mins = _mm512_cvtepu8_epi16(_mm256_load_si256(runs.add(k)));
            }
            mins
        }
    }

    /// Q4_K's or Q5_K's sums of minimum × activation per row of the
    /// group, for one activation row's pair sums.
    ///
    /// # Safety
    /// As [`min_pairs`].
    #[inline(always)]
    unsafe fn min_sum(mins: &[__m512i; 4], pairs: &[i32; 4]) -> __m512i {
        // SAFETY: as the caller promises.
        unsafe {
            let mut sum = _mm512_setzero_si512();
            for (mins, pair) in mins.iter().zip(pairs) {
                sum = _mm512_dpwssd_epi32(sum, *mins, _mm512_set1_epi32(*pair));
            }
            sum
        }
    }

    /// Q6_K's sums of scale × (weight - 32) × activation, per row of the
    /// group, for each activation row.
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW) with VNNI: only the kernel, compiled
    /// for them, calls this.
    #[inline(always)]
    unsafe fn q6k_sums<const N: usize>(
        lines: &[Line],
        scales: &[Line],
        y: &[&[i8; SUPER]; N],
        acts: &K8Rows,
        first_row: usize,
        b: usize,
    ) -> [__m512i; N] {
        // SAFETY: the callers are compiled for AVX-512 with VNNI.
        unsafe {
            let mut ints = [_mm512_setzero_si512(); N];
            for r in 0..4 {
                let w = round_values::<2>(lines, r);
                // The round's four sub-blocks of 16 values: two in each half.
                let ks = [2 * r, 2 * r + 1, 8 + 2 * r, 9 + 2 * r];
                let mut sc = [_mm512_setzero_si512(); 4];
                for (sc, k) in sc.iter_mut().zip(ks) {
                    *sc = scale_lanes::<true>(scales, k);
                }
                for (i, (ints, y)) in ints.iter_mut().zip(y).enumerate() {
                    let groups = acts.sums16(first_row + i, b);
                    for (q, (k, sc)) in ks.iter().zip(sc).enumerate() {
                        let mut dot = _mm512_set1_epi32(-32 * groups[*k]);
                        for s in 0..4 {
                            let at = 4 * (4 * q % 8 + s) + 32 * r + 128 * (q / 2);
                            let w = w[8 * (q / 2) + 4 * (q % 2) + s];
                            dot = _mm512_dpbusd_epi32(dot, w, _mm512_set1_epi32(four(y, at)));
                        }
                        *ints = _mm512_add_epi32(*ints, _mm512_mullo_epi32(dot, sc));
                    }
                }
            }
            ints
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8_0::FeatureMajor;
    use super::*;

    /// Nineteen weight rows (a whole group and three rows of another) and
    /// eleven activation rows (a tile of eight and one of three) give the
    /// file layout's sums bit for bit in each kind, from the portable path
    /// and the kernel, and from a task that starts at the second group.
    /// The bytes run through many patterns, and the first super-block of
    /// row 2 is at every extreme (largest values, scales and minimums, or
    /// Q6_K's most negative scales) against an activation row of ±127.
    #[test]
    fn packed_k_products_are_the_files_bit_for_bit() {
        for kind in [Kind::Q4K, Kind::Q5K, Kind::Q6K] {
            for inputs in [256, 768] {
                check_kind(kind, inputs);
            }
        }
    }

    /// Every line word of a super-block is the values that the line
    /// layout (module docs) puts there, read one by one from the file's
    /// layout, for blocks of many byte patterns.
    #[test]
    fn line_words_hold_each_value_where_the_layout_says() {
        for kind in [Kind::Q4K, Kind::Q5K, Kind::Q6K] {
            for seed in 0..64usize {
                let block: Vec<u8> = (0..kind.block_bytes())
                    .map(|i| ((i * 131 + seed * 77 + i * i * seed) % 256) as u8)
                    .collect();
                let value = |l: usize| kquants::quant_at(kind, &block, l);
                let (nibbles, high) = line_words(kind, &block);
                for (at, byte) in nibbles.iter().enumerate() {
                    let want = (value(at) & 0xF) | (value(128 + at) & 0xF) << 4;
                    assert_eq!(*byte, want, "{kind:?} nibble byte {at}, seed {seed}");
                }
                let bits = high_bits(kind);
                let lines = 8 * bits;
                for (at, byte) in high.iter().enumerate() {
                    let (h, i) = (at / 4, at % 4);
                    let want = (0..SUPER / 4 / lines.max(1))
                        .filter(|_| h < lines)
                        .map(|k| (value(4 * (h + lines * k) + i) >> 4) << (bits * k))
                        .fold(0u8, |a, b| a | b);
                    assert_eq!(*byte, want, "{kind:?} high byte {at}, seed {seed}");
                }
            }
        }
    }

    const FEATURES: usize = 19;
    const ROWS: usize = 11;

    fn check_kind(kind: Kind, inputs: usize) {
        let blocks = FEATURES * inputs / SUPER;
        let mut bytes: Vec<u8> = (0..blocks * kind.block_bytes())
            .map(|i| ((i * 131 + i / 7) % 256) as u8)
            .collect();
        // Small positive halves, so that sums stay finite and every bit
        // of them shows.
        let halves: &[usize] = if kind == Kind::Q6K { &[208] } else { &[0, 2] };
        for (b, block) in bytes.chunks_exact_mut(kind.block_bytes()).enumerate() {
            for (n, at) in halves.iter().enumerate() {
                let half = f16::from_f32(0.01 * ((b + n) % 23 + 1) as f32);
                block[*at..*at + 2].copy_from_slice(&half.to_le_bytes());
            }
        }
        let extreme = &mut bytes[2 * inputs / SUPER * kind.block_bytes()..][..kind.block_bytes()];
        for (at, byte) in extreme.iter_mut().enumerate() {
            let half = halves.iter().any(|h| (*h..*h + 2).contains(&at));
            let q6_scale = kind == Kind::Q6K && (192..208).contains(&at);
            *byte = match (half, q6_scale) {
                (true, _) => *byte,
                (_, true) => 0x80,
                _ => 0xFF,
            };
        }
        let mut x: Vec<f32> = (0..ROWS * inputs)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for (i, x) in x[..inputs].iter_mut().enumerate() {
            *x = if i % 3 == 0 { -1.0 } else { 1.0 };
        }
        let acts = K8Rows::quantize(&x, inputs);
        let mut want = vec![0f32; FEATURES * ROWS];
        kquants::dot_features(kind, &bytes, 0, &acts, &mut want);
        let packed = KPacked::group_by_group(kind, &bytes, FEATURES, inputs, |_| true).unwrap();
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let check = |name: &str, kernel: &dyn Fn(&KPacked, usize, &mut FeatureMajor)| {
            for first in [0, GROUP] {
                let mut got = vec![0f32; (FEATURES - first) * ROWS];
                let mut out = FeatureMajor {
                    out: &mut got,
                    rows: ROWS,
                };
                kernel(&packed, first, &mut out);
                let from = &want[first * ROWS..];
                assert_eq!(
                    bits(&got),
                    bits(from),
                    "{kind:?} {name}, {inputs} inputs, from row {first}"
                );
            }
        };
        check("portable", &|p, first, out| portable(p, first, &acts, out));
        check("best", &|p, first, out| dot_into(p, first, &acts, out));
        check("packed as it goes", &|_, first, out| {
            dot_file_rows(kind, &bytes, first, &acts, out)
        });
    }

    /// The packing alone, without the copy's fresh memory: the first
    /// group's rows (`bytes`, rows of `supers` super-blocks) packed over
    /// and over into lines that stay in cache.
    fn pack_only_rate(kind: Kind, bytes: &[u8], supers: usize) {
        let mut lines = Vec::new();
        let rounds = 2000;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            pack_group(kind, bytes, supers, &mut lines);
            std::hint::black_box(&mut lines);
        }
        let rate = (rounds * bytes.len()) as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("{kind:?}: packing alone {rate:.2} GB/s");
    }

    /// How fast a load repacks, the copy's memory included, and how fast
    /// the kernel then reads the copy, in cache and from memory, against
    /// a plain read of the same lines: `cargo test --release -p modeld
    /// --lib k_repack_rate -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing probe, not a check"]
    fn k_repack_rate() {
        let (features, inputs) = (8192, 2048);
        for kind in [Kind::Q4K, Kind::Q6K] {
            let bytes: Vec<u8> = (0..features * inputs / SUPER * kind.block_bytes())
                .map(|i| (i * 31 % 251) as u8)
                .collect();
            let supers = inputs / SUPER;
            pack_only_rate(kind, &bytes[..GROUP * supers * kind.block_bytes()], supers);
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let packed = KPacked::group_by_group(kind, &bytes, features, inputs, |_| true);
                let s = t.elapsed().as_secs_f64();
                println!(
                    "{kind:?}: repacked {} MB in {:.1} ms: {:.2} GB/s",
                    bytes.len() / 1_000_000,
                    s * 1e3,
                    bytes.len() as f64 / s / 1e9
                );
                assert_eq!(packed.map(|p| p.features()), Some(features));
            }
            // Eight times the rows, more than the last-level cache holds;
            // its first 64 rows stay in cache.
            let big: Vec<u8> = bytes
                .iter()
                .cycle()
                .take(8 * bytes.len())
                .copied()
                .collect();
            let packed =
                KPacked::group_by_group(kind, &big, 8 * features, inputs, |_| true).unwrap();
            read_rate(&packed, 64, "64 rows in cache");
            read_rate(&packed, packed.features(), "from memory");
        }
    }

    /// How fast the kernel reads the repacked `features` first rows of
    /// `packed` on one thread, for a decode step's few activation rows,
    /// after a plain read of the same lines: on a shared machine only the
    /// ratio of the two in one run means much.
    fn read_rate(packed: &KPacked, features: usize, what: &str) {
        let kind = packed.kind;
        let bytes = features * packed.row_bytes();
        let rounds = (200_000_000 / bytes).max(5);
        let lines =
            &packed.lines[..features / GROUP * packed.inputs / SUPER * lines_per_block(kind)];
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let mut lanes = [0u64; 8];
            for line in lines {
                for (lane, word) in lanes.iter_mut().zip(line.0.chunks_exact(8)) {
                    *lane = lane.wrapping_add(u64::from_le_bytes(word.try_into().unwrap()));
                }
            }
            std::hint::black_box(lanes);
        }
        let plain = (rounds * lines.len() * 64) as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("{kind:?}: {what}, a plain read of the lines: {plain:.1} GB/s");
        for rows in [1, 2, 8] {
            let x: Vec<f32> = (0..rows * packed.inputs)
                .map(|i| (i % 17) as f32 - 8.0)
                .collect();
            let acts = K8Rows::quantize(&x, packed.inputs);
            let mut got = vec![0f32; features * rows];
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                let mut out = FeatureMajor {
                    out: &mut got,
                    rows,
                };
                dot_into(packed, 0, &acts, &mut out);
            }
            let rate = (rounds * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{kind:?}: {what}, {rows} rows: {rate:.1} GB/s of weights");
        }
    }
}
