//! Generation requests validated into [`ValidGenerate`], and the sampler
//! that turns logits into the next token.

use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use modeld_wire::types::{ChatMessage, GenerateParams};
use serde_json::json;

use crate::validate::{valid_name, ValidationError};

pub const DEFAULT_MAX_TOKENS: usize = 256;
pub const MAX_MAX_TOKENS: usize = 32_768;
pub const MAX_PROMPT_BYTES: usize = 4 << 20;
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_LEN: usize = 256;
pub const MAX_MESSAGES: usize = 1024;

/// What the prompt is: raw text, or chat messages for the model's template.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    Messages(Vec<ChatMessage>),
}

/// A generation request whose every field is within its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate {
    pub model: String,
    pub input: Input,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub stop: Vec<String>,
}

fn out_of_range(field: &str, value: impl std::fmt::Display, limit: &str) -> ValidationError {
    ValidationError {
        field: field.to_string(),
        message: format!("{value} is out of range ({limit})"),
        limit: Some(json!(limit)),
    }
}

impl TryFrom<GenerateParams> for ValidGenerate {
    type Error = ValidationError;

    fn try_from(p: GenerateParams) -> Result<Self, Self::Error> {
        let model = valid_name(&p.model).map_err(|mut e| {
            e.field = "model".into();
            e
        })?;
        let input = match (p.prompt, p.messages) {
            (Some(prompt), None) if prompt.len() > MAX_PROMPT_BYTES => {
                return Err(out_of_range(
                    "prompt",
                    format!("{} bytes", prompt.len()),
                    "at most 4 MiB",
                ))
            }
            (Some(prompt), None) => Input::Prompt(prompt),
            (None, Some(messages)) if messages.is_empty() || messages.len() > MAX_MESSAGES => {
                return Err(out_of_range(
                    "messages",
                    messages.len(),
                    "1 to 1024 messages",
                ))
            }
            (None, Some(messages)) => Input::Messages(messages),
            _ => {
                return Err(ValidationError::new(
                    "prompt",
                    "give exactly one of prompt or messages",
                ))
            }
        };
        let max_tokens = p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if !(1..=MAX_MAX_TOKENS).contains(&max_tokens) {
            return Err(out_of_range("max_tokens", max_tokens, "1 to 32768"));
        }
        let temperature = p.temperature.unwrap_or(0.0);
        if !(0.0..=100.0).contains(&temperature) {
            return Err(out_of_range(
                "temperature",
                temperature,
                "0 to 100; 0 is greedy",
            ));
        }
        if let Some(top_p) = p.top_p {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(out_of_range("top_p", top_p, "greater than 0, at most 1"));
            }
        }
        if p.top_k == Some(0) {
            return Err(out_of_range("top_k", 0, "at least 1"));
        }
        let repeat_penalty = p.repeat_penalty.unwrap_or(1.0);
        if !(repeat_penalty > 0.0 && repeat_penalty <= 10.0) {
            return Err(out_of_range(
                "repeat_penalty",
                repeat_penalty,
                "greater than 0, at most 10; 1 is off",
            ));
        }
        let repeat_last_n = p.repeat_last_n.unwrap_or(64);
        if repeat_last_n > 4096 {
            return Err(out_of_range("repeat_last_n", repeat_last_n, "0 to 4096"));
        }
        let stop = p.stop.unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(out_of_range("stop", stop.len(), "at most 16 strings"));
        }
        if let Some(bad) = stop
            .iter()
            .position(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(out_of_range(
                &format!("stop[{bad}]"),
                stop[bad].len(),
                "1 to 256 bytes",
            ));
        }
        Ok(ValidGenerate {
            model,
            input,
            max_tokens,
            temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            seed: p.seed.unwrap_or_else(random_seed),
            repeat_penalty,
            repeat_last_n,
            stop,
        })
    }
}

pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Picks each next token: repeat penalty, then greedy or seeded sampling.
pub struct Sampler {
    processor: LogitsProcessor,
    greedy: bool,
    repeat_penalty: f32,
    repeat_last_n: usize,
}

impl Sampler {
    pub fn new(request: &ValidGenerate) -> Self {
        let temperature = request.temperature;
        let sampling = if temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match (request.top_k, request.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        Sampler {
            processor: LogitsProcessor::from_sampling(request.seed, sampling),
            greedy: temperature <= 0.0,
            repeat_penalty: request.repeat_penalty,
            repeat_last_n: request.repeat_last_n,
        }
    }

    /// Greedy with no penalty: the pick needs only the largest logit, so it
    /// can be made where the logits are, without copying them.
    pub fn is_plain_greedy(&self) -> bool {
        self.greedy && !self.penalizes()
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_last_n > 0
    }

    /// The next token from one row of logits, `[vocab]`; `history` holds
    /// the prompt and the tokens generated so far.
    pub fn next(&mut self, logits: &Tensor, history: &[u32]) -> candle_core::Result<u32> {
        if self.is_plain_greedy() {
            return logits.argmax(0)?.to_scalar::<u32>();
        }
        let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let logits = if !self.penalizes() {
            logits
        } else {
            let start = history.len().saturating_sub(self.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(
                &logits,
                self.repeat_penalty,
                &history[start..],
            )?
        };
        self.processor.sample(&logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerateParams {
        GenerateParams {
            model: "m".into(),
            prompt: Some("hi".into()),
            ..Default::default()
        }
    }

    fn field(p: GenerateParams) -> String {
        ValidGenerate::try_from(p).unwrap_err().field
    }

    #[test]
    fn defaults_are_greedy_and_bounded() {
        let v = ValidGenerate::try_from(params()).unwrap();
        assert_eq!(v.temperature, 0.0);
        assert_eq!(v.max_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn each_limit_names_its_field() {
        let mut p = params();
        p.max_tokens = Some(0);
        assert_eq!(field(p), "max_tokens");
        let mut p = params();
        p.temperature = Some(-1.0);
        assert_eq!(field(p), "temperature");
        let mut p = params();
        p.top_p = Some(1.5);
        assert_eq!(field(p), "top_p");
        let mut p = params();
        p.top_k = Some(0);
        assert_eq!(field(p), "top_k");
        let mut p = params();
        p.repeat_penalty = Some(0.0);
        assert_eq!(field(p), "repeat_penalty");
        let mut p = params();
        p.stop = Some(vec!["ok".into(), String::new()]);
        assert_eq!(field(p), "stop[1]");
        let mut p = params();
        p.messages = Some(vec![]);
        assert_eq!(field(p), "prompt");
        let mut p = params();
        p.model = "../x".into();
        assert_eq!(field(p), "model");
    }

    #[test]
    fn greedy_picks_the_largest_logit_and_penalty_applies() {
        let request = ValidGenerate::try_from(params()).unwrap();
        let mut sampler = Sampler::new(&request);
        assert!(sampler.is_plain_greedy());
        let logits = Tensor::new(&[0.1f32, 3.0, 2.0], &Device::Cpu).unwrap();
        assert_eq!(sampler.next(&logits, &[]).unwrap(), 1);
        let mut p = params();
        p.repeat_penalty = Some(10.0);
        let mut sampler = Sampler::new(&ValidGenerate::try_from(p).unwrap());
        assert!(!sampler.is_plain_greedy());
        assert_eq!(sampler.next(&logits, &[1]).unwrap(), 2);
    }
}
