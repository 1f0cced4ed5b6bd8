//! `modelctl cache ...`: scan, duplicates, consolidate, clean, rm. Changes
//! are dry runs unless `--apply` is given.

use clap::Subcommand;
use modeld_wire::methods;
use modeld_wire::types::{
    format_bytes, ApplyParams, CachePlan, CacheRemoveParams, CacheScanReply, DuplicatesReply,
};
use modeld_wire::Client;
use serde_json::json;

use crate::output::{print_json, table};
use crate::Outcome;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Every cache root and the model root: repos, revisions, sizes
    Scan,
    /// Identical files across the roots (by size, then sha256)
    Duplicates,
    /// Keep one copy of each duplicate: the others become reflinks where
    /// the file system can clone, else hard links (weight files only)
    Consolidate {
        #[arg(long)]
        apply: bool,
    },
    /// Remove incomplete downloads, dangling links, orphan blobs, empty repos
    Clean {
        #[arg(long)]
        apply: bool,
        /// Also remove revisions no branch or tag points to
        #[arg(long)]
        detached: bool,
    },
    /// Remove a repo (or one revision of it) from the caches
    Rm {
        repo: String,
        #[arg(long)]
        revision: Option<String>,
        #[arg(long)]
        apply: bool,
    },
}

pub fn run(client: &mut Client, command: &CacheCommand, json: bool) -> Outcome {
    match command {
        CacheCommand::Scan => scan(client, json),
        CacheCommand::Duplicates => duplicates(client, json),
        CacheCommand::Consolidate { apply } => {
            let params = ApplyParams {
                apply: *apply,
                detached: false,
            };
            plan(client.call(methods::CACHE_CONSOLIDATE, params)?, json)
        }
        CacheCommand::Clean { apply, detached } => {
            let params = ApplyParams {
                apply: *apply,
                detached: *detached,
            };
            plan(client.call(methods::CACHE_CLEAN, params)?, json)
        }
        CacheCommand::Rm {
            repo,
            revision,
            apply,
        } => {
            let params = CacheRemoveParams {
                repo: repo.clone(),
                revision: revision.clone(),
                apply: *apply,
            };
            plan(client.call(methods::CACHE_RM, params)?, json)
        }
    }
}

fn scan(client: &mut Client, json: bool) -> Outcome {
    let reply: CacheScanReply = client.call(methods::CACHE_SCAN, json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    let mut repos = table(&[
        "repo",
        "family",
        "size",
        "files",
        "revisions",
        "registered as",
        "root",
    ]);
    for root in &reply.roots {
        for repo in &root.repos {
            repos.add_row(vec![
                repo.repo_id.clone(),
                repo.family.clone(),
                format_bytes(repo.size_bytes),
                repo.files.to_string(),
                repo.revisions.len().to_string(),
                if repo.registered_as.is_empty() {
                    "(discovered)".into()
                } else {
                    repo.registered_as.join(", ")
                },
                format!("{} ({})", root.path.display(), root.role),
            ]);
        }
        for warning in &root.warnings {
            eprintln!("warning: {}: {warning}", root.path.display());
        }
    }
    println!("{repos}");
    let changed = reply
        .roots
        .iter()
        .flat_map(|root| &root.repos)
        .flat_map(|repo| &repo.changed_files);
    for file in changed {
        println!("changed since checked: {}", file.display());
    }
    println!("total {}", format_bytes(reply.total_bytes));
    Ok(())
}

fn duplicates(client: &mut Client, json: bool) -> Outcome {
    let reply: DuplicatesReply = client.call(methods::CACHE_DUPLICATES, json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    for group in &reply.groups {
        println!(
            "{} x{} ({})",
            group.sha256.get(..12).unwrap_or(&group.sha256),
            group.copies.len() + 1,
            format_bytes(group.size_bytes)
        );
        println!("  keep {}", group.keep.display());
        for copy in &group.copies {
            println!("  dup  {}", copy.display());
        }
    }
    println!(
        "{} reclaimable ({} files, {} hashed)",
        format_bytes(reply.reclaimable_bytes),
        reply.files_hashed,
        format_bytes(reply.bytes_hashed)
    );
    Ok(())
}

/// Prints a plan's actions, what was skipped and the bytes freed.
pub fn plan(plan: CachePlan, json: bool) -> Outcome {
    if json {
        print_json(&plan);
        return Ok(());
    }
    for action in &plan.actions {
        if action.method.as_deref() == Some("skip") {
            // Listed below with the other things left alone.
            continue;
        }
        let target = action
            .target
            .as_ref()
            .map(|t| format!(" -> {}", t.display()))
            .unwrap_or_default();
        let name = match &action.method {
            Some(method) => format!("{} ({method})", action.action),
            None => action.action.clone(),
        };
        println!(
            "{name:<24} {}{target} ({})",
            action.path.display(),
            format_bytes(action.bytes)
        );
    }
    for skipped in &plan.skipped {
        println!("skipped: {skipped}");
    }
    let verb = if plan.applied {
        "freed"
    } else {
        "would free (dry run; add --apply)"
    };
    println!("{verb} {}", format_bytes(plan.freed_bytes));
    Ok(())
}
