//! Text encoders and their tokenizers, shared by the image families:
//! CLIP (SD's and FLUX's), OpenCLIP renamed into CLIP's layout (SDXL's
//! second encoder), and T5 (FLUX's).

pub mod clip;
pub mod open_clip;
pub mod prompt;
pub mod t5;

use std::path::Path;

use self::prompt::PromptTokenizer;
// The parts these files read, under the names they use.
use super::config::ClipJson;
use super::weights::{self, TensorMap};
use super::ImageError;

/// One text encoder's parts: config, tokenizer and weights.
#[derive(Clone)]
pub struct EncoderParts {
    pub clip_json: ClipJson,
    pub tokenizer: PromptTokenizer,
    pub weights: TensorMap,
}

impl EncoderParts {
    /// The encoder configured by `clip_json`, with the tokenizer in
    /// `tokenizer_dir`.
    pub fn new(
        clip_json: ClipJson,
        tokenizer_dir: &Path,
        weights: TensorMap,
    ) -> Result<Self, ImageError> {
        let length = clip_json.to_config()?.max_position_embeddings;
        Ok(EncoderParts {
            tokenizer: PromptTokenizer::load(tokenizer_dir, length)?,
            clip_json,
            weights,
        })
    }
}
