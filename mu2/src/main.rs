//! The `mu2` command: parse the arguments, run the command, and on failure print the error
//! and exit with the code of its kind.

mod bench;
mod cli;
mod failure;
mod out;
mod plot;
mod report;
mod sdk;

use std::process::ExitCode;

use clap::Parser;
use mu2_vmm::error::{error_chain, FailureKind};

use crate::failure::{exit_code, Failure};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // A usage error is bad input; --help and --version are not errors.
            return ExitCode::from(if e.use_stderr() { exit_code(FailureKind::BadInput) } else { 0 });
        }
    };
    match cli::run(&cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) if failure.is_reader_gone() => ExitCode::SUCCESS,
        Err(Failure { kind, error }) => {
            eprintln!("mu2: {}", error_chain(&*error));
            ExitCode::from(exit_code(kind))
        }
    }
}
