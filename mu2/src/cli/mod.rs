//! The command line: the top-level parser and one module per command. Argument types the
//! commands share are in `args`.

mod args;
mod bench;
mod build;
mod guests;
mod image;
mod invoke;
mod new;
mod plot;
mod run;
mod serve;
mod snapshot;
mod worker;

use clap::{Parser, Subcommand};

use crate::failure::Failure;

#[derive(Parser, Debug)]
#[command(name = "mu2", version, about = "Run every request in a brand-new micro-VM.")]
#[command(after_help = "Exit codes: 0 ok, 1 other failure, 2 bad input, 3 guest crashed (fault, panic), \
                        4 timeout, 5 KVM unavailable, 6 guest broke the device protocol, \
                        7 resource exhausted (memory, file descriptors), 8 the function returned an error. \
                        Log messages go to stderr: RUST_LOG=info (or debug) for more than warnings.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest and stream its console until it stops.
    Run(run::RunArgs),
    /// Cold-boot a VM, send one request over vsock, print the response bytes to stdout.
    Invoke(invoke::InvokeArgs),
    /// Boot a guest, wait until it is ready, freeze it into an image directory.
    Snapshot(snapshot::SnapshotArgs),
    /// Inspect, verify, pack and unpack frozen images.
    Image(image::ImageArgs),
    /// Measure request latency next to the raw KVM floor of this host.
    Bench(bench::BenchArgs),
    /// List the guests built into this binary.
    Guests,
    /// Write a new function crate on the guest SDK (build it with `mu2 build`).
    New(new::NewArgs),
    /// Build a function crate into a guest ELF and print the ELF's path.
    Build(build::BuildArgs),
    /// Draw benchmark runs from their CSV files (`mu2 bench --csv`) on one latency plot.
    Plot(plot::PlotArgs),
    /// Run the daemon: the control API on a Unix socket, the HTTP dispatcher on TCP.
    Serve(serve::ServeArgs),
    /// One worker process of `mu2 bench --workers` (started by it, its socket on stdin).
    #[command(name = "__worker", hide = true)]
    Worker(worker::WorkerArgs),
}

/// Runs `command` to its end.
pub fn run(command: &Command) -> Result<(), Failure> {
    match command {
        Command::Run(args) => run::run(args),
        Command::Invoke(args) => invoke::invoke(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Image(args) => image::image(args),
        Command::Bench(args) => bench::bench(args),
        Command::Guests => guests::list(),
        Command::New(args) => new::new(args),
        Command::Build(args) => build::build(args),
        Command::Plot(args) => plot::plot(args),
        Command::Serve(args) => serve::serve(args),
        Command::Worker(args) => worker::worker(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::exit_code;
    use clap::CommandFactory;
    use mu2_vmm::error::FailureKind;

    #[test]
    fn help_lists_every_exit_code() {
        let help = Cli::command().get_after_help().map(|h| h.to_string()).unwrap_or_default();
        for kind in FailureKind::ALL {
            assert!(help.contains(&format!(" {} ", exit_code(kind))), "{kind}: {help}");
        }
    }
}
