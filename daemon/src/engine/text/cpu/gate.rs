//! The MLP's gate on the CPU: `silu(gate) · up` in one pass that
//! vectorizes. Candle's SiLU called the library's `expf` once per value,
//! on the step's own thread while the others waited: a twentieth of an
//! 8-sequence decode step of the 135M shape.

use candle_core::{Device, Result, Tensor};

use super::with_contiguous_f32;
use crate::engine::math::silu;

/// `silu(gate) · up` elementwise, or `None` unless both are contiguous
/// f32 of one shape on the CPU.
pub fn silu_times(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if gate.dims() != up.dims() {
        return Ok(None);
    }
    let out = with_contiguous_f32(gate, |g| with_contiguous_f32(up, |u| gated(g, u)));
    match out.flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)),
        None => Ok(None),
    }
}

fn gated(gate: &[f32], up: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::features::x86() != super::features::X86::None {
        // SAFETY: the CPU has AVX2 and FMA, checked above.
        return unsafe { gated_avx2(gate, up) };
    }
    gated_with(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gated_avx2(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gated_with(gate, up)
}

/// A plain loop, inlined into [`gated_avx2`] so that it vectorizes there.
#[inline(always)]
fn gated_with(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * u;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against candle's SiLU times `up`, on views that start past their
    /// storage's beginning; other layouts are left to candle.
    #[test]
    fn matches_candle_and_declines_what_it_cannot_read() {
        let device = Device::Cpu;
        let both = Tensor::randn(0f32, 4.0, (3, 2, 37), &device).unwrap();
        let (gate, up) = (both.get(1).unwrap(), both.get(2).unwrap());
        let ours = silu_times(&gate, &up).unwrap().expect("contiguous f32");
        let theirs = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        let worst = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(worst < 1e-5, "off by {worst}");
        let strided = gate.t().unwrap();
        assert!(silu_times(&strided, &up.t().unwrap()).unwrap().is_none());
        let half = gate.to_dtype(candle_core::DType::F16).unwrap();
        assert!(silu_times(&half, &half).unwrap().is_none());
    }
}
