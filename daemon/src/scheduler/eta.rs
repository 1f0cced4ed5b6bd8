//! Queue ETAs from measured rates. Each model's seconds per token and per
//! denoising step are moving averages of what its generations took (the
//! time between tokens; an image run's time over its steps), and a mode
//! switch's or unload's duration is a moving average of the earlier ones
//! to the same mode or of the same model (loads included). A queued job's
//! `eta_s` is the time the running jobs still need (the longest of them:
//! batched generations run together) plus the whole cost of each job
//! queued ahead of it, one after another: an upper bound when jobs ahead
//! could join one batch. A generation's own load, when its model is not
//! resident and no switch loads it, is not counted. It is `None` until
//! every figure it needs has been measured once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::Work;

/// How much a new measurement moves an average.
const WEIGHT: f64 = 0.3;

/// The measured rates, by model (or by `switch:MODE` / `unload:MODEL`).
#[derive(Default)]
pub struct Rates(Mutex<HashMap<String, Rate>>);

#[derive(Default, Clone, Copy, Debug)]
struct Rate {
    token_s: Option<f64>,
    step_s: Option<f64>,
    job_s: Option<f64>,
}

fn blend(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |old| old + WEIGHT * (sample - old)))
}

impl Rates {
    fn update(&self, key: &str, change: impl FnOnce(&mut Rate)) {
        let mut rates = self.0.lock().unwrap_or_else(|e| e.into_inner());
        change(rates.entry(key.to_string()).or_default());
    }

    fn get(&self, key: &str) -> Rate {
        let rates = self.0.lock().unwrap_or_else(|e| e.into_inner());
        rates.get(key).copied().unwrap_or_default()
    }

    pub fn token(&self, model: &str, seconds: f64) {
        self.update(model, |rate| rate.token_s = blend(rate.token_s, seconds));
    }

    pub fn step(&self, model: &str, seconds: f64) {
        self.update(model, |rate| rate.step_s = blend(rate.step_s, seconds));
    }

    /// A switch or unload took `seconds`.
    pub fn job(&self, cost: &Cost, seconds: f64) {
        if let Cost::Timed(key) = cost {
            self.update(key, |rate| rate.job_s = blend(rate.job_s, seconds));
        }
    }

    /// Seconds `cost` will take; `None` when a rate is not measured yet.
    fn seconds(&self, cost: &Cost) -> Option<f64> {
        match cost {
            Cost::Free => Some(0.0),
            Cost::Timed(key) => self.get(key).job_s,
            Cost::Generate {
                model,
                tokens,
                steps,
            } => {
                let rate = self.get(model);
                let text = tokens.zip(rate.token_s).map(|(n, s)| n as f64 * s);
                text.or_else(|| steps.zip(rate.step_s).map(|(n, s)| n as f64 * s))
            }
        }
    }
}

/// What a job costs, as far as its request tells.
#[derive(Debug, Clone)]
pub enum Cost {
    /// A generation: at most `tokens` (text) or `steps` (all pictures'
    /// denoising steps), whichever the model's kind runs.
    Generate {
        model: String,
        tokens: Option<usize>,
        steps: Option<usize>,
    },
    /// Takes about as long as the jobs with the same key did.
    Timed(String),
    /// A keep-alive expiry of a model that is usually already gone.
    Free,
}

impl Cost {
    pub fn of(work: &Work) -> Cost {
        match work {
            Work::Generate { request, .. } => Cost::Generate {
                model: request.model.clone(),
                tokens: request.text.as_ref().ok().map(|text| text.max_tokens),
                steps: request
                    .image
                    .as_ref()
                    .ok()
                    .map(|image| image.request.steps_run() * image.request.count),
            },
            Work::Switch { to } => Cost::Timed(format!("switch:{to}")),
            Work::Unload { name, .. } => Cost::Timed(format!("unload:{name}")),
            Work::Expire { .. } => Cost::Free,
        }
    }
}

/// A queued job's place: 1-based among the queued jobs, the jobs ahead
/// (running ones included), and the seconds until it should start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    pub position: usize,
    pub ahead: usize,
    pub eta_s: Option<f64>,
}

/// The places of the queued jobs, in queue order: `running` are the
/// running jobs' costs and starts, `queued` the queued jobs' costs.
pub fn places(rates: &Rates, running: &[(&Cost, Instant)], queued: &[Cost]) -> Vec<Place> {
    let remaining = running
        .iter()
        .try_fold(0.0_f64, |longest, (cost, started)| {
            let left = rates.seconds(cost)? - started.elapsed().as_secs_f64();
            Some(longest.max(left.max(0.0)))
        });
    let mut wait = remaining;
    let mut places = Vec::with_capacity(queued.len());
    for (index, cost) in queued.iter().enumerate() {
        places.push(Place {
            position: index + 1,
            ahead: index + running.len(),
            eta_s: wait.map(|s| (s * 10.0).round() / 10.0),
        });
        wait = wait.zip(rates.seconds(cost)).map(|(a, b)| a + b);
    }
    places
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_adds_the_jobs_ahead_once_every_rate_is_known() {
        let rates = Rates::default();
        let text = Cost::Generate {
            model: "m".into(),
            tokens: Some(100),
            steps: None,
        };
        let switch = Cost::Timed("switch:chat".into());
        let now = Instant::now();
        let queued = [text.clone(), switch.clone(), text.clone()];
        let unknown = places(&rates, &[(&text, now)], &queued);
        assert_eq!(unknown[0].eta_s, None);
        assert_eq!((unknown[2].position, unknown[2].ahead), (3, 3));
        rates.token("m", 0.01);
        rates.job(&switch, 2.0);
        let known = places(&rates, &[(&text, now)], &queued);
        let etas: Vec<f64> = known.iter().map(|p| p.eta_s.unwrap()).collect();
        assert!((etas[0] - 1.0).abs() < 0.11, "{etas:?}");
        assert!((etas[1] - 2.0).abs() < 0.11, "{etas:?}");
        assert!((etas[2] - 4.0).abs() < 0.11, "{etas:?}");
        rates.token("m", 0.02);
        let moved = places(&rates, &[], &queued[..1]);
        assert_eq!(moved[0].eta_s, Some(0.0));
    }
}
