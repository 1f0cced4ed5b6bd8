//! Command-line flags of `modeld` and the process entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use modeld_wire::paths;

use crate::config::{Config, Paths};

#[derive(Debug, Parser)]
#[command(
    name = "modeld",
    version,
    about = "Owns the GPUs and serves generative models over a Unix socket",
    args_override_self = true
)]
pub struct Args {
    /// Unix socket to listen on [default: $RUNTIME_DIRECTORY/modeld.sock,
    /// /run/modeld/modeld.sock for root, $XDG_RUNTIME_DIR/modeld/modeld.sock]
    #[arg(long, env = "MODELD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Directory for the model registry [default: $STATE_DIRECTORY,
    /// /var/lib/modeld for root, $XDG_STATE_HOME/modeld]
    #[arg(long, env = "MODELD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file (TOML); without it, modeld.toml in the config directory
    /// is read if present, else the embedded defaults apply
    #[arg(long, env = "MODELD_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP address to serve the OpenAI-compatible API, health and metrics
    /// on (`127.0.0.1:11435` or `unix:/path`); repeat or separate with
    /// commas for several. Replaces `[http] listen`
    #[arg(long, env = "MODELD_HTTP", value_delimiter = ',')]
    pub http: Vec<String>,
    /// Print the effective config as TOML and exit
    #[arg(long)]
    pub print_config: bool,
}

impl Args {
    pub fn paths(&self) -> Paths {
        Paths {
            socket: self.socket.clone().unwrap_or_else(paths::default_socket),
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(paths::default_state_dir),
            config_file: self
                .config
                .clone()
                .unwrap_or_else(paths::default_config_file),
            config_explicit: self.config.is_some(),
            http: self.http.clone(),
        }
    }
}

/// Parses flags, sets up logging and runs the daemon on a Tokio runtime.
pub fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let paths = args.paths();
    if args.print_config {
        return match Config::load(&paths) {
            Ok((config, _)) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => fail(&err),
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&err),
    };
    match runtime.block_on(crate::run(paths)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("modeld: {err}");
    ExitCode::FAILURE
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MODELD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // journald stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
