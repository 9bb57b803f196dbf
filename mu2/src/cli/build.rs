//! `mu2 build`: a function's crate built into a guest ELF, with the flags and profile of the
//! guest SDK it depends on; the ELF's path on stdout.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;
use crate::sdk;

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The crate: its directory or its Cargo.toml.
    #[arg(value_name = "PATH", default_value = ".")]
    path: PathBuf,
    /// Further arguments for cargo (e.g. `-- --offline`, `-- --bin NAME`).
    #[arg(last = true, value_name = "CARGO_ARGS")]
    cargo_args: Vec<String>,
}

pub fn build(args: &BuildArgs) -> Result<(), Failure> {
    let elfs = sdk::build(&args.path, &args.cargo_args)?;
    let lines: String = elfs.iter().map(|elf| format!("{}\n", elf.display())).collect();
    crate::out::print(lines)
}
