//! `pkg doctor`: whether this machine can build and run images rootless, and
//! what to do about each missing piece.
//!
//! Every fact about the host comes in through [`HostFacts`] (ids, the contents
//! of /etc/subuid and /etc/subgid, a tool resolver, a scratch directory), so
//! the checks are plain functions of their inputs.

use std::path::{Path, PathBuf};

use crate::sandbox::{self, IdMapping};
use crate::tool::HostTools;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Something optional is missing: some recipes or images will not work.
    Warn,
    /// pkg cannot build or run anything until this is fixed.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to run or change, when the check is not `Ok`.
    pub fix: Option<String>,
}

/// What the checks need to know about the host, gathered by the caller.
pub struct HostFacts<'a> {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    /// Contents of /etc/subuid and /etc/subgid (empty when absent).
    pub subuid: String,
    pub subgid: String,
    pub tools: &'a HostTools,
    /// A writable directory for the overlay probe.
    pub scratch: &'a Path,
    pub store: PathBuf,
}

/// Foreign architectures pkg can run through qemu-user, with their emulators.
const EMULATORS: [(&str, &str); 4] = [
    ("linux/arm64", "qemu-aarch64"),
    ("linux/arm/v7", "qemu-arm"),
    ("linux/ppc64le", "qemu-ppc64le"),
    ("linux/s390x", "qemu-s390x"),
];

/// Host programs the builders run, with the Debian package that provides each.
const BUILDER_TOOLS: [(&str, &str, &str); 5] = [
    ("sh", "script builder", "dash"),
    ("musl-gcc", "cc builder (static C)", "musl-tools"),
    ("aarch64-linux-gnu-gcc", "cc builder for linux/arm64", "gcc-aarch64-linux-gnu"),
    ("go", "go builder", "golang-go"),
    ("cargo", "cargo builder", "cargo (or rustup)"),
];

/// Runs every check.
pub fn check(host: &HostFacts<'_>) -> Vec<Check> {
    let mut checks = Vec::new();
    let mapping = IdMapping::single(0, 0, host.uid, host.gid);
    let probe = sandbox::probe(&mapping, host.scratch);
    checks.push(match probe.user_namespaces {
        Ok(()) => ok("user namespaces", "unprivileged user, mount and PID namespaces work"),
        Err(e) => Check {
            name: "user namespaces",
            status: Status::Fail,
            detail: format!("a sandbox cannot start: {e}"),
            fix: Some(
                "enable unprivileged user namespaces: `sysctl -w kernel.unprivileged_userns_clone=1` \
                 (Debian) or `sysctl -w user.max_user_namespaces=15000`; on Ubuntu 24.04 and later also \
                 `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
                    .into(),
            ),
        },
    });
    let fuse_overlayfs = host.tools.which("fuse-overlayfs");
    let fuse = fuse_overlayfs
        .as_deref()
        .map(|program| sandbox::probe_fuse_overlay(&mapping, host.scratch, program));
    let fuse_works = matches!(fuse, Some(Ok(())));
    checks.push(match probe.overlay {
        Ok(()) => ok("overlay", "overlayfs mounts inside a user namespace"),
        Err(e) if fuse_works => Check {
            name: "overlay",
            status: Status::Warn,
            detail: format!(
                "the kernel refuses overlayfs inside a user namespace ({}): `pkg run` uses \
                 fuse-overlayfs instead, which is slower",
                crate::error_chain(&e)
            ),
            fix: Some("Linux 5.11 or later mounts overlayfs rootless".into()),
        },
        Err(e) => Check {
            name: "overlay",
            status: Status::Fail,
            detail: format!(
                "overlayfs cannot be mounted inside a user namespace: {}",
                crate::error_chain(&e)
            ),
            fix: Some(
                "`pkg run` needs Linux 5.11 or later for rootless overlayfs, or fuse-overlayfs \
                 (see below)"
                    .into(),
            ),
        },
    });
    checks.push(match fuse {
        Some(Ok(())) => ok(
            "fuse-overlayfs",
            "serves overlays inside a user namespace (the fallback; `pkg run --overlay fuse`)",
        ),
        None => Check {
            name: "fuse-overlayfs",
            status: Status::Warn,
            detail: "not installed: no fallback where the kernel refuses overlayfs inside a user \
                     namespace"
                .into(),
            fix: Some("apt-get install fuse-overlayfs".into()),
        },
        Some(Err(e)) => Check {
            name: "fuse-overlayfs",
            status: Status::Warn,
            fix: Some(match &e {
                sandbox::SandboxError::FuseOverlay { source, .. } => {
                    sandbox::fuse::advice(*source).to_string()
                }
                _ => "see the user namespaces check".to_string(),
            }),
            detail: crate::error_chain(&e),
        },
    });
    checks.push(subordinate_ids(host));
    checks.push(id_helpers(host.tools));
    for (platform, emulator) in EMULATORS {
        // `pkg run` mounts the emulator into the foreign image: only a static one works there.
        let found = host.tools.which(&format!("{emulator}-static"));
        checks.push(match found {
            Some(path) => {
                ok_owned("qemu-user", format!("{platform} images run through {}", path.display()))
            }
            None => Check {
                name: "qemu-user",
                status: Status::Warn,
                detail: format!("no {emulator}-static: {platform} images cannot run here"),
                fix: Some("apt-get install qemu-user-static".into()),
            },
        });
    }
    for (tool, purpose, package) in BUILDER_TOOLS {
        checks.push(match host.tools.which(tool) {
            Some(path) => ok_owned("builder tools", format!("{purpose}: {}", path.display())),
            None => Check {
                name: "builder tools",
                status: Status::Warn,
                detail: format!("no `{tool}`: recipes using the {purpose} cannot build"),
                fix: Some(format!("apt-get install {package}")),
            },
        });
    }
    checks.push(store_writable(&host.store));
    checks.extend(store_on_network_filesystem(&host.store));
    checks
}

fn ok(name: &'static str, detail: &str) -> Check {
    ok_owned(name, detail.to_string())
}

fn ok_owned(name: &'static str, detail: String) -> Check {
    Check { name, status: Status::Ok, detail, fix: None }
}

fn subordinate_ids(host: &HostFacts<'_>) -> Check {
    let uids = sandbox::subordinate_range(&host.subuid, &host.user, host.uid);
    let gids = sandbox::subordinate_range(&host.subgid, &host.user, host.gid);
    match (uids, gids) {
        (Some((u, uc)), Some((g, gc))) => ok_owned(
            "subordinate ids",
            format!("{} has uids {u}..{} and gids {g}..{}", host.user, u + (uc - 1), g + (gc - 1)),
        ),
        _ if host.uid == 0 => ok("subordinate ids", "root maps any id"),
        _ => Check {
            name: "subordinate ids",
            status: Status::Warn,
            detail: format!(
                "no range for {} in /etc/subuid and /etc/subgid: images run with one user only",
                host.user
            ),
            fix: Some(format!(
                "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {}",
                host.user
            )),
        },
    }
}

fn id_helpers(tools: &HostTools) -> Check {
    match (tools.which("newuidmap"), tools.which("newgidmap")) {
        (Some(_), Some(_)) => ok("newuidmap", "newuidmap and newgidmap are installed"),
        _ => Check {
            name: "newuidmap",
            status: Status::Warn,
            detail: "newuidmap/newgidmap missing: subordinate id ranges cannot be used".into(),
            fix: Some("apt-get install uidmap".into()),
        },
    }
}

fn store_writable(store: &Path) -> Check {
    let probe = store.join("tmp");
    match std::fs::create_dir_all(&probe).and_then(|()| tempfile_in(&probe)) {
        Ok(()) => ok_owned("store", format!("{} is writable", store.display())),
        Err(e) => Check {
            name: "store",
            status: Status::Fail,
            detail: format!("cannot write to the store {}: {e}", store.display()),
            fix: Some("pass --store DIR (or set PKG_STORE) to a writable directory".into()),
        },
    }
}

/// A warning when the store is on a network filesystem: there a `flock` is
/// emulated by a lock of the whole process (NFS, SMB) or of this machine only
/// (9p), so the store's pins no longer keep `pkg store gc` from sweeping
/// objects that a build on another machine, or another pin of the same
/// process, is still using.
fn store_on_network_filesystem(store: &Path) -> Option<Check> {
    let kind =
        rustix::fs::statfs(store).ok().and_then(|fs| network_filesystem(fs.f_type as u32))?;
    Some(Check {
        name: "store",
        status: Status::Warn,
        detail: format!(
            "{} is on a network filesystem ({kind}), whose locks do not keep gc from racing builds",
            store.display()
        ),
        fix: Some("pass --store DIR (or set PKG_STORE) to a directory on a local disk".into()),
    })
}

/// The name of the network filesystem with the `statfs` magic `f_type` (a
/// 32-bit number, whatever the width of the field that holds it).
fn network_filesystem(f_type: u32) -> Option<&'static str> {
    match f_type {
        0x6969 => Some("nfs"),
        0x517b => Some("smb"),
        0xff53_4d42 => Some("cifs"),
        0xfe53_4d42 => Some("smb2"),
        0x0102_1997 => Some("9p"),
        _ => None,
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(".doctor-probe");
    std::fs::write(&path, b"")?;
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(tools: &'a HostTools, scratch: &'a Path, subuid: &str) -> HostFacts<'a> {
        HostFacts {
            uid: 1000,
            gid: 1000,
            user: "alice".into(),
            subuid: subuid.into(),
            subgid: subuid.into(),
            tools,
            scratch,
            store: scratch.join("store"),
        }
    }

    #[test]
    fn subordinate_ranges() {
        let tools = HostTools::new(None);
        let dir = tempfile::tempdir().unwrap();
        let with = subordinate_ids(&facts(&tools, dir.path(), "alice:100000:65536\n"));
        assert_eq!(with.status, Status::Ok);
        assert!(with.detail.contains("100000..165535"), "{}", with.detail);
        let without = subordinate_ids(&facts(&tools, dir.path(), "bob:100000:65536\n"));
        assert_eq!(without.status, Status::Warn);
        assert!(without.fix.unwrap().contains("usermod --add-subuids"));
    }

    #[test]
    fn missing_tools_say_what_to_install() {
        let tools = HostTools::new(Some("/nonexistent".into()));
        assert_eq!(id_helpers(&tools).fix.as_deref(), Some("apt-get install uidmap"));
    }

    #[test]
    fn network_filesystems_are_named() {
        assert_eq!(network_filesystem(0x6969), Some("nfs"));
        assert_eq!(network_filesystem(0xff53_4d42), Some("cifs"));
        // ext4, tmpfs, btrfs, xfs, overlayfs.
        for local in [0xef53, 0x0102_1994, 0x9123_683e, 0x5846_5342, 0x794c_7630] {
            assert_eq!(network_filesystem(local), None, "{local:#x}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(store_on_network_filesystem(dir.path()).is_none());
    }

    #[test]
    fn unwritable_store_fails() {
        let check = store_writable(Path::new("/proc/pkg-store"));
        assert_eq!(check.status, Status::Fail);
    }
}
