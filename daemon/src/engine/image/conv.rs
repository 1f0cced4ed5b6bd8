//! 3x3 convolutions, stride 1 and padding 1 (the UNet's resnets and
//! upsamplers), on the CPU as one matrix product per tile of output rows
//! over an im2col buffer filled with whole shifted input rows. candle's
//! CPU convolution gathers that buffer one element at a time, which took a
//! quarter of an SD1.5-shaped step; the buffer here is kept by the calling
//! thread between calls, so it is not faulted in again each time. Other
//! devices, dtypes and shapes use candle's convolution.

use std::cell::RefCell;

use crate::engine::interrupt;
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};
use rayon::prelude::*;

/// im2col floats per tile, about 8 MiB.
const TILE_FLOATS: usize = 2 << 20;

thread_local! {
    /// The im2col tile, kept between calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A 3x3 convolution with stride 1 and padding 1.
pub struct Conv3x3 {
    conv: Conv2d,
}

impl Conv3x3 {
    pub fn new(vb: VarBuilder, from: usize, to: usize) -> Result<Self> {
        let config = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Conv3x3 {
            conv: conv2d(from, to, 3, config, vb)?,
        })
    }
}

impl Module for Conv3x3 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = self.conv.weight();
        let on_cpu_f32 = matches!(xs.device(), Device::Cpu)
            && xs.dtype() == DType::F32
            && weight.dtype() == DType::F32;
        if !on_cpu_f32 {
            return self.conv.forward(xs);
        }
        let out = cpu_conv3x3(&xs.contiguous()?, &weight.contiguous()?)?;
        match self.conv.bias() {
            Some(bias) => out.broadcast_add(&bias.reshape((1, (), 1, 1))?),
            None => Ok(out),
        }
    }
}

/// The values of a contiguous f32 CPU tensor, borrowed for `f` (no copy).
pub(super) fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("with_f32: not a CPU tensor")
    };
    if !layout.is_contiguous() {
        candle_core::bail!("with_f32: not a contiguous tensor")
    }
    let values = cpu.as_slice::<f32>()?;
    f(&values[layout.start_offset()..][..t.elem_count()])
}

/// `(batch, in, h, w)` ⊛ `(out, in, 3, 3)` → `(batch, out, h, w)`.
fn cpu_conv3x3(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (batch, inputs, h, w) = xs.dims4()?;
    let outputs = weight.dim(0)?;
    let plane = Plane { h, w };
    let mut out = vec![0f32; batch * outputs * h * w];
    with_f32(xs, |x| {
        with_f32(weight, |weight| {
            for (image, out) in out.chunks_exact_mut(outputs * h * w).enumerate() {
                let x = &x[image * inputs * h * w..][..inputs * h * w];
                convolve(x, weight, out, plane, (inputs, outputs));
            }
            Ok(())
        })
    })?;
    // A stop skips the tiles left; what they would have held is dropped.
    interrupt::check()?;
    Tensor::from_vec(out, (batch, outputs, h, w), &Device::Cpu)
}

/// The size of one channel's plane.
#[derive(Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
}

/// One picture: tiles of whole output rows, each an im2col fill then one
/// product `weight (out × in·9) · columns (in·9 × tile)` into `out`.
fn convolve(
    x: &[f32],
    weight: &[f32],
    out: &mut [f32],
    plane: Plane,
    (inputs, outputs): (usize, usize),
) {
    let Plane { h, w } = plane;
    let depth = inputs * 9;
    let rows_per_tile = (TILE_FLOATS / (depth * w)).clamp(1, h);
    COLUMNS.with(|columns| {
        let mut columns = columns.borrow_mut();
        for first in (0..h).step_by(rows_per_tile) {
            if interrupt::requested() {
                return;
            }
            let rows = rows_per_tile.min(h - first);
            let pixels = rows * w;
            columns.resize(depth * pixels, 0.0);
            let columns = &mut columns[..depth * pixels];
            fill_columns(x, columns, plane, first..first + rows);
            // SAFETY: `weight` is outputs × depth, `columns` depth × pixels
            // and the destination the `pixels` columns of `out`'s
            // outputs × h·w starting at the tile's first pixel, all
            // row-major and in bounds; `dst` is written only.
            unsafe {
                gemm::gemm(
                    outputs,
                    pixels,
                    depth,
                    out[first * w..].as_mut_ptr(),
                    1,
                    (h * w) as isize,
                    false,
                    weight.as_ptr(),
                    1,
                    depth as isize,
                    columns.as_ptr(),
                    1,
                    pixels as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
    });
}

/// The im2col rows of output rows `rows`: row `(c·3 + kh)·3 + kw` holds, for
/// every output pixel, input `c` at the pixel moved by `(kh − 1, kw − 1)`,
/// zero outside the picture. Whole input rows are copied at a time.
fn fill_columns(x: &[f32], columns: &mut [f32], plane: Plane, rows: std::ops::Range<usize>) {
    let Plane { h, w } = plane;
    let pixels = rows.len() * w;
    columns
        .par_chunks_mut(9 * pixels)
        .enumerate()
        .for_each(|(c, columns)| {
            let input = &x[c * h * w..][..h * w];
            for (k, column) in columns.chunks_exact_mut(pixels).enumerate() {
                let (dy, dx) = (k / 3, k % 3);
                for (y, out_row) in rows.clone().zip(column.chunks_exact_mut(w)) {
                    shifted_row(input, out_row, plane, (y + dy, dx));
                }
            }
        });
}

/// `out_row[x] = input[y − 1][x + dx − 1]` for the padded row `y` (so
/// `y = 0` and `y = h + 1` are the zero padding), zero outside.
fn shifted_row(input: &[f32], out_row: &mut [f32], plane: Plane, (y, dx): (usize, usize)) {
    let Plane { h, w } = plane;
    if y == 0 || y > h {
        out_row.fill(0.0);
        return;
    }
    let row = &input[(y - 1) * w..][..w];
    match dx {
        0 => {
            out_row[0] = 0.0;
            out_row[1..].copy_from_slice(&row[..w - 1]);
        }
        1 => out_row.copy_from_slice(row),
        _ => {
            out_row[..w - 1].copy_from_slice(&row[1..]);
            out_row[w - 1] = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::image::test_support::max_abs_diff;

    /// Odd sizes, a one-pixel-wide picture and several tiles against
    /// candle's convolution.
    #[test]
    fn matches_candles_convolution() {
        let device = Device::Cpu;
        for (batch, inputs, outputs, h, w) in
            [(2, 3, 5, 7, 9), (1, 4, 2, 1, 1), (1, 2, 3, 300, 4000)]
        {
            let xs = Tensor::randn(0f32, 1.0, (batch, inputs, h, w), &device).expect("xs");
            let weight = Tensor::randn(0f32, 1.0, (outputs, inputs, 3, 3), &device).expect("w");
            let ours = cpu_conv3x3(&xs, &weight).expect("ours");
            let theirs = xs.conv2d(&weight, 1, 1, 1, 1).expect("candle");
            let diff = max_abs_diff(&ours, &theirs);
            assert!(diff < 1e-4, "{batch}x{inputs}x{h}x{w}: {diff}");
        }
    }
}
