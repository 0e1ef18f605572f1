//! Unit tests of the launcher's plan and protocol with a recording
//! [`Syscall`] double: no privileges, no processes, only the order of
//! operations.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CStr, c_int};
use std::os::fd::{OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::{Gid, Pid};

use super::channel::LauncherEnd;
use super::fuse;
use super::launcher::{self, Launch, launcher_signals};
use super::plan::{HostSource, Plan, SourceKind, Step, run_steps};
use super::sys::{
    CStringArray, Forked, Ready, ReceivedSignal, SysResult, Syscall, TerminalMode, Watch,
};
use super::*;

/// Records every call as one line of text; scripted answers for the calls
/// that return data; `fail` makes the first call starting with a prefix fail.
#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<String>>,
    fail: Option<(&'static str, Errno)>,
    reads: RefCell<VecDeque<Vec<u8>>>,
    signals: RefCell<VecDeque<ReceivedSignal>>,
    waits: RefCell<VecDeque<Option<(i32, c_int)>>>,
    exec_errors: Vec<(&'static str, Errno)>,
    /// Scripted `read` results by descriptor, in order; a descriptor named
    /// here is answered from here, the others from `reads`.
    fd_reads: RefCell<VecDeque<(RawFd, ScriptedRead)>>,
    /// Scripted `poll` answers: the descriptors ready, each with its bits.
    polls: RefCell<VecDeque<Vec<(RawFd, Ready)>>>,
    /// What `window_size` answers.
    size: WindowSize,
}

/// One scripted `read`: the bytes read, or the failure.
type ScriptedRead = Result<Vec<u8>, Errno>;

/// What `Recorder::exit` unwinds with, standing in for the end of a process.
#[derive(Debug, PartialEq)]
struct Exited(c_int);

/// `MsFlags(MS_BIND | MS_REC)` → `MS_BIND | MS_REC`.
fn bits(flags: impl std::fmt::Debug) -> String {
    let debug = format!("{flags:?}");
    let inner = debug.split_once('(').map_or(debug.as_str(), |(_, rest)| rest);
    inner.trim_end_matches(')').to_string()
}

fn text(c: &CStr) -> String {
    c.to_string_lossy().into_owned()
}

impl Recorder {
    fn record(&self, call: String) -> SysResult<()> {
        let failure = self.fail.filter(|(prefix, _)| call.starts_with(prefix));
        self.calls.borrow_mut().push(call);
        match failure {
            Some((_, errno)) => Err(errno),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    fn position(&self, prefix: &str) -> usize {
        self.calls()
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no call `{prefix}…` in {:#?}", self.calls()))
    }
}

impl Syscall for Recorder {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: MsFlags,
        data: Option<&CStr>,
    ) -> SysResult<()> {
        self.record(format!(
            "mount {} {} {} {} {}",
            source.map_or("-".into(), text),
            text(target),
            fstype.map_or("-".into(), text),
            bits(flags),
            data.map_or("-".into(), text)
        ))
    }
    fn set_read_only(&self, target: &CStr) -> SysResult<()> {
        self.record(format!("read-only {}", text(target)))
    }
    fn umount(&self, target: &CStr, flags: MntFlags) -> SysResult<()> {
        self.record(format!("umount {} {}", text(target), bits(flags)))
    }
    fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()> {
        self.record(format!("mkdir {} {mode:o}", text(path)))
    }
    fn touch(&self, path: &CStr) -> SysResult<()> {
        self.record(format!("touch {}", text(path)))
    }
    fn write_file(&self, path: &CStr, contents: &[u8]) -> SysResult<()> {
        self.record(format!("write {} {:?}", text(path), String::from_utf8_lossy(contents)))
    }
    fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()> {
        self.record(format!("symlink {} -> {}", text(link), text(target)))
    }
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()> {
        self.record(format!("pivot_root {} {}", text(new_root), text(put_old)))
    }
    fn chdir(&self, path: &CStr) -> SysResult<()> {
        self.record(format!("chdir {}", text(path)))
    }
    fn sethostname(&self, name: &CStr) -> SysResult<()> {
        self.record(format!("sethostname {}", text(name)))
    }
    fn loopback_up(&self) -> SysResult<()> {
        self.record("loopback_up".into())
    }
    fn set_no_new_privs(&self) -> SysResult<()> {
        self.record("no_new_privs".into())
    }
    fn kill_with_parent(&self) -> SysResult<()> {
        self.record("kill_with_parent".into())
    }
    fn umask(&self, mode: u32) {
        let _ = self.record(format!("umask {mode:03o}"));
    }
    fn open_device(&self, path: &CStr) -> SysResult<RawFd> {
        self.record(format!("open {}", text(path)))?;
        Ok(if path == c"/dev/null" { 9 } else { 7 })
    }
    fn statfs(&self, path: &CStr) -> SysResult<()> {
        self.record(format!("statfs {}", text(path)))
    }
    fn ids(&self) -> (u32, u32) {
        (1000, 1001)
    }
    fn set_credentials(&self, uid: u32, gid: u32, groups: Option<&[Gid]>) -> SysResult<()> {
        self.record(format!("credentials {uid}:{gid} groups={groups:?}"))
    }
    fn dup2(&self, from: RawFd, to: RawFd) -> SysResult<()> {
        self.record(format!("dup2 {from} {to}"))
    }
    fn reset_signal_handlers(&self) {
        let _ = self.record("reset_signal_handlers".into());
    }
    fn cloexec_from(&self, first: RawFd) -> SysResult<()> {
        self.record(format!("cloexec_from {first}"))
    }
    fn execve(&self, path: &CStr, argv: &CStringArray, envp: &CStringArray) -> Errno {
        let _ = self.record(format!("execve {} {:?} {:?}", text(path), argv, envp));
        let path = text(path);
        self.exec_errors.iter().find(|(p, _)| *p == path).map_or(Errno::ENOENT, |(_, e)| *e)
    }
    fn open_terminal(&self, ptmx: &CStr, size: WindowSize) -> SysResult<(RawFd, RawFd)> {
        self.record(format!("open_terminal {} {}x{}", text(ptmx), size.rows, size.cols))?;
        Ok((20, 21))
    }
    fn set_controlling_terminal(&self, fd: RawFd) -> SysResult<()> {
        self.record(format!("controlling_terminal {fd}"))
    }
    fn window_size(&self, fd: RawFd) -> SysResult<WindowSize> {
        self.record(format!("window_size {fd}"))?;
        Ok(self.size)
    }
    fn set_window_size(&self, fd: RawFd, size: WindowSize) -> SysResult<()> {
        self.record(format!("set_window_size {fd} {}x{}", size.rows, size.cols))
    }
    fn make_raw(&self, fd: RawFd) -> SysResult<TerminalMode> {
        self.record(format!("make_raw {fd}"))?;
        Ok(TerminalMode::zeroed())
    }
    fn set_terminal_mode(&self, fd: RawFd, _mode: &TerminalMode) -> SysResult<()> {
        self.record(format!("restore_mode {fd}"))
    }
    fn poll(&self, watches: &mut [Watch]) -> SysResult<()> {
        let asked: Vec<String> =
            watches.iter().map(|w| format!("{}:{}", w.fd, events(w.events))).collect();
        self.record(format!("poll {}", asked.join(" ")))?;
        let ready = self.polls.borrow_mut().pop_front().expect("scripted poll");
        for watch in watches.iter_mut() {
            watch.ready =
                ready.iter().find(|(fd, _)| *fd == watch.fd).map_or(Ready::NONE, |(_, r)| *r);
        }
        Ok(())
    }
    fn clone_process(&self, flags: CloneFlags) -> SysResult<Forked> {
        self.record(format!("clone {flags:?}"))?;
        Ok(Forked::Parent { child: Pid::from_raw(2) })
    }
    fn spawn_sharing_memory(&self, _child: &mut dyn FnMut() -> c_int) -> SysResult<Pid> {
        self.record("clone sharing memory".into())?;
        Ok(Pid::from_raw(2))
    }
    fn unshare(&self, flags: CloneFlags) -> SysResult<()> {
        self.record(format!("unshare {flags:?}"))
    }
    fn pipe(&self) -> SysResult<(OwnedFd, OwnedFd)> {
        self.record("pipe".into())?;
        // Real descriptors, so the launcher may turn them into raw ones.
        nix::unistd::pipe()
    }
    fn socket_pair(&self) -> SysResult<(OwnedFd, OwnedFd)> {
        self.record("socket_pair".into())?;
        nix::unistd::pipe()
    }
    fn send_with_fd(&self, socket: RawFd, buf: &[u8], fd: RawFd) -> SysResult<usize> {
        self.record(format!("send {socket} {buf:?} with fd {fd}"))?;
        Ok(buf.len())
    }
    fn receive_with_fd(
        &self,
        socket: RawFd,
        buf: &mut [u8],
    ) -> SysResult<(usize, Option<OwnedFd>)> {
        Ok((self.read(socket, buf)?, None))
    }
    fn close(&self, fd: RawFd) {
        let _ = self.record(format!("close {fd}"));
    }
    fn close_range(&self, first: RawFd, last: RawFd) {
        let _ = self.record(format!("close_range {first} {last}"));
    }
    fn read(&self, fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
        self.record(format!("read {fd}"))?;
        let mut by_fd = self.fd_reads.borrow_mut();
        let data = match by_fd.iter().position(|(f, _)| *f == fd) {
            Some(i) => by_fd.remove(i).expect("present").1?,
            None => self.reads.borrow_mut().pop_front().unwrap_or_default(),
        };
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }
    fn write(&self, fd: RawFd, buf: &[u8]) -> SysResult<usize> {
        self.record(format!("write {fd} {buf:?}"))?;
        Ok(buf.len())
    }
    fn kill(&self, pid: Pid, signal: c_int) -> SysResult<()> {
        self.record(format!("kill {pid} {signal}"))
    }
    fn wait_signal(&self, _set: &SigSet) -> SysResult<ReceivedSignal> {
        self.record("wait_signal".into())?;
        Ok(self.signals.borrow_mut().pop_front().expect("scripted signal"))
    }
    fn new_session(&self) -> SysResult<()> {
        self.record("setsid".into())
    }
    fn new_process_group(&self) -> SysResult<()> {
        self.record("setpgid".into())
    }
    fn wait_pid(&self, pid: Pid, nohang: bool) -> SysResult<Option<(Pid, c_int)>> {
        self.record(format!("wait_pid {pid} nohang={nohang}"))?;
        match self.waits.borrow_mut().pop_front() {
            Some(Some((pid, status))) => Ok(Some((Pid::from_raw(pid), status))),
            Some(None) => Ok(None),
            None => Err(Errno::ECHILD),
        }
    }
    fn sigmask(&self, how: SigmaskHow, _set: &SigSet, _old: Option<&mut SigSet>) -> SysResult<()> {
        self.record(format!("sigmask {how:?}"))
    }
    fn exit(&self, code: c_int) -> ! {
        let _ = self.record(format!("exit {code}"));
        std::panic::panic_any(Exited(code))
    }
}

/// `IN|OUT` for a watch's events.
fn events(ready: Ready) -> String {
    let names: Vec<&str> = [(Ready::IN, "IN"), (Ready::OUT, "OUT")]
        .into_iter()
        .filter(|(bit, _)| ready.any(*bit))
        .map(|(_, name)| name)
        .collect();
    names.join("|")
}

fn fake_kinds(path: &Path) -> std::io::Result<HostSource> {
    let kind = if path.extension().is_some() { SourceKind::File } else { SourceKind::Directory };
    // A host symlink the caller resolved: the plan mounts its target.
    let path = if path == Path::new("/lib64") { "/usr/lib64".into() } else { path.to_path_buf() };
    Ok(HostSource { path, kind })
}

fn build_spec() -> SandboxSpec {
    let mut spec = SandboxSpec::new(
        IdMapping::single(0, 0, 1000, 1000),
        vec!["sh".into(), "-c".into(), "make".into()],
    );
    spec.mounts = vec![
        Mount::bind_rw("/home/u/out", "/out"),
        Mount::tmpfs("/tmp"),
        Mount::bind_ro("/usr", "/usr"),
        Mount::bind_ro("/usr/lib/x86_64", "/usr/lib/x86_64"),
        Mount::bind_rw("/home/u/src-copy", "/src"),
        Mount::bind_ro("/etc/resolv.conf", "/etc/resolv.conf"),
        Mount::bind_ro("/lib64", "/lib64"),
    ];
    spec.hostname = Some("pkg".into());
    spec.cwd = "/src".into();
    spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    spec
}

fn plan(spec: &SandboxSpec) -> Plan {
    Plan::new(spec, &fake_kinds).unwrap()
}

fn recorded(steps: &[Step]) -> Recorder {
    let sys = Recorder::default();
    run_steps(&sys, steps).unwrap();
    sys
}

#[test]
fn setup_order_keeps_the_invariants() {
    let sys = recorded(&plan(&build_spec()).steps);
    let calls = sys.calls();
    assert_eq!(calls[0], "umask 022");
    assert_eq!(calls[1], "mount - / - MS_REC | MS_PRIVATE -", "propagation is private first");
    let first_pivot = sys.position("pivot_root /tmp /tmp/oldroot");
    let detach_old = sys.position("umount /oldroot MNT_DETACH");
    let final_pivot = sys.position("pivot_root . .");
    let last_mount =
        calls.iter().rposition(|c| c.starts_with("mount ") || c.starts_with("read-only ")).unwrap();
    assert!(first_pivot < detach_old && last_mount < final_pivot && detach_old < final_pivot);
    // Host paths are only read while the host root is attached…
    let last_host_read = calls.iter().rposition(|c| c.contains(" /oldroot/")).unwrap();
    assert!(last_host_read < detach_old);
    // …and nothing is created inside the new root then, except the
    // top-level /proc and /dev, so image symlinks cannot lead to host files.
    for call in &calls[..detach_old] {
        if call.starts_with("mkdir /newroot") || call.starts_with("touch /newroot") {
            let path = call.split(' ').nth(1).unwrap();
            assert!(path == "/newroot/proc" || path.starts_with("/newroot/dev"), "{call}");
        }
    }
    assert_eq!(calls[final_pivot - 1], "chdir /newroot");
    assert_eq!(calls[final_pivot + 1], "umount . MNT_DETACH", "the staging root is dropped");
    assert_eq!(calls[final_pivot + 2], "chdir /");
    // Every mount after the first pivot targets the new root or staging paths.
    for call in calls[first_pivot..detach_old].iter().filter(|c| c.starts_with("mount ")) {
        let target = call.split(' ').nth(2).unwrap();
        assert!(
            ["/newroot", "/layers/", "/staged/"].iter().any(|p| target.starts_with(p)),
            "{call}"
        );
    }
    // After the final pivot: hostname, loopback, cwd, umask, no_new_privs.
    assert_eq!(
        &calls[final_pivot + 3..],
        [
            "mkdir /src 755",
            "sethostname pkg",
            "loopback_up",
            "chdir /src",
            "umask 022",
            "no_new_privs"
        ]
    );
}

#[test]
fn binds_read_host_paths_through_the_old_root_and_read_only_ones_are_sealed() {
    let sys = recorded(&plan(&build_spec()).steps);
    let calls = sys.calls();
    // Each source is staged from the host root, then bound to its target.
    let staged = |source: &str| {
        let call = &calls[sys.position(&format!("mount /oldroot{source} /staged/"))];
        call.split(' ').nth(2).unwrap().to_string()
    };
    let usr = sys.position(&format!("mount {} /newroot/usr - MS_BIND | MS_REC", staged("/usr")));
    assert_eq!(calls[usr + 1], "read-only /newroot/usr");
    let out =
        sys.position(&format!("mount {} /newroot/out - MS_BIND | MS_REC", staged("/home/u/out")));
    assert!(!calls[out + 1].starts_with("read-only"), "a read-write bind stays writable");
    // The caller resolved the /lib64 symlink: its target is mounted.
    sys.position(&format!("mount {} /newroot/lib64", staged("/usr/lib64")));
    // Parents before children, whatever the spec's order.
    let lib = staged("/usr/lib/x86_64");
    assert!(usr < sys.position(&format!("mount {lib} /newroot/usr/lib/x86_64")));
    // A file source gets a file mount point, staged and in place; its parents are directories.
    let resolv = staged("/etc/resolv.conf");
    assert!(
        sys.position(&format!("touch {resolv}")) < sys.position("mount /oldroot/etc/resolv.conf")
    );
    let etc = sys.position("mkdir /newroot/etc 755");
    assert!(etc < sys.position("touch /newroot/etc/resolv.conf"));
    assert!(
        sys.position("touch /newroot/etc/resolv.conf")
            < sys.position(&format!("mount {resolv} /newroot/etc/resolv.conf"))
    );
}

#[test]
fn files_are_written_in_the_final_root() {
    let mut spec = build_spec();
    spec.files = vec![("/etc/hosts".into(), b"127.0.0.1 localhost\n".to_vec())];
    let sys = recorded(&plan(&spec).steps);
    let staging_gone = sys.position("umount . ");
    let etc = sys.position("mkdir /etc 755");
    let write = sys.position("write /etc/hosts \"127.0.0.1 localhost\\n\"");
    assert!(staging_gone < etc && etc < write);
}

#[test]
fn layer_binds_are_detached_and_read_only_volumes_are_read_only_when_staged() {
    let mut spec = build_spec();
    spec.root = RootFs::Overlay { layers: vec!["/store/base".into()] };
    spec.mounts.push(Mount::bind_ro("/data", "/data"));
    let sys = recorded(&plan(&spec).steps);
    let overlay = sys.position("mount overlay /newroot");
    assert!(overlay < sys.position("umount /layers/0"));
    let calls = sys.calls();
    let staged = calls.iter().position(|c| c.starts_with("mount /oldroot/data /staged/")).unwrap();
    let stage = calls[staged].split_whitespace().nth(2).unwrap();
    let read_only = sys.position(&format!("read-only {stage}"));
    assert!(staged < read_only && read_only < sys.position("umount /oldroot"), "{calls:#?}");
}

#[test]
fn proc_and_dev_are_fresh() {
    let sys = recorded(&plan(&build_spec()).steps);
    sys.position("mount proc /newroot/proc proc MS_NOSUID | MS_NODEV | MS_NOEXEC -");
    sys.position("mount tmpfs /newroot/dev tmpfs MS_NOSUID | MS_NOEXEC mode=0755");
    for device in ["null", "zero", "full", "random", "urandom", "tty"] {
        let touch = sys.position(&format!("touch /newroot/dev/{device}"));
        let bind =
            sys.position(&format!("mount /oldroot/dev/{device} /newroot/dev/{device} - MS_BIND -"));
        assert!(touch < bind);
    }
    sys.position("mount devpts /newroot/dev/pts devpts MS_NOSUID | MS_NOEXEC newinstance,");
    sys.position("mount tmpfs /newroot/dev/shm tmpfs");
    sys.position("symlink /newroot/dev/ptmx -> pts/ptmx");
    sys.position("symlink /newroot/dev/fd -> /proc/self/fd");
}

#[test]
fn overlay_root_stacks_layers_topmost_first_over_a_tmpfs_upper() {
    let mut spec = build_spec();
    spec.root = RootFs::Overlay { layers: vec!["/store/base".into(), "/store/app".into()] };
    let sys = recorded(&plan(&spec).steps);
    let base = sys.position("mount /oldroot/store/base /layers/0 - MS_BIND | MS_REC");
    let app = sys.position("mount /oldroot/store/app /layers/1 - MS_BIND | MS_REC");
    let overlay = sys.position(
        "mount overlay /newroot overlay MS_NOSUID | MS_NODEV \
         lowerdir=/layers/1:/layers/0,upperdir=/upper,workdir=/work",
    );
    assert!(base < overlay && app < overlay);
    assert!(sys.position("mkdir /upper") < overlay && sys.position("mkdir /work") < overlay);
    assert!(overlay < sys.position("mount proc /newroot/proc"));
}

#[test]
fn an_overlay_of_more_layers_than_one_mount_takes_is_refused_not_cut_short() {
    let mut spec = build_spec();
    let layers = |n: usize| (0..n).map(|i| PathBuf::from(format!("/store/{i}"))).collect();
    spec.root = RootFs::Overlay { layers: layers(340) };
    assert!(Plan::new(&spec, &fake_kinds).is_ok());
    spec.root = RootFs::Overlay { layers: layers(400) };
    let err = Plan::new(&spec, &fake_kinds).unwrap_err();
    assert!(err.to_string().contains("400 layers are more than one overlay mount takes"), "{err}");
}

#[test]
fn network_choice_decides_the_namespace_and_loopback() {
    let none = plan(&build_spec());
    assert!(none.unshare_flags.contains(CloneFlags::CLONE_NEWNET));
    assert!(none.steps.contains(&Step::LoopbackUp));
    let mut spec = build_spec();
    spec.network = Network::Host;
    let host = plan(&spec);
    assert!(!host.unshare_flags.contains(CloneFlags::CLONE_NEWNET));
    assert!(!host.steps.contains(&Step::LoopbackUp));
    for plan in [none, host] {
        // Cloned into its user and PID namespaces; unshares the rest itself.
        assert_eq!(plan.clone_flags, CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID);
        for flag in [CloneFlags::CLONE_NEWNS, CloneFlags::CLONE_NEWUTS, CloneFlags::CLONE_NEWIPC] {
            assert!(plan.unshare_flags.contains(flag));
        }
    }
}

#[test]
fn a_failing_step_stops_the_setup_and_names_its_index() {
    let steps = plan(&build_spec()).steps;
    let sys = Recorder { fail: Some(("pivot_root", Errno::EINVAL)), ..Recorder::default() };
    let failure = run_steps(&sys, &steps).unwrap_err();
    assert_eq!(failure.errno, Errno::EINVAL);
    assert!(matches!(steps[failure.index], Step::PivotRoot { .. }));
    assert!(sys.calls().last().unwrap().starts_with("pivot_root"), "nothing runs after a failure");
    // An existing directory is not a failure.
    let sys = Recorder { fail: Some(("mkdir", Errno::EEXIST)), ..Recorder::default() };
    run_steps(&sys, &steps).unwrap();
}

#[test]
fn invalid_specs_are_refused_before_anything_runs() {
    let refuse = |edit: &dyn Fn(&mut SandboxSpec)| {
        let mut spec = build_spec();
        edit(&mut spec);
        match Plan::new(&spec, &fake_kinds) {
            Err(SandboxError::InvalidSpec(msg)) => msg,
            other => panic!("accepted: {other:?}"),
        }
    };
    assert!(refuse(&|s| s.mounts.push(Mount::tmpfs("relative"))).contains("not an absolute path"));
    assert!(refuse(&|s| s.mounts.push(Mount::bind_ro("/usr", "/a/../../etc"))).contains("`..`"));
    assert!(refuse(&|s| s.mounts.push(Mount::bind_ro("usr", "/usr"))).contains("mount source"));
    assert!(refuse(&|s| s.argv.clear()).contains("empty"));
    assert!(refuse(&|s| s.env.push(("A=B".into(), "c".into()))).contains("`A=B`"));
    assert!(refuse(&|s| s.env.push(("A".into(), "c\0".into()))).contains("NUL"));
    assert!(
        refuse(&|s| s.root = RootFs::Overlay { layers: vec![] }).contains("at least one layer")
    );
}

#[test]
fn bare_program_names_are_searched_in_the_given_path() {
    let p = plan(&build_spec());
    let candidates: Vec<String> = p.exec.candidates.iter().map(|c| text(c)).collect();
    assert_eq!(candidates, ["/usr/bin/sh", "/bin/sh"]);
    let mut spec = build_spec();
    spec.env.clear();
    spec.argv = vec!["./configure".into()];
    let p = plan(&spec);
    assert_eq!(p.exec.candidates.len(), 1);
    assert_eq!(text(&p.exec.candidates[0]), "./configure");
}

#[test]
fn exec_goes_on_after_enoent_remembers_eacces_and_stops_at_other_errors() {
    let mut spec = build_spec();
    spec.env = vec![("PATH".into(), "/a:/b:/c".into())];
    let p = plan(&spec);
    let sys = Recorder { exec_errors: vec![("/b/sh", Errno::EACCES)], ..Recorder::default() };
    assert_eq!(launcher::exec_first(&sys, &p.exec), Errno::EACCES);
    assert_eq!(sys.calls().len(), 3);
    let sys = Recorder { exec_errors: vec![("/a/sh", Errno::ENOEXEC)], ..Recorder::default() };
    assert_eq!(launcher::exec_first(&sys, &p.exec), Errno::ENOEXEC);
    assert_eq!(sys.calls().len(), 1);
    assert_eq!(launcher::exec_first(&Recorder::default(), &p.exec), Errno::ENOENT);
}

#[test]
fn workload_switches_user_then_redirects_stdio_then_resets_signals() {
    let mut spec = build_spec();
    spec.user = Some((65532, 65532));
    spec.new_session = true;
    let p = plan(&spec);
    let sys = Recorder::default();
    launcher::prepare_workload(&sys, &p.exec, [Some(10), None, Some(12)], None).unwrap();
    assert_eq!(
        sys.calls(),
        [
            "setsid",
            "credentials 65532:65532 groups=None",
            "dup2 10 0",
            "dup2 12 2",
            "cloexec_from 3",
            "reset_signal_handlers",
            "sigmask SIG_SETMASK"
        ]
    );
}

fn run_launcher(sys: &Recorder, plan: &Plan) -> c_int {
    run_launcher_with(sys, plan, [Some(10), None, Some(12)], None)
}

fn run_launcher_with(
    sys: &Recorder,
    plan: &Plan,
    stdio: [Option<RawFd>; 3],
    terminal: Option<WindowSize>,
) -> c_int {
    let signals = launcher_signals();
    let launch = Launch {
        plan,
        channel: LauncherEnd { from_caller: 100, to_caller: 101 },
        stdio,
        setup_only: false,
        signals: &signals,
        terminal,
    };
    let result = catch_unwind(AssertUnwindSafe(|| launcher::launcher_main(sys, &launch)));
    match result {
        Err(payload) => payload.downcast::<Exited>().expect("the launcher only ends by exit").0,
    }
}

#[test]
fn launcher_waits_for_the_mapping_sets_up_then_supervises_as_pid_1() {
    let p = plan(&build_spec());
    let sys = Recorder::default();
    sys.reads.borrow_mut().extend([vec![1u8], vec![]]); // mapping ack, then exec EOF
    sys.signals.borrow_mut().extend([
        by_kill(15),
        by_kill(libc_sigchld()),
        by_kill(libc_sigchld()),
    ]);
    // An orphan (pid 7) is reaped first; the workload (pid 2) exits 3 later.
    sys.waits.borrow_mut().extend([Some((7, 0)), None, Some((2, 3 << 8))]);
    assert_eq!(run_launcher(&sys, &p), 3);
    let calls = sys.calls();
    assert_eq!(
        &calls[..8],
        [
            "close_range 3 9",
            "close_range 11 11",
            "close_range 13 99",
            "close_range 102 2147483647",
            "reset_signal_handlers",
            "kill_with_parent",
            "unshare CloneFlags(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)",
            "read 100"
        ]
    );
    assert!(sys.position("read 100") < sys.position("mount "), "no setup before the mapping");
    assert!(sys.position("no_new_privs") < sys.position("clone"));
    // The launcher keeps no copy of the workload's stdio once it runs, nor
    // of its own fds 0–2 (the caller's). Those the workload gets from
    // elsewhere (0 and 2 here) are closed before the fork, so not even a
    // quick workload finds them in `/proc/1/fd`; the inherited one after.
    assert!(sys.position("clone") < sys.position("close 10"));
    assert!(sys.position("close 12") < sys.position("wait_signal"));
    for fd in ["close 0", "close 2"] {
        assert!(sys.position("pipe") < sys.position(fd), "{fd} after the last open");
        assert!(sys.position(fd) < sys.position("clone"), "{fd}");
    }
    assert!(sys.position("clone") < sys.position("close 1"));
    assert!(sys.position("close 1") < sys.position("wait_signal"));
    for fd in ["close 0", "close 1", "close 2"] {
        assert_eq!(calls.iter().filter(|c| *c == fd).count(), 1, "{fd} once");
    }
    assert_eq!(sys.position("kill 2 15"), sys.position("wait_signal") + 1, "SIGTERM is forwarded");
    // Started, then Exited with the raw status.
    let started = sys.position("write 101 [1, 0, 0, 0");
    let exited = sys.position("write 101 [4, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0]");
    assert!(started < exited);
    assert_eq!(calls.last().unwrap(), "exit 3");
}

#[test]
fn launcher_reports_a_failed_unshare_once_the_maps_are_written() {
    let p = plan(&build_spec());
    let sys = Recorder { fail: Some(("unshare", Errno::ENOSPC)), ..Recorder::default() };
    sys.reads.borrow_mut().push_back(vec![1]);
    assert_eq!(run_launcher(&sys, &p), 125);
    let calls = sys.calls();
    // Step 0x8000_0007 (Unshare), errno 28 (ENOSPC), after the mapping ack.
    let report = sys.position("write 101 [2, 0, 0, 0, 7, 0, 0, 128, 28, 0, 0, 0]");
    assert!(sys.position("read 100") < report);
    assert!(!calls.iter().any(|c| c.starts_with("mount")));
}

#[test]
fn launcher_exits_without_setup_when_the_caller_gives_up() {
    let p = plan(&build_spec());
    let sys = Recorder::default(); // the read sees EOF
    assert_eq!(run_launcher(&sys, &p), 125);
    assert!(!sys.calls().iter().any(|c| c.starts_with("mount")));
}

#[test]
fn launcher_reports_a_failed_step_and_stops() {
    let p = plan(&build_spec());
    let sys = Recorder { fail: Some(("pivot_root", Errno::EPERM)), ..Recorder::default() };
    sys.reads.borrow_mut().push_back(vec![1]);
    assert_eq!(run_launcher(&sys, &p), 125);
    let index = p.steps.iter().position(|s| matches!(s, Step::PivotRoot { .. })).unwrap() as u8;
    let calls = sys.calls();
    assert_eq!(
        calls[calls.len() - 2],
        format!("write 101 [2, 0, 0, 0, {index}, 0, 0, 0, 1, 0, 0, 0]")
    );
    assert!(!calls.iter().any(|c| c.starts_with("clone")));
}

#[test]
fn launcher_exit_code_is_128_plus_signal() {
    assert_eq!(launcher::exit_code(9), 137);
    assert_eq!(launcher::exit_code(42 << 8), 42);
}

#[test]
fn the_launcher_keeps_only_its_channel_and_the_workload_stdio() {
    let sys = Recorder::default();
    launcher::close_other_fds(&sys, [7, 4, 0, 8, 2]);
    assert_eq!(sys.calls(), ["close_range 3 3", "close_range 5 6", "close_range 9 2147483647"]);
    let sys = Recorder::default();
    launcher::close_other_fds(&sys, [3, 4, 0, 0, 0]);
    assert_eq!(sys.calls(), ["close_range 5 2147483647"]);
}

fn by_kill(signal: c_int) -> ReceivedSignal {
    ReceivedSignal { signal, from_kernel: false }
}

#[test]
fn terminal_signals_reach_a_workload_in_the_same_session_only_once() {
    let tty_sigint = ReceivedSignal { signal: 2, from_kernel: true };
    for own_session in [false, true] {
        let sys = Recorder::default();
        sys.signals.borrow_mut().extend([tty_sigint, by_kill(10), by_kill(libc_sigchld())]);
        sys.waits.borrow_mut().push_back(Some((2, 0)));
        let signals = launcher_signals();
        assert_eq!(launcher::supervise(&sys, Pid::from_raw(2), &signals, own_session), 0);
        let kills: Vec<String> =
            sys.calls().into_iter().filter(|c| c.starts_with("kill")).collect();
        if own_session {
            assert_eq!(kills, ["kill 2 2", "kill 2 10"]);
        } else {
            assert_eq!(kills, ["kill 2 10"], "the terminal already sent SIGINT to the workload");
        }
    }
}

fn libc_sigchld() -> c_int {
    nix::sys::signal::Signal::SIGCHLD as c_int
}

fn fuse_spec() -> SandboxSpec {
    let mut spec = build_spec();
    let layers = vec!["/store/base".into(), "/store/app".into()];
    spec.root = RootFs::FuseOverlay { layers, program: "/usr/bin/fuse-overlayfs".into() };
    spec
}

fn fuse_step(plan: &Plan) -> &fuse::FuseOverlay {
    plan.steps
        .iter()
        .find_map(|s| match s {
            Step::FuseOverlay(fuse) => Some(&**fuse),
            _ => None,
        })
        .expect("a fuse-overlayfs step")
}

/// Runs a function that ends its process, returning the exit code.
fn exit_code_of(f: impl FnOnce()) -> c_int {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("the process ends by exit");
    payload.downcast::<Exited>().expect("only by exit").0
}

#[test]
fn fuse_overlay_root_reads_read_only_layer_binds_and_mounts_no_kernel_overlay() {
    let plan = plan(&fuse_spec());
    let sys = Recorder::default();
    sys.waits.borrow_mut().push_back(Some((2, 0))); // the helper exits 0
    run_steps(&sys, &plan.steps).unwrap();
    for (i, layer) in ["base", "app"].iter().enumerate() {
        let bind = sys.position(&format!("mount /oldroot/store/{layer} /layers/{i} - MS_BIND"));
        assert!(bind < sys.position(&format!("read-only /layers/{i}")));
    }
    let open = sys.position("open /oldroot/dev/fuse");
    assert!(sys.position("read-only /layers/1") < open);
    assert!(sys.position("mkdir /upper") < open && sys.position("mkdir /work") < open);
    assert!(sys.position("wait_pid 2 nohang=false") < sys.position("umount /layers/0"));
    assert!(!sys.calls().iter().any(|c| c.starts_with("mount overlay")));
    let argv: Vec<String> = fuse_step(&plan).argv.strings().iter().map(|a| text(a)).collect();
    assert_eq!(
        argv,
        [
            "fuse-overlayfs",
            "-f",
            "-o",
            "lowerdir=/tmp/layers/1:/tmp/layers/0,upperdir=/tmp/upper,workdir=/tmp/work",
            "/dev/fd/3"
        ]
    );
}

#[test]
fn fuse_overlay_is_mounted_by_the_launcher_and_served_from_a_helper_namespace() {
    let plan = plan(&fuse_spec());
    let fuse = fuse_step(&plan);
    let sys = Recorder::default();
    sys.waits.borrow_mut().push_back(Some((2, 0)));
    fuse::start(&sys, fuse).unwrap();
    assert_eq!(
        sys.calls(),
        [
            "open /oldroot/dev/fuse",
            "mount fuse-overlayfs /newroot fuse.fuse-overlayfs MS_NOSUID | MS_NODEV \
             fd=7,rootmode=40000,user_id=1000,group_id=1001,default_permissions,allow_other",
            "clone CloneFlags(CLONE_NEWNS)",
            "close 7",
            "wait_pid 2 nohang=false",
        ]
    );
    // The helper's errno is the step's.
    let sys = Recorder::default();
    sys.waits.borrow_mut().push_back(Some((2, (Errno::ENOTCONN as c_int) << 8)));
    assert_eq!(fuse::start(&sys, fuse), Err(Errno::ENOTCONN));
    // A failed mount closes the device and clones nothing.
    let sys = Recorder { fail: Some(("mount", Errno::EPERM)), ..Recorder::default() };
    assert_eq!(fuse::start(&sys, fuse), Err(Errno::EPERM));
    assert_eq!(sys.calls()[2..], ["close 7"]);
}

#[test]
fn fuse_overlay_helper_takes_the_host_away_from_the_daemon_once_it_serves() {
    let plan = plan(&fuse_spec());
    let fuse = fuse_step(&plan);
    let sys = Recorder::default();
    assert_eq!(exit_code_of(|| fuse::helper_main(&sys, fuse, 7)), 0);
    assert_eq!(
        sys.calls(),
        [
            "pivot_root /oldroot /oldroot/tmp",
            "chdir /",
            "mkdir /tmp/proc 755",
            "mount proc /tmp/proc proc MS_NOSUID | MS_NODEV | MS_NOEXEC -",
            "clone CloneFlags(0x0)",
            "close 7",
            "statfs /tmp/newroot",
            "umount /tmp/newroot MNT_DETACH",
            "umount /tmp/layers/0 MNT_DETACH",
            "umount /tmp/layers/1 MNT_DETACH",
            "pivot_root /tmp /tmp/oldroot",
            "umount /oldroot MNT_DETACH",
            "exit 0",
        ]
    );
    // A daemon that died before serving: the helper exits with the errno.
    let sys = Recorder { fail: Some(("statfs", Errno::ENOTCONN)), ..Recorder::default() };
    assert_eq!(exit_code_of(|| fuse::helper_main(&sys, fuse, 7)), Errno::ENOTCONN as c_int);
    assert!(!sys.calls().iter().any(|c| c.starts_with("pivot_root /tmp")));
}

#[test]
fn fuse_overlay_daemon_gets_the_device_at_fd_3_and_nothing_else() {
    let plan = plan(&fuse_spec());
    let fuse = fuse_step(&plan);
    let sys = Recorder::default();
    assert_eq!(exit_code_of(|| fuse::daemon_main(&sys, fuse, 7)), 127);
    let calls = sys.calls();
    assert_eq!(
        calls[..10],
        [
            "setsid",
            "dup2 7 3",
            "open /dev/null",
            "dup2 9 0",
            "dup2 9 1",
            "dup2 9 2",
            "close_range 4 2147483647",
            "reset_signal_handlers",
            "sigmask SIG_SETMASK",
            "execve /usr/bin/fuse-overlayfs [\"fuse-overlayfs\", \"-f\", \"-o\", \
             \"lowerdir=/tmp/layers/1:/tmp/layers/0,upperdir=/tmp/upper,workdir=/tmp/work\", \
             \"/dev/fd/3\"] []",
        ]
    );
    assert_eq!(calls[10], "exit 127");
}

fn terminal_spec() -> SandboxSpec {
    let mut spec = build_spec();
    let host = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    spec.terminal = Some(Terminal { host, forward_input: true });
    spec
}

#[test]
fn a_terminal_is_opened_after_the_setup_and_its_master_goes_to_the_caller() {
    let p = plan(&terminal_spec());
    assert!(p.exec.new_session, "a terminal's workload leads a session of its own");
    let sys = Recorder::default();
    sys.reads.borrow_mut().extend([vec![1u8], vec![]]); // mapping ack, then exec EOF
    sys.signals.borrow_mut().push_back(by_kill(libc_sigchld()));
    sys.waits.borrow_mut().push_back(Some((2, 0)));
    let size = WindowSize { rows: 33, cols: 77 };
    assert_eq!(run_launcher_with(&sys, &p, [Some(10), Some(11), Some(12)], Some(size)), 0);
    let calls = sys.calls();
    // PID 1 lets go of the caller's terminal first: its fds 0-2 are /dev/null.
    let reset = sys.position("reset_signal_handlers");
    assert_eq!(calls[reset + 1..reset + 4], ["dup2 10 0", "dup2 11 1", "dup2 12 2"]);
    // The sandbox's own devpts, once mounted and the setup is done.
    let open = sys.position("open_terminal /dev/pts/ptmx 33x77");
    assert!(sys.position("mount devpts") < open && sys.position("no_new_privs") < open);
    assert!(open < sys.position("clone"));
    // The launcher keeps neither end: the slave goes before the workload
    // runs, the master (20) with the Started report.
    let started = sys.position("send 101 [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] with fd 20");
    assert!(sys.position("close 21") < started);
    assert_eq!(calls[started + 1], "close 20");
    assert!(started < sys.position("wait_signal"));
}

#[test]
fn a_terminal_that_cannot_be_opened_is_a_reported_setup_failure() {
    let p = plan(&terminal_spec());
    let sys = Recorder { fail: Some(("open_terminal", Errno::ENOSPC)), ..Recorder::default() };
    sys.reads.borrow_mut().push_back(vec![1]);
    let size = WindowSize { rows: 24, cols: 80 };
    assert_eq!(run_launcher_with(&sys, &p, [Some(10), Some(11), Some(12)], Some(size)), 125);
    // Step 0x8000_0008 (OpenTerminal), errno 28 (ENOSPC); no workload.
    sys.position("write 101 [2, 0, 0, 0, 8, 0, 0, 128, 28, 0, 0, 0]");
    assert!(!sys.calls().iter().any(|c| c.starts_with("clone")));
}

#[test]
fn the_workload_leads_a_session_whose_controlling_terminal_is_its_stdio() {
    let p = plan(&terminal_spec());
    let sys = Recorder::default();
    launcher::prepare_workload(&sys, &p.exec, [Some(21); 3], Some(21)).unwrap();
    assert_eq!(
        sys.calls(),
        [
            "setsid",
            "controlling_terminal 21",
            "dup2 21 0",
            "dup2 21 1",
            "dup2 21 2",
            "cloexec_from 3",
            "reset_signal_handlers",
            "sigmask SIG_SETMASK"
        ]
    );
}

const MASTER: RawFd = 20;
const INPUT: RawFd = 0;
const OUTPUT: RawFd = 1;
const RESIZED: RawFd = 30;

fn ends() -> terminal::Ends {
    terminal::Ends {
        master: MASTER,
        input: Some(INPUT),
        output: Some(OUTPUT),
        host: INPUT,
        resized: Some(RESIZED),
    }
}

/// A recorder answering the relay's reads and polls as scripted.
fn relay_recorder(
    reads: Vec<(RawFd, Result<&[u8], Errno>)>,
    polls: Vec<Vec<(RawFd, Ready)>>,
) -> Recorder {
    let sys = Recorder { size: WindowSize { rows: 50, cols: 120 }, ..Recorder::default() };
    sys.fd_reads.borrow_mut().extend(reads.into_iter().map(|(fd, r)| (fd, r.map(<[u8]>::to_vec))));
    sys.polls.borrow_mut().extend(polls);
    sys
}

#[test]
fn the_relay_forwards_both_ways_follows_resizes_and_drains_until_eio() {
    let sys = relay_recorder(
        vec![
            (MASTER, Ok(b"out")),
            (RESIZED, Ok(&[1, 1])),
            (INPUT, Ok(b"typed")),
            (MASTER, Ok(b"last")), // hung up: what the workload wrote before
            (MASTER, Err(Errno::EIO)),
        ],
        vec![
            vec![(MASTER, Ready::IN)],
            vec![(RESIZED, Ready::IN), (INPUT, Ready::IN)],
            vec![(MASTER, Ready::OUT)],
            vec![(MASTER, Ready::DONE)],
            vec![(MASTER, Ready::DONE)],
        ],
    );
    terminal::relay(&sys, ends()).unwrap();
    assert_eq!(
        sys.calls(),
        [
            // The size may have changed before anything watched for it.
            "window_size 0",
            "set_window_size 20 50x120",
            "poll 20:IN 30:IN 0:IN",
            "read 20",
            "write 1 [111, 117, 116]",
            "poll 20:IN 30:IN 0:IN",
            "read 30",
            "window_size 0",
            "set_window_size 20 50x120",
            "read 0",
            // Input pending: the master is watched for room, input is not.
            "poll 20:IN|OUT 30:IN",
            "write 20 [116, 121, 112, 101, 100]",
            "poll 20:IN 30:IN 0:IN",
            "read 20",
            "write 1 [108, 97, 115, 116]",
            "poll 20:IN 30:IN 0:IN",
            "read 20",
        ]
    );
}

#[test]
fn the_relay_drains_output_nobody_takes_and_stops_forwarding_at_eof() {
    // The caller's stdout is a closed pipe and its input ends: the relay
    // still reads the master to the end, so the workload never blocks.
    let sys = relay_recorder(
        vec![(INPUT, Ok(b"")), (MASTER, Ok(b"a")), (MASTER, Ok(b"b")), (MASTER, Ok(b""))],
        vec![
            vec![(INPUT, Ready::DONE)],
            vec![(MASTER, Ready::IN)],
            vec![(MASTER, Ready::IN)],
            vec![(MASTER, Ready::IN)],
        ],
    );
    let sys = Recorder { fail: Some(("write 1", Errno::EPIPE)), ..sys };
    terminal::relay(&sys, ends()).unwrap();
    let calls = sys.calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("write 1")).count(), 1, "{calls:#?}");
    assert_eq!(calls.iter().filter(|c| *c == "poll 20:IN 30:IN").count(), 3, "{calls:#?}");
    assert_eq!(calls.last().unwrap(), "read 20");
}

#[test]
fn raw_mode_ends_with_its_guard() {
    let sys = Recorder::default();
    let raw = terminal::RawMode::enter(&sys, 0).unwrap();
    assert_eq!(sys.calls(), ["make_raw 0"]);
    drop(raw);
    assert_eq!(sys.calls(), ["make_raw 0", "restore_mode 0"]);
}
