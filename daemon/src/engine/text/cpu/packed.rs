//! Q8_0 and Q5_0 weights repacked once at load into the layout
//! [`super::q8_0`]'s kernels build in registers for every block of every
//! product.
//!
//! Those kernels take sixteen weight rows at a time and transpose each
//! 32-value block so that each 32-bit lane holds one row; at eight
//! activation rows nearly half of their instructions were that transpose,
//! gathering the sixteen scales and biasing the bytes for VNNI. Here each
//! group of sixteen rows is stored that way: per block, eight 64-byte
//! lines, line `s` holding bytes `4s..4s + 4` of each row's values (row
//! `j` at byte `4j`) plus 128, and the sixteen scales side by side. A
//! product then reads the weights front to back, one aligned load per line.
//!
//! Q5_0 (most of a Q4_K_M file whose rows are not whole 256-value
//! super-blocks) keeps its five bits: per block, four lines of the rows'
//! nibble bytes the same way, then one line of eight 64-bit masks, mask
//! `s` holding the high bits of values `4s..4s + 4` of each row. With
//! AVX-512 a masked byte add puts them in place, where the file's layout
//! took a dozen instructions a row to spread them; only that kernel
//! reads packed Q5_0, so other CPUs keep the file's layout for it.
//!
//! The same integer block sums are scaled and added in the same order as
//! in [`super::q8_0`], so the results are those of the file's layout, bit
//! for bit, alone or in a batch.

use half::f16;

use super::q8_0::{Format, Q8Rows, Sums, BLOCK};

/// Weight rows per group: one per 32-bit lane of a 512-bit register.
pub const GROUP: usize = 16;

/// Lines of one Q8_0 block of a group: 16 rows of 32 bytes.
const LINES: usize = GROUP * BLOCK / 64;

/// Lines of one Q5_0 block of a group: 16 rows of 16 nibble bytes, then
/// the masks of high bits.
const Q5_LINES: usize = 5;

/// How far ahead of a product's reads its lines are asked for.
pub(super) const AHEAD: usize = 4096;

/// One cache line, aligned as one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

/// A `features × inputs` Q8_0 or Q5_0 matrix in groups of [`GROUP`] rows.
pub struct Packed {
    format: Format,
    /// Group by group, block by block, the block's lines.
    lines: Vec<Line>,
    /// Group by group, block by block, the group's sixteen scales.
    scales: Vec<f16>,
    features: usize,
    inputs: usize,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (format, features, inputs) = (self.format, self.features, self.inputs);
        write!(f, "packed {format:?} {features}x{inputs}")
    }
}

impl Packed {
    /// Repacks `bytes`, the `format` matrix as the file stores it, row by
    /// row; the rows that fill the last group have zero scales.
    pub fn new(format: Format, bytes: &[u8], features: usize, inputs: usize) -> Self {
        Self::group_by_group(format, bytes, features, inputs, |_| true).expect("never stopped")
    }

    /// [`Packed::new`], a group at a time: after each, `next(done)` hears
    /// how many of `bytes` are repacked, and stops the work (`None`) by
    /// returning `false`. The copy grows as the groups are done, so that
    /// the file's pages can be let go behind it and memory never holds
    /// much of the matrix twice.
    pub fn group_by_group(
        format: Format,
        bytes: &[u8],
        features: usize,
        inputs: usize,
        mut next: impl FnMut(usize) -> bool,
    ) -> Option<Self> {
        assert!(inputs.is_multiple_of(BLOCK), "rows of whole blocks");
        let blocks = inputs / BLOCK;
        let row_bytes = blocks * format.block_bytes();
        assert_eq!(bytes.len(), features * row_bytes);
        let per_block = lines_per_block(format);
        let groups = features.div_ceil(GROUP);
        let mut lines = in_huge_pages(groups * blocks * per_block);
        let mut scales = in_huge_pages(groups * blocks * GROUP);
        let (mut group_lines, mut group_scales) = (Vec::new(), Vec::new());
        for g in 0..groups {
            let rows = GROUP.min(features - g * GROUP);
            let group = &bytes[g * GROUP * row_bytes..][..rows * row_bytes];
            group_lines.clear();
            group_lines.resize(blocks * per_block, Line([0; 64]));
            group_scales.clear();
            group_scales.resize(blocks * GROUP, f16::ZERO);
            pack_group(format, group, rows, &mut group_lines, &mut group_scales);
            lines.extend_from_slice(&group_lines);
            scales.extend_from_slice(&group_scales);
            if !next(g * GROUP * row_bytes + group.len()) {
                return None;
            }
        }
        Some(Packed {
            format,
            lines,
            scales,
            features,
            inputs,
        })
    }
    pub fn features(&self) -> usize {
        self.features
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// The bytes the file's layout takes for the same matrix, the measure
    /// that splits products into tasks.
    pub fn row_bytes(&self) -> usize {
        self.inputs / BLOCK * self.format.block_bytes()
    }

    /// Block `b` of group `g`: its lines and scales.
    #[inline(always)]
    fn block(&self, g: usize, b: usize) -> (&[Line], &[f16]) {
        let at = g * self.inputs / BLOCK + b;
        let per_block = lines_per_block(self.format);
        (
            &self.lines[at * per_block..][..per_block],
            &self.scales[at * GROUP..][..GROUP],
        )
    }

    /// Value `i` of row `j` of a block's `lines`, as a signed integer.
    fn value(&self, lines: &[Line], j: usize, i: usize) -> i32 {
        match self.format {
            Format::Q8_0 => (lines[i / 4].0[4 * j + i % 4] ^ 0x80) as i8 as i32,
            Format::Q5_0 => {
                let byte = lines[i % 16 / 4].0[4 * j + i % 4];
                let low = if i < 16 { byte & 0xF } else { byte >> 4 };
                let masks = &lines[4].0[8 * (i / 4)..][..8];
                let mask = u64::from_le_bytes(masks.try_into().expect("eight bytes"));
                let high = (mask >> (4 * j + i % 4)) & 1;
                (low as i32 | (high as i32) << 4) - 16
            }
            Format::Q4_0 => unreachable!("Q4_0 is not repacked"),
        }
    }
}

/// Lines per block of a group in `format`'s layout.
fn lines_per_block(format: Format) -> usize {
    match format {
        Format::Q8_0 => LINES,
        Format::Q5_0 => Q5_LINES,
        Format::Q4_0 => panic!("Q4_0 is not repacked"),
    }
}

/// Whether this CPU's kernels read `format` repacked, which is then worth
/// the copy: Q8_0 wherever the vector kernels run, Q5_0 with AVX-512.
pub fn worth_it(format: Format) -> bool {
    use super::features::{x86, X86};
    match format {
        Format::Q8_0 => x86() != X86::None,
        Format::Q5_0 => x86() == X86::Avx512Vnni,
        Format::Q4_0 => false,
    }
}

/// Room for `len` values, in memory the kernel is asked to back with 2
/// MiB pages where it can (Linux's transparent huge pages, in `madvise`
/// mode on most systems): a 4 KiB page fault per 4 KiB made repacking
/// run at 2 GB/s, and a product's reads walk fewer page tables.
pub(super) fn in_huge_pages<T>(len: usize) -> Vec<T> {
    const HUGE: usize = 2 << 20;
    let values = Vec::with_capacity(len);
    let start = values.as_ptr() as usize;
    let end = start + len * std::mem::size_of::<T>();
    let first = start.next_multiple_of(HUGE);
    if end > first + HUGE {
        let whole = (end - first) / HUGE * HUGE;
        // SAFETY: advice on pages of this allocation, not yet written; it
        // changes how they are backed, never what they hold.
        let advised =
            unsafe { nix::libc::madvise(first as *mut _, whole, nix::libc::MADV_HUGEPAGE) };
        if advised != 0 {
            tracing::debug!(
                "no huge pages for repacked weights: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    values
}

/// The first `rows` rows of a group, each row's blocks into the group's
/// lines and scales.
fn pack_group(format: Format, group: &[u8], rows: usize, lines: &mut [Line], scales: &mut [f16]) {
    let per_block = lines_per_block(format);
    let row_bytes = group.len() / rows;
    for (j, row) in group.chunks_exact(row_bytes).enumerate() {
        for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
            scales[b * GROUP + j] = f16::from_le_bytes([block[0], block[1]]);
            let lines = &mut lines[b * per_block..][..per_block];
            match format {
                Format::Q8_0 => pack_q8_0(&block[2..], j, lines),
                Format::Q5_0 => pack_q5_0(&block[2..], j, lines),
                Format::Q4_0 => unreachable!("checked by lines_per_block"),
            }
        }
    }
}

/// Row `j`'s 32 values of a Q8_0 block into the block's lines, biased.
fn pack_q8_0(values: &[u8], j: usize, lines: &mut [Line]) {
    for (four, line) in values.chunks_exact(4).zip(lines) {
        for (slot, value) in line.0[4 * j..][..4].iter_mut().zip(four) {
            *slot = value ^ 0x80;
        }
    }
}

/// Row `j`'s Q5_0 block (high bits, then nibble bytes) into the block's
/// lines: the nibble bytes four by four, and each four high bits into
/// their mask.
fn pack_q5_0(block: &[u8], j: usize, lines: &mut [Line]) {
    let high = u32::from_le_bytes(block[..4].try_into().expect("four bytes"));
    for (four, line) in block[4..20].chunks_exact(4).zip(&mut *lines) {
        line.0[4 * j..][..4].copy_from_slice(four);
    }
    for (s, mask) in lines[4].0.chunks_exact_mut(8).enumerate() {
        let bits = u64::from((high >> (4 * s)) & 0xF) << (4 * j);
        let old = u64::from_le_bytes((&*mask).try_into().expect("eight bytes"));
        mask.copy_from_slice(&(old | bits).to_le_bytes());
    }
}

/// Weight rows `first..first + out.features()` of `packed` dotted with
/// every activation row; `first` starts a group, as every product task
/// does. The instruction set is picked once per call.
pub fn dot_into<S: Sums>(packed: &Packed, first: usize, acts: &Q8Rows, out: &mut S) {
    assert!(first.is_multiple_of(GROUP), "a task starts a group");
    assert!(first + out.features() <= packed.features && acts.inputs() == packed.inputs);
    #[cfg(target_arch = "x86_64")]
    {
        use super::features::{x86, X86};
        let kernel = match (x86(), packed.format) {
            (X86::Avx512Vnni, _) => x86_64::avx512::<S>,
            (X86::AvxVnni, Format::Q8_0) => x86_64::avxvnni::<S>,
            (X86::Avx2, Format::Q8_0) => x86_64::avx2::<S>,
            _ => return portable(packed, first, acts, out),
        };
        // SAFETY: the CPU has the features of the kernel picked for it.
        unsafe { kernel(packed, first, acts, out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable(packed, first, acts, out);
}

/// The groups a task covers, each with how many of its rows the task
/// wants: `(group, first feature of the task's in it, rows)`.
pub(super) fn groups(first: usize, features: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (first..first + features)
        .step_by(GROUP)
        .map(move |f| (f / GROUP, f - first, GROUP.min(first + features - f)))
}

/// The same sums in plain Rust, lane by lane as the vector paths.
fn portable<S: Sums>(packed: &Packed, first: usize, acts: &Q8Rows, out: &mut S) {
    let blocks = packed.inputs / BLOCK;
    for (g, f, rows) in groups(first, out.features()) {
        for j in 0..rows {
            for r in 0..acts.rows() {
                let mut sum = 0f32;
                for b in 0..blocks {
                    let (lines, scales) = packed.block(g, b);
                    let (x, x_scale) = acts.block(r, b);
                    let dot: i32 = (0..BLOCK)
                        .map(|i| packed.value(lines, j, i) * x[i] as i32)
                        .sum();
                    let scale = scales[j].to_f32_const() * x_scale;
                    sum = scale.mul_add(dot as f32, sum);
                }
                out.put(f + j, r, sum);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86_64 {
    use super::{groups, Format, Line, Packed, Q8Rows, Sums, AHEAD, BLOCK, LINES, Q5_LINES};
    use crate::engine::text::cpu::prefetch_to_l2_at;
    use half::f16;
    use std::arch::x86_64::*;

    /// Hands a tile's sums to `out`: `sums[i][j]` is activation row
    /// `first_row + i` with the group's row `j`, of which `rows` are wanted.
    #[inline(always)]
    pub(in crate::engine::text::cpu) fn put<const W: usize>(
        out: &mut impl Sums,
        sums: &[[f32; W]],
        f: usize,
        rows: usize,
        first_row: usize,
        count: usize,
    ) {
        for (i, sums) in sums.iter().enumerate().take(count) {
            for (j, sum) in sums.iter().enumerate().take(rows) {
                out.put(f + j, first_row + i, *sum);
            }
        }
    }

    /// The AVX-512 VNNI kernel: a group's sixteen rows in one register,
    /// up to sixteen activation rows at a time. The weights as unsigned
    /// bytes (Q8_0's plus 128, Q5_0's plus 16) times the signed
    /// activations, from each block's offset in [`Q8Rows`] (-128 times the
    /// activations' sum, or an eighth of it), give the signed products
    /// exactly.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn avx512<S: Sums>(packed: &Packed, first: usize, acts: &Q8Rows, out: &mut S) {
        match packed.format {
            Format::Q5_0 => body_avx512::<S, true>(packed, first, acts, out),
            _ => body_avx512::<S, false>(packed, first, acts, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn body_avx512<S: Sums, const Q5: bool>(
        packed: &Packed,
        first: usize,
        acts: &Q8Rows,
        out: &mut S,
    ) {
        let rows = acts.rows();
        for (g, f, wanted) in groups(first, out.features()) {
            for first_row in (0..rows).step_by(16) {
                let count = 16.min(rows - first_row);
                let mut sums = [[0f32; 16]; 16];
                tile_rows::<Q5>(packed, g, acts, first_row, count, &mut sums);
                put(out, &sums, f, wanted, first_row, count);
            }
        }
    }

    /// `count` (1 to 16) activation rows from `first_row` with group `g`,
    /// as many at once as fit the registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_rows<const Q5: bool>(
        p: &Packed,
        g: usize,
        acts: &Q8Rows,
        first_row: usize,
        count: usize,
        sums: &mut [[f32; 16]],
    ) {
        match count {
            1 => tile_avx512::<1, Q5>(p, g, acts, first_row, sums),
            2 => tile_avx512::<2, Q5>(p, g, acts, first_row, sums),
            3 => tile_avx512::<3, Q5>(p, g, acts, first_row, sums),
            4 => tile_avx512::<4, Q5>(p, g, acts, first_row, sums),
            5 => tile_avx512::<5, Q5>(p, g, acts, first_row, sums),
            6 => tile_avx512::<6, Q5>(p, g, acts, first_row, sums),
            7 => tile_avx512::<7, Q5>(p, g, acts, first_row, sums),
            8 => tile_avx512::<8, Q5>(p, g, acts, first_row, sums),
            9..=15 => {
                tile_avx512::<8, Q5>(p, g, acts, first_row, sums);
                tile_rows::<Q5>(p, g, acts, first_row + 8, count - 8, &mut sums[8..]);
            }
            _ => tile_avx512::<16, Q5>(p, g, acts, first_row, sums),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn tile_avx512<const N: usize, const Q5: bool>(
        p: &Packed,
        g: usize,
        acts: &Q8Rows,
        first_row: usize,
        sums: &mut [[f32; 16]],
    ) {
        assert!(N <= sums.len());
        acts.assert_rows(first_row, N, true);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..p.inputs / BLOCK {
            let (lines, scales) = p.block(g, b);
            if Q5 {
                prefetch::<Q5_LINES>(lines, scales);
            } else {
                prefetch::<LINES>(lines, scales);
            }
            // SAFETY: this kernel is compiled for AVX-512.
            let w = if Q5 {
                unsafe { q5_values(lines) }
            } else {
                lines_of(lines)
            };
            // SAFETY: sixteen f16 are 32 bytes.
            let w_scales =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(scales.as_ptr() as *const __m256i) });
            let first = acts.at(first_row, b);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: the rows and their offsets were checked above.
                let (x, x_scale, offset) = unsafe { acts.block_and_offset_at(first + i) };
                let mut dot = _mm512_set1_epi32(if Q5 { offset >> 3 } else { offset });
                for (s, w) in w.iter().enumerate() {
                    // SAFETY: four of the block's 32 bytes.
                    let four = unsafe { x.add(s).read_unaligned() };
                    dot = _mm512_dpbusd_epi32(dot, *w, _mm512_set1_epi32(four));
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

    /// Asks for the lines and scales [`AHEAD`] bytes of lines past this
    /// block's. The matrix is read front to back, but one core's hardware
    /// prefetchers stop at each 4 KiB page and keep too few lines in
    /// flight: without this the kernel waited on its loads.
    /// `PER_BLOCK` is the format's lines per block, a constant so that
    /// the scales' distance is not a division per block.
    #[inline(always)]
    fn prefetch<const PER_BLOCK: usize>(lines: &[Line], scales: &[f16]) {
        for line in 0..PER_BLOCK {
            prefetch_to_l2_at(lines, AHEAD + 64 * line);
        }
        // A block's 32 bytes of scales go with its lines.
        prefetch_to_l2_at(scales, AHEAD * 32 / (64 * PER_BLOCK));
    }

    /// A Q5_0 block's values plus 16 as bytes, in Q8_0's lines' order:
    /// the nibble lines' low then high nibbles, each with its mask's high
    /// bits added as 16.
    ///
    /// # Safety
    /// The CPU must have avx512f and avx512bw: this is inlined into
    /// kernels compiled for them.
    #[inline(always)]
    unsafe fn q5_values(lines: &[Line]) -> [__m512i; LINES] {
        assert!(lines.len() >= Q5_LINES);
        let p = lines.as_ptr() as *const __m512i;
        let masks = |s: usize| {
            let bytes = &lines[4].0[8 * s..][..8];
            u64::from_le_bytes(bytes.try_into().expect("eight bytes"))
        };
        // SAFETY: the caller vouches for the CPU's features; four lines,
        // each 64 bytes aligned to 64.
        unsafe {
            let (low, sixteen) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(16));
            let n = [
                _mm512_load_si512(p),
                _mm512_load_si512(p.add(1)),
                _mm512_load_si512(p.add(2)),
                _mm512_load_si512(p.add(3)),
            ];
            let nibble = |s: usize| match s {
                0..4 => _mm512_and_si512(n[s], low),
                _ => _mm512_and_si512(_mm512_srli_epi16::<4>(n[s - 4]), low),
            };
            let value = |s: usize| {
                let v = nibble(s);
                _mm512_mask_add_epi8(v, masks(s), v, sixteen)
            };
            [
                value(0),
                value(1),
                value(2),
                value(3),
                value(4),
                value(5),
                value(6),
                value(7),
            ]
        }
    }

    /// A block's eight lines in registers. Written out, because a loop
    /// that fills an array was turned into a call to `memcpy` onto the
    /// stack, which took a third of a step.
    #[inline(always)]
    fn lines_of(lines: &[Line]) -> [__m512i; LINES] {
        assert!(lines.len() >= LINES);
        let p = lines.as_ptr() as *const __m512i;
        // SAFETY: eight lines, each 64 bytes aligned to 64.
        unsafe {
            [
                _mm512_load_si512(p),
                _mm512_load_si512(p.add(1)),
                _mm512_load_si512(p.add(2)),
                _mm512_load_si512(p.add(3)),
                _mm512_load_si512(p.add(4)),
                _mm512_load_si512(p.add(5)),
                _mm512_load_si512(p.add(6)),
                _mm512_load_si512(p.add(7)),
            ]
        }
    }

    /// Bytes `4s..4s + 4` of an activation block, as one 32-bit lane.
    #[inline(always)]
    fn four(x: &[i8; BLOCK], s: usize) -> i32 {
        let b = &x[4 * s..4 * s + 4];
        i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    /// Generates the 256-bit kernels, which take each group as two halves
    /// of eight rows and up to four activation rows at a time: `$dot`
    /// adds to `$acc` the four-byte dot products of absolute weights `$a`
    /// and sign-adjusted activations `$b`, lane by lane.
    macro_rules! kernel {
        ($name:ident, $tile:ident, $features:literal, |$acc:ident, $a:ident, $b:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            pub fn $name<S: Sums>(packed: &Packed, first: usize, acts: &Q8Rows, out: &mut S) {
                let rows = acts.rows();
                for (g, f, wanted) in groups(first, out.features()) {
                    for half in 0..2 {
                        let Some(wanted) = wanted.checked_sub(8 * half).filter(|w| *w > 0) else {
                            continue;
                        };
                        for first_row in (0..rows).step_by(4) {
                            let mut sums = [[0f32; 8]; 4];
                            let (p, s) = (packed, &mut sums);
                            match rows - first_row {
                                1 => $tile::<1>(p, g, half, acts, first_row, s),
                                2 => $tile::<2>(p, g, half, acts, first_row, s),
                                3 => $tile::<3>(p, g, half, acts, first_row, s),
                                _ => $tile::<4>(p, g, half, acts, first_row, s),
                            }
                            let count = 4.min(rows - first_row);
                            put(out, &sums, f + 8 * half, wanted.min(8), first_row, count);
                        }
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn $tile<const N: usize>(
                p: &Packed,
                g: usize,
                half: usize,
                acts: &Q8Rows,
                first_row: usize,
                sums: &mut [[f32; 8]; 4],
            ) {
                assert!(N <= 4 && first_row + N <= acts.rows() && half < 2);
                let mut acc = [_mm256_setzero_ps(); N];
                for b in 0..p.inputs / BLOCK {
                    let (lines, scales) = p.block(g, b);
                    if half == 0 {
                        prefetch::<LINES>(lines, scales);
                    }
                    let (mut w, mut abs_w) = (
                        [_mm256_setzero_si256(); LINES],
                        [_mm256_setzero_si256(); LINES],
                    );
                    for s in 0..LINES {
                        // SAFETY: the half line is 32 bytes inside a line.
                        let biased = unsafe {
                            _mm256_load_si256(lines[s].0.as_ptr().add(32 * half) as *const __m256i)
                        };
                        w[s] = _mm256_xor_si256(biased, _mm256_set1_epi8(-128));
                        abs_w[s] = _mm256_sign_epi8(w[s], w[s]);
                    }
                    // SAFETY: eight f16 are 16 bytes inside the group's sixteen.
                    let w_scales = _mm256_cvtph_ps(unsafe {
                        _mm_loadu_si128(scales.as_ptr().add(8 * half) as *const __m128i)
                    });
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let (x, x_scale) = acts.block(first_row + i, b);
                        let mut dot = _mm256_setzero_si256();
                        for s in 0..LINES {
                            let four = _mm256_set1_epi32(four(x, s));
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

    kernel!(avx2, tile_avx2, "avx2,fma,f16c", |acc, a, b| {
        _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)),
        )
    });
    kernel!(
        avxvnni,
        tile_avxvnni,
        "avx2,fma,f16c,avxvnni",
        |acc, a, b| _mm256_dpbusd_avx_epi32(acc, a, b)
    );
}

#[cfg(test)]
mod tests {
    use super::super::features::{x86, X86};
    use super::super::q8_0::{portable_features, FeatureMajor, Format};
    use super::*;

    /// Nineteen weight rows (a whole group and three rows of another) and
    /// 21 activation rows (a 16-row tile and 5, or five 4-row tiles and
    /// one) give the file layout's portable sums bit for bit, in both
    /// formats, on every path the CPU has, and from a task that starts at
    /// the second group.
    #[test]
    fn packed_products_are_the_files_bit_for_bit() {
        for format in [Format::Q8_0, Format::Q5_0] {
            for inputs in [64, 288, 576] {
                check_format(format, inputs);
            }
        }
    }

    const FEATURES: usize = 19;
    const ROWS: usize = 21;

    fn check_format(format: Format, inputs: usize) {
        let blocks = FEATURES * inputs / BLOCK;
        let mut bytes = Vec::new();
        for b in 0..blocks {
            bytes.extend(f16::from_f32(0.01 * (b % 23 + 1) as f32).to_le_bytes());
            let size = format.block_bytes() - 2;
            bytes.extend((0..size).map(|i| ((i * 29 + b * 7) % 256) as u8));
        }
        let x: Vec<f32> = (0..ROWS * inputs)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let acts = Q8Rows::quantize(&x, inputs);
        let mut want = vec![0f32; FEATURES * ROWS];
        let mut sums = FeatureMajor {
            out: &mut want,
            rows: ROWS,
        };
        portable_features(format, &bytes, 0, &acts, &mut sums);
        let packed = Packed::new(format, &bytes, FEATURES, inputs);
        let check = |name: &str, kernel: &dyn Fn(usize, &mut FeatureMajor)| {
            let mut got = vec![0f32; FEATURES * ROWS];
            kernel(
                0,
                &mut FeatureMajor {
                    out: &mut got,
                    rows: ROWS,
                },
            );
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{format:?} {name}, {inputs} inputs"
            );
            let mut tail = vec![0f32; (FEATURES - GROUP) * ROWS];
            kernel(
                GROUP,
                &mut FeatureMajor {
                    out: &mut tail,
                    rows: ROWS,
                },
            );
            let from = &want[GROUP * ROWS..];
            assert_eq!(bits(&tail), bits(from), "{format:?} {name} from 16");
        };
        check("portable", &|first, out| {
            portable(&packed, first, &acts, out)
        });
        check("best", &|first, out| dot_into(&packed, first, &acts, out));
        #[cfg(target_arch = "x86_64")]
        if x86() != X86::None && format == Format::Q8_0 {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            check("avx2", &|first, out| unsafe {
                x86_64::avx2(&packed, first, &acts, out)
            });
            if std::is_x86_feature_detected!("avxvnni") {
                // SAFETY: the CPU has AVX-VNNI too.
                check("avx-vnni", &|first, out| unsafe {
                    x86_64::avxvnni(&packed, first, &acts, out)
                });
            }
        }
    }

    /// How fast a load repacks: `cargo test --release -p modeld --lib
    /// repack_rate -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing probe, not a check"]
    fn repack_rate() {
        let (features, inputs) = (8192, 2048);
        let bytes: Vec<u8> = (0..features * inputs / BLOCK * Format::Q8_0.block_bytes())
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let t = std::time::Instant::now();
        let packed = Packed::new(Format::Q8_0, &bytes, features, inputs);
        let s = t.elapsed().as_secs_f64();
        println!(
            "repacked {} MB in {:.1} ms: {:.2} GB/s",
            bytes.len() / 1_000_000,
            s * 1e3,
            bytes.len() as f64 / s / 1e9
        );
        assert_eq!(packed.features(), features);
    }
}
