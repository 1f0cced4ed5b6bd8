//! `modelctl`: the command-line client of modeld. Each subcommand is one
//! RPC call; output is a human table, or the raw reply with `--json`.

mod cache;
mod generate;
mod models;
mod output;
mod pull;
mod system;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modeld_wire::{paths, Client, ClientError};

#[derive(Debug, Parser)]
#[command(name = "modelctl", version, about = "Control modeld, the model daemon")]
struct Cli {
    /// Daemon socket [default: same discovery as modeld]
    #[arg(long, global = true, env = "MODELD_SOCKET")]
    socket: Option<PathBuf>,
    /// Print the daemon's JSON reply instead of a table
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Daemon version, uptime and counters
    Status,
    /// GPU memory and processes, and system RAM
    Vram,
    /// Register a model (Hugging Face repo and/or local path)
    Register(models::RegisterArgs),
    /// List registered models
    #[command(alias = "ls")]
    List,
    /// Show one registered model
    Show { name: String },
    /// Where a load would find the model's files: local, cache, hub or unavailable
    Source { name: String },
    /// Download the model's files into its cache now, with progress
    Pull {
        name: String,
        /// Also re-hash files already cached and fetch any that differ
        #[arg(long)]
        verify: bool,
    },
    /// Load a model into memory (pulling its files first if needed)
    Load {
        name: String,
        /// cpu, cuda or cuda:N
        #[arg(long)]
        device: Option<String>,
        /// f32, f16 or bf16
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Free a loaded model's memory
    Unload { name: String },
    /// Generate text, streamed to the terminal
    #[command(alias = "run")]
    Generate(generate::GenerateArgs),
    /// Remove a model from the registry (its files stay unless --purge)
    #[command(alias = "remove")]
    Rm {
        name: String,
        /// Also delete its cache files (never a local path); a dry run without --apply
        #[arg(long)]
        purge: bool,
        /// Carry the purge out
        #[arg(long, requires = "purge")]
        apply: bool,
    },
    /// Inspect and tidy the model caches
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// List the modes (* marks the current one)
    Modes,
    /// Switch to another mode: waits for the switch and prints its outcome
    Switch {
        mode: String,
        /// Only queue the switch and print its job id
        #[arg(long)]
        no_wait: bool,
    },
    /// Show a job: queued, running, done, failed (with its error) or cancelled
    Job { job: u64 },
    /// Cancel a queued job (or stop a running generation) by its id from `status`
    Cancel { job: u64 },
    /// Re-read the daemon's config and modes files (as `systemctl reload modeld` does)
    Reload,
    /// Stop the daemon after in-flight requests finish
    Shutdown,
}

/// How an invocation ended, mapped to exit codes scripts can rely on.
enum Failure {
    /// 1: the daemon answered with an error, or the reply was unusable.
    Error(String),
    /// 3: no daemon is listening.
    NotRunning(String),
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::NotRunning { path } => Failure::NotRunning(format!(
                "modeld is not running (no daemon at {}); start it with `modeld` or `systemctl start modeld`",
                path.display()
            )),
            other => Failure::Error(other.to_string()),
        }
    }
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(paths::default_socket);
    match run(&cli, &socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(message)) => {
            eprintln!("modelctl: {message}");
            ExitCode::from(1)
        }
        Err(Failure::NotRunning(message)) => {
            eprintln!("modelctl: {message}");
            ExitCode::from(3)
        }
    }
}

fn run(cli: &Cli, socket: &std::path::Path) -> Outcome {
    let mut client = Client::connect(socket)?;
    let json = cli.json;
    match &cli.command {
        Command::Status => system::status(&mut client, json),
        Command::Vram => system::vram(&mut client, json),
        Command::Reload => system::reload(&mut client, json),
        Command::Modes => system::modes(&mut client, json),
        Command::Cache(command) => cache::run(&mut client, command, json),
        Command::Switch { mode, no_wait } => system::switch(&mut client, mode, *no_wait, json),
        Command::Job { job } => system::job(&mut client, *job, json),
        Command::Cancel { job } => system::cancel(&mut client, *job, json),
        Command::Shutdown => system::shutdown(&mut client, json),
        Command::Register(args) => models::register(&mut client, args, json),
        Command::List => models::list(&mut client, json),
        Command::Show { name } => models::show(&mut client, name, json),
        Command::Rm { name, purge, apply } => {
            models::remove(&mut client, name, *purge, *apply, json)
        }
        Command::Load {
            name,
            device,
            dtype,
        } => generate::load(&mut client, name, device, dtype, json),
        Command::Unload { name } => generate::unload(&mut client, name, json),
        Command::Generate(args) => generate::generate(&mut client, args, json),
        Command::Source { name } => pull::source(&mut client, name, json),
        Command::Pull { name, verify } => pull::pull(&mut client, name, *verify, json),
    }
}
