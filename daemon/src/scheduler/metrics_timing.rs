//! A generation's figures for the metrics, taken from the events its
//! client is sent: time to the first token (from the job's start, its
//! model resident), the time between tokens, and the final counts.

use std::time::Instant;

use modeld_wire::types::GenerateEvent;

use super::eta::Rates;
use super::JobEvent;
use crate::metrics;

pub struct Timing {
    model: String,
    started: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    tokens: usize,
}

impl Timing {
    pub fn new(model: &str) -> Self {
        Timing {
            model: model.to_string(),
            started: Instant::now(),
            first_token: None,
            last_token: None,
            tokens: 0,
        }
    }

    /// Records `event`'s figures in the metrics, and the model's rates
    /// for queue ETAs.
    pub fn saw(&mut self, event: &JobEvent, rates: &Rates) {
        let Ok(event) = event else { return };
        match event {
            GenerateEvent::Token { .. } => {
                let now = Instant::now();
                match self.last_token {
                    None => {
                        metrics::first_token(&self.model, now - self.started);
                        self.first_token = Some(now);
                    }
                    Some(last) => metrics::next_token(&self.model, now - last),
                }
                self.last_token = Some(now);
                self.tokens += 1;
            }
            GenerateEvent::Done {
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                metrics::text_done(&self.model, *prompt_tokens, *completion_tokens);
                self.record_rate(rates);
            }
            GenerateEvent::Images(done) => {
                metrics::images_done(&self.model, done.images.len(), done.steps);
                let steps = done.steps * done.images.len();
                if steps > 0 {
                    rates.step(&self.model, done.generate_ms as f64 / 1000.0 / steps as f64);
                }
            }
            GenerateEvent::Progress { .. }
            | GenerateEvent::Queued { .. }
            | GenerateEvent::Error { .. } => {}
        }
    }
}

impl Timing {
    /// The generation's seconds per token, first token to last, as one
    /// sample of the model's rate. Token events reach here in bursts (a
    /// held-back stop string, a busy channel), so single gaps swing from
    /// nothing to several tokens' time; one average per generation does
    /// not, and later tokens cost more as the context grows, which the
    /// whole run counts.
    fn record_rate(&self, rates: &Rates) {
        if let (Some(first), Some(last), true) =
            (self.first_token, self.last_token, self.tokens > 1)
        {
            let seconds = (last - first).as_secs_f64() / (self.tokens - 1) as f64;
            rates.token(&self.model, seconds);
        }
    }
}
