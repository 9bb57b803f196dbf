//! `mu2 plot`: several benchmark runs, read back from their CSV files, on one latency plot.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;
use crate::plot;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// CSV files written by `mu2 bench --csv`, one curve each.
    #[arg(value_name = "CSV", required = true)]
    runs: Vec<PathBuf>,
    /// The plot to write: SVG, or PNG if it ends in .png.
    #[arg(short, long, value_name = "FILE.svg|FILE.png")]
    out: PathBuf,
    /// The plot's title.
    #[arg(long, value_name = "TEXT", default_value = "mu2 bench: request latency")]
    title: String,
}

pub fn plot(args: &PlotArgs) -> Result<(), Failure> {
    plot::check_target(&args.out)?;
    let runs = args.runs.iter().map(|p| plot::read_csv(p)).collect::<Result<Vec<_>, _>>()?;
    plot::draw(&runs, &args.title, &args.out)?;
    eprintln!("plot written to {}", args.out.display());
    Ok(())
}
