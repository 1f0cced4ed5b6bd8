//! The thread that owns one loaded model, fed generation jobs through a
//! channel, so the model and its caches are never shared and blocking
//! compute never stalls the async runtime.
//!
//! Jobs run batched: between decode steps, queued jobs join the batch (their
//! prompts prefilled one at a time) while it has room, and finished ones
//! leave it; each decode step then runs one token of every sequence in the
//! batch through the model together.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Instant;

use candle_core::Tensor;
use modeld_wire::types::{FinishReason, GenerateEvent};
use tokenizers::Tokenizer;

use super::cancel::Cancellation;
use super::decoder::{greedy, Decoder, KvCache};
use super::sampling::{Input, Sampler, ValidGenerate};
use super::EngineError;
use crate::engine::interrupt;
use crate::engine::WorkerEvent;

/// One generation: the request, where its events go, and a way to stop it.
pub struct Job {
    pub request: ValidGenerate,
    pub events: tokio::sync::mpsc::Sender<WorkerEvent>,
    pub cancel: Cancellation,
}

pub struct Worker {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub context_length: usize,
    pub chat_template: Option<super::chat::ChatTemplate>,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Positions of KV cache the batch may hold in all: what the memory
    /// budget counted for this model. A sequence alone may exceed it.
    pub kv_tokens: usize,
}

type Stream<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// A job waiting to join the batch, its prompt already tokenized.
struct Waiting {
    job: Job,
    prompt: Vec<u32>,
}

/// What a sequence does with its next token's logits.
enum Next {
    /// The id, already picked on the device by a batched argmax.
    Picked(u32),
    /// The logits row `[vocab]`, for the sampler.
    Logits(Tensor),
}

/// A generation in the batch.
struct Sequence<'t> {
    job: Job,
    cache: KvCache,
    sampler: Sampler,
    stream: Stream<'t>,
    streamer: Streamer,
    history: Vec<u32>,
    prompt_len: usize,
    text: String,
    next: Next,
    prefill_s: f64,
    decode_started: Instant,
}

/// Why a sequence left the batch.
enum Leave {
    Finished(FinishReason),
    Failed(EngineError),
}

impl Worker {
    /// Runs jobs until every sender is gone and the batch is empty; the
    /// model is dropped, and its memory freed, when this returns.
    pub fn run(self, jobs: mpsc::Receiver<Job>) {
        let Worker {
            model,
            tokenizer,
            eos_ids,
            context_length,
            chat_template,
            max_batch,
            kv_tokens,
        } = self;
        let mut batch = Batch {
            model,
            tokenizer: &tokenizer,
            eos_ids,
            context_length,
            chat_template,
            max_batch: max_batch.max(1),
            kv_tokens,
            waiting: VecDeque::new(),
            active: Vec::new(),
        };
        loop {
            if batch.is_idle() {
                match jobs.recv() {
                    Ok(job) => batch.receive(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                batch.receive(job);
            }
            batch.answer_cancelled_waiting();
            batch.admit();
            if !batch.step() {
                // Every sequence waits for its client to read: wait for
                // that, or for a new job, without spinning.
                match jobs.recv_timeout(HELD_POLL) {
                    Ok(job) => batch.receive(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(HELD_POLL),
                }
            }
        }
    }
}

/// How often a batch whose every sequence is held back looks again.
const HELD_POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// The most events one step of a sequence sends: two for its token (one
/// held back for stop strings, and the stop), then its last piece and
/// `done` when it leaves.
const EVENTS_PER_STEP: usize = 4;

struct Batch<'t> {
    model: Decoder,
    tokenizer: &'t Tokenizer,
    eos_ids: Vec<u32>,
    context_length: usize,
    chat_template: Option<super::chat::ChatTemplate>,
    max_batch: usize,
    kv_tokens: usize,
    waiting: VecDeque<Waiting>,
    active: Vec<Sequence<'t>>,
}

impl<'t> Batch<'t> {
    fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// Tokenizes a new job's prompt and queues it to join, or answers it
    /// at once when its prompt cannot run.
    fn receive(&mut self, job: Job) {
        match self.prompt_ids(&job.request) {
            Ok(prompt) => self.waiting.push_back(Waiting { job, prompt }),
            Err(err) => send_last(&job, Err(err)),
        }
    }

    fn prompt_ids(&self, request: &ValidGenerate) -> Result<Vec<u32>, EngineError> {
        let text = match &request.input {
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
        if ids.len() + request.max_tokens > self.context_length {
            return Err(EngineError::ContextOverflow {
                prompt: ids.len(),
                max_tokens: request.max_tokens,
                context: self.context_length,
            });
        }
        Ok(ids)
    }

    /// Jobs cancelled while they wait for room are answered now, not when
    /// room comes.
    fn answer_cancelled_waiting(&mut self) {
        let (cancelled, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.job.cancel.is_requested());
        self.waiting = waiting;
        for waiting in cancelled.iter() {
            send_last(&waiting.job, Ok(cancelled_before_start(waiting)));
        }
    }

    /// Positions the sequences in the batch may fill, in all.
    fn kv_in_use(&self) -> usize {
        self.active
            .iter()
            .map(|s| s.prompt_len + s.job.request.max_tokens)
            .sum()
    }

    /// Moves waiting jobs into the batch, in arrival order, while it has
    /// room for their sequences and their KV cache.
    fn admit(&mut self) {
        while self.active.len() < self.max_batch {
            let Some(front) = self.waiting.front() else {
                return;
            };
            let needed = front.prompt.len() + front.job.request.max_tokens;
            if !self.active.is_empty() && self.kv_in_use() + needed > self.kv_tokens {
                return;
            }
            let waiting = self.waiting.pop_front().expect("front exists");
            if let Some(sequence) = self.prefill(waiting) {
                self.active.push(sequence);
            }
        }
    }

    /// Runs the job's prompt into a new KV cache: the sequence, ready to
    /// join the batch, or `None` when the job was answered with an error.
    fn prefill(&mut self, waiting: Waiting) -> Option<Sequence<'t>> {
        let Waiting { job, prompt } = waiting;
        let started = Instant::now();
        let mut cache = KvCache::new(
            self.model.shape.layers,
            prompt.len() + job.request.max_tokens,
        );
        let model = &mut self.model;
        let logits = interrupt::during(&job.cancel, || model.prefill(&prompt, &mut cache))
            .and_then(|logits| logits.squeeze(0));
        let row = match logits {
            Ok(row) => row,
            Err(err) => {
                send_last(&job, Err(err.into()));
                return None;
            }
        };
        Some(Sequence {
            sampler: Sampler::new(&job.request),
            streamer: Streamer::new(job.request.stop.clone()),
            stream: self.tokenizer.decode_stream(true),
            history: prompt.clone(),
            prompt_len: prompt.len(),
            text: String::new(),
            next: Next::Logits(row),
            prefill_s: started.elapsed().as_secs_f64(),
            decode_started: Instant::now(),
            cache,
            job,
        })
    }

    /// Picks each sequence's next token and streams it, lets finished
    /// sequences leave, then runs one decode step for those that remain.
    /// A sequence whose client has not taken its earlier events sits the
    /// step out, so a client that stops reading holds back only its own
    /// generation. Whether any sequence stepped.
    fn step(&mut self) -> bool {
        let (ready, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(Sequence::can_step);
        self.active = held;
        if ready.is_empty() {
            return false;
        }
        let mut tokens = Vec::with_capacity(ready.len());
        let mut staying = Vec::with_capacity(ready.len());
        for mut sequence in ready {
            match sequence.advance(&self.eos_ids) {
                Ok(token) => {
                    tokens.push(token);
                    staying.push(sequence);
                }
                Err(leave) => sequence.leave(leave),
            }
        }
        if staying.is_empty() {
            return true;
        }
        let mut caches: Vec<&mut KvCache> = staying.iter_mut().map(|s| &mut s.cache).collect();
        let logits = self.model.decode(&tokens, &mut caches);
        match logits.and_then(|logits| assign_logits(&mut staying, &logits)) {
            Ok(()) => self.active.append(&mut staying),
            Err(err) => {
                // A failed step leaves every cache in an unknown state.
                let message = err.to_string();
                for sequence in staying {
                    let err = EngineError::from(candle_core::Error::Msg(message.clone()));
                    sequence.leave(Leave::Failed(err));
                }
            }
        }
        true
    }
}

/// Hands each sequence its row of `logits` (`[batch, vocab]`); greedy ones
/// get their token picked for the whole batch at once on the device.
fn assign_logits(batch: &mut [Sequence], logits: &Tensor) -> candle_core::Result<()> {
    let picked = if batch.iter().any(|s| s.sampler.is_plain_greedy()) {
        Some(greedy(logits)?)
    } else {
        None
    };
    for (i, sequence) in batch.iter_mut().enumerate() {
        sequence.next = match &picked {
            Some(ids) if sequence.sampler.is_plain_greedy() => Next::Picked(ids[i]),
            _ => Next::Logits(logits.get(i)?),
        };
    }
    Ok(())
}

impl Sequence<'_> {
    /// Whether the client has room for a step's events (sending them then
    /// never blocks the batch), or is gone (the step ends the sequence).
    fn can_step(&self) -> bool {
        let events = &self.job.events;
        events.is_closed() || events.capacity() >= EVENTS_PER_STEP.min(events.max_capacity())
    }

    fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Picks and streams the next token. `Ok(token)` when the sequence
    /// goes on with it, `Err` when it leaves the batch.
    fn advance(&mut self, eos_ids: &[u32]) -> Result<u32, Leave> {
        if self.job.cancel.is_requested() {
            return Err(Leave::Finished(FinishReason::Cancelled));
        }
        let next = match &self.next {
            Next::Picked(id) => *id,
            Next::Logits(row) => self
                .sampler
                .next(row, &self.history)
                .map_err(|e| Leave::Failed(e.into()))?,
        };
        if eos_ids.contains(&next) {
            return Err(Leave::Finished(FinishReason::Eos));
        }
        let index = self.generated().len();
        self.history.push(next);
        let piece = self
            .stream
            .step(next)
            .map_err(|e| Leave::Failed(EngineError::Tokenizer(e.to_string())))?
            .unwrap_or_default();
        self.text.push_str(&piece);
        let stop_cut = stop_position(&self.text, &self.job.request.stop);
        if let Some(cut) = stop_cut {
            self.text.truncate(cut);
        }
        let events = self
            .streamer
            .push(&self.text, index, next, stop_cut.is_some());
        if events
            .into_iter()
            .any(|e| self.job.events.blocking_send(Ok(e)).is_err())
        {
            return Err(Leave::Finished(FinishReason::Cancelled));
        }
        if stop_cut.is_some() {
            return Err(Leave::Finished(FinishReason::Stop));
        }
        if index + 1 == self.job.request.max_tokens {
            return Err(Leave::Finished(FinishReason::Length));
        }
        Ok(next)
    }

    /// Sends the sequence's last events; its cache is freed with it.
    fn leave(mut self, leave: Leave) {
        let finish = match leave {
            Leave::Finished(finish) => finish,
            Leave::Failed(err) => {
                send_last(&self.job, Err(err));
                return;
            }
        };
        if let Some(last) = self.streamer.finish(&self.text) {
            send_last(&self.job, Ok(last));
        }
        let decode_s = self.decode_started.elapsed().as_secs_f64();
        let generated = self.generated().to_vec();
        let rates = (
            rate(self.prompt_len, self.prefill_s),
            rate(generated.len(), decode_s),
        );
        let text = std::mem::take(&mut self.text);
        let done = done_event(
            &self.job.request,
            self.prompt_len,
            text,
            generated,
            rates,
            finish,
        );
        send_last(&self.job, Ok(done));
    }
}

fn send_last(job: &Job, event: WorkerEvent) {
    let _ = job.events.blocking_send(event);
}

/// The answer to a job cancelled while it waited to join the batch.
fn cancelled_before_start(waiting: &Waiting) -> GenerateEvent {
    let prompt_tokens = waiting.prompt.len();
    let (text, ids) = (String::new(), Vec::new());
    let finish = FinishReason::Cancelled;
    done_event(
        &waiting.job.request,
        prompt_tokens,
        text,
        ids,
        (0.0, 0.0),
        finish,
    )
}

/// A generation's final event; `rates` are prefill and decode tokens/s.
fn done_event(
    request: &ValidGenerate,
    prompt_tokens: usize,
    text: String,
    token_ids: Vec<u32>,
    rates: (f64, f64),
    finish_reason: FinishReason,
) -> GenerateEvent {
    GenerateEvent::Done {
        done: true,
        model: request.model.clone(),
        mode: None,
        seed: request.seed,
        text,
        prompt_tokens,
        completion_tokens: token_ids.len(),
        token_ids,
        prefill_tokens_per_s: rates.0,
        decode_tokens_per_s: rates.1,
        finish_reason,
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
struct Streamer {
    stops: Vec<String>,
    /// Bytes of the text already sent.
    released: usize,
    /// The token whose event is waiting for the next one.
    pending: Option<(usize, u32)>,
}

impl Streamer {
    fn new(stops: Vec<String>) -> Self {
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
            text.len() - held_suffix(text, &self.stops)
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
        let mut streamer = Streamer::new(stops.clone());
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
