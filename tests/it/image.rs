//! Image assembly: OCI layouts and archives from trees ingested into a temp store,
//! checked with skopeo, umoci, oci-image-tool and podman. A missing tool is a
//! failure with the package to install, never a skip (scripts/test.sh installs them).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pkg::digest::Digest;
use pkg::image::{
    self, AssembleOptions, AssembledImage, Compression, ImageConfig, ImageError, ImageSpec,
    Ownership, PackageTree, PlatformContents,
};
use pkg::platform::{Arch, Platform};
use pkg::store::Store;

use crate::common::{TestContext, stderr, stdout, tool};

/// Writes files (`path`, content, mode) and symlinks (`path`, "->target", 0) under `root`.
fn make_dir(root: &Path, entries: &[(&str, &str, u32)]) -> PathBuf {
    std::fs::create_dir_all(root).unwrap();
    for (path, content, mode) in entries {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        if let Some(target) = content.strip_prefix("->") {
            std::os::unix::fs::symlink(target, &full).unwrap();
        } else {
            std::fs::write(&full, content).unwrap();
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
    }
    // Directory modes are part of the tree: pin them whatever the umask.
    for entry in walk_dirs(root) {
        std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    root.to_path_buf()
}

fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            out.extend(walk_dirs(&entry.path()));
            out.push(entry.path());
        }
    }
    out
}

fn ingest(store: &Store, dir: &Path) -> Digest {
    store.ingest_dir(dir, &|_: &Path, _: &std::fs::Metadata| false).unwrap()
}

fn package(store: &Store, root: &Path, name: &str, entries: &[(&str, &str, u32)]) -> PackageTree {
    let dir = make_dir(&root.join("src").join(name), entries);
    PackageTree { name: name.to_string(), tree: ingest(store, &dir) }
}

fn amd64() -> Platform {
    Platform::linux(Arch::Amd64)
}

fn arm64() -> Platform {
    Platform::linux(Arch::Arm64)
}

fn spec(name: &str, platforms: &[Platform], packages: &[PackageTree]) -> ImageSpec {
    ImageSpec {
        name: name.to_string(),
        config: ImageConfig::default(),
        platforms: platforms
            .iter()
            .map(|p| PlatformContents { platform: *p, packages: packages.to_vec() })
            .collect(),
        created: 1_700_000_000,
    }
}

fn assemble_one(store: &Store, spec: ImageSpec) -> AssembledImage {
    image::assemble(store, &[spec], &AssembleOptions::default()).unwrap().0.remove(0)
}

/// A small app and its dependency, files only.
fn demo_packages(store: &Store, root: &Path) -> Vec<PackageTree> {
    vec![
        package(
            store,
            root,
            "base",
            &[
                ("etc/os-release", "NAME=demo\n", 0o644),
                ("etc/ssl/certs/ca.pem", "not really a cert\n", 0o644),
            ],
        ),
        package(
            store,
            root,
            "hello",
            &[
                ("usr/bin/hello", "#!/bin/sh\necho hello\n", 0o755),
                ("usr/bin/hi", "->hello", 0),
                ("usr/share/hello/a.txt", "a\n", 0o644),
                ("usr/share/hello/a/b", "b\n", 0o600),
            ],
        ),
    ]
}

/// Reads one layer blob of a layout back as (path, type, mode, uid, gid, mtime, uname, content).
fn read_layer(
    blob: &Path,
    compression: Compression,
) -> Vec<(String, char, u32, u64, u64, u64, String)> {
    let file = std::fs::File::open(blob).unwrap();
    let reader: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::Decoder::new(file).unwrap()),
    };
    let mut archive = tar::Archive::new(reader);
    let mut out = vec![];
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let h = entry.header().clone();
        assert!(h.as_gnu().is_some(), "every header is GNU");
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            other => panic!("unexpected entry type {other:?}"),
        };
        let mut content = String::new();
        if kind == 'l' {
            content = entry.link_name().unwrap().unwrap().to_string_lossy().into_owned();
        } else {
            entry.read_to_string(&mut content).unwrap();
        }
        let gnu = h.as_gnu().unwrap();
        assert_eq!(gnu.atime().unwrap_or(0), 0, "no atime");
        assert_eq!(gnu.ctime().unwrap_or(0), 0, "no ctime");
        assert_eq!(h.username_bytes().unwrap_or_default(), b"", "no user name");
        assert_eq!(h.groupname_bytes().unwrap_or_default(), b"", "no group name");
        out.push((
            entry.path().unwrap().to_string_lossy().into_owned(),
            kind,
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            content,
        ));
    }
    out
}

#[test]
fn image_layout_passes_skopeo_umoci_and_oci_image_tool() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let mut spec = spec("demo", &[amd64()], &demo_packages(&store, ctx.root()));
    spec.config = ImageConfig {
        entrypoint: vec!["/usr/bin/hello".into()],
        cmd: vec!["--listen".into(), ":8080".into()],
        env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
        workdir: Some("/".into()),
        user: Some("65532:65532".into()),
        expose: vec![pkg::recipe::Port { number: 8080, protocol: pkg::recipe::Protocol::Tcp }],
        labels: BTreeMap::from([("org.opencontainers.image.title".into(), "demo".into())]),
        compression: Compression::Gzip,
    };
    let image = assemble_one(&store, spec);
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, std::slice::from_ref(&image)).unwrap();
    let dir = layout.to_str().unwrap();

    let inspect = tool("skopeo", &["inspect", &format!("oci:{dir}:demo")]);
    let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(info["Created"], "2023-11-14T22:13:20Z");
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(info["Env"], serde_json::json!(["PATH=/usr/bin:/bin"]));
    assert_eq!(info["Labels"]["org.opencontainers.image.title"], "demo");
    let config = tool("skopeo", &["inspect", "--config", &format!("oci:{dir}:demo")]);
    let config: serde_json::Value = serde_json::from_slice(&config.stdout).unwrap();
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/bin/hello"]));
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["--listen", ":8080"]));
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["WorkingDir"], "/");
    assert_eq!(config["config"]["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert_eq!(config["history"][1]["created_by"], "pkg: hello");

    tool("oci-image-tool", &["validate", "--type", "image", "--ref", "name=demo", dir]);

    let bundle = ctx.root().join("bundle");
    tool(
        "umoci",
        &["unpack", "--rootless", "--image", &format!("{dir}:demo"), bundle.to_str().unwrap()],
    );
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("usr/bin/hello")).unwrap(),
        "#!/bin/sh\necho hello\n"
    );
    let mode =
        |p: &str| std::fs::symlink_metadata(rootfs.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("usr/bin/hello"), 0o755);
    assert_eq!(mode("usr/share/hello/a/b"), 0o600);
    assert_eq!(std::fs::read_link(rootfs.join("usr/bin/hi")).unwrap(), Path::new("hello"));
    assert_eq!(std::fs::read_to_string(rootfs.join("etc/os-release")).unwrap(), "NAME=demo\n");

    let report = image::verify_oci_layout(&layout).unwrap();
    assert_eq!(report.refs, vec!["demo".to_string()]);
    assert_eq!(report.blobs, 4, "manifest, config and two layers");
}

#[test]
fn image_with_two_platforms_has_an_index() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let image = assemble_one(
        &store,
        spec("multi", &[amd64(), arm64()], &demo_packages(&store, ctx.root())),
    );
    assert!(image.index.is_some());
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, std::slice::from_ref(&image)).unwrap();
    let dir = layout.to_str().unwrap();
    let raw = tool("skopeo", &["inspect", "--raw", &format!("oci:{dir}:multi")]);
    let raw: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<String> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for arch in ["amd64", "arm64"] {
        let out =
            tool("skopeo", &["--override-arch", arch, "inspect", &format!("oci:{dir}:multi")]);
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["Architecture"], arch);
    }
    tool("oci-image-tool", &["validate", "--type", "image", "--ref", "name=multi", dir]);
    // Same packages on both platforms: the layers are the same blobs.
    assert_eq!(image.platforms[0].layers, image.platforms[1].layers);
    assert_ne!(image.platforms[0].config, image.platforms[1].config);
    assert_eq!(image::verify_oci_layout(&layout).unwrap().blobs, 1 + 2 + 2 + 2);
}

#[test]
fn image_archive_is_inspectable_and_deterministic() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let image = assemble_one(&store, spec("arch", &[amd64()], &demo_packages(&store, ctx.root())));
    let file = ctx.root().join("image.tar");
    image::write_oci_archive(&store, &file, std::slice::from_ref(&image)).unwrap();
    let out = tool("skopeo", &["inspect", &format!("oci-archive:{}:arch", file.display())]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Digest"], format!("sha256:{}", image.top.digest));
    let first = std::fs::read(&file).unwrap();
    image::write_oci_archive(&store, &file, std::slice::from_ref(&image)).unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), first);
    let mut names = vec![];
    for entry in tar::Archive::new(first.as_slice()).entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.header().mtime().unwrap(), 1_700_000_000);
        names.push(entry.path().unwrap().to_string_lossy().into_owned());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.last().unwrap(), "oci-layout");
}

#[test]
fn image_layer_tars_are_canonical() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let long = format!("usr/share/{}/file", "d".repeat(120));
    let pkg = package(
        &store,
        ctx.root(),
        "p",
        &[
            ("a/b", "ab", 0o644),
            ("a.txt", "a", 0o640),
            ("a-z", "->a.txt", 0),
            (&long, "long", 0o644),
        ],
    );
    for (compression, owner) in [
        (Compression::Gzip, Ownership::ROOT),
        (Compression::Zstd, Ownership { uid: 65532, gid: 65533 }),
    ] {
        let mut spec = spec("canon", &[amd64()], std::slice::from_ref(&pkg));
        spec.config.compression = compression;
        let options = AssembleOptions { owner, ..AssembleOptions::default() };
        let image = image::assemble(&store, &[spec], &options).unwrap().0.remove(0);
        let layer = &image.platforms[0].layers[0];
        let entries = read_layer(&store.oci_blob_path(&layer.blob.digest), compression);
        let paths: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        // Path byte order (a directory's path is its name, so it sorts before
        // its children): "a" < "a-z" < "a.txt" < "a/b".
        assert_eq!(
            paths,
            [
                "a/",
                "a-z",
                "a.txt",
                "a/b",
                "usr/",
                "usr/share/",
                &format!("usr/share/{}/", "d".repeat(120)),
                long.as_str()
            ]
        );
        for (path, _, _, uid, gid, mtime, _) in &entries {
            assert_eq!((*uid, *gid), (u64::from(owner.uid), u64::from(owner.gid)), "{path}");
            assert_eq!(*mtime, 1_700_000_000, "{path}");
        }
        assert_eq!((entries[0].1, entries[0].2), ('d', 0o755));
        assert_eq!((entries[1].1, entries[1].6.as_str()), ('l', "a.txt"));
        assert_eq!((entries[2].2, entries[2].6.as_str()), (0o640, "a"));
        assert_eq!(entries[7].6, "long");
        // The diff_id is the sha256 of the uncompressed tar.
        let mut tar = vec![];
        let file = std::fs::File::open(store.oci_blob_path(&layer.blob.digest)).unwrap();
        match compression {
            Compression::Gzip => flate2::read::MultiGzDecoder::new(file).read_to_end(&mut tar),
            Compression::Zstd => zstd::stream::Decoder::new(file).unwrap().read_to_end(&mut tar),
        }
        .unwrap();
        use sha2::Digest as _;
        assert_eq!(pkg::store::hex(&sha2::Sha256::digest(&tar)), layer.diff_id);
    }
}

/// `assemble_into_layout` writes the same layout as `assemble` then
/// `write_oci_layout` (blobs are hard links to the store's on its
/// filesystem; elsewhere, those built now are written as they are
/// compressed), and a failed
/// assembly leaves no layout directory behind.
#[test]
fn assemble_into_layout_matches_write_oci_layout() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let packages = demo_packages(&store, ctx.root());
    let layout = ctx.root().join("out/layout");
    let specs = [spec("demo", &[amd64()], &packages)];
    let (images, stats) =
        image::assemble_into_layout(&store, &specs, &AssembleOptions::default(), &layout).unwrap();
    assert_eq!(stats.layers_built, 2);
    assert_eq!(image::verify_oci_layout(&layout).unwrap().refs, vec!["demo".to_string()]);
    let other = ctx.root().join("other");
    image::write_oci_layout(&store, &other, &images).unwrap();
    assert_eq!(read_all(&layout), read_all(&other));
    // Layers from the cache give the same layout.
    let again = ctx.root().join("again");
    let (_, stats) =
        image::assemble_into_layout(&store, &specs, &AssembleOptions::default(), &again).unwrap();
    assert_eq!(stats.layers_cached, 2);
    assert_eq!(read_all(&again), read_all(&other));
    // On the store's filesystem, every blob is the store's inode, whether
    // built now or taken from the cache.
    use std::os::unix::fs::MetadataExt;
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let blobs = images[0].blobs();
    assert_eq!(blobs.len(), 4);
    for blob in &blobs {
        let stored = inode(&store.oci_blob_path(&blob.digest));
        assert_eq!(inode(&layout.join("blobs/sha256").join(&blob.digest)), stored);
        assert_eq!(inode(&again.join("blobs/sha256").join(&blob.digest)), stored);
    }
    // On another filesystem, layers built now are written into the layout.
    std::fs::remove_dir_all(store.root().join("layers")).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let elsewhere = shm.path().join("layout");
    let (_, stats) =
        image::assemble_into_layout(&store, &specs, &AssembleOptions::default(), &elsewhere)
            .unwrap();
    assert_eq!(stats.layers_built, 2);
    assert_eq!(read_all(&elsewhere), read_all(&other));
    // A linked blob damaged in place (no OCI tool does that) is caught the
    // next time the cache's copy is read.
    std::fs::remove_dir_all(store.root().join("layers")).unwrap();
    let linked = ctx.root().join("linked");
    image::assemble_into_layout(&store, &specs, &AssembleOptions::default(), &linked).unwrap();
    let layer = linked.join("blobs/sha256").join(&images[0].platforms[0].layers[1].blob.digest);
    std::fs::set_permissions(&layer, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[0] ^= 1;
    let mut in_place = std::fs::OpenOptions::new().write(true).open(&layer).unwrap();
    std::io::Write::write_all(&mut in_place, &bytes).unwrap();
    let fresh = ctx.root().join("fresh");
    let err = image::write_oci_layout(&store, &fresh, &images).unwrap_err();
    assert!(matches!(err, ImageError::CorruptCachedBlob { .. }), "{err:?}");
    // No temp name (a hard link to the damaged blob) is left behind.
    let left: Vec<_> = std::fs::read_dir(fresh.join("blobs/sha256")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    let a = package(&store, ctx.root(), "alpha", &[("etc/app.conf", "one", 0o644)]);
    let b = package(&store, ctx.root(), "beta", &[("etc/app.conf", "two", 0o644)]);
    let missing = ctx.root().join("missing/layout");
    let bad = [spec("bad", &[amd64()], &[a, b])];
    let err = image::assemble_into_layout(&store, &bad, &AssembleOptions::default(), &missing)
        .unwrap_err();
    assert!(matches!(err, ImageError::Conflict { .. }), "{err:?}");
    assert!(!ctx.root().join("missing").exists());
}

#[test]
fn image_conflicting_paths_name_both_packages() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let a = package(
        &store,
        ctx.root(),
        "alpha",
        &[("etc/app.conf", "one", 0o644), ("etc/same", "s", 0o644)],
    );
    let b = package(
        &store,
        ctx.root(),
        "beta",
        &[("etc/app.conf", "two", 0o644), ("etc/same", "s", 0o644)],
    );
    let err = image::assemble(
        &store,
        &[spec("bad", &[amd64()], &[a.clone(), b])],
        &AssembleOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Conflict { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "packages `alpha` and `beta` both provide /etc/app.conf with different content"
    );
    // Same content at the same path is fine; so is a file versus a mode change? No: modes are content.
    let c = package(&store, ctx.root(), "gamma", &[("etc/same", "s", 0o755)]);
    let err = image::assemble(
        &store,
        &[spec("bad", &[amd64()], &[a.clone(), c])],
        &AssembleOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "packages `alpha` and `gamma` both provide /etc/same with different content"
    );
    let d = package(
        &store,
        ctx.root(),
        "delta",
        &[("etc/same", "s", 0o644), ("etc/other", "o", 0o644)],
    );
    image::assemble(&store, &[spec("good", &[amd64()], &[a, d])], &AssembleOptions::default())
        .unwrap();
}

#[test]
fn image_layers_fold_down_to_the_cap() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let big = "x".repeat(10_000);
    let packages: Vec<PackageTree> = (0..8)
        .map(|i| {
            let content = if i < 3 { big.clone() + &i.to_string() } else { format!("small {i}") };
            package(
                &store,
                ctx.root(),
                &format!("p{i}"),
                &[(&format!("usr/lib/p{i}"), &content, 0o644)],
            )
        })
        .collect();
    // p7 is shared with a second image, so it is the last to be folded.
    let other = spec("other", &[amd64()], &packages[7..]);
    let options = AssembleOptions { max_layers: 3, ..AssembleOptions::default() };
    let (images, _) =
        image::assemble(&store, &[spec("folded", &[amd64()], &packages), other], &options).unwrap();
    let layers = &images[0].platforms[0].layers;
    let groups: Vec<Vec<String>> = layers.iter().map(|l| l.packages.clone()).collect();
    assert_eq!(layers.len(), 3, "{groups:?}");
    // The unshared small packages are merged first (their group then absorbs the
    // next smallest, p0), then the two remaining big ones; shared p7 stays alone.
    assert_eq!(groups, [vec!["p0", "p3", "p4", "p5", "p6"], vec!["p1", "p2"], vec!["p7"]]);
    assert_eq!(layers[2].blob, images[1].platforms[0].layers[0].blob, "shared layer kept whole");
    // Every file is still there, once.
    let mut paths = vec![];
    for layer in layers {
        for e in read_layer(&store.oci_blob_path(&layer.blob.digest), Compression::Gzip) {
            if e.1 == 'f' {
                paths.push(e.0);
            }
        }
    }
    paths.sort();
    assert_eq!(paths, (0..8).map(|i| format!("usr/lib/p{i}")).collect::<Vec<_>>());
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, &images).unwrap();
    tool(
        "umoci",
        &[
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:folded", layout.display()),
            ctx.root().join("b").to_str().unwrap(),
        ],
    );
    assert!(ctx.root().join("b/rootfs/usr/lib/p5").exists());
}

#[test]
fn image_shared_package_shares_its_layer_blob() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let packages = demo_packages(&store, ctx.root());
    let extra = package(&store, ctx.root(), "extra", &[("opt/extra", "e", 0o644)]);
    let one = assemble_one(&store, spec("one", &[amd64()], &packages[..1]));
    let two = assemble_one(&store, spec("two", &[amd64()], &[packages[0].clone(), extra]));
    assert_eq!(one.platforms[0].layers[0].blob, two.platforms[0].layers[0].blob);
    assert_ne!(one.top, two.top);
    // Both end up in one layout, named by their refs; the shared blob is stored once.
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, std::slice::from_ref(&one)).unwrap();
    image::write_oci_layout(&store, &layout, std::slice::from_ref(&two)).unwrap();
    let report = image::verify_oci_layout(&layout).unwrap();
    assert_eq!(report.refs, ["one", "two"]);
    assert_eq!(report.blobs, 2 + 1 + 2 + 1);
    let blobs = std::fs::read_dir(layout.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 6);
}

#[test]
fn image_warm_layer_cache_builds_nothing() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let packages = demo_packages(&store, ctx.root());
    let first = image::assemble(
        &store,
        &[spec("w", &[amd64(), arm64()], &packages)],
        &AssembleOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (first.1.layers_built, first.1.layers_cached),
        (2, 0),
        "layers shared across platforms are built once"
    );
    let again = image::assemble(
        &store,
        &[spec("w", &[amd64(), arm64()], &packages)],
        &AssembleOptions::default(),
    )
    .unwrap();
    assert_eq!((again.1.layers_built, again.1.layers_cached), (0, 2));
    assert_eq!(again.0, first.0);
    // Any input of the key changes: mtime.
    let mut later = spec("w", &[amd64()], &packages);
    later.created += 1;
    let later = image::assemble(&store, &[later], &AssembleOptions::default()).unwrap();
    assert_eq!(later.1.layers_built, 2);
    // Recorded in the store by name, and listed.
    let recorded = image::load(&store, &pkg::store::RefName::new("w").unwrap()).unwrap().unwrap();
    assert_eq!(recorded, later.0[0]);
    let out = ctx.run(&["images"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NAME  PLATFORMS    DIGEST"), "{text}");
    assert!(text.contains(&format!("w     linux/amd64  sha256:{}", recorded.top.digest)), "{text}");
}

#[test]
fn image_verify_detects_a_corrupt_blob() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let image = assemble_one(&store, spec("c", &[amd64()], &demo_packages(&store, ctx.root())));
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, std::slice::from_ref(&image)).unwrap();
    let blob = layout.join("blobs/sha256").join(&image.platforms[0].layers[1].blob.digest);
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = image::verify_oci_layout(&layout).unwrap_err();
    assert!(matches!(err, ImageError::CorruptBlob { .. }), "{err:?}");
    // A corrupt blob in the store's cache is refused when writing, too.
    let cached = store.oci_blob_path(&image.platforms[0].layers[0].blob.digest);
    std::fs::set_permissions(&cached, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&cached, bytes).unwrap();
    let images = std::slice::from_ref(&image);
    let err = image::write_oci_layout(&store, &ctx.root().join("other"), images).unwrap_err();
    assert!(matches!(err, ImageError::CorruptCachedBlob { .. }), "{err:?}");
    // The message says what to do: the cache can go.
    let digest = &image.platforms[0].layers[0].blob.digest;
    assert_eq!(
        err.to_string(),
        format!(
            "blob {digest} in the store's layer cache is corrupt: its content hashes to \
             sha256:{} ({} bytes); the cache can go: delete {} and build again",
            pkg::store::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                std::fs::read(&cached).unwrap()
            )),
            std::fs::metadata(&cached).unwrap().len(),
            store.root().join("layers").display()
        )
    );
    // And when writing an archive, which is left unwritten.
    let archive = ctx.root().join("image.tar");
    let err = image::write_oci_archive(&store, &archive, images).unwrap_err();
    assert!(matches!(err, ImageError::CorruptCachedBlob { .. }), "{err:?}");
    assert!(!archive.exists());
}

/// A files-only image with fixed inputs: its digests pin the whole format
/// (tar layout, compression bytes, JSON), so any drift fails here.
#[test]
fn image_golden_digests() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let packages = demo_packages(&store, ctx.root());
    let mut text = String::new();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut spec = spec("golden", &[amd64(), arm64()], &packages);
        spec.config.compression = compression;
        spec.config.entrypoint = vec!["/usr/bin/hello".into()];
        let image = assemble_one(&store, spec);
        text.push_str(&format!("{compression:?} index sha256:{}\n", image.top.digest));
        for p in &image.platforms {
            text.push_str(&format!(
                "  {} manifest sha256:{} config sha256:{}\n",
                p.platform, p.manifest.digest, p.config.digest
            ));
            for l in &p.layers {
                text.push_str(&format!(
                    "    layer sha256:{} diff_id sha256:{} size {}\n",
                    l.blob.digest, l.diff_id, l.blob.size
                ));
            }
        }
    }
    crate::assert_snapshot!("image_golden_digests", text);
}

/// Every file of a directory, by relative path.
fn read_all(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

/// Ingests the demo packages and assembles them through the CLI in `root`,
/// with a shell `prefix` (umask) and `env`, optionally as another user.
fn cli_build(
    root: &Path,
    as_user: Option<(u32, u32)>,
    umask: &str,
    jobs: &str,
    env: &[(&str, &str)],
) -> (BTreeMap<String, Vec<u8>>, Vec<u8>) {
    std::fs::create_dir_all(root).unwrap();
    let src = root.join("src");
    make_dir(&src.join("base"), &[("etc/os-release", "NAME=demo\n", 0o644)]);
    make_dir(
        &src.join("hello"),
        &[("usr/bin/hello", "#!/bin/sh\necho hello\n", 0o755), ("usr/bin/hi", "->hello", 0)],
    );
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    if let Some((uid, gid)) = as_user {
        tool("chown", &["-R", &format!("{uid}:{gid}"), root.to_str().unwrap()]);
    }
    let script = format!(
        "set -eu; umask {umask}; B=$(\"$PKG\" store add src/base); H=$(\"$PKG\" store add src/hello); \
         \"$PKG\" assemble repro --package base=$B --package hello=$H --platform linux/amd64 --platform linux/arm64 -j {jobs} -o oci:layout >/dev/null; \
         \"$PKG\" assemble repro --package base=$B --package hello=$H --platform linux/amd64 --platform linux/arm64 -j {jobs} --compression zstd -o oci-archive:repro.tar"
    );
    let mut cmd = match as_user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "--",
                "sh",
                "-c",
                &script,
            ]);
            c
        }
        None => {
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
    };
    cmd.current_dir(root)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root)
        .env("PKG", env!("CARGO_BIN_EXE_pkg"))
        .env("PKG_STORE", root.join("store"))
        .env("SOURCE_DATE_EPOCH", "1700000000");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    (read_all(&root.join("layout")), std::fs::read(root.join("repro.tar")).unwrap())
}

#[test]
fn image_is_reproducible_across_stores_env_users_and_threads() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = cli_build(a.path(), None, "022", "1", &[("TZ", "UTC"), ("LC_ALL", "C")]);
    // A later wall clock, another timezone, locale, umask, thread count and store
    // directory, and (when the suite runs as root) another user.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let user = crate::common::running_as_root().then(|| {
        crate::common::lookup_user(crate::common::DEFAULT_TEST_USER)
            .expect("user pkgtest exists (scripts/test.sh creates it)")
    });
    std::fs::set_permissions(b.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let second = cli_build(
        &b.path().join("deeper"),
        user,
        "077",
        "4",
        &[("TZ", "Asia/Kathmandu"), ("LC_ALL", "C.UTF-8")],
    );
    assert_eq!(first.0.keys().collect::<Vec<_>>(), second.0.keys().collect::<Vec<_>>());
    for (name, bytes) in &first.0 {
        assert!(second.0[name] == *bytes, "{name} differs");
    }
    assert!(first.1 == second.1, "archives differ");
    assert!(first.0.len() >= 8, "index.json, oci-layout, index, 2 manifests, 2 configs, layers");
}

/// Builds a static binary printing `greeting` (musl-gcc from musl-tools).
fn static_hello(dir: &Path, greeting: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let c = dir.join("hello.c");
    std::fs::write(
        &c,
        format!("#include <stdio.h>\nint main(void) {{ puts(\"{greeting}\"); return 0; }}\n"),
    )
    .unwrap();
    let out = dir.join("hello");
    tool("musl-gcc", &["-static", "-O2", "-o", out.to_str().unwrap(), c.to_str().unwrap()]);
    out
}

crate::rootless_test! {
    fn image_runs_under_rootless_podman() {
        let ctx = TestContext::new();
        let store = Store::open(&ctx.store()).unwrap();
        let bin = static_hello(&ctx.root().join("build"), "hello from pkg");
        let out = ctx.root().join("out/usr/bin");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(&bin, out.join("hello")).unwrap();
        std::fs::set_permissions(out.join("hello"), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Incompressible padding makes the layer several gzip members long.
        let mut padding = vec![0u8; 3 * image::gzip::BLOCK];
        blake3::Hasher::new().update(b"padding").finalize_xof().fill(&mut padding);
        std::fs::write(out.join("padding"), padding).unwrap();
        make_dir(&ctx.root().join("out"), &[]);
        let hello = PackageTree { name: "hello".into(), tree: ingest(&store, &ctx.root().join("out")) };
        let mut spec = spec("hello", &[Platform::host()], &[hello]);
        spec.config.entrypoint = vec!["/usr/bin/hello".into()];
        let image = assemble_one(&store, spec);
        // podman derives a local image name from the layout path: keep it lowercase.
        let scratch = std::env::temp_dir().join(format!("pkg-podman-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let layout = scratch.join("layout");
        image::write_oci_layout(&store, &layout, &[image]).unwrap();
        let graph = ctx.root().join("podman");
        let run = Command::new("podman")
            .args(["--root", graph.join("root").to_str().unwrap(), "--runroot", graph.join("run").to_str().unwrap(),
                   "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
                   "run", "--rm", "--runtime", "runc", "--network", "none",
                   &format!("oci:{}:hello", layout.display())])
            .env("XDG_RUNTIME_DIR", graph.join("xdg"))
            .env("XDG_CONFIG_HOME", graph.join("config"))
            .output()
            .expect("podman is installed (apt-get install podman runc)");
        let _ = std::fs::remove_dir_all(&scratch);
        // Rootless storage holds files owned by sub-uids: remove it inside podman's namespace.
        let _ = Command::new("podman").arg("unshare").arg("rm").arg("-rf").arg(&graph).output();
        assert!(run.status.success(), "podman failed: {}\n{}", stdout(&run), stderr(&run));
        assert_eq!(stdout(&run), "hello from pkg\n");
    }
}

#[test]
fn image_specs_follow_the_build_graph() {
    let ctx = TestContext::new();
    let recipe = ctx.write(
        "pkg.kdl",
        r#"
package "app" { build "script" { run "true" }; depends "certs" }
package "certs" { build "script" { run "true" } }
image "app" {
    contents "app"
    platforms "linux/amd64" "linux/arm64"
    entrypoint "/usr/bin/app"
    compression "zstd"
}
"#,
    );
    let recipe = pkg::recipe::load(&recipe).unwrap();
    let graph =
        pkg::graph::BuildGraph::plan(&recipe, &pkg::graph::Selection::all(amd64())).unwrap();
    let mut outputs = std::collections::HashMap::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        outputs.insert(id, Digest::of(format!("{}-{}", node.package, node.platform).as_bytes()));
    }
    let specs = image::specs_from_graph(&recipe, &graph, &outputs, 42).unwrap();
    assert_eq!(specs.len(), 1);
    let spec = &specs[0];
    assert_eq!((spec.name.as_str(), spec.created), ("app", 42));
    assert_eq!(spec.config.entrypoint, ["/usr/bin/app"]);
    assert_eq!(spec.config.compression, Compression::Zstd);
    let platforms: Vec<String> = spec.platforms.iter().map(|p| p.platform.to_string()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for contents in &spec.platforms {
        let names: Vec<&str> = contents.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["certs", "app"], "dependencies first");
        assert_eq!(
            contents.packages[1].tree,
            Digest::of(format!("app-{}", contents.platform).as_bytes())
        );
    }
    outputs.remove(&0);
    let err = image::specs_from_graph(&recipe, &graph, &outputs, 0).unwrap_err();
    assert!(matches!(err, ImageError::MissingOutput { .. }), "{err:?}");
}

crate::rootless_test! {
    /// `pkg build RECIPE -o oci:DIR` builds the demo recipe and writes its
    /// image: an index with both platforms, whose amd64 image unpacks with
    /// umoci and runs its greeting.
    fn build_writes_the_demo_image() {
        let ctx = TestContext::new();
        let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/hello");
        let both = ctx.root().join("both");
        let out = ctx.run(&["build", recipe, "-o", &format!("oci:{}", both.display())]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("image hello sha256:"), "{}", stderr(&out));
        let raw = tool("skopeo", &["inspect", "--raw", &format!("oci:{}:hello", both.display())]);
        let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
        let archs: Vec<&str> =
            index["manifests"].as_array().unwrap().iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
        assert_eq!(archs, ["amd64", "arm64"]);

        // umoci cannot pick from an index; build the host platform alone (all cached).
        let amd64 = ctx.root().join("amd64");
        let out = ctx.run(&["build", recipe, "--platform", "linux/amd64", "-o", &format!("oci:{}", amd64.display())]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("up to date"), "{}", stderr(&out));
        let bundle = ctx.root().join("bundle");
        tool("umoci", &["unpack", "--rootless", "--image", &format!("{}:hello", amd64.display()), bundle.to_str().unwrap()]);
        let hello = Command::new(bundle.join("rootfs/usr/bin/hello")).arg("there").output().unwrap();
        assert_eq!(stdout(&hello), "Hello from pkg!\narg 1: there\n");
        let passwd = std::fs::read_to_string(bundle.join("rootfs/etc/passwd")).unwrap();
        assert!(passwd.contains("nonroot:x:65532"), "{passwd}");
    }
}

/// Every recipe directory under `recipes/` whose `pkg.kdl` defines an image,
/// with its images, in directory order.
fn recipe_images() -> Vec<(PathBuf, Vec<pkg::recipe::Image>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs.into_iter()
        .filter(|dir| dir.join("pkg.kdl").is_file())
        .filter_map(|dir| {
            let recipe = pkg::recipe::load(&dir.join("pkg.kdl"))
                .unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()));
            let images: Vec<_> = recipe.images.into_values().collect();
            (!images.is_empty()).then_some((dir, images))
        })
        .collect()
}

/// What a recipe image's entrypoint is run with and prints on `arch`. A new
/// recipe image with an entrypoint must say here what it prints.
fn expected_run(image: &str, arch: Arch) -> (&'static [&'static str], String) {
    match image {
        "hello" => (&["there"], "Hello from pkg!\narg 1: there\n".to_string()),
        "hello-c" => (&[], format!("Hello from C on linux/{}!\n", arch.oci_name())),
        // Without `--once` it would serve HTTP on :8080 (the image's cmd).
        "hello-go" => (&["--once"], format!("Hello from Go on linux/{}!\n", arch.oci_name())),
        "hello-rust" => (&[], format!("Hello from Rust on linux/{}!\n", arch.gnu_name())),
        other => panic!(
            "recipe image `{other}` has an entrypoint: add what it prints to `expected_run` in \
             tests/it/image.rs"
        ),
    }
}

/// `skopeo inspect` (image and config) of `reference` for `platform`; checks
/// the platform and the entrypoint the recipe gives.
fn inspect_platform(reference: &str, platform: &Platform, image: &pkg::recipe::Image) {
    let mut args =
        vec!["--override-os", platform.os(), "--override-arch", platform.arch().oci_name()];
    if let Some(variant) = platform.variant() {
        args.extend(["--override-variant", variant]);
    }
    args.extend(["inspect", reference]);
    let info: serde_json::Value = serde_json::from_slice(&tool("skopeo", &args).stdout).unwrap();
    assert_eq!(info["Architecture"], platform.arch().oci_name(), "{reference} for {platform}");
    assert_eq!(info["Os"], platform.os(), "{reference} for {platform}");
    args.insert(args.len() - 1, "--config");
    let config: serde_json::Value = serde_json::from_slice(&tool("skopeo", &args).stdout).unwrap();
    let entrypoint = &config["config"]["Entrypoint"];
    if image.entrypoint.is_empty() {
        assert!(entrypoint.is_null(), "{reference} for {platform}: {entrypoint}");
    } else {
        assert_eq!(*entrypoint, serde_json::json!(image.entrypoint), "{reference} for {platform}");
    }
}

/// Unpacks `layout`'s image `name` (one platform) with umoci and checks its
/// rootfs: the entrypoint exists and prints what [`expected_run`] says (run
/// natively on the host's arch, else explicitly under qemu-user-static, since
/// binfmt_misc may not be mounted); an image without one is not empty.
fn unpack_and_run(layout: &Path, image: &pkg::recipe::Image, platform: &Platform, bundle: &Path) {
    let name = &image.name.value;
    let reference = format!("{}:{name}", layout.display());
    tool("umoci", &["unpack", "--rootless", "--image", &reference, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    let Some(entrypoint) = image.entrypoint.first() else {
        assert!(!read_all(&rootfs).is_empty(), "{reference} unpacks to an empty rootfs");
        return;
    };
    let program = rootfs.join(entrypoint.trim_start_matches('/'));
    let meta = std::fs::symlink_metadata(&program)
        .unwrap_or_else(|e| panic!("{reference}: entrypoint {entrypoint} not in the rootfs: {e}"));
    assert!(meta.is_file() && meta.permissions().mode() & 0o111 != 0, "{reference}: {entrypoint}");
    let (args, expected) = expected_run(name, platform.arch());
    let mut run = if platform.arch() == Platform::host().arch() {
        Command::new(&program)
    } else {
        let qemu = format!("qemu-{}-static", platform.arch().gnu_name());
        let mut c = Command::new(qemu);
        c.arg(&program);
        c
    };
    let out = run.args(args).env_clear().output().unwrap_or_else(|e| {
        panic!("cannot run {entrypoint} of {reference} ({e}): install qemu-user-static (scripts/test.sh does)")
    });
    assert!(out.status.success(), "{entrypoint} of {reference} failed: {}", stderr(&out));
    assert_eq!(stdout(&out), expected, "{entrypoint} of {reference} for {platform}");
}

crate::rootless_test! {
    /// Every recipe under recipes/ that defines an image, built with `pkg
    /// build RECIPE -o oci:DIR` and `-o oci-archive:FILE`, passes the peer
    /// tools: skopeo inspects both for each platform, oci-image-tool validates
    /// the layout and the archive's contents, and umoci unpacks each platform,
    /// whose entrypoint runs and prints its greeting. One store serves all, so
    /// every build after the first of a recipe is cached.
    fn every_recipe_image_passes_skopeo_umoci_and_oci_image_tool() {
        let recipes = recipe_images();
        let found: Vec<String> = recipes
            .iter()
            .map(|(dir, _)| dir.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in ["ca-certs", "hello", "hello-c", "hello-go", "hello-rust"] {
            assert!(found.iter().any(|f| f == expected), "recipes/{expected} not found among {found:?}");
        }
        let ctx = TestContext::new();
        // hello-rust builds with cargo: the toolchain this test may use comes first.
        let path = crate::common::path_with_rust();
        let pkg = |args: &[&str]| -> String {
            let out = ctx.pkg().env("PATH", &path).args(args).output().unwrap();
            assert!(out.status.success(), "pkg {} failed:\n{}", args.join(" "), stderr(&out));
            stderr(&out)
        };
        for (dir, images) in &recipes {
            let recipe = dir.to_str().unwrap();
            for image in images {
                let name = image.name.value.as_str();
                let platforms: Vec<Platform> = if image.platforms.is_empty() {
                    vec![Platform::host()]
                } else {
                    image.platforms.iter().map(|p| p.value).collect()
                };
                let layout = ctx.root().join(format!("{name}.oci"));
                let archive = ctx.root().join(format!("{name}.tar"));
                pkg(&["build", recipe, "--image", name, "-o", &format!("oci:{}", layout.display())]);
                pkg(&["build", recipe, "--image", name, "-o", &format!("oci-archive:{}", archive.display())]);
                for platform in &platforms {
                    inspect_platform(&format!("oci:{}:{name}", layout.display()), platform, image);
                    inspect_platform(&format!("oci-archive:{}:{name}", archive.display()), platform, image);
                }

                // oci-image-tool 1.0.0-rc1 (Debian 12) implements neither
                // `--type imageLayout` nor reading a layout from a tar: it
                // validates directories (as layouts) with `--type image`, so
                // the archive is checked unpacked, and must hold the layout.
                let ref_name = format!("name={name}");
                tool("oci-image-tool", &["validate", "--type", "image", "--ref", &ref_name, layout.to_str().unwrap()]);
                let unpacked = ctx.root().join(format!("{name}.tar.d"));
                std::fs::create_dir(&unpacked).unwrap();
                tool("tar", &["-xf", archive.to_str().unwrap(), "-C", unpacked.to_str().unwrap()]);
                tool("oci-image-tool", &["validate", "--type", "image", "--ref", &ref_name, unpacked.to_str().unwrap()]);
                assert!(read_all(&unpacked) == read_all(&layout), "{name}: the archive does not hold the layout");

                // umoci cannot pick a platform from an index: one layout per
                // platform, built from the cached packages.
                for platform in &platforms {
                    let arch = platform.to_string().replace('/', "-");
                    let single = ctx.root().join(format!("{name}-{arch}.oci"));
                    let err = pkg(&[
                        "build", recipe, "--image", name, "--platform", &platform.to_string(),
                        "-o", &format!("oci:{}", single.display()),
                    ]);
                    assert!(err.contains("up to date"), "{name} for {platform} was built again:\n{err}");
                    unpack_and_run(&single, image, platform, &ctx.root().join(format!("{name}-{arch}.bundle")));
                }
            }
        }
    }
}
