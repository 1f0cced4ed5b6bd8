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
    last_token: Option<Instant>,
}

impl Timing {
    pub fn new(model: &str) -> Self {
        Timing {
            model: model.to_string(),
            started: Instant::now(),
            last_token: None,
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
                    None => metrics::first_token(&self.model, now - self.started),
                    Some(last) => {
                        metrics::next_token(&self.model, now - last);
                        rates.token(&self.model, (now - last).as_secs_f64());
                    }
                }
                self.last_token = Some(now);
            }
            GenerateEvent::Done {
                prompt_tokens,
                completion_tokens,
                ..
            } => metrics::text_done(&self.model, *prompt_tokens, *completion_tokens),
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
