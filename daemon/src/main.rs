//! The `modeld` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    modeld::cli::main()
}
