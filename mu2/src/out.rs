//! What commands print on standard output. A reader that stops early (`mu2 guests | head -1`,
//! `mu2 invoke … | true`) closes the pipe; writing then fails with EPIPE (Rust ignores
//! SIGPIPE), and the command ends quietly with success instead of panicking or reporting it.

use std::io::Write;

use crate::failure::{CliError, Failure};

/// Writes `bytes` to standard output and flushes it.
pub fn print(bytes: impl AsRef<[u8]>) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes.as_ref()).and_then(|()| stdout.flush()).map_err(CliError::Stdout)?;
    Ok(())
}
