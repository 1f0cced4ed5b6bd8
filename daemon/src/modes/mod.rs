//! `modes.toml`: named set-ups of a model, LoRA adapters and default
//! generation parameters. A file is validated as a whole, every problem
//! reported at once with its mode and field; a file with any problem
//! changes nothing. [`watch`] reloads it when its content changes.

pub mod watch;

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use modeld_wire::types::{GenerateParams, GenerationDefaults, ImageDefaults, LoraInfo, ModeInfo};
use serde::Deserialize;

use crate::engine::image::request::ValidImage;
use crate::engine::request::{apply_defaults, apply_image_defaults};
use crate::engine::text::sampling::ValidGenerate;
use crate::validate::valid_name;

#[derive(Debug, thiserror::Error)]
pub enum ModesError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {}:\n  {}", path.display(), errors.join("\n  "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

/// A mode name that is not among the modes in force.
#[derive(Debug, thiserror::Error)]
#[error("no mode named {0:?}")]
pub struct UnknownMode(pub String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModesFile {
    model_root: Option<PathBuf>,
    lora_root: Option<PathBuf>,
    default_mode: Option<String>,
    #[serde(default)]
    modes: BTreeMap<String, ModeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeEntry {
    model: String,
    #[serde(default)]
    loras: Vec<LoraEntry>,
    #[serde(default)]
    defaults: GenerationDefaults,
    default_size: Option<String>,
    default_steps: Option<u32>,
    default_guidance: Option<f64>,
    default_scheduler: Option<String>,
    keep_alive: Option<KeepAlive>,
    description: Option<String>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    /// A single-file model's VAE kept apart, under `model_root`.
    vae: Option<String>,
    /// Its text encoders kept apart, under `model_root`.
    #[serde(default)]
    text_encoders: Vec<String>,
    /// A registered model, or a folder under `model_root`, supplying the
    /// tokenizers and configs the files lack; for a runner model, the
    /// pipeline its single file belongs to (`pipeline` says the same).
    #[serde(alias = "pipeline")]
    config: Option<String>,
    /// Run on this runner (`diffusers` or a `[runners.NAME]` of
    /// modeld.toml) instead of natively.
    runner: Option<String>,
    /// FLUX: keep the text encoders in system memory, on the CPU.
    #[serde(default)]
    offload_text_encoders: bool,
}

/// `"style.safetensors"`, or `{ path, strength, adapter_name }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LoraEntry {
    Path(String),
    Full {
        path: String,
        #[serde(default = "one")]
        strength: f32,
        adapter_name: Option<String>,
    },
}

fn one() -> f32 {
    1.0
}

/// `"10m"`, `"90s"`, `"forever"`, or seconds as a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepAlive {
    Seconds(u64),
    Text(String),
}

/// What a mode runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Registered(String),
    /// A model directory, or one `.safetensors` or `.gguf` file, under
    /// `model_root`.
    Path(PathBuf),
}

/// A single-file image model's components kept apart from it, as a
/// ComfyUI `models/` tree keeps them, and where its tokenizers and configs
/// come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModeParts {
    pub vae: Option<PathBuf>,
    pub text_encoders: Vec<PathBuf>,
    pub config: Option<ModelRef>,
    /// FLUX: the text encoders stay in system memory and run on the CPU.
    pub offload_text_encoders: bool,
    /// The keys as written, for `modes.list`.
    written: (Option<String>, Vec<String>, Option<String>),
}

#[derive(Debug, Clone)]
pub struct Mode {
    pub name: String,
    pub model: ModelRef,
    pub model_text: String,
    pub parts: ModeParts,
    pub loras: Vec<LoraInfo>,
    pub defaults: GenerationDefaults,
    pub image_defaults: ImageDefaults,
    pub keep_alive: Option<Duration>,
    pub description: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The runner named by the mode, if any.
    pub runner: Option<String>,
}

impl Mode {
    /// The engine's name for this mode's model: the registry name, or a
    /// name derived from the path and adapters, so two modes that differ
    /// only in LoRAs are two resident models.
    pub fn model_key(&self) -> String {
        let base = match &self.model {
            ModelRef::Registered(name) => name.clone(),
            ModelRef::Path(_) => format!("{}+path", self.name),
        };
        // Adapters or components of its own make the mode's model another
        // resident than the registered one.
        if self.loras.is_empty() && self.parts == ModeParts::default() {
            base
        } else {
            format!("{base}+{}", self.name)
        }
    }

    pub fn info(&self) -> ModeInfo {
        ModeInfo {
            name: self.name.clone(),
            model: self.model_text.clone(),
            loras: self.loras.clone(),
            defaults: self.defaults.clone(),
            image_defaults: self.image_defaults.clone(),
            keep_alive_s: self.keep_alive.map(|d| d.as_secs()),
            description: self.description.clone(),
            metadata: self.metadata.clone(),
            vae: self.parts.written.0.clone(),
            text_encoders: self.parts.written.1.clone(),
            config: self.parts.written.2.clone(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Modes {
    pub model_root: Option<PathBuf>,
    pub lora_root: Option<PathBuf>,
    pub default_mode: Option<String>,
    pub modes: BTreeMap<String, Mode>,
}

impl Modes {
    /// Validates the bytes read from `path`; `is_registered` says whether a
    /// model name is in the registry.
    pub fn from_bytes(
        path: &Path,
        bytes: &[u8],
        is_registered: &dyn Fn(&str) -> bool,
    ) -> Result<Modes, ModesError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ModesError::Invalid {
            path: path.to_path_buf(),
            errors: vec![format!("not UTF-8: {e}")],
        })?;
        Modes::parse(path, text, is_registered)
    }

    pub fn parse(
        path: &Path,
        text: &str,
        is_registered: &dyn Fn(&str) -> bool,
    ) -> Result<Modes, ModesError> {
        let invalid = |errors| ModesError::Invalid {
            path: path.to_path_buf(),
            errors,
        };
        let file: ModesFile = toml::from_str(text).map_err(|e| invalid(vec![e.to_string()]))?;
        let mut errors = Vec::new();
        for (field, root) in [
            ("model_root", &file.model_root),
            ("lora_root", &file.lora_root),
        ] {
            if let Some(root) = root {
                if !root.is_absolute() {
                    errors.push(format!(
                        "{field}: {} must be an absolute path",
                        root.display()
                    ));
                } else if !root.is_dir() {
                    errors.push(format!("{field}: {} is not a directory", root.display()));
                }
            }
        }
        if let Some(default) = &file.default_mode {
            if !file.modes.contains_key(default) {
                errors.push(format!("default_mode: no mode named {default:?}"));
            }
        }
        // Adapters usually sit beside the models: without a lora_root,
        // LoRA paths are taken under model_root.
        let lora_root = file.lora_root.or_else(|| file.model_root.clone());
        let mut modes = BTreeMap::new();
        for (name, entry) in file.modes {
            if let Some(mode) = validate_mode(
                &name,
                entry,
                &file.model_root,
                &lora_root,
                is_registered,
                &mut errors,
            ) {
                modes.insert(name, mode);
            }
        }
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
        Ok(Modes {
            model_root: file.model_root,
            lora_root,
            default_mode: file.default_mode,
            modes,
        })
    }
}

fn validate_mode(
    name: &str,
    entry: ModeEntry,
    model_root: &Option<PathBuf>,
    lora_root: &Option<PathBuf>,
    is_registered: &dyn Fn(&str) -> bool,
    errors: &mut Vec<String>,
) -> Option<Mode> {
    let before = errors.len();
    let at = |field: &str| format!("modes.{name}.{field}");
    if valid_name(name).is_err() {
        errors.push(format!(
            "modes.{name}: mode names use letters, digits and . _ - :"
        ));
    }
    let model = if is_registered(&entry.model) {
        Some(ModelRef::Registered(entry.model.clone()))
    } else {
        match inside_root(model_root, &entry.model).and_then(model_file_kind) {
            Ok(path) => Some(ModelRef::Path(path)),
            Err(why) => {
                errors.push(format!(
                    "{}: {:?} is not a registered model, and {why}",
                    at("model"),
                    entry.model
                ));
                None
            }
        }
    };
    let parts = validate_parts(&entry, &model, model_root, is_registered, &at, errors);
    let mut loras = Vec::new();
    for (index, lora) in entry.loras.into_iter().enumerate() {
        let field = at(&format!("loras[{index}]"));
        let (path, strength, adapter) = match lora {
            LoraEntry::Path(path) => (path, 1.0, None),
            LoraEntry::Full {
                path,
                strength,
                adapter_name,
            } => (path, strength, adapter_name),
        };
        let resolved = match inside_root(lora_root, &path) {
            Ok(resolved) => resolved,
            Err(why) => {
                errors.push(format!("{field}.path: {why}"));
                continue;
            }
        };
        if !(strength.is_finite() && (-4.0..=4.0).contains(&strength)) {
            errors.push(format!(
                "{field}.strength: {strength} is out of range (-4 to 4)"
            ));
        }
        let adapter_name = adapter.unwrap_or_else(|| {
            resolved
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        if loras
            .iter()
            .any(|l: &LoraInfo| l.adapter_name == adapter_name)
        {
            errors.push(format!(
                "{field}.adapter_name: {adapter_name:?} is used twice"
            ));
        }
        loras.push(LoraInfo {
            path: resolved,
            strength,
            adapter_name,
        });
    }
    if let Some(runner) = entry.runner.as_deref().filter(|r| valid_name(r).is_err()) {
        errors.push(format!(
            "{}: {runner:?}: runner names use letters, digits and . _ - :",
            at("runner")
        ));
    }
    check_defaults(&entry.defaults, &at("defaults"), errors);
    let image_defaults = ImageDefaults {
        default_size: entry.default_size,
        default_steps: entry.default_steps,
        default_guidance: entry.default_guidance,
        default_scheduler: entry.default_scheduler,
    };
    check_image_defaults(&image_defaults, &at(""), errors);
    let keep_alive = match entry.keep_alive {
        None => None,
        Some(KeepAlive::Seconds(secs)) => Some(Duration::from_secs(secs)),
        Some(KeepAlive::Text(text)) if text == "forever" => None,
        Some(KeepAlive::Text(text)) => match humantime::parse_duration(&text) {
            Ok(duration) => Some(duration),
            Err(err) => {
                errors.push(format!(
                    "{}: {text:?} is not a duration like \"10m\" or \"forever\": {err}",
                    at("keep_alive")
                ));
                None
            }
        },
    };
    (errors.len() == before).then(|| Mode {
        name: name.to_string(),
        model: model.expect("no error means a model"),
        model_text: entry.model,
        parts,
        loras,
        defaults: entry.defaults,
        image_defaults,
        keep_alive,
        description: entry.description,
        metadata: entry.metadata,
        runner: entry.runner,
    })
}

/// A mode's `vae`, `text_encoders` and `config`: files (and a folder)
/// under `model_root`, going with a single-file model.
fn validate_parts(
    entry: &ModeEntry,
    model: &Option<ModelRef>,
    model_root: &Option<PathBuf>,
    is_registered: &dyn Fn(&str) -> bool,
    at: &dyn Fn(&str) -> String,
    errors: &mut Vec<String>,
) -> ModeParts {
    let written = (
        entry.vae.clone(),
        entry.text_encoders.clone(),
        entry.config.clone(),
    );
    if written == (None, Vec::new(), None) {
        return ModeParts {
            offload_text_encoders: entry.offload_text_encoders,
            ..ModeParts::default()
        };
    }
    let single_file = matches!(model, Some(ModelRef::Path(p)) if p.is_file());
    if model.is_some() && !single_file {
        errors.push(format!(
            "{}: vae, text_encoders and config go with a single .safetensors model file under model_root",
            at("model")
        ));
    }
    let mut file = |field: String, relative: &str| -> Option<PathBuf> {
        let found = inside_root(model_root, relative).and_then(|path| {
            let weights = path.is_file() && path.extension().is_some_and(|e| e == "safetensors");
            weights
                .then_some(path)
                .ok_or_else(|| format!("{relative:?} is not a .safetensors file"))
        });
        found
            .map_err(|why| errors.push(format!("{field}: {why}")))
            .ok()
    };
    let vae = entry.vae.as_deref().and_then(|v| file(at("vae"), v));
    let text_encoders = entry
        .text_encoders
        .iter()
        .enumerate()
        .filter_map(|(i, t)| file(at(&format!("text_encoders[{i}]")), t))
        .collect();
    let config = entry.config.as_deref().and_then(|config| {
        if is_registered(config) {
            return Some(ModelRef::Registered(config.to_string()));
        }
        match inside_root(model_root, config) {
            Ok(dir) if dir.is_dir() => Some(ModelRef::Path(dir)),
            Ok(_) => {
                errors.push(format!("{}: {config:?} is not a folder", at("config")));
                None
            }
            Err(why) => {
                errors.push(format!(
                    "{}: {config:?} is not a registered model, and {why}",
                    at("config")
                ));
                None
            }
        }
    });
    ModeParts {
        vae,
        text_encoders,
        config,
        offload_text_encoders: entry.offload_text_encoders,
        written,
    }
}

/// `relative` resolved under `root`, refusing anything that would leave it.
fn inside_root(root: &Option<PathBuf>, relative: &str) -> Result<PathBuf, String> {
    let Some(root) = root else {
        return Err("no root is set for paths (model_root / lora_root)".to_string());
    };
    let path = Path::new(relative);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "{relative:?} must be a relative path inside {}",
            root.display()
        ));
    }
    let joined = root.join(path);
    let real = joined
        .canonicalize()
        .map_err(|e| format!("{}: {e}", joined.display()))?;
    let real_root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    if !real.starts_with(&real_root) {
        return Err(format!(
            "{relative:?} leads outside {} through a symlink",
            root.display()
        ));
    }
    Ok(real)
}

/// A model under `model_root` is a directory, or one `.safetensors` or
/// `.gguf` file.
fn model_file_kind(path: PathBuf) -> Result<PathBuf, String> {
    let extension = path.extension().and_then(|e| e.to_str());
    if path.is_dir() || matches!(extension, Some("safetensors" | "gguf")) {
        return Ok(path);
    }
    Err(format!(
        "{} is neither a model directory nor a .safetensors or .gguf file",
        path.display()
    ))
}

/// Runs the defaults through the same checks a request gets.
fn check_defaults(defaults: &GenerationDefaults, at: &str, errors: &mut Vec<String>) {
    let params = GenerateParams {
        model: "probe".into(),
        prompt: Some(String::new()),
        ..Default::default()
    };
    if let Err(err) = ValidGenerate::try_from(apply_defaults(params, defaults)) {
        errors.push(format!("{at}.{}: {}", err.field, err.message));
    }
}

/// Runs the image defaults through the checks an image request gets;
/// `at` is the mode's prefix (`modes.NAME.`).
fn check_image_defaults(defaults: &ImageDefaults, at: &str, errors: &mut Vec<String>) {
    let params = GenerateParams {
        model: "probe".into(),
        prompt: Some(String::new()),
        ..Default::default()
    };
    let params = apply_image_defaults(params, defaults);
    if let Err(err) = ValidImage::from_params(&params, "probe".into(), 0) {
        errors.push(format!("{at}default_{}: {}", err.field, err.message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Modes, ModesError> {
        Modes::parse(Path::new("modes.toml"), text, &|name| name == "llama")
    }

    #[test]
    fn simple_and_full_lora_forms() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("style.safetensors"), b"").unwrap();
        std::fs::write(root.path().join("other.safetensors"), b"").unwrap();
        let text = format!(
            r#"lora_root = "{}"
default_mode = "chat"
[modes.chat]
model = "llama"
loras = ["style.safetensors", {{ path = "other.safetensors", strength = 0.5, adapter_name = "o" }}]
keep_alive = "10m"
[modes.chat.defaults]
temperature = 0.7
"#,
            root.path().display()
        );
        let modes = parse(&text).unwrap();
        let chat = &modes.modes["chat"];
        assert_eq!(chat.model, ModelRef::Registered("llama".into()));
        assert_eq!(chat.loras[0].adapter_name, "style");
        assert_eq!(chat.loras[1].strength, 0.5);
        assert_eq!(chat.keep_alive, Some(Duration::from_secs(600)));
        assert_eq!(chat.model_key(), "llama+chat");
    }

    #[test]
    fn every_error_is_reported_with_mode_and_field() {
        let text = r#"
default_mode = "missing"
[modes.a]
model = "unknown"
[modes.b]
model = "llama"
keep_alive = "soon"
[modes.b.defaults]
temperature = -1.0
[modes.c]
model = "llama"
loras = ["../x.safetensors"]
"#;
        let err = parse(text).unwrap_err().to_string();
        for needle in [
            "default_mode",
            "modes.a.model",
            "modes.b.keep_alive",
            "modes.b.defaults.temperature",
            "modes.c.loras[0].path",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }

    #[test]
    fn the_documented_example_uses_only_real_fields() {
        let text = include_str!("../../../modes.toml.example");
        let file: ModesFile = toml::from_str(text).expect("modes.toml.example parses");
        assert_eq!(file.modes.len(), 4);
        assert_eq!(file.modes["art"].default_steps, Some(20));
        assert!(matches!(
            file.modes["poet"].loras[1],
            LoraEntry::Full { .. }
        ));
    }

    #[test]
    fn paths_stay_inside_model_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("m")).unwrap();
        std::fs::write(root.path().join("m/one.safetensors"), b"").unwrap();
        std::fs::write(root.path().join("m/notes.txt"), b"").unwrap();
        let text = format!(
            "model_root = \"{}\"\n[modes.x]\nmodel = \"m\"\n[modes.y]\nmodel = \"../etc\"\n\
             [modes.z]\nmodel = \"m/one.safetensors\"\n[modes.w]\nmodel = \"m/notes.txt\"\n",
            root.path().display()
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("modes.y.model")
                && err.contains("modes.w.model")
                && !err.contains("modes.x")
                && !err.contains("modes.z"),
            "{err}"
        );
    }

    #[test]
    fn a_runner_single_file_names_its_pipeline_and_runner() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("diffusion_models")).unwrap();
        std::fs::create_dir_all(root.path().join("qwen-edit")).unwrap();
        std::fs::write(root.path().join("diffusion_models/q.safetensors"), b"").unwrap();
        let text = format!(
            "model_root = \"{}\"\n[modes.edit]\nmodel = \"diffusion_models/q.safetensors\"\n\
             pipeline = \"qwen-edit\"\nrunner = \"diffusers\"\n\
             [modes.bad]\nmodel = \"diffusion_models/q.safetensors\"\npipeline = \"../x\"\nrunner = \"a b\"\n",
            root.path().display()
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("modes.bad.config") && err.contains("modes.bad.runner"),
            "{err}"
        );
        assert!(!err.contains("modes.edit"), "{err}");
        let good = text.split("[modes.bad]").next().unwrap();
        let modes = parse(good).unwrap();
        let edit = &modes.modes["edit"];
        assert_eq!(edit.runner.as_deref(), Some("diffusers"));
        let pipeline = root.path().join("qwen-edit").canonicalize().unwrap();
        assert_eq!(edit.parts.config, Some(ModelRef::Path(pipeline)));
    }

    #[test]
    fn lora_paths_default_to_model_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("m")).unwrap();
        std::fs::write(root.path().join("style.safetensors"), b"").unwrap();
        let text = format!(
            "model_root = \"{}\"\n[modes.x]\nmodel = \"m\"\nloras = [\"style.safetensors\"]\n",
            root.path().display()
        );
        let modes = parse(&text).unwrap();
        assert_eq!(modes.lora_root, modes.model_root);
        assert!(modes.modes["x"].loras[0]
            .path
            .ends_with("style.safetensors"));
    }
}
