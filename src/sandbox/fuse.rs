//! An overlay root served by fuse-overlayfs, for kernels that refuse
//! overlayfs in a user namespace (podman's `mount_program`).
//!
//! The launcher opens the host's `/dev/fuse` and mounts the FUSE filesystem
//! at the new root itself (it holds the namespace's capabilities; the daemon
//! then needs none), then clones a helper into a mount namespace of its own.
//! The helper gets the host's root back as its root, so the host's
//! fuse-overlayfs and its shared libraries load, mounts a fresh `/proc` for
//! the daemon and forks it: `fuse-overlayfs -f -o lowerdir=…,upperdir=…,
//! workdir=… /dev/fd/3`, serving the launcher's mount through the inherited
//! device. Once the daemon answers, the helper makes the staging tmpfs the
//! root of its namespace, detaches the host's, and exits 0 (or its errno).
//!
//! Invariants:
//! - the daemon's root is never the host's once the workload runs (the
//!   helper's last `pivot_root` moves it), nor the sandbox's own root (a
//!   single-threaded daemon that looked its own `/proc/self/fd` up through
//!   itself would deadlock): it keeps the staging tmpfs, with the upper and
//!   work directories, the daemon's `/proc`, and no host path;
//! - the layers are read-only binds of the store's shared checkouts, and
//!   detached from the helper's namespace once the daemon holds them open;
//! - every copy of the device but the daemon's is closed before anyone waits
//!   for the daemon, so a daemon that dies makes the wait fail with ENOTCONN
//!   instead of hanging;
//! - the daemon lives in the sandbox's PID namespace, in a session of its own
//!   (the terminal's SIGINT, which it takes as "unmount", never reaches it),
//!   and the kernel kills it when the launcher exits: it never outlives the
//!   sandbox, and its mount namespace, mounts and tmpfs go with it;
//! - like the rest of the launcher, nothing here allocates.

use std::ffi::{CStr, CString, c_int};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow};

use super::plan::{NEW_ROOT, OLD_ROOT, STAGING, Step, run_steps};
use super::sys::{CStringArray, Forked, Syscall};
use super::{ExitStatus, SandboxError};

/// Where the daemon finds the device (its mount point is `/dev/fd/3`).
pub const DAEMON_FD: RawFd = 3;

/// Everything the launcher needs to start fuse-overlayfs, prepared before
/// the clone (see the module docs for the order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseOverlay {
    /// The host's `/dev/fuse`, through the old root.
    pub device: CString,
    /// Where the filesystem is mounted: the new root.
    pub target: CString,
    /// The helper's steps before the daemon starts.
    pub prepare: Vec<Step>,
    pub program: CString,
    pub argv: CStringArray,
    pub env: CStringArray,
    /// `/dev/null`, the daemon's standard streams.
    pub null: CString,
    /// The helper's copy of the mount, which answers once the daemon serves.
    pub mounted: CString,
    /// The helper's steps once the daemon serves.
    pub seal: Vec<Step>,
}

fn cstring(text: String) -> CString {
    CString::new(text).expect("built from paths without NUL bytes")
}

impl FuseOverlay {
    /// The plan for `layers` layers staged at `/layers/0…` (base first),
    /// with `/upper` and `/work` on the staging tmpfs, served by `program`
    /// (an absolute host path).
    pub fn new(program: &Path, layers: usize) -> Result<Self, SandboxError> {
        if !program.is_absolute() {
            return Err(SandboxError::InvalidSpec(format!(
                "fuse-overlayfs {} is not an absolute path",
                program.display()
            )));
        }
        let program = CString::new(program.as_os_str().as_bytes()).map_err(|_| {
            SandboxError::InvalidSpec("the fuse-overlayfs path contains a NUL byte".into())
        })?;
        // In the helper's namespace the staging tmpfs sits at STAGING again.
        let staged = |path: &str| format!("{STAGING}{path}");
        // fuse-overlayfs, like overlayfs, lists the topmost layer first.
        let lower: Vec<String> =
            (0..layers).rev().map(|i| staged(&format!("/layers/{i}"))).collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            staged("/upper"),
            staged("/work")
        );
        let argv = ["fuse-overlayfs".to_string(), "-f".into(), "-o".into(), options]
            .into_iter()
            .chain([format!("/dev/fd/{DAEMON_FD}")])
            .map(cstring)
            .collect();
        let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let prepare = vec![
            // The host's root becomes the root again, the staging tmpfs goes
            // back to STAGING: the daemon's program and libraries load from
            // the host, its paths are those of the staging tmpfs.
            Step::PivotRoot {
                new_root: cstring(OLD_ROOT.into()),
                put_old: cstring(format!("{OLD_ROOT}{STAGING}")),
            },
            Step::Chdir(c"/".into()),
            // fuse-overlayfs works through /proc/self/fd: one of the
            // sandbox's PID namespace, kept when the host's root goes.
            Step::Mkdir(cstring(staged("/proc"))),
            Step::Mount {
                source: Some(c"proc".into()),
                target: cstring(staged("/proc")),
                fstype: Some(c"proc".into()),
                flags: nosuid_nodev_noexec,
                data: None,
            },
        ];
        let mut seal = vec![Step::Detach(cstring(staged(NEW_ROOT)))];
        // The daemon holds each layer open: no path to the checkouts remains.
        seal.extend((0..layers).map(|i| Step::Detach(cstring(staged(&format!("/layers/{i}"))))));
        seal.extend([
            // Moves the daemon's root and working directory (the host's
            // root) to the staging tmpfs, then drops the host.
            Step::PivotRoot {
                new_root: cstring(STAGING.into()),
                put_old: cstring(staged(OLD_ROOT)),
            },
            Step::Detach(cstring(OLD_ROOT.into())),
        ]);
        Ok(FuseOverlay {
            device: cstring(format!("{OLD_ROOT}/dev/fuse")),
            target: cstring(NEW_ROOT.into()),
            prepare,
            program,
            argv: CStringArray::new(argv),
            env: CStringArray::new(Vec::new()),
            null: c"/dev/null".into(),
            mounted: cstring(staged(NEW_ROOT)),
            seal,
        })
    }
}

/// What to do when fuse-overlayfs fails with `errno`
/// ([`SandboxError::FuseOverlay`]).
pub fn advice(errno: Errno) -> &'static str {
    match errno {
        Errno::EACCES => {
            "/dev/fuse must be readable and writable by you: udev makes it mode 0666; \
             where it does not, `sudo chmod 0666 /dev/fuse`"
        }
        Errno::EPERM => {
            "this kernel refuses FUSE in a user namespace (Linux 4.18 or later allows it)"
        }
        Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => {
            "this kernel has no FUSE: `sudo modprobe fuse`"
        }
        _ => "fuse-overlayfs stopped as it started: run it by hand to see why",
    }
}

/// Mounts the FUSE filesystem at the new root and starts its daemon; returns
/// once the daemon serves. Runs in the launcher.
pub fn start(sys: &impl Syscall, fuse: &FuseOverlay) -> Result<(), Errno> {
    let device = sys.open_device(&fuse.device)?;
    let (uid, gid) = sys.ids();
    let mut data = StackString::new();
    data.push(b"fd=");
    data.push_number(device as u32);
    data.push(b",rootmode=40000,user_id=");
    data.push_number(uid);
    data.push(b",group_id=");
    data.push_number(gid);
    // Permissions are checked by the kernel, as overlayfs does; every user
    // of the sandbox, not only the mounting one, may use it.
    data.push(b",default_permissions,allow_other");
    let mounted = sys.mount(
        Some(c"fuse-overlayfs"),
        &fuse.target,
        Some(c"fuse.fuse-overlayfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_c_str()),
    );
    let helper = mounted.and_then(|()| sys.clone_process(CloneFlags::CLONE_NEWNS));
    if let Ok(Forked::Child) = helper {
        helper_main(sys, fuse, device);
    }
    sys.close(device);
    let Forked::Parent { child } = helper? else { unreachable!("the helper never returns") };
    match sys.wait_pid(child, false)? {
        Some((_, status)) => match super::sys::decode_wait_status(status) {
            ExitStatus::Exited(0) => Ok(()),
            ExitStatus::Exited(errno) => Err(Errno::from_raw(errno)),
            ExitStatus::Signaled(_) => Err(Errno::EINTR),
        },
        None => Err(Errno::ECHILD),
    }
}

/// The helper, in a mount namespace of its own: starts the daemon, waits
/// until it serves, then takes the host away from it. Exits 0, or with the
/// errno of what failed.
pub fn helper_main(sys: &impl Syscall, fuse: &FuseOverlay, device: RawFd) -> ! {
    let fail = |errno: Errno| -> ! { sys.exit(errno as c_int) };
    if let Err(failure) = run_steps(sys, &fuse.prepare) {
        fail(failure.errno);
    }
    match sys.clone_process(CloneFlags::empty()) {
        Ok(Forked::Child) => daemon_main(sys, fuse, device),
        Ok(Forked::Parent { .. }) => {}
        Err(errno) => fail(errno),
    }
    sys.close(device);
    if let Err(errno) = sys.statfs(&fuse.mounted) {
        fail(errno);
    }
    if let Err(failure) = run_steps(sys, &fuse.seal) {
        fail(failure.errno);
    }
    sys.exit(0)
}

/// The daemon between fork and exec: its own session, the device at
/// [`DAEMON_FD`], `/dev/null` as stdio, nothing else open, default signals.
pub fn daemon_main(sys: &impl Syscall, fuse: &FuseOverlay, device: RawFd) -> ! {
    let ready = sys
        .new_session()
        .and_then(|()| if device == DAEMON_FD { Ok(()) } else { sys.dup2(device, DAEMON_FD) })
        .and_then(|()| sys.open_device(&fuse.null))
        .and_then(|null| {
            (0..3).try_for_each(|fd| if null == fd { Ok(()) } else { sys.dup2(null, fd) })
        })
        .and_then(|()| {
            sys.close_range(DAEMON_FD + 1, RawFd::MAX);
            sys.reset_signal_handlers();
            sys.sigmask(SigmaskHow::SIG_SETMASK, &SigSet::empty(), None)
        });
    if ready.is_ok() {
        sys.execve(&fuse.program, &fuse.argv, &fuse.env);
    }
    sys.exit(127)
}

/// A NUL-terminated string built on the stack, for the launcher.
struct StackString {
    bytes: [u8; 160],
    len: usize,
}

impl StackString {
    fn new() -> Self {
        StackString { bytes: [0; 160], len: 0 }
    }

    /// Appends `text`; what does not fit (always leaving the NUL) is cut,
    /// which the fixed texts and numbers here never reach.
    fn push(&mut self, text: &[u8]) {
        for &byte in text {
            if self.len + 1 < self.bytes.len() {
                self.bytes[self.len] = byte;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_c_str(&self) -> &CStr {
        // The buffer is zeroed past `len` and never full: a NUL follows.
        CStr::from_bytes_until_nul(&self.bytes).unwrap_or(c"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_strings_hold_numbers_and_stay_terminated() {
        let mut s = StackString::new();
        s.push(b"fd=");
        s.push_number(0);
        s.push(b",id=");
        s.push_number(u32::MAX);
        assert_eq!(s.as_c_str(), c"fd=0,id=4294967295");
        s.push(&[b'x'; 300]);
        assert_eq!(s.as_c_str().to_bytes().len(), 159);
    }
}
