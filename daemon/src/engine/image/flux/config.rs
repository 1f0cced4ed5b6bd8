//! FLUX's `transformer/config.json` and `scheduler/scheduler_config.json`
//! (diffusers `FluxTransformer2DModel` and `FlowMatchEulerDiscreteScheduler`),
//! with diffusers' defaults; what the pipeline does not run is refused by
//! name.

use serde::Deserialize;

use crate::engine::image::ImageError;

fn unsupported(component: &str, what: impl std::fmt::Display) -> ImageError {
    ImageError::Unsupported(format!("{component}/config.json: {what}"))
}

/// `transformer/config.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FluxJson {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "sixty_four")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "nineteen")]
    pub num_layers: usize,
    #[serde(default = "thirty_eight")]
    pub num_single_layers: usize,
    #[serde(default = "one_twenty_eight")]
    pub attention_head_dim: usize,
    #[serde(default = "twenty_four")]
    pub num_attention_heads: usize,
    #[serde(default = "four_thousand_ninety_six")]
    pub joint_attention_dim: usize,
    #[serde(default = "seven_sixty_eight")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "flux_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn sixty_four() -> usize {
    64
}
fn nineteen() -> usize {
    19
}
fn thirty_eight() -> usize {
    38
}
fn one_twenty_eight() -> usize {
    128
}
fn twenty_four() -> usize {
    24
}
fn four_thousand_ninety_six() -> usize {
    4096
}
fn seven_sixty_eight() -> usize {
    768
}
fn flux_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxJson {
    /// The packed latent width the transformer returns.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Refuses shapes the pipeline cannot run: a patch size other than 1,
    /// rotary axes that do not fill a head, and transformers that take more
    /// than the packed latents (Fill and Depth models concatenate a mask
    /// or a control image) given the VAE's `latent_channels`.
    pub fn check(&self, latent_channels: usize) -> Result<(), ImageError> {
        if self.patch_size != 1 {
            return Err(unsupported(
                "transformer",
                format!("patch_size {} is not supported (1)", self.patch_size),
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.len() != 3
            || rope != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 == 1)
        {
            return Err(unsupported(
                "transformer",
                format!(
                    "axes_dims_rope {:?} must be three even sizes summing to attention_head_dim {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        let packed = 4 * latent_channels;
        if self.in_channels != packed {
            return Err(unsupported(
                "transformer",
                format!(
                    "in_channels {} is not 4 x the VAE's {latent_channels} latent channels: a FLUX Fill, Depth or Canny model, whose extra inputs are not supported",
                    self.in_channels
                ),
            ));
        }
        if self.out_channels() != packed {
            return Err(unsupported(
                "transformer",
                format!("out_channels {} is not {packed}", self.out_channels()),
            ));
        }
        Ok(())
    }
}

/// `scheduler/scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FlowMatchJson {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "one_f64")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "half")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_seq")]
    pub base_image_seq_len: usize,
    #[serde(default = "max_seq")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "exponential")]
    pub time_shift_type: String,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_flow_sigmas: bool,
}

fn thousand() -> usize {
    1000
}
fn one_f64() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_seq() -> usize {
    256
}
fn max_seq() -> usize {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

impl Default for FlowMatchJson {
    /// FLUX.1-dev's scheduler, for single files without a `scheduler/`.
    fn default() -> Self {
        FlowMatchJson {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            shift_terminal: None,
            time_shift_type: exponential(),
            invert_sigmas: false,
            stochastic_sampling: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
        }
    }
}

impl FlowMatchJson {
    /// FLUX.1-schnell's: a fixed shift of 1 (none).
    pub fn schnell() -> Self {
        FlowMatchJson {
            shift: 1.0,
            use_dynamic_shifting: false,
            ..Self::default()
        }
    }

    /// Refuses the options the flow-matching Euler sampler does not run.
    pub fn check(&self) -> Result<(), ImageError> {
        let refused = [
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        if let Some((name, _)) = refused.iter().find(|(_, set)| *set) {
            return Err(unsupported("scheduler", format!("{name} is not supported")));
        }
        if self.use_dynamic_shifting && self.time_shift_type != "exponential" {
            return Err(unsupported(
                "scheduler",
                format!(
                    "time_shift_type {:?} is not supported (exponential)",
                    self.time_shift_type
                ),
            ));
        }
        if self.max_image_seq_len <= self.base_image_seq_len {
            return Err(unsupported(
                "scheduler",
                "max_image_seq_len must be more than base_image_seq_len",
            ));
        }
        Ok(())
    }
}
