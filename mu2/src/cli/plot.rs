//! `mu2 plot`: several benchmark runs, read back from their CSV files, on one latency plot.

use std::path::PathBuf;

use clap::Args;

use crate::failure::{CliError, Failure};
use crate::plot;

const DEFAULT_TITLE: &str = "mu2 bench: request latency";

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// CSV files written by `mu2 bench --csv`, one curve each; or JSON files printed by
    /// `mu2 bench --rate R1,R2,… --json` (open-loop sweeps), drawn as latency against load.
    #[arg(value_name = "CSV|JSON", required = true)]
    runs: Vec<PathBuf>,
    /// The plot to write: SVG, or PNG if it ends in .png.
    #[arg(short, long, value_name = "FILE.svg|FILE.png")]
    out: PathBuf,
    /// The plot's title.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_TITLE)]
    title: String,
}

pub fn plot(args: &PlotArgs) -> Result<(), Failure> {
    plot::check_target(&args.out)?;
    let is_json = |p: &PathBuf| p.extension().is_some_and(|e| e == "json");
    if args.runs.iter().all(is_json) {
        let curves = args.runs.iter().map(|p| plot::read_load_json(p)).collect::<Result<Vec<_>, _>>()?;
        let title = if args.title == DEFAULT_TITLE { "mu2 bench: latency vs load" } else { &args.title };
        plot::draw_load(&curves, title, &args.out)?;
    } else if args.runs.iter().any(is_json) {
        return Err(CliError::Argument("plot either CSV runs or JSON sweeps, not both").into());
    } else {
        let runs = args.runs.iter().map(|p| plot::read_csv(p)).collect::<Result<Vec<_>, _>>()?;
        plot::draw(&runs, &args.title, &args.out)?;
    }
    eprintln!("plot written to {}", args.out.display());
    Ok(())
}
