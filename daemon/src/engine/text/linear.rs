//! Linear layers over dense or quantized weights, and RMS norms.
//!
//! On the CPU a decode step's few-row products go to [`super::cpu`] when
//! the weights are f32 or GGML-quantized (gemm would run one row on one
//! core, and pack all the weights for more), or are split by output rows
//! across rayon's threads in other dtypes. Either way each thread reads its
//! own slice of the weights, which is what a decode step is bound by.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use rayon::prelude::*;

use super::cpu::{self, Mapped, Part, Source};

/// Products with at most this many rows are split by output rows on the
/// CPU; larger ones are left to gemm, which parallelizes them itself.
const SPLIT_MAX_ROWS: usize = cpu::MAX_ROWS;

/// The fewest output rows worth a thread of their own.
const MIN_ROWS_PER_PART: usize = 64;

pub enum Weight {
    /// `[out, in]`, in the model's dtype.
    Dense(Tensor),
    Quantized(QMatMul),
    /// `[out, in]` where it lies in the mapped model file (CPU only).
    Mapped(Mapped),
}

pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    pub fn mapped(weight: Mapped, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Mapped(weight.for_products()),
            bias,
        }
    }

    /// Quantized weights stay quantized; f32/f16/bf16 ones become dense in
    /// `dtype`, so they take the split path too.
    pub fn quantized(weight: QTensor, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let weight = match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let device = weight.device();
                Weight::Dense(weight.dequantize(&device)?.to_dtype(dtype)?)
            }
            _ => Weight::Quantized(QMatMul::from_qtensor(weight)?),
        };
        Ok(Linear { weight, bias })
    }

    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => dense_forward(x, w)?,
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Mapped(w) => mapped_forward(x, w)?,
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn in_place(&self) -> Option<&Mapped> {
        match &self.weight {
            Weight::Mapped(w) => Some(w),
            _ => None,
        }
    }
}

/// Linear layers that read the same input (a layer's q/k/v projections,
/// its MLP's gate and up), run as one product when all are dense: the
/// input is read once and the work dispatched once.
pub enum Fused {
    One { linear: Linear, sizes: Vec<usize> },
    Each(Vec<Linear>),
}

impl Fused {
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let dense: Option<Vec<(&Tensor, Option<&Tensor>)>> = parts
            .iter()
            .map(|part| match &part.weight {
                Weight::Dense(w) => Some((w, part.bias.as_ref())),
                Weight::Quantized(_) | Weight::Mapped(_) => None,
            })
            .collect();
        let Some(dense) = dense else {
            return Ok(Fused::Each(parts));
        };
        let sizes = dense
            .iter()
            .map(|(w, _)| w.dim(0))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = dense.iter().map(|(w, _)| *w).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if dense.iter().any(|(_, b)| b.is_some()) {
            let biases = dense
                .iter()
                .zip(&sizes)
                .map(|((w, b), size)| match b {
                    Some(b) => Ok((*b).clone()),
                    None => Tensor::zeros(*size, w.dtype(), w.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Fused::One {
            linear: Linear::dense(weight, bias),
            sizes,
        })
    }

    /// A layer stored fused (Phi-3's `qkv_proj`, `gate_up_proj`), whose
    /// output splits into parts of `sizes` features.
    pub fn split(linear: Linear, sizes: Vec<usize>) -> Self {
        Fused::One { linear, sizes }
    }

    /// Each layer's output, in the order given to [`Fused::new`].
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Fused::Each(parts) => match mapped_together(parts, x)? {
                Some(outputs) => Ok(outputs),
                None => parts.iter().map(|p| p.forward(x)).collect(),
            },
            Fused::One { linear, sizes } => {
                let y = linear.forward(x)?;
                let mut offset = 0;
                sizes
                    .iter()
                    .map(|size| {
                        let part = y.narrow(candle_core::D::Minus1, offset, *size);
                        offset += size;
                        part
                    })
                    .collect()
            }
        }
    }
}

fn dense_forward(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (inputs, rows) = (dims[dims.len() - 1], x.elem_count() / dims[dims.len() - 1]);
    let x2 = x.reshape((rows, inputs))?;
    let y = if splits_by_rows(x, rows) {
        match few_rows_f32(&x2, w)? {
            Some(y) => y,
            None => split_matmul(&x2, w)?,
        }
    } else {
        match prompt_f32(&x2, w)? {
            Some(y) => y,
            None => x2.matmul(&w.t()?)?,
        }
    };
    y.reshape(with_width(x, w.dim(0)?))
}

fn splits_by_rows(x: &Tensor, rows: usize) -> bool {
    matches!(x.device(), Device::Cpu) && rows <= SPLIT_MAX_ROWS
}

/// `x · wᵀ` by [`cpu::few_rows`] when both are f32 in memory; `None` for
/// other dtypes.
fn few_rows_f32(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    on_f32(x, w, |xs, ws, (rows, features, inputs)| {
        let part = Part {
            source: Source::F32(ws),
            features,
        };
        cpu::few_rows(&[part], xs, rows, inputs).pop()
    })
}

/// A prompt's `x · wᵀ` by [`cpu::prompt_f32`] when both are f32 in memory
/// and the CPU has the instructions; `None` otherwise.
fn prompt_f32(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    on_f32(x, w, |xs, ws, (rows, features, inputs)| {
        cpu::prompt_f32(xs, rows, ws, features, inputs)
    })
}

/// `product(x, w, (rows, features, inputs))` over `x` (`rows × inputs`)
/// and `w` (`features × inputs`) as f32 values in CPU memory, as a
/// `rows × features` tensor. `None` when either is elsewhere or of
/// another dtype, when their inputs differ (candle's product then reports
/// it), or when `product` declines.
fn on_f32(
    x: &Tensor,
    w: &Tensor,
    product: impl FnOnce(&[f32], &[f32], (usize, usize, usize)) -> Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) {
        return Ok(None);
    }
    let (rows, inputs) = x.dims2()?;
    let (features, w_inputs) = w.dims2()?;
    if w_inputs != inputs {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let shape = (rows, features, inputs);
    let out = cpu::with_contiguous_f32(&x, |xs| {
        cpu::with_contiguous_f32(w, |ws| product(xs, ws, shape))
    });
    match out.flatten().flatten() {
        Some(out) => Tensor::from_vec(out, (rows, features), &Device::Cpu).map(Some),
        None => Ok(None),
    }
}

/// `x` (`[.., in]`) as f32 rows: their count and values.
fn rows_of(x: &Tensor) -> Result<(usize, Vec<f32>)> {
    let inputs = x.dim(candle_core::D::Minus1)?;
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((values.len() / inputs.max(1), values))
}

/// `x`'s shape with its last dimension `features` wide.
fn with_width(x: &Tensor, features: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has at least one dimension") = features;
    dims
}

fn mapped_forward(x: &Tensor, w: &Mapped) -> Result<Tensor> {
    let (rows, values) = rows_of(x)?;
    let y = w.forward(&values, rows)?;
    Tensor::from_vec(y, with_width(x, w.features()), &Device::Cpu)?.to_dtype(x.dtype())
}

/// Every part's output in one dispatch of the CPU's threads, when all the
/// parts are mapped and `x` has few rows; `None` otherwise.
fn mapped_together(parts: &[Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let Some(mapped) = parts
        .iter()
        .map(Linear::in_place)
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let (rows, values) = rows_of(x)?;
    if rows > cpu::MAX_ROWS {
        return Ok(None);
    }
    let inputs = values.len() / rows.max(1);
    let sources: Vec<Part> = mapped.iter().map(|m| m.part()).collect();
    let outputs = cpu::few_rows(&sources, &values, rows, inputs);
    parts
        .iter()
        .zip(outputs)
        .zip(&mapped)
        .map(|((part, y), m)| {
            let y = Tensor::from_vec(y, with_width(x, m.features()), &Device::Cpu)?;
            part.add_bias(y.to_dtype(x.dtype())?)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `x · wᵀ` with `w`'s rows split into one part per thread.
fn split_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let out = w.dim(0)?;
    let parts = rayon::current_num_threads()
        .min(out / MIN_ROWS_PER_PART)
        .max(1);
    if parts == 1 {
        return x.matmul(&w.t()?);
    }
    let step = out.div_ceil(parts);
    let pieces: Vec<Tensor> = (0..parts)
        .into_par_iter()
        .map(|i| {
            let start = i * step;
            let len = step.min(out - start);
            x.matmul(&w.narrow(0, start, len)?.t()?)
        })
        .collect::<Result<_>>()?;
    Tensor::cat(&pieces, 1)
}

/// Root-mean-square layer norm over the last dimension.
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
    /// Gemma's flavour: normalize and scale in f32 (the weight stored as
    /// `1 + w`), then round to the input's dtype once, as transformers does.
    in_f32: bool,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
            in_f32: false,
        }
    }

    /// Gemma's norm, which scales by `1 + weight` computed in f32.
    pub fn plus_one(weight: &Tensor, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: (weight.to_dtype(DType::F32)? + 1.0)?,
            eps: eps as f32,
            in_f32: true,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.in_f32 {
            let y = candle_nn::ops::rms_norm(
                &x.to_dtype(DType::F32)?.contiguous()?,
                &self.weight,
                self.eps,
            )?;
            return y.to_dtype(x.dtype());
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_product_equals_the_plain_one() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 96), &device).unwrap();
        let w = Tensor::randn(0f32, 1.0, (1000, 96), &device).unwrap();
        let plain = x.matmul(&w.t().unwrap()).unwrap();
        let split = split_matmul(&x, &w).unwrap();
        let diff = (plain - split)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        let layer = Linear::dense(w, Some(Tensor::ones(1000, DType::F32, &device).unwrap()));
        let y = layer.forward(&x.unsqueeze(0).unwrap()).unwrap();
        assert_eq!(y.dims(), [1, 3, 1000]);
    }
}
