//! The sandbox, called as a library from this (multi-threaded) test process,
//! with host programs (/bin/sh, /bin/cat, …) bind-mounted read-only.
//!
//! Tests that need an unprivileged user run through `rootless_test!`; a few
//! run plainly too, as root in CI, where the sandbox must behave the same.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use pkg::sandbox::{
    ExecFailure, ExitStatus, IdMapping, Mount, Network, RootFs, Sandbox, SandboxError, SandboxSpec,
    Stdio, StdioSource, probe, subordinate_range,
};

/// The caller's uid and gid, from /proc (the library reads no ids itself).
fn caller_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

fn build_mapping() -> IdMapping {
    let (uid, gid) = caller_ids();
    IdMapping::single(0, 0, uid, gid)
}

/// A build-like spec: host toolchain directories read-only, tmpfs /tmp,
/// running `sh -c SCRIPT`, stdout and stderr into `log`.
fn sh_spec(script: &str, log: &Path) -> SandboxSpec {
    let argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let mut spec = SandboxSpec::new(build_mapping(), argv);
    for dir in ["/usr", "/bin", "/lib", "/lib64", "/sbin"] {
        // On merged-/usr hosts /bin, /lib… are symlinks into /usr: the
        // sandbox binds what they resolve to.
        if Path::new(dir).exists() {
            spec.mounts.push(Mount::bind_ro(dir, dir));
        }
    }
    spec.mounts.push(Mount::tmpfs("/tmp"));
    spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    spec.stdio = Stdio::log_to(OwnedFd::from(File::create(log).unwrap())).unwrap();
    spec
}

fn run(spec: &SandboxSpec) -> Result<ExitStatus, SandboxError> {
    Sandbox::new().run(spec)
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn log(&self) -> PathBuf {
        self.path("log")
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
    fn spec(&self, script: &str) -> SandboxSpec {
        sh_spec(script, &self.log())
    }
    fn run_ok(&self, script: &str) -> String {
        let status = run(&self.spec(script)).unwrap();
        assert_eq!(status, ExitStatus::Exited(0), "log:\n{}", self.log_text());
        self.log_text()
    }
}

crate::rootless_test! {
    fn sandbox_exit_code_passes_through() {
        let case = Case::new();
        assert_eq!(run(&case.spec("exit 3")).unwrap(), ExitStatus::Exited(3));
        assert_eq!(run(&case.spec("exit 3")).unwrap().code(), 3);
    }
}

crate::rootless_test! {
    fn sandbox_signal_death_is_128_plus_n() {
        let case = Case::new();
        let status = run(&case.spec("kill -TERM $$; sleep 5")).unwrap();
        assert_eq!(status, ExitStatus::Signaled(15));
        assert_eq!(status.code(), 143);
    }
}

crate::rootless_test! {
    fn sandbox_runs_as_root_inside_with_caller_mapped() {
        let case = Case::new();
        let out = case.run_ok("id -u; id -g; cat /proc/self/uid_map; hostname");
        let (uid, _) = caller_ids();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "0");
        assert_eq!(lines[1], "0");
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["0", &uid.to_string(), "1"]);
    }
}

crate::rootless_test! {
    fn sandbox_missing_program_is_127_not_found() {
        let case = Case::new();
        let mut spec = case.spec("");
        spec.argv = vec!["no-such-program".into()];
        let err = run(&spec).unwrap_err();
        assert!(
            matches!(err, SandboxError::Exec { failure: ExecFailure::NotFound, .. }),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), 127);
        assert_eq!(err.to_string(), "cannot execute `no-such-program`: not found");
        spec.argv = vec!["/no/such/path".into()];
        assert_eq!(run(&spec).unwrap_err().exit_code(), 127);
    }
}

crate::rootless_test! {
    fn sandbox_non_executable_program_is_126() {
        let case = Case::new();
        std::fs::create_dir(case.path("bin")).unwrap();
        std::fs::write(case.path("bin/script"), "#!/bin/sh\necho hi\n").unwrap();
        let mut spec = case.spec("");
        spec.mounts.push(Mount::bind_ro(case.path("bin"), "/opt/bin"));
        spec.argv = vec!["/opt/bin/script".into()];
        let err = run(&spec).unwrap_err();
        assert!(
            matches!(err, SandboxError::Exec { failure: ExecFailure::CannotExecute, .. }),
            "{err:?}"
        );
        assert_eq!(err.exit_code(), 126);
        // A PATH search that finds it non-executable says so too (not 127).
        spec.env = vec![("PATH".into(), "/nowhere:/opt/bin".into())];
        spec.argv = vec!["script".into()];
        assert_eq!(run(&spec).unwrap_err().exit_code(), 126);
    }
}

crate::rootless_test! {
    fn sandbox_environment_is_exactly_the_given_one() {
        let case = Case::new();
        let mut spec = case.spec("");
        spec.argv = vec!["env".into()];
        spec.env = vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("TZ".into(), "UTC".into()),
            ("EMPTY".into(), String::new()),
        ];
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0));
        assert_eq!(case.log_text(), "PATH=/usr/bin:/bin\nTZ=UTC\nEMPTY=\n");
    }
}

/// The shell's own pid, then the numeric entries of the sandbox's /proc,
/// listed with builtins only so no other process exists meanwhile.
const PROC_SCRIPT: &str = "echo $$; for p in /proc/[0-9]*; do printf '%s ' ${p#/proc/}; done";

fn check_proc_isolation(out: &str) {
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"), "the workload is PID 2, after the launcher:\n{out}");
    let pids: Vec<u32> =
        lines.next().unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids, [1, 2], "only the launcher and the workload, no host pid: {out}");
}

crate::rootless_test! {
    fn sandbox_proc_shows_only_the_sandbox() {
        let case = Case::new();
        check_proc_isolation(&case.run_ok(PROC_SCRIPT));
    }
}

#[test]
fn sandbox_proc_shows_only_the_sandbox_as_root() {
    let case = Case::new();
    check_proc_isolation(&case.run_ok(PROC_SCRIPT));
}

/// A bash connection attempt to `port` on 127.0.0.1, printing the outcome.
fn connect_script(port: u16) -> String {
    format!(
        "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; \
         if bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; then echo connected; \
         else echo refused; fi"
    )
}

crate::rootless_test! {
    fn sandbox_network_none_reaches_nothing_but_lo() {
        let case = Case::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();

        let out = case.run_ok(&connect_script(port));
        assert_eq!(out, "lo\nrefused\n");
        assert!(listener.accept().is_err(), "the sandbox reached the host listener");

        // The same probe with the host network does connect: the test can fail.
        let mut spec = case.spec(&connect_script(port));
        spec.network = Network::Host;
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0));
        assert!(case.log_text().ends_with("connected\n"), "{}", case.log_text());
    }
}

crate::rootless_test! {
    fn sandbox_writes_outside_writable_mounts_never_reach_the_host() {
        let case = Case::new();
        let host_dir = case.path("host");
        std::fs::create_dir(&host_dir).unwrap();
        let leak = host_dir.join("leak");
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        let home_marker = home.join("pkg-sandbox-leak");
        let script = format!(
            "mkdir -p {host} && echo x > {leak}; mkdir -p {home} && echo x > {home_marker}; \
             if touch /usr/pkg-sandbox-leak 2>/dev/null; then echo usr-writable; fi; cat {leak}",
            host = host_dir.display(),
            leak = leak.display(),
            home = home.display(),
            home_marker = home_marker.display(),
        );
        // Inside, the writes land in the sandbox's tmpfs root and are readable…
        assert_eq!(case.run_ok(&script), "x\n");
        // …but none of them exists on the host.
        assert!(!leak.exists());
        assert!(!home_marker.exists());
        assert!(!Path::new("/usr/pkg-sandbox-leak").exists());
    }
}

crate::rootless_test! {
    fn sandbox_read_write_bind_keeps_its_writes() {
        let case = Case::new();
        let out = case.path("out");
        std::fs::create_dir(&out).unwrap();
        let mut spec = case.spec("mkdir -p /out/usr/bin && echo built > /out/usr/bin/hello && cat /out/usr/bin/hello");
        spec.mounts.push(Mount::bind_rw(&out, "/out"));
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(std::fs::read_to_string(out.join("usr/bin/hello")).unwrap(), "built\n");
        // A read-only bind of the same directory refuses writes.
        let mut spec = case.spec("echo again > /out/usr/bin/hello");
        spec.mounts.push(Mount::bind_ro(&out, "/out"));
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(2), "{}", case.log_text());
        assert!(case.log_text().contains("Read-only file system"), "{}", case.log_text());
        assert_eq!(std::fs::read_to_string(out.join("usr/bin/hello")).unwrap(), "built\n");
    }
}

/// Polls (bounded) until `path` exists.
fn wait_for_file(path: &Path) -> bool {
    for _ in 0..1200 {
        if path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    false
}

crate::rootless_test! {
    fn sandbox_sigterm_to_the_launcher_reaches_the_workload() {
        let case = Case::new();
        let out = case.path("out");
        std::fs::create_dir(&out).unwrap();
        let mut spec = case.spec(
            "trap 'echo term > /out/marker; exit 0' TERM; echo > /out/ready; \
             i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 9",
        );
        spec.mounts.push(Mount::bind_rw(&out, "/out"));
        let running = Sandbox::new().spawn(&spec).unwrap();
        assert!(wait_for_file(&out.join("ready")), "the workload never got ready");
        let pid = nix::unistd::Pid::from_raw(running.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(running.wait().unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(std::fs::read_to_string(out.join("marker")).unwrap(), "term\n");
    }
}

crate::rootless_test! {
    fn sandbox_reaps_orphans_and_leaves_no_process_behind() {
        let case = Case::new();
        let token = format!("pkg-orphan-{}", std::process::id());
        // `( … & )` orphans its child onto PID 1. The first orphan exits at
        // once and must be reaped (no zombie left in /proc); the second lives
        // on and must be gone once the run returns.
        let script = format!(
            "( /bin/true & ); ( sh -c 'sleep 1000; :' {token} & ); \
             i=0; while [ $i -lt 200 ]; do \
               if ! grep -q ') Z' /proc/[0-9]*/stat 2>/dev/null; then echo reaped; exit 0; fi; \
               sleep 0.05; i=$((i+1)); \
             done; echo zombie; exit 1"
        );
        assert_eq!(case.run_ok(&script), "reaped\n");
        let leftovers: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .filter(|c| c.contains(&token))
            .collect();
        assert!(leftovers.is_empty(), "sandbox processes survived: {leftovers:?}");
    }
}

crate::rootless_test! {
    fn sandbox_overlay_root_keeps_the_lower_layers_untouched() {
        let case = Case::new();
        let base = case.path("base");
        let top = case.path("top");
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(base.join("etc/os-release"), "base\n").unwrap();
        std::fs::write(base.join("etc/shadowed"), "base\n").unwrap();
        std::fs::write(top.join("etc/shadowed"), "top\n").unwrap();
        let mut spec = case.spec(
            "cat /etc/os-release /etc/shadowed; echo changed > /etc/os-release; \
             echo new > /etc/new; rm /etc/shadowed; cat /etc/os-release /etc/new",
        );
        spec.root = RootFs::Overlay { layers: vec![base.clone(), top.clone()] };
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(case.log_text(), "base\ntop\nchanged\nnew\n");
        assert_eq!(std::fs::read_to_string(base.join("etc/os-release")).unwrap(), "base\n");
        assert_eq!(std::fs::read_to_string(top.join("etc/shadowed")).unwrap(), "top\n");
        assert!(!base.join("etc/new").exists() && !top.join("etc/new").exists());
        // Mount points for /usr, /proc, … went to the tmpfs upper layer only.
        assert!(!base.join("usr").exists() && !top.join("proc").exists());
    }
}

crate::rootless_test! {
    fn sandbox_dev_is_minimal_and_works() {
        let case = Case::new();
        let out = case.run_ok(
            "ls /dev | tr '\\n' ' '; echo; echo x > /dev/null; head -c 5 /dev/urandom | wc -c; \
             head -c 3 /dev/zero | od -An -tx1",
        );
        assert_eq!(
            out,
            "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \n5\n 00 00 00\n"
        );
    }
}

crate::rootless_test! {
    fn sandbox_sets_hostname_cwd_and_umask() {
        let case = Case::new();
        let mut spec = case.spec("cat /proc/sys/kernel/hostname; pwd; umask; grep NoNewPrivs /proc/self/status");
        spec.hostname = Some("pkg-build".into());
        spec.cwd = "/src/pkg".into();
        spec.umask = 0o027;
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(case.log_text(), "pkg-build\n/src/pkg\n0027\nNoNewPrivs:\t1\n");
    }
}

crate::rootless_test! {
    fn sandbox_setup_failure_is_a_typed_error_naming_the_step() {
        let case = Case::new();
        std::fs::write(case.path("not-a-dir"), "").unwrap();
        let mut spec = case.spec("exit 0");
        spec.root = RootFs::Overlay { layers: vec![case.path("not-a-dir")] };
        let err = run(&spec).unwrap_err();
        assert_eq!(err.exit_code(), 125);
        let SandboxError::Setup { step, .. } = &err else { panic!("{err:?}") };
        assert!(step.starts_with("mount /oldroot/") && step.ends_with("on /layers/0 (bind,rec)"), "{step}");

        let mut spec = case.spec("exit 0");
        spec.mounts.push(Mount::bind_ro(case.path("missing"), "/missing"));
        assert!(matches!(run(&spec).unwrap_err(), SandboxError::MountSource { .. }));
    }
}

#[test]
fn sandbox_exit_code_and_environment_as_root() {
    let case = Case::new();
    let mut spec = case.spec("");
    spec.argv = vec!["env".into()];
    spec.env = vec![("A".into(), "1".into())];
    // No PATH given: `env` is found through the default PATH.
    assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0));
    assert_eq!(case.log_text(), "A=1\n");
    assert_eq!(run(&case.spec("exit 7")).unwrap(), ExitStatus::Exited(7));
}

/// The test user's name, for /etc/subuid.
fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == uid.to_string())
        .map(|f| f[0].to_string())
        .unwrap()
}

/// `threads` threads running `work` over and over until dropped, to make
/// this process busy in some way while sandboxes are cloned from it.
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(threads: usize, work: fn()) -> Busy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        work();
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The caller at 0 and the range `/etc/subuid` and `/etc/subgid` grant it above.
fn full_range_mapping() -> IdMapping {
    let (uid, gid) = caller_ids();
    let name = user_name(uid);
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap();
    let subgid = std::fs::read_to_string("/etc/subgid").unwrap();
    let range = subordinate_range(&subuid, &name, uid)
        .unwrap_or_else(|| panic!("/etc/subuid grants `{name}` no range"));
    let grange = subordinate_range(&subgid, &name, gid).unwrap();
    IdMapping::subordinate(
        uid,
        gid,
        range,
        grange,
        "/usr/bin/newuidmap".into(),
        "/usr/bin/newgidmap".into(),
    )
}

crate::rootless_test! {
    fn sandbox_full_range_mapping_through_newuidmap() {
        let case = Case::new();
        let mut spec = case.spec("id -u; id -g; id -G; wc -l < /proc/self/uid_map");
        spec.id_mapping = full_range_mapping();
        spec.user = Some((1000, 1000));
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(case.log_text(), "1000\n1000\n1000\n2\n");
        // Supplementary groups are set along with the ids.
        let mut spec = case.spec("id -G");
        spec.id_mapping = full_range_mapping();
        spec.user = Some((0, 0));
        spec.groups = vec![0, 4, 10];
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(case.log_text(), "0 4 10\n");
    }
}

crate::rootless_test! {
    fn sandbox_switches_ids_while_other_threads_start() {
        // The workload switches ids and groups in a copy of this process made
        // while other threads are being created. The C library's wrappers
        // would wait forever for such a thread to start (it never does in
        // the copy); the system calls the sandbox makes do not wait for it.
        // The timing decides whether a clone meets a starting thread: with
        // the wrappers, one of these 20 runs hung in the trial made when
        // this was fixed, which does not make every run of it catch them.
        let busy = Busy::start(2, || std::thread::spawn(|| {}).join().unwrap());
        let case = Case::new();
        let mapping = full_range_mapping();
        let mut results = Vec::new();
        for i in 0..20 {
            let mut spec = case.spec(&format!("exit {i}"));
            spec.id_mapping = mapping.clone();
            spec.user = Some((0, 0));
            spec.groups = vec![0, 4];
            let (done, finished) = std::sync::mpsc::channel();
            // On a thread of its own, so a hung sandbox fails the test.
            std::thread::spawn(move || done.send(run(&spec).map_err(|e| e.to_string())));
            match finished.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(result) => results.push(result.unwrap()),
                Err(_) => panic!("sandbox {i} hung switching ids"),
            }
        }
        drop(busy);
        assert_eq!(results, (0..20).map(ExitStatus::Exited).collect::<Vec<_>>());
    }
}

crate::rootless_test! {
    fn sandbox_probe_reports_user_namespaces_and_overlay_working() {
        let scratch = tempfile::tempdir().unwrap();
        let report = probe(&build_mapping(), scratch.path());
        report.user_namespaces.unwrap();
        report.overlay.unwrap();
    }
}

crate::rootless_test! {
    fn sandbox_inherited_stdio_and_null_stdin() {
        let case = Case::new();
        let mut spec = case.spec("cat; echo done");
        spec.stdio.stdin = StdioSource::Null;
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0));
        assert_eq!(case.log_text(), "done\n");
    }
}

/// The whole setup of a typical build, as the launcher will run it.
#[test]
fn sandbox_build_plan_snapshot() {
    let mut spec = SandboxSpec::new(
        IdMapping::single(0, 0, 1000, 1000),
        vec!["/bin/sh".into(), "-eu".into(), "-c".into(), "make".into()],
    );
    spec.mounts = vec![
        Mount::bind_ro("/usr", "/usr"),
        Mount::bind_ro("/etc/alternatives", "/etc/alternatives"),
        Mount::bind_rw("/store/tmp/out", "/out"),
        Mount::bind_rw("/store/tmp/src", "/src"),
        Mount::bind_ro("/etc/hosts", "/etc/hosts"),
        Mount::tmpfs("/tmp"),
    ];
    spec.hostname = Some("pkg".into());
    spec.cwd = "/src".into();
    let kinds = |p: &Path| {
        use pkg::sandbox::plan::{HostSource, SourceKind};
        let kind = if p.ends_with("hosts") { SourceKind::File } else { SourceKind::Directory };
        Ok(HostSource { path: p.to_path_buf(), kind })
    };
    let plan = pkg::sandbox::plan::Plan::new(&spec, &kinds).unwrap();
    let text: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    crate::assert_snapshot!("build_plan", text.join("\n"));
}

crate::rootless_test! {
    fn sandbox_new_session_detaches_the_workload_from_the_caller_session() {
        let case = Case::new();
        // Field 6 of /proc/PID/stat is the session id: the workload's own pid
        // (2) when it leads a new session, 0 (outside the namespace) otherwise.
        let script = "cut -d' ' -f6 /proc/$$/stat";
        let mut spec = case.spec(script);
        spec.new_session = true;
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0));
        assert_eq!(case.log_text(), "2\n");
        assert_eq!(case.run_ok(script), "0\n");
    }
}

crate::rootless_test! {
    fn sandbox_starts_while_other_threads_allocate() {
        // The launcher is cloned from this multi-threaded process while other
        // threads hold and release the allocator's locks; a launcher that
        // allocated could deadlock on a lock copied in its locked state.
        let busy = Busy::start(3, || {
            let v: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1 + i * 31]).collect();
            std::hint::black_box(v);
        });
        let case = Case::new();
        let results: Vec<ExitStatus> =
            (0..20).map(|i| run(&case.spec(&format!("exit {i}"))).unwrap()).collect();
        drop(busy);
        assert_eq!(results, (0..20).map(ExitStatus::Exited).collect::<Vec<_>>());
    }
}

crate::rootless_test! {
    fn sandbox_binds_follow_absolute_host_symlinks() {
        let case = Case::new();
        std::fs::write(case.path("real.conf"), "nameserver 192.0.2.1\n").unwrap();
        // Like /etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf.
        std::os::unix::fs::symlink(case.path("real.conf"), case.path("link.conf")).unwrap();
        let mut spec = case.spec("cat /etc/resolv.conf");
        spec.mounts.push(Mount::bind_ro(case.path("link.conf"), "/etc/resolv.conf"));
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(case.log_text(), "nameserver 192.0.2.1\n");
    }
}

crate::rootless_test! {
    fn sandbox_image_symlinks_cannot_make_the_setup_touch_host_files() {
        let case = Case::new();
        let host = case.path("host");
        std::fs::create_dir(&host).unwrap();
        // A hostile layer: /etc and /work point at the host through the
        // launcher's view of the host root during setup.
        let layer = case.path("layer");
        std::fs::create_dir(&layer).unwrap();
        let via_old_root = format!("/oldroot{}", host.display());
        std::os::unix::fs::symlink(&via_old_root, layer.join("etc")).unwrap();
        std::os::unix::fs::symlink(&via_old_root, layer.join("work")).unwrap();
        std::fs::write(case.path("hosts"), "127.0.0.1 localhost\n").unwrap();

        let mut spec = case.spec("exit 0");
        spec.root = RootFs::Overlay { layers: vec![layer.clone()] };
        spec.mounts.push(Mount::bind_ro(case.path("hosts"), "/etc/hosts"));
        let err = run(&spec).unwrap_err();
        assert!(matches!(err, SandboxError::Setup { .. }), "{err:?}");

        let mut spec = case.spec("exit 0");
        spec.root = RootFs::Overlay { layers: vec![layer] };
        spec.cwd = "/work/build".into();
        let err = run(&spec).unwrap_err();
        assert!(matches!(err, SandboxError::Setup { .. }), "{err:?}");

        let created: Vec<_> = std::fs::read_dir(&host).unwrap().collect();
        assert!(created.is_empty(), "the setup created files on the host: {created:?}");
    }
}

crate::rootless_test! {
    fn sandbox_launcher_does_not_hold_the_callers_other_descriptors() {
        use std::os::unix::fs::MetadataExt;
        // Another thread's pipe: were the launcher to keep it open, that
        // thread's reader would not see EOF while the sandbox runs.
        let (reader, writer) = std::io::pipe().unwrap();
        let inode = File::from(OwnedFd::from(writer)).metadata().unwrap().ino();
        let case = Case::new();
        let out = case.path("out");
        std::fs::create_dir(&out).unwrap();
        let mut spec = case.spec(
            "echo > /out/ready; i=0; while [ ! -e /out/go ] && [ $i -lt 600 ]; do \
             sleep 0.05; i=$((i+1)); done",
        );
        spec.mounts.push(Mount::bind_rw(&out, "/out"));
        let running = Sandbox::new().spawn(&spec).unwrap();
        assert!(wait_for_file(&out.join("ready")));
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", running.pid()))
            .unwrap()
            .map(|e| std::fs::read_link(e.unwrap().path()).unwrap().display().to_string())
            .collect();
        std::fs::write(out.join("go"), "").unwrap();
        assert_eq!(running.wait().unwrap(), ExitStatus::Exited(0));
        drop(reader);
        assert!(!fds.contains(&format!("pipe:[{inode}]")), "launcher holds: {fds:?}");
        // The two channel ends only: the workload's stdio sources and the
        // launcher's own 0-2 were closed once it started.
        assert_eq!(fds.len(), 2, "launcher holds: {fds:?}");
        assert!(!fds.iter().any(|fd| fd.ends_with("/log")), "launcher holds: {fds:?}");
    }
}

/// The same isolation when the caller is root (as in CI): root's id maps
/// to 0, but the sandbox still has no network and an ephemeral overlay root.
#[test]
fn sandbox_network_and_overlay_isolation_as_root() {
    let case = Case::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let layer = case.path("layer");
    std::fs::create_dir(&layer).unwrap();
    std::fs::write(layer.join("file"), "lower\n").unwrap();
    let mut spec = case.spec(&format!("{}; echo upper > /file; cat /file", connect_script(port)));
    spec.root = RootFs::Overlay { layers: vec![layer.clone()] };
    assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
    assert_eq!(case.log_text(), "lo\nrefused\nupper\n");
    assert!(listener.accept().is_err());
    assert_eq!(std::fs::read_to_string(layer.join("file")).unwrap(), "lower\n");
}

crate::rootless_test! {
    fn sandbox_runs_as_the_images_user_without_capabilities() {
        // `pkg run` of an image whose user is 65532, without subordinate ids:
        // the caller's ids are mapped straight to the image's user.
        let (uid, gid) = caller_ids();
        let case = Case::new();
        let mut spec = case.spec("id -u; id -g; grep -E '^Cap(Eff|Prm)' /proc/self/status");
        spec.id_mapping = IdMapping::single(65532, 65532, uid, gid);
        assert_eq!(run(&spec).unwrap(), ExitStatus::Exited(0), "{}", case.log_text());
        assert_eq!(
            case.log_text(),
            "65532\n65532\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n"
        );
    }
}

crate::rootless_test! {
    fn sandbox_output_pipe_reaches_eof_when_the_workload_is_done() {
        use std::io::Read;
        let (mut reader, writer) = std::io::pipe().unwrap();
        let case = Case::new();
        let mut spec = case.spec("echo from-the-workload");
        spec.stdio.stdout = StdioSource::Fd(OwnedFd::from(writer));
        let running = Sandbox::new().spawn(&spec).unwrap();
        drop(spec); // the caller's copy of the write end
        // The launcher runs until wait(); EOF must not depend on it.
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "from-the-workload\n");
        assert_eq!(running.wait().unwrap(), ExitStatus::Exited(0));
    }
}

crate::rootless_test! {
    /// An overlay the kernel refuses fails with a typed error at the overlay
    /// mount, and `--overlay auto` then serves the same layers with
    /// fuse-overlayfs, which leaves them untouched too. (A procfs layer makes
    /// any kernel refuse: overlayfs calls its dentries weird.)
    fn sandbox_overlay_refusal_falls_back_to_fuse_overlayfs() {
        use pkg::run::overlay::{FuseReason, OverlayDriver, run_with_overlay};
        let program = crate::common::fuse_overlayfs();
        let case = Case::new();
        let base = case.path("base");
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::write(base.join("etc/os-release"), "base\n").unwrap();
        std::fs::write(base.join("etc/gone"), "base\n").unwrap();
        let mut spec = case.spec(
            "cat /etc/os-release; test -d /kernel && echo merged; echo changed > /etc/os-release; \
             rm /etc/gone; cat /etc/os-release; test ! -e /etc/gone && echo hidden",
        );
        spec.root = RootFs::Overlay { layers: vec![base.clone(), "/proc/sys".into()] };
        let (mut attempts, mut reasons) = (Vec::new(), Vec::new());
        let status = run_with_overlay(
            &mut spec,
            OverlayDriver::Auto,
            || Some(program),
            |spec| {
                let result = run(spec);
                attempts.push(format!("{result:?}"));
                result
            },
            |reason| reasons.push(reason),
        );
        assert_eq!(status.unwrap(), ExitStatus::Exited(0), "{attempts:#?}\n{}", case.log_text());
        assert!(attempts[0].starts_with("Err(OverlayRefused {"), "{attempts:#?}");
        assert_eq!(reasons, [FuseReason::KernelRefuses]);
        assert_eq!(case.log_text(), "base\nmerged\nchanged\nhidden\n");
        assert_eq!(std::fs::read_to_string(base.join("etc/os-release")).unwrap(), "base\n");
        assert!(base.join("etc/gone").exists());
        assert!(!base.join("usr").exists() && !base.join("proc").exists());
    }
}
