//! The VAE every image family shares (diffusers `AutoencoderKL`): pictures
//! to scaled latents for img2img, and latents back to pixels, with the
//! config's `scaling_factor` and `shift_factor`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub mod decoder;
pub mod encoder;

use self::decoder::VaeDecoder;
use self::encoder::VaeEncoder;
// The parts these files read, under the names they use.
use super::config::{self, VaeJson};
use super::noise::StepNoise;
use super::request::InitImage;
use super::{attention, conv, go_on, resnet, scores_bytes, ImageError, OnEvent, RunEvent};

pub struct Vae {
    decoder: VaeDecoder,
    encoder: VaeEncoder,
    pub(crate) scaling: f64,
    shift: f64,
    /// Image pixels per latent pixel along each side.
    pub scale_factor: usize,
    pub latent_channels: usize,
    pub dtype: DType,
}

impl Vae {
    /// The encoder and decoder from `vb`, whose dtype they run in.
    pub fn new(vb: VarBuilder, json: &VaeJson) -> Result<Self, ImageError> {
        json.to_candle()?;
        Ok(Vae {
            encoder: VaeEncoder::new(vb.clone(), json)?,
            decoder: VaeDecoder::new(vb.clone(), json)?,
            scaling: json.scaling_factor,
            shift: json.shift_factor.unwrap_or(0.0),
            scale_factor: json.scale_factor(),
            latent_channels: json.latent_channels,
            dtype: vb.dtype(),
        })
    }

    /// `(count, channels, h, w)` latents of `image` as the denoiser sees
    /// them: its posterior sampled with `noise` for each of `count`
    /// pictures, shifted and scaled (diffusers' `retrieve_latents`, sample
    /// mode).
    pub fn encode(
        &self,
        image: &InitImage,
        count: usize,
        noise: &mut dyn StepNoise,
        device: &Device,
    ) -> Result<Tensor, ImageError> {
        let (w, h) = (image.width as usize, image.height as usize);
        let pixels = Tensor::from_vec(image.rgb.clone(), (1, h, w, 3), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .to_dtype(DType::F32)?;
        let pixels = ((pixels / 127.5)? - 1.0)?
            .to_device(device)?
            .to_dtype(self.dtype)?;
        let posterior = self.encoder.encode(&pixels)?;
        let mean = posterior.mean.repeat((count, 1, 1, 1))?;
        let std = posterior.std.repeat((count, 1, 1, 1))?;
        let sample = (&mean + (std * noise.noise(&mean)?)?)?;
        Ok(((sample - self.shift)? * self.scaling)?)
    }

    /// Latents → `(count, height, width, 3)` f32 pixels in [0, 1];
    /// `on_event` hears of every picture decoded.
    pub fn decode(&self, latents: &Tensor, on_event: OnEvent<'_>) -> Result<Tensor, ImageError> {
        let scaled = ((latents / self.scaling)? + self.shift)?.to_dtype(self.dtype)?;
        let pictures = scaled.dim(0)?;
        // One picture at a time: off the CPU the VAE's attention allocates
        // a score matrix over every latent position, per picture.
        let mut decoded = Vec::with_capacity(pictures);
        for i in 0..pictures {
            decoded.push(self.decoder.decode(&scaled.narrow(0, i, 1)?)?);
            let picture = i + 1;
            go_on(on_event(RunEvent::Decoded { picture, pictures }))?;
        }
        let decoded = Tensor::cat(&decoded, 0)?.to_dtype(DType::F32)?;
        let pixels = ((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(pixels.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// The VAE's attention scores and probabilities over every latent
    /// position of one `height × width` picture, in bytes.
    pub fn scores_bytes(&self, height: usize, width: usize) -> u64 {
        let tokens = (height / self.scale_factor) * (width / self.scale_factor);
        let bytes = self.dtype.size_in_bytes().max(DType::F32.size_in_bytes());
        scores_bytes(1, tokens, bytes)
    }
}
