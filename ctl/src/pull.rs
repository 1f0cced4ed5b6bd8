//! Model file commands: source (where the files are) and pull (download
//! them with a progress bar).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use modeld_wire::methods;
use modeld_wire::types::{
    format_bytes, NameParams, PullEvent, PullParams, SourceReply, SpaceStatus,
};
use modeld_wire::Client;

use crate::output::{or_dash, print_fields, print_json};
use crate::{Failure, Outcome};

pub fn source(client: &mut Client, name: &str, json: bool) -> Outcome {
    let params = NameParams { name: name.into() };
    let reply: SourceReply = client.call(methods::MODELS_SOURCE, &params)?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    let show =
        |p: &Option<std::path::PathBuf>| or_dash(p.as_ref().map(|p| p.display().to_string()));
    print_fields(&[
        ("source", format!("{:?}", reply.source).to_lowercase()),
        ("path", show(&reply.path)),
        ("cache root", show(&reply.cache_root)),
        ("commit", or_dash(reply.commit.clone())),
        (
            "files",
            if reply.files.is_empty() {
                "-".into()
            } else {
                reply.files.join(", ")
            },
        ),
        ("download to", show(&reply.download_to)),
        ("reason", or_dash(reply.reason.clone())),
    ]);
    Ok(())
}

pub fn pull(client: &mut Client, name: &str, verify: bool, json: bool) -> Outcome {
    let params = PullParams {
        name: name.into(),
        verify,
    };
    let mut bar: Option<ProgressBar> = None;
    let subscription = client.subscribe(methods::MODELS_PULL, &params)?;
    for item in subscription {
        let value = item?;
        if json {
            println!("{value}");
        }
        let event: PullEvent = serde_json::from_value(value)
            .map_err(|err| Failure::Error(format!("unexpected pull event: {err}")))?;
        match event {
            PullEvent::Start {
                total_bytes,
                download_bytes,
                space,
                target,
                ..
            } if !json => {
                if space.status == SpaceStatus::Warning {
                    eprintln!(
                        "warning: {} needed, only {} free in {}",
                        format_bytes(space.needed_bytes),
                        format_bytes(space.available_bytes),
                        target.display()
                    );
                }
                eprintln!(
                    "{} to fetch of {}",
                    format_bytes(download_bytes),
                    format_bytes(total_bytes)
                );
                bar = Some(progress_bar(total_bytes));
            }
            PullEvent::Progress { file, bytes, .. } => {
                if let Some(bar) = &bar {
                    bar.set_position(bytes);
                    bar.set_message(file);
                }
            }
            PullEvent::Done {
                source,
                path,
                downloaded_bytes,
                elapsed_ms,
                ..
            } => {
                if let Some(bar) = bar.take() {
                    bar.finish_and_clear();
                }
                if !json {
                    let source = format!("{source:?}").to_lowercase();
                    println!(
                        "{name}: {source} {} ({} downloaded in {:.1}s)",
                        path.display(),
                        format_bytes(downloaded_bytes),
                        elapsed_ms as f64 / 1000.0
                    );
                }
                return Ok(());
            }
            PullEvent::Error { error, .. } => {
                if let Some(bar) = bar.take() {
                    bar.abandon();
                }
                return Err(Failure::Error(error.to_string()));
            }
            PullEvent::Start { .. } => {}
        }
    }
    Err(Failure::Error(
        "modeld closed the pull before it finished".into(),
    ))
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta:<4} {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
