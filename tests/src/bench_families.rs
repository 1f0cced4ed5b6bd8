//! `bench families`: CPU decode throughput of a Gemma-2-shaped and a
//! Phi-3-shaped synthetic model against a Llama of the same shape, with 1
//! and 8 concurrent clients, the three measured in turn in each round.

use std::path::Path;

use modeld_e2e::synthetic::{self, Shape};

use super::{aggregate, daemon_with, ROUNDS};

/// The models compared, the baseline first: the name shown and the
/// `model_type` written.
const FAMILIES: [(&str, &str); 3] = [("Llama", "llama"), ("Gemma 2", "gemma2"), ("Phi-3", "phi3")];

const CLIENTS: [usize; 2] = [1, 8];

pub fn run(tokens: usize) {
    let work = tempfile::tempdir().expect("tempdir");
    let shape = Shape {
        hidden: 512,
        intermediate: 1408,
        layers: 8,
        heads: 8,
        kv_heads: 4,
    };
    println!(
        "Synthetic models: {} layers, hidden {}, intermediate {}, {} heads ({} KV), f32; \
         CPU ({} threads), greedy, {tokens} tokens per client, best of {ROUNDS} rounds, \
         the three models in turn in each round\n",
        shape.layers,
        shape.hidden,
        shape.intermediate,
        shape.heads,
        shape.kv_heads,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let models: Vec<_> = FAMILIES
        .iter()
        .map(|(name, model_type)| {
            let dir = work.path().join(model_type);
            synthetic::write_model(&dir, model_type, shape);
            // Random weights may pick the end token early; every client
            // should generate all its tokens.
            synthetic::make_never_ending(&dir, 4096);
            let params = parameters(&dir.join("model.safetensors"));
            (*name, params, daemon_with("", &[], &dir))
        })
        .collect();
    println!("| model | params | clients | tok/s | ratio to Llama |");
    println!("|---|---|---|---|---|");
    for clients in CLIENTS {
        let mut best = vec![0f64; models.len()];
        for _ in 0..ROUNDS {
            for (rate, (_, _, daemon)) in best.iter_mut().zip(&models) {
                *rate = rate.max(aggregate(daemon, clients, tokens));
            }
        }
        for (rate, (name, params, _)) in best.iter().zip(&models) {
            println!(
                "| {name} | {:.1}M | {clients} | {rate:.1} | {:.2}x |",
                *params as f64 / 1e6,
                rate / best[0]
            );
        }
    }
}

/// How many weights the safetensors file holds.
fn parameters(weights: &Path) -> usize {
    candle_core::safetensors::load(weights, &candle_core::Device::Cpu)
        .expect("read weights")
        .values()
        .map(|t| t.elem_count())
        .sum()
}
