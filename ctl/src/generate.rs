//! Engine commands: load, unload and generate (text streamed as it comes;
//! for image models, progress per step and the paths of the pictures).

use std::io::Write;

use clap::Args;
use modeld_wire::methods;
use modeld_wire::types::{
    format_bytes, ChangeOutcome, ChatMessage, GenerateEvent, GenerateParams, ImageStage,
    InitImages, LoadParams, LoadReply, NameParams, UnloadReply,
};
use modeld_wire::Client;

use crate::output::print_json;
use crate::{Failure, Outcome};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Registered model name, or a mode name with --mode
    target: String,
    /// The prompt text
    prompt: String,
    /// TARGET names a mode: its model and defaults, switching to it first
    #[arg(long)]
    mode: bool,
    /// Send the prompt as a user chat message through the model's template
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 is greedy
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Stop when this text appears; repeat for several
    #[arg(long)]
    stop: Vec<String>,
    /// Image models: what the pictures should not show
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image models: WIDTHxHEIGHT, such as 512x512
    #[arg(long)]
    size: Option<String>,
    /// Image models: denoising steps
    #[arg(long)]
    steps: Option<u32>,
    /// Image models: classifier-free guidance scale (1 is off)
    #[arg(long)]
    guidance: Option<f64>,
    /// Image models: how many pictures
    #[arg(long)]
    count: Option<u32>,
    /// Image models: ddim, euler, euler_a, ddpm, dpmpp_2m or unipc
    #[arg(long)]
    scheduler: Option<String>,
    /// Image models, img2img: the PNG to start from (size defaults to its);
    /// repeat it for edit pipelines that take several pictures
    #[arg(long)]
    init_image: Vec<std::path::PathBuf>,
    /// Image models, img2img: how much to redraw, in (0, 1]
    #[arg(long)]
    strength: Option<f64>,
    /// FLUX models: the T5 prompt's token budget (1-512).
    #[arg(long)]
    max_sequence_length: Option<u32>,
    /// Video models (on a runner): frames per video
    #[arg(long)]
    frames: Option<u32>,
    /// Runner models: a further parameter the runner declares, as
    /// NAME=JSON (for example shift=3.0); repeatable
    #[arg(long = "option", value_name = "NAME=JSON")]
    options: Vec<String>,
}

/// The `--option NAME=JSON` pairs as the request's `options`.
fn options(
    args: &GenerateArgs,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, Failure> {
    if args.options.is_empty() {
        return Ok(None);
    }
    let mut options = serde_json::Map::new();
    for option in &args.options {
        let (name, value) = option
            .split_once('=')
            .ok_or_else(|| Failure::Error(format!("--option {option:?}: expected NAME=JSON")))?;
        // A bare word is taken as a string, so `--option sampler=euler` works.
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::json!(value));
        options.insert(name.to_string(), value);
    }
    Ok(Some(options))
}

/// The `--init-image` files as the request's base64: one picture, or a
/// list when several are given.
fn init_image(args: &GenerateArgs) -> Result<Option<InitImages>, Failure> {
    use base64::Engine as _;
    let mut pictures = Vec::with_capacity(args.init_image.len());
    for path in &args.init_image {
        let bytes = std::fs::read(path)
            .map_err(|err| Failure::Error(format!("{}: {err}", path.display())))?;
        pictures.push(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Ok(match pictures.len() {
        0 => None,
        1 => Some(InitImages::One(pictures.remove(0))),
        _ => Some(InitImages::Many(pictures)),
    })
}

pub fn load(
    client: &mut Client,
    name: &str,
    device: &Option<String>,
    dtype: &Option<String>,
    json: bool,
) -> Outcome {
    let params = LoadParams {
        name: name.into(),
        device: device.clone(),
        dtype: dtype.clone(),
    };
    let reply: LoadReply = client.call(methods::LOAD, &params)?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    for changed in &reply.changed_files {
        let what = match changed.outcome {
            ChangeOutcome::Unchanged => {
                "changed since it was checked; hashed again, its bytes match"
            }
            ChangeOutcome::Refetched => {
                "changed since it was checked and no longer matched; fetched again"
            }
            ChangeOutcome::Modified => {
                "changed since it was verified; loaded as it is (local files are never fetched)"
            }
        };
        println!("{}: {what}", changed.path.display());
    }
    if reply.already_loaded {
        println!("{name} is already loaded on {}", reply.model.device);
    } else {
        let model = &reply.model;
        println!(
            "loaded {name} ({}, {} {}) in {} ms, {} resident (estimated {})",
            model.arch,
            model.device,
            model.dtype,
            model.load_ms,
            format_bytes(model.measured_bytes),
            format_bytes(model.estimated_bytes)
        );
    }
    Ok(())
}

pub fn unload(client: &mut Client, name: &str, json: bool) -> Outcome {
    let reply: UnloadReply = client.call(methods::UNLOAD, NameParams { name: name.into() })?;
    if json {
        print_json(&reply);
    } else {
        println!("unloaded {name}, {} freed", format_bytes(reply.freed_bytes));
    }
    Ok(())
}

pub fn generate(client: &mut Client, args: &GenerateArgs, json: bool) -> Outcome {
    let (prompt, messages) = if args.chat {
        let message = ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        };
        (None, Some(vec![message]))
    } else {
        (Some(args.prompt.clone()), None)
    };
    let (model, mode) = if args.mode {
        (String::new(), Some(args.target.clone()))
    } else {
        (args.target.clone(), None)
    };
    let params = GenerateParams {
        model,
        mode,
        prompt,
        messages,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: None,
        stop: (!args.stop.is_empty()).then(|| args.stop.clone()),
        negative_prompt: args.negative_prompt.clone(),
        size: args.size.clone(),
        steps: args.steps,
        guidance: args.guidance,
        count: args.count,
        inline: None,
        scheduler: args.scheduler.clone(),
        init_image: init_image(args)?,
        strength: args.strength,
        max_sequence_length: args.max_sequence_length,
        frames: args.frames,
        options: options(args)?,
        queue_events: Some(true),
    };
    let mut stdout = std::io::stdout();
    for item in client.subscribe(methods::GENERATE, &params)? {
        let value = item?;
        if json {
            println!("{value}");
        }
        let event: GenerateEvent = serde_json::from_value(value)
            .map_err(|err| Failure::Error(format!("unexpected generate event: {err}")))?;
        match event {
            GenerateEvent::Token { text, .. } if !json => {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            GenerateEvent::Token { .. } => {}
            GenerateEvent::Progress {
                stage, step, steps, ..
            } if !json => {
                let what = match stage {
                    ImageStage::Encode => "encoding the prompt",
                    ImageStage::Denoise => "step",
                    ImageStage::Decode => "decoding picture",
                };
                eprint!("\r{what} {step}/{steps}");
                if step == steps {
                    eprintln!();
                }
            }
            GenerateEvent::Progress { .. } => {}
            GenerateEvent::Queued {
                position,
                ahead,
                eta_s,
            } if !json => {
                let eta = eta_s.map_or("unknown".to_string(), |s| format!("about {s:.0} s"));
                eprintln!("[queued: position {position}, {ahead} job(s) ahead, start in {eta}]");
            }
            GenerateEvent::Queued { .. } => {}
            GenerateEvent::Images(done) => {
                if !json {
                    for image in &done.images {
                        println!("{}", image.path.display());
                    }
                    for video in &done.videos {
                        let shown = video.mp4.as_ref().unwrap_or(&video.dir);
                        println!("{}", shown.display());
                    }
                    eprintln!(
                        "[{} picture(s) of {}, {} steps, {} ms, {:?}, seed {}]",
                        done.images.len(),
                        done.size,
                        done.steps,
                        done.generate_ms + done.write_ms,
                        done.finish_reason,
                        done.seed
                    );
                }
                return Ok(());
            }
            GenerateEvent::Done {
                completion_tokens,
                prompt_tokens,
                decode_tokens_per_s,
                finish_reason,
                seed,
                ..
            } => {
                if !json {
                    println!();
                    eprintln!(
                        "[{prompt_tokens} prompt + {completion_tokens} generated tokens, {decode_tokens_per_s:.1} tok/s, {finish_reason:?}, seed {seed}]"
                    );
                }
                return Ok(());
            }
            GenerateEvent::Error { error, .. } => return Err(Failure::Error(error.to_string())),
        }
    }
    Err(Failure::Error(
        "modeld closed the stream before it finished".into(),
    ))
}
