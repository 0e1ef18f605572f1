//! Which overlay serves a run's root filesystem (`pkg run --overlay`).
//!
//! The kernel's overlayfs is the quick way. Where the kernel refuses it in a
//! user namespace (before Linux 5.11, or a distribution's kernel that turns
//! it off), fuse-overlayfs serves the same read-only layer checkouts under
//! the same tmpfs upper layer, copying nothing, as podman's `mount_program`
//! does. Whether the kernel refuses is only known by trying: the attempt
//! fails at the overlay mount, before anything of the workload runs, so
//! [`OverlayDriver::Auto`] then tries again with fuse-overlayfs, and a host
//! that allows overlayfs pays nothing for the fallback.

use std::path::{Path, PathBuf};

use crate::sandbox::{ExitStatus, SandboxError, SandboxSpec};

/// How the image's root filesystem is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlayDriver {
    /// The kernel's overlayfs, else fuse-overlayfs where the kernel refuses.
    #[default]
    Auto,
    /// The kernel's overlayfs only.
    Kernel,
    /// fuse-overlayfs.
    Fuse,
}

/// Why a run uses fuse-overlayfs; the CLI says so once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseReason {
    /// `--overlay fuse`.
    Asked,
    /// The kernel refused overlayfs.
    KernelRefuses,
}

impl std::fmt::Display for FuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FuseReason::Asked => "using fuse-overlayfs for the root filesystem (--overlay fuse)",
            FuseReason::KernelRefuses => {
                "the kernel refuses overlayfs in a user namespace; using fuse-overlayfs"
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The sandbox failed: the kernel's refusal with [`OverlayDriver::Kernel`],
    /// fuse-overlayfs's failure ([`SandboxError::FuseOverlay`]), or anything else.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("fuse-overlayfs is not installed")]
    NoFuseOverlayfs,
    #[error(
        "the kernel refuses overlayfs in a user namespace, and fuse-overlayfs, the fallback, is not installed"
    )]
    NoFallback(#[source] SandboxError),
}

impl OverlayError {
    /// The docker/podman exit code: the sandbox's, else 125.
    pub fn exit_code(&self) -> i32 {
        match self {
            OverlayError::Sandbox(error) => error.exit_code(),
            OverlayError::NoFuseOverlayfs | OverlayError::NoFallback(_) => 125,
        }
    }
}

/// Runs `spec` (an overlay root) through `sandbox` (the caller's
/// [`crate::sandbox::Sandbox::run_forwarding`], or a fake) with the overlay
/// `driver` asks for. `fuse_overlayfs` finds the host's fuse-overlayfs, only
/// when it is needed; `using_fuse` hears why, once, before the workload
/// starts on a fuse-overlayfs root.
pub fn run_with_overlay(
    spec: &mut SandboxSpec,
    driver: OverlayDriver,
    fuse_overlayfs: impl FnOnce() -> Option<PathBuf>,
    mut sandbox: impl FnMut(&SandboxSpec) -> Result<ExitStatus, SandboxError>,
    mut using_fuse: impl FnMut(FuseReason),
) -> Result<ExitStatus, OverlayError> {
    let mut with_fuse = |spec: &mut SandboxSpec, program: &Path, reason| {
        let root = std::mem::replace(&mut spec.root, crate::sandbox::RootFs::Tmpfs);
        spec.root = root.with_fuse_overlayfs(program);
        using_fuse(reason);
    };
    match driver {
        OverlayDriver::Kernel => Ok(sandbox(spec)?),
        OverlayDriver::Fuse => {
            let program = fuse_overlayfs().ok_or(OverlayError::NoFuseOverlayfs)?;
            with_fuse(spec, &program, FuseReason::Asked);
            Ok(sandbox(spec)?)
        }
        OverlayDriver::Auto => match sandbox(spec) {
            Err(refused @ SandboxError::OverlayRefused { .. }) => {
                let Some(program) = fuse_overlayfs() else {
                    return Err(OverlayError::NoFallback(refused));
                };
                with_fuse(spec, &program, FuseReason::KernelRefuses);
                Ok(sandbox(spec)?)
            }
            other => Ok(other?),
        },
    }
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    use super::*;
    use crate::sandbox::{IdMapping, RootFs};

    fn spec() -> SandboxSpec {
        let mut spec = SandboxSpec::new(IdMapping::single(0, 0, 1000, 1000), vec!["sh".into()]);
        spec.root = RootFs::Overlay { layers: vec!["/store/base".into()] };
        spec
    }

    /// A host whose kernel refuses overlayfs; records the roots it was given.
    fn refusing_kernel(
        roots: &mut Vec<RootFs>,
    ) -> impl FnMut(&SandboxSpec) -> Result<ExitStatus, SandboxError> + '_ {
        |spec| {
            roots.push(spec.root.clone());
            match spec.root {
                RootFs::Overlay { .. } => Err(SandboxError::OverlayRefused {
                    step: "mount overlay on /newroot".into(),
                    source: Errno::EPERM,
                }),
                _ => Ok(ExitStatus::Exited(3)),
            }
        }
    }

    fn fuse_root() -> RootFs {
        RootFs::FuseOverlay {
            layers: vec!["/store/base".into()],
            program: "/usr/bin/fuse-overlayfs".into(),
        }
    }

    #[test]
    fn auto_falls_back_to_fuse_overlayfs_where_the_kernel_refuses_and_says_so() {
        let (mut roots, mut notes) = (Vec::new(), Vec::new());
        let fuse = || Some(PathBuf::from("/usr/bin/fuse-overlayfs"));
        let status = run_with_overlay(
            &mut spec(),
            OverlayDriver::Auto,
            fuse,
            refusing_kernel(&mut roots),
            |reason| notes.push(reason.to_string()),
        );
        assert_eq!(status.unwrap(), ExitStatus::Exited(3));
        assert_eq!(roots, [spec().root, fuse_root()]);
        assert_eq!(
            notes,
            ["the kernel refuses overlayfs in a user namespace; using fuse-overlayfs"]
        );
    }

    #[test]
    fn without_fuse_overlayfs_the_refusal_stays_an_error() {
        let mut roots = Vec::new();
        let error = run_with_overlay(
            &mut spec(),
            OverlayDriver::Auto,
            || None,
            refusing_kernel(&mut roots),
            |_| panic!("no fallback, no note"),
        )
        .unwrap_err();
        assert!(matches!(error, OverlayError::NoFallback(SandboxError::OverlayRefused { .. })));
        assert_eq!(error.exit_code(), 125);
        let mut roots = Vec::new();
        let fuse = || Some(PathBuf::from("/usr/bin/fuse-overlayfs"));
        let kernel_only = run_with_overlay(
            &mut spec(),
            OverlayDriver::Kernel,
            fuse,
            refusing_kernel(&mut roots),
            |_| panic!("--overlay kernel never falls back"),
        );
        assert!(matches!(
            kernel_only,
            Err(OverlayError::Sandbox(SandboxError::OverlayRefused { .. }))
        ));
        assert_eq!(roots.len(), 1);
    }

    #[test]
    fn fuse_is_used_at_once_when_asked_for() {
        let mut roots = Vec::new();
        let mut notes = Vec::new();
        let fuse = || Some(PathBuf::from("/usr/bin/fuse-overlayfs"));
        let status = run_with_overlay(
            &mut spec(),
            OverlayDriver::Fuse,
            fuse,
            refusing_kernel(&mut roots),
            |reason| notes.push(reason),
        );
        assert_eq!(status.unwrap(), ExitStatus::Exited(3));
        assert_eq!((roots, notes), (vec![fuse_root()], vec![FuseReason::Asked]));
        let missing =
            run_with_overlay(&mut spec(), OverlayDriver::Fuse, || None, |_| unreachable!(), |_| {});
        assert!(matches!(missing, Err(OverlayError::NoFuseOverlayfs)));
    }
}
