//! `pkg run`: the rootless launcher, end to end, as an unprivileged user.
//!
//! Most tests run a busybox image that the test builds with umoci (two
//! layers: busybox and a few files, then a layer deleting one of them, which
//! umoci writes as an OCI whiteout), so they exercise the foreign-image path
//! too; the recipe tests build `recipes/hello` and `recipes/hello-go`.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestContext, fuse_overlayfs, stderr, stdout};
use crate::{assert_snapshot, rootless_test};

const BUSYBOX: &str = "/bin/busybox";

fn recipe(name: &str) -> String {
    format!("{}/recipes/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", stdout(&out), stderr(&out));
}

/// An OCI layout at `ROOT/bb` with the image `bb`: busybox with every applet
/// linked in /bin, `/etc/kept`, `/etc/deleted` (removed again by a second
/// layer: a whiteout), a 1777 `/tmp`, cmd `sh`, `PATH=/bin`.
fn busybox_image(ctx: &TestContext) -> String {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: install busybox-static (scripts/test.sh does)"
    );
    let layout = ctx.root().join("bb");
    let bundle = ctx.root().join("bundle");
    let umoci = || {
        let mut cmd = Command::new("umoci");
        cmd.current_dir(ctx.root());
        cmd
    };
    let image = format!("{}:bb", layout.display());
    sh(umoci().args(["init", "--layout"]).arg(&layout));
    sh(umoci().args(["new", "--image", &image]));
    sh(umoci().args(["unpack", "--rootless", "--image", &image]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for dir in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().expect("busybox --list");
    for applet in stdout(&list).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/kept"), "kept\n").unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nadm:x:4:root\nwheel:x:10:nobody,root\nnogroup:x:65534:\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/deleted"), "deleted\n").unwrap();
    sh(umoci().args(["repack", "--image", &image]).arg(&bundle));
    sh(umoci().args([
        "config",
        "--image",
        &image,
        "--config.cmd",
        "sh",
        "--config.env",
        "PATH=/bin",
    ]));
    std::fs::remove_dir_all(&bundle).unwrap();
    sh(umoci().args(["unpack", "--rootless", "--image", &image]).arg(&bundle));
    std::fs::remove_file(bundle.join("rootfs/etc/deleted")).unwrap();
    sh(umoci().args(["repack", "--image", &image]).arg(&bundle));
    format!("oci:{}:bb", layout.display())
}

/// A host directory for marker files the workload touches (`/sync`
/// inside), and the `-v` argument that mounts it there.
fn sync_volume(ctx: &TestContext) -> (PathBuf, String) {
    let sync = ctx.root().join("sync");
    std::fs::create_dir(&sync).unwrap();
    let volume = format!("{}:/sync", sync.display());
    (sync, volume)
}

/// `pkg run ARGS`, with the exit code.
fn run(ctx: &TestContext, args: &[&str]) -> (i32, Output) {
    let out = ctx.pkg().arg("run").args(args).output().expect("spawn pkg run");
    (out.status.code().unwrap_or(-1), out)
}

/// Waits (bounded) for `child` to exit.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("pkg run did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

rootless_test! {
    /// The README's main job: build the hello recipe, run its image.
    fn hello_recipe_builds_and_runs() {
        let ctx = TestContext::new();
        let (code, out) = run(&ctx, &[&recipe("hello")]);
        assert_eq!(code, 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), "Hello from pkg!\n");
        // Now in the store by name; arguments replace the image's cmd.
        let (code, out) = run(&ctx, &["hello", "a", "b c"]);
        assert_eq!(code, 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), "Hello from pkg!\narg 1: a\narg 2: b c\n");
    }
}

rootless_test! {
    fn busybox_image_prints_and_exits_with_its_status() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (code, out) = run(&ctx, &[&image, "sh", "-c", "echo hi; exit 3"]);
        assert_eq!((code, stdout(&out).as_str()), (3, "hi\n"), "{}", stderr(&out));
        // `--` works as well, and a second run is served from the import.
        let (code, out) = run(&ctx, &[&image, "--", "sh", "-c", "exit 0"]);
        assert_eq!(code, 0, "{}", stderr(&out));
        let (code, out) = run(&ctx, &[&image, "sh", "-c", "kill -KILL $$"]);
        assert_eq!(code, 128 + 9, "{}", stderr(&out));
    }
}

rootless_test! {
    fn whiteouts_hide_lower_files() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (code, out) =
            run(&ctx, &[&image, "sh", "-c", "cat /etc/kept; test ! -e /etc/deleted && echo hidden"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "kept\nhidden\n"), "{}", stderr(&out));
    }
}

rootless_test! {
    fn writes_vanish_but_volumes_keep_them() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let data = ctx.root().join("data");
        std::fs::create_dir(&data).unwrap();
        let volume = format!("{}:/data", data.display());
        let (code, out) = run(
            &ctx,
            &["-v", &volume, &image, "sh", "-c", "echo x > /etc/new && echo y > /data/kept && cat /etc/new"],
        );
        assert_eq!((code, stdout(&out).as_str()), (0, "x\n"), "{}", stderr(&out));
        assert_eq!(std::fs::read_to_string(data.join("kept")).unwrap(), "y\n");
        let (code, out) = run(&ctx, &[&image, "sh", "-c", "test ! -e /etc/new && echo gone"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "gone\n"), "{}", stderr(&out));
        // A read-only volume refuses writes.
        let ro = format!("{}:/data:ro", data.display());
        let (code, out) = run(&ctx, &["-v", &ro, &image, "sh", "-c", "echo z > /data/kept"]);
        assert_ne!(code, 0, "{}", stdout(&out));
        assert_eq!(std::fs::read_to_string(data.join("kept")).unwrap(), "y\n");
    }
}

rootless_test! {
    fn net_none_has_only_loopback_and_no_host_processes_are_visible() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (code, out) = run(
            &ctx,
            &["--net", "none", &image, "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"],
        );
        assert_eq!((code, stdout(&out).as_str()), (0, "lo\n"), "{}", stderr(&out));
        // PID 1 is the launcher, then the shell: nothing of the host.
        let (code, out) = run(&ctx, &[&image, "sh", "-c", "echo /proc/[0-9]*"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "/proc/1 /proc/2\n"), "{}", stderr(&out));
    }
}

rootless_test! {
    fn etc_hosts_is_generated_or_taken_from_a_volume() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (code, out) =
            run(&ctx, &["--net", "none", "--hostname", "box", &image, "cat", "/etc/hosts"]);
        assert_eq!(code, 0, "{}", stderr(&out));
        assert!(stdout(&out).contains("127.0.0.1\tlocalhost\n"), "{}", stdout(&out));
        assert!(stdout(&out).contains("\tbox\n"), "{}", stdout(&out));
        // A volume over the file wins, and is not written to.
        let mine = ctx.write("myhosts", "10.0.0.1 mine\n");
        let volume = format!("{}:/etc/hosts:ro", mine.display());
        let (code, out) = run(&ctx, &["--net", "none", "-v", &volume, &image, "cat", "/etc/hosts"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "10.0.0.1 mine\n"), "{}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&mine).unwrap(), "10.0.0.1 mine\n");
        // With the host's network, the host's resolver configuration.
        let (code, out) = run(&ctx, &[&image, "cat", "/etc/resolv.conf"]);
        assert_eq!(code, 0, "{}", stderr(&out));
        assert_eq!(stdout(&out), std::fs::read_to_string("/etc/resolv.conf").unwrap());
    }
}

rootless_test! {
    fn the_image_user_owns_the_image_files() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let script = "stat -c %u:%g /etc/kept; echo changed > /etc/kept && cat /etc/kept";
        let (code, out) = run(&ctx, &["--user", "1000:1000", &image, "sh", "-c", script]);
        assert_eq!((code, stdout(&out).as_str()), (0, "1000:1000\nchanged\n"), "{}", stderr(&out));
        let (code, out) = run(&ctx, &[&image, "stat", "-c", "%u:%g", "/etc/kept"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "0:0\n"), "{}", stderr(&out));
        // Names resolve in the image's /etc/passwd and /etc/group.
        let (code, out) = run(&ctx, &["--user", "nobody", &image, "sh", "-c", "id -u; id -g; echo $HOME"]);
        assert_eq!(
            (code, stdout(&out).as_str()),
            (0, "65534\n65534\n/nonexistent\n"),
            "{}",
            stderr(&out)
        );
        // A root workload gets the subordinate range (the test user has one),
        // so it can switch users, as servers dropping privileges do.
        let (code, out) = run(&ctx, &[&image, "su", "-s", "/bin/sh", "nobody", "-c", "id -u"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "65534\n"), "{}", stderr(&out));
        // With the range, root has the groups the image's /etc/group gives
        // it, as with docker, not the caller's.
        let (code, out) = run(&ctx, &[&image, "id", "-G"]);
        let mut groups: Vec<u32> =
            stdout(&out).split_whitespace().map(|g| g.parse().unwrap()).collect();
        groups.sort_unstable();
        groups.dedup();
        assert_eq!((code, groups), (0, vec![0, 4, 10]), "{}", stderr(&out));
    }
}

rootless_test! {
    fn sigterm_reaches_the_workload() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done";
        let mut child = ctx
            .pkg()
            .args(["run", &image, "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pkg run");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().transpose().unwrap().as_deref(), Some("ready"));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = wait_bounded(&mut child, Duration::from_secs(20));
        assert_eq!(lines.next().transpose().unwrap().as_deref(), Some("got TERM"));
        assert_eq!(status.code(), Some(7));
    }
}

rootless_test! {
    fn a_signal_to_the_whole_process_group_arrives_once() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let script = "n=0; trap 'n=$((n+1)); echo term $n' TERM; echo ready; \
                      i=0; while [ $i -lt 50 ]; do sleep 0.02; i=$((i+1)); done; echo done $n";
        let mut child = ctx
            .pkg()
            .args(["run", &image, "sh", "-c", script])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn pkg run");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        assert_eq!(lines.next().transpose().unwrap().as_deref(), Some("ready"));
        // As `kill %1`, `timeout` or a CI runner's cancel do.
        let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
        nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = wait_bounded(&mut child, Duration::from_secs(20));
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        assert_eq!(rest, ["term 1", "done 1"]);
        assert_eq!(status.code(), Some(0));
    }
}

rootless_test! {
    fn killing_pkg_run_kills_the_sandbox() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let data = ctx.root().join("data");
        std::fs::create_dir(&data).unwrap();
        let volume = format!("{}:/data", data.display());
        // Bounded, so that a leftover sandbox ends by itself and the test fails instead of hanging.
        let script =
            "echo ready; i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo $i > /data/tick; sleep 0.02; done";
        let mut child = ctx
            .pkg()
            .args(["run", "-v", &volume, &image, "sh", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pkg run");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().transpose().unwrap().as_deref(), Some("ready"));
        let started = Instant::now();
        while !data.join("tick").exists() {
            assert!(started.elapsed() < Duration::from_secs(20), "the workload never ticked");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL: pkg cannot forward or clean up
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let tick = std::fs::read_to_string(data.join("tick")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            std::fs::read_to_string(data.join("tick")).unwrap(),
            tick,
            "the workload kept running after pkg run was killed"
        );
    }
}

rootless_test! {
    fn orphans_are_reaped_and_nothing_outlives_the_run() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let data = ctx.root().join("data");
        std::fs::create_dir(&data).unwrap();
        let volume = format!("{}:/data", data.display());
        // The inner shell exits at once, orphaning its sleeping child, which
        // PID 1 adopts. Once the child has ended (its /proc entry is gone or
        // a zombie), PID 1 must reap it: the entry disappears.
        let script = "sh -c 'sleep 0.2 & echo $! > /tmp/orphan; exit 0'; pid=$(cat /tmp/orphan); \
                      i=0; while [ $i -lt 1000 ]; do \
                        [ -e /proc/$pid ] || break; \
                        [ \"$(cut -d' ' -f3 /proc/$pid/stat)\" = Z ] && break; \
                        sleep 0.01; i=$((i+1)); done; \
                      sleep 0.3; if [ -e /proc/$pid ]; then echo zombie; else echo reaped; fi";
        let (code, out) = run(&ctx, &["-v", &volume, &image, "sh", "-c", script]);
        assert_eq!((code, stdout(&out).as_str()), (0, "reaped\n"), "{}", stderr(&out));
        // A background process dies with the workload.
        let late = "(sleep 1; echo late > /data/late) & exit 0";
        let (code, out) = run(&ctx, &["-v", &volume, &image, "sh", "-c", late]);
        assert_eq!(code, 0, "{}", stderr(&out));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!data.join("late").exists(), "a process of the sandbox outlived pkg run");
    }
}

rootless_test! {
    fn docker_options_set_env_workdir_user_hostname_and_stdin() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let env_file = ctx.write("vars.env", "# comment\nB=from file\n\nC=3\n");
        let script = "echo \"$A|$B|$C|$HOME\"; pwd; id -u; id -g; hostname; touch /tmp/ok && echo tmp ok";
        let (code, out) = run(
            &ctx,
            &[
                "-e", "A=1", "--env-file", env_file.to_str().unwrap(), "-e", "C=override",
                "-w", "/tmp", "--user", "1000:1001", "--hostname", "box",
                &image, "sh", "-c", script,
            ],
        );
        assert_eq!(
            (code, stdout(&out).as_str()),
            (0, "1|from file|override|/\n/tmp\n1000\n1001\nbox\ntmp ok\n"),
            "{}",
            stderr(&out)
        );
        let (code, out) = run(&ctx, &["-w", "/tmp/../etc/", &image, "pwd"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "/etc\n"), "{}", stderr(&out));
        // --entrypoint replaces the program; -i passes stdin through.
        let mut child = ctx
            .pkg()
            .args(["run", "-i", "--entrypoint", "cat", &image])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"through stdin\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(stdout(&out), "through stdin\n");
        // Without -i the workload reads /dev/null.
        let out = ctx
            .pkg()
            .args(["run", "--entrypoint", "cat", &image])
            .stdin(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), ""));
    }
}

/// pkg's path and `args`, quoted for sh.
fn pkg_line(args: &[&str]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = quote(env!("CARGO_BIN_EXE_pkg"));
    for arg in args {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

/// `script` runs the sh command `line` on a terminal of its own, fed
/// `input` (each chunk once its file exists, if it names one), then EOF: the
/// exit code of `line` and what the terminal shows, carriage returns removed.
fn on_terminal(ctx: &TestContext, line: &str, input: &[(Option<&Path>, &[u8])]) -> (i32, String) {
    // pkg's environment, without its env_clear (Command cannot copy that).
    let pkg = ctx.pkg();
    let mut child = Command::new("script")
        .args(["-qec", line, "/dev/null"])
        .env_clear()
        .envs(pkg.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .current_dir(ctx.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (util-linux's bsdutils)");
    let mut stdin = child.stdin.take().unwrap();
    let chunks: Vec<(Option<PathBuf>, Vec<u8>)> =
        input.iter().map(|(file, b)| (file.map(Path::to_path_buf), b.to_vec())).collect();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        for (file, bytes) in chunks {
            if let Some(file) = file {
                wait_for_file(&file);
            }
            let _ = stdin.write_all(&bytes);
        }
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (out.status.code().unwrap_or(-1), stdout(&out).replace('\r', ""))
}

/// Waits (bounded) for `file` to exist.
fn wait_for_file(file: &Path) {
    let start = Instant::now();
    while !file.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "{} never appeared", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pkg ARGS` run by `script`, on a terminal of its own: what the terminal shows.
fn in_terminal(ctx: &TestContext, args: &[&str]) -> String {
    let (code, shown) = on_terminal(ctx, &pkg_line(args), &[]);
    assert_eq!(code, 0, "{shown}");
    shown
}

rootless_test! {
    /// No workload shares the caller's terminal: without -t it has no
    /// controlling terminal, so it cannot open /dev/tty to read the caller's
    /// keystrokes or push input into the caller's shell (TIOCSTI); with -t
    /// its controlling terminal is a pseudo-terminal of the sandbox's own.
    fn no_workload_shares_the_callers_terminal() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        // The controlling terminal, and what stdout and stderr are: without
        // -t, pipes that pkg relays to the terminal, as with docker.
        let probe = "if (: </dev/tty) 2>/dev/null; then echo terminal; else echo none; fi; \
                     cut -d' ' -f7 /proc/self/stat; \
                     readlink /proc/$$/fd/1 | cut -c1-5; readlink /proc/$$/fd/2 | cut -c1-5";
        let shown = in_terminal(&ctx, &["run", &image, "sh", "-c", probe]);
        assert_eq!(shown, "none\n0\npipe:\npipe:\n");
        let shown = in_terminal(&ctx, &["run", "-i", &image, "sh", "-c", probe]);
        assert_eq!(shown, "none\n0\npipe:\npipe:\n");
        // /dev/pts/0 (136:0) of the sandbox's devpts.
        let shown = in_terminal(&ctx, &["run", "-t", &image, "sh", "-c", probe]);
        assert_eq!(shown, "terminal\n34816\n/dev/\n/dev/\n");
        // -t without a terminal on stdin relays the output the same way, and
        // the workload is still in a session of its own.
        let line = format!("{} </dev/null", pkg_line(&["run", "-t", &image, "sh", "-c", probe]));
        assert_eq!(on_terminal(&ctx, &line, &[]), (0, "none\n0\npipe:\npipe:\n".into()));
        // Nor does PID 1 hold the terminal for a workload to reopen.
        let launcher = "for fd in /proc/1/fd/*; do readlink $fd; done | grep -c /dev/pts";
        for args in [&["run"][..], &["run", "-i"], &["run", "-t"]] {
            let args = [args, &[&image, "sh", "-c", launcher]].concat();
            let (_, shown) = on_terminal(&ctx, &pkg_line(&args), &[]);
            assert_eq!(shown, "0\n", "{args:?}");
        }
        // Relayed output is complete and in order (stdout and stderr on one
        // terminal share the pipe), and the status passes through.
        let many = "seq 1 3000 | tail -n 2; echo to stderr >&2; exit 5";
        let line = pkg_line(&["run", &image, "sh", "-c", many]);
        assert_eq!(on_terminal(&ctx, &line, &[]), (5, "2999\n3000\nto stderr\n".into()));
    }
}

rootless_test! {
    /// `-t` allocates a pseudo-terminal from the sandbox's devpts, sized like
    /// the caller's, and nothing inside holds the caller's terminal.
    fn tty_gets_a_pseudo_terminal_of_the_sandbox() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let probe = "tty; cut -d' ' -f7 /proc/self/stat; stty size; stat -L -c %d /dev/stdin; \
                     ls /proc/1/fd | grep -cx '[012]'; echo \"$TERM\"";
        let line = format!(
            "stty rows 33 cols 77; stat -L -c %d /dev/stdin; TERM=vt100 {}",
            pkg_line(&["run", "-t", &image, "sh", "-c", probe])
        );
        let (code, shown) = on_terminal(&ctx, &line, &[]);
        assert_eq!(code, 0, "{shown}");
        let lines: Vec<&str> = shown.lines().collect();
        let [caller_devpts, tty, tty_field, size, devpts, launcher_stdio, term] = lines[..] else {
            panic!("{shown:?}")
        };
        assert_eq!((tty, tty_field, size, term), ("/dev/pts/0", "34816", "33 77", "vt100"));
        assert_ne!(devpts, caller_devpts, "the terminal is of the caller's devpts");
        // PID 1 (the launcher) let go of the caller's terminal: it has no fd 0-2.
        assert_eq!(launcher_stdio, "0");
    }
}

rootless_test! {
    fn tty_output_is_complete_and_the_exit_status_passes_through() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        for _ in 0..3 {
            let (code, shown) = on_terminal(&ctx, &pkg_line(&["run", "-t", &image, "echo", "hi"]), &[]);
            assert_eq!((code, shown.as_str()), (0, "hi\n"));
        }
        // Through the sandbox's terminal, not passed through.
        let seq = pkg_line(&["run", "-t", &image, "sh", "-c", "tty; seq 1 5000"]);
        let (code, shown) = on_terminal(&ctx, &seq, &[]);
        assert_eq!(code, 0, "{shown}");
        let expected: Vec<String> =
            std::iter::once("/dev/pts/0".to_string()).chain((1..=5000).map(|i| i.to_string())).collect();
        assert_eq!(shown.lines().collect::<Vec<_>>(), expected);
        let (code, shown) = on_terminal(&ctx, &pkg_line(&["run", "-t", &image, "seq", "1", "2000"]), &[]);
        assert_eq!((code, shown.lines().last()), (0, Some("2000")));
        let exit = |script: &str| on_terminal(&ctx, &pkg_line(&["run", "-t", &image, "sh", "-c", script]), &[]);
        assert_eq!(exit("tty; exit 3"), (3, "/dev/pts/0\n".into()));
        assert_eq!(exit("kill -KILL $$").0, 128 + 9);
        // Failures before the workload runs keep their codes.
        let (code, shown) = on_terminal(&ctx, &pkg_line(&["run", "-t", "--entrypoint", "/nope", &image]), &[]);
        assert_eq!(code, 127, "{shown}");
    }
}

rootless_test! {
    /// `-it`: what the caller types reaches the workload through its
    /// terminal, the caller's terminal in raw mode meanwhile: Ctrl-C is a
    /// byte that the pseudo-terminal turns into SIGINT for the workload's
    /// whole foreground process group (a forwarded signal would reach the
    /// shell alone, which waits for `sleep` before its trap runs).
    fn tty_with_i_forwards_input_in_raw_mode() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let restored = |pkg: String| {
            format!(
                "before=$(stty -g); {pkg}; code=$?; \
                 if [ \"$(stty -g)\" = \"$before\" ]; then echo restored; fi; exit $code"
            )
        };
        let read = pkg_line(&["run", "-it", &image, "sh", "-c", "read line; echo \"got $line\"; exit 4"]);
        // Typed before pkg switches to raw mode: still forwarded.
        let (code, shown) = on_terminal(&ctx, &restored(read), &[(None, b"hello\n")]);
        assert_eq!(code, 4, "{shown}");
        assert!(shown.contains("got hello\n") && shown.ends_with("restored\n"), "{shown:?}");
        // What raw mode passes on unchanged: a line without ICRNL's help.
        let head = pkg_line(&["run", "-it", &image, "head", "-n1"]);
        let (code, shown) = on_terminal(&ctx, &head, &[(None, b"one line\n")]);
        assert_eq!(code, 0, "{shown}");
        assert!(shown.contains("one line\n"), "{shown:?}");
        let (sync, volume) = sync_volume(&ctx);
        // The subshell (traps reset) is interrupted wherever the byte finds it.
        let script =
            "trap 'echo trapped' INT; (touch /sync/ready; exec sleep 10); echo \"sleep: $?\"";
        let interrupted = pkg_line(&["run", "-it", "-v", &volume, &image, "sh", "-c", script]);
        let ready = sync.join("ready");
        let (code, shown) = on_terminal(&ctx, &restored(interrupted), &[(Some(&ready), b"\x03")]);
        assert_eq!(code, 0, "{shown}");
        assert!(shown.contains("trapped\nsleep: 130\nrestored\n"), "{shown:?}");
    }
}

rootless_test! {
    /// `-i` on a terminal, without `-t`: as with docker, input reaches the
    /// workload through a pipe that pkg fills, so the workload never holds
    /// the terminal (and a stopped pkg stops its input); Ctrl-C is pkg's
    /// SIGINT, forwarded once.
    fn interactive_input_from_a_terminal_is_relayed_through_a_pipe() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (sync, volume) = sync_volume(&ctx);
        let script = "readlink /proc/self/fd/0 | cut -c1-5; touch /sync/ready; \
                      head -n1 | tr a-z A-Z; \
                      n=0; trap 'n=$((n+1))' INT; touch /sync/trap; sleep 1; echo \"INT $n\"";
        // exec: the shell around pkg would see the SIGINT too and exit 130.
        let line = format!("exec {}", pkg_line(&["run", "-i", "-v", &volume, &image, "sh", "-c", script]));
        let (ready, trap) = (sync.join("ready"), sync.join("trap"));
        let input: &[(Option<&Path>, &[u8])] = &[(Some(&ready), b"abc\n"), (Some(&trap), b"\x03")];
        let (code, shown) = on_terminal(&ctx, &line, input);
        assert_eq!((code, shown.as_str()), (0, "pipe:\nabc\nABC\n^CINT 1\n"));
    }
}

rootless_test! {
    /// `-t` alone, as docker's: nothing typed is forwarded and the caller's
    /// terminal keeps its mode, so Ctrl-C there is pkg's SIGINT, which
    /// reaches the workload forwarded, once.
    fn tty_without_i_forwards_signals_not_keystrokes() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (sync, volume) = sync_volume(&ctx);
        let script = "n=0; trap 'n=$((n+1))' INT; touch /sync/ready; \
                      while [ $n -eq 0 ]; do sleep 0.05; done; sleep 0.3; echo \"INT $n\"; \
                      if read -t 0 line; then echo input; else echo no input; fi; exit 5";
        // exec: the shell script runs pkg in would take the SIGINT too.
        let line = format!("exec {}", pkg_line(&["run", "-t", "-v", &volume, &image, "sh", "-c", script]));
        let ready = sync.join("ready");
        let (code, shown) = on_terminal(&ctx, &line, &[(Some(&ready), b"typed\n\x03")]);
        assert_eq!(code, 5, "{shown}");
        assert!(shown.ends_with("INT 1\nno input\n"), "{shown:?}");
    }
}

rootless_test! {
    /// A resize of the caller's terminal reaches the workload's: SIGWINCH
    /// and the new size.
    fn tty_follows_the_callers_window_size() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (sync, volume) = sync_volume(&ctx);
        let script = "stty size; trap 'stty size; exit 0' WINCH; touch /sync/ready; \
                      i=0; while [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo timeout";
        // In the background of a shell without job control stdin would be
        // /dev/null: it is the terminal explicitly.
        let line = format!(
            "stty rows 20 cols 60; {} </dev/tty & \
             while [ ! -e '{}' ]; do sleep 0.02; done; stty rows 50 cols 120; wait $!",
            pkg_line(&["run", "-t", "-v", &volume, &image, "sh", "-c", script]),
            sync.join("ready").display()
        );
        let (code, shown) = on_terminal(&ctx, &line, &[]);
        assert_eq!((code, shown.as_str()), (0, "20 60\n50 120\n"));
    }
}

rootless_test! {
    fn arm64_image_runs_through_qemu() {
        let ctx = TestContext::new();
        // A foreign image with only an arm64 variant runs without --platform.
        let layout = ctx.root().join("hello-arm64");
        let output = format!("oci:{}", layout.display());
        let built = ctx.run(&["build", &recipe("hello"), "--platform", "linux/arm64", "-o", &output]);
        assert!(built.status.success(), "{}", stderr(&built));
        let (code, out) = run(&ctx, &[&format!("{output}:hello"), "from", "arm64"]);
        assert_eq!(
            (code, stdout(&out).as_str()),
            (0, "Hello from pkg!\narg 1: from\narg 2: arm64\n"),
            "{}",
            stderr(&out)
        );
        let (code, out) = run(&ctx, &["--platform", "linux/arm64", &recipe("hello-go"), "--once"]);
        assert_eq!((code, stdout(&out).as_str()), (0, "Hello from Go on linux/arm64!\n"), "{}", stderr(&out));
    }
}

/// A bad target's exit code and its message, with temp paths redacted.
/// Nothing may be left in the store's temp directory.
fn failure(ctx: &TestContext, args: &[&str]) -> (i32, String) {
    let (code, out) = run(ctx, args);
    let tmp = ctx.store().join("tmp");
    if tmp.exists() {
        let left: Vec<PathBuf> =
            std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "pkg run {args:?} left {left:?} behind");
    }
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    (code, ctx.redact(&stderr(&out)))
}

rootless_test! {
    fn bad_targets_fail_with_docker_exit_codes() {
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let (code, text) = failure(&ctx, &["./missing.kdl"]);
        assert_eq!(code, 125);
        assert_snapshot!("run_missing_recipe", text);
        let (code, text) = failure(&ctx, &["nosuch"]);
        assert_eq!(code, 125);
        assert_snapshot!("run_unknown_image", text);
        let (code, text) = failure(&ctx, &["oci:missing-dir"]);
        assert_eq!(code, 125);
        assert_snapshot!("run_missing_layout", text);
        let (code, text) = failure(&ctx, &["--entrypoint", "/nope", &image]);
        assert_eq!(code, 127);
        assert_snapshot!("run_missing_entrypoint", text);
        let (code, text) = failure(&ctx, &["--entrypoint", "/etc/kept", &image]);
        assert_eq!(code, 126);
        assert_snapshot!("run_entrypoint_not_executable", text);
        let (code, text) = failure(&ctx, &["--user", "nosuchuser", &image]);
        assert_eq!(code, 125);
        assert_snapshot!("run_unknown_user", text);
        let (code, text) = failure(&ctx, &["-v", "relative:/x", &image]);
        assert_eq!(code, 125);
        assert_snapshot!("run_named_volume", text);
        let root = format!("{}:/", ctx.root().display());
        let (code, text) = failure(&ctx, &["-v", &root, &image]);
        assert_eq!(code, 125);
        assert_snapshot!("run_volume_on_root", text);
        let (code, _) = failure(&ctx, &["--no-such-flag", &image]);
        assert_eq!(code, 125, "usage errors of pkg run exit 125 like docker's");
        // A corrupt layer blob of a fresh layout: every byte is verified.
        let fresh = TestContext::new();
        let image = busybox_image(&fresh);
        let blobs = fresh.root().join("bb/blobs/sha256");
        let biggest = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let mut bytes = std::fs::read(&biggest).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&biggest, bytes).unwrap();
        let (code, text) = failure(&fresh, &[&image, "true"]);
        assert_eq!(code, 125);
        assert!(text.contains("corrupt"), "{text}");
    }
}

/// The host pids of the fuse-overlayfs processes below `pkg` (pid `pkg`).
fn fuse_daemons_below(pkg: u32) -> Vec<u32> {
    let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "PID (COMM) STATE PPID …"
    let parent_and_comm = |pid: u32| {
        let text = stat(pid);
        let (head, tail) = text.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_string();
        let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
        Some((ppid, comm))
    };
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let launchers: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| parent_and_comm(p).is_some_and(|(pp, _)| pp == pkg))
        .collect();
    pids.into_iter()
        .filter(|&p| {
            parent_and_comm(p)
                .is_some_and(|(pp, comm)| launchers.contains(&pp) && comm == "fuse-overlayfs")
        })
        .collect()
}

rootless_test! {
    /// Where the kernel refuses overlayfs in a user namespace, fuse-overlayfs
    /// serves the same root; `--overlay fuse` forces it here.
    fn fuse_overlayfs_serves_the_root_when_forced() {
        fuse_overlayfs();
        let ctx = TestContext::new();
        let image = busybox_image(&ctx);
        let fuse = |args: &[&str]| run(&ctx, &[&["--overlay", "fuse"], args].concat());
        let (code, out) = fuse(&[&image, "sh", "-c", "echo hi; exit 3"]);
        assert_eq!((code, stdout(&out).as_str()), (3, "hi\n"), "{}", stderr(&out));
        assert_snapshot!("run_fuse_overlayfs_note", stderr(&out));
        // Whiteouts hide, ownership is the kernel overlay's, writes stay in
        // the tmpfs upper layer (a root workload has the subordinate range:
        // files of other users are created through the daemon too).
        let script = "cat /etc/kept; test ! -e /etc/deleted && echo hidden; stat -c %u:%g /etc/kept; \
                      echo new > /etc/new; rm /etc/kept; mkdir /etc/d; \
                      su -s /bin/sh nobody -c 'touch /tmp/n; stat -c %u:%g /tmp/n'";
        let (code, out) = fuse(&[&image, "sh", "-c", script]);
        assert_eq!(
            (code, stdout(&out).as_str()),
            (0, "kept\nhidden\n0:0\n65534:65534\n"),
            "{}",
            stderr(&out)
        );
        let script = "cat /etc/kept; test ! -e /etc/new && test ! -e /etc/d && echo gone";
        let (code, out) = fuse(&[&image, "sh", "-c", script]);
        assert_eq!((code, stdout(&out).as_str()), (0, "kept\ngone\n"), "{}", stderr(&out));
        let script = "stat -c %u:%g /etc/kept; echo changed > /etc/kept && cat /etc/kept";
        let (code, out) = fuse(&["--user", "1000:1000", &image, "sh", "-c", script]);
        assert_eq!((code, stdout(&out).as_str()), (0, "1000:1000\nchanged\n"), "{}", stderr(&out));

        // The daemon runs while the workload does, and not a moment longer.
        let mut child = ctx
            .pkg()
            .args(["run", "--overlay", "fuse", "-i", &image, "sh", "-c", "echo ready; read line"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pkg run");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().transpose().unwrap().as_deref(), Some("ready"));
        let daemons = fuse_daemons_below(child.id());
        assert_eq!(daemons.len(), 1, "one fuse-overlayfs per run");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        assert!(wait_bounded(&mut child, Duration::from_secs(20)).success());
        for pid in daemons {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(!stat.contains("(fuse-overlayfs)"), "fuse-overlayfs outlived pkg run: {stat}");
        }

        // A fuse-overlayfs that stops at once fails the start, without hanging.
        let stops = ctx.write("bin/fuse-overlayfs", "#!/bin/sh\nexit 1\n");
        std::fs::set_permissions(&stops, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let path = format!("{}:{}", ctx.root().join("bin").display(), std::env::var("PATH").unwrap());
        let out = ctx.pkg().env("PATH", path).args(["run", "--overlay", "fuse", &image, "true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        assert!(stderr(&out).contains("ENOTCONN: Transport endpoint is not connected"), "{}", stderr(&out));

        // Without fuse-overlayfs: a clear error, exit 125.
        let out =
            ctx.pkg().env("PATH", "/nonexistent").args(["run", "--overlay", "fuse", &image, "true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert_snapshot!("run_fuse_overlayfs_missing", ctx.redact(&stderr(&out)));
    }
}
