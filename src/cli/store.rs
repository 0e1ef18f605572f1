//! `pkg store …`: the store's command-line face.
//!
//! Each command opens the store named by [`Settings::store`], does one library
//! call and prints its result. Results go to stdout, errors to stderr as miette
//! reports; `verify` also lists each problem on stdout and then fails.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use miette::IntoDiagnostic;

use super::{Settings, write_stdout};
use crate::digest::Digest;
use crate::store::{RefName, Store};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Ingest a file or directory and print its tree digest
    ///
    /// A directory becomes its tree. A single file (or symlink) becomes a tree
    /// with one entry named after it, so `pkg store checkout DIGEST DIR`
    /// recreates DIR/NAME.
    Add {
        /// The file or directory to ingest
        path: PathBuf,
        /// Also keep the result alive across `pkg store gc` under this root name
        #[arg(long, value_name = "NAME")]
        root: Option<String>,
    },
    /// Materialise a stored tree as a read-only directory
    Checkout {
        /// The tree digest, as printed by `pkg store add` (b3:…)
        digest: Digest,
        /// Where to put it: must be absent or an empty directory
        dir: PathBuf,
    },
    /// Count objects and bytes, with dedup and compression ratios
    Stats {
        /// Print one JSON object instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object; name each bad one and fail if there is any
    Verify,
    /// Delete everything no build, image or gc root keeps alive
    Gc {
        /// Report what would be deleted without deleting it
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(command: StoreCommand, settings: &Settings) -> miette::Result<ExitCode> {
    let store = Store::open(&settings.store).into_diagnostic()?;
    match command {
        StoreCommand::Add { path, root } => {
            let root = root.map(|r| RefName::new(&r)).transpose().into_diagnostic()?;
            let path = settings.cwd.join(path);
            // One pin across ingest and root: a concurrent gc cannot sweep in between.
            let _pin = store.pin().into_diagnostic()?;
            let digest = store.ingest_path(&path).into_diagnostic()?;
            if let Some(root) = root {
                store.add_root(&root, &digest).into_diagnostic()?;
            }
            write_stdout(format!("{digest}\n").as_bytes())
        }
        StoreCommand::Checkout { digest, dir } => {
            store.checkout(&digest, &settings.cwd.join(dir)).into_diagnostic()?;
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Stats { json } => {
            let stats = store.stats().into_diagnostic()?;
            let text = if json {
                let mut text = serde_json::to_string_pretty(&stats).into_diagnostic()?;
                text.push('\n');
                text
            } else {
                format!(
                    "objects            {} ({} blobs, {} trees)\n\
                     logical bytes      {}\n\
                     unique bytes       {}\n\
                     stored bytes       {}\n\
                     dedup ratio        {:.2}\n\
                     compression ratio  {:.2}\n\
                     cached copies      {} files, {}\n",
                    stats.objects,
                    stats.blobs,
                    stats.trees,
                    bytes(stats.logical_bytes),
                    bytes(stats.unique_bytes),
                    bytes(stats.stored_bytes),
                    stats.dedup_ratio,
                    stats.compression_ratio,
                    stats.cached_files,
                    bytes(stats.cached_bytes),
                )
            };
            write_stdout(text.as_bytes())
        }
        StoreCommand::Verify => {
            let report = store.verify().into_diagnostic()?;
            let mut text = String::new();
            for problem in &report.problems {
                writeln!(text, "{problem}").expect("writing to a String");
            }
            if report.problems.is_empty() {
                writeln!(
                    text,
                    "verified {} blobs, {} trees, {} cached files: all intact",
                    report.blobs, report.trees, report.cached_files
                )
                .expect("writing to a String");
            }
            write_stdout(text.as_bytes())?;
            if report.problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(miette::miette!(
                    help = "restore the store from a backup, or remove the refs that need the \
                            bad objects and run `pkg store gc`",
                    "the store has {} bad object{} or ref{}",
                    report.problems.len(),
                    if report.problems.len() == 1 { "" } else { "s" },
                    if report.problems.len() == 1 { "" } else { "s" },
                ))
            }
        }
        StoreCommand::Gc { dry_run } => {
            let report = store.gc(dry_run).into_diagnostic()?;
            let mut text = String::new();
            if settings.verbose > 0 {
                let verb = if dry_run { "would remove" } else { "removed" };
                for tree in &report.trees {
                    writeln!(text, "{verb} tree {tree}").expect("writing to a String");
                }
                for blob in &report.blobs {
                    writeln!(text, "{verb} blob {blob}").expect("writing to a String");
                }
            }
            writeln!(
                text,
                "{} {} trees, {} blobs, {} cached files, {} checkouts, {} temp files; {} {}",
                if dry_run { "would remove" } else { "removed" },
                report.trees.len(),
                report.blobs.len(),
                report.cached_files,
                report.checkouts,
                report.temp_files,
                if dry_run { "would free" } else { "freed" },
                bytes(report.bytes),
            )
            .expect("writing to a String");
            write_stdout(text.as_bytes())
        }
    }
}

/// `1234567` → `1.2 MiB (1234567 bytes)`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {} ({n} bytes)", UNITS[unit]) }
}
