//! The workload's pseudo-terminal (`pkg run -t`), as docker and podman give it.
//!
//! With [`SandboxSpec::terminal`](super::SandboxSpec::terminal) the workload
//! never gets the caller's terminal. Once the setup is done, the launcher
//! opens a new pseudo-terminal from the sandbox's own devpts instance
//! (`/dev/pts/ptmx`, so `tty` inside prints `/dev/pts/0`), sized like the
//! caller's; the workload becomes a session leader with its slave as
//! controlling terminal and fds 0, 1 and 2; the master goes to the caller
//! with the `Started` report, over the launcher channel (`SCM_RIGHTS`, as runc
//! and crun pass it to their console socket). The caller then [`relay`]s:
//!
//! - what the caller types → master, with [`Terminal::forward_input`] (`-i`),
//!   the caller's terminal in raw mode meanwhile ([`RawMode`]): Ctrl-C arrives
//!   as a byte, and the pseudo-terminal's line discipline makes it SIGINT for
//!   the workload's foreground process group, as with docker. Without it
//!   the workload's stdin is the pseudo-terminal still, where nothing
//!   arrives, and the caller's terminal keeps its mode (docker's `-t`
//!   without `-i`): Ctrl-C there is the caller's SIGINT, forwarded;
//! - master → the caller's stdout, until the master reads EIO: every
//!   descriptor of the slave is closed, so the workload and everything it
//!   started are done, at the latest when PID 1 exits and the kernel ends
//!   the sandbox. The kernel lets the master read everything the slave
//!   wrote before it reports EIO, so the output is complete when the relay
//!   returns, before the run does;
//! - each resize of the caller's terminal (SIGWINCH, [`ResizeWatch`]) → the
//!   master's window size, so the workload gets its SIGWINCH.
//!
//! Why the caller relays, and not the launcher: PID 1 must keep reaping and
//! forwarding signals, never blocked on the caller's stdout; the caller
//! waits for the run anyway, owns the caller's terminal (its mode, size and
//! SIGWINCH) and can restore it on every path. The launcher detaches its own
//! fds 0–2 from the caller's terminal too (`/dev/null`), so nothing in the
//! sandbox holds a descriptor of it: `TIOCSTI` on the workload's `/dev/tty`
//! reaches the sandbox's pseudo-terminal only.
//!
//! Invariants: the caller's terminal mode is put back whenever the relay
//! ends, error or not ([`RawMode`] restores on drop); the relay never blocks
//! on the master (non-blocking, written only when it polls writable, input
//! read only when nothing is pending), so a workload that does not read its
//! input cannot stop its output from being drained; the caller holds no
//! descriptor of the slave, or the master would never read EIO.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::sys::resize::ResizeWatch;
use super::sys::{LinuxSyscall, Ready, SysResult, Syscall, TerminalMode, Watch};
use super::{StdioSource, WindowSize};

/// The caller's side of a workload's pseudo-terminal.
#[derive(Debug)]
pub struct Terminal {
    /// The caller's terminal: the pseudo-terminal starts with its window size
    /// and follows its resizes; with `forward_input`, what is typed there is
    /// forwarded to the workload. Output goes to the spec's `stdio.stdout`
    /// (the terminal merges the workload's stderr into it, as docker's does);
    /// `stdio.stdin` and `stdio.stderr` are not used.
    pub host: OwnedFd,
    /// Forward the caller's input (`-i`), with the caller's terminal in raw
    /// mode for the run.
    pub forward_input: bool,
}

/// A terminal in raw mode until dropped, then as it was.
pub struct RawMode<'s, S: Syscall> {
    sys: &'s S,
    fd: RawFd,
    before: TerminalMode,
}

impl<'s, S: Syscall> RawMode<'s, S> {
    pub fn enter(sys: &'s S, fd: RawFd) -> SysResult<Self> {
        let before = sys.make_raw(fd)?;
        Ok(RawMode { sys, fd, before })
    }
}

impl<S: Syscall> Drop for RawMode<'_, S> {
    fn drop(&mut self) {
        // Nothing more to do if the terminal is gone (hung up).
        let _ = self.sys.set_terminal_mode(self.fd, &self.before);
    }
}

/// The descriptors [`relay`] works on, all the caller's.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    /// The pseudo-terminal's master (non-blocking).
    pub master: RawFd,
    /// Forwarded into the master until EOF, if any.
    pub input: Option<RawFd>,
    /// Where the master's output goes; `None` drains it into nothing.
    pub output: Option<RawFd>,
    /// The caller's terminal, whose size the master takes at the start and
    /// whenever `resized` (a [`ResizeWatch`]'s pipe) is readable.
    pub host: RawFd,
    pub resized: Option<RawFd>,
}

/// Relays between the caller and the master until the master reads EIO
/// (or EOF): the workload's side is closed and its output drained.
pub fn relay(sys: &impl Syscall, ends: Ends) -> SysResult<()> {
    // The caller's terminal may have been resized since the launcher read
    // its size, before anything watched for it.
    follow_size(sys, &ends);
    let mut output = ends.output;
    let mut input = ends.input;
    let mut from_master = [0u8; 16 * 1024];
    let mut pending = [0u8; 4096];
    let (mut start, mut end) = (0, 0);
    loop {
        let wants_out = if start < end { Ready::OUT } else { Ready::NONE };
        let mut watches =
            [Watch { fd: ends.master, events: Ready::IN | wants_out, ready: Ready::NONE }; 3];
        let mut count = 1;
        if let Some(resized) = ends.resized {
            watches[count].fd = resized;
            watches[count].events = Ready::IN;
            count += 1;
        }
        // Input is read only when the last of it is in the master, so a
        // workload that reads nothing never blocks the relay.
        let input_watch = input.filter(|_| start == end).map(|fd| {
            watches[count].fd = fd;
            watches[count].events = Ready::IN;
            count += 1;
            count - 1
        });
        sys.poll(&mut watches[..count])?;

        if ends.resized.is_some() && watches[1].ready.any(Ready::IN | Ready::DONE) {
            let mut notices = [0u8; 64];
            // Resizes quicker than the relay are one: the size is read once.
            let _ = sys.read(watches[1].fd, &mut notices);
            follow_size(sys, &ends);
        }
        if let Some(i) = input_watch
            && watches[i].ready.any(Ready::IN | Ready::DONE)
        {
            match sys.read(watches[i].fd, &mut pending) {
                Ok(n) if n > 0 => (start, end) = (0, n),
                Err(Errno::EAGAIN) => {}
                // EOF, a hung-up terminal: nothing more to forward.
                Ok(_) | Err(_) => input = None,
            }
        }
        if start < end && watches[0].ready.any(Ready::OUT) {
            match sys.write(ends.master, &pending[start..end]) {
                Ok(n) => start += n,
                Err(Errno::EAGAIN) => {}
                // The workload's side is closing: its input has no reader.
                Err(_) => (start, end, input) = (0, 0, None),
            }
        }
        if watches[0].ready.any(Ready::IN | Ready::DONE) {
            match sys.read(ends.master, &mut from_master) {
                Ok(0) | Err(Errno::EIO) => return Ok(()),
                Ok(n) => output = output.filter(|&fd| write_all(sys, fd, &from_master[..n])),
                Err(Errno::EAGAIN) => {}
                Err(errno) => return Err(errno),
            }
        }
    }
}

/// Gives the master the caller's terminal's size; a failure leaves it.
fn follow_size(sys: &impl Syscall, ends: &Ends) {
    if let Ok(size) = sys.window_size(ends.host) {
        let _ = sys.set_window_size(ends.master, size);
    }
}

/// Writes all of `buf`; `false` when `fd` takes no more (a closed pipe is
/// not an error: the rest of the output is drained into nothing).
fn write_all(sys: &impl Syscall, fd: RawFd, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        match sys.write(fd, buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf = &buf[n..],
        }
    }
    true
}

/// A started workload's terminal, on the caller's side.
#[derive(Debug)]
pub(super) struct Relay {
    host: OwnedFd,
    forward_input: bool,
    output: Option<OwnedFd>,
    master: Option<OwnedFd>,
}

impl Relay {
    /// Duplicates of what the relay needs from `terminal` and `stdout`, made
    /// before the sandbox starts.
    pub(super) fn new(terminal: &Terminal, stdout: &StdioSource) -> std::io::Result<Self> {
        let output = match stdout {
            StdioSource::Inherit => Some(std::io::stdout().as_fd().try_clone_to_owned()?),
            StdioSource::Fd(fd) => Some(fd.try_clone()?),
            StdioSource::Null => None,
        };
        Ok(Relay {
            host: terminal.host.try_clone()?,
            forward_input: terminal.forward_input,
            output,
            master: None,
        })
    }

    /// The size the workload's terminal starts with: the caller's terminal's
    /// (0×0, a new terminal's, if it has none).
    pub(super) fn size(&self) -> WindowSize {
        LinuxSyscall.window_size(self.host.as_raw_fd()).unwrap_or_default()
    }

    pub(super) fn attach(&mut self, master: OwnedFd) {
        self.master = Some(master);
    }

    pub(super) fn has_master(&self) -> bool {
        self.master.is_some()
    }

    /// Relays until the workload's side is closed; the caller's terminal
    /// is back in its mode when this returns.
    pub(super) fn run(self) -> SysResult<()> {
        let Some(master) = &self.master else { return Ok(()) };
        let sys = LinuxSyscall;
        let watch = ResizeWatch::install()?;
        let host = self.host.as_raw_fd();
        let _raw = if self.forward_input { Some(RawMode::enter(&sys, host)?) } else { None };
        let ends = Ends {
            master: master.as_raw_fd(),
            input: self.forward_input.then_some(host),
            output: self.output.as_ref().map(AsRawFd::as_raw_fd),
            host,
            resized: Some(watch.fd()),
        };
        relay(&sys, ends)
    }
}
