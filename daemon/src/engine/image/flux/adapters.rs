//! FLUX LoRAs saved under Black Forest Labs' module names, as kohya's
//! scripts (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`) and
//! XLabs (`double_blocks.0.processor.qkv_lora1.down.weight`) save them,
//! turned into the PEFT form under diffusers' names that the LoRA merger
//! reads. A fused projection's adapter becomes one adapter per part: the
//! down matrix (and alpha) shared, the up matrix cut by rows as the fused
//! weight is, so each part's `up · down` is that part's rows of the fused
//! delta. Keys of other namings pass unchanged.

use std::collections::HashMap;

use candle_core::Tensor;

use super::single_file::bfl_entries;
use crate::engine::image::ImageError;

type Tensors = HashMap<String, Tensor>;

/// The adapter's tensors with every BFL-named module renamed.
pub fn to_diffusers(tensors: Tensors) -> Result<Tensors, ImageError> {
    let mut modules: HashMap<String, Module> = HashMap::new();
    let mut out = Tensors::new();
    for (key, tensor) in tensors {
        match parse(&key) {
            Some((module, part)) => {
                let entry = modules.entry(module).or_default();
                match part {
                    Part::Down => entry.down = Some(tensor),
                    Part::Up => entry.up = Some(tensor),
                    Part::Alpha => entry.alpha = Some(tensor),
                }
            }
            None => {
                out.insert(key, tensor);
            }
        }
    }
    for (module, parts) in modules {
        parts.split(&module, &mut out)?;
    }
    Ok(out)
}

enum Part {
    Down,
    Up,
    Alpha,
}

#[derive(Default)]
struct Module {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

impl Module {
    /// PEFT entries for each diffusers module the BFL `module` becomes.
    fn split(self, module: &str, out: &mut Tensors) -> Result<(), ImageError> {
        let missing = |what: &str| ImageError::Files(format!("LoRA module {module} has no {what}"));
        let down = self.down.ok_or_else(|| missing("down matrix"))?;
        let up = self.up.ok_or_else(|| missing("up matrix"))?;
        // Fused q/k/v and linear1 take the hidden width as input.
        let hidden = down.dim(1)?;
        for (name, up_part) in bfl_entries(&format!("{module}.weight"), up, hidden)? {
            let target = name.strip_suffix(".weight").unwrap_or(&name);
            let key = |part: &str| format!("transformer.{target}.{part}");
            out.insert(key("lora_A.weight"), down.clone());
            out.insert(key("lora_B.weight"), up_part);
            if let Some(alpha) = &self.alpha {
                out.insert(key("alpha"), alpha.clone());
            }
        }
        Ok(())
    }
}

/// `(BFL module with dots, part)` of a kohya or XLabs FLUX key.
fn parse(key: &str) -> Option<(String, Part)> {
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        let (module, part) = rest.split_once('.')?;
        let part = match part {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            _ => return None,
        };
        return Some((kohya_module(module)?, part));
    }
    xlabs(key)
}

/// `double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv`;
/// `None` for modules that are not FLUX blocks (an SD UNet's).
fn kohya_module(module: &str) -> Option<String> {
    for stem in ["double_blocks", "single_blocks"] {
        let Some(rest) = module.strip_prefix(stem).and_then(|r| r.strip_prefix('_')) else {
            continue;
        };
        let (index, part) = rest.split_once('_')?;
        index.parse::<usize>().ok()?;
        let part = match part {
            "linear1" | "linear2" => part.to_string(),
            // `img_attn_qkv`, `txt_mlp_0`, `img_mod_lin`, `modulation_lin`:
            // the last underscore is the dot.
            _ => {
                let (module, leaf) = part.rsplit_once('_')?;
                format!("{module}.{leaf}")
            }
        };
        return Some(format!("{stem}.{index}.{part}"));
    }
    None
}

/// XLabs keys: `double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`,
/// stream 1 the image's and 2 the text's.
fn xlabs(key: &str) -> Option<(String, Part)> {
    let rest = key.strip_prefix("double_blocks.")?;
    let (index, rest) = rest.split_once(".processor.")?;
    let (adapter, part) = rest.split_once('.')?;
    let part = match part {
        "down.weight" => Part::Down,
        "up.weight" => Part::Up,
        _ => return None,
    };
    let module = match adapter {
        "qkv_lora1" => "img_attn.qkv",
        "qkv_lora2" => "txt_attn.qkv",
        "proj_lora1" => "img_attn.proj",
        "proj_lora2" => "txt_attn.proj",
        _ => return None,
    };
    Some((format!("double_blocks.{index}.{module}"), part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tensor(shape: &[usize], start: f32) -> Tensor {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count).map(|i| start + i as f32).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_fused_qkv_adapter_becomes_three_with_the_up_rows_cut() {
        let (hidden, rank) = (4, 2);
        let tensors = Tensors::from([
            (
                "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight".to_string(),
                tensor(&[rank, hidden], 0.0),
            ),
            (
                "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight".to_string(),
                tensor(&[3 * hidden, rank], 100.0),
            ),
            (
                "lora_unet_double_blocks_1_img_attn_qkv.alpha".to_string(),
                Tensor::new(1f32, &Device::Cpu).unwrap(),
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha".to_string(),
                Tensor::new(1f32, &Device::Cpu).unwrap(),
            ),
        ]);
        let out = to_diffusers(tensors).unwrap();
        let up = |name: &str| {
            out[&format!("transformer.transformer_blocks.1.attn.{name}.lora_B.weight")]
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // k's rows are the fused up's rows 4..8.
        assert_eq!(up("to_k")[0], 100.0 + (hidden * rank) as f32);
        assert_eq!(up("to_v").len(), hidden * rank);
        assert!(out.contains_key("transformer.transformer_blocks.1.attn.to_q.lora_A.weight"));
        assert!(out.contains_key("transformer.transformer_blocks.1.attn.to_q.alpha"));
        assert!(out.contains_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"));
    }

    #[test]
    fn single_block_and_xlabs_names_map_to_diffusers_modules() {
        assert_eq!(
            kohya_module("single_blocks_7_modulation_lin").as_deref(),
            Some("single_blocks.7.modulation.lin")
        );
        assert_eq!(
            kohya_module("single_blocks_7_linear1").as_deref(),
            Some("single_blocks.7.linear1")
        );
        assert!(kohya_module("down_blocks_0_attentions_0_proj_in").is_none());
        let (module, _) = xlabs("double_blocks.3.processor.proj_lora2.up.weight").unwrap();
        assert_eq!(module, "double_blocks.3.txt_attn.proj");
    }
}
