//! The task that owns one loaded model: a dedicated thread, fed generation
//! jobs through a channel, so the model and its KV cache are never shared
//! and blocking compute never stalls the async runtime.

use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device};
use modeld_wire::types::{FinishReason, GenerateEvent};
use tokenizers::Tokenizer;

use super::cancel::Cancellation;
use super::model::TextModel;
use super::sampling::{Input, Sampler, ValidGenerate};
use super::EngineError;

/// One generation: the request, where its events go, and a way to stop it.
pub struct Job {
    pub request: ValidGenerate,
    pub events: tokio::sync::mpsc::Sender<GenerateEvent>,
    pub cancel: Cancellation,
}

pub struct Worker {
    pub model: TextModel,
    pub tokenizer: Tokenizer,
    pub device: Device,
    pub dtype: DType,
    pub eos_ids: Vec<u32>,
    pub context_length: usize,
    pub chat_template: Option<super::chat::ChatTemplate>,
}

impl Worker {
    /// Runs jobs in order until every sender is gone; the model is dropped,
    /// and its memory freed, when this returns.
    pub fn run(mut self, jobs: mpsc::Receiver<Job>) {
        for job in jobs {
            let events = job.events.clone();
            let outcome = self.generate(&job);
            let last = outcome.unwrap_or_else(crate::engine::error_event);
            let _ = events.blocking_send(last);
        }
    }

    fn prompt_ids(&self, input: &Input) -> Result<Vec<u32>, EngineError> {
        let text = match input {
            Input::Prompt(prompt) => prompt.clone(),
            Input::Messages(messages) => self
                .chat_template
                .as_ref()
                .ok_or(EngineError::NoChatTemplate)?
                .render(messages)?,
        };
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let ids = encoding.get_ids().to_vec();
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        Ok(ids)
    }

    fn generate(&mut self, job: &Job) -> Result<GenerateEvent, EngineError> {
        let request = &job.request;
        let prompt = self.prompt_ids(&request.input)?;
        if prompt.len() + request.max_tokens > self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt: prompt.len(),
                max_tokens: request.max_tokens,
                context: self.context_length,
            });
        }
        self.model.reset(self.dtype, &self.device)?;
        let mut sampler = Sampler::new(request);
        let mut decoder = self.tokenizer.decode_stream(true);
        let mut history = prompt.clone();
        let mut generated: Vec<u32> = Vec::new();
        let mut text = String::new();

        let started = Instant::now();
        let mut logits = self.model.forward(&prompt, 0, &self.device)?;
        let prefill = started.elapsed().as_secs_f64();
        let decode_started = Instant::now();
        let mut streamer = Streamer::new(&request.stop);
        let mut finish = FinishReason::Length;
        for index in 0..request.max_tokens {
            if job.cancel.is_requested() {
                finish = FinishReason::Cancelled;
                break;
            }
            let next = sampler.next(logits, &history)?;
            if self.eos_ids.contains(&next) {
                finish = FinishReason::Eos;
                break;
            }
            history.push(next);
            generated.push(next);
            let piece = decoder
                .step(next)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
                .unwrap_or_default();
            text.push_str(&piece);
            let stop_cut = stop_position(&text, &request.stop);
            if let Some(cut) = stop_cut {
                text.truncate(cut);
            }
            let events = streamer.push(&text, index, next, stop_cut.is_some());
            if events
                .into_iter()
                .any(|e| job.events.blocking_send(e).is_err())
            {
                finish = FinishReason::Cancelled;
                break;
            }
            if stop_cut.is_some() {
                finish = FinishReason::Stop;
                break;
            }
            if index + 1 == request.max_tokens {
                break;
            }
            logits = self
                .model
                .forward(&[next], history.len() - 1, &self.device)?;
        }
        if let Some(last) = streamer.finish(&text) {
            let _ = job.events.blocking_send(last);
        }
        let decode = decode_started.elapsed().as_secs_f64();
        Ok(GenerateEvent::Done {
            done: true,
            model: request.model.clone(),
            mode: None,
            seed: request.seed,
            text,
            prompt_tokens: prompt.len(),
            completion_tokens: generated.len(),
            token_ids: generated,
            prefill_tokens_per_s: rate(prompt.len(), prefill),
            decode_tokens_per_s: rate(history.len() - prompt.len(), decode),
            finish_reason: finish,
        })
    }
}

fn rate(tokens: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        tokens as f64 / seconds
    } else {
        0.0
    }
}

/// Releases generated text to the client. With stop strings, text that
/// could be the start of one is held back, and each token's event waits
/// for the next token, so a stop string is never streamed and the pieces
/// always add up to the final text. Without stop strings, every token goes
/// out at once.
struct Streamer<'a> {
    stops: &'a [String],
    /// Bytes of the text already sent.
    released: usize,
    /// The token whose event is waiting for the next one.
    pending: Option<(usize, u32)>,
}

impl<'a> Streamer<'a> {
    fn new(stops: &'a [String]) -> Self {
        Streamer {
            stops,
            released: 0,
            pending: None,
        }
    }

    fn piece(&mut self, text: &str, end: usize) -> String {
        let start = self.released.min(end);
        self.released = end.max(self.released);
        text[start..end].to_string()
    }

    /// `text` has grown by token `id`; `stopped` when a stop string was
    /// found and `text` already cut before it. Returns the events due now.
    fn push(&mut self, text: &str, index: usize, id: u32, stopped: bool) -> Vec<GenerateEvent> {
        if self.stops.is_empty() {
            let text = self.piece(text, text.len());
            return vec![GenerateEvent::Token { index, id, text }];
        }
        let mut events = Vec::new();
        let end = if stopped {
            text.len()
        } else {
            text.len() - held_suffix(text, self.stops)
        };
        if let Some((index, id)) = self.pending.take() {
            let text = self.piece(text, end);
            events.push(GenerateEvent::Token { index, id, text });
        }
        if stopped {
            events.push(GenerateEvent::Token {
                index,
                id,
                text: String::new(),
            });
        } else {
            self.pending = Some((index, id));
        }
        events
    }

    /// The waiting token's event, with all the text not yet sent.
    fn finish(&mut self, text: &str) -> Option<GenerateEvent> {
        let (index, id) = self.pending.take()?;
        let text = self.piece(text, text.len());
        Some(GenerateEvent::Token { index, id, text })
    }
}

/// How many bytes at the end of `text` could begin a stop string.
fn held_suffix(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|stop| {
            (1..stop.len())
                .filter(|&k| stop.is_char_boundary(k))
                .map(move |k| &stop[..k])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// Where the earliest stop string starts in `text`, if any appears.
fn stop_position(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_pieces_never_hold_a_stop_string_and_add_up() {
        let stops = vec!["END".to_string()];
        let tokens = ["a", "bE", "N", "x", "E", "ND", "tail"];
        let mut streamer = Streamer::new(&stops);
        let mut text = String::new();
        let mut streamed = String::new();
        for (index, token) in tokens.iter().enumerate() {
            text.push_str(token);
            let cut = stop_position(&text, &stops);
            if let Some(cut) = cut {
                text.truncate(cut);
            }
            for event in streamer.push(&text, index, index as u32, cut.is_some()) {
                let GenerateEvent::Token { text, .. } = event else {
                    panic!()
                };
                assert!(!text.contains('D'), "a stop string leaked: {text:?}");
                streamed.push_str(&text);
            }
            if cut.is_some() {
                break;
            }
        }
        if let Some(GenerateEvent::Token { text, .. }) = streamer.finish(&text) {
            streamed.push_str(&text);
        }
        assert_eq!(text, "abENx");
        assert_eq!(streamed, text);
        assert_eq!(held_suffix("abcEN", &stops), 2);
        assert_eq!(held_suffix("abc", &stops), 0);
    }

    #[test]
    fn earliest_stop_string_wins() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(stop_position("a\n\nb END", &stops), Some(1));
        assert_eq!(stop_position("no stop here", &stops), None);
    }
}
