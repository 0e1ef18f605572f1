//! The code that runs inside the sandbox: the launcher (PID 1 of the new PID
//! namespace) and the workload between its clone and `execve`.
//!
//! Invariant: everything here runs in a process cloned from a possibly
//! multi-threaded caller, so it must never allocate, free, lock, panic or
//! return into the caller's code. It only reads the prepared [`Plan`], calls
//! [`Syscall`] methods and ends with [`Syscall::exit`]. Values that own heap
//! memory are borrowed, never dropped, here.
//!
//! The workload shares PID 1's memory until its `execve`
//! ([`Syscall::spawn_sharing_memory`]), PID 1 waiting meanwhile: no copy of
//! the caller's address space is made and dropped again for a process that
//! only makes a few system calls. Besides its own stack it writes only
//! `errno` (which PID 1 does not read until it runs again); switching ids, it
//! leaves PID 1 not dumpable, as runc leaves its init: its `/proc` files
//! then belong to the sandbox's root, and nothing outside reads them after
//! the id maps are written.
//!
//! With a terminal ([`Launch::terminal`]) the launcher opens a pseudo-terminal
//! from the sandbox's own devpts once the setup is done, hands the slave to
//! the workload (a session leader, whose controlling terminal and fds 0–2 it
//! becomes) and the master to the caller with `Started`, keeping neither:
//! the caller relays it ([`super::terminal`]), and PID 1 stays a loop of
//! reaping and forwarding signals.

use std::ffi::c_int;
use std::os::fd::{IntoRawFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use super::WindowSize;
use super::channel::{self, LaunchStep, LauncherEnd, Report, WorkloadFailure};
use super::plan::{ExecPlan, Plan, run_steps};
use super::sys::Syscall;

/// The sandbox's devpts multiplexer (`/dev/ptmx` links to it).
const PTMX: &std::ffi::CStr = c"/dev/pts/ptmx";

/// Signals the launcher forwards to the workload.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The signals the launcher waits for: the forwarded ones and SIGCHLD. The
/// caller blocks them before the clone, so none is lost before the launcher
/// starts waiting.
pub fn launcher_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in FORWARDED {
        set.add(signal);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Exit code of the launcher when its setup fails (the caller reads the
/// typed reason from the channel; this is only what `waitpid` sees).
const SETUP_FAILED: c_int = 125;

/// Everything the launcher needs, borrowed from the caller's memory.
pub struct Launch<'a> {
    pub plan: &'a Plan,
    pub channel: LauncherEnd,
    /// Sources for the workload's fds 0, 1 and 2; `None` inherits. With a
    /// terminal, the launcher's own instead (`/dev/null`).
    pub stdio: [Option<RawFd>; 3],
    /// Stop after the setup, without starting a workload (for [`super::probe`]).
    pub setup_only: bool,
    /// The signal set from [`launcher_signals`], built before the clone.
    pub signals: &'a SigSet,
    /// Give the workload a new pseudo-terminal of this size as its
    /// controlling terminal and fds 0–2 (`stdio` is then the launcher's own).
    pub terminal: Option<WindowSize>,
}

/// The launcher: PID 1 of the sandbox. Never returns.
pub fn launcher_main(sys: &impl Syscall, launch: &Launch<'_>) -> ! {
    let channel = launch.channel;
    let [stdin, stdout, stderr] = launch.stdio.map(|fd| fd.unwrap_or(0));
    close_other_fds(sys, [channel.from_caller, channel.to_caller, stdin, stdout, stderr]);
    // The caller's handlers must never run here: the launcher only takes
    // its (blocked) signals with sigwaitinfo.
    sys.reset_signal_handlers();
    if launch.terminal.is_some() {
        // The workload's terminal is the sandbox's own: PID 1 lets go of
        // the caller's, so no process inside reaches it (`/proc/1/fd/0`).
        for (target, source) in launch.stdio.iter().enumerate() {
            if let Some(source) = source
                && sys.dup2(*source, target as RawFd).is_err()
            {
                sys.exit(SETUP_FAILED);
            }
        }
    }
    let grouped = !launch.plan.exec.own_process_group || sys.new_process_group().is_ok();
    if !grouped || sys.kill_with_parent().is_err() {
        sys.exit(SETUP_FAILED);
    }
    // Done while the caller writes the id maps; a failure is reported once
    // they are written, when the caller reads the channel.
    let unshared = sys.unshare(launch.plan.unshare_flags);
    if channel.wait_for_mapping(sys).is_err() {
        sys.exit(SETUP_FAILED);
    }
    if let Err(errno) = unshared {
        channel.report(sys, Report::SetupFailed { step: LaunchStep::Unshare, errno });
        sys.exit(SETUP_FAILED);
    }
    if let Err(failure) = run_steps(sys, &launch.plan.steps) {
        let step = LaunchStep::Plan(failure.index as u32);
        channel.report(sys, Report::SetupFailed { step, errno: failure.errno });
        sys.exit(SETUP_FAILED);
    }
    if launch.setup_only {
        channel.report(sys, Report::Started);
        channel.report(sys, Report::Exited { wait_status: 0 });
        sys.exit(0);
    }

    // After the setup: the sandbox's /dev/pts is mounted by now.
    let terminal = match launch.terminal.map(|size| sys.open_terminal(PTMX, size)) {
        None => None,
        Some(Ok(pair)) => Some(pair),
        Some(Err(errno)) => {
            channel.report(sys, Report::SetupFailed { step: LaunchStep::OpenTerminal, errno });
            sys.exit(SETUP_FAILED);
        }
    };
    let stdio = match terminal {
        Some((_, slave)) => [Some(slave); 3],
        None => launch.stdio,
    };
    let (exec_read, exec_write) = match sys.pipe() {
        Ok((read, write)) => (read.into_raw_fd(), write.into_raw_fd()),
        Err(errno) => {
            channel.report(sys, Report::SetupFailed { step: LaunchStep::CreateExecPipe, errno });
            sys.exit(SETUP_FAILED);
        }
    };
    // PID 1 opens nothing from here on, so it can let go of its fds 0–2
    // (the caller's) before the workload starts wherever it gets another
    // source: none is ever reachable through `/proc/1/fd`, not even in the
    // moment between the workload's `execve` and the launcher's next step.
    // The workload's `dup2` creates them again from their sources.
    let replaced = close_replaced_stdio(sys, &stdio);
    let mut workload = || {
        // Its own descriptor table: these stay open in PID 1.
        sys.close(exec_read);
        sys.close(channel.from_caller);
        sys.close(channel.to_caller);
        if let Some((master, _)) = terminal {
            sys.close(master);
        }
        let controlling_terminal = terminal.map(|(_, slave)| slave);
        workload_main(sys, &launch.plan.exec, stdio, controlling_terminal, exec_write)
    };
    let workload = match sys.spawn_sharing_memory(&mut workload) {
        Ok(child) => child,
        Err(errno) => {
            channel.report(sys, Report::SetupFailed { step: LaunchStep::ForkWorkload, errno });
            sys.exit(SETUP_FAILED);
        }
    };
    sys.close(exec_write);
    // Only the workload writes there: a pipe's reader then sees EOF when the
    // workload and its children are done with it (the terminal's master
    // reads EIO then). PID 1's remaining fds 0–2 are streams the workload
    // inherited as they are; it keeps none of them either.
    let kept = (0..=2).filter(|&target| !replaced[target as usize]);
    for fd in launch.stdio.into_iter().flatten().chain(kept) {
        sys.close(fd);
    }
    if let Some((_, slave)) = terminal {
        sys.close(slave);
    }
    let exec = channel::wait_for_workload_exec(sys, exec_read);
    // Closed before the report, so the caller never sees it held.
    sys.close(exec_read);
    let master = terminal.map(|(master, _)| master);
    match exec {
        Ok(()) => channel.report_started(sys, master),
        Err(WorkloadFailure { step: LaunchStep::Exec, errno }) => {
            channel.report(sys, Report::ExecFailed { errno })
        }
        Err(WorkloadFailure { step, errno }) => {
            channel.report(sys, Report::SetupFailed { step, errno })
        }
    }
    // The caller holds the master now (or it is not needed).
    if let Some(master) = master {
        sys.close(master);
    }

    let status = supervise(sys, workload, launch.signals, launch.plan.exec.new_session);
    channel.report(sys, Report::Exited { wait_status: status });
    sys.exit(exit_code(status))
}

/// Closes each of fds 0–2 that the workload gets from another source in
/// `stdio`, unless it is itself one of those sources; says which it closed.
fn close_replaced_stdio(sys: &impl Syscall, stdio: &[Option<RawFd>; 3]) -> [bool; 3] {
    let mut closed = [false; 3];
    for ((target, source), closed) in (0..).zip(stdio).zip(&mut closed) {
        let replaced = source.is_some_and(|source| source != target);
        if replaced && !stdio.contains(&Some(target)) {
            sys.close(target);
            *closed = true;
        }
    }
    closed
}

/// Closes every descriptor from 3 up except `keep`. The launcher inherits
/// all of the caller's descriptors, close-on-exec or not, since it never
/// execs; held open for the sandbox's lifetime they would keep other
/// threads' pipes from ever reaching EOF.
pub fn close_other_fds(sys: &impl Syscall, mut keep: [RawFd; 5]) {
    keep.sort_unstable();
    let mut first = 3;
    for fd in keep {
        if fd >= first {
            if fd > first {
                sys.close_range(first, fd - 1);
            }
            first = fd + 1;
        }
    }
    sys.close_range(first, RawFd::MAX);
}

/// PID 1's loop: forwards signals to `workload`, reaps every child (orphans
/// reparented to PID 1 included) and returns the workload's wait status.
///
/// A signal the kernel generated (the terminal's SIGINT or SIGQUIT goes to
/// the whole foreground process group) already reached a workload that
/// shares the launcher's session; it is forwarded only to a workload in its
/// own session (`workload_has_own_session`), so it arrives exactly once.
pub fn supervise(
    sys: &impl Syscall,
    workload: Pid,
    signals: &SigSet,
    workload_has_own_session: bool,
) -> c_int {
    loop {
        let received = match sys.wait_signal(signals) {
            Ok(received) => received,
            // Cannot happen with a valid set; do not spin, report a failure.
            Err(_) => return SETUP_FAILED << 8,
        };
        if received.signal != Signal::SIGCHLD as c_int {
            if workload_has_own_session || !received.from_kernel {
                // The workload may already be gone; nothing to do then.
                let _ = sys.kill(workload, received.signal);
            }
            continue;
        }
        let mut workload_status = None;
        loop {
            match sys.wait_pid(Pid::from_raw(-1), true) {
                Ok(Some((pid, status))) if pid == workload => workload_status = Some(status),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if let Some(status) = workload_status {
            return status;
        }
    }
}

/// The launcher's own exit code for a workload's wait status: the code, or
/// 128+N for signal N (what shells and docker report).
pub fn exit_code(wait_status: c_int) -> c_int {
    match super::sys::decode_wait_status(wait_status) {
        super::ExitStatus::Exited(code) => code,
        super::ExitStatus::Signaled(signal) => 128 + signal,
    }
}

/// The workload between fork and exec. Never returns.
pub fn workload_main(
    sys: &impl Syscall,
    exec: &ExecPlan,
    stdio: [Option<RawFd>; 3],
    controlling_terminal: Option<RawFd>,
    report: RawFd,
) -> ! {
    let failure = match prepare_workload(sys, exec, stdio, controlling_terminal) {
        Err(failure) => failure,
        Ok(()) => WorkloadFailure { step: LaunchStep::Exec, errno: exec_first(sys, exec) },
    };
    channel::report_workload_failure(sys, report, failure);
    sys.exit(match failure.errno {
        Errno::ENOENT if failure.step == LaunchStep::Exec => 127,
        _ if failure.step == LaunchStep::Exec => 126,
        _ => SETUP_FAILED,
    })
}

/// Session, credentials, stdio and signal state for the workload. A
/// `controlling_terminal` needs a new session (the plan asks for one).
pub fn prepare_workload(
    sys: &impl Syscall,
    exec: &ExecPlan,
    stdio: [Option<RawFd>; 3],
    controlling_terminal: Option<RawFd>,
) -> Result<(), WorkloadFailure> {
    let fail = |step| move |errno| WorkloadFailure { step, errno };
    if exec.new_session {
        sys.new_session().map_err(fail(LaunchStep::NewSession))?;
    }
    if let Some(terminal) = controlling_terminal {
        sys.set_controlling_terminal(terminal).map_err(fail(LaunchStep::ControllingTerminal))?;
    }
    if let Some(creds) = &exec.credentials {
        sys.set_credentials(creds.uid, creds.gid, creds.groups.as_deref())
            .map_err(fail(LaunchStep::SwitchUser))?;
    }
    for (target, source) in stdio.iter().enumerate() {
        if let Some(source) = source {
            sys.dup2(*source, target as RawFd).map_err(fail(LaunchStep::RedirectStdio))?;
        }
    }
    sys.cloexec_from(3).map_err(fail(LaunchStep::RedirectStdio))?;
    sys.reset_signal_handlers();
    sys.sigmask(SigmaskHow::SIG_SETMASK, &SigSet::empty(), None)
        .map_err(fail(LaunchStep::ResetSignals))
}

/// Tries each candidate path like `execvp`: ENOENT moves on, EACCES is
/// remembered, anything else stops. Returns the error that decides.
pub fn exec_first(sys: &impl Syscall, exec: &ExecPlan) -> Errno {
    let mut decisive = Errno::ENOENT;
    for candidate in &exec.candidates {
        match sys.execve(candidate, &exec.argv, &exec.env) {
            Errno::ENOENT | Errno::ENOTDIR => {}
            Errno::EACCES => decisive = Errno::EACCES,
            other => return other,
        }
    }
    decisive
}
