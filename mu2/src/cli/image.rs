//! `mu2 image`: what an image is (`info`, `verify`), and moving it between hosts as one file
//! (`pack`, `unpack`). None of them needs KVM.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand};
use mu2_vmm::image::{self, ImageInfo};

use crate::failure::Failure;

#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Show an image's content id, architecture, format version, memory, vCPUs, CPU template
    /// and features, and readiness flags (read from its state file; nothing is recomputed).
    Info {
        /// The image directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Recompute the content id from the image's files and check it against the recorded one;
    /// print it.
    Verify {
        /// The image directory.
        dir: PathBuf,
    },
    /// Pack an image into one file: compressed, without its memory's holes, carrying its
    /// content id (checked on the way); print the id.
    Pack {
        /// The image directory.
        dir: PathBuf,
        /// The pack file to write.
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Unpack a pack into a new or empty image directory, checking it (content id included)
    /// before anything is in place; print the id.
    Unpack {
        /// The pack file.
        file: PathBuf,
        /// The image directory to create.
        dir: PathBuf,
    },
}

pub fn image(args: &ImageArgs) -> Result<(), Failure> {
    match &args.command {
        ImageCommand::Info { dir, json } => {
            let info = ImageInfo::read(dir)?;
            if *json {
                println!("{}", info_json(&info));
            } else {
                print!("{}", info_text(&info));
            }
        }
        ImageCommand::Verify { dir } => {
            let start = Instant::now();
            let id = image::verify(dir)?;
            println!("{id}");
            eprintln!("{} verified in {:.1} ms", dir.display(), ms(start));
        }
        ImageCommand::Pack { dir, out } => {
            let start = Instant::now();
            let summary = image::pack(dir, out)?;
            println!("{}", summary.content_id);
            eprintln!(
                "packed {} into {}: {} bytes for {} MiB of memory ({} KiB of it data) in {:.1} ms",
                dir.display(),
                out.display(),
                summary.pack_bytes,
                summary.memory_size >> 20,
                summary.data_bytes >> 10,
                ms(start)
            );
        }
        ImageCommand::Unpack { file, dir } => {
            let start = Instant::now();
            let info = image::unpack(file, dir)?;
            println!("{}", info.content_id);
            eprintln!("unpacked {} into {} in {:.1} ms", file.display(), dir.display(), ms(start));
        }
    }
    Ok(())
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

fn info_text(info: &ImageInfo) -> String {
    let flags = info.ready_flag_names();
    let features = &info.cpu_features;
    format!(
        "content id     {}\narch           {}\nformat         {}\nmemory         {} MiB\nvcpus          {}\n\
         cpu template   {}{}\ncpu features   {} ({})\nready flags    {}\nport           {}\n",
        info.content_id,
        info.arch,
        info.format_version,
        info.mem_size >> 20,
        info.vcpus,
        info.cpu_template,
        beyond_text(info),
        features.len(),
        if features.is_empty() { "none recorded".to_string() } else { features.join(" ") },
        if flags.is_empty() { "none".to_string() } else { flags.join(" ") },
        info.port,
    )
}

/// What the template did not hide, if anything, as a remark after its name.
fn beyond_text(info: &ImageInfo) -> String {
    match info.beyond_template.as_slice() {
        [] => String::new(),
        beyond => {
            format!(" (but the hypervisor also showed the guest {} features: {})", beyond.len(), beyond.join(" "))
        }
    }
}

fn info_json(info: &ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "content_id": info.content_id.to_string(),
        "arch": info.arch.name(),
        "format_version": info.format_version,
        "mem_size": info.mem_size,
        "vcpus": info.vcpus,
        "cpu_template": info.cpu_template.name(),
        "cpu_features": info.cpu_features,
        "beyond_template": info.beyond_template,
        "ready_flags": info.ready_flag_names(),
        "http": info.http(),
        "port": info.port,
    })
}

/// What the image just written in `dir` says about itself, for the message saying so.
pub fn written(dir: &Path) -> Result<ImageInfo, Failure> {
    Ok(ImageInfo::read(dir)?)
}
