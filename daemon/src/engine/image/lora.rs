//! LoRAs for image pipelines, merged into the UNet (or FLUX's
//! transformer) and text-encoder weights at load: `W += strength × (alpha / rank) × up · down`.
//!
//! FLUX adapters under Black Forest Labs' names (kohya's and XLabs') are
//! first renamed to the PEFT form (`flux::adapters`). Two namings are then
//! understood: diffusers/PEFT (`unet.<module>.lora_A.weight`
//! or FLUX's `transformer.<module>.lora_A.weight`,
//! `text_encoder.<module>.lora_B.weight`, SDXL's `text_encoder_2.<module>`,
//! optional `<module>.alpha`; no alpha means alpha = rank) and kohya
//! (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`,
//! `.alpha`; `lora_te_`/`lora_te1_` for the text encoder, `lora_te2_` for
//! SDXL's second). kohya names lose the dots, so they are matched against
//! the base weights' names; UNet modules may be named by their diffusers
//! path or, as kohya's scripts name SDXL's, by their SGM/LDM path
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use modeld_wire::types::LoraInfo;

use super::sd::single_file;
use super::weights::TensorMap;
use super::ImageError;

/// Which network a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    /// The UNet, or FLUX's transformer.
    Denoiser,
    TextEncoder,
    TextEncoder2,
}

/// The down (A) and up (B) matrices and alpha of one adapted module.
#[derive(Default)]
struct Module {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<f64>,
}

/// The part of a module a key holds.
enum Part {
    Down,
    Up,
    Alpha,
}

/// `(target, module name as written, part)` of one adapter key.
fn parse_key(key: &str) -> Option<(Target, &str, Part)> {
    let (target, rest) = if let Some(rest) = key
        .strip_prefix("unet.")
        .or_else(|| key.strip_prefix("transformer."))
    {
        (Target::Denoiser, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Target::TextEncoder, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (Target::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("lora_te2_") {
        (Target::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("lora_unet_") {
        (Target::Denoiser, rest)
    } else if let Some(rest) = key
        .strip_prefix("lora_te_")
        .or_else(|| key.strip_prefix("lora_te1_"))
    {
        (Target::TextEncoder, rest)
    } else {
        return None;
    };
    let suffixes = [
        (".lora_A.weight", Part::Down),
        (".lora_down.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    suffixes.into_iter().find_map(|(suffix, part)| {
        rest.strip_suffix(suffix)
            .map(|module| (target, module, part))
    })
}

/// The adapter's modules, by target and module name.
fn modules(
    file: &Path,
    tensors: HashMap<String, Tensor>,
) -> Result<HashMap<(Target, String), Module>, ImageError> {
    let mut modules: HashMap<(Target, String), Module> = HashMap::new();
    for (key, tensor) in tensors {
        let Some((target, name, part)) = parse_key(&key) else {
            continue;
        };
        let module = modules.entry((target, name.to_owned())).or_default();
        match part {
            Part::Down => module.down = Some((key, tensor)),
            Part::Up => module.up = Some((key, tensor)),
            Part::Alpha => {
                let value = tensor
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let alpha = value.first().copied().ok_or_else(|| {
                    ImageError::Files(format!("{}: {key} is empty", file.display()))
                })?;
                module.alpha = Some(alpha);
            }
        }
    }
    Ok(modules)
}

/// The base weight a module adapts: `<module>.weight` as written (or under
/// `text_model.`, which LoRAs saved with transformers 5's flattened
/// `CLIPTextModel` leave out), or the weight whose name with `.` → `_` is
/// the kohya module name.
fn base_key(base: &TensorMap, kohya: &HashMap<String, String>, module: &str) -> Option<String> {
    [
        format!("{module}.weight"),
        format!("text_model.{module}.weight"),
    ]
    .into_iter()
    .find(|key| base.contains_key(key))
    .or_else(|| kohya.get(module).cloned())
}

/// The diffusers-path kohya name of a UNet module kohya named by its
/// SGM/LDM path (`input_blocks_4_1_…`, `middle_block_1_…`,
/// `output_blocks_3_1_…`); `None` for other names. `layers` is the resnet
/// count of a down block, which places LDM block numbers.
fn from_ldm_path(module: &str, layers: usize) -> Option<String> {
    let (stem, numbers) = [
        ("input_blocks", 2),
        ("middle_block", 1),
        ("output_blocks", 2),
    ]
    .into_iter()
    .find(|(stem, _)| module.starts_with(&format!("{stem}_")))?;
    let mut parts = module[stem.len() + 1..].splitn(numbers + 1, '_');
    let indices = (0..numbers)
        .map(|_| parts.next()?.parse::<usize>().ok())
        .collect::<Option<Vec<_>>>()?;
    let tail = parts.next()?;
    let indices: Vec<String> = indices.iter().map(usize::to_string).collect();
    let dotted = format!("{stem}.{}.{tail}", indices.join("."));
    Some(single_file::unet_name(&dotted, layers).replace('.', "_"))
}

/// Resnets per down block of a diffusers UNet.
fn down_block_layers(unet: &TensorMap) -> usize {
    let layers: std::collections::BTreeSet<&str> = unet
        .keys()
        .filter_map(|k| k.strip_prefix("down_blocks.0.resnets.")?.split('.').next())
        .collect();
    layers.len()
}

/// kohya module name → base weight name, for every `*.weight` of `base`.
fn kohya_names(base: &TensorMap) -> HashMap<String, String> {
    base.keys()
        .filter_map(|key| {
            key.strip_suffix(".weight")
                .map(|stem| (stem.replace('.', "_"), key.clone()))
        })
        .collect()
}

/// The networks LoRAs adapt, as tensor maps.
pub struct Adapted<'a> {
    /// The UNet, or FLUX's transformer.
    pub denoiser: &'a mut TensorMap,
    pub text: &'a mut TensorMap,
    /// SDXL's second text encoder.
    pub text_2: Option<&'a mut TensorMap>,
}

impl Adapted<'_> {
    fn network(&self, target: Target) -> Option<&TensorMap> {
        match target {
            Target::Denoiser => Some(self.denoiser),
            Target::TextEncoder => Some(self.text),
            Target::TextEncoder2 => self.text_2.as_deref(),
        }
    }

    fn network_mut(&mut self, target: Target) -> Option<&mut TensorMap> {
        match target {
            Target::Denoiser => Some(self.denoiser),
            Target::TextEncoder => Some(self.text),
            Target::TextEncoder2 => self.text_2.as_deref_mut(),
        }
    }
}

/// A file's length and modification time: unmerging a LoRA later needs
/// the numbers that were merged, so a file changed since is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(file: &Path) -> Result<Self, ImageError> {
        let meta = std::fs::metadata(file)
            .map_err(|e| ImageError::Files(format!("LoRA {}: {e}", file.display())))?;
        Ok(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// A LoRA merged into a pipeline's weights.
#[derive(Debug, Clone)]
pub struct Merged {
    pub info: LoraInfo,
    stamp: FileStamp,
}

/// Whether two adapters change the weights the same way.
fn same_weights(a: &LoraInfo, b: &LoraInfo) -> bool {
    a.path == b.path && a.strength.to_bits() == b.strength.to_bits()
}

/// Changes the LoRAs merged into `nets` from `merged` to `wanted`:
/// adapters in both are left alone, those only in `merged` are subtracted
/// and those only in `wanted` added, each changed tensor summed in f32 and
/// written once at `dtype`. Everything is read and checked before any
/// tensor changes, so an error leaves `nets` as it was. A LoRA file to
/// subtract that changed since it was merged is `LoraChanged`.
pub fn remerge(
    mut nets: Adapted,
    merged: &[Merged],
    wanted: &[LoraInfo],
    dtype: DType,
) -> Result<Vec<Merged>, ImageError> {
    let mut left: Vec<Option<&Merged>> = merged.iter().map(Some).collect();
    let (mut result, mut changes) = (Vec::new(), Vec::new());
    for info in wanted {
        let kept = left
            .iter_mut()
            .find(|m| m.is_some_and(|m| same_weights(&m.info, info)))
            .and_then(Option::take);
        let stamp = match kept {
            Some(kept) => kept.stamp,
            None => {
                changes.push((info, 1.0));
                FileStamp::of(&info.path)?
            }
        };
        result.push(Merged {
            info: info.clone(),
            stamp,
        });
    }
    for removed in left.into_iter().flatten() {
        let file = &removed.info.path;
        if FileStamp::of(file).ok() != Some(removed.stamp) {
            return Err(ImageError::LoraChanged { file: file.clone() });
        }
        changes.push((&removed.info, -1.0));
    }
    let plan = plan(&nets, &changes)?;
    write(&mut nets, plan, dtype)?;
    Ok(result)
}

/// One adapted module's factors, `up · down` shaped as the weight once
/// multiplied, and the factor it is merged with (negative to unmerge).
struct Factors {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

/// The factors to merge into each changed weight, by network and name.
type Plan = HashMap<(Target, String), Vec<Factors>>;

/// Reads and checks every change: `(adapter, +1 to merge or -1 to unmerge)`.
fn plan(nets: &Adapted, changes: &[(&LoraInfo, f64)]) -> Result<Plan, ImageError> {
    let targets = [Target::Denoiser, Target::TextEncoder, Target::TextEncoder2];
    let kohya: HashMap<Target, HashMap<String, String>> = targets
        .into_iter()
        .filter_map(|t| Some((t, kohya_names(nets.network(t)?))))
        .collect();
    let layers = down_block_layers(nets.denoiser);
    let mut plan = Plan::new();
    for &(lora, sign) in changes {
        let file = lora.path.as_path();
        let tensors = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| ImageError::Files(format!("LoRA {}: {e}", file.display())))?;
        let tensors = super::flux::adapters::to_diffusers(tensors)?;
        let (mut matched, mut unmatched) = (0, 0);
        for ((target, name), module) in modules(file, tensors)? {
            let name = match target {
                Target::Denoiser => from_ldm_path(&name, layers).unwrap_or(name),
                _ => name,
            };
            // A text_encoder_2 module on a one-encoder pipeline is unmatched.
            let found = nets
                .network(target)
                .zip(kohya.get(&target))
                .and_then(|(base, names)| Some((base, base_key(base, names, &name)?)));
            let Some((base, key)) = found else {
                unmatched += 1;
                continue;
            };
            let strength = sign * lora.strength as f64;
            let factors = factors(file, &name, &module, (&base[&key], &key), strength)?;
            plan.entry((target, key)).or_default().push(factors);
            matched += 1;
        }
        if matched == 0 {
            return Err(ImageError::LoraNoMatch {
                file: file.to_path_buf(),
            });
        }
        if unmatched > 0 {
            tracing::warn!(lora = %file.display(), unmatched, "LoRA modules with no matching weight were skipped");
        }
        let action = if sign > 0.0 { "merged" } else { "unmerged" };
        tracing::info!(adapter = %lora.adapter_name, modules = matched, "image LoRA {action}");
    }
    Ok(plan)
}

/// Writes every planned weight: `weight + Σ scale × up · down`, computed in
/// f32 on the weight's device and stored at `dtype`. A scaled fp8 weight
/// (stored `W / s` beside its scale `s`) is multiplied out first and its
/// scale dropped: the adapters change `W`, and adding them to `W / s`
/// would shrink them by `s`, often a thousandfold.
fn write(nets: &mut Adapted, plan: Plan, dtype: DType) -> Result<(), ImageError> {
    for ((target, key), factors) in plan {
        let Some(base) = nets.network_mut(target) else {
            continue;
        };
        let weight = &base[&key];
        let device = weight.device();
        let scale_key = fp8_scale_key(base, &key);
        let mut sum = weight.to_dtype(DType::F32)?;
        if let Some(scale_key) = &scale_key {
            sum = sum.broadcast_mul(&base[scale_key].to_dtype(DType::F32)?)?;
        }
        for Factors { down, up, scale } in factors {
            let down = down.to_device(device)?.to_dtype(DType::F32)?;
            let up = up.to_device(device)?.to_dtype(DType::F32)?;
            let delta = (up.matmul(&down)? * scale)?.reshape(weight.dims())?;
            sum = (sum + delta)?;
        }
        let updated = sum.to_dtype(dtype)?;
        base.insert(key, updated);
        if let Some(scale_key) = scale_key {
            base.remove(&scale_key);
        }
    }
    Ok(())
}

/// The key of the scale stored beside `weight_key` (`X.weight`): ComfyUI's
/// `X.scale_weight` or `X.weight_scale`.
fn fp8_scale_key(tensors: &TensorMap, weight_key: &str) -> Option<String> {
    let module = weight_key.strip_suffix(".weight")?;
    ["scale_weight", "weight_scale"]
        .iter()
        .map(|spelling| format!("{module}.{spelling}"))
        .find(|key| tensors.contains_key(key))
}

/// The module's factors for `target` (the weight and its name), after
/// checking that their shapes fit it; `strength` is signed.
fn factors(
    file: &Path,
    name: &str,
    module: &Module,
    (weight, target): (&Tensor, &str),
    strength: f64,
) -> Result<Factors, ImageError> {
    let missing = |part: &str| {
        ImageError::Files(format!(
            "LoRA {}: {name} has no {part} matrix",
            file.display()
        ))
    };
    let (down_key, down) = module
        .down
        .as_ref()
        .ok_or_else(|| missing("down (lora_A)"))?;
    let (up_key, up) = module.up.as_ref().ok_or_else(|| missing("up (lora_B)"))?;
    let out = weight.dim(0)?;
    let inputs = weight.elem_count() / out.max(1);
    let rank = down.dim(0)?;
    let shape_error = |key: &str, tensor: &Tensor| ImageError::LoraShape {
        file: file.to_path_buf(),
        tensor: key.to_owned(),
        got: tensor.dims().to_vec(),
        target: target.to_owned(),
        expected: weight.dims().to_vec(),
    };
    if down.elem_count() != rank * inputs {
        return Err(shape_error(down_key, down));
    }
    if up.dim(0)? != out || up.elem_count() != out * rank {
        return Err(shape_error(up_key, up));
    }
    Ok(Factors {
        down: down.reshape((rank, inputs))?,
        up: up.reshape((out, rank))?,
        scale: strength * module.alpha.map_or(1.0, |alpha| alpha / rank as f64),
    })
}
