//! The first `pkg run` of a foreign image with many small files: importing
//! an OCI layout into an empty store, then checking its layers out (what
//! `pkg run oci:DIR` does before it starts the sandbox).
//!
//! Data: `PKG_BENCH_IMPORT_FILES` files (default 4,000) of 1–24 KiB of
//! text-like bytes (about 49 MiB in all, like a language runtime's library),
//! in directories of 20, made into a one-layer gzip image by pkg itself. Each
//! iteration opens a new store beside the layout (the same filesystem, as
//! `target/`), so the import ingests every object and the checkout writes
//! every file. The stores are kept until the bench ends (about 100 MB each,
//! about 1.2 GB for the default run): on ext4, creating thousands of files
//! right after deleting thousands is much slower (inodes freed in the last
//! 30 s are skipped), which would measure the previous iteration's deletion.
//!
//! - `import/first-run`: import, then one shared checkout per layer tree
//!   (the README's performance table).

use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pkg::image::import::{ImportRequest, OciSource, import};
use pkg::image::{self, AssembleOptions, ImageConfig, ImageSpec, PackageTree, PlatformContents};
use pkg::platform::Platform;
use pkg::store::Store;

/// Writes `count` files of 1–24 KiB, twenty per directory; returns their total size.
fn make_files(root: &Path, count: usize) -> u64 {
    let words: Vec<&[u8]> = [
        &b"def "[..],
        b"return ",
        b"self.",
        b"import ",
        b"    ",
        b"\n",
        b"value",
        b"(x, y)",
        b" = ",
        b"# comment ",
    ]
    .to_vec();
    // A fixed xorshift, so every run writes the same bytes.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut total = 0;
    for i in 0..count {
        let dir = root.join(format!("lib/d{:03}", i / 20));
        if i % 20 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let len = 1024 + (next() % (23 * 1024)) as usize;
        let mut data = Vec::with_capacity(len + 16);
        while data.len() < len {
            data.extend_from_slice(words[(next() % words.len() as u64) as usize]);
            if next() % 8 == 0 {
                data.extend_from_slice(format!("{:x}", next()).as_bytes());
            }
        }
        data.truncate(len);
        std::fs::write(dir.join(format!("f{i}.py")), &data).unwrap();
        total += len as u64;
    }
    total
}

fn bench(c: &mut Criterion) {
    let count: usize =
        std::env::var("PKG_BENCH_IMPORT_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bytes = make_files(&work.path().join("src"), count);
    let layout = work.path().join("oci");
    {
        let store = Store::open(&work.path().join("setup-store")).unwrap();
        let tree = store
            .ingest_dir(&work.path().join("src"), &|_: &Path, _: &std::fs::Metadata| false)
            .unwrap();
        let spec = ImageSpec {
            name: "many-files".into(),
            config: ImageConfig::default(),
            platforms: vec![PlatformContents {
                platform: Platform::host(),
                packages: vec![PackageTree { name: "lib".into(), tree }],
            }],
            created: 0,
        };
        image::assemble_into_layout(
            &store,
            std::slice::from_ref(&spec),
            &AssembleOptions::default(),
            &layout,
        )
        .unwrap();
    }
    let source = OciSource::Layout(layout);
    let request = ImportRequest { source: &source, reference: None, platform: Platform::host() };

    let mut group = c.benchmark_group("import");
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Bytes(bytes));
    let mut round = 0;
    group.bench_function("first-run", |b| {
        b.iter_batched(
            || {
                round += 1;
                let root = work.path().join(format!("store-{round}"));
                Store::open(&root).unwrap()
            },
            |store| {
                let imported = import(&store, &request).unwrap();
                assert!(!imported.cached);
                for tree in &imported.layers {
                    drop(store.shared_checkout(tree).unwrap());
                }
                store
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
