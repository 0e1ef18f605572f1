//! The one file of pkg that talks to the kernel directly.
//!
//! Everything the sandbox asks of the kernel goes through the [`Syscall`]
//! trait: [`LinuxSyscall`] is the real implementation, and the unit tests use a
//! recording double, so the namespace and mount logic is testable without
//! privileges. This module is the only place with `unsafe` code.
//!
//! Invariant for every method of [`LinuxSyscall`]: it must not allocate, lock
//! or otherwise touch process-global state beyond the system call itself. The
//! sandbox calls them in a child cloned from a possibly multi-threaded
//! process, where another thread may have held the allocator's lock at the
//! time of the clone: only async-signal-safe operations are allowed there.
//! Paths and argument vectors therefore arrive as prepared `&CStr` and
//! [`CStringArray`] values. The few methods only the caller uses (the
//! terminal relay's, see [`super::terminal`]) keep to the same rule.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::{OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid};

use super::WindowSize;

/// Bytes of stack for a process started by
/// [`Syscall::spawn_sharing_memory`], which only makes system calls.
pub const SPAWN_STACK: usize = 64 << 10;

/// The result of one system call.
pub type SysResult<T> = Result<T, Errno>;

/// A NULL-terminated array of C strings, prepared before any fork so that
/// `execve` can be called without allocating.
pub struct CStringArray {
    // The pointers point into the heap buffers of `strings`, which never move
    // or change while `self` lives (they are never mutated after `new`).
    strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

impl CStringArray {
    pub fn new(strings: Vec<CString>) -> Self {
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        CStringArray { strings, pointers }
    }

    pub fn strings(&self) -> &[CString] {
        &self.strings
    }

    fn as_ptr(&self) -> *const *const c_char {
        self.pointers.as_ptr()
    }
}

// By hand: a derived clone would copy pointers into the original's strings.
impl Clone for CStringArray {
    fn clone(&self) -> Self {
        CStringArray::new(self.strings.clone())
    }
}

impl PartialEq for CStringArray {
    fn eq(&self, other: &Self) -> bool {
        self.strings == other.strings
    }
}

impl Eq for CStringArray {}

impl std::fmt::Debug for CStringArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.strings).finish()
    }
}

/// A signal taken from the pending set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedSignal {
    pub signal: c_int,
    /// Sent by the kernel itself (`SI_KERNEL`), e.g. the terminal's
    /// SIGINT to its whole foreground process group, rather than by `kill`.
    pub from_kernel: bool,
}

/// A terminal's settings (`struct termios`), saved to be put back.
#[derive(Clone, Copy)]
pub struct TerminalMode(libc::termios);

impl TerminalMode {
    /// All-zero settings, for test doubles.
    #[cfg(test)]
    pub fn zeroed() -> Self {
        // SAFETY: `termios` is plain old data, valid when zeroed.
        TerminalMode(unsafe { std::mem::zeroed() })
    }
}

impl std::fmt::Debug for TerminalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalMode").finish_non_exhaustive()
    }
}

/// One descriptor [`Syscall::poll`] watches: `events` asked, `ready` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    pub fd: RawFd,
    pub events: Ready,
    pub ready: Ready,
}

/// Readiness bits of [`Watch`] (`poll(2)`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready(pub i16);

impl Ready {
    pub const IN: Ready = Ready(libc::POLLIN);
    pub const OUT: Ready = Ready(libc::POLLOUT);
    /// Hang-up or error: a read or write tells which.
    pub const DONE: Ready = Ready(libc::POLLHUP | libc::POLLERR | libc::POLLNVAL);
    pub const NONE: Ready = Ready(0);

    pub fn any(self, of: Ready) -> bool {
        self.0 & of.0 != 0
    }
}

impl std::ops::BitOr for Ready {
    type Output = Ready;
    fn bitor(self, other: Ready) -> Ready {
        Ready(self.0 | other.0)
    }
}

/// What a fork-like clone returned in the calling process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    Parent { child: Pid },
    Child,
}

/// Every kernel operation the sandbox performs.
pub trait Syscall {
    // --- filesystem plan (the launcher, before the workload starts) ---
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> SysResult<()>;
    /// Makes the mount at `target` and every mount below it read-only,
    /// keeping their other (possibly locked) flags.
    fn set_read_only(&self, target: &CStr) -> SysResult<()>;
    fn umount(&self, target: &CStr, flags: MntFlags) -> SysResult<()>;
    fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()>;
    /// Creates an empty regular file unless something exists at `path`.
    fn touch(&self, path: &CStr) -> SysResult<()>;
    /// Creates (mode 0644) or truncates the file at `path` and writes `contents`.
    fn write_file(&self, path: &CStr, contents: &[u8]) -> SysResult<()>;
    fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()>;
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()>;
    fn chdir(&self, path: &CStr) -> SysResult<()>;
    fn sethostname(&self, name: &CStr) -> SysResult<()>;
    /// Brings the loopback interface of the current network namespace up.
    fn loopback_up(&self) -> SysResult<()>;
    fn set_no_new_privs(&self) -> SysResult<()>;
    fn umask(&self, mode: u32);
    /// Has the kernel send SIGKILL to this process when the thread that
    /// created it exits, so a killed caller leaves no sandbox behind.
    fn kill_with_parent(&self) -> SysResult<()>;

    // --- fuse-overlayfs (see `fuse.rs`) ---
    /// Opens a device (or file) read-write and *without* close-on-exec: it
    /// is meant for a child to inherit.
    fn open_device(&self, path: &CStr) -> SysResult<RawFd>;
    /// Asks the filesystem holding `path` for its statistics. A FUSE
    /// filesystem's daemon must answer, after its handshake with the kernel,
    /// so this waits until the daemon serves (or fails once it has died).
    fn statfs(&self, path: &CStr) -> SysResult<()>;
    /// The real uid and gid of the calling process.
    fn ids(&self) -> (u32, u32);

    // --- the workload, between fork and exec ---
    /// Switches real, effective and saved ids to `uid` and `gid`, and the
    /// supplementary groups to `groups` when given (`setgroups` first, while
    /// the process may still set them).
    fn set_credentials(&self, uid: u32, gid: u32, groups: Option<&[Gid]>) -> SysResult<()>;
    fn dup2(&self, from: RawFd, to: RawFd) -> SysResult<()>;
    /// Default disposition for every catchable signal (the mask is untouched).
    fn reset_signal_handlers(&self);
    /// Marks every descriptor from `first` up close-on-exec.
    fn cloexec_from(&self, first: RawFd) -> SysResult<()>;
    /// Replaces the process image; returns only on failure.
    fn execve(&self, path: &CStr, argv: &CStringArray, envp: &CStringArray) -> Errno;

    // --- the workload's terminal (see `terminal.rs`) ---
    /// Opens the master of a new pseudo-terminal at `ptmx` (non-blocking,
    /// close-on-exec), unlocks it, gives it `size`, and opens its slave
    /// through the master (`TIOCGPTPEER`, not as a controlling terminal):
    /// `(master, slave)`.
    fn open_terminal(&self, ptmx: &CStr, size: WindowSize) -> SysResult<(RawFd, RawFd)>;
    /// Makes the terminal `fd` the controlling terminal of the calling
    /// session leader (`TIOCSCTTY`).
    fn set_controlling_terminal(&self, fd: RawFd) -> SysResult<()>;
    fn window_size(&self, fd: RawFd) -> SysResult<WindowSize>;
    fn set_window_size(&self, fd: RawFd, size: WindowSize) -> SysResult<()>;
    /// Switches the terminal `fd` to raw mode (`cfmakeraw`) at once, keeping
    /// what was typed ahead; returns its settings from before.
    fn make_raw(&self, fd: RawFd) -> SysResult<TerminalMode>;
    fn set_terminal_mode(&self, fd: RawFd, mode: &TerminalMode) -> SysResult<()>;
    /// Waits until one of `watches` is ready, however long that takes
    /// (interrupted waits are resumed), and fills in their `ready` bits.
    fn poll(&self, watches: &mut [Watch]) -> SysResult<()>;

    // --- processes and the handshake ---
    /// A fork-like `clone` into the namespaces in `flags`, without running
    /// the C library's fork handlers (which take the allocator's locks).
    /// The child may only make async-signal-safe calls until it execs or exits.
    fn clone_process(&self, flags: CloneFlags) -> SysResult<Forked>;
    /// Runs `child` in a new process that shares the caller's memory (not
    /// its descriptors, signal handlers or namespaces) on a stack of its own,
    /// and returns once that process has called `execve` or exited
    /// (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does). Unlike
    /// [`Syscall::clone_process`] it copies no address space, a cost a large
    /// caller pays twice: at the clone, and again when the child's `execve`
    /// drops the copy. The caller is suspended meanwhile, so `child` runs
    /// much as a call would; but it must end in `execve` or
    /// [`Syscall::exit`], and what it changes of the process (credentials,
    /// descriptors) is its own, except that a change of ids marks the shared
    /// memory not dumpable, for the caller too. Its stack is
    /// [`SPAWN_STACK`] bytes above a guard page: overflowing it kills the
    /// child, never the caller's memory.
    fn spawn_sharing_memory(&self, child: &mut dyn FnMut() -> c_int) -> SysResult<Pid>;
    /// Moves the calling process into new namespaces of the kinds in `flags`.
    fn unshare(&self, flags: CloneFlags) -> SysResult<()>;
    /// A close-on-exec pipe: (read end, write end).
    fn pipe(&self) -> SysResult<(OwnedFd, OwnedFd)>;
    /// A close-on-exec pair of connected Unix stream sockets.
    fn socket_pair(&self) -> SysResult<(OwnedFd, OwnedFd)>;
    /// Writes `buf` to a Unix socket with a duplicate of `fd` attached
    /// (`SCM_RIGHTS`).
    fn send_with_fd(&self, socket: RawFd, buf: &[u8], fd: RawFd) -> SysResult<usize>;
    /// Reads from a Unix socket like [`Syscall::read`], taking the descriptor
    /// sent along with these bytes, if any (close-on-exec).
    fn receive_with_fd(&self, socket: RawFd, buf: &mut [u8])
    -> SysResult<(usize, Option<OwnedFd>)>;
    fn close(&self, fd: RawFd);
    /// Closes every descriptor from `first` to `last` (inclusive), if any.
    fn close_range(&self, first: RawFd, last: RawFd);
    fn read(&self, fd: RawFd, buf: &mut [u8]) -> SysResult<usize>;
    fn write(&self, fd: RawFd, buf: &[u8]) -> SysResult<usize>;
    fn kill(&self, pid: Pid, signal: c_int) -> SysResult<()>;
    /// Waits for a signal of `set` (which must be blocked) and returns it.
    fn wait_signal(&self, set: &SigSet) -> SysResult<ReceivedSignal>;
    /// Starts a new session (and process group) without a controlling terminal.
    fn new_session(&self) -> SysResult<()>;
    /// Makes the calling process the leader of a new process group.
    fn new_process_group(&self) -> SysResult<()>;
    /// `waitpid(pid, WNOHANG?)`: `Ok(None)` when nothing is ready.
    fn wait_pid(&self, pid: Pid, nohang: bool) -> SysResult<Option<(Pid, c_int)>>;
    fn sigmask(&self, how: SigmaskHow, set: &SigSet, old: Option<&mut SigSet>) -> SysResult<()>;
    /// Ends the calling process at once, without running any destructor.
    fn exit(&self, code: c_int) -> !;
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

fn check(ret: c_int) -> SysResult<()> {
    if ret == -1 { Err(Errno::last()) } else { Ok(()) }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: c_int = 0x8000;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> SysResult<()> {
        // nix passes `&CStr` arguments straight through without copying.
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn set_read_only(&self, target: &CStr) -> SysResult<()> {
        let attr =
            MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
        // SAFETY: `target` is a valid NUL-terminated string and `attr` a
        // properly laid out `struct mount_attr` whose size we pass; the kernel
        // only reads both during the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                target.as_ptr(),
                AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if ret == -1 { Err(Errno::last()) } else { Ok(()) }
    }

    fn umount(&self, target: &CStr, flags: MntFlags) -> SysResult<()> {
        nix::mount::umount2(target, flags)
    }

    fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()> {
        nix::unistd::mkdir(path, Mode::from_bits_truncate(mode))
    }

    fn touch(&self, path: &CStr) -> SysResult<()> {
        let flags = libc::O_RDONLY | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `path` is a valid NUL-terminated string; the returned
        // descriptor is owned here and closed right away.
        let mut fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
        if fd == -1 && Errno::last() == Errno::ELOOP {
            // A symlink where a file mount point goes (an image's
            // /etc/resolv.conf, say): replace it, as the mount replaces it.
            // SAFETY: as above; unlink only removes the link itself.
            fd = unsafe {
                if libc::unlink(path.as_ptr()) == -1 {
                    return Err(Errno::last());
                }
                libc::open(path.as_ptr(), flags, 0o644)
            };
        }
        if fd == -1 {
            return Err(Errno::last());
        }
        self.close(fd);
        Ok(())
    }

    fn write_file(&self, path: &CStr, contents: &[u8]) -> SysResult<()> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
        // SAFETY: `path` is a valid NUL-terminated string; the returned
        // descriptor is owned here and closed before returning.
        let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644) };
        if fd == -1 {
            return Err(Errno::last());
        }
        let mut written = 0;
        let result = loop {
            if written == contents.len() {
                break Ok(());
            }
            match self.write(fd, &contents[written..]) {
                Ok(0) => break Err(Errno::EIO),
                Ok(n) => written += n,
                Err(errno) => break Err(errno),
            }
        };
        self.close(fd);
        result
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()> {
        nix::unistd::symlinkat(target, nix::fcntl::AT_FDCWD, link)
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn chdir(&self, path: &CStr) -> SysResult<()> {
        nix::unistd::chdir(path)
    }

    fn sethostname(&self, name: &CStr) -> SysResult<()> {
        let bytes = name.to_bytes();
        // SAFETY: the pointer and length describe `name`'s bytes, which the
        // kernel copies during the call.
        check(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) })
    }

    fn loopback_up(&self) -> SysResult<()> {
        // SAFETY: a plain socket call; the descriptor is closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock == -1 {
            return Err(Errno::last());
        }
        // SAFETY: `ifreq` is plain old data, valid when zeroed.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as c_char;
        }
        // SAFETY: `req` is a valid `ifreq` naming an interface; the kernel
        // fills in `ifru_flags` for SIOCGIFFLAGS and reads it for SIOCSIFFLAGS.
        let result = unsafe {
            check(libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req)).and_then(|()| {
                req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
                check(libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req))
            })
        };
        self.close(sock);
        result
    }

    fn set_no_new_privs(&self) -> SysResult<()> {
        nix::sys::prctl::set_no_new_privs()
    }

    fn kill_with_parent(&self) -> SysResult<()> {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and has no memory effects.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) })
    }

    fn umask(&self, mode: u32) {
        nix::sys::stat::umask(Mode::from_bits_truncate(mode));
    }

    fn open_device(&self, path: &CStr) -> SysResult<RawFd> {
        // SAFETY: `path` is a valid NUL-terminated string; the caller owns
        // the returned descriptor.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if fd == -1 { Err(Errno::last()) } else { Ok(fd) }
    }

    fn statfs(&self, path: &CStr) -> SysResult<()> {
        // SAFETY: `statfs` is plain old data, valid when zeroed.
        let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string and `buf` a
        // writable `struct statfs` for the call.
        check(unsafe { libc::statfs(path.as_ptr(), &mut buf) })
    }

    fn ids(&self) -> (u32, u32) {
        (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    }

    fn set_credentials(&self, uid: u32, gid: u32, groups: Option<&[Gid]>) -> SysResult<()> {
        // Raw system calls, not the C library's wrappers: those apply the
        // change to every thread the library knows of (`__nptl_setxid`),
        // taking a lock and waiting for threads that, in this copy of a
        // multi-threaded caller, were only ever the caller's: a thread being
        // created at the time of the clone is waited for forever. This
        // process has one thread, so the thread's credentials are all it has.
        //
        // 32-bit x86 and Arm keep 16-bit ids under the plain names.
        #[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
        use libc::{
            SYS_setgroups as SYS_SETGROUPS, SYS_setresgid as SYS_SETRESGID,
            SYS_setresuid as SYS_SETRESUID,
        };
        #[cfg(any(target_arch = "x86", target_arch = "arm"))]
        use libc::{
            SYS_setgroups32 as SYS_SETGROUPS, SYS_setresgid32 as SYS_SETRESGID,
            SYS_setresuid32 as SYS_SETRESUID,
        };
        if let Some(groups) = groups {
            // SAFETY: `groups` is a slice of 32-bit ids (`Gid` wraps a
            // `gid_t`) that outlives the call.
            let ret = unsafe {
                libc::syscall(SYS_SETGROUPS, groups.len(), groups.as_ptr().cast::<libc::gid_t>())
            };
            check(ret as c_int)?;
        }
        // SAFETY: plain integer arguments.
        check(unsafe { libc::syscall(SYS_SETRESGID, gid, gid, gid) } as c_int)?;
        // SAFETY: as above.
        check(unsafe { libc::syscall(SYS_SETRESUID, uid, uid, uid) } as c_int)
    }

    fn dup2(&self, from: RawFd, to: RawFd) -> SysResult<()> {
        // SAFETY: dup2 only manipulates the descriptor table; `to` is one of
        // the standard descriptors the workload is meant to own.
        check(unsafe { libc::dup2(from, to) })
    }

    fn reset_signal_handlers(&self) {
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            // SAFETY: SIG_DFL is always a valid disposition; signals the C
            // library reserves for itself fail with EINVAL, which we ignore.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }

    fn cloexec_from(&self, first: RawFd) -> SysResult<()> {
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
        // sets a flag on descriptors.
        check(unsafe {
            libc::close_range(
                first as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as c_int,
            )
        })
    }

    fn execve(&self, path: &CStr, argv: &CStringArray, envp: &CStringArray) -> Errno {
        // SAFETY: `path` is NUL-terminated and both arrays are NULL-terminated
        // arrays of pointers to NUL-terminated strings that outlive the call.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Errno::last()
    }

    fn open_terminal(&self, ptmx: &CStr, size: WindowSize) -> SysResult<(RawFd, RawFd)> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: `ptmx` is a valid NUL-terminated string; the descriptor is
        // returned to the caller or closed below.
        let master = unsafe { libc::open(ptmx.as_ptr(), flags) };
        if master == -1 {
            return Err(Errno::last());
        }
        let unlock: c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int from the pointer, valid for the call.
        let slave = check(unsafe { libc::ioctl(master, libc::TIOCSPTLCK, &unlock) })
            .and_then(|()| self.set_window_size(master, size))
            .and_then(|()| {
                let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
                // SAFETY: TIOCGPTPEER takes open flags by value and returns a
                // new descriptor, owned by the caller.
                let slave = unsafe { libc::ioctl(master, libc::TIOCGPTPEER, flags) };
                if slave == -1 { Err(Errno::last()) } else { Ok(slave) }
            });
        match slave {
            Ok(slave) => Ok((master, slave)),
            Err(errno) => {
                self.close(master);
                Err(errno)
            }
        }
    }

    fn set_controlling_terminal(&self, fd: RawFd) -> SysResult<()> {
        // SAFETY: TIOCSCTTY takes an int by value (0: do not steal the
        // terminal from another session); no memory is touched.
        check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0 as c_int) })
    }

    fn window_size(&self, fd: RawFd) -> SysResult<WindowSize> {
        // SAFETY: `winsize` is plain old data, valid when zeroed.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer.
        check(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) })?;
        Ok(WindowSize { rows: size.ws_row, cols: size.ws_col })
    }

    fn set_window_size(&self, fd: RawFd, size: WindowSize) -> SysResult<()> {
        let size =
            libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer.
        check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) })
    }

    fn make_raw(&self, fd: RawFd) -> SysResult<TerminalMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        // SAFETY: the caller passes a descriptor that stays open for the call.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let before = tcgetattr(borrowed)?;
        let mut raw = before.clone();
        cfmakeraw(&mut raw);
        // TCSANOW, not TCSAFLUSH: what was typed ahead goes to the workload.
        tcsetattr(borrowed, SetArg::TCSANOW, &raw)?;
        Ok(TerminalMode(before.into()))
    }

    fn set_terminal_mode(&self, fd: RawFd, mode: &TerminalMode) -> SysResult<()> {
        use nix::sys::termios::{SetArg, Termios, tcsetattr};
        // SAFETY: the caller passes a descriptor that stays open for the call.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        tcsetattr(borrowed, SetArg::TCSANOW, &Termios::from(mode.0))
    }

    fn poll(&self, watches: &mut [Watch]) -> SysResult<()> {
        const MAX: usize = 8;
        assert!(watches.len() <= MAX, "poll watches at most {MAX} descriptors");
        let mut fds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; MAX];
        for (fd, watch) in fds.iter_mut().zip(watches.iter()) {
            *fd = libc::pollfd { fd: watch.fd, events: watch.events.0, revents: 0 };
        }
        loop {
            // SAFETY: the pointer and count describe the first
            // `watches.len()` entries of `fds`, writable for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), watches.len() as libc::nfds_t, -1) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                _ => break,
            }
        }
        for (fd, watch) in fds.iter().zip(watches.iter_mut()) {
            watch.ready = Ready(fd.revents);
        }
        Ok(())
    }

    fn clone_process(&self, flags: CloneFlags) -> SysResult<Forked> {
        let flags = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
        // SAFETY: without CLONE_VM and with a NULL stack, clone behaves like
        // fork: the child gets a copy of the address space and continues here
        // on its own copy of the stack. The raw syscall skips the C library's
        // fork handlers on purpose (see the trait documentation); the callers
        // in launcher.rs keep the child async-signal-safe. Every other
        // argument is zero, so the architecture-specific argument order only
        // matters on s390x, which swaps the first two.
        #[cfg(not(target_arch = "s390x"))]
        let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        // SAFETY: as above.
        #[cfg(target_arch = "s390x")]
        let ret = unsafe { libc::syscall(libc::SYS_clone, 0usize, flags, 0usize, 0usize, 0usize) };
        match ret {
            -1 => Err(Errno::last()),
            0 => Ok(Forked::Child),
            pid => Ok(Forked::Parent { child: Pid::from_raw(pid as libc::pid_t) }),
        }
    }

    fn spawn_sharing_memory(&self, child: &mut dyn FnMut() -> c_int) -> SysResult<Pid> {
        extern "C" fn start(child: *mut c_void) -> c_int {
            // SAFETY: `child` is the `&mut dyn FnMut` below, which outlives
            // this process's use of it: the caller stays suspended in clone
            // until this process execs or exits.
            let child = unsafe { &mut *child.cast::<&mut dyn FnMut() -> c_int>() };
            child()
        }
        // SAFETY: sysconf reads a value the C library keeps; no lock, no allocation.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = page + SPAWN_STACK.next_multiple_of(page);
        // SAFETY: a new private anonymous mapping, touching no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        // SAFETY: the lowest page of the mapping just made: a guard page.
        let guarded = check(unsafe { libc::mprotect(base, page, libc::PROT_NONE) });
        let mut child = child;
        let spawned = guarded.and_then(|()| {
            // The stack grows down from the mapping's end, which is
            // page-aligned (the ABI wants 16 bytes).
            let top = base.cast::<u8>().wrapping_add(len);
            let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
            // SAFETY: `top` is the end of a mapping only the new process uses
            // while the caller is suspended (CLONE_VFORK), and `start` gets a
            // pointer to `child`, alive for as long. Without CLONE_FILES or
            // CLONE_SIGHAND the new process has its own descriptor table and
            // signal handlers.
            let ret =
                unsafe { libc::clone(start, top.cast(), flags, (&raw mut child).cast::<c_void>()) };
            if ret == -1 { Err(Errno::last()) } else { Ok(Pid::from_raw(ret)) }
        });
        // SAFETY: the mapping made above, which the child no longer uses: it
        // has exec'd or exited, or was never started.
        unsafe { libc::munmap(base, len) };
        spawned
    }

    fn unshare(&self, flags: CloneFlags) -> SysResult<()> {
        nix::sched::unshare(flags)
    }

    fn pipe(&self) -> SysResult<(OwnedFd, OwnedFd)> {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
    }

    fn socket_pair(&self) -> SysResult<(OwnedFd, OwnedFd)> {
        use std::os::fd::FromRawFd;
        let mut fds: [c_int; 2] = [-1; 2];
        let kind = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        // SAFETY: `fds` is a writable array of two ints, as socketpair wants.
        check(unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) })?;
        // SAFETY: both are new descriptors, owned by nothing else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    fn send_with_fd(&self, socket: RawFd, buf: &[u8], fd: RawFd) -> SysResult<usize> {
        // Room for one control message carrying one descriptor, aligned
        // for `cmsghdr`; on the stack, since the launcher sends it.
        let mut control = [0u64; 4];
        let mut iov =
            libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `msghdr` is plain old data, valid when zeroed.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<c_int>() as u32) } as _;
        debug_assert!(msg.msg_controllen as usize <= size_of_val(&control));
        // SAFETY: `msg` describes `control`, large enough for one header and
        // one int (checked above), so CMSG_FIRSTHDR points into it and
        // CMSG_DATA just past the header; the descriptor is written unaligned.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(size_of::<c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<c_int>(), fd);
        }
        loop {
            // SAFETY: `msg` points at `iov` (describing `buf`) and `control`,
            // all alive and readable for the call.
            let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                n => return Ok(n as usize),
            }
        }
    }

    fn receive_with_fd(
        &self,
        socket: RawFd,
        buf: &mut [u8],
    ) -> SysResult<(usize, Option<OwnedFd>)> {
        use std::os::fd::FromRawFd;
        let mut control = [0u64; 4];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: `msghdr` is plain old data, valid when zeroed.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        let n = loop {
            // SAFETY: `msg` points at `iov` (describing `buf`) and `control`,
            // both writable for the call.
            let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                n => break n as usize,
            }
        };
        let mut received = None;
        // SAFETY: the kernel filled `control` with `msg_controllen` bytes of
        // well-formed control messages; CMSG_FIRSTHDR/CMSG_NXTHDR walk them
        // within those bounds, and an SCM_RIGHTS message holds ints that are
        // new descriptors of this process, owned here from now on.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&msg);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET
                    && (*header).cmsg_type == libc::SCM_RIGHTS
                {
                    let data = libc::CMSG_DATA(header).cast::<c_int>();
                    let count = ((*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / size_of::<c_int>();
                    for i in 0..count {
                        let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                        // One is expected; any other is closed (dropped).
                        received.get_or_insert(fd);
                    }
                }
                header = libc::CMSG_NXTHDR(&msg, header);
            }
        }
        Ok((n, received))
    }

    fn close(&self, fd: RawFd) {
        // SAFETY: callers pass descriptors they own and never use again.
        unsafe { libc::close(fd) };
    }

    fn close_range(&self, first: RawFd, last: RawFd) {
        // SAFETY: callers only pass ranges of descriptors they own and no
        // longer use; close_range touches nothing but the descriptor table.
        unsafe { libc::close_range(first as libc::c_uint, last as libc::c_uint, 0) };
    }

    fn read(&self, fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
        loop {
            // SAFETY: the pointer and length describe `buf`, writable for the call.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                n => return Ok(n as usize),
            }
        }
    }

    fn write(&self, fd: RawFd, buf: &[u8]) -> SysResult<usize> {
        loop {
            // SAFETY: the pointer and length describe `buf`, readable for the call.
            let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                n => return Ok(n as usize),
            }
        }
    }

    fn kill(&self, pid: Pid, signal: c_int) -> SysResult<()> {
        // SAFETY: kill has no memory effects in this process.
        check(unsafe { libc::kill(pid.as_raw(), signal) })
    }

    fn wait_signal(&self, set: &SigSet) -> SysResult<ReceivedSignal> {
        loop {
            // SAFETY: `siginfo_t` is plain old data, valid when zeroed.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is a valid sigset_t and `info` a writable siginfo_t.
            let n = unsafe { libc::sigwaitinfo(set.as_ref(), &mut info) };
            match n {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                n => {
                    return Ok(ReceivedSignal {
                        signal: n,
                        from_kernel: info.si_code == libc::SI_KERNEL,
                    });
                }
            }
        }
    }

    fn new_session(&self) -> SysResult<()> {
        nix::unistd::setsid().map(drop)
    }

    fn new_process_group(&self) -> SysResult<()> {
        nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))
    }

    fn wait_pid(&self, pid: Pid, nohang: bool) -> SysResult<Option<(Pid, c_int)>> {
        let mut status: c_int = 0;
        let options = if nohang { libc::WNOHANG } else { 0 } | libc::__WALL;
        loop {
            // SAFETY: `status` is a valid out-pointer for the call.
            let ret = unsafe { libc::waitpid(pid.as_raw(), &mut status, options) };
            match ret {
                -1 if Errno::last() == Errno::EINTR => continue,
                -1 => return Err(Errno::last()),
                0 => return Ok(None),
                pid => return Ok(Some((Pid::from_raw(pid), status))),
            }
        }
    }

    fn sigmask(&self, how: SigmaskHow, set: &SigSet, old: Option<&mut SigSet>) -> SysResult<()> {
        nix::sys::signal::pthread_sigmask(how, Some(set), old)
    }

    fn exit(&self, code: c_int) -> ! {
        // SAFETY: _exit ends the process without running atexit handlers or
        // destructors, which is what a forked child must do.
        unsafe { libc::_exit(code) }
    }
}

/// How a process ended, from its raw `waitpid` status.
pub fn decode_wait_status(status: c_int) -> super::ExitStatus {
    if libc::WIFSIGNALED(status) {
        super::ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        super::ExitStatus::Exited(libc::WEXITSTATUS(status))
    }
}

/// Forwarding of the caller's signals to a sandbox's launcher, which passes
/// them on to the workload (see [`super::Sandbox::run_forwarding`]).
///
/// While a [`Forwarder`](forward::Forwarder) lives, the caller's SIGINT, SIGTERM, SIGHUP,
/// SIGQUIT, SIGUSR1 and SIGUSR2 run a handler that `kill`s the launcher with
/// the same signal, whichever thread the kernel picks. A signal that arrives
/// before the launcher exists is kept pending and sent by
/// [`Forwarder::attach`](forward::Forwarder::attach), so none is lost between `install` and the clone.
/// Signals the kernel generated (the terminal's SIGINT and SIGQUIT go to the
/// whole foreground process group) are forwarded only when the sandbox is in
/// a process group of its own: otherwise they reached it directly, and the
/// workload gets each exactly once either way. A signal the caller ignores
/// (`nohup`) stays ignored and is not forwarded. The
/// launcher's pid is cleared before it is reaped, and [`Forwarder::detach`](forward::Forwarder::detach)
/// waits for handlers in flight, so a forwarded signal can never reach a
/// recycled pid.
pub mod forward {
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

    use nix::errno::Errno;
    use nix::libc;
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use nix::unistd::Pid;

    /// The launcher to forward to (0: not started yet, or reaped).
    static TARGET: AtomicI32 = AtomicI32::new(0);
    /// Signals received and not yet forwarded, one bit per signal number.
    static PENDING: AtomicU64 = AtomicU64::new(0);
    /// Handlers between reading [`TARGET`] and their last `kill`.
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    /// Whether kernel-generated signals are forwarded too.
    static FORWARD_KERNEL: AtomicBool = AtomicBool::new(false);

    /// Sends every pending signal to `pid` (async-signal-safe).
    fn flush(pid: libc::pid_t) {
        let pending = PENDING.swap(0, Ordering::SeqCst);
        for signal in 1..64 {
            if pending & (1 << signal) != 0 {
                // SAFETY: kill is async-signal-safe and has no memory effects.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    extern "C" fn forward(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let from_kernel = !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL;
        if (from_kernel && !FORWARD_KERNEL.load(Ordering::SeqCst)) || !(1..64).contains(&signal) {
            return;
        }
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let saved = Errno::last_raw();
        // Pending first, then the target: either this handler sees the
        // target, or `attach` (which sets it, then flushes) sees the bit.
        PENDING.fetch_or(1 << signal, Ordering::SeqCst);
        let pid = TARGET.load(Ordering::SeqCst);
        if pid > 0 {
            flush(pid);
        }
        Errno::set_raw(saved);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }

    /// Installed handlers; dropping it restores the old ones.
    pub struct Forwarder {
        old: Vec<(Signal, SigAction)>,
    }

    impl Forwarder {
        /// Installs the handlers for `signals`, forwarding kernel-generated
        /// ones too when `forward_kernel`. One forwarder at a time per
        /// process (its state is process-wide).
        pub fn install(signals: &[Signal], forward_kernel: bool) -> nix::Result<Self> {
            PENDING.store(0, Ordering::SeqCst);
            FORWARD_KERNEL.store(forward_kernel, Ordering::SeqCst);
            let action = SigAction::new(
                SigHandler::SigAction(forward),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            let mut forwarder = Forwarder { old: Vec::new() };
            for &signal in signals {
                // SAFETY: the handler only touches atomics, errno and kill,
                // all async-signal-safe.
                let old = unsafe { sigaction(signal, &action) }?;
                if old.handler() == SigHandler::SigIgn {
                    // SAFETY: puts back the disposition that was in place.
                    unsafe { sigaction(signal, &old) }?;
                    continue;
                }
                forwarder.old.push((signal, old));
            }
            Ok(forwarder)
        }

        /// Forwards to `launcher` from now on, starting with what is pending.
        pub fn attach(&self, launcher: Pid) {
            TARGET.store(launcher.as_raw(), Ordering::SeqCst);
            flush(launcher.as_raw());
        }

        /// Stops forwarding; once this returns no handler will signal the
        /// launcher, so it may be reaped.
        pub fn detach(&self) {
            TARGET.store(0, Ordering::SeqCst);
            while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
                std::hint::spin_loop();
            }
        }
    }

    impl Drop for Forwarder {
        fn drop(&mut self) {
            self.detach();
            for (signal, old) in self.old.drain(..) {
                // SAFETY: restores the disposition that was in place before.
                let _ = unsafe { sigaction(signal, &old) };
            }
        }
    }
}

/// Notice of the caller's terminal being resized, for the terminal relay
/// (see [`super::terminal`]).
///
/// While a [`ResizeWatch`](resize::ResizeWatch) lives, SIGWINCH runs a handler that writes a byte
/// to a non-blocking pipe (the self-pipe trick); the relay polls its read
/// end, so a resize wakes it wherever it waits. Bytes of resizes that come
/// quicker than the relay are coalesced: it reads the current size once.
pub mod resize {
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

    use nix::errno::Errno;
    use nix::fcntl::OFlag;
    use nix::libc;
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

    /// The pipe's write end while a watch is installed (-1: none).
    static NOTIFY: AtomicI32 = AtomicI32::new(-1);
    /// Handlers between reading [`NOTIFY`] and their write.
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn note(_: libc::c_int) {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let saved = Errno::last_raw();
        let fd = NOTIFY.load(Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: write is async-signal-safe; the byte lives on the stack.
            // A full pipe already holds a pending notice: nothing is lost.
            unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
        }
        Errno::set_raw(saved);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }

    /// An installed SIGWINCH handler; dropping it puts back the old one.
    pub struct ResizeWatch {
        read: OwnedFd,
        /// The handler's end, kept open while it may write.
        _write: OwnedFd,
        old: SigAction,
    }

    impl ResizeWatch {
        /// Installs the handler. One watch at a time per process.
        pub fn install() -> nix::Result<Self> {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            NOTIFY.store(write.as_raw_fd(), Ordering::SeqCst);
            let action =
                SigAction::new(SigHandler::Handler(note), SaFlags::SA_RESTART, SigSet::empty());
            // SAFETY: the handler only touches an atomic, errno and write,
            // all async-signal-safe.
            match unsafe { sigaction(Signal::SIGWINCH, &action) } {
                Ok(old) => Ok(ResizeWatch { read, _write: write, old }),
                Err(errno) => {
                    NOTIFY.store(-1, Ordering::SeqCst);
                    Err(errno)
                }
            }
        }

        /// Readable once the terminal was resized; read it empty then.
        pub fn fd(&self) -> RawFd {
            self.read.as_raw_fd()
        }
    }

    impl Drop for ResizeWatch {
        fn drop(&mut self) {
            // SAFETY: puts back the disposition that was in place before.
            let _ = unsafe { sigaction(Signal::SIGWINCH, &self.old) };
            // The pipe is closed (with the fields) only once no handler can
            // write to its descriptor number any more.
            NOTIFY.store(-1, Ordering::SeqCst);
            while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
                std::hint::spin_loop();
            }
        }
    }
}
