//! Image assembly from trees already in the store, and gzip layer compression.
//!
//! Data: `PKG_BENCH_IMAGE_MIB` MiB (default 64) of real executables copied from
//! `/usr/bin` (sorted by name, so every run takes the same files), split into
//! four packages.
//!
//! - `assemble/cold`: the layer cache is emptied before each iteration, so every
//!   layer is tarred, compressed (gzip) and written; configs and manifests too.
//! - `assemble/warm`: the layer cache holds every layer: assembly reads the
//!   package trees, checks conflicts, and writes config, manifest and record.
//!   Target: ≤ 10 ms.
//! - `gzip/pkg`: the layer compressor (`pkg::image::gzip`: 256 KiB blocks, one
//!   gzip member each by libdeflate at `pkg::image::layer::GZIP_LEVEL`, on all
//!   cores) on one layer's uncompressed tar, in memory.
//! - `gzip/gzip-6`: `gzip -6 -c` on the same tar (from a file, to /dev/null).
//!   Target: `gzip/pkg` ≥ 2× the throughput of `gzip -6`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pkg::image::{
    self, AssembleOptions, ImageConfig, ImageSpec, Ownership, PackageTree, PlatformContents,
};
use pkg::platform::Platform;
use pkg::store::Store;

const MIB: u64 = 1024 * 1024;

/// Copies regular files from /usr/bin into `count` package directories until `bytes` are copied.
fn make_packages(root: &Path, count: usize, bytes: u64) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir("/usr/bin")
        .expect("read /usr/bin")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    files.sort();
    let dirs: Vec<_> = (0..count).map(|i| root.join(format!("pkg{i}/usr/bin"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut copied = 0;
    for (i, file) in files.iter().enumerate() {
        if copied >= bytes {
            break;
        }
        let Ok(data) = std::fs::read(file) else { continue };
        let dest = dirs[i % count].join(file.file_name().unwrap());
        std::fs::write(&dest, &data).unwrap();
        copied += data.len() as u64;
    }
    (0..count).map(|i| root.join(format!("pkg{i}"))).collect()
}

fn bench(c: &mut Criterion) {
    let mib: u64 =
        std::env::var("PKG_BENCH_IMAGE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let tmp = tempfile::tempdir().unwrap();
    let dirs = make_packages(&tmp.path().join("src"), 4, mib * MIB);
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let packages: Vec<PackageTree> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| PackageTree {
            name: format!("pkg{i}"),
            tree: store.ingest_dir(d, &|_: &Path, _: &std::fs::Metadata| false).unwrap(),
        })
        .collect();
    let spec = ImageSpec {
        name: "bench".into(),
        config: ImageConfig::default(),
        platforms: vec![PlatformContents {
            platform: Platform::host(),
            packages: packages.clone(),
        }],
        created: 0,
    };
    let options = AssembleOptions::default();

    let mut group = c.benchmark_group("assemble");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(mib * MIB));
    group.bench_function("cold", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_dir_all(store.root().join("layers"));
            },
            |()| image::assemble(&store, std::slice::from_ref(&spec), &options).unwrap(),
            BatchSize::PerIteration,
        )
    });
    image::assemble(&store, std::slice::from_ref(&spec), &options).unwrap();
    group.bench_function("warm", |b| {
        b.iter(|| {
            let (_, stats) =
                image::assemble(&store, std::slice::from_ref(&spec), &options).unwrap();
            assert_eq!(stats.layers_built, 0);
        })
    });
    group.finish();

    // One layer's uncompressed tar, compressed in memory and by gzip -6.
    let mut tar = Vec::new();
    image::layer::write_tar(&store, &packages[0].tree, Ownership::ROOT, 0, &mut tar).unwrap();
    let tar_file = tmp.path().join("layer.tar");
    std::fs::write(&tar_file, &tar).unwrap();
    let mut group = c.benchmark_group("gzip");
    group.sample_size(10).measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Bytes(tar.len() as u64));
    group.bench_function("pkg", |b| {
        b.iter(|| {
            let mut gz =
                image::gzip::GzWriter::new(Vec::with_capacity(tar.len()), image::layer::GZIP_LEVEL)
                    .unwrap();
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap().len()
        })
    });
    group.bench_function("gzip-6", |b| {
        b.iter(|| {
            let status = Command::new("gzip")
                .args(["-6", "-c"])
                .stdin(std::fs::File::open(&tar_file).unwrap())
                .stdout(Stdio::null())
                .status()
                .expect("run gzip");
            assert!(status.success());
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
