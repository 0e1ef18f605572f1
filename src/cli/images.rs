//! `pkg images` (list the images recorded in the store) and `pkg assemble`
//! (plumbing: assemble an image from trees already in the store, without a recipe).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use miette::IntoDiagnostic;

use super::Settings;
use crate::digest::Digest;
use crate::image::{
    AssembleOptions, Compression, ImageConfig, ImageSpec, PackageTree, PlatformContents,
};
use crate::platform::Platform;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct ImagesArgs {}

/// Lists name, platforms, digest and size of every image in the store.
pub fn run(_args: ImagesArgs, settings: &Settings) -> miette::Result<ExitCode> {
    let store = open_store(settings)?;
    let images = crate::image::list(&store).into_diagnostic()?;
    let mut rows = vec![["NAME".to_string(), "PLATFORMS".into(), "DIGEST".into(), "SIZE".into()]];
    for image in &images {
        let platforms: Vec<&str> = image.platforms.iter().map(|p| p.platform.as_str()).collect();
        rows.push([
            image.name.clone(),
            platforms.join(","),
            format!("sha256:{}", image.top.digest),
            human_size(image.size()),
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    super::write_stdout(out.as_bytes())
}

/// `1.5 MiB`-style sizes, exact bytes below 1 KiB.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[derive(Debug, Args)]
pub struct AssembleArgs {
    /// The image name (its ref in index.json and its name in the store)
    pub name: String,
    /// A package of the closure, dependencies first: NAME=b3:TREE, or
    /// PLATFORM@NAME=b3:TREE for one platform only
    #[arg(long = "package", value_name = "[PLATFORM@]NAME=TREE", required = true)]
    pub packages: Vec<String>,
    /// Platforms of the image [default: the host's]
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<Platform>,
    /// Creation time in seconds since the epoch [default: $SOURCE_DATE_EPOCH, else 0]
    #[arg(long, value_name = "SECONDS", allow_hyphen_values = true)]
    pub created: Option<i64>,
    /// Layer compression
    #[arg(long, value_parser = ["gzip", "zstd"], default_value = "gzip")]
    pub compression: String,
    /// Most layers per image
    #[arg(long, default_value_t = crate::image::DEFAULT_MAX_LAYERS)]
    pub max_layers: usize,
    /// Threads compressing layers [default: one per core]
    #[arg(short = 'j', long, value_name = "N", default_value_t = 0)]
    pub jobs: usize,
    /// Where to write the image: oci:DIR or oci-archive:FILE
    #[arg(short, long, value_name = "oci:DIR|oci-archive:FILE")]
    pub output: Option<String>,
}

/// Where an image is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Layout(PathBuf),
    Archive(PathBuf),
}

impl std::str::FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(dir) = s.strip_prefix("oci:") {
            Ok(Output::Layout(PathBuf::from(dir)))
        } else if let Some(file) = s.strip_prefix("oci-archive:") {
            Ok(Output::Archive(PathBuf::from(file)))
        } else {
            Err(format!("unknown output {s:?}: use oci:DIR or oci-archive:FILE"))
        }
    }
}

pub fn assemble(args: AssembleArgs, settings: &Settings) -> miette::Result<ExitCode> {
    let output = args
        .output
        .as_deref()
        .map(str::parse::<Output>)
        .transpose()
        .map_err(|e| miette::miette!("{e}"))?;
    let created = match args.created {
        Some(c) => c,
        None => source_date_epoch()?,
    };
    let platforms =
        if args.platforms.is_empty() { vec![Platform::host()] } else { args.platforms.clone() };
    let mut contents: Vec<PlatformContents> =
        platforms.iter().map(|p| PlatformContents { platform: *p, packages: vec![] }).collect();
    for spec in &args.packages {
        let (only, package) = match spec.split_once('@') {
            Some((p, rest)) => {
                (Some(p.parse::<Platform>().map_err(|e| miette::miette!("{spec:?}: {e}"))?), rest)
            }
            None => (None, spec.as_str()),
        };
        let Some((name, tree)) = package.split_once('=') else {
            return Err(miette::miette!(
                help = "write NAME=b3:TREE, e.g. hello=b3:… from `pkg store add`",
                "invalid --package {spec:?}"
            ));
        };
        let tree: Digest = tree.parse().map_err(|e| miette::miette!("{spec:?}: {e}"))?;
        for c in contents.iter_mut().filter(|c| only.is_none_or(|p| p == c.platform)) {
            c.packages.push(PackageTree { name: name.to_string(), tree });
        }
    }
    let compression = match args.compression.as_str() {
        "zstd" => Compression::Zstd,
        _ => Compression::Gzip,
    };
    let spec = ImageSpec {
        name: args.name,
        config: ImageConfig { compression, ..ImageConfig::default() },
        platforms: contents,
        created,
    };
    let options =
        AssembleOptions { max_layers: args.max_layers, threads: args.jobs, ..Default::default() };
    let store = open_store(settings)?;
    let images = assemble_and_write(&store, &[spec], &options, output.as_ref(), settings)?;
    let image = &images[0];
    super::write_stdout(format!("sha256:{}\n", image.top.digest).as_bytes())
}

/// The default image creation time: `SOURCE_DATE_EPOCH`, else 0 (1970).
pub(crate) fn source_date_epoch() -> miette::Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| miette::miette!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// Assembles `specs` (recording them in the store), then writes them where
/// `output` says: a layout is written in the same publication as the store's
/// files, so their fsyncs overlap.
pub(crate) fn assemble_and_write(
    store: &Store,
    specs: &[crate::image::ImageSpec],
    options: &crate::image::AssembleOptions,
    output: Option<&Output>,
    settings: &Settings,
) -> miette::Result<Vec<crate::image::AssembledImage>> {
    let (images, _) = match output {
        Some(Output::Layout(dir)) => {
            crate::image::assemble_into_layout(store, specs, options, &settings.cwd.join(dir))
        }
        _ => crate::image::assemble(store, specs, options),
    }
    .into_diagnostic()?;
    if let Some(output @ Output::Archive(_)) = output {
        write_images(store, output, &images, settings)?;
    }
    Ok(images)
}

/// Writes assembled images where `output` says.
pub(crate) fn write_images(
    store: &Store,
    output: &Output,
    images: &[crate::image::AssembledImage],
    settings: &Settings,
) -> miette::Result<()> {
    match output {
        Output::Layout(dir) => {
            crate::image::write_oci_layout(store, &settings.cwd.join(dir), images)
        }
        Output::Archive(file) => {
            crate::image::write_oci_archive(store, &settings.cwd.join(file), images)
        }
    }
    .into_diagnostic()
}

fn open_store(settings: &Settings) -> miette::Result<Store> {
    Store::open(&settings.store).into_diagnostic()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn outputs_parse() {
        assert_eq!("oci:d".parse(), Ok(Output::Layout("d".into())));
        assert_eq!("oci-archive:f.tar".parse(), Ok(Output::Archive("f.tar".into())));
        assert!("docker://x".parse::<Output>().is_err());
    }
}
