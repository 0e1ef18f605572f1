//! The typed handshake between the caller and the launcher (PID 1 of the
//! sandbox), and between the launcher and the workload it forks.
//!
//! Protocol, caller ⇄ launcher, over a close-on-exec pipe (to the launcher)
//! and a Unix socket (from it, so it can pass a descriptor):
//!
//! 1. the caller writes the id maps, then [`CallerEnd::ack_mapping`]; the
//!    launcher blocks in [`LauncherEnd::wait_for_mapping`] until then (EOF
//!    means the caller gave up: the launcher exits);
//! 2. the launcher runs its setup and starts the workload, then sends exactly
//!    one of `Started`, `SetupFailed` or `ExecFailed`
//!    ([`CallerEnd::wait_for_start`]); with a terminal, `Started` carries the
//!    master of the workload's pseudo-terminal (`SCM_RIGHTS`), as runc's
//!    console socket does;
//! 3. when the workload has ended, the launcher sends `Exited` with its raw
//!    wait status ([`CallerEnd::wait_for_exit`]) and exits.
//!
//! Launcher ⇄ workload: the workload reports a failure before `execve` with
//! [`report_workload_failure`]; a successful `execve` closes the pipe, which
//! the launcher sees as EOF in [`wait_for_workload_exec`].
//!
//! Messages are fixed-size records, far below `PIPE_BUF`, so each write is
//! atomic; the launcher's side encodes them on the stack (it must not allocate).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

use super::sys::{LinuxSyscall, Syscall};

/// What the launcher was doing when something failed, beyond the plan's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchStep {
    /// The plan step at this index.
    Plan(u32),
    CreateExecPipe,
    ForkWorkload,
    SwitchUser,
    RedirectStdio,
    ResetSignals,
    Exec,
    NewSession,
    /// Unsharing the namespaces made after the clone.
    Unshare,
    /// Creating the workload's pseudo-terminal.
    OpenTerminal,
    /// Making it the workload's controlling terminal.
    ControllingTerminal,
}

impl LaunchStep {
    fn encode(self) -> u32 {
        match self {
            LaunchStep::Plan(i) => i & 0x7fff_ffff,
            LaunchStep::CreateExecPipe => 0x8000_0000,
            LaunchStep::ForkWorkload => 0x8000_0001,
            LaunchStep::SwitchUser => 0x8000_0002,
            LaunchStep::RedirectStdio => 0x8000_0003,
            LaunchStep::ResetSignals => 0x8000_0004,
            LaunchStep::Exec => 0x8000_0005,
            LaunchStep::NewSession => 0x8000_0006,
            LaunchStep::Unshare => 0x8000_0007,
            LaunchStep::OpenTerminal => 0x8000_0008,
            LaunchStep::ControllingTerminal => 0x8000_0009,
        }
    }

    fn decode(code: u32) -> Option<Self> {
        Some(match code {
            0x8000_0000 => LaunchStep::CreateExecPipe,
            0x8000_0001 => LaunchStep::ForkWorkload,
            0x8000_0002 => LaunchStep::SwitchUser,
            0x8000_0003 => LaunchStep::RedirectStdio,
            0x8000_0004 => LaunchStep::ResetSignals,
            0x8000_0005 => LaunchStep::Exec,
            0x8000_0006 => LaunchStep::NewSession,
            0x8000_0007 => LaunchStep::Unshare,
            0x8000_0008 => LaunchStep::OpenTerminal,
            0x8000_0009 => LaunchStep::ControllingTerminal,
            i if i < 0x8000_0000 => LaunchStep::Plan(i),
            _ => return None,
        })
    }
}

/// A message from the launcher to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Started,
    SetupFailed { step: LaunchStep, errno: Errno },
    ExecFailed { errno: Errno },
    Exited { wait_status: i32 },
}

const MESSAGE_LEN: usize = 12;

impl Report {
    fn encode(self) -> [u8; MESSAGE_LEN] {
        let (tag, a, b): (u32, u32, i32) = match self {
            Report::Started => (1, 0, 0),
            Report::SetupFailed { step, errno } => (2, step.encode(), errno as i32),
            Report::ExecFailed { errno } => (3, 0, errno as i32),
            Report::Exited { wait_status } => (4, 0, wait_status),
        };
        let mut out = [0u8; MESSAGE_LEN];
        out[0..4].copy_from_slice(&tag.to_le_bytes());
        out[4..8].copy_from_slice(&a.to_le_bytes());
        out[8..12].copy_from_slice(&b.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; MESSAGE_LEN]) -> Option<Self> {
        let word = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        let tag = u32::from_le_bytes(word(0));
        let a = u32::from_le_bytes(word(4));
        let b = i32::from_le_bytes(word(8));
        Some(match tag {
            1 => Report::Started,
            2 => Report::SetupFailed { step: LaunchStep::decode(a)?, errno: Errno::from_raw(b) },
            3 => Report::ExecFailed { errno: Errno::from_raw(b) },
            4 => Report::Exited { wait_status: b },
            _ => return None,
        })
    }
}

/// The handshake broke: the other side vanished or spoke nonsense.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the launcher closed the channel early")]
    Closed,
    #[error("the launcher sent an unknown message")]
    Garbled,
    #[error("i/o on the handshake pipe failed")]
    Io(#[from] io::Error),
}

/// The caller's side.
#[derive(Debug)]
pub struct CallerEnd {
    to_launcher: Option<File>,
    from_launcher: OwnedFd,
}

impl CallerEnd {
    pub fn new(to_launcher: OwnedFd, from_launcher: OwnedFd) -> Self {
        CallerEnd { to_launcher: Some(File::from(to_launcher)), from_launcher }
    }

    /// Tells the launcher its uid/gid maps are written, so it may go on.
    pub fn ack_mapping(&mut self) -> Result<(), ChannelError> {
        let mut pipe = self.to_launcher.take().ok_or(ChannelError::Closed)?;
        pipe.write_all(&[1])?;
        Ok(())
    }

    /// Waits for the launcher to start the workload or fail trying; with
    /// `Started`, the master of the workload's terminal, if it has one.
    pub fn wait_for_start(&mut self) -> Result<(Report, Option<OwnedFd>), ChannelError> {
        let (report, fd) = self.receive()?;
        Ok((report.ok_or(ChannelError::Closed)?, fd))
    }

    /// The workload's raw wait status, once the launcher is gone; `None` when
    /// the launcher died without reporting one.
    pub fn wait_for_exit(&mut self) -> Result<Option<i32>, ChannelError> {
        match self.receive()?.0 {
            Some(Report::Exited { wait_status }) => Ok(Some(wait_status)),
            Some(_) => Err(ChannelError::Garbled),
            None => Ok(None),
        }
    }

    /// One message (`None` at EOF) and the descriptor sent along, if any.
    fn receive(&mut self) -> Result<(Option<Report>, Option<OwnedFd>), ChannelError> {
        let mut buf = [0u8; MESSAGE_LEN];
        let mut filled = 0;
        let mut passed = None;
        while filled < MESSAGE_LEN {
            let socket = self.from_launcher.as_raw_fd();
            match LinuxSyscall.receive_with_fd(socket, &mut buf[filled..]) {
                Ok((0, _)) if filled == 0 => return Ok((None, None)),
                Ok((0, _)) => return Err(ChannelError::Garbled),
                Ok((n, fd)) => {
                    filled += n;
                    passed = passed.or(fd);
                }
                Err(errno) => return Err(io::Error::from(errno).into()),
            }
        }
        let report = Report::decode(&buf).ok_or(ChannelError::Garbled)?;
        Ok((Some(report), passed))
    }
}

/// The launcher's side: raw descriptors, used through [`Syscall`] only.
#[derive(Debug, Clone, Copy)]
pub struct LauncherEnd {
    pub from_caller: RawFd,
    pub to_caller: RawFd,
}

impl LauncherEnd {
    pub fn new(from_caller: &OwnedFd, to_caller: &OwnedFd) -> Self {
        LauncherEnd { from_caller: from_caller.as_raw_fd(), to_caller: to_caller.as_raw_fd() }
    }

    /// Blocks until the caller has written the id maps. `Err` when the caller
    /// closed the pipe instead.
    pub fn wait_for_mapping(&self, sys: &impl Syscall) -> Result<(), Errno> {
        let mut byte = [0u8; 1];
        match sys.read(self.from_caller, &mut byte)? {
            1 if byte[0] == 1 => Ok(()),
            _ => Err(Errno::EPIPE),
        }
    }

    pub fn report(&self, sys: &impl Syscall, report: Report) {
        // Nothing to do if the caller is gone: the launcher exits right after.
        let _ = sys.write(self.to_caller, &report.encode());
    }

    /// `Started`, with the master of the workload's terminal if there is one.
    pub fn report_started(&self, sys: &impl Syscall, terminal: Option<RawFd>) {
        match terminal {
            // As with `report`: a caller that is gone reads nothing.
            Some(master) => {
                let _ = sys.send_with_fd(self.to_caller, &Report::Started.encode(), master);
            }
            None => self.report(sys, Report::Started),
        }
    }
}

/// What the workload failed to do before `execve` took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadFailure {
    pub step: LaunchStep,
    pub errno: Errno,
}

/// From the workload, before exiting: why it could not exec.
pub fn report_workload_failure(sys: &impl Syscall, fd: RawFd, failure: WorkloadFailure) {
    let mut buf = [0u8; 8];
    buf[0..4].copy_from_slice(&failure.step.encode().to_le_bytes());
    buf[4..8].copy_from_slice(&(failure.errno as i32).to_le_bytes());
    let _ = sys.write(fd, &buf);
}

/// In the launcher: `Ok(())` once the workload's `execve` succeeded (EOF),
/// its failure otherwise.
pub fn wait_for_workload_exec(sys: &impl Syscall, fd: RawFd) -> Result<(), WorkloadFailure> {
    let mut buf = [0u8; 8];
    let mut filled = 0;
    while filled < buf.len() {
        match sys.read(fd, &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(errno) => return Err(WorkloadFailure { step: LaunchStep::ForkWorkload, errno }),
        }
    }
    if filled == 0 {
        return Ok(());
    }
    let step = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Err(WorkloadFailure {
        step: LaunchStep::decode(step).unwrap_or(LaunchStep::Exec),
        errno: Errno::from_raw(errno),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for report in [
            Report::Started,
            Report::SetupFailed { step: LaunchStep::Plan(7), errno: Errno::EPERM },
            Report::SetupFailed { step: LaunchStep::SwitchUser, errno: Errno::EINVAL },
            Report::SetupFailed { step: LaunchStep::OpenTerminal, errno: Errno::ENOSPC },
            Report::SetupFailed { step: LaunchStep::ControllingTerminal, errno: Errno::EPERM },
            Report::ExecFailed { errno: Errno::ENOENT },
            Report::Exited { wait_status: 0x0300 },
        ] {
            assert_eq!(Report::decode(&report.encode()), Some(report));
        }
        assert_eq!(Report::decode(&[9; MESSAGE_LEN]), None);
    }
}
