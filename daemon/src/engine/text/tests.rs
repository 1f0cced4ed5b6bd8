//! The batched decoder against itself: a decode step run for several
//! sequences together gives each the logits it gets alone, within the
//! float tolerance of a different summation order.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::build;
use super::decoder::{greedy, Decoder, KvCache};
use super::model::{ModelSpec, Weights};

/// Products over a batch may sum in another order than over one row.
const BATCH_TOLERANCE: f32 = 1e-4;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A fixture's safetensors model, in f32 on the CPU.
fn fixture(name: &str) -> Decoder {
    load_dir(&fixture_dir(name))
}

fn load_dir(dir: &std::path::Path) -> Decoder {
    let name = dir.display();
    let dir = dir.to_path_buf();
    let spec = ModelSpec::read(&dir).expect("config");
    let Weights::Safetensors(files) = Weights::find(&dir).expect("weights") else {
        panic!("{name} is safetensors")
    };
    build::from_safetensors(&spec, &files, &[], DType::F32, &Device::Cpu).expect("loads")
}

fn tiny_llama() -> Decoder {
    fixture("tiny-llama")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_batched_decode_step_gives_each_sequence_its_own_logits() {
    let mut model = tiny_llama();
    let prompts: [&[u32]; 3] = [
        &[45, 270, 221, 44],
        &[7, 8],
        &[100, 101, 102, 103, 104, 105],
    ];
    let next = [79u32, 12, 300];
    let mut batched: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(2, 16)).collect();
    for (prompt, cache) in prompts.iter().zip(batched.iter_mut()) {
        model.prefill(prompt, cache).unwrap();
    }
    let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
    let together = model.decode(&next, &mut refs).unwrap();
    let mut worst = 0f32;
    for (i, prompt) in prompts.iter().enumerate() {
        let mut alone = KvCache::new(2, 16);
        model.prefill(prompt, &mut alone).unwrap();
        let single = model.decode(&next[i..=i], &mut [&mut alone]).unwrap();
        // The same step as a prefill of the whole sequence at once.
        let mut whole = KvCache::new(2, 16);
        let mut tokens = prompt.to_vec();
        tokens.push(next[i]);
        let prefilled = model.prefill(&tokens, &mut whole).unwrap();
        let row = together.get(i).unwrap();
        worst = worst.max(max_diff(&row, &single.get(0).unwrap()));
        worst = worst.max(max_diff(&row, &prefilled.get(0).unwrap()));
        assert_eq!(alone.positions(), prompt.len() + 1);
    }
    eprintln!("batched vs alone: max abs logit difference {worst:e}");
    assert!(worst < BATCH_TOLERANCE, "batched logits differ by {worst}");
}

/// The bench's synthetic llama (random weights, real shapes), loaded.
fn random_llama(dir: &std::path::Path, hidden: usize, layers: usize) -> Decoder {
    let heads = hidden / 64;
    // Grouped as the real models are: three or four query heads per key.
    let kv_heads = (1..=heads / 3)
        .rev()
        .find(|k| heads.is_multiple_of(*k))
        .unwrap_or(1);
    let shape = modeld_e2e::synthetic::Shape {
        hidden,
        // As Llama's: 8/3 of the width, rounded up to 256.
        intermediate: (hidden * 8 / 3).div_ceil(256) * 256,
        layers,
        heads,
        kv_heads,
    };
    modeld_e2e::synthetic::write_model(dir, "llama", shape);
    // The bench's models have SmolLM's 49152 tokens, whose output head is
    // a fifth of a 135M model's weights.
    let vocab = std::env::var("PROBE_VOCAB")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(size) = vocab {
        let vocab = modeld_e2e::synthetic::Vocab { size, tied: true };
        modeld_e2e::synthetic::write_llama(dir, shape, vocab);
    }
    let spec = ModelSpec::read(dir).unwrap();
    let file = dir.join("model.safetensors");
    build::from_safetensors(&spec, &[file], &[], DType::F32, &Device::Cpu).unwrap()
}

/// Milliseconds per decode step by batch size on a random llama:
/// `cargo test --release -p modeld --lib decode_step_timing -- --ignored --nocapture`.
/// `PROBE_HIDDEN`, `PROBE_LAYERS`, `PROBE_VOCAB` (tied embeddings when
/// given) and `PROBE_FORMAT` (`f32`, `q8_0` or `q4k`, the last two as
/// GGUF) pick the model; `RAYON_NUM_THREADS` the
/// threads, `PROBE_BATCHES` (`1,2,4,8`) the batch sizes, `PROBE_PROMPT`
/// the prompt's length and `PROBE_STEPS` the steps timed after it.
/// `PROBE_GGUF` names a GGUF file to time instead (`PROBE_LAYERS` must
/// then be its layers); its first prefill runs as a load's first prompt
/// does, while the repacking thread works.
#[test]
#[ignore = "a timing probe, not a check"]
fn decode_step_timing() {
    let env = |key: &str, default: usize| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (hidden, layers) = (env("PROBE_HIDDEN", 1024), env("PROBE_LAYERS", 12));
    let dir = tempfile::tempdir().unwrap();
    let mut model = random_llama(dir.path(), hidden, layers);
    let format = std::env::var("PROBE_FORMAT").unwrap_or_default();
    let kind = match format.as_str() {
        "q8_0" => Some(modeld_e2e::gguf::GgufType::Q8_0),
        "q4k" => Some(modeld_e2e::gguf::GgufType::Q4K),
        _ => None,
    };
    if let Some(kind) = kind {
        model = gguf_of(dir.path(), kind);
    }
    if let Ok(file) = std::env::var("PROBE_GGUF") {
        model = load_gguf(std::path::Path::new(&file));
    }
    let batches: Vec<usize> = std::env::var("PROBE_BATCHES")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    for batch in batches {
        let (prompt_len, steps) = (env("PROBE_PROMPT", 8), env("PROBE_STEPS", 32));
        let prompt: Vec<u32> = (1..=prompt_len as u32).collect();
        let mut caches: Vec<KvCache> = (0..batch)
            .map(|_| KvCache::new(layers, prompt_len + steps))
            .collect();
        let started = std::time::Instant::now();
        for cache in caches.iter_mut() {
            model.prefill(&prompt, cache).unwrap();
        }
        let prefill_ms = started.elapsed().as_secs_f64() * 1000.0 / batch as f64;
        eprintln!("{format} batch {batch}: prefill of {prompt_len} tokens {prefill_ms:.2} ms");
        let tokens = vec![9u32; batch];
        let started = std::time::Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            model.decode(&tokens, &mut refs).unwrap();
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / steps as f64;
        eprintln!(
            "{format} hidden {hidden} x {layers}: batch {batch}: {ms:.2} ms/step, {:.1} tok/s",
            batch as f64 * 1000.0 / ms
        );
    }
}

#[test]
fn a_cancelled_prefill_stops_between_layers() {
    let mut model = tiny_llama();
    let cancel = crate::engine::cancel::Cancellation::new();
    cancel.request();
    let mut cache = KvCache::new(2, 16);
    let result =
        crate::engine::interrupt::during(&cancel, || model.prefill(&[1, 2, 3], &mut cache));
    assert!(result.is_err());
    assert_eq!(cache.positions(), 0, "not even the first layer ran");
    let mut cache = KvCache::new(2, 16);
    model
        .prefill(&[1, 2, 3], &mut cache)
        .expect("outside a job nothing stops it");
}

/// One `expected.json` case: the prompt's ids, transformers' greedy ids
/// and the first eight logits after the prompt.
struct Case {
    input: Vec<u32>,
    greedy: Vec<u32>,
    first_logits: Vec<f32>,
    /// The smallest gap between the two best logits over the greedy run.
    margin: f64,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

impl Case {
    /// One case of an `expected.json`; variants record only the ids.
    fn read(case: &serde_json::Value) -> Self {
        let first_logits = case["first_logits_head"]
            .as_array()
            .map_or(Vec::new(), |v| {
                v.iter().map(|x| x.as_f64().unwrap() as f32).collect()
            });
        Case {
            input: ids(&case["input_ids"]),
            greedy: ids(&case["greedy_ids"]),
            first_logits,
            margin: case["min_top2_margin"].as_f64().unwrap_or(0.0),
        }
    }
}

fn cases(name: &str) -> Vec<Case> {
    let text = std::fs::read_to_string(fixture_dir(name).join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(Case::read)
        .collect()
}

/// Greedy ids for every prompt, decoded together in one batch: each
/// prompt is prefilled alone, then all step at once.
fn greedy_batch(model: &mut Decoder, prompts: &[&[u32]], steps: usize) -> Vec<Vec<u32>> {
    let layers = model.layers.len();
    let mut caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| KvCache::new(layers, p.len() + steps))
        .collect();
    let mut next: Vec<u32> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(prompt, cache)| greedy(&model.prefill(prompt, cache).unwrap()).unwrap()[0])
        .collect();
    let mut out: Vec<Vec<u32>> = next.iter().map(|id| vec![*id]).collect();
    for _ in 1..steps {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        next = greedy(&model.decode(&next, &mut refs).unwrap()).unwrap();
        for (ids, id) in out.iter_mut().zip(&next) {
            ids.push(*id);
        }
    }
    out
}

/// transformers' greedy ids, for each prompt alone and for all of them
/// in one batch; and its first logits, within float tolerance.
fn check_fixture(name: &str) {
    let mut model = fixture(name);
    let cases = cases(name);
    for case in &cases {
        let mut cache = KvCache::new(model.layers.len(), 8);
        let logits = model.prefill(&case.input, &mut cache).unwrap();
        let head = logits.get(0).unwrap().narrow(0, 0, 8).unwrap();
        let expected = Tensor::new(case.first_logits.as_slice(), &Device::Cpu).unwrap();
        // The reference rounds its logits to five decimals.
        assert!(
            max_diff(&head, &expected) < 1e-3,
            "{name}: first logits {head}"
        );
    }
    check_greedy(name, &mut model, &cases);
}

fn check_greedy(name: &str, model: &mut Decoder, cases: &[Case]) {
    for case in cases {
        let alone = greedy_batch(model, &[&case.input], case.greedy.len());
        assert_eq!(
            alone[0], case.greedy,
            "{name}: prompt {:?} alone",
            case.input
        );
    }
    let prompts: Vec<&[u32]> = cases.iter().map(|c| c.input.as_slice()).collect();
    let steps = cases.iter().map(|c| c.greedy.len()).max().unwrap();
    let together = greedy_batch(model, &prompts, steps);
    for (case, ids) in cases.iter().zip(&together) {
        assert_eq!(
            &ids[..case.greedy.len()],
            case.greedy,
            "{name}: prompt {:?} in a batch",
            case.input
        );
    }
}

#[test]
fn tiny_gemma2_matches_transformers_alone_and_batched() {
    check_fixture("tiny-gemma2");
}

#[test]
fn tiny_phi3_matches_transformers_alone_and_batched() {
    check_fixture("tiny-phi3");
}

#[test]
fn tiny_gemma3_matches_transformers_alone_and_batched() {
    check_fixture("tiny-gemma3");
}

/// A fixture's weights and tokenizer under another config: a folder of
/// `tests/fixtures/text-variants` (made by its `generate.py`).
fn variant(name: &str, config: &str) -> (tempfile::TempDir, Vec<Case>) {
    let source = fixture_dir("text-variants").join(name);
    let text = std::fs::read_to_string(source.join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let base = fixture_dir(json["base"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(base.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::copy(source.join(config), dir.path().join("config.json")).unwrap();
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(Case::read)
        .collect();
    (dir, cases)
}

/// Both spellings of a variant's config give transformers' ids.
fn check_variant(name: &str) {
    for config in ["config.json", "old_config.json"] {
        let (dir, cases) = variant(name, config);
        let mut model = load_dir(dir.path());
        check_greedy(&format!("{name} ({config})"), &mut model, &cases);
    }
}

#[test]
fn phi3_longrope_with_partial_rotary_and_a_window_matches_transformers() {
    check_variant("phi3-longrope");
}

#[test]
fn gemma3_linear_rope_scaling_and_the_old_pattern_match_transformers() {
    check_variant("gemma3-linear");
}

/// A copy of a fixture whose config.json `edit` changes.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        std::fs::copy(fixture_dir(name).join(file), dir.path().join(file)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn gemma2_without_layer_types_slides_on_even_layers_as_transformers_does() {
    let dir = edited("tiny-gemma2", |c| {
        c.as_object_mut().unwrap().remove("layer_types");
    });
    check_greedy(
        "tiny-gemma2 without layer_types",
        &mut load_dir(dir.path()),
        &cases("tiny-gemma2"),
    );
}

#[test]
fn a_multimodal_gemma3_checkpoint_runs_its_language_model() {
    // The hub's layout, and the one transformers 5 saves.
    let layouts: [fn(&str) -> String; 2] = [
        |name| format!("language_model.{name}"),
        |name| name.replacen("model.", "model.language_model.", 1),
    ];
    for rename in layouts {
        let dir = edited("tiny-gemma3", |c| {
            let text = c.clone();
            *c = serde_json::json!({"model_type": "gemma3", "text_config": text,
                                    "vision_config": {"model_type": "siglip_vision_model"}});
        });
        let file = dir.path().join("model.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let vision = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let renamed: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (rename(&name), t))
            .chain([("vision_tower.patch.weight".to_string(), vision)])
            .collect();
        candle_core::safetensors::save(&renamed, &file).unwrap();
        let mut model = load_dir(dir.path());
        check_greedy("multimodal tiny-gemma3", &mut model, &cases("tiny-gemma3"));
    }
}

#[test]
fn config_fields_that_change_the_maths_unhonoured_are_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "tiny-gemma2",
            |c| c["hidden_activation"] = "relu".into(),
            "hidden_activation",
        ),
        (
            "tiny-gemma3",
            |c| c["use_bidirectional_attention"] = true.into(),
            "use_bidirectional_attention",
        ),
        (
            "tiny-gemma2",
            |c| c["layer_types"][1] = "chunked_attention".into(),
            "layer_types",
        ),
        (
            "tiny-phi3",
            |c| c["hidden_act"] = "gelu_fast".into(),
            "hidden_act",
        ),
    ];
    for (name, edit, field) in cases {
        let dir = edited(name, edit);
        let spec = ModelSpec::read(dir.path()).unwrap();
        let file = dir.path().join("model.safetensors");
        let err = build::from_safetensors(&spec, &[file], &[], DType::F32, &Device::Cpu)
            .err()
            .expect("refused");
        assert!(err.to_string().contains(field), "{name}: {err}");
    }
}

/// How far Q8_0 weights may move a tiny model's logits.
const Q8_TOLERANCE: f32 = 0.5;

/// A model folder written as GGUF with llama.cpp's names and keys, loaded.
fn gguf_of(dir: &std::path::Path, kind: modeld_e2e::gguf::GgufType) -> Decoder {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("model.gguf");
    modeld_e2e::gguf::write_gguf(dir, &file, kind).unwrap();
    load_gguf(&file)
}

#[test]
fn gguf_copies_of_the_fixtures_match_transformers() {
    use modeld_e2e::gguf::GgufType;
    for name in ["tiny-gemma2", "tiny-gemma3", "tiny-phi3"] {
        let mut model = gguf_of(&fixture_dir(name), GgufType::F32);
        check_greedy(&format!("{name} as f32 GGUF"), &mut model, &cases(name));
        // f16 rounding may flip a greedy pick whose margin is tiny.
        let clear: Vec<Case> = cases(name)
            .into_iter()
            .filter(|c| c.margin >= 0.05)
            .collect();
        assert!(clear.len() >= 2, "{name}: too few clear cases");
        let mut model = gguf_of(&fixture_dir(name), GgufType::F16);
        check_greedy(&format!("{name} as f16 GGUF"), &mut model, &clear);
        // Q8_0 moves logits by more than these tiny models' greedy margins,
        // so only the first step's logits are compared.
        let mut model = gguf_of(&fixture_dir(name), GgufType::Q8_0);
        for case in cases(name) {
            let mut cache = KvCache::new(model.layers.len(), 8);
            let logits = model.prefill(&case.input, &mut cache).unwrap();
            let head = logits.get(0).unwrap().narrow(0, 0, 8).unwrap();
            let expected = Tensor::new(case.first_logits.as_slice(), &Device::Cpu).unwrap();
            let diff = max_diff(&head, &expected);
            eprintln!("{name} Q8_0: first logits off by {diff}");
            assert!(diff < Q8_TOLERANCE, "{name} Q8_0: first logits {head}");
        }
    }
    // LongRoPE's factors, original context and partial rotary from GGUF.
    let (dir, cases) = variant("phi3-longrope", "config.json");
    let mut model = gguf_of(dir.path(), GgufType::F32);
    check_greedy("phi3-longrope as GGUF", &mut model, &cases);
}

/// Writes `f32_file`'s 2-D tensors quantized to `dtype` (`quantized`), and
/// the same quantized values dequantized back to f32 (`dequantized`), so
/// the two hold exactly the same weights in two encodings.
fn requantize(
    f32_file: &std::path::Path,
    dtype: candle_core::quantized::GgmlDType,
    quantized: &std::path::Path,
    dequantized: &std::path::Path,
) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let mut file = std::fs::File::open(f32_file).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut quant = Vec::new();
    let mut plain = Vec::new();
    for name in content.tensor_infos.keys() {
        let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let values = tensor.dequantize(&Device::Cpu).unwrap();
        if values.rank() == 2 {
            let q = QTensor::quantize(&values, dtype).unwrap();
            let back = QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32);
            quant.push((name.clone(), q));
            plain.push((name.clone(), back.unwrap()));
        } else {
            quant.push((
                name.clone(),
                QTensor::quantize(&values, GgmlDType::F32).unwrap(),
            ));
            plain.push((
                name.clone(),
                QTensor::quantize(&values, GgmlDType::F32).unwrap(),
            ));
        }
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    for (path, tensors) in [(quantized, &quant), (dequantized, &plain)] {
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut out, &metadata, &refs).unwrap();
    }
}

/// A GGUF file loaded on the CPU.
fn load_gguf(file: &std::path::Path) -> Decoder {
    let (content, header) = super::model::read_gguf_header(file).unwrap();
    super::gguf::from_gguf(file, content, header.arch, &Device::Cpu).unwrap()
}

/// Logits of a prompt, then of each of `next` fed one by one.
fn logits_along(model: &mut Decoder, prompt: &[u32], next: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model.layers.len(), 32);
    let mut all = vec![model.prefill(prompt, &mut cache).unwrap()];
    for token in next {
        all.push(model.decode(&[*token], &mut [&mut cache]).unwrap());
    }
    all.iter()
        .map(|l| l.flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// The quantized kernels against the f32 path on the very same weights:
/// the only difference left is that the quantized path rounds each
/// activation block to 8 bits (Q8_0 or Q8_K) before its dot products.
#[test]
fn quantized_gguf_decodes_as_its_dequantized_weights_do() {
    use candle_core::quantized::GgmlDType;
    let dir = tempfile::tempdir().unwrap();
    let shape = modeld_e2e::synthetic::Shape {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
    };
    modeld_e2e::synthetic::write_model(dir.path(), "llama", shape);
    let f32_file = dir.path().join("f32.gguf");
    modeld_e2e::gguf::write_gguf(dir.path(), &f32_file, modeld_e2e::gguf::GgufType::F32).unwrap();
    let (prompt, next) = ([5u32, 17, 99, 3, 250], [7u32, 300, 12, 41]);
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let (q, d) = (dir.path().join("q.gguf"), dir.path().join("d.gguf"));
        requantize(&f32_file, dtype, &q, &d);
        let mut quantized = load_gguf(&q);
        let got = logits_along(&mut quantized, &prompt, &next);
        let want = logits_along(&mut load_gguf(&d), &prompt, &next);
        let (mut worst, mut spread) = (0f32, 0f32);
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
                spread = spread.max(b.abs());
            }
        }
        eprintln!("{dtype:?}: logits off by at most {worst:e}, largest logit {spread}");
        // Rounding activations to 8 bits moves each product by under 1% of
        // its size (bounded in cpu/tests.rs); through two layers and the
        // head this model measured 0.8% to 1.8% (over repeated runs) of the
        // largest logit. A wrong scale, block or sign moves logits by
        // their own size, so 5% separates the two with room for the
        // random weights.
        assert!(
            worst <= 0.05 * spread,
            "{dtype:?}: off by {worst} against logits up to {spread}"
        );
        check_alone_equals_batched(&mut quantized, dtype);
    }
}

/// A decode step of three sequences gives each, bit for bit, the logits
/// it gets alone.
fn check_alone_equals_batched(model: &mut Decoder, what: impl std::fmt::Debug) {
    let prompts: [&[u32]; 3] = [&[1, 2, 3], &[40, 41], &[7, 8, 9, 10]];
    let next = [11u32, 12, 13];
    let layers = model.layers.len();
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(layers, 16)).collect();
    for (prompt, cache) in prompts.iter().zip(caches.iter_mut()) {
        model.prefill(prompt, cache).unwrap();
    }
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let together = model
        .decode(&next, &mut refs)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let mut alone = KvCache::new(layers, 16);
        model.prefill(prompt, &mut alone).unwrap();
        let single = model.decode(&next[i..=i], &mut [&mut alone]).unwrap();
        let single = single.to_vec2::<f32>().unwrap().remove(0);
        let same = single
            .iter()
            .zip(&together[i])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what:?}: sequence {i} alone differs from the batch");
    }
}
