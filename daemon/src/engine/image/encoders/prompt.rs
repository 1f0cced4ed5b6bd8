//! Prompt text → the fixed-length token ids the CLIP text encoder reads:
//! `[bos] + bpe(text) + [eos]`, truncated to the context length with the
//! end token kept, then right-padded with the pad token.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use super::ImageError;

#[derive(Clone)]
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

/// CLIP's tokenizer built from the `vocab.json` and `merges.txt` that most
/// diffusers repos ship instead of a `tokenizer.json`: the same pipeline
/// transformers' converter writes (NFC, whitespace folded, lower case;
/// CLIP's split pattern, byte-level BPE with `</w>` word ends; start and end
/// tokens around the text).
fn clip_from_bpe_files(dir: &Path) -> Result<Tokenizer, ImageError> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text =
        std::fs::read_to_string(&vocab_path).map_err(|e| tokenizer_error(&vocab_path, e))?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&vocab_text).map_err(|e| tokenizer_error(&vocab_path, e))?;
    let merges: Vec<String> = std::fs::read_to_string(&merges_path)
        .map_err(|e| tokenizer_error(&merges_path, e))?
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let id = |token: &str| {
        vocab[token]
            .as_u64()
            .ok_or_else(|| tokenizer_error(&vocab_path, format!("{token:?} is missing")))
    };
    let (bos, eos) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let special = |id: u64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let split = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
    let definition = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(bos, "<|startoftext|>"), special(eos, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
                           "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                  "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                  "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    definition
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| tokenizer_error(dir, e))
}

impl PromptTokenizer {
    /// The tokenizer of folder `dir` (its `tokenizer.json`, else its
    /// `vocab.json` and `merges.txt`), producing `length` ids per text.
    pub fn load(dir: &Path, length: usize) -> Result<Self, ImageError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = if path.exists() {
            Tokenizer::from_file(&path).map_err(|e| tokenizer_error(&path, e))?
        } else {
            clip_from_bpe_files(dir)?
        };
        // transformers registers the configured pad token as a special
        // token, so when it is an ordinary entry (OpenCLIP's "!" in SDXL's
        // tokenizer_2) it is matched whole anywhere in the text and never
        // merged into a word: "hi!" gives "hi</w>" and the pad id.
        // A pad token outside the vocabulary stays unknown: it is refused
        // below rather than given an id past the embedding table.
        if let Some(pad) = special_token(dir, "pad_token") {
            if tokenizer.token_to_id(&pad).is_some() {
                tokenizer.add_special_tokens(&[AddedToken::from(pad, true)]);
            }
        }
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
        self.ids_of_length(text, self.length)
    }

    /// The ids of `text`, exactly `length` of them (T5's length is a
    /// request parameter).
    pub fn ids_of_length(&self, text: &str, length: usize) -> Result<Vec<u32>, ImageError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ImageError::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > length {
            // Like transformers' truncation: the text is cut, the end token stays.
            ids.truncate(length.saturating_sub(1));
            ids.push(self.eos_id);
        }
        ids.resize(length, self.pad_id);
        Ok(ids)
    }
}
