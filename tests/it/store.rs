//! `pkg store`: ingest/checkout round trips, dedup, corruption, gc and crash safety.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pkg::digest::Digest;
use pkg::store::{ObjectKind, RefName, Store};
use proptest::prelude::*;

use crate::common::{TestContext, stderr, stdout};

/// `len` pseudo-random bytes from `seed` (incompressible).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

/// `len` bytes of compressible, text-like content from `seed`.
fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 8] =
        ["store ", "tree ", "blob\n", "chunk ", "zstd ", "λ ", "build ", "key "];
    let noise = random_bytes(seed, len / 4 + 1);
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[(noise[i % noise.len()] % 8) as usize].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a directory holds, as comparable values: path → (kind, mode, content digest or target).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    File { mode: u32, content: Digest },
    Symlink(PathBuf),
    Dir { mode: u32 },
}

fn listing(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_symlink() {
                out.insert(rel, Seen::Symlink(std::fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                out.insert(rel, Seen::Dir { mode });
                walk(root, &path, out);
            } else {
                out.insert(
                    rel,
                    Seen::File { mode, content: Digest::of(&std::fs::read(&path).unwrap()) },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The listing a read-only checkout of `listing` must have: same, minus write bits.
fn without_write_bits(listing: &BTreeMap<PathBuf, Seen>) -> BTreeMap<PathBuf, Seen> {
    listing
        .iter()
        .map(|(p, s)| {
            let s = match s {
                Seen::File { mode, content } => {
                    Seen::File { mode: mode & !0o222, content: *content }
                }
                Seen::Dir { mode } => Seen::Dir { mode: mode & !0o222 },
                other => other.clone(),
            };
            (p.clone(), s)
        })
        .collect()
}

/// Number of object files (blobs and trees) on disk.
fn object_files(store: &Path) -> usize {
    ["blobs", "trees"]
        .iter()
        .flat_map(|top| std::fs::read_dir(store.join(top)).unwrap())
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .count()
}

/// Every object file on disk with its kind and digest.
fn objects(store: &Path) -> Vec<(ObjectKind, Digest, PathBuf)> {
    let mut out = Vec::new();
    for (top, kind) in [("blobs", ObjectKind::Blob), ("trees", ObjectKind::Tree)] {
        for shard in std::fs::read_dir(store.join(top)).unwrap() {
            for entry in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                let path = entry.unwrap().path();
                let digest = Digest::from_hex(path.file_name().unwrap().to_str().unwrap()).unwrap();
                out.push((kind, digest, path));
            }
        }
    }
    out.sort_by_key(|(_, d, _)| *d);
    out
}

fn digest_of(out: &std::process::Output) -> Digest {
    assert!(out.status.success(), "pkg failed: {}", stderr(out));
    stdout(out).trim().parse().expect("pkg store add prints a digest")
}

// ---------------------------------------------------------------------------
// Round trips

#[derive(Debug, Clone)]
enum GenNode {
    File { content: GenContent, mode: u32 },
    Symlink(String),
    Dir { mode: u32, entries: BTreeMap<String, GenNode> },
}

#[derive(Debug, Clone)]
enum GenContent {
    Empty,
    Text(u64, usize),
    Random(u64, usize),
    /// Above the whole-file limit, so split into several chunks.
    MultiChunk(u64, usize),
}

fn gen_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_. é日ü-]{1,10}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn gen_content() -> impl Strategy<Value = GenContent> {
    prop_oneof![
        2 => Just(GenContent::Empty),
        4 => (any::<u64>(), 1..5000usize).prop_map(|(s, n)| GenContent::Text(s, n)),
        3 => (any::<u64>(), 1..70_000usize).prop_map(|(s, n)| GenContent::Random(s, n)),
        1 => (any::<u64>(), 1_100_000..2_600_000usize).prop_map(|(s, n)| GenContent::MultiChunk(s, n)),
    ]
}

fn gen_tree() -> impl Strategy<Value = BTreeMap<String, GenNode>> {
    let leaf = prop_oneof![
        4 => (gen_content(), prop::sample::select(vec![0o644, 0o755, 0o600, 0o700, 0o444, 0o555, 0o640, 0o1755]))
            .prop_map(|(content, mode)| GenNode::File { content, mode }),
        1 => prop_oneof![gen_name(), Just("../up/..".to_string()), Just("/abs/ü".to_string())]
            .prop_map(GenNode::Symlink),
    ];
    let node = leaf.prop_recursive(3, 24, 6, |inner| {
        (
            prop::sample::select(vec![0o755, 0o700, 0o750, 0o555, 0o1777]),
            prop::collection::btree_map(gen_name(), inner, 0..6),
        )
            .prop_map(|(mode, entries)| GenNode::Dir { mode, entries })
    });
    prop::collection::btree_map(gen_name(), node, 0..8)
}

fn materialise(dir: &Path, entries: &BTreeMap<String, GenNode>) {
    for (name, node) in entries {
        let path = dir.join(name);
        match node {
            GenNode::File { content, mode } => {
                let bytes = match *content {
                    GenContent::Empty => vec![],
                    GenContent::Text(s, n) => text_bytes(s, n),
                    GenContent::Random(s, n) | GenContent::MultiChunk(s, n) => random_bytes(s, n),
                };
                std::fs::write(&path, bytes).unwrap();
                set_mode(&path, *mode);
            }
            GenNode::Symlink(target) => std::os::unix::fs::symlink(target, &path).unwrap(),
            GenNode::Dir { mode, entries } => {
                std::fs::create_dir(&path).unwrap();
                materialise(&path, entries);
                set_mode(&path, *mode);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    /// ingest → checkout gives back exactly what went in (minus write bits:
    /// checkouts are read-only), and a second ingest adds nothing.
    #[test]
    fn ingest_then_checkout_round_trips(entries in gen_tree(), seed in any::<u64>()) {
        let ctx = TestContext::new();
        let src = ctx.root().join("src");
        std::fs::create_dir(&src).unwrap();
        materialise(&src, &entries);
        // Every case also holds an empty and a multi-chunk file ('~' is outside
        // the generated names' alphabet, so these never collide).
        std::fs::write(src.join("~empty"), b"").unwrap();
        std::fs::write(src.join("~multi"), random_bytes(seed, 1_300_000 + (seed % 500_000) as usize)).unwrap();
        let store = Store::open(&ctx.store()).unwrap();
        let digest = store.ingest_dir(&src, &|_: &Path, _: &std::fs::Metadata| false).unwrap();
        let objects_after_first = object_files(&ctx.store());
        prop_assert_eq!(store.ingest_dir(&src, &|_: &Path, _: &std::fs::Metadata| false).unwrap(), digest);
        prop_assert_eq!(object_files(&ctx.store()), objects_after_first);

        let out = ctx.root().join("out");
        store.checkout(&digest, &out).unwrap();
        let expected = without_write_bits(&listing(&src));
        prop_assert_eq!(listing(&out), expected);
        prop_assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o555);
        // Checking out the same tree again shares inodes with the first checkout.
        let again = ctx.root().join("again");
        store.checkout(&digest, &again).unwrap();
        prop_assert_eq!(listing(&again), listing(&out));
        pkg::store::remove_checkout(&out).unwrap();
        pkg::store::remove_checkout(&again).unwrap();
    }
}

#[test]
fn store_add_and_checkout_round_trip_a_directory_and_a_single_file() {
    let ctx = TestContext::new();
    ctx.write("src/hello.txt", "hello\n");
    ctx.write("src/bin/tool", "#!/bin/sh\necho hi\n");
    set_mode(&ctx.root().join("src/bin/tool"), 0o755);
    std::os::unix::fs::symlink("bin/tool", ctx.root().join("src/link")).unwrap();

    let dir = digest_of(&ctx.run(&["store", "add", "src"]));
    let out = ctx.run(&["store", "checkout", &dir.to_string(), "out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        listing(&ctx.root().join("out")),
        without_write_bits(&listing(&ctx.root().join("src")))
    );

    // A single file is a one-entry tree named after it.
    let file = digest_of(&ctx.run(&["store", "add", "src/bin/tool"]));
    let out = ctx.run(&["store", "checkout", &file.to_string(), "one"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = listing(&ctx.root().join("one"));
    assert_eq!(got.keys().collect::<Vec<_>>(), [Path::new("tool")]);
    assert_eq!(std::fs::read(ctx.root().join("one/tool")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(
        std::fs::metadata(ctx.root().join("one/tool")).unwrap().permissions().mode() & 0o7777,
        0o555
    );

    // Identical files in two checkouts share one inode.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(ctx.root().join("out/bin/tool")).unwrap();
    let b = std::fs::metadata(ctx.root().join("one/tool")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn exclusion_predicate_leaves_entries_out() {
    let ctx = TestContext::new();
    ctx.write("src/keep.rs", "fn main() {}\n");
    ctx.write("src/.git/HEAD", "ref: x\n");
    ctx.write("src/target/debug/big", "junk");
    let store = Store::open(&ctx.store()).unwrap();
    let exclude = |rel: &Path, meta: &std::fs::Metadata| {
        rel == Path::new(".git") || (meta.is_dir() && rel == Path::new("target"))
    };
    let digest = store.ingest_dir(&ctx.root().join("src"), &exclude).unwrap();
    let paths: Vec<PathBuf> = store.walk(&digest).map(|e| e.unwrap().path).collect();
    assert_eq!(paths, [PathBuf::from("keep.rs")]);
}

#[test]
fn walk_and_open_file_read_contents_without_a_checkout() {
    let ctx = TestContext::new();
    let big = random_bytes(7, 3_000_000);
    std::fs::create_dir_all(ctx.root().join("src/d")).unwrap();
    std::fs::write(ctx.root().join("src/d/big"), &big).unwrap();
    ctx.write("src/a", "a");
    let store = Store::open(&ctx.store()).unwrap();
    let digest = store
        .ingest_dir(&ctx.root().join("src"), &|_: &Path, _: &std::fs::Metadata| false)
        .unwrap();
    let entries: Vec<_> = store.walk(&digest).map(Result::unwrap).collect();
    let paths: Vec<_> = entries.iter().map(|e| e.path.to_str().unwrap()).collect();
    assert_eq!(paths, ["a", "d", "d/big"]);
    let pkg::store::Node::File(file) = &entries[2].node else { panic!("d/big is a file") };
    assert!(file.chunks().len() > 1, "a 3 MB file is chunked");
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut store.open_file(file), &mut read).unwrap();
    assert!(read == big, "streamed content differs");
}

#[test]
fn open_file_reads_a_checked_out_copy_verified_and_falls_back_to_blobs() {
    let ctx = TestContext::new();
    let big = random_bytes(8, 3_000_000);
    std::fs::create_dir_all(ctx.root().join("src")).unwrap();
    std::fs::write(ctx.root().join("src/big"), &big).unwrap();
    let store = Store::open(&ctx.store()).unwrap();
    let digest = store
        .ingest_dir(&ctx.root().join("src"), &|_: &Path, _: &std::fs::Metadata| false)
        .unwrap();
    let entry = store.walk(&digest).next().unwrap().unwrap();
    let pkg::store::Node::File(file) = entry.node else { panic!("big is a file") };
    assert!(file.chunks().len() > 1, "a 3 MB file is chunked");
    let blobs: Vec<(PathBuf, Vec<u8>)> = file
        .chunks()
        .iter()
        .map(|c| {
            let hex = c.digest.to_hex();
            let path = ctx.store().join("blobs").join(&hex[..2]).join(&hex);
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    let remove_blobs =
        |n: usize| blobs.iter().take(n).for_each(|(p, _)| std::fs::remove_file(p).unwrap());
    let restore_blobs = || {
        blobs.iter().filter(|(p, _)| !p.exists()).for_each(|(p, b)| std::fs::write(p, b).unwrap())
    };
    // A checkout leaves the cached copy.
    let checkouts = std::cell::Cell::new(0);
    let cached_copy = || {
        checkouts.set(checkouts.get() + 1);
        store.checkout(&digest, &ctx.root().join(format!("out{}", checkouts.get()))).unwrap();
        let cached = walk_files(&ctx.store().join("checkouts/files"));
        let [cached] = cached.as_slice() else { panic!("one cached file: {cached:?}") };
        set_mode(cached, 0o644);
        cached.clone()
    };
    let read = || {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut store.open_file(&file), &mut bytes).map(|_| bytes)
    };
    // A byte changed in place in the cached copy's second chunk.
    let offset = file.chunks()[0].size as usize + 10;
    let damage = |cached: &Path| {
        let mut bytes = std::fs::read(cached).unwrap();
        bytes[offset] ^= 1;
        std::fs::write(cached, bytes).unwrap();
    };

    // The cached copy alone gives the content.
    let cached = cached_copy();
    remove_blobs(blobs.len());
    assert!(read().unwrap() == big, "content read from the cached copy differs");
    restore_blobs();
    // Damaged: its first chunk still comes from it (that blob is gone), the
    // rest from the blobs, and it loses its name.
    damage(&cached);
    remove_blobs(1);
    assert!(read().unwrap() == big, "content read past a damaged cached copy differs");
    assert!(!cached.exists(), "a damaged cached copy keeps its name");
    restore_blobs();
    // Cut short: the blobs give it all.
    let cached = cached_copy();
    std::fs::File::options().write(true).open(&cached).unwrap().set_len(10).unwrap();
    assert!(read().unwrap() == big, "content read past a short cached copy differs");
    assert!(!cached.exists(), "a short cached copy keeps its name");
    // Damaged, without the blobs: an error, never its bytes.
    let cached = cached_copy();
    damage(&cached);
    remove_blobs(blobs.len());
    let err = read().expect_err("a damaged cached copy and no blobs read as content");
    assert!(err.to_string().contains("is not in the store"), "{err}");
    // A fifo at the name is passed over, not waited on.
    restore_blobs();
    assert!(!cached.exists(), "a damaged cached copy keeps its name");
    nix::unistd::mkfifo(&cached, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    assert!(read().unwrap() == big, "content read past a fifo differs");
}

#[test]
fn store_stats_counts_objects_bytes_and_cached_copies() {
    let ctx = TestContext::new();
    ctx.write("src/a.txt", &"alpha\n".repeat(100));
    ctx.write("src/b.txt", &"alpha\n".repeat(100));
    ctx.write("src/c.txt", "gamma\n");
    let dir = digest_of(&ctx.run(&["store", "add", "src"]));
    let out = ctx.run(&["store", "checkout", &dir.to_string(), "out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ctx.run(&["store", "stats"]);
    assert!(out.status.success(), "{}", stderr(&out));
    crate::assert_snapshot!("store_stats", stdout(&out));
    let out = ctx.run(&["store", "stats", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (json["cached_files"].as_u64(), json["cached_bytes"].as_u64()),
        (Some(2), Some(606))
    );
}

#[test]
fn refs_record_builds_images_and_roots() {
    let ctx = TestContext::new();
    ctx.write("src/a", "a");
    let store = Store::open(&ctx.store()).unwrap();
    let tree = store.ingest_path(&ctx.root().join("src")).unwrap();
    let key = Digest::of(b"build key");
    assert_eq!(store.build(&key).unwrap(), None);
    store.set_build(&key, &tree).unwrap();
    assert_eq!(store.build(&key).unwrap(), Some(tree));
    let name = RefName::new("ghcr.io/me/hello:1.0").unwrap();
    let record = pkg::store::ImageRecord {
        trees: [tree].into_iter().collect(),
        metadata: serde_json::json!({"manifest": "sha256:00"}),
    };
    store.set_image(&name, &record).unwrap();
    assert_eq!(store.image(&name).unwrap(), Some(record));
    assert_eq!(store.images().unwrap(), std::slice::from_ref(&name));
    let root = RefName::new("dev").unwrap();
    store.add_root(&root, &tree).unwrap();
    assert_eq!(store.roots().unwrap(), [(root.clone(), tree)]);
    assert!(store.remove_root(&root).unwrap());
    assert!(!store.remove_root(&root).unwrap());
    // A ref to a tree that is not stored is refused.
    let err = store.set_build(&key, &Digest::of(b"nothing")).unwrap_err();
    assert!(err.to_string().contains("is not in the store"), "{err}");
}

// ---------------------------------------------------------------------------
// Refusals and error messages

#[test]
fn special_files_and_setuid_are_refused_naming_the_path() {
    let ctx = TestContext::new();
    ctx.write("fifo/ok", "ok");
    let status = Command::new("mkfifo").arg(ctx.root().join("fifo/pipe")).status().unwrap();
    assert!(status.success());
    let out = ctx.run(&["store", "add", "fifo"]);
    assert!(!out.status.success());
    crate::assert_snapshot!("store_add_fifo", ctx.redact(&stderr(&out)));

    ctx.write("suid/tool", "x");
    set_mode(&ctx.root().join("suid/tool"), 0o4755);
    let out = ctx.run(&["store", "add", "suid"]);
    assert!(!out.status.success());
    crate::assert_snapshot!("store_add_setuid", ctx.redact(&stderr(&out)));
}

#[test]
fn hard_links_become_regular_files() {
    let ctx = TestContext::new();
    ctx.write("src/a", "same bytes");
    std::fs::hard_link(ctx.root().join("src/a"), ctx.root().join("src/b")).unwrap();
    let digest = digest_of(&ctx.run(&["store", "add", "src"]));
    let out = ctx.run(&["store", "checkout", &digest.to_string(), "out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(ctx.root().join("out/b")).unwrap(), b"same bytes");
    assert_eq!(object_files(&ctx.store()), 2, "one blob and one tree");
}

#[test]
fn checkout_errors_are_clear() {
    let ctx = TestContext::new();
    ctx.write("src/a", "a");
    ctx.write("busy/x", "x");
    let digest = digest_of(&ctx.run(&["store", "add", "src"]));
    let out = ctx.run(&["store", "checkout", &digest.to_string(), "busy"]);
    assert!(!out.status.success());
    crate::assert_snapshot!("store_checkout_nonempty", ctx.redact(&stderr(&out)));
    let missing = Digest::of(b"not stored").to_string();
    let out = ctx.run(&["store", "checkout", &missing, "new"]);
    assert!(!out.status.success());
    crate::assert_snapshot!("store_checkout_missing", ctx.redact(&stderr(&out)));
    assert!(!ctx.root().join("new").exists(), "a failed checkout leaves nothing behind");
    let out = ctx.run(&["store", "checkout", "b3:nothex", "new"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("64 lowercase hex digits"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------
// Dedup

#[test]
fn identical_files_are_stored_once() {
    let ctx = TestContext::new();
    let content = text_bytes(1, 200_000);
    std::fs::create_dir_all(ctx.root().join("src/sub")).unwrap();
    std::fs::write(ctx.root().join("src/one"), &content).unwrap();
    std::fs::write(ctx.root().join("src/sub/two"), &content).unwrap();
    let store = Store::open(&ctx.store()).unwrap();
    store.ingest_path(&ctx.root().join("src")).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.blobs, stats.trees), (1, 2));
    assert_eq!(stats.logical_bytes, 400_000);
    assert_eq!(stats.unique_bytes, 200_000);
    assert!(stats.dedup_ratio == 2.0);
    assert!(stats.compression_ratio > 2.0, "text compresses: {stats:?}");
}

#[test]
fn an_edited_64_mib_file_adds_less_than_4_mib() {
    const MIB: usize = 1024 * 1024;
    let ctx = TestContext::new();
    let original = random_bytes(64, 64 * MIB);
    let mut edited = original.clone();
    edited[32 * MIB..33 * MIB].copy_from_slice(&random_bytes(65, MIB));
    let inserted = random_bytes(66, 100 * 1024);
    edited.splice(MIB..MIB, inserted);
    std::fs::write(ctx.root().join("v1"), &original).unwrap();
    std::fs::write(ctx.root().join("v2"), &edited).unwrap();
    drop((original, edited));

    let store = Store::open(&ctx.store()).unwrap();
    store.ingest_path(&ctx.root().join("v1")).unwrap();
    let before = store.stats().unwrap().stored_bytes;
    assert!(before >= 64 * MIB as u64, "random data is stored whole: {before}");
    store.ingest_path(&ctx.root().join("v2")).unwrap();
    let added = store.stats().unwrap().stored_bytes - before;
    assert!(added < 4 * MIB as u64, "the edited copy added {added} bytes");
}

// ---------------------------------------------------------------------------
// Corruption

#[test]
fn a_flipped_byte_in_any_object_is_named_by_verify_and_fails_checkout() {
    let ctx = TestContext::new();
    ctx.write("src/readme", &"compressible text ".repeat(500));
    std::fs::create_dir_all(ctx.root().join("src/bin")).unwrap();
    std::fs::write(ctx.root().join("src/bin/random"), random_bytes(3, 20_000)).unwrap();
    ctx.write("src/bin/small", "x");
    let tree = digest_of(&ctx.run(&["store", "add", "src"]));
    let ok = ctx.run(&["store", "verify"]);
    assert!(ok.status.success(), "{}", stdout(&ok));

    let objects = objects(&ctx.store());
    assert_eq!(objects.len(), 5);
    let mut snapshotted = false;
    for (i, (kind, digest, path)) in objects.iter().enumerate() {
        let original = std::fs::read(path).unwrap();
        let mut bad = original.clone();
        let at = (i * 7919 + 13) % bad.len();
        bad[at] ^= 0x20;
        set_mode(path, 0o644);
        std::fs::write(path, &bad).unwrap();

        let verify = ctx.run(&["store", "verify"]);
        assert!(!verify.status.success(), "verify passed with {kind} {digest} corrupt");
        assert!(
            stdout(&verify).contains(&format!("{kind} {digest}:")),
            "verify output: {}",
            stdout(&verify)
        );

        // No cached copy may stand in for the object.
        for shard in std::fs::read_dir(ctx.store().join("checkouts/files")).unwrap() {
            for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        let dest = format!("out{i}");
        let out = ctx.run(&["store", "checkout", &tree.to_string(), &dest]);
        assert!(!out.status.success(), "checkout succeeded with {kind} {digest} corrupt");
        assert!(stderr(&out).contains(&digest.to_string()), "checkout error: {}", stderr(&out));
        assert!(!ctx.root().join(&dest).exists());
        if *kind == ObjectKind::Blob && !snapshotted {
            snapshotted = true;
            crate::assert_snapshot!(
                "store_verify_corrupt",
                ctx.redact(&(stdout(&verify) + &stderr(&verify)))
            );
            crate::assert_snapshot!("store_checkout_corrupt", ctx.redact(&stderr(&out)));
        }
        std::fs::write(path, &original).unwrap();
    }
    let ok = ctx.run(&["store", "verify"]);
    assert!(ok.status.success(), "{}", stdout(&ok));
}

// ---------------------------------------------------------------------------
// Garbage collection

#[test]
fn gc_frees_an_unrooted_trees_own_objects_and_keeps_shared_ones() {
    let ctx = TestContext::new();
    ctx.write("a/shared", "shared content");
    ctx.write("a/own", "only in a");
    ctx.write("b/shared", "shared content");
    ctx.write("b/other", "only in b");
    let a = digest_of(&ctx.run(&["store", "add", "a", "--root", "a"]));
    let b = digest_of(&ctx.run(&["store", "add", "b", "--root", "b"]));
    let store = Store::open(&ctx.store()).unwrap();
    let out = ctx.run(&["store", "gc"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out),
        "removed 0 trees, 0 blobs, 0 cached files, 0 checkouts, 0 temp files; freed 0 B\n"
    );

    assert!(store.remove_root(&RefName::new("a").unwrap()).unwrap());
    let dry = ctx.run(&["store", "gc", "--dry-run"]);
    assert!(dry.status.success());
    assert!(stdout(&dry).starts_with("would remove 1 trees, 1 blobs"), "{}", stdout(&dry));
    assert!(store.contains(ObjectKind::Tree, &a));
    let out = ctx.run(&["store", "gc"]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("removed 1 trees, 1 blobs"), "{}", stdout(&out));
    assert!(!store.contains(ObjectKind::Tree, &a));
    assert!(!store.contains(ObjectKind::Blob, &Digest::of(b"only in a")));
    assert!(store.contains(ObjectKind::Blob, &Digest::of(b"shared content")));
    assert!(store.contains(ObjectKind::Tree, &b));
    let out = ctx.run(&["store", "checkout", &b.to_string(), "out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(ctx.run(&["store", "verify"]).status.success());
}

#[test]
fn gc_keeps_build_and_image_refs_and_cached_files_in_use() {
    let ctx = TestContext::new();
    ctx.write("a/f", "build output");
    ctx.write("b/g", "image content");
    let store = Store::open(&ctx.store()).unwrap();
    let a = store.ingest_path(&ctx.root().join("a")).unwrap();
    let b = store.ingest_path(&ctx.root().join("b")).unwrap();
    store.set_build(&Digest::of(b"key"), &a).unwrap();
    let record = pkg::store::ImageRecord {
        trees: [b].into_iter().collect(),
        metadata: serde_json::Value::Null,
    };
    store.set_image(&RefName::new("img").unwrap(), &record).unwrap();
    store.checkout(&a, &ctx.root().join("co")).unwrap();
    let report = store.gc(false).unwrap();
    assert_eq!((report.trees.len(), report.blobs.len(), report.cached_files), (0, 0, 0));
    pkg::store::remove_checkout(&ctx.root().join("co")).unwrap();
    let report = store.gc(false).unwrap();
    assert_eq!(report.cached_files, 1, "the cached file no checkout links to is freed");
    assert!(store.verify().unwrap().problems.is_empty());
}

/// One process ingests content whose objects are garbage (their tree was never
/// rooted) while another runs `pkg store gc` again and again. The ingest must
/// end with a complete tree: gc may not sweep objects the ingest found present.
#[test]
fn gc_running_beside_an_ingest_never_deletes_what_it_references() {
    let ctx = TestContext::new();
    let src = ctx.root().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..24u64 {
        std::fs::write(src.join(format!("f{i}")), random_bytes(i, 150_000 + i as usize * 1000))
            .unwrap();
    }
    std::fs::write(src.join("big"), random_bytes(99, 3_000_000)).unwrap();
    for round in 0..3 {
        // Unrooted: every object of this tree is garbage to gc.
        digest_of(&ctx.run(&["store", "add", "src"]));
        let newer = src.join(format!("new{round}"));
        std::fs::write(&newer, format!("round {round}")).unwrap();
        let mut ingest = ctx
            .pkg()
            .args(["store", "add", "src", "--root", "keep"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut gcs = 0;
        let started = Instant::now();
        while ingest.try_wait().unwrap().is_none() || gcs == 0 {
            if started.elapsed() > Duration::from_secs(120) {
                let _ = ingest.kill();
                panic!("round {round}: the ingest did not end beside {gcs} gcs in 120 s");
            }
            let gc = ctx.run(&["store", "gc"]);
            assert!(gc.status.success(), "{}", stderr(&gc));
            gcs += 1;
        }
        let out = ingest.wait_with_output().unwrap();
        let tree = digest_of(&out);
        let verify = ctx.run(&["store", "verify"]);
        assert!(verify.status.success(), "round {round}: {}", stdout(&verify));
        let dest = format!("out{round}");
        let co = ctx.run(&["store", "checkout", &tree.to_string(), &dest]);
        assert!(co.status.success(), "round {round}: {}", stderr(&co));
        assert_eq!(listing(&ctx.root().join(&dest)), without_write_bits(&listing(&src)));
        pkg::store::remove_checkout(&ctx.root().join(&dest)).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Crash safety

#[test]
fn sigkill_during_store_add_leaves_a_valid_store() {
    let ctx = TestContext::new();
    let src = ctx.root().join("src");
    std::fs::create_dir_all(src.join("deep/er")).unwrap();
    for i in 0..30u64 {
        let dir = if i % 3 == 0 { src.join("deep/er") } else { src.clone() };
        let bytes = if i % 2 == 0 { random_bytes(i, 40_000) } else { text_bytes(i, 60_000) };
        std::fs::write(dir.join(format!("f{i}")), bytes).unwrap();
    }
    // How long an add takes here, only to spread the kill moments across it.
    let scratch = TestContext::new();
    let started = Instant::now();
    let out = scratch
        .pkg()
        .env("PKG_STORE", scratch.store())
        .args(["store", "add"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let span = started.elapsed().as_micros().max(1000) as u64;

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for trial in 0..50u64 {
        // Fresh content each trial, so every add has new objects to write.
        std::fs::write(src.join("changing"), random_bytes(1000 + trial, 1_200_000)).unwrap();
        std::fs::write(src.join("deep/changing"), text_bytes(2000 + trial, 30_000)).unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_micros(rng % (span + span / 4));
        let mut child =
            ctx.pkg().args(["store", "add", "src"]).stdout(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let verify = ctx.run(&["store", "verify"]);
        assert!(
            verify.status.success(),
            "trial {trial} (killed after {delay:?}): {}",
            stdout(&verify)
        );
        // Every third trial, sweep the debris (nothing is rooted), which keeps each
        // verify short and checks that gc copes with what a kill leaves behind.
        if trial % 3 == 2 {
            let gc = ctx.run(&["store", "gc"]);
            assert!(gc.status.success(), "trial {trial}: {}", stderr(&gc));
        }
    }
    let tree = digest_of(&ctx.run(&["store", "add", "src"]));
    let co = ctx.run(&["store", "checkout", &tree.to_string(), "out"]);
    assert!(co.status.success(), "{}", stderr(&co));
    assert_eq!(listing(&ctx.root().join("out")), without_write_bits(&listing(&src)));
}

/// Ingest writes objects without an fsync each and syncs them in one batch,
/// under a marker in `unsynced/`. A marker left by a machine that went down
/// (another boot id) makes the next open verify what was written since it:
/// a torn blob goes, and so does every tree that names it; intact objects stay.
#[test]
fn a_power_loss_marker_gets_torn_objects_removed_on_open() {
    let ctx = TestContext::new();
    std::fs::create_dir_all(ctx.root().join("src/sub")).unwrap();
    std::fs::write(ctx.root().join("src/sub/torn"), random_bytes(7, 300_000)).unwrap();
    ctx.write("src/intact", "intact");
    let tree = digest_of(&ctx.run(&["store", "add", "src"]));
    let unsynced = ctx.store().join("unsynced");
    assert_eq!(
        std::fs::read_dir(&unsynced).unwrap().count(),
        0,
        "finished ingests leave no marker"
    );

    let store = Store::open(&ctx.store()).unwrap();
    let file = |path: &str| match store
        .walk(&tree)
        .find(|e| e.as_ref().unwrap().path == Path::new(path))
    {
        Some(Ok(pkg::store::WalkEntry { node: pkg::store::Node::File(f), .. })) => f,
        other => panic!("{path}: {other:?}"),
    };
    let torn = file("sub/torn").chunks()[0].digest;
    let intact = file("intact").chunks()[0].digest;
    let sub = store.read_tree(&tree).unwrap().iter().find_map(|(_, n)| match n {
        pkg::store::Node::Dir(d) => Some(d.digest),
        _ => None,
    });
    let sub = sub.unwrap();

    // A marker from another boot, and a blob the lost page cache left empty.
    std::fs::write(unsynced.join("ingest-lost"), "another boot\n").unwrap();
    let torn_path = objects(&ctx.store()).into_iter().find(|(_, d, _)| *d == torn).unwrap().2;
    set_mode(&torn_path, 0o644);
    std::fs::write(&torn_path, b"").unwrap();

    let verify = ctx.run(&["store", "verify"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert_eq!(std::fs::read_dir(&unsynced).unwrap().count(), 0, "the marker is recovered");
    assert!(!store.contains(ObjectKind::Blob, &torn));
    assert!(!store.contains(ObjectKind::Tree, &sub), "the tree naming the torn blob goes");
    assert!(!store.contains(ObjectKind::Tree, &tree), "and so does its parent");
    assert!(store.contains(ObjectKind::Blob, &intact));

    // A marker from this boot is a killed writer: its objects are intact in
    // the page cache, so the open only syncs and removes the marker.
    let again = digest_of(&ctx.run(&["store", "add", "src"]));
    assert_eq!(again, tree);
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::write(unsynced.join("ingest-killed"), boot).unwrap();
    let before = objects(&ctx.store()).len();
    let verify = ctx.run(&["store", "verify"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert_eq!(std::fs::read_dir(&unsynced).unwrap().count(), 0);
    assert_eq!(objects(&ctx.store()).len(), before);
    let co = ctx.run(&["store", "checkout", &tree.to_string(), "out"]);
    assert!(co.status.success(), "{}", stderr(&co));
    assert_eq!(
        listing(&ctx.root().join("out")),
        without_write_bits(&listing(&ctx.root().join("src")))
    );
}

crate::rootless_test! {
    /// The store needs no privilege: add, checkout, gc and removal as a plain user.
    fn store_works_unprivileged() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/f"), "content").unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let tree = store.ingest_path(&src).unwrap();
        let out = dir.path().join("out");
        store.checkout(&tree, &out).unwrap();
        assert_eq!(std::fs::read(out.join("d/f")).unwrap(), b"content");
        // Read-only for its owner too.
        assert!(std::fs::write(out.join("d/f"), "x").is_err());
        pkg::store::remove_checkout(&out).unwrap();
        store.gc(false).unwrap();
        assert!(store.verify().unwrap().problems.is_empty());
    }
}

#[test]
fn shared_checkouts_keep_exact_modes_and_survive_gc_while_leased() {
    let ctx = TestContext::new();
    let store = Store::open(&ctx.store()).unwrap();
    let dir = ctx.root().join("content");
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("conf"), "x\n").unwrap();
    std::fs::write(dir.join("tmp/same"), "x\n").unwrap();
    set_mode(&dir.join("conf"), 0o644);
    set_mode(&dir.join("tmp/same"), 0o644);
    set_mode(&dir.join("tmp"), 0o1777);
    let tree = store.ingest_dir(&dir, &|_: &Path, _: &std::fs::Metadata| false).unwrap();
    let lease = store.shared_checkout(&tree).unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&lease.path().join("conf")), 0o644);
    assert_eq!(mode(&lease.path().join("tmp")), 0o1777);
    assert_eq!(mode(lease.path()), 0o755);
    // Identical files share one new cached file, which got its name (the
    // same inode), and no temp file is left.
    let cached: Vec<_> = walk_files(&store.root().join("checkouts/files"));
    assert_eq!(cached.len(), 1);
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&cached[0]), ino(&lease.path().join("conf")));
    assert_eq!(ino(&cached[0]), ino(&lease.path().join("tmp/same")));
    assert_eq!(std::fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
    // No ref keeps the tree, but a run holds the checkout: gc leaves it.
    let report = store.gc(false).unwrap();
    assert_eq!(report.checkouts, 0);
    assert_eq!(std::fs::read_to_string(lease.path().join("conf")).unwrap(), "x\n");
    let path = lease.path().to_path_buf();
    drop(lease);
    let report = store.gc(false).unwrap();
    assert_eq!(report.checkouts, 1);
    assert!(!path.exists());
    assert_eq!(report.cached_files, 1, "the checkout's cached file went with it");
}

/// Every regular file below `dir`, sorted.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() { dirs.push(path) } else { files.push(path) }
        }
    }
    files.sort();
    files
}
