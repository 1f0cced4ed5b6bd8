//! The engine: `load`, `unload`, `generate` and its events, LoRAs and defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `load` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadParams {
    pub name: String,
    /// `cpu` or `cuda:N`; CUDA when built with it and a GPU is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `f32`, `f16` or `bf16`; f32 on CPU, bf16 on CUDA by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

/// A model resident in memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadedModel {
    pub name: String,
    pub arch: String,
    pub device: String,
    pub dtype: String,
    pub path: PathBuf,
    /// Expected memory, known before loading: the weights at their dtype
    /// (GGUF: as stored, plus f32 token embeddings) and the KV cache.
    pub estimated_bytes: u64,
    /// The KV-cache part of `estimated_bytes`: every layer's keys and values
    /// for the context, up to 4096 positions.
    #[serde(default)]
    pub kv_cache_bytes: u64,
    /// Memory the load took on its device: VRAM from the driver on a GPU,
    /// anonymous resident memory on the CPU. The KV cache grows later.
    pub measured_bytes: u64,
    pub load_ms: u64,
    pub loaded_at: u64,
    pub context_length: usize,
    /// The adapters merged into the weights (with their `adapter_name`).
    #[serde(default)]
    pub loras: Vec<LoraInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReply {
    pub model: LoadedModel,
    /// True when the model was already resident and nothing was done.
    pub already_loaded: bool,
    /// Files that changed on disk since a pull or `pull --verify` hashed
    /// them, hashed again before the load, and what became of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_files: Vec<ChangedFile>,
}

/// A model file whose size, mtime or ctime changed since it was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedFile {
    /// As the model reads it: a snapshot file, or a file of its `local_path`.
    pub path: PathBuf,
    pub outcome: ChangeOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOutcome {
    /// Touched or rewritten, but its bytes still hash as checked.
    Unchanged,
    /// A cache file whose bytes no longer matched its sha256 (or git blob
    /// id): fetched again from the Hub before the load.
    Refetched,
    /// A `local_path` file whose bytes changed: loaded as it is, since local
    /// files are never fetched; reported until `pull --verify` checks it.
    Modified,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnloadReply {
    pub name: String,
    /// Resident memory released by the unload.
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// `generate` parameters; unset sampling fields take the defaults shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// A registered model; or leave it out and name a `mode`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Run in this mode: its model and default parameters, switching to it
    /// first if another mode is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Chat messages, rendered with the model's chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// 0 is greedy (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Random when absent; the reply says which was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// 1.0 (off) by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the penalty looks at; default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Image models: what the pictures should not show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Image models: `"WxH"`, default 512x512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Image models: denoising steps, default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Image models: classifier-free guidance scale, default 1.0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// Image models: pictures to make, default 1; picture `i` uses `seed + i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Image models: also return each picture's PNG bytes as base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<bool>,
    /// Image models: the denoising scheduler (`ddim`, `euler`, `euler_a`,
    /// `ddpm`, `dpmpp_2m`, `unipc`); default the one the model's
    /// scheduler config names when supported, else `ddim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Image models, img2img: the starting picture, a base64 PNG; `size`
    /// defaults to its size and must equal it. Runner edit pipelines that
    /// take several pictures (Qwen-Image-Edit-2509) accept a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<InitImages>,
    /// Image models, img2img: how much of the picture is redrawn, in
    /// (0, 1], default 0.75; `steps × strength` steps run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// FLUX models: the T5 prompt's token budget, 1 to 512; default 512
    /// for dev, 256 for schnell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<u32>,
    /// Runner video pipelines (Wan): frames per video (`num_frames`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    /// Runner models: further parameters their runner declares, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Map<String, serde_json::Value>>,
    /// Hear `queued` events (place and ETA) while the job waits. The
    /// subscription is then accepted once the job is seen waiting, so a
    /// failure before its first token arrives as an `error` event instead
    /// of refusing the subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_events: Option<bool>,
}

/// One base64 PNG, or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitImages {
    One(String),
    Many(Vec<String>),
}

impl InitImages {
    /// The pictures, in order.
    pub fn all(&self) -> Vec<&str> {
        match self {
            InitImages::One(one) => vec![one.as_str()],
            InitImages::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

/// One picture an image generation wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    /// The PNG file, under the daemon's `[images] output_dir`.
    pub path: PathBuf,
    /// The seed that reproduces this picture alone.
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// The PNG bytes, base64, when the request asked for `inline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
}

/// The last event of an image generation (`event: "done"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagesDone {
    pub done: bool,
    pub model: String,
    /// The mode the request ran in, if it named one.
    pub mode: Option<String>,
    /// The request's seed (that of its first picture).
    pub seed: u64,
    /// `"WxH"`.
    pub size: String,
    /// Denoising steps run (img2img runs `steps × strength` of them).
    pub steps: usize,
    /// The scheduler that ran.
    #[serde(default)]
    pub scheduler: String,
    /// Empty when the generation was cancelled.
    pub images: Vec<ImageFile>,
    /// Text encoding, denoising and decoding.
    pub generate_ms: u64,
    /// Encoding and writing the PNG files.
    pub write_ms: u64,
    pub finish_reason: FinishReason,
    /// Video models: the first video's frames and MP4 (when `count` is 1,
    /// the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoFiles>,
    /// Video models: every video, in order (`video` is the first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<VideoFiles>,
}

/// One video a runner made: its frames as numbered PNGs in one folder,
/// and an MP4 of them when `ffmpeg` is on the daemon's PATH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoFiles {
    /// The folder holding the frames.
    pub dir: PathBuf,
    pub frames: Vec<PathBuf>,
    pub mp4: Option<PathBuf>,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// The client went away.
    Cancelled,
}

/// Which part of an image generation a `progress` event reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStage {
    /// The text encoders turning the prompt into conditioning (once).
    Encode,
    /// One step of the sampler (`steps` of them).
    #[default]
    Denoise,
    /// The VAE turning one picture's latents into pixels (`count`).
    Decode,
}

/// What `generate` streams; the last item has `done: true`. Text models
/// stream `token`s, image models `progress`; both end with `done` (or
/// `error`). The serde impls below tell the two `done` shapes apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", tag = "event", rename_all = "snake_case")]
pub enum GenerateEvent {
    /// With `queue_events`: the job waits; sent when it is queued and
    /// whenever its place changes. `position` is 1-based among queued
    /// jobs, `ahead` counts running ones too, `eta_s` is null until the
    /// rates it needs have been measured.
    Queued {
        position: usize,
        ahead: usize,
        eta_s: Option<f64>,
    },
    Token {
        index: usize,
        id: u32,
        text: String,
    },
    /// Image models: one piece of a stage done (`step` of `steps`): the
    /// prompt encoded, a denoising step, a picture decoded.
    Progress {
        #[serde(default)]
        stage: ImageStage,
        step: usize,
        steps: usize,
        elapsed_ms: u64,
    },
    Done {
        done: bool,
        model: String,
        /// The mode the request ran in, if it named one.
        mode: Option<String>,
        seed: u64,
        text: String,
        token_ids: Vec<u32>,
        prompt_tokens: usize,
        completion_tokens: usize,
        prefill_tokens_per_s: f64,
        decode_tokens_per_s: f64,
        finish_reason: FinishReason,
    },
    /// Image models' last event, also `event: "done"`: told apart from a
    /// text `Done` by its `images` (see the serde impls below).
    #[serde(skip)]
    Images(ImagesDone),
    Error {
        done: bool,
        error: crate::error::RpcErrorObject,
    },
}

/// An image `done` event as it travels: the tag beside the fields.
#[derive(Serialize)]
struct TaggedImagesDone<'a> {
    event: &'static str,
    #[serde(flatten)]
    done: &'a ImagesDone,
}

impl Serialize for GenerateEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            GenerateEvent::Images(done) => TaggedImagesDone {
                event: "done",
                done,
            }
            .serialize(serializer),
            // The derived (remote = "Self") form, for every other event.
            other => GenerateEvent::serialize(other, serializer),
        }
    }
}

impl<'de> Deserialize<'de> for GenerateEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        if value["event"] == "done" && value.get("images").is_some() {
            return ImagesDone::deserialize(value)
                .map(GenerateEvent::Images)
                .map_err(D::Error::custom);
        }
        GenerateEvent::deserialize(value).map_err(D::Error::custom)
    }
}

/// A LoRA adapter applied to a mode's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraInfo {
    pub path: PathBuf,
    pub strength: f32,
    pub adapter_name: String,
}

/// Image generation defaults of a mode (`default_size`, `default_steps`,
/// `default_guidance`, `default_scheduler` keys); explicit request values
/// win, and without them a request gets 512x512, 4 steps, guidance 1.0 and
/// the model's own scheduler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_guidance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_scheduler: Option<String>,
}

/// Generation defaults of a mode; explicit request values win.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: &GenerateEvent) -> serde_json::Value {
        let value = serde_json::to_value(event).unwrap();
        let back: GenerateEvent = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(&back, event);
        value
    }

    #[test]
    fn load_replies_without_changed_files_read_and_write_as_before() {
        let model = serde_json::json!({
            "name": "m", "arch": "llama", "device": "cpu", "dtype": "f32",
            "path": "/m", "estimated_bytes": 1, "measured_bytes": 1,
            "load_ms": 1, "loaded_at": 1, "context_length": 8
        });
        let old = serde_json::json!({"model": model, "already_loaded": false});
        let reply: LoadReply = serde_json::from_value(old.clone()).unwrap();
        assert!(reply.changed_files.is_empty());
        let written = serde_json::to_value(&reply).unwrap();
        assert!(written.get("changed_files").is_none(), "{written}");
        let changed = LoadReply {
            changed_files: vec![ChangedFile {
                path: "/m/model.safetensors".into(),
                outcome: ChangeOutcome::Refetched,
            }],
            ..reply
        };
        let written = serde_json::to_value(&changed).unwrap();
        assert_eq!(
            written["changed_files"],
            serde_json::json!([{"path": "/m/model.safetensors", "outcome": "refetched"}])
        );
    }

    #[test]
    fn both_done_shapes_travel_as_done_and_come_back_as_sent() {
        let images = GenerateEvent::Images(ImagesDone {
            done: true,
            model: "sd".into(),
            mode: None,
            seed: 42,
            size: "64x64".into(),
            steps: 2,
            scheduler: "euler_a".into(),
            images: vec![ImageFile {
                path: "/tmp/a.png".into(),
                seed: 42,
                width: 64,
                height: 64,
                base64: None,
            }],
            generate_ms: 5,
            write_ms: 1,
            finish_reason: FinishReason::Length,
            video: None,
            videos: Vec::new(),
        });
        let value = round_trip(&images);
        assert_eq!(value["event"], "done");
        assert_eq!(value["images"][0]["seed"], 42);
        let text = GenerateEvent::Done {
            done: true,
            model: "m".into(),
            mode: Some("chat".into()),
            seed: 1,
            text: "hi".into(),
            token_ids: vec![1, 2],
            prompt_tokens: 3,
            completion_tokens: 2,
            prefill_tokens_per_s: 1.0,
            decode_tokens_per_s: 2.0,
            finish_reason: FinishReason::Eos,
        };
        assert_eq!(round_trip(&text)["event"], "done");
        let progress = GenerateEvent::Progress {
            stage: ImageStage::Decode,
            step: 1,
            steps: 2,
            elapsed_ms: 3,
        };
        let value = round_trip(&progress);
        assert_eq!(value["event"], "progress");
        assert_eq!(value["stage"], "decode");
    }
}
