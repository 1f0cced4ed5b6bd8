//! Registry commands: register, list, show, rm.

use std::path::PathBuf;

use clap::Args;
use modeld_wire::methods;
use modeld_wire::types::{
    format_bytes, parse_bytes, CacheLocation, ModelList, ModelRecord, NameParams, RegisterParams,
    RegisterReply, RemoveParams, RemoveReply, SpaceStatus,
};
use modeld_wire::Client;

use crate::output::{or_dash, print_fields, print_json, table, timestamp};
use crate::{Failure, Outcome};

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Name to refer to the model by
    name: String,
    /// Hugging Face repo id (org/name)
    #[arg(long)]
    repo: Option<String>,
    /// Branch, tag or commit [default: main]
    #[arg(long)]
    revision: Option<String>,
    /// Glob of repo files to use; repeat for several [default: *.json, *.safetensors, tokenizer.model, *merges.txt]
    #[arg(long = "file", value_name = "PATTERN")]
    files: Vec<String>,
    /// Local file or directory holding the model, tried before any cache
    #[arg(long)]
    local_path: Option<PathBuf>,
    /// Cache root for downloads: primary, secondary or custom:/path
    #[arg(long)]
    cache: Option<CacheLocation>,
    /// Expected size of the files, e.g. 7G or 512M
    #[arg(long, value_parser = parse_bytes)]
    size: Option<u64>,
    /// Overwrite an existing model of the same name
    #[arg(long)]
    replace: bool,
    /// Run it on this runner (diffusers, or one of modeld.toml's [runners.NAME])
    #[arg(long)]
    runner: Option<String>,
}

pub fn register(client: &mut Client, args: &RegisterArgs, json: bool) -> Outcome {
    // Relative paths are meant relative to the caller, not to the daemon.
    let local_path = match &args.local_path {
        Some(path) => Some(
            std::path::absolute(path)
                .map_err(|err| Failure::Error(format!("local path {}: {err}", path.display())))?,
        ),
        None => None,
    };
    let params = RegisterParams {
        name: args.name.clone(),
        repo: args.repo.clone(),
        revision: args.revision.clone(),
        files: (!args.files.is_empty()).then(|| args.files.clone()),
        local_path,
        cache: args.cache.clone(),
        estimated_size: args.size,
        replace: args.replace,
        runner: args.runner.clone(),
    };
    let reply: RegisterReply = client.call(methods::MODELS_REGISTER, &params)?;
    if json {
        print_json(&reply);
    } else {
        let verb = if reply.replaced {
            "replaced"
        } else {
            "registered"
        };
        println!("{verb} {}", reply.model.name);
        if let Some(space) = reply.space.filter(|s| s.status == SpaceStatus::Warning) {
            eprintln!(
                "warning: about {} needed, only {} free in {}",
                format_bytes(space.needed_bytes),
                format_bytes(space.available_bytes),
                space.path.display()
            );
        }
    }
    Ok(())
}

pub fn list(client: &mut Client, json: bool) -> Outcome {
    let reply: ModelList = client.call(methods::MODELS_LIST, serde_json::json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    if reply.models.is_empty() {
        println!("no models registered; add one with `modelctl register NAME --repo ORG/NAME`");
        return Ok(());
    }
    let mut models = table(&["name", "repo", "revision", "cache", "size", "local path"]);
    for model in &reply.models {
        models.add_row(vec![
            model.name.clone(),
            or_dash(model.repo.clone()),
            model.revision.clone(),
            model.cache.to_string(),
            or_dash(model.estimated_size.map(format_bytes)),
            or_dash(model.local_path.as_ref().map(|p| p.display().to_string())),
        ]);
    }
    println!("{models}");
    Ok(())
}

pub fn show(client: &mut Client, name: &str, json: bool) -> Outcome {
    let params = NameParams { name: name.into() };
    let model: ModelRecord = client.call(methods::MODELS_GET, &params)?;
    if json {
        print_json(&model);
    } else {
        print_record(&model);
    }
    Ok(())
}

pub fn remove(client: &mut Client, name: &str, purge: bool, apply: bool, json: bool) -> Outcome {
    let params = RemoveParams {
        name: name.into(),
        purge,
        apply,
    };
    let reply: RemoveReply = client.call(methods::MODELS_REMOVE, &params)?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    if let Some(plan) = reply.plan {
        crate::cache::plan(plan, false)?;
    }
    match (reply.removed, purge) {
        (Some(removed), true) => println!("removed {} and its cache files", removed.name),
        (Some(removed), false) => {
            println!("removed {} (files on disk are untouched)", removed.name)
        }
        (None, _) => println!("{name} is still registered (dry run; add --apply)"),
    }
    Ok(())
}

fn print_record(model: &ModelRecord) {
    print_fields(&[
        ("name", model.name.clone()),
        ("repo", or_dash(model.repo.clone())),
        ("revision", model.revision.clone()),
        ("files", model.files.join(", ")),
        (
            "local path",
            or_dash(model.local_path.as_ref().map(|p| p.display().to_string())),
        ),
        ("cache", model.cache.to_string()),
        (
            "estimated size",
            or_dash(model.estimated_size.map(format_bytes)),
        ),
        ("registered at", timestamp(model.registered_at)),
        ("updated at", timestamp(model.updated_at)),
    ]);
}
