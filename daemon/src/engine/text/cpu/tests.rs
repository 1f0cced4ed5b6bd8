//! The CPU products against plain sums: f32 exactly as summed in f64 up to
//! rounding, quantized weights against the same weights dequantized, and
//! every result the same for a row alone as in a batch.

use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect()
}

/// GGML blocks of `w` quantized to `dtype`, in a buffer aligned as the
/// blocks need, and the same weights dequantized.
fn quantized(
    w: &[f32],
    features: usize,
    inputs: usize,
    dtype: GgmlDType,
) -> (Vec<u64>, usize, Vec<f32>) {
    let tensor = Tensor::from_slice(w, (features, inputs), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&tensor, dtype).unwrap();
    let bytes = q.data().unwrap();
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `aligned` holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), aligned.as_mut_ptr() as *mut u8, bytes.len())
    };
    let dequantized = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (aligned, bytes.len(), dequantized)
}

fn as_bytes(words: &[u64], len: usize) -> &[u8] {
    // SAFETY: `len` is within the buffer.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, len) }
}

fn exact(w: &[f32], x: &[f32], rows: usize, features: usize, inputs: usize) -> Vec<f64> {
    let mut out = vec![0f64; rows * features];
    for r in 0..rows {
        for f in 0..features {
            out[r * features + f] = (0..inputs)
                .map(|i| w[f * inputs + i] as f64 * x[r * inputs + i] as f64)
                .sum();
        }
    }
    out
}

/// Each row's result computed alone must equal, bit for bit, its row of
/// the batched result.
fn assert_alone_equals_batched(parts: &[Part], x: &[f32], rows: usize, inputs: usize) {
    let batched = few_rows(parts, x, rows, inputs);
    for r in 0..rows {
        let alone = few_rows(parts, &x[r * inputs..(r + 1) * inputs], 1, inputs);
        for (part, (b, a)) in parts.iter().zip(batched.iter().zip(&alone)) {
            let row = &b[r * part.features..(r + 1) * part.features];
            let same = row.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "row {r} alone differs from the batch");
        }
    }
}

#[test]
fn f32_products_match_the_exact_sums() {
    let (rows, features, inputs) = (5, 300, 200);
    let w = values(features * inputs, 1);
    let x = values(rows * inputs, 2);
    let part = Part {
        source: Source::F32(&w),
        features,
    };
    let got = few_rows(&[part], &x, rows, inputs).pop().unwrap();
    for (g, e) in got.iter().zip(exact(&w, &x, rows, features, inputs)) {
        // f32 sums of 200 products of values below 0.5 in magnitude.
        assert!((*g as f64 - e).abs() < 1e-4, "{g} vs {e}");
    }
    assert_alone_equals_batched(&[part], &x, rows, inputs);
}

/// The tolerance for a quantized product: the activations are rounded to
/// 8 bits per block, each by at most half a step of `max|x| / 127`, so a
/// dot product moves by at most `Σ|w| · max|x| / 254`; f32 sums add a
/// little on top.
fn activation_rounding_bound(w_row: &[f32], x_row: &[f32]) -> f64 {
    let max = x_row.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let l1: f64 = w_row.iter().map(|v| v.abs() as f64).sum();
    l1 * max / 254.0 * 1.01 + 1e-4
}

#[test]
fn quantized_products_match_the_dequantized_weights() {
    let (rows, features, inputs) = (4, 70, 512);
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let w = values(features * inputs, 3);
        let x = values(rows * inputs, 4);
        let (words, len, dequantized) = quantized(&w, features, inputs, dtype);
        let part = Part {
            source: Source::Quant(dtype, as_bytes(&words, len)),
            features,
        };
        let got = few_rows(&[part], &x, rows, inputs).pop().unwrap();
        let want = exact(&dequantized, &x, rows, features, inputs);
        for r in 0..rows {
            for f in 0..features {
                let bound = activation_rounding_bound(
                    &dequantized[f * inputs..(f + 1) * inputs],
                    &x[r * inputs..(r + 1) * inputs],
                );
                let (g, e) = (got[r * features + f] as f64, want[r * features + f]);
                assert!(
                    (g - e).abs() <= bound,
                    "{dtype:?} row {r} feature {f}: {g} vs {e} (bound {bound})"
                );
            }
        }
        assert_alone_equals_batched(&[part], &x, rows, inputs);
    }
}

#[test]
fn parts_of_mixed_types_run_in_one_dispatch() {
    let (rows, inputs) = (3, 256);
    let w32 = values(40 * inputs, 5);
    let wq = values(24 * inputs, 6);
    let (words, len, _) = quantized(&wq, 24, inputs, GgmlDType::Q6K);
    let parts = [
        Part {
            source: Source::F32(&w32),
            features: 40,
        },
        Part {
            source: Source::Quant(GgmlDType::Q6K, as_bytes(&words, len)),
            features: 24,
        },
        Part {
            source: Source::Quant(GgmlDType::Q8_0, &[]),
            features: 0,
        },
    ];
    let x = values(rows * inputs, 7);
    let out = few_rows(&parts, &x, rows, inputs);
    assert_eq!(
        out.iter().map(Vec::len).collect::<Vec<_>>(),
        [rows * 40, rows * 24, 0]
    );
    let single = few_rows(&parts[1..2], &x, rows, inputs);
    assert_eq!(single[0], out[1]);
    assert_alone_equals_batched(&parts, &x, rows, inputs);
}

#[test]
fn a_mapped_matrix_reads_the_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let (features, inputs) = (33, 64);
    let w = values(features * inputs, 8);
    let mut bytes = vec![0u8; 32];
    bytes.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let matrix = file.matrix(32, GgmlDType::F32, features, inputs).unwrap();
    let x = values(2 * inputs, 9);
    let got = matrix.forward(&x, 2).unwrap();
    let want = few_rows(
        &[Part {
            source: Source::F32(&w),
            features,
        }],
        &x,
        2,
        inputs,
    );
    assert_eq!(got, want[0]);
    let mut row = vec![0f32; inputs];
    matrix.row(5, &mut row);
    assert_eq!(row, w[5 * inputs..6 * inputs]);
    // Prompts take the blocked product: the same sums up to rounding.
    let long = values(20 * inputs, 10);
    let blocked = matrix.forward(&long, 20).unwrap();
    let plain = exact(&w, &long, 20, features, inputs);
    assert!(blocked
        .iter()
        .zip(plain)
        .all(|(g, e)| (*g as f64 - e).abs() < 1e-4));
    // Out of the file, misaligned, or not whole blocks: refused, with why.
    assert!(file
        .matrix(32, GgmlDType::F32, features + 1, inputs)
        .unwrap_err()
        .contains("past the file's end"));
    assert!(file
        .matrix(2, GgmlDType::F32, 1, 4)
        .unwrap_err()
        .contains("aligned"));
    assert!(file
        .matrix(0, GgmlDType::Q8_0, 1, 48)
        .unwrap_err()
        .contains("whole"));
}

/// GB/s each kernel reads weights at, one row, against a plain read of the
/// same bytes:
/// `cargo test --release -p modeld --lib kernel_read_rates -- --ignored --nocapture`.
#[test]
#[ignore = "a timing probe, not a check"]
fn kernel_read_rates() {
    let (features, inputs) = (8192, 4096);
    let x = values(inputs, 1);
    let w = values(features * inputs, 2);
    let best = |f: &dyn Fn()| {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let bytes = |b: usize| b as f64 / 1e9;
    let plain = best(&|| {
        let mut lanes = [0f32; 16];
        for chunk in w.chunks_exact(16) {
            for (lane, v) in lanes.iter_mut().zip(chunk) {
                *lane += v;
            }
        }
        std::hint::black_box(lanes);
    });
    eprintln!("plain f32 sum: {:.1} GB/s", bytes(w.len() * 4) / plain);
    let f32_part = Part {
        source: Source::F32(&w),
        features,
    };
    let t = best(&|| {
        std::hint::black_box(few_rows(&[f32_part], &x, 1, inputs));
    });
    eprintln!("f32: {:.1} GB/s", bytes(w.len() * 4) / t);
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let (words, len, _) = quantized(&w, features, inputs, dtype);
        let part = Part {
            source: Source::Quant(dtype, as_bytes(&words, len)),
            features,
        };
        for rows in [1, 8, 16] {
            let xs = values(rows * inputs, 3);
            let t = best(&|| {
                std::hint::black_box(few_rows(&[part], &xs, rows, inputs));
            });
            eprintln!(
                "{dtype:?} x {rows} rows: {:.1} GB/s of weights, {:.2} ms",
                bytes(len) / t,
                t * 1e3
            );
        }
    }
}

#[test]
fn a_mapped_quantized_prompt_runs_in_chunks_with_the_decode_sums() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let (features, inputs) = (40, 256);
    let w = values(features * inputs, 11);
    let (words, len, _) = quantized(&w, features, inputs, GgmlDType::Q6K);
    std::fs::write(&path, as_bytes(&words, len)).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let matrix = file.matrix(0, GgmlDType::Q6K, features, inputs).unwrap();
    let rows = 150;
    let x = values(rows * inputs, 12);
    let prompt = matrix.forward(&x, rows).unwrap();
    for r in [0, 63, 64, 149] {
        let alone = matrix.forward(&x[r * inputs..(r + 1) * inputs], 1).unwrap();
        assert_eq!(alone, prompt[r * features..(r + 1) * features], "row {r}");
    }
}

/// The vectorizable rounding is `f32::round` at every kind of value.
#[test]
fn rounding_half_away_is_rounds() {
    let mut cases = vec![
        0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, 126.5, -126.5, 0.49999997,
    ];
    cases.extend((0..2000).map(|i| (i as f32 - 1000.0) * 0.0637));
    cases.extend([f32::MAX, 8388609.0, 4194304.5]);
    for x in cases {
        assert_eq!(
            super::round_half_away(x).to_bits(),
            x.round().to_bits(),
            "{x}"
        );
    }
}

/// A prompt's activations are quantized on the pool in runs of blocks:
/// the same bytes and maxima as one block at a time; and a block holding
/// a NaN comes out as zeros with a NaN maximum, never an unchecked NaN
/// conversion.
#[test]
fn quantizing_on_the_pool_is_quantizing_block_by_block() {
    let x = values(40 * 576 + 32, 7);
    assert!(x.len() >= super::SHARED_QUANTIZE_VALUES);
    let mut shared = vec![0i8; x.len()];
    let maxima = super::quantize_blocks(&x, 32, &mut shared);
    for (b, block) in x.chunks_exact(32).enumerate() {
        let mut alone = [0i8; 32];
        let max = super::quantize_blocks(block, 32, &mut alone);
        assert_eq!(max, [maxima[b]], "block {b}");
        assert_eq!(alone, shared[b * 32..][..32], "block {b}");
    }
    let mut block = values(32, 3);
    block[5] = f32::NAN;
    let mut out = [1i8; 32];
    let max = super::quantize_blocks(&block, 32, &mut out);
    assert!(max[0].is_nan());
    assert_eq!(out, [0i8; 32]);
}

/// The AVX2 quantizer gives the plain loop's bytes and maxima bit for bit,
/// for Q8_0's blocks of 32 and Q8_K's of 256, at values that round
/// exactly half way, zeros, tiny and huge values, NaNs and infinities.
#[test]
fn avx2_quantizing_is_the_plain_loop() {
    if super::features::x86() == super::features::X86::None {
        return;
    }
    let mut x = values(64 * 256, 5);
    for (i, v) in x.iter_mut().enumerate() {
        // Scales of many sizes, so that blocks' maxima differ.
        *v *= [1.0, 1e-3, 1e3, 1e-30, 3e37][i / 256 % 5];
    }
    // A block of halves: 127 / 127 scales 126.5 to itself, which rounds
    // away from zero.
    for (i, v) in x[..32].iter_mut().enumerate() {
        *v = [127.0, 126.5, -126.5, 0.5, -0.5, 1.5, -2.5, 0.0][i % 8];
    }
    x[32..64].fill(0.0);
    x[64..96].fill(-0.0);
    x[100] = f32::NAN;
    x[140] = f32::INFINITY;
    x[170] = f32::NEG_INFINITY;
    x[300] = f32::MIN_POSITIVE / 4.0;
    for block in [32, 256] {
        let (mut fast, mut plain) = (vec![1i8; x.len()], vec![2i8; x.len()]);
        let (mut fast_max, mut plain_max) =
            (vec![0f32; x.len() / block], vec![1f32; x.len() / block]);
        // SAFETY: the CPU has AVX2, checked above.
        unsafe { super::quantize_blocks_avx2(&x, block, &mut fast, &mut fast_max) };
        super::quantize_blocks_with(&x, block, &mut plain, &mut plain_max);
        let differ = fast.iter().zip(&plain).position(|(a, b)| a != b);
        assert_eq!(differ, None, "blocks of {block}: first byte that differs");
        let bits = |m: &[f32]| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast_max), bits(&plain_max), "blocks of {block}");
    }
    assert_eq!(&x[..8], &[127.0, 126.5, -126.5, 0.5, -0.5, 1.5, -2.5, 0.0]);
}

/// While a prompt runs, the repacking thread waits (after the group at
/// hand), so that the prompt has every core; it goes on when the prompt
/// ends.
#[test]
fn repacking_waits_while_a_prompt_runs() {
    let dtype = GgmlDType::Q4K;
    if !mapped::repacks(dtype) {
        return; // This CPU keeps the file's layout: nothing is repacked.
    }
    let (_dir, matrix, _, _) = mapped_matrix(dtype, 300, 512);
    let prompt = PromptRunning::start();
    let later = matrix.for_products();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!is_packed(later.source()), "repacked during the prompt");
    drop(prompt);
    wait_for_repacking(&later);
}

/// A mapped Q8_0, Q5_0 or k-quant matrix, repacked for products, gives
/// the file layout's sums bit for bit for a step, for every row alone,
/// and for a prompt in chunks; its row lookups still read the file. 300
/// weight rows are 16-row groups and a part of one, split into several
/// tasks.
#[test]
fn a_repacked_matrix_sums_as_the_file_does() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
        check_repacked(dtype, 576);
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        check_repacked(dtype, 512);
    }
}

/// A `features × inputs` matrix of `dtype` written after 64 bytes of a
/// file, then mapped: the folder, the mapped matrix, the file's blocks and
/// the weights as they dequantize.
fn mapped_matrix(
    dtype: GgmlDType,
    features: usize,
    inputs: usize,
) -> (tempfile::TempDir, Mapped, Vec<u8>, Vec<f32>) {
    let w = values(features * inputs, 11);
    let (words, len, dequantized) = quantized(&w, features, inputs, dtype);
    let blocks = as_bytes(&words, len).to_vec();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.gguf");
    let mut bytes = vec![0u8; 64];
    bytes.extend_from_slice(&blocks);
    std::fs::write(&path, &bytes).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let matrix = file.matrix(64, dtype, features, inputs).unwrap();
    (dir, matrix, blocks, dequantized)
}

fn is_packed(source: Source) -> bool {
    matches!(source, Source::Packed(_) | Source::PackedK(_))
}

/// Waits for the thread that repacks after a load to get to `matrix`.
fn wait_for_repacking(matrix: &Mapped) {
    let waited = std::time::Instant::now();
    while !is_packed(matrix.source()) {
        assert!(waited.elapsed().as_secs() < 60, "never repacked");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn check_repacked(dtype: GgmlDType, inputs: usize) {
    let features = 300;
    let (_dir, matrix, blocks, dequantized) = mapped_matrix(dtype, features, inputs);
    let blocks = blocks.as_slice();
    let repacks = mapped::repacks(dtype);
    if repacks {
        wait_for_repacking(&matrix.clone().for_products());
    }
    let repacked = matrix.clone().for_products();
    repacked.repack_now();
    assert_eq!(is_packed(repacked.source()), repacks);
    let file_part = Part {
        source: Source::Quant(dtype, blocks),
        features,
    };
    for rows in [1, 3, 8, 16, 40] {
        let x = values(rows * inputs, 12 + rows as u64);
        let want = matrix.forward(&x, rows).unwrap();
        let got = repacked.forward(&x, rows).unwrap();
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{dtype:?}, {rows} rows");
        if rows <= MAX_ROWS {
            let plain = few_rows(&[file_part], &x, rows, inputs).pop().unwrap();
            assert_eq!(bits(&got), bits(&plain), "{dtype:?}, {rows} rows, unmapped");
            assert_alone_equals_batched(&[repacked.part()], &x, rows, inputs);
        }
    }
    let mut row = vec![0f32; inputs];
    repacked.row(299, &mut row);
    assert_eq!(row, dequantized[299 * inputs..]);
}
