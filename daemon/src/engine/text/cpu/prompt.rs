//! A prompt's product with f32 weights, read where they lie (a mapped
//! file or a tensor in memory), on CPUs with AVX-512.
//!
//! Tiles that dot a few weight rows with a few activation rows along the
//! inputs (both operands as they lie) ran at 50–75 GFLOP/s a core here,
//! and so did the `gemm` crate, against 200 for the multiply-adds alone:
//! such a tile needs a load for every two or three multiply-adds and
//! sums each output across its lanes at the end. Here the activations
//! are turned once per product into panels, sixteen rows to a register
//! along the lanes, and each weight is broadcast: per input, three panel
//! loads and eight broadcasts feed 24 multiply-adds into 24 registers,
//! eight weight rows by 48 activation rows. The weights need no copy, and
//! the panels (the prompt's rows, a few hundred KiB) stay in cache while
//! every weight row streams past them once.
//!
//! Each output is one lane's chain of multiply-adds in the inputs' order,
//! so the result does not depend on the threads or on the blocking.
//!
//! x86-64 only: elsewhere prompts take the `gemm` crate.

use super::features::{x86, X86};
use super::{pool, Out};

/// Weight rows of a tile, each broadcast in turn: with three panel
/// registers, 24 accumulators and a broadcast take 28 of the 32 registers.
const TILE_FEATURES: usize = 8;

/// Weight rows per pool task: small enough that a helper taken off its
/// core holds back little, large enough that a task's start is noise.
const TASK_FEATURES: usize = 64;

/// Activation rows per panel register.
const LANES: usize = 16;

/// The most bytes of panel one block of inputs spans, so that a block of
/// every panel stays in a core's second-level cache while a task's weight
/// rows pass it.
const BLOCK_BYTES: usize = 512 << 10;

/// Prompt rows per pass over the weights: twelve registers, four chunks.
/// A longer prompt reads the weights once per group, which at 96
/// multiply-adds a weight is far below what the memory gives; in return
/// a task's sums (a few tens of KiB) come from the heap and not a fresh
/// mapping, and the panels have a bound.
const GROUP_ROWS: usize = 192;

/// `x` (`rows × inputs`) times the transpose of `w` (`features ×
/// inputs`): `rows × features`, on the pool's threads. `None` on a CPU
/// without AVX-512, whose prompts take the `gemm` crate.
pub fn product(
    x: &[f32],
    rows: usize,
    w: &[f32],
    features: usize,
    inputs: usize,
) -> Option<Vec<f32>> {
    if x86() != X86::Avx512Vnni || rows == 0 || inputs == 0 {
        return None;
    }
    assert!(x.len() == rows * inputs && w.len() == features * inputs);
    let mut out = vec![0f32; rows * features];
    let groups = x.chunks(GROUP_ROWS * inputs);
    for (x, out) in groups.zip(out.chunks_mut(GROUP_ROWS * features)) {
        // SAFETY: the CPU has AVX-512, checked above.
        unsafe { product_in_blocks(x, w, features, inputs, BLOCK_BYTES, out) };
    }
    Some(out)
}

/// `x` (whole rows of `inputs`) times the transpose of `w` into `out`,
/// with blocks of inputs of at most `block_bytes` of panel.
///
/// # Safety
/// The CPU has AVX-512F.
unsafe fn product_in_blocks(
    x: &[f32],
    w: &[f32],
    features: usize,
    inputs: usize,
    block_bytes: usize,
    out: &mut [f32],
) {
    let rows = x.len() / inputs;
    assert!(out.len() == rows * features && w.len() == features * inputs);
    // SAFETY: as the caller promises.
    let panels = unsafe { Panels::new(x, rows, inputs) };
    let block = panels.block_inputs(block_bytes);
    let sink = Out(out.as_mut_ptr());
    let work = |t: usize| {
        let first = t * TASK_FEATURES;
        let task = Task {
            w,
            panels: &panels,
            features: first..features.min(first + TASK_FEATURES),
            block,
        };
        // SAFETY: as the caller promises; each task writes only its own
        // columns of `out`, which outlives the run.
        unsafe { task.run(sink, features) };
    };
    pool::global().run(features.div_ceil(TASK_FEATURES), &work);
}

/// A prompt's rows laid out for the tiles: in chunks of one to three
/// registers' worth of rows (16 to 48), each chunk input by input, the
/// rows past the prompt's end zero.
struct Panels {
    lines: Vec<Line>,
    chunks: Vec<Chunk>,
    rows: usize,
    inputs: usize,
}

thread_local! {
    /// The last product's panel lines on this thread, for the next: a new
    /// allocation of a few hundred KiB is a mapping of its own
    /// (`devices::keep_large_allocations_returnable`), and faulting its
    /// pages in took longer than filling them.
    static KEPT: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The most panel bytes kept between products: a group of 192 rows at
/// 5632 inputs takes 4.1 MiB, 96 rows at 14336 inputs 5.3 MiB.
const KEPT_BYTES: usize = 6 << 20;

impl Drop for Panels {
    fn drop(&mut self) {
        if self.lines.capacity() * size_of::<Line>() <= KEPT_BYTES {
            let lines = std::mem::take(&mut self.lines);
            // A thread being torn down keeps nothing.
            let _ = KEPT.try_with(|kept| kept.set(lines));
        }
    }
}

/// Sixteen activation rows' values of one input, aligned as a register.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; LANES]);

/// One chunk of a panel: `width` registers of rows from row `first`, its
/// lines from `start`, `width` lines an input.
#[derive(Clone, Copy)]
struct Chunk {
    first: usize,
    width: usize,
    start: usize,
}

impl Panels {
    /// # Safety
    /// The CPU has AVX-512F.
    unsafe fn new(x: &[f32], rows: usize, inputs: usize) -> Self {
        let chunks = chunks(rows.div_ceil(LANES), inputs);
        let width: usize = chunks.iter().map(|c| c.width).sum();
        let mut lines = KEPT.with(|kept| kept.take());
        // Every lane is written below, padding included (as zeros), so
        // the lines kept from the last product need no clearing.
        lines.resize(width * inputs, Line([0.0; LANES]));
        for chunk in &chunks {
            for line in 0..chunk.width {
                let first = chunk.first + line * LANES;
                let count = rows.saturating_sub(first).min(LANES);
                let x = &x[first * inputs..(first + count) * inputs];
                for from in (0..inputs).step_by(LANES) {
                    let at = chunk.start + from * chunk.width + line;
                    // SAFETY: as the caller promises.
                    unsafe { avx512::transpose(x, inputs, from, &mut lines[at..], chunk.width) };
                }
            }
        }
        Panels {
            lines,
            chunks,
            rows,
            inputs,
        }
    }

    /// Rows with their padding: the lanes of every chunk.
    fn padded_rows(&self) -> usize {
        self.chunks.iter().map(|c| c.width * LANES).sum()
    }

    /// Inputs per block, so that a block of every chunk spans at most
    /// `bytes`; the blocks come out about even.
    fn block_inputs(&self, bytes: usize) -> usize {
        let most = (bytes / (self.padded_rows() * 4)).max(LANES);
        let blocks = self.inputs.div_ceil(most);
        self.inputs.div_ceil(blocks)
    }
}

/// Splits `registers` (sixteen rows each) into chunks of three, or two
/// where a chunk of one would be left: a tile of one register does a load
/// for every multiply-add. Each chunk's lines follow the last's.
fn chunks(registers: usize, inputs: usize) -> Vec<Chunk> {
    let (mut out, mut left, mut start) = (Vec::new(), registers, 0);
    while left > 0 {
        let width = match left {
            1 | 2 => left,
            4 => 2,
            _ => 3,
        };
        out.push(Chunk {
            first: (registers - left) * LANES,
            width,
            start,
        });
        start += width * inputs;
        left -= width;
    }
    out
}

/// One pool task: a run of weight rows against every panel.
struct Task<'a> {
    w: &'a [f32],
    panels: &'a Panels,
    features: std::ops::Range<usize>,
    block: usize,
}

impl Task<'_> {
    /// Sums the task's weight rows against every panel, a block of inputs
    /// at a time so that the block of panel stays in cache across the
    /// task's tiles, then writes the task's columns of `out` (`features`
    /// wide).
    ///
    /// # Safety
    /// The CPU has AVX-512F, and no other thread writes these columns of
    /// `out` meanwhile.
    unsafe fn run(&self, out: Out, features: usize) {
        let padded = self.panels.padded_rows();
        let count = self.features.len();
        let mut sums = vec![0f32; count * padded];
        let inputs = self.panels.inputs;
        for from in (0..inputs).step_by(self.block) {
            let len = self.block.min(inputs - from);
            for first in (0..count).step_by(TILE_FEATURES) {
                let tile = TILE_FEATURES.min(count - first);
                for chunk in &self.panels.chunks {
                    let at = first * padded + chunk.first;
                    // SAFETY: as the caller promises; the tile's rows,
                    // inputs and sums lie inside `w`, the panel and `sums`.
                    unsafe { self.tile(chunk, first, tile, from, len, &mut sums[at..], padded) };
                }
            }
        }
        for row in 0..self.panels.rows {
            // SAFETY: inside `out`, in this task's columns.
            let columns = unsafe { out.range(row * features + self.features.start, count) };
            for (i, value) in columns.iter_mut().enumerate() {
                *value = sums[i * padded + row];
            }
        }
    }

    /// Adds inputs `from..from + len` of weight rows `first..first + tile`
    /// (counted from the task's first) times `chunk`'s rows to `sums`,
    /// whose feature rows are `stride` apart.
    ///
    /// # Safety
    /// As for [`Task::run`]; `sums` holds `tile` rows of `stride`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        chunk: &Chunk,
        first: usize,
        tile: usize,
        from: usize,
        len: usize,
        sums: &mut [f32],
        stride: usize,
    ) {
        let inputs = self.panels.inputs;
        let w = self.w[(self.features.start + first) * inputs + from..].as_ptr();
        let panel = self.panels.lines[chunk.start + from * chunk.width..]
            .as_ptr()
            .cast();
        let sums = sums.as_mut_ptr();
        assert!(tile <= TILE_FEATURES);
        // SAFETY: as the caller promises: `tile` weight rows of `inputs`
        // from `w`, `len` inputs of `chunk.width` lines from `panel`.
        unsafe {
            use avx512::tile as t;
            let run = (w, inputs, len, panel, sums, stride);
            match (chunk.width, tile) {
                (3, TILE_FEATURES) => t::<3, TILE_FEATURES>(run),
                (2, TILE_FEATURES) => t::<2, TILE_FEATURES>(run),
                (1, TILE_FEATURES) => t::<1, TILE_FEATURES>(run),
                (width, _) => {
                    for i in 0..tile {
                        let run = (
                            w.add(i * inputs),
                            inputs,
                            len,
                            panel,
                            sums.add(i * stride),
                            stride,
                        );
                        match width {
                            3 => t::<3, 1>(run),
                            2 => t::<2, 1>(run),
                            _ => t::<1, 1>(run),
                        }
                    }
                }
            }
        }
    }
}

mod avx512 {
    use super::{Line, LANES};
    use std::arch::x86_64::*;

    /// Writes sixteen inputs from `from` (fewer at the end of the rows) of
    /// the rows of `x` (`inputs` each, at most sixteen) as lines `step`
    /// apart from `lines[0]`, one lane a row, the lanes past the rows zero.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose(
        x: &[f32],
        inputs: usize,
        from: usize,
        lines: &mut [Line],
        step: usize,
    ) {
        let count = (inputs - from).min(LANES);
        let rows = x.len() / inputs;
        assert!(rows <= LANES && lines.len() > (count - 1) * step);
        let mask = ((1u32 << count) - 1) as u16;
        let mut r = [_mm512_setzero_ps(); LANES];
        for (row, r) in r.iter_mut().enumerate().take(rows) {
            // SAFETY: `count` values from `from` lie in the row.
            *r = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(row * inputs + from)) };
        }
        let columns = transposed(r);
        for (i, column) in columns.iter().enumerate().take(count) {
            // SAFETY: `Line` is sixteen f32 aligned as a register.
            unsafe { _mm512_store_ps(lines[i * step].0.as_mut_ptr(), *column) };
        }
    }

    /// Sixteen registers of sixteen rows' values as sixteen registers of
    /// sixteen columns' (a 16 × 16 transpose), in four rounds of shuffles:
    /// pairs of values, pairs of pairs, then 128-bit quarters twice.
    #[inline(always)]
    fn transposed(r: [__m512; LANES]) -> [__m512; LANES] {
        // SAFETY: the callers are compiled for AVX-512F.
        unsafe {
            let mut t = [_mm512_setzero_ps(); LANES];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + j]: inputs j, j + 4, j + 8 and j + 12 of rows 4g..4g + 4,
            // one 128-bit quarter each.
            let mut u = [_mm512_setzero_ps(); LANES];
            for g in 0..4 {
                let (a, b) = (_mm512_castps_pd(t[4 * g]), _mm512_castps_pd(t[4 * g + 2]));
                let (c, d) = (
                    _mm512_castps_pd(t[4 * g + 1]),
                    _mm512_castps_pd(t[4 * g + 3]),
                );
                u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
            }
            let mut out = [_mm512_setzero_ps(); LANES];
            for j in 0..4 {
                // Quarters of rows 0..8, then of rows 8..16: inputs j and
                // j + 8 (0x88), j + 4 and j + 12 (0xDD).
                let low = [u[j], u[4 + j], u[8 + j], u[12 + j]];
                let v0 = _mm512_shuffle_f32x4::<0x88>(low[0], low[1]);
                let v1 = _mm512_shuffle_f32x4::<0xDD>(low[0], low[1]);
                let w0 = _mm512_shuffle_f32x4::<0x88>(low[2], low[3]);
                let w1 = _mm512_shuffle_f32x4::<0xDD>(low[2], low[3]);
                out[j] = _mm512_shuffle_f32x4::<0x88>(v0, w0);
                out[j + 8] = _mm512_shuffle_f32x4::<0xDD>(v0, w0);
                out[j + 4] = _mm512_shuffle_f32x4::<0x88>(v1, w1);
                out[j + 12] = _mm512_shuffle_f32x4::<0xDD>(v1, w1);
            }
            out
        }
    }

    /// What a tile reads and adds to: `F` weight rows of `inputs` from
    /// the first pointer, `len` inputs of `C` lines from the panel, and
    /// `F` rows of sums `stride` apart.
    pub type Run = (*const f32, usize, usize, *const f32, *mut f32, usize);

    /// Adds the products of `F` weight rows with `C` registers of rows to
    /// the sums, input by input: each weight broadcast, each panel line
    /// loaded once for all `F`. A function of its own for each shape, so
    /// that its accumulators stay in registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and the run's pointers hold what [`Run`]
    /// says.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const C: usize, const F: usize>(run: Run) {
        let (w, inputs, len, panel, sums, stride) = run;
        // SAFETY: as the caller promises.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; F];
            for (i, acc) in acc.iter_mut().enumerate() {
                for (c, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(sums.add(i * stride + c * 16));
                }
            }
            for k in 0..len {
                let mut xs = [_mm512_setzero_ps(); C];
                for (c, x) in xs.iter_mut().enumerate() {
                    *x = _mm512_load_ps(panel.add((k * C + c) * 16));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let weight = _mm512_set1_ps(*w.add(i * inputs + k));
                    for (acc, x) in acc.iter_mut().zip(&xs) {
                        *acc = _mm512_fmadd_ps(weight, *x, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (c, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(sums.add(i * stride + c * 16), *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in ±0.5 from a seed, none zero in a pattern the tiles could
    /// hide a misplaced row behind.
    fn values(count: usize, seed: usize) -> Vec<f32> {
        (0..count)
            .map(|i| ((i * 37 + seed * 11) % 101) as f32 / 101.0 - 0.5)
            .collect()
    }

    /// Against sums in f64, for prompts of one to seven registers (chunks
    /// of one, two and three, and two of two), weight rows that leave a
    /// partial tile and a partial task, and inputs in one block and in
    /// several.
    #[test]
    fn prompt_products_match_the_exact_sums() {
        for (rows, features, inputs, block_bytes) in [
            (17, 70, 200, BLOCK_BYTES),
            (35, 136, 96, BLOCK_BYTES),
            (5, 9, 40, BLOCK_BYTES),
            (64, 64, 130, 48 * 4 * 64),
            (100, 72, 300, 112 * 4 * 16),
        ] {
            let x = values(rows * inputs, 3);
            let w = values(features * inputs, 7);
            if x86() != X86::Avx512Vnni {
                assert!(product(&x, rows, &w, features, inputs).is_none());
                continue;
            }
            let mut got = vec![0f32; rows * features];
            // SAFETY: the CPU has AVX-512, checked above.
            unsafe { product_in_blocks(&x, &w, features, inputs, block_bytes, &mut got) };
            assert_exact(&x, &w, (rows, features, inputs), &got);
        }
    }

    /// A prompt longer than a group of rows: 192 rows, then 9 (one chunk
    /// of one register) in a pass of their own.
    #[test]
    fn long_prompts_go_in_groups_of_rows() {
        let (rows, features, inputs) = (GROUP_ROWS + 9, 20, 33);
        let x = values(rows * inputs, 8);
        let w = values(features * inputs, 9);
        match product(&x, rows, &w, features, inputs) {
            Some(got) => assert_exact(&x, &w, (rows, features, inputs), &got),
            None => assert!(x86() != X86::Avx512Vnni),
        }
    }

    fn assert_exact(x: &[f32], w: &[f32], shape: (usize, usize, usize), got: &[f32]) {
        let (rows, features, inputs) = shape;
        for r in 0..rows {
            for f in 0..features {
                let exact: f64 = (0..inputs)
                    .map(|i| x[r * inputs + i] as f64 * w[f * inputs + i] as f64)
                    .sum();
                let g = got[r * features + f] as f64;
                // f32 sums of at most 300 products below 0.25 each:
                // rounding stays far below 1e-4.
                assert!(
                    (g - exact).abs() < 1e-4,
                    "{rows}×{features}×{inputs}: row {r}, feature {f}: {g} vs {exact}"
                );
            }
        }
    }

    /// Blocks of inputs change no bit: each output is one chain of
    /// multiply-adds in the inputs' order, whatever the blocking.
    #[test]
    fn blocks_of_inputs_change_no_bit() {
        let (rows, features, inputs) = (40, 24, 500);
        let x = values(rows * inputs, 5);
        let w = values(features * inputs, 2);
        if x86() != X86::Avx512Vnni {
            return;
        }
        let (mut whole, mut blocked) = (vec![0f32; rows * features], vec![0f32; rows * features]);
        // SAFETY: the CPU has AVX-512, checked above.
        unsafe {
            product_in_blocks(&x, &w, features, inputs, usize::MAX, &mut whole);
            product_in_blocks(&x, &w, features, inputs, 48 * 4 * 16, &mut blocked);
        }
        assert!(whole
            .iter()
            .zip(&blocked)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn chunks_avoid_a_single_register_after_the_first() {
        let widths = |n| chunks(n, 10).iter().map(|c| c.width).collect::<Vec<_>>();
        assert_eq!(widths(1), [1]);
        assert_eq!(widths(4), [2, 2]);
        assert_eq!(widths(5), [3, 2]);
        assert_eq!(widths(7), [3, 2, 2]);
        assert_eq!(widths(9), [3, 3, 3]);
        let c = chunks(5, 10);
        assert_eq!((c[1].first, c[1].start), (48, 30));
    }

    /// How fast a prompt's product runs against the `gemm` crate's:
    /// `cargo test --release -p modeld --lib prompt_product_rate --
    /// --ignored --nocapture` (threads: `RAYON_NUM_THREADS`; shape:
    /// `PROBE_ROWS`, `PROBE_FEATURES`, `PROBE_INPUTS`).
    #[test]
    #[ignore = "a timing probe, not a check"]
    fn prompt_product_rate() {
        let var = |name: &str, default: usize| {
            std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
        };
        let rows = var("PROBE_ROWS", 35);
        let features = var("PROBE_FEATURES", 5632);
        let inputs = var("PROBE_INPUTS", 2048);
        let x = values(rows * inputs, 1);
        let w = values(features * inputs, 4);
        let flops = 2.0 * (rows * features * inputs) as f64;
        for round in 0..var("PROBE_ROUNDS", 3) {
            let start = std::time::Instant::now();
            let ours = product(&x, rows, &w, features, inputs);
            let ours_s = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            let theirs = super::super::mapped::gemm_f32(&x, rows, &w, features, inputs);
            let gemm_s = start.elapsed().as_secs_f64();
            let most = ours.map_or(0.0, |o| {
                o.iter()
                    .zip(&theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            });
            println!(
                "round {round}: panels {:.2} ms ({:.1} GFLOP/s), gemm {:.2} ms ({:.1} GFLOP/s), most apart {most}",
                ours_s * 1e3,
                flops / ours_s / 1e9,
                gemm_s * 1e3,
                flops / gemm_s / 1e9
            );
        }
    }
}
