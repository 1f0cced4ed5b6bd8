//! diffusers' `FluxTransformer2DModel` under its own key names: the
//! time, guidance and pooled-text embeddings summed into one modulation
//! vector; double-stream blocks (image and text each with their own
//! weights, attending jointly) and single-stream blocks (one sequence,
//! attention and MLP side by side); 3-axis rotary positions. Weights
//! stored as fp8 stay fp8 and are cast to the compute dtype per layer.

use std::collections::HashSet;
use std::sync::Arc;

use crate::engine::interrupt;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::config::FluxJson;
use crate::engine::image::attention::attention;

/// What building a layer needs: the weights, and which of them are
/// stored as fp8 (kept so on the device).
#[derive(Clone)]
pub struct Build {
    pub vb: VarBuilder<'static>,
    pub fp8: Arc<HashSet<String>>,
}

impl Build {
    fn pp(&self, name: impl ToString) -> Build {
        Build {
            vb: self.vb.pp(name),
            fp8: self.fp8.clone(),
        }
    }
}

/// A linear layer whose weight may be stored in fp8, with an optional
/// per-layer scale (`scale_weight` or `weight_scale`), cast to the
/// input's dtype per call.
pub struct FluxLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: Option<f64>,
}

impl FluxLinear {
    fn new(b: &Build, input: usize, output: usize) -> Result<Self> {
        let name = format!("{}.weight", b.vb.prefix());
        let dtype = if b.fp8.contains(&name) {
            DType::F8E4M3
        } else {
            b.vb.dtype()
        };
        let weight = b.vb.get_with_hints_dtype(
            (output, input),
            "weight",
            candle_nn::Init::Const(0.),
            dtype,
        )?;
        let bias =
            b.vb.contains_tensor("bias")
                .then(|| b.vb.get(output, "bias"))
                .transpose()?;
        let scale = ["scale_weight", "weight_scale"]
            .into_iter()
            .find(|name| b.vb.contains_tensor(name))
            .map(|name| per_tensor_scale(&b.vb, name))
            .transpose()?;
        Ok(FluxLinear {
            weight,
            bias,
            scale: scale.map(f64::from),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut weight = widen(&self.weight, xs.dtype())?;
        if let Some(scale) = self.scale {
            weight = (weight * scale)?;
        }
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_dtype(xs.dtype()))
            .transpose()?;
        candle_nn::Linear::new(weight, bias).forward(xs)
    }
}

/// `weight` at `dtype` for a product. On the CPU an fp8 weight becomes
/// f32 through a table of its 256 values, spread over rayon's threads:
/// candle's cast computes every value on one thread, which made an fp8
/// FLUX step several times slower than a bf16 one there.
fn widen(weight: &Tensor, dtype: DType) -> Result<Tensor> {
    let fast = weight.dtype() == DType::F8E4M3 && dtype == DType::F32 && weight.device().is_cpu();
    if !fast {
        return weight.to_dtype(dtype);
    }
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("widen: not a CPU tensor")
    };
    let bytes = &cpu.as_slice::<float8::F8E4M3>()?[layout.start_offset()..][..weight.elem_count()];
    let table = fp8_table();
    let mut widened = vec![0f32; bytes.len()];
    widened
        .par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(1 << 16))
        .for_each(|(out, bytes)| {
            for (out, byte) in out.iter_mut().zip(bytes) {
                *out = table[usize::from(byte.to_bits())];
            }
        });
    Tensor::from_vec(widened, weight.dims(), &Device::Cpu)
}

/// Every fp8 e4m3 bit pattern's f32 value.
fn fp8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|bits| float8::F8E4M3::from_bits(bits as u8).to_f32()))
}

/// A weight's fp8 scale, which must be one number: a scale per output
/// row (some quantizers write `weight_scale` so) would otherwise be read
/// as its first row's and silently misapplied to all.
fn per_tensor_scale(vb: &VarBuilder, name: &str) -> Result<f32> {
    let scale = vb.get_unchecked_dtype(name, DType::F32)?;
    if scale.elem_count() != 1 {
        candle_core::bail!(
            "{}.{name} has shape {:?}: only per-tensor fp8 scales (one number) are supported",
            vb.prefix(),
            scale.dims()
        );
    }
    scale.flatten_all()?.get(0)?.to_scalar::<f32>()
}

fn linear(b: &Build, name: &str, input: usize, output: usize) -> Result<FluxLinear> {
    FluxLinear::new(&b.pp(name), input, output)
}

/// LayerNorm without affine parameters, eps 1e-6, as every FLUX norm.
fn plain_norm(xs: &Tensor) -> Result<Tensor> {
    let dim = xs.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, xs.dtype(), xs.device())?;
    let zeros = Tensor::zeros(dim, xs.dtype(), xs.device())?;
    candle_nn::ops::layer_norm(xs, &ones, &zeros, 1e-6)
}

/// `x · (1 + scale) + shift`, with `(batch, dim)` modulations.
fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    plain_norm(xs)?
        .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `xs + gate · update`, with a `(batch, dim)` gate.
fn gated(xs: &Tensor, gate: &Tensor, update: &Tensor) -> Result<Tensor> {
    xs + update.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection`.
struct MlpEmbedder {
    linear_1: FluxLinear,
    linear_2: FluxLinear,
}

impl MlpEmbedder {
    fn new(b: &Build, input: usize, dim: usize) -> Result<Self> {
        Ok(MlpEmbedder {
            linear_1: linear(b, "linear_1", input, dim)?,
            linear_2: linear(b, "linear_2", dim, dim)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// The `(count, chunks × dim)` modulation of a norm, split in `chunks`.
struct Modulation {
    linear: FluxLinear,
    chunks: usize,
}

impl Modulation {
    fn new(b: &Build, dim: usize, chunks: usize) -> Result<Self> {
        Ok(Modulation {
            linear: linear(b, "linear", dim, chunks * dim)?,
            chunks,
        })
    }

    fn forward(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        let out = self.linear.forward(&candle_nn::ops::silu(temb)?)?;
        out.chunk(self.chunks, 1)
    }
}

/// Per-head RMS norm of queries or keys, eps 1e-6.
struct HeadNorm(Tensor);

impl HeadNorm {
    fn new(b: &Build, name: &str, head_dim: usize) -> Result<Self> {
        Ok(HeadNorm(b.vb.pp(name).get(head_dim, "weight")?))
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.0.to_dtype(xs.dtype())?, 1e-6)
    }
}

/// One stream's q, k, v projections and their norms.
struct Qkv {
    q: FluxLinear,
    k: FluxLinear,
    v: FluxLinear,
    norm_q: HeadNorm,
    norm_k: HeadNorm,
}

/// The shapes every attention shares.
#[derive(Clone, Copy)]
struct Heads {
    count: usize,
    dim: usize,
}

impl Heads {
    fn width(&self) -> usize {
        self.count * self.dim
    }
}

impl Qkv {
    /// `names`: the q, k, v projections and the q, k norms.
    fn new(b: &Build, names: [&str; 5], dim: usize, heads: Heads) -> Result<Self> {
        let width = heads.width();
        Ok(Qkv {
            q: linear(b, names[0], dim, width)?,
            k: linear(b, names[1], dim, width)?,
            v: linear(b, names[2], dim, width)?,
            norm_q: HeadNorm::new(b, names[3], heads.dim)?,
            norm_k: HeadNorm::new(b, names[4], heads.dim)?,
        })
    }

    /// `(q, k, v)`, each `(batch, heads, seq, head_dim)`, q and k normed.
    fn project(&self, xs: &Tensor, heads: Heads) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, seq, _) = xs.dims3()?;
        let split = |t: Tensor| t.reshape((batch, seq, heads.count, heads.dim));
        let q = self.norm_q.forward(&split(self.q.forward(xs)?)?)?;
        let k = self.norm_k.forward(&split(self.k.forward(xs)?)?)?;
        let v = split(self.v.forward(xs)?)?;
        let heads_first = |t: Tensor| t.transpose(1, 2)?.contiguous();
        Ok((heads_first(q)?, heads_first(k)?, heads_first(v)?))
    }
}

/// The rotary embedding of every position, `(seq, head_dim)` cos and sin,
/// each frequency repeated for both members of its pair.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `ids`: per position, its coordinate on each axis (text: all 0;
    /// image: 0, row, column). In f64 like diffusers, then f32.
    pub fn new(ids: &[[f64; 3]], axes_dim: &[usize], theta: f64, device: &Device) -> Result<Self> {
        let head_dim: usize = axes_dim.iter().sum();
        let mut cos = Vec::with_capacity(ids.len() * head_dim);
        let mut sin = Vec::with_capacity(ids.len() * head_dim);
        for position in ids {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                for j in 0..dim / 2 {
                    let frequency = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = position[axis] * frequency;
                    cos.extend([angle.cos() as f32; 2]);
                    sin.extend([angle.sin() as f32; 2]);
                }
            }
        }
        let shape = (ids.len(), head_dim);
        Ok(Rope {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }

    /// `x · cos + rotate(x) · sin` in f32, where `rotate` maps each pair
    /// `(a, b)` to `(-b, a)`; `xs` is `(batch, heads, seq, head_dim)`.
    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let (batch, heads, seq, dim) = xs.dims4()?;
        let pairs = xs.reshape((batch, heads, seq, dim / 2, 2))?;
        let first = pairs.narrow(D::Minus1, 0, 1)?;
        let second = pairs.narrow(D::Minus1, 1, 1)?;
        let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?.reshape(xs.shape())?;
        let out = (xs.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?;
        out.to_dtype(dtype)
    }
}

/// Joint attention over `[text, image]` (or the single stream), rotary
/// positions applied to queries and keys; `(batch, seq, heads × dim)`.
fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let (batch, heads, seq, dim) = q.dims4()?;
    let (q, k) = (rope.apply(q)?, rope.apply(k)?);
    let dtype = v.dtype();
    let out = if q.device().is_cpu() {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        attention(&f32(&q)?, &f32(&k)?, &f32(v)?, 1.0 / (dim as f64).sqrt())?.to_dtype(dtype)?
    } else {
        attention(&q, &k, v, 1.0 / (dim as f64).sqrt())?
    };
    out.transpose(1, 2)?.reshape((batch, seq, heads * dim))
}

/// GELU (tanh) MLP: `net.0.proj`, `net.2`.
struct FeedForward {
    up: FluxLinear,
    down: FluxLinear,
}

impl FeedForward {
    fn new(b: &Build, dim: usize, hidden: usize) -> Result<Self> {
        Ok(FeedForward {
            up: linear(b, "net.0.proj", dim, hidden)?,
            down: linear(b, "net.2", hidden, dim)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.up.forward(xs)?.gelu()?)
    }
}

/// `FluxTransformerBlock`: image and text streams with their own weights,
/// one attention over both.
struct DoubleBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    image: Qkv,
    text: Qkv,
    to_out: FluxLinear,
    to_add_out: FluxLinear,
    ff: FeedForward,
    ff_context: FeedForward,
}

/// The two streams between blocks.
struct Streams {
    image: Tensor,
    text: Tensor,
}

impl DoubleBlock {
    fn new(b: &Build, dim: usize, heads: Heads) -> Result<Self> {
        let attn = b.pp("attn");
        Ok(DoubleBlock {
            norm1: Modulation::new(&b.pp("norm1"), dim, 6)?,
            norm1_context: Modulation::new(&b.pp("norm1_context"), dim, 6)?,
            image: Qkv::new(
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                heads,
            )?,
            text: Qkv::new(
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                dim,
                heads,
            )?,
            to_out: linear(&attn, "to_out.0", heads.width(), dim)?,
            to_add_out: linear(&attn, "to_add_out", heads.width(), dim)?,
            ff: FeedForward::new(&b.pp("ff"), dim, 4 * dim)?,
            ff_context: FeedForward::new(&b.pp("ff_context"), dim, 4 * dim)?,
        })
    }

    fn forward(
        &self,
        streams: Streams,
        temb: &Tensor,
        rope: &Rope,
        heads: Heads,
    ) -> Result<Streams> {
        let m = self.norm1.forward(temb)?;
        let c = self.norm1_context.forward(temb)?;
        let image_in = modulate(&streams.image, &m[0], &m[1])?;
        let text_in = modulate(&streams.text, &c[0], &c[1])?;
        let (iq, ik, iv) = self.image.project(&image_in, heads)?;
        let (tq, tk, tv) = self.text.project(&text_in, heads)?;
        let cat = |t: &Tensor, i: &Tensor| Tensor::cat(&[t, i], 2);
        let attended = joint_attention(&cat(&tq, &iq)?, &cat(&tk, &ik)?, &cat(&tv, &iv)?, rope)?;
        let text_len = streams.text.dim(1)?;
        // Narrowed along the sequence, each stream is contiguous only for
        // one picture.
        let text_attended = attended.narrow(1, 0, text_len)?.contiguous()?;
        let image_attended = attended
            .narrow(1, text_len, attended.dim(1)? - text_len)?
            .contiguous()?;

        let image = gated(
            &streams.image,
            &m[2],
            &self.to_out.forward(&image_attended)?,
        )?;
        let ff = self.ff.forward(&modulate(&image, &m[3], &m[4])?)?;
        let image = gated(&image, &m[5], &ff)?;

        let text = gated(
            &streams.text,
            &c[2],
            &self.to_add_out.forward(&text_attended)?,
        )?;
        let ff = self.ff_context.forward(&modulate(&text, &c[3], &c[4])?)?;
        let text = clamp_f16(gated(&text, &c[5], &ff)?)?;
        Ok(Streams { image, text })
    }
}

/// `FluxSingleTransformerBlock`: one stream, attention and a GELU MLP side
/// by side, projected back together.
struct SingleBlock {
    norm: Modulation,
    qkv: Qkv,
    proj_mlp: FluxLinear,
    proj_out: FluxLinear,
}

impl SingleBlock {
    fn new(b: &Build, dim: usize, heads: Heads) -> Result<Self> {
        let mlp = 4 * dim;
        Ok(SingleBlock {
            norm: Modulation::new(&b.pp("norm"), dim, 3)?,
            qkv: Qkv::new(
                &b.pp("attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                heads,
            )?,
            proj_mlp: linear(b, "proj_mlp", dim, mlp)?,
            proj_out: linear(b, "proj_out", heads.width() + mlp, dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, rope: &Rope, heads: Heads) -> Result<Tensor> {
        let m = self.norm.forward(temb)?;
        let normed = modulate(xs, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&normed)?.gelu()?;
        let (q, k, v) = self.qkv.project(&normed, heads)?;
        let attended = joint_attention(&q, &k, &v, rope)?;
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[&attended, &mlp], 2)?)?;
        clamp_f16(gated(xs, &m[2], &out)?)
    }
}

/// diffusers clips f16 activations to f16's range after each block.
fn clamp_f16(xs: Tensor) -> Result<Tensor> {
    if xs.dtype() != DType::F16 {
        return Ok(xs);
    }
    xs.clamp(-65504f64, 65504f64)
}

/// What one forward pass reads besides the weights.
pub struct FluxInputs<'a> {
    /// `(batch, image_tokens, in_channels)` packed latents.
    pub latents: &'a Tensor,
    /// `(batch, text_tokens, joint_attention_dim)`: T5's states.
    pub context: &'a Tensor,
    /// `(batch, pooled_projection_dim)`: CLIP's pooled output.
    pub pooled: &'a Tensor,
    /// The scheduler's timestep (sigma × 1000).
    pub timestep: f32,
    /// dev models: the distilled guidance scale.
    pub guidance: Option<f32>,
    pub rope: &'a Rope,
}

/// The whole transformer.
pub struct FluxTransformer {
    x_embedder: FluxLinear,
    context_embedder: FluxLinear,
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Modulation,
    proj_out: FluxLinear,
    heads: Heads,
}

/// The sinusoidal embedding width of timesteps and guidance.
const TIME_CHANNELS: usize = 256;

impl FluxTransformer {
    pub fn new(b: &Build, c: &FluxJson) -> Result<Self> {
        let heads = Heads {
            count: c.num_attention_heads,
            dim: c.attention_head_dim,
        };
        let dim = heads.width();
        let embed = b.pp("time_text_embed");
        Ok(FluxTransformer {
            x_embedder: linear(b, "x_embedder", c.in_channels, dim)?,
            context_embedder: linear(b, "context_embedder", c.joint_attention_dim, dim)?,
            timestep_embedder: MlpEmbedder::new(
                &embed.pp("timestep_embedder"),
                TIME_CHANNELS,
                dim,
            )?,
            guidance_embedder: c
                .guidance_embeds
                .then(|| MlpEmbedder::new(&embed.pp("guidance_embedder"), TIME_CHANNELS, dim))
                .transpose()?,
            text_embedder: MlpEmbedder::new(
                &embed.pp("text_embedder"),
                c.pooled_projection_dim,
                dim,
            )?,
            double: (0..c.num_layers)
                .map(|i| DoubleBlock::new(&b.pp("transformer_blocks").pp(i), dim, heads))
                .collect::<Result<_>>()?,
            single: (0..c.num_single_layers)
                .map(|i| SingleBlock::new(&b.pp("single_transformer_blocks").pp(i), dim, heads))
                .collect::<Result<_>>()?,
            norm_out: Modulation::new(&b.pp("norm_out"), dim, 2)?,
            proj_out: linear(b, "proj_out", dim, c.out_channels())?,
            heads,
        })
    }

    /// Whether the model was distilled with a guidance embedding (dev).
    pub fn takes_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// The velocity for `inputs.latents`, `(batch, image_tokens, out_channels)`.
    pub fn forward(&self, inputs: &FluxInputs) -> Result<Tensor> {
        let temb = self.conditioning(inputs)?;
        let mut streams = Streams {
            image: self.x_embedder.forward(inputs.latents)?,
            text: self.context_embedder.forward(inputs.context)?,
        };
        for block in &self.double {
            interrupt::check()?;
            streams = block.forward(streams, &temb, inputs.rope, self.heads)?;
        }
        let text_len = streams.text.dim(1)?;
        let mut xs = Tensor::cat(&[&streams.text, &streams.image], 1)?;
        for block in &self.single {
            interrupt::check()?;
            xs = block.forward(&xs, &temb, inputs.rope, self.heads)?;
        }
        let image = xs
            .narrow(1, text_len, xs.dim(1)? - text_len)?
            .contiguous()?;
        let m = self.norm_out.forward(&temb)?;
        // AdaLayerNormContinuous splits scale first, then shift.
        self.proj_out.forward(&modulate(&image, &m[1], &m[0])?)
    }

    /// `(batch, dim)`: timestep (+ guidance) + pooled text embeddings.
    fn conditioning(&self, inputs: &FluxInputs) -> Result<Tensor> {
        let batch = inputs.latents.dim(0)?;
        let (device, dtype) = (inputs.latents.device(), inputs.latents.dtype());
        // The pipeline divides by 1000 and the model multiplies back, in f32.
        let timestep = inputs.timestep / 1000.0 * 1000.0;
        let sinusoid = |value: f32| -> Result<Tensor> {
            sinusoidal_embedding(value, device)?
                .to_dtype(dtype)?
                .repeat((batch, 1))
        };
        let mut temb = self.timestep_embedder.forward(&sinusoid(timestep)?)?;
        if let (Some(embedder), Some(guidance)) = (&self.guidance_embedder, inputs.guidance) {
            temb = (temb + embedder.forward(&sinusoid(guidance * 1000.0)?)?)?;
        }
        temb + self
            .text_embedder
            .forward(&inputs.pooled.to_dtype(dtype)?)?
    }
}

/// diffusers' `get_timestep_embedding` with `flip_sin_to_cos`: cos then sin
/// of `value × 10000^(-i / half)`, in f32.
fn sinusoidal_embedding(value: f32, device: &Device) -> Result<Tensor> {
    let half = TIME_CHANNELS / 2;
    let log_period = -(10000f32.ln());
    let angles: Vec<f32> = (0..half)
        .map(|i| value * (log_period * i as f32 / half as f32).exp())
        .collect();
    let cos = angles.iter().map(|a| a.cos());
    let sin = angles.iter().map(|a| a.sin());
    let values: Vec<f32> = cos.chain(sin).collect();
    Tensor::from_vec(values, (1, TIME_CHANNELS), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_weights_widen_as_candle_casts_them() {
        // Every bit pattern, three times over and a few more, so the
        // parallel chunks and a ragged end are both exercised.
        let values: Vec<float8::F8E4M3> = (0..3 * 256 + 7)
            .map(|i| float8::F8E4M3::from_bits((i % 256) as u8))
            .collect();
        let weight = Tensor::from_vec(values, (775,), &Device::Cpu).expect("fp8 tensor");
        let ours = widen(&weight, DType::F32).expect("widened");
        let candle = weight.to_dtype(DType::F32).expect("cast");
        let (ours, candle) = (
            ours.to_vec1::<f32>().unwrap(),
            candle.to_vec1::<f32>().unwrap(),
        );
        for (a, b) in ours.iter().zip(&candle) {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{a} vs {b}");
        }
        let table = fp8_table();
        assert_eq!(table[0x38], 1.0, "0x38 is 1.0 in e4m3");
        assert!(table[0x7f].is_nan());
    }
}
