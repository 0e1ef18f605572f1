//! Importing foreign OCI images (`pkg::image::import`): layouts and archives
//! written by hand here (tar crate, JSON by hand), by umoci (real whiteouts)
//! and by pkg itself, checked against an independent overlay merge of the
//! resulting trees.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest as _;

use pkg::digest::Digest;
use pkg::image::import::{self, ImportError, ImportRequest, Imported, OciSource};
use pkg::image::{self, AssembleOptions, ImageConfig, ImageSpec, PackageTree, PlatformContents};
use pkg::platform::{Arch, Platform};
use pkg::store::{Node, Store};

use crate::assert_snapshot;
use crate::common::{TestContext, stderr, stdout, tool};

// ---------------------------------------------------------------- tar layers

/// One entry of a hand-written layer tar.
enum E<'a> {
    File(&'a str, &'a str, u32),
    Dir(&'a str, u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str),
    Fifo(&'a str),
    /// A file whose path is written as is into the header (e.g. with `..`).
    RawPath(&'a str),
    /// A file whose (long) path is given in a PAX extended header.
    PaxPath(&'a str, &'a str),
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A deterministic layer tar of `entries`, in order.
fn layer_tar(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for entry in entries {
        match *entry {
            E::File(path, content, mode) => {
                let mut h = header(tar::EntryType::Regular, mode, content.len() as u64);
                b.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
            E::Dir(path, mode) => {
                let mut h = header(tar::EntryType::Directory, mode, 0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            E::Symlink(path, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target).unwrap();
            }
            E::Hardlink(path, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, path, target).unwrap();
            }
            E::Char(path) => {
                let mut h = header(tar::EntryType::Char, 0o666, 0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            E::Fifo(path) => {
                let mut h = header(tar::EntryType::Fifo, 0o644, 0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            E::RawPath(path) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 3);
                let name = &mut h.as_old_mut().name;
                name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, &b"bad"[..]).unwrap();
            }
            E::PaxPath(path, content) => {
                let record = pax_record("path", path);
                let mut h = header(tar::EntryType::XHeader, 0o644, record.len() as u64);
                b.append_data(&mut h, "PaxHeaders/x", record.as_slice()).unwrap();
                let mut h = header(tar::EntryType::Regular, 0o644, content.len() as u64);
                b.append_data(&mut h, "short-name-replaced-by-pax", content.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Comp {
    None,
    Gzip,
    Zstd,
}

/// The layer blob of `tar` and its OCI media type.
fn compress(tar: &[u8], comp: Comp) -> (Vec<u8>, &'static str) {
    match comp {
        Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            gz.write_all(tar).unwrap();
            (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Comp::Zstd => {
            (zstd::encode_all(tar, 3).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd")
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    pkg::store::hex(&sha2::Sha256::digest(bytes))
}

// ------------------------------------------------------------- OCI layouts

/// An OCI layout being written by hand.
struct Layout {
    dir: PathBuf,
    /// Descriptors for index.json.
    manifests: Vec<serde_json::Value>,
}

/// A layer as written: its blob bytes' digest and its tar's diff_id.
struct LayerSpec {
    tar: Vec<u8>,
    comp: Comp,
}

fn layer(entries: &[E<'_>], comp: Comp) -> LayerSpec {
    LayerSpec { tar: layer_tar(entries), comp }
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf(), manifests: vec![] }
    }

    fn blob(&self, bytes: &[u8]) -> serde_json::Value {
        let hex = sha256_hex(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        serde_json::json!({ "digest": format!("sha256:{hex}"), "size": bytes.len() })
    }

    fn blob_path(&self, descriptor: &serde_json::Value) -> PathBuf {
        let digest = descriptor["digest"].as_str().unwrap();
        self.dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
    }

    /// Writes the config and manifest of an image; returns the manifest descriptor.
    fn image(&self, arch: &str, layers: &[LayerSpec]) -> serde_json::Value {
        let mut descriptors = vec![];
        let mut diff_ids = vec![];
        for l in layers {
            let (blob, media_type) = compress(&l.tar, l.comp);
            let mut d = self.blob(&blob);
            d["mediaType"] = media_type.into();
            descriptors.push(d);
            diff_ids.push(format!("sha256:{}", sha256_hex(&l.tar)));
        }
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let mut config = self.blob(&serde_json::to_vec(&config).unwrap());
        config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": descriptors,
        });
        let mut d = self.blob(&serde_json::to_vec(&manifest).unwrap());
        d["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        d["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
        d
    }

    /// Writes an image index of `manifests`; returns its descriptor.
    fn index(&self, manifests: Vec<serde_json::Value>) -> serde_json::Value {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let mut d = self.blob(&serde_json::to_vec(&index).unwrap());
        d["mediaType"] = "application/vnd.oci.image.index.v1+json".into();
        d
    }

    /// Adds `descriptor` to index.json under `name` (if any) and rewrites index.json.
    fn add(&mut self, mut descriptor: serde_json::Value, name: Option<&str>) -> &mut Self {
        if let Some(name) = name {
            descriptor["annotations"] =
                serde_json::json!({ "org.opencontainers.image.ref.name": name });
        }
        self.manifests.push(descriptor);
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": self.manifests });
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        self
    }
}

/// A one-image layout at `dir` (ref `latest`) holding `layers`, for amd64.
fn simple_layout(dir: &Path, layers: &[LayerSpec]) -> Layout {
    let mut layout = Layout::new(dir);
    let d = layout.image("amd64", layers);
    layout.add(d, Some("latest"));
    layout
}

fn amd64() -> Platform {
    Platform::linux(Arch::Amd64)
}

fn arm64() -> Platform {
    Platform::linux(Arch::Arm64)
}

fn try_import(
    store: &Store,
    source: &OciSource,
    reference: Option<&str>,
    platform: Platform,
) -> Result<Imported, ImportError> {
    import::import(store, &ImportRequest { source, reference, platform })
}

fn import_dir(store: &Store, dir: &Path) -> Imported {
    try_import(store, &OciSource::Layout(dir.to_path_buf()), None, amd64()).unwrap()
}

fn error_text(ctx: &TestContext, e: &ImportError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    ctx.redact(&text)
}

// ------------------------------------------------------------ overlay merge

/// The filesystem that stacking `layers` (base first) with overlayfs
/// semantics gives, as path → description. Written independently of the
/// importer: later layers processed over earlier ones, a non-directory
/// replacing a whole subtree, a directory over a directory merging.
fn merged(store: &Store, layers: &[Digest]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for tree in layers {
        for entry in store.walk(tree) {
            let entry = entry.unwrap();
            let path = entry.path.to_string_lossy().into_owned();
            let name = entry.path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with(".wh."), "a tree holds the whiteout {path}");
            let desc = describe(store, &entry.node);
            let is_dir = matches!(entry.node, Node::Dir(_));
            let was_dir = out.get(&path).is_some_and(|d| d.starts_with("dir"));
            if !(is_dir && was_dir) {
                let prefix = format!("{path}/");
                out.retain(|p, _| !p.starts_with(&prefix));
            }
            out.insert(path, desc);
        }
    }
    out
}

fn describe(store: &Store, node: &Node) -> String {
    match node {
        Node::Dir(d) => format!("dir {:o}", d.permissions.bits()),
        Node::Symlink(t) => format!("-> {}", String::from_utf8_lossy(t.as_bytes())),
        Node::File(f) => {
            let mut content = Vec::new();
            store.open_file(f).read_to_end(&mut content).unwrap();
            format!("file {:o} {}", f.permissions().bits(), String::from_utf8_lossy(&content))
        }
    }
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(p, d)| (p.to_string(), d.to_string())).collect()
}

// ------------------------------------------------------------------- tests

fn base_entries() -> Vec<E<'static>> {
    vec![
        E::Dir("./", 0o755),
        E::Dir("./etc/", 0o755),
        E::File("./etc/hostname", "box\n", 0o644),
        E::Dir("./usr/bin/", 0o755),
        E::File("./usr/bin/tool", "#!/bin/sh\n", 0o755),
        E::Symlink("./bin", "/usr/bin"),
    ]
}

#[test]
fn layers_in_every_compression_import_to_the_same_trees() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let mut results = vec![];
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let dir = ctx.root().join(format!("{comp:?}"));
        simple_layout(&dir, &[layer(&base_entries(), comp)]);
        let imported = import_dir(&store, &dir);
        assert!(!imported.cached);
        assert_eq!(imported.platform, amd64());
        assert!(imported.warnings.is_empty(), "{:?}", imported.warnings);
        // Written as one batch, durable before the import returns: no
        // unsynced marker is left for recovery.
        let markers = std::fs::read_dir(store.root().join("unsynced")).unwrap().count();
        assert_eq!(markers, 0);
        results.push(imported.layers);
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
    assert_eq!(
        merged(&store, &results[0]),
        expect(&[
            ("bin", "-> /usr/bin"),
            ("etc", "dir 755"),
            ("etc/hostname", "file 644 box\n"),
            ("usr", "dir 755"),
            ("usr/bin", "dir 755"),
            ("usr/bin/tool", "file 755 #!/bin/sh\n"),
        ])
    );
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_content_and_lower_trees_stay_shared() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let base = [
        E::File("etc/a", "a", 0o644),
        E::File("etc/b", "b", 0o644),
        E::File("opt/x/1", "1", 0o644),
        E::File("opt/x/2", "2", 0o644),
        E::File("var/gone/file", "f", 0o644),
    ];
    let untouched = [E::File("srv/data", "d", 0o600)];
    let upper = [
        E::File("etc/.wh.a", "", 0o644),
        E::Dir("opt/x/", 0o750),
        E::File("opt/x/.wh..wh..opq", "", 0o644),
        E::File("opt/x/3", "3", 0o644),
        E::File("var/.wh.gone", "", 0o644),
        E::File("var/gone", "now a file", 0o644),
        E::File(".wh..wh.plnk", "", 0o644),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(
        &dir,
        &[layer(&base, Comp::Gzip), layer(&untouched, Comp::Gzip), layer(&upper, Comp::Gzip)],
    );
    let imported = import_dir(&store, &dir);
    assert_eq!(imported.layers.len(), 3);
    assert_eq!(
        merged(&store, &imported.layers),
        expect(&[
            ("etc", "dir 755"),
            ("etc/b", "file 644 b"),
            ("opt", "dir 755"),
            ("opt/x", "dir 750"),
            ("opt/x/3", "file 644 3"),
            ("srv", "dir 755"),
            ("srv/data", "file 600 d"),
            ("var", "dir 755"),
            ("var/gone", "file 644 now a file"),
        ])
    );
    // The layers without whiteouts, imported alone, give the same trees where
    // the whiteouts do not reach: the untouched layer is shared as is.
    let alone = ctx.root().join("alone");
    simple_layout(&alone, &[layer(&untouched, Comp::Gzip)]);
    assert_eq!(import_dir(&store, &alone).layers[0], imported.layers[1]);
}

#[test]
fn an_opaque_root_hides_every_lower_layer() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let base = [E::File("etc/a", "a", 0o644), E::Dir("kept-mode/", 0o700)];
    let upper = [
        E::File("./.wh..wh..opq", "", 0o644),
        E::File("etc/b", "b", 0o644),
        E::File("kept-mode/x", "x", 0o644),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&base, Comp::Gzip), layer(&upper, Comp::Gzip)]);
    let imported = import_dir(&store, &dir);
    assert_eq!(
        merged(&store, &imported.layers),
        expect(&[
            ("etc", "dir 755"),
            ("etc/b", "file 644 b"),
            // The directory below is hidden, so its mode is not inherited.
            ("kept-mode", "dir 755"),
            ("kept-mode/x", "file 644 x"),
        ])
    );
}

#[test]
fn parents_are_created_or_replaced_like_a_tar_extraction() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let base =
        [E::Dir("private/", 0o700), E::Symlink("link", "/elsewhere"), E::File("file", "f", 0o644)];
    let upper = [
        E::File("private/new", "n", 0o644),
        E::File("link/inside", "i", 0o644),
        E::File("deep/er/x", "x", 0o644),
        E::Dir("file/", 0o711),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&base, Comp::None), layer(&upper, Comp::None)]);
    let imported = import_dir(&store, &dir);
    assert_eq!(
        merged(&store, &imported.layers),
        expect(&[
            ("deep", "dir 755"),
            ("deep/er", "dir 755"),
            ("deep/er/x", "file 644 x"),
            ("file", "dir 711"),
            ("link", "dir 755"),
            ("link/inside", "file 644 i"),
            ("private", "dir 700"),
            ("private/new", "file 644 n"),
        ])
    );
}

#[test]
fn hard_links_copy_their_target_from_this_layer_or_below() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let base = [E::File("usr/lib/base.so", "base", 0o755)];
    let upper = [
        E::File("usr/bin/busybox", "bb", 0o755),
        E::Hardlink("usr/bin/sh", "usr/bin/busybox"),
        E::Hardlink("./usr/lib/again.so", "/usr/lib/base.so"),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&base, Comp::Gzip), layer(&upper, Comp::Gzip)]);
    let m = merged(&store, &import_dir(&store, &dir).layers);
    assert_eq!(m["usr/bin/sh"], "file 755 bb");
    assert_eq!(m["usr/lib/again.so"], "file 755 base");

    let bad = ctx.root().join("bad");
    simple_layout(&bad, &[layer(&[E::Hardlink("a", "nowhere")], Comp::Gzip)]);
    let e = try_import(&store, &OciSource::Layout(bad), None, amd64()).unwrap_err();
    assert_snapshot!("missing_hard_link_target", error_text(&ctx, &e));
}

#[test]
fn a_dotdot_entry_refuses_the_layer() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&[E::RawPath("../etc/passwd")], Comp::Gzip)]);
    let e = try_import(&store, &OciSource::Layout(dir), None, amd64()).unwrap_err();
    assert!(matches!(e, ImportError::Escape { .. }), "{e:?}");
    assert_snapshot!("dotdot_entry", error_text(&ctx, &e));
    let dir = ctx.root().join("link");
    simple_layout(&dir, &[layer(&[E::Hardlink("etc/x", "../../etc/shadow")], Comp::Gzip)]);
    let e = try_import(&store, &OciSource::Layout(dir), None, amd64()).unwrap_err();
    assert_snapshot!("dotdot_hard_link", error_text(&ctx, &e));
}

#[test]
fn symlinks_are_kept_verbatim_and_long_names_are_read() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let long = format!("usr/share/{}/file", "d".repeat(120));
    let pax = format!("opt/{}/pax", "p".repeat(150));
    let entries = [
        E::Symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        E::Symlink("lib", "usr/lib"),
        E::Symlink("up", "../../outside"),
        E::File(&long, "long", 0o644),
        E::PaxPath(&pax, "pax"),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&entries, Comp::Zstd)]);
    let m = merged(&store, &import_dir(&store, &dir).layers);
    assert_eq!(m["etc/localtime"], "-> /usr/share/zoneinfo/UTC");
    assert_eq!(m["lib"], "-> usr/lib");
    assert_eq!(m["up"], "-> ../../outside");
    assert_eq!(m[&long], "file 644 long");
    assert_eq!(m[&pax], "file 644 pax");
    assert!(!m.contains_key("short-name-replaced-by-pax"));
}

#[test]
fn devices_are_skipped_and_setuid_dropped_with_warnings() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let entries = [
        E::Char("dev/null"),
        E::Char("dev/zero"),
        E::Fifo("run/fifo"),
        E::File("usr/bin/passwd", "pw", 0o4755),
        E::File("usr/bin/wall", "w", 0o2755),
        E::Dir("tmp/", 0o1777),
    ];
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&entries, Comp::Gzip)]);
    let imported = import_dir(&store, &dir);
    let m = merged(&store, &imported.layers);
    assert!(!m.contains_key("dev/null") && !m.contains_key("run/fifo"));
    assert_eq!(m["usr/bin/passwd"], "file 755 pw");
    assert_eq!(m["usr/bin/wall"], "file 755 w");
    assert_eq!(m["tmp"], "dir 1777");
    assert_snapshot!("warnings", imported.warnings.join("\n"));
    // A cached import repeats the warnings.
    assert_eq!(import_dir(&store, &dir).warnings, imported.warnings);
}

#[test]
fn a_corrupt_blob_or_wrong_diff_id_is_named() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    for comp in [Comp::Gzip, Comp::None] {
        let dir = ctx.root().join(format!("flipped-{comp:?}"));
        let layout = simple_layout(&dir, &[layer(&base_entries(), comp)]);
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(layout.blob_path(&index["manifests"][0])).unwrap(),
        )
        .unwrap();
        let blob = layout.blob_path(&manifest["layers"][0]);
        let mut bytes = std::fs::read(&blob).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&blob, bytes).unwrap();
        let e = try_import(&store, &OciSource::Layout(dir), None, amd64()).unwrap_err();
        assert!(matches!(e, ImportError::CorruptBlob { .. }), "{comp:?}: {e:?}");
        assert_snapshot!(format!("corrupt_layer_{comp:?}"), error_text(&ctx, &e));
    }

    // A layer whose blob is intact but whose config names another diff_id.
    let dir = ctx.root().join("diff-id");
    let mut layout = Layout::new(&dir);
    let good = layer(&base_entries(), Comp::Gzip);
    let (blob, media_type) = compress(&good.tar, good.comp);
    let mut d = layout.blob(&blob);
    d["mediaType"] = media_type.into();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", "0".repeat(64))] },
    });
    let mut config = layout.blob(&serde_json::to_vec(&config).unwrap());
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({ "schemaVersion": 2, "config": config, "layers": [d] });
    let mut m = layout.blob(&serde_json::to_vec(&manifest).unwrap());
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    layout.add(m, None);
    let e = try_import(&store, &OciSource::Layout(dir), None, amd64()).unwrap_err();
    assert!(matches!(e, ImportError::DiffIdMismatch { .. }), "{e:?}");
    assert_snapshot!("wrong_diff_id", error_text(&ctx, &e));
}

#[test]
fn layout_and_selection_errors_are_clear() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let empty = ctx.root().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = try_import(&store, &OciSource::Layout(empty), None, amd64()).unwrap_err();
    assert_snapshot!("missing_index_json", error_text(&ctx, &e));

    let dir = ctx.root().join("two");
    let mut layout = Layout::new(&dir);
    let one = layout.image("amd64", &[layer(&[E::File("one", "1", 0o644)], Comp::Gzip)]);
    let two = layout.image("amd64", &[layer(&[E::File("two", "2", 0o644)], Comp::Gzip)]);
    layout.add(one, Some("one")).add(two, Some("example.org/two:1.0"));
    let source = OciSource::Layout(dir.clone());
    let e = try_import(&store, &source, Some("three"), amd64()).unwrap_err();
    assert_snapshot!("unknown_ref", error_text(&ctx, &e));
    let e = try_import(&store, &source, None, amd64()).unwrap_err();
    assert_snapshot!("ambiguous_ref", error_text(&ctx, &e));
    let one = try_import(&store, &source, Some("one"), amd64()).unwrap();
    assert!(merged(&store, &one.layers).contains_key("one"));
    // A full NAME:TAG ref, and its tag alone.
    let two = try_import(&store, &source, Some("example.org/two:1.0"), amd64()).unwrap();
    assert!(merged(&store, &two.layers).contains_key("two"));
    assert_eq!(try_import(&store, &source, Some("1.0"), amd64()).unwrap().layers, two.layers);

    let e = try_import(&store, &source, Some("one"), arm64()).unwrap_err();
    assert!(matches!(e, ImportError::PlatformMismatch { .. }), "{e:?}");
    assert_snapshot!("platform_mismatch", error_text(&ctx, &e));

    std::fs::write(dir.join("index.json"), "{not json").unwrap();
    let e = try_import(&store, &source, None, amd64()).unwrap_err();
    assert_snapshot!("bad_index_json", error_text(&ctx, &e));

    let missing = ctx.root().join("missing-blob");
    let layout = simple_layout(&missing, &[layer(&base_entries(), Comp::Gzip)]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(missing.join("index.json")).unwrap()).unwrap();
    std::fs::remove_file(layout.blob_path(&index["manifests"][0])).unwrap();
    let e = try_import(&store, &OciSource::Layout(missing), None, amd64()).unwrap_err();
    assert_snapshot!("missing_blob", error_text(&ctx, &e));

    // A fifo in place of a layer blob is refused, never waited on.
    let fifo = ctx.root().join("fifo-blob");
    let layout = simple_layout(&fifo, &[layer(&base_entries(), Comp::Gzip)]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fifo.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.blob_path(&index["manifests"][0])).unwrap())
            .unwrap();
    let blob = layout.blob_path(&manifest["layers"][0]);
    std::fs::remove_file(&blob).unwrap();
    nix::unistd::mkfifo(&blob, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let e = try_import(&store, &OciSource::Layout(fifo), None, amd64()).unwrap_err();
    assert_snapshot!("fifo_blob", error_text(&ctx, &e));

    let odd = ctx.root().join("odd-media-type");
    let mut layout = Layout::new(&odd);
    let mut d = layout.blob(b"{}");
    d["mediaType"] = "application/vnd.example.thing+json".into();
    layout.add(d, None);
    let e = try_import(&store, &OciSource::Layout(odd), None, amd64()).unwrap_err();
    assert_snapshot!("unknown_media_type", error_text(&ctx, &e));

    let traversal = ctx.root().join("traversal");
    let mut layout = Layout::new(&traversal);
    layout.add(
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:../../../../etc/passwd", "size": 10,
        }),
        None,
    );
    let e = try_import(&store, &OciSource::Layout(traversal), None, amd64()).unwrap_err();
    assert_snapshot!("bad_digest", error_text(&ctx, &e));
}

#[test]
fn a_multi_platform_index_selects_by_platform() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("multi");
    let mut layout = Layout::new(&dir);
    let amd = layout.image("amd64", &[layer(&[E::File("arch", "amd64", 0o644)], Comp::Gzip)]);
    let arm = layout.image("arm64", &[layer(&[E::File("arch", "arm64", 0o644)], Comp::Zstd)]);
    let index = layout.index(vec![amd, arm]);
    layout.add(index, Some("multi"));
    let source = OciSource::Layout(dir);
    for (platform, arch) in [(amd64(), "amd64"), (arm64(), "arm64")] {
        let imported = try_import(&store, &source, Some("multi"), platform).unwrap();
        assert_eq!(imported.platform, platform);
        assert_eq!(merged(&store, &imported.layers)["arch"], format!("file 644 {arch}"));
    }
    let s390x = Platform::linux(Arch::S390x);
    let e = try_import(&store, &source, None, s390x).unwrap_err();
    assert_snapshot!("no_matching_platform", error_text(&ctx, &e));
}

/// Docker's media types (manifest list, v2 manifest, container config,
/// `rootfs.diff.tar.gzip`), and a descriptor without a media type in
/// index.json, as some tools write.
#[test]
fn docker_media_types_are_read() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("docker");
    let mut layout = Layout::new(&dir);
    let mut manifests = vec![];
    for arch in ["arm64", "amd64"] {
        let tar = layer_tar(&[E::File("arch", arch, 0o644)]);
        let (blob, _) = compress(&tar, Comp::Gzip);
        let mut l = layout.blob(&blob);
        l["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip".into();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "config": {},
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&tar))] },
        });
        let mut c = layout.blob(&serde_json::to_vec(&config).unwrap());
        c["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": c, "layers": [l],
        });
        let mut m = layout.blob(&serde_json::to_vec(&manifest).unwrap());
        m["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
        m["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
        manifests.push(m);
    }
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": manifests,
    });
    let d = layout.blob(&serde_json::to_vec(&list).unwrap());
    layout.add(d, Some("docker.io/library/thing:1"));
    let imported = try_import(&store, &OciSource::Layout(dir), Some("1"), amd64()).unwrap();
    assert_eq!(merged(&store, &imported.layers)["arch"], "file 644 amd64");
}

/// Tars the layout at `dir` with the `tar` command (entries named `./…`).
fn tar_layout(dir: &Path, file: &Path) {
    let out = Command::new("tar")
        .arg("-cf")
        .arg(file)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .output()
        .expect("run tar (scripts/test.sh installs it)");
    assert!(out.status.success(), "tar failed: {}", stderr(&out));
}

#[test]
fn an_oci_archive_imports_like_its_layout_and_a_second_import_is_cached() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("layout");
    let base = layer(&base_entries(), Comp::Gzip);
    let upper = layer(&[E::File("etc/.wh.hostname", "", 0o644)], Comp::Gzip);
    simple_layout(&dir, &[base, upper]);
    let archive = ctx.root().join("image.tar");
    tar_layout(&dir, &archive);

    let from_archive =
        try_import(&store, &OciSource::Archive(archive.clone()), Some("latest"), amd64()).unwrap();
    assert!(!from_archive.cached);
    let from_layout = import_dir(&store, &dir);
    assert!(from_layout.cached, "same manifest: served from the record");
    assert_eq!(from_layout.layers, from_archive.layers);
    assert_eq!(from_layout.config, from_archive.config);
    assert!(!merged(&store, &from_layout.layers).contains_key("etc/hostname"));
    let config = std::fs::read(store.oci_blob_path(&from_layout.config.digest)).unwrap();
    assert_eq!(sha256_hex(&config), from_layout.config.digest);

    // A fresh store imports the archive from scratch and gets the same trees.
    let other = Store::open(&ctx.root().join("store2")).unwrap();
    let fresh = try_import(&other, &OciSource::Archive(archive.clone()), None, amd64()).unwrap();
    assert!(!fresh.cached);
    assert_eq!(fresh.layers, from_archive.layers);

    // Not a tar, or a tar without index.json.
    std::fs::write(ctx.root().join("junk.tar"), vec![7u8; 2048]).unwrap();
    let e = try_import(&store, &OciSource::Archive(ctx.root().join("junk.tar")), None, amd64())
        .unwrap_err();
    assert_snapshot!("archive_not_a_tar", error_text(&ctx, &e));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&std::fs::read(&archive).unwrap()).unwrap();
    std::fs::write(ctx.root().join("image.tar.gz"), gz.finish().unwrap()).unwrap();
    let e = try_import(&store, &OciSource::Archive(ctx.root().join("image.tar.gz")), None, amd64())
        .unwrap_err();
    assert_snapshot!("archive_gzipped", error_text(&ctx, &e));
}

#[test]
fn a_cached_import_still_verifies_the_manifest_and_needs_its_trees() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&base_entries(), Comp::Gzip)]);
    let first = import_dir(&store, &dir);
    assert!(import_dir(&store, &dir).cached);
    // A record whose trees are gone is not trusted: the layers are read again.
    let record = store.import_record(&first.manifest).unwrap().unwrap();
    assert_eq!(record.trees, first.layers.iter().copied().collect());
    store.remove_import(&first.manifest).unwrap();
    store.gc(false).unwrap();
    assert!(!store.contains(pkg::store::ObjectKind::Tree, &first.layers[0]));
    store.set_import(&first.manifest, &record).unwrap_err();
    let again = import_dir(&store, &dir);
    assert!(!again.cached);
    assert_eq!(again.layers, first.layers);
    // A corrupt manifest is caught even when a record exists.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest = dir.join("blobs/sha256").join(&first.manifest);
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&manifest, bytes).unwrap();
    assert!(index["manifests"][0]["digest"].as_str().unwrap().ends_with(&first.manifest));
    let e = try_import(&store, &OciSource::Layout(dir), None, amd64()).unwrap_err();
    assert!(matches!(e, ImportError::CorruptBlob { .. }), "{e:?}");
}

#[test]
fn gc_keeps_imported_trees() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("layout");
    let big = "x".repeat(100_000);
    simple_layout(&dir, &[layer(&[E::File("data/big", &big, 0o644)], Comp::Zstd)]);
    let imported = import_dir(&store, &dir);
    let before = merged(&store, &imported.layers);
    let report = store.gc(false).unwrap();
    assert_eq!(merged(&store, &imported.layers), before, "{report:?}");
    assert!(store.referenced_trees().unwrap().contains(&imported.layers[0]));
    assert!(store.verify().unwrap().problems.is_empty());
    assert!(import_dir(&store, &dir).cached);
    // Without the record, the same gc sweeps them: the record is what kept them.
    assert!(store.remove_import(&imported.manifest).unwrap());
    store.gc(false).unwrap();
    assert!(!store.contains(pkg::store::ObjectKind::Tree, &imported.layers[0]));
}

#[test]
fn files_dedup_with_the_rest_of_the_store() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let content = "same bytes in a layer and on disk\n".repeat(1000);
    let dir = ctx.root().join("layout");
    simple_layout(&dir, &[layer(&[E::File("f", &content, 0o644)], Comp::Gzip)]);
    let imported = import_dir(&store, &dir);
    let on_disk = ctx.write("disk/f", &content);
    let file = store.ingest_file(&on_disk).unwrap();
    let tree = store.read_tree(&imported.layers[0]).unwrap();
    let Some(Node::File(from_layer)) = tree.entries.values().next() else { panic!("{tree:?}") };
    assert_eq!(from_layer.chunks(), file.chunks());
}

fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        if let Some(target) = content.strip_prefix("->") {
            std::os::unix::fs::symlink(target, &full).unwrap();
        } else {
            std::fs::write(&full, content).unwrap();
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// umoci writes real whiteouts: each repack's layer is the diff of the bundle's
/// rootfs, and the import must give back exactly that rootfs.
#[test]
fn umoci_layers_with_whiteouts_import_to_the_unpacked_rootfs() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let layout = ctx.root().join("layout");
    let bundle = ctx.root().join("bundle");
    let image = format!("{}:t", layout.display());
    let (l, b) = (layout.to_str().unwrap(), bundle.to_str().unwrap());
    tool("umoci", &["init", "--layout", l]);
    tool("umoci", &["new", "--image", &image]);
    let rootfs = bundle.join("rootfs");
    let mut expected = vec![];
    let rounds: [&dyn Fn(&Path); 3] = [
        &|r: &Path| {
            write_files(
                r,
                &[
                    ("etc/a", "a"),
                    ("etc/b", "b"),
                    ("opt/app/lib/x", "x"),
                    ("opt/app/lib/y", "y"),
                    ("usr/bin/tool", "tool"),
                    ("bin", "->usr/bin"),
                    ("var/cache/c", "c"),
                ],
            )
        },
        &|r: &Path| {
            std::fs::remove_file(r.join("etc/a")).unwrap();
            std::fs::remove_dir_all(r.join("opt/app/lib")).unwrap();
            std::fs::remove_file(r.join("bin")).unwrap();
            std::fs::remove_dir_all(r.join("var/cache")).unwrap();
            write_files(
                r,
                &[("opt/app/lib/z", "z"), ("bin/real", "now a dir"), ("var/cache", "file")],
            );
        },
        &|r: &Path| {
            std::fs::remove_dir_all(r.join("opt")).unwrap();
            write_files(r, &[("etc/b", "b2"), ("opt", "->/usr")]);
        },
    ];
    for (i, round) in rounds.iter().enumerate() {
        tool("umoci", &["unpack", "--rootless", "--image", &image, b]);
        round(&rootfs);
        tool("umoci", &["repack", "--image", &image, b]);
        let tree = store.ingest_dir(&rootfs, &|_: &Path, _: &std::fs::Metadata| false).unwrap();
        expected.push(merged(&store, &[tree]));
        std::fs::remove_dir_all(&bundle).unwrap();
        let imported = try_import(&store, &OciSource::Layout(layout.clone()), Some("t"), amd64());
        let imported = imported.unwrap();
        assert_eq!(imported.layers.len(), i + 1);
        assert_eq!(merged(&store, &imported.layers), expected[i], "after round {i}");
    }
}

/// Images pkg writes import back to the trees they were assembled from.
#[test]
fn images_written_by_pkg_round_trip_to_their_layer_trees() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let mut packages = vec![];
    for (name, files) in [
        ("base", &[("etc/os-release", "NAME=demo\n"), ("lib", "->usr/lib")][..]),
        ("app", &[("usr/bin/app", "#!/bin/sh\n"), ("usr/lib/libapp.so", "so")][..]),
    ] {
        let dir = ctx.root().join("src").join(name);
        write_files(&dir, files);
        let tree = store.ingest_dir(&dir, &|_: &Path, _: &std::fs::Metadata| false).unwrap();
        packages.push(PackageTree { name: name.to_string(), tree });
    }
    let spec = ImageSpec {
        name: "demo".to_string(),
        config: ImageConfig::default(),
        platforms: [amd64(), arm64()]
            .iter()
            .map(|p| PlatformContents { platform: *p, packages: packages.clone() })
            .collect(),
        created: 1_700_000_000,
    };
    let (images, _) = image::assemble(&store, &[spec], &AssembleOptions::default()).unwrap();
    let assembled = &images[0];
    let layout = ctx.root().join("layout");
    image::write_oci_layout(&store, &layout, &images).unwrap();
    let archive = ctx.root().join("demo.tar");
    image::write_oci_archive(&store, &archive, &images).unwrap();

    let fresh = Store::open(&ctx.root().join("fresh")).unwrap();
    for (i, platform) in [amd64(), arm64()].into_iter().enumerate() {
        let want: Vec<Digest> = assembled.platforms[i].layers.iter().map(|l| l.tree).collect();
        let got =
            try_import(&fresh, &OciSource::Layout(layout.clone()), Some("demo"), platform).unwrap();
        assert_eq!(got.layers, want, "{platform}");
        assert_eq!(got.manifest, assembled.platforms[i].manifest.digest);
        assert_eq!(got.config, assembled.platforms[i].config);
        let got = try_import(&store, &OciSource::Archive(archive.clone()), None, platform).unwrap();
        assert_eq!(got.layers, want, "{platform} from the archive");
    }
}

/// `pkg build RECIPE -o oci:DIR` imports back to the layer trees recorded for the image.
#[test]
fn a_layout_from_pkg_build_round_trips() {
    let ctx = TestContext::new();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/ca-certs");
    let layout = ctx.root().join("out");
    let target = format!("oci:{}", layout.display());
    let out = ctx.run(&["build", recipe.to_str().unwrap(), "-o", &target]);
    assert!(out.status.success(), "pkg build failed:\n{}\n{}", stdout(&out), stderr(&out));
    let store = Store::open(&ctx.store()).unwrap();
    let name = pkg::store::RefName::new("ca-certs").unwrap();
    let built = image::load(&store, &name).unwrap().expect("pkg build records the image");
    let want: Vec<Digest> = built.platforms[0].layers.iter().map(|l| l.tree).collect();
    let imported =
        try_import(&store, &OciSource::Layout(layout), Some("ca-certs"), amd64()).unwrap();
    assert_eq!(imported.layers, want);
    assert!(merged(&store, &imported.layers).contains_key("etc/ssl/certs/ca-certificates.crt"));
}
