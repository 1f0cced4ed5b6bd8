//! Daemon-wide commands: status, vram, reload, shutdown.

use modeld_wire::methods;
use modeld_wire::types::{
    format_bytes, CancelReply, JobParams, JobReply, JobState, ModesReply, ReloadReply,
    ShutdownReply, StatusReply, SwitchParams, SwitchReply, VramReply,
};
use modeld_wire::{Client, ClientError};
use serde_json::json;

use crate::output::{format_duration, or_dash, print_fields, print_json, table, timestamp};
use crate::{Failure, Outcome};

pub fn status(client: &mut Client, json: bool) -> Outcome {
    let reply: StatusReply = client.call(methods::STATUS, json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    let config = match (&reply.config.path, &reply.config.last_error) {
        (_, Some(err)) => format!("last reload refused: {err}"),
        (Some(path), None) => path.display().to_string(),
        (None, None) => "embedded defaults".to_string(),
    };
    let counts = &reply.counts;
    print_fields(&[
        ("version", reply.version.clone()),
        ("pid", reply.pid.to_string()),
        ("uptime", format_duration(reply.uptime_s)),
        ("socket", reply.socket.display().to_string()),
        ("state dir", reply.state_dir.display().to_string()),
        ("config", config),
        (
            "models",
            format!("{} registered, {} loaded", counts.models, counts.loaded),
        ),
        ("mode", or_dash(reply.queue.current_mode.clone())),
        (
            "queue",
            format!(
                "{} of {} jobs",
                reply.queue.jobs.len(),
                reply.queue.capacity
            ),
        ),
        (
            "modes",
            match &reply.modes.last_error {
                Some(err) => format!("{} (last reload refused: {err})", reply.modes.count),
                None => reply.modes.count.to_string(),
            },
        ),
        ("connections", counts.connections.to_string()),
        (
            "requests",
            format!(
                "{} served, {} in flight",
                counts.requests_total, counts.requests_in_flight
            ),
        ),
    ]);
    for job in &reply.queue.jobs {
        let state = if job.running { "running" } else { "queued" };
        let what = job
            .mode
            .clone()
            .or_else(|| job.model.clone())
            .unwrap_or_default();
        println!("  job {:<6} {state:<8} {:<9} {what}", job.id, job.kind);
    }
    if let Some(failure) = &reply.queue.last_switch_error {
        println!(
            "last switch error: to {} (job {}) at {}: {}",
            failure.mode,
            failure.job,
            timestamp(failure.at),
            failure.error
        );
    }
    Ok(())
}

pub fn vram(client: &mut Client, json: bool) -> Outcome {
    let reply: VramReply = client.call(methods::VRAM, json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    if reply.gpus.is_empty() {
        println!("no GPUs: {}", or_dash(reply.nvml.reason.clone()));
    } else {
        let mut gpus = table(&["gpu", "name", "used", "free", "total", "processes"]);
        for gpu in &reply.gpus {
            let processes: Vec<String> = gpu
                .processes
                .iter()
                .map(|p| {
                    let name = p.name.clone().unwrap_or_else(|| "?".into());
                    let used = p.used_bytes.map(format_bytes).unwrap_or_else(|| "?".into());
                    format!("{name}[{}] {used}", p.pid)
                })
                .collect();
            gpus.add_row(vec![
                gpu.index.to_string(),
                gpu.name.clone(),
                format_bytes(gpu.used_bytes),
                format_bytes(gpu.free_bytes),
                format_bytes(gpu.total_bytes),
                if processes.is_empty() {
                    "-".into()
                } else {
                    processes.join(", ")
                },
            ]);
        }
        println!("{gpus}");
    }
    if !reply.models.is_empty() {
        let mut models = table(&["model", "arch", "device", "dtype", "estimated", "measured"]);
        for model in &reply.models {
            models.add_row(vec![
                model.name.clone(),
                model.arch.clone(),
                model.device.clone(),
                model.dtype.clone(),
                format_bytes(model.estimated_bytes),
                format_bytes(model.measured_bytes),
            ]);
        }
        println!("{models}");
    }
    println!(
        "system RAM: {} available of {}",
        format_bytes(reply.system.available_bytes),
        format_bytes(reply.system.total_bytes)
    );
    Ok(())
}

pub fn reload(client: &mut Client, json: bool) -> Outcome {
    let reply: ReloadReply = client.call(methods::RELOAD, json!({}))?;
    if json {
        print_json(&reply);
    } else {
        match &reply.path {
            Some(path) => println!("reloaded {}", path.display()),
            None => println!("reloaded: no config file, embedded defaults in force"),
        }
    }
    Ok(())
}

pub fn modes(client: &mut Client, json: bool) -> Outcome {
    let reply: ModesReply = client.call(methods::MODES_LIST, json!({}))?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    if let Some(err) = &reply.last_error {
        eprintln!("warning: the last reload was refused: {err}");
    }
    if reply.modes.is_empty() {
        println!("no modes; see modes.toml.example");
        return Ok(());
    }
    let mut modes = table(&["mode", "model", "loras", "keep alive", "description"]);
    for mode in &reply.modes {
        let marker = if reply.current.as_deref() == Some(mode.name.as_str()) {
            "*"
        } else {
            ""
        };
        let loras: Vec<String> = mode
            .loras
            .iter()
            .map(|l| format!("{}@{}", l.adapter_name, l.strength))
            .collect();
        modes.add_row(vec![
            format!("{}{marker}", mode.name),
            mode.model.clone(),
            if loras.is_empty() {
                "-".into()
            } else {
                loras.join(", ")
            },
            mode.keep_alive_s
                .map_or("forever".into(), |s| format!("{s}s")),
            or_dash(mode.description.clone()),
        ]);
    }
    println!("{modes}");
    Ok(())
}

/// Queues a switch and, unless `no_wait`, waits for it to run: a failed
/// switch is an error (exit 1).
pub fn switch(client: &mut Client, mode: &str, no_wait: bool, json: bool) -> Outcome {
    let params = SwitchParams {
        mode: mode.into(),
        wait: !no_wait,
    };
    let reply: SwitchReply =
        client
            .call(methods::SWITCH_MODE, params)
            .map_err(|err| match err {
                ClientError::Rpc(error) => {
                    Failure::Error(format!("switch to {mode} failed: {error}"))
                }
                other => other.into(),
            })?;
    let from = reply.from.as_deref().unwrap_or("-");
    if json {
        print_json(&reply);
    } else if reply.state == JobState::Done {
        println!("switched {from} -> {} (job {})", reply.to, reply.job);
    } else {
        println!(
            "queued switch {from} -> {} as job {} ({} ahead)",
            reply.to, reply.job, reply.ahead
        );
    }
    Ok(())
}

/// Where a job is, or how it ended; a failed job prints its error.
pub fn job(client: &mut Client, job: u64, json: bool) -> Outcome {
    let reply: JobReply = client.call(methods::JOBS_GET, JobParams { job })?;
    if json {
        print_json(&reply);
        return Ok(());
    }
    let state = serde_json::to_value(reply.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    print_fields(&[
        ("job", reply.id.to_string()),
        ("kind", reply.kind.clone()),
        ("state", state),
        ("mode", or_dash(reply.mode.clone())),
        ("model", or_dash(reply.model.clone())),
        ("finished", or_dash(reply.finished_at.map(timestamp))),
        (
            "error",
            or_dash(reply.error.as_ref().map(|e| e.to_string())),
        ),
    ]);
    Ok(())
}

pub fn cancel(client: &mut Client, job: u64, json: bool) -> Outcome {
    let reply: CancelReply = client.call(methods::JOBS_CANCEL, JobParams { job })?;
    if json {
        print_json(&reply);
    } else if reply.cancelled {
        println!("cancelled job {job}");
    } else {
        return Err(crate::Failure::Error(format!(
            "no queued or running job {job}"
        )));
    }
    Ok(())
}

pub fn shutdown(client: &mut Client, json: bool) -> Outcome {
    let reply: ShutdownReply = client.call(methods::SHUTDOWN, json!({}))?;
    if json {
        print_json(&reply);
    } else {
        println!("modeld is stopping");
    }
    Ok(())
}
