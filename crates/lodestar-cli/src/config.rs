//! `lodestar config`: checks a `lodestar.toml`, and prints one with every
//! key at its default.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use lodestar::config::Config;

/// Options of `lodestar config`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Checks a configuration file, then the environment variables over it
    /// (LODESTAR_<SECTION>_<KEY> and their aliases, such as LODESTAR_REGISTRY,
    /// RUST_LOG and OTEL_*). Prints `FILE: ok` and exits 0, or prints the
    /// error (file, line, column, key, and the key meant for a typo) and
    /// exits 1. A variable one letter or two from a known one is reported
    /// as a likely typo (a warning).
    Check(CheckArgs),
    /// Prints a complete lodestar.toml: every key, explained, with its
    /// environment variable, set to its default.
    Defaults,
}

/// Options of `lodestar config check`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Environment:\n  \
    LODESTAR_<SECTION>_<KEY>  one per key: LODESTAR_SERVICE_BIND, LODESTAR_CLIENT_TIMEOUT, ...\n  \
    LODESTAR_REGISTRY, LODESTAR_BROKER, LODESTAR_ZONE, RUST_LOG, LODESTAR_LOG_FORMAT, OTEL_*\n  \
    \x20                         older names of some keys, weaker than LODESTAR_<SECTION>_<KEY>\n\n\
    Every key, its type, default and variables: docs/configuration.md, or `lodestar config defaults`.\n\n\
    Exit codes: 0 the configuration is valid; 1 it is not (or the file cannot be read); 2 usage.")]
struct CheckArgs {
    /// The file to check.
    file: PathBuf,
    /// Check the file alone, without the environment's variables.
    #[arg(long)]
    no_env: bool,
}

pub(crate) fn run(args: Args) -> Result<ExitCode, Box<dyn Error>> {
    match args.command {
        Command::Check(args) => {
            // A missing file is an error here (loading treats it as "no file").
            let config = if args.no_env || !args.file.exists() {
                Config::from_file(&args.file)?
            } else {
                Config::load_from(&args.file, std::env::vars())?
            };
            drop(config);
            if !args.no_env {
                // A variable with a typo is read by nothing: say so.
                for (name, _) in std::env::vars() {
                    if let Some(meant) = lodestar::config::closest_variable(&name) {
                        eprintln!("warning: no key reads {name}; did you mean {meant}?");
                    }
                }
            }
            println!("{}: ok", args.file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Defaults => {
            print!("{}", lodestar::config::default_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}
