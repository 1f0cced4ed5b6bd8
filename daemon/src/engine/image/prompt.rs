//! Prompt text → the fixed-length token ids the CLIP text encoder reads:
//! `[bos] + bpe(text) + [eos]`, truncated to the context length with the
//! end token kept, then right-padded with the pad token.

use std::path::Path;

use tokenizers::Tokenizer;

use super::ImageError;

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    length: usize,
    pad_id: u32,
    eos_id: u32,
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> ImageError {
    ImageError::Tokenizer(format!("{}: {e}", path.display()))
}

/// A special token named in `tokenizer_config.json` or
/// `special_tokens_map.json`: either a string or `{"content": ...}`.
fn special_token(dir: &Path, key: &str) -> Option<String> {
    ["tokenizer_config.json", "special_tokens_map.json"]
        .iter()
        .find_map(|file| {
            let text = std::fs::read_to_string(dir.join(file)).ok()?;
            let value: serde_json::Value = serde_json::from_str(&text).ok()?;
            let token = &value[key];
            token
                .as_str()
                .or_else(|| token["content"].as_str())
                .map(str::to_owned)
        })
}

impl PromptTokenizer {
    /// The tokenizer of folder `dir` (its `tokenizer.json`), producing
    /// `length` ids per text.
    pub fn load(dir: &Path, length: usize) -> Result<Self, ImageError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| tokenizer_error(&path, e))?;
        let id = |key: &str| {
            let token = special_token(dir, key).unwrap_or_else(|| "<|endoftext|>".into());
            tokenizer.token_to_id(&token).ok_or_else(|| {
                tokenizer_error(dir, format!("{key} {token:?} is not in the vocabulary"))
            })
        };
        let eos_id = id("eos_token")?;
        let pad_id = id("pad_token")?;
        Ok(PromptTokenizer {
            tokenizer,
            length,
            pad_id,
            eos_id,
        })
    }

    /// The ids of `text`, exactly `length` of them.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, ImageError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ImageError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > self.length {
            // Like transformers' truncation: the text is cut, the end token stays.
            ids.truncate(self.length - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.length, self.pad_id);
        Ok(ids)
    }
}
