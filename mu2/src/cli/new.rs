//! `mu2 new`: a function crate on the guest SDK, outside the mu2 tree.

use std::path::PathBuf;

use clap::Args;

use crate::failure::Failure;
use crate::sdk;

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The directory to create; its name is the crate's (and the guest binary's).
    #[arg(value_name = "PATH")]
    path: PathBuf,
    /// The guest SDK to depend on (default: guest/sdk of the mu2 checkout this binary was built from).
    #[arg(long, value_name = "DIR")]
    sdk: Option<PathBuf>,
}

pub fn new(args: &NewArgs) -> Result<(), Failure> {
    let sdk = sdk::find_sdk(args.sdk.as_deref())?;
    let name = sdk::new_crate(&args.path, &sdk)?;
    let dir = args.path.display();
    eprintln!("created function crate `{name}` in {dir} (SDK: {})", sdk.display());
    eprintln!("next: cd {dir} && mu2 build   (then see README.md)");
    Ok(())
}
