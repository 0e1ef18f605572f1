//! How ids inside the sandbox map to the caller's.
//!
//! Two methods: [`MapMethod::Direct`] writes `/proc/PID/uid_map` and
//! `gid_map` from the caller (after `setgroups` is set to `deny`, which the
//! kernel requires); it can only map the caller's own uid and gid, one id
//! each. [`MapMethod::Helpers`] runs the setuid `newuidmap`/`newgidmap`
//! (package uidmap), which may also map the subordinate ranges
//! `/etc/subuid` and `/etc/subgid` grant, giving a full range of ids inside;
//! `setgroups` stays allowed then.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `count` ids starting at `inside` map to ids starting at `outside`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapMethod {
    Direct,
    Helpers { newuidmap: PathBuf, newgidmap: PathBuf },
}

/// The uid and gid maps of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapping {
    pub uids: Vec<IdRange>,
    pub gids: Vec<IdRange>,
    pub method: MapMethod,
}

impl IdMapping {
    /// The caller's uid and gid appear as `inside_uid` and `inside_gid`
    /// (0 for builds, the image's user for `pkg run`); no other id exists.
    pub fn single(inside_uid: u32, inside_gid: u32, caller_uid: u32, caller_gid: u32) -> Self {
        IdMapping {
            uids: vec![IdRange { inside: inside_uid, outside: caller_uid, count: 1 }],
            gids: vec![IdRange { inside: inside_gid, outside: caller_gid, count: 1 }],
            method: MapMethod::Direct,
        }
    }

    /// The caller is root (0) inside, and ids 1… map to the subordinate
    /// ranges `subuid`/`subgid` (start, count) through the helper programs.
    /// Switch the workload to another user with [`super::SandboxSpec::user`].
    pub fn subordinate(
        caller_uid: u32,
        caller_gid: u32,
        subuid: (u32, u32),
        subgid: (u32, u32),
        newuidmap: PathBuf,
        newgidmap: PathBuf,
    ) -> Self {
        IdMapping {
            uids: vec![
                IdRange { inside: 0, outside: caller_uid, count: 1 },
                IdRange { inside: 1, outside: subuid.0, count: subuid.1 },
            ],
            gids: vec![
                IdRange { inside: 0, outside: caller_gid, count: 1 },
                IdRange { inside: 1, outside: subgid.0, count: subgid.1 },
            ],
            method: MapMethod::Helpers { newuidmap, newgidmap },
        }
    }

    /// Whether the workload may call `setgroups` (only without `deny`).
    pub fn allows_setgroups(&self) -> bool {
        matches!(self.method, MapMethod::Helpers { .. })
    }
}

/// The subordinate range (start, count) that `contents` (of `/etc/subuid` or
/// `/etc/subgid`) grants to the user named `user` or numbered `id`: the first
/// matching line, as shadow's tools pick it.
pub fn subordinate_range(contents: &str, user: &str, id: u32) -> Option<(u32, u32)> {
    contents.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        if owner != user && owner.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let (start, count) = (start.parse().ok()?, count.parse().ok()?);
        (count > 0).then_some((start, count))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} failed ({status}): {stderr}", program.display())]
    Helper { program: PathBuf, status: std::process::ExitStatus, stderr: String },
}

fn map_lines(ranges: &[IdRange]) -> String {
    ranges.iter().map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count)).collect()
}

fn write_file(path: PathBuf, contents: &str) -> Result<(), IdMapError> {
    // One write(2): the kernel accepts a map only in a single write.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| IdMapError::Write { path, source })
}

/// Starts a helper (`newuidmap PID INSIDE OUTSIDE COUNT…`) without waiting.
fn spawn_helper(
    program: &Path,
    pid: i32,
    ranges: &[IdRange],
) -> Result<std::process::Child, IdMapError> {
    let mut cmd = Command::new(program);
    cmd.arg(pid.to_string());
    for r in ranges {
        cmd.args([r.inside.to_string(), r.outside.to_string(), r.count.to_string()]);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| IdMapError::Spawn { program: program.into(), source })
}

fn finish_helper(program: &Path, child: std::process::Child) -> Result<(), IdMapError> {
    let out = child
        .wait_with_output()
        .map_err(|source| IdMapError::Spawn { program: program.into(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IdMapError::Helper {
            program: program.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Writes the maps of process `pid`, whose `/proc` is under `proc_root`.
pub fn write_id_maps(proc_root: &Path, pid: i32, mapping: &IdMapping) -> Result<(), IdMapError> {
    let dir = proc_root.join(pid.to_string());
    match &mapping.method {
        MapMethod::Direct => {
            write_file(dir.join("setgroups"), "deny")?;
            write_file(dir.join("uid_map"), &map_lines(&mapping.uids))?;
            write_file(dir.join("gid_map"), &map_lines(&mapping.gids))
        }
        // The two maps are independent: both helpers run at once.
        MapMethod::Helpers { newuidmap, newgidmap } => {
            let uids = spawn_helper(newuidmap, pid, &mapping.uids)?;
            let gids = spawn_helper(newgidmap, pid, &mapping.gids);
            let uid_result = finish_helper(newuidmap, uids);
            let gid_result = gids.and_then(|child| finish_helper(newgidmap, child));
            uid_result.and(gid_result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_mapping_denies_setgroups_then_writes_maps() {
        let proc_root = tempfile::tempdir().unwrap();
        let dir = proc_root.path().join("42");
        std::fs::create_dir(&dir).unwrap();
        for f in ["setgroups", "uid_map", "gid_map"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        write_id_maps(proc_root.path(), 42, &IdMapping::single(0, 0, 1001, 1002)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("setgroups")).unwrap(), "deny");
        assert_eq!(std::fs::read_to_string(dir.join("uid_map")).unwrap(), "0 1001 1\n");
        assert_eq!(std::fs::read_to_string(dir.join("gid_map")).unwrap(), "0 1002 1\n");
    }

    #[test]
    fn missing_proc_entry_is_a_typed_error_naming_the_file() {
        let proc_root = tempfile::tempdir().unwrap();
        let err = write_id_maps(proc_root.path(), 7, &IdMapping::single(0, 0, 1, 1)).unwrap_err();
        assert!(err.to_string().ends_with("7/setgroups"), "{err}");
    }

    #[test]
    fn subordinate_range_matches_name_or_uid_first_line_wins() {
        let subuid = "# comment\nalice:100000:65536\n1001:200000:1000\nbob:300000:0\nalice:1:1\n";
        assert_eq!(subordinate_range(subuid, "alice", 1000), Some((100000, 65536)));
        assert_eq!(subordinate_range(subuid, "carol", 1001), Some((200000, 1000)));
        assert_eq!(subordinate_range(subuid, "bob", 1002), None);
        assert_eq!(subordinate_range(subuid, "dave", 1003), None);
    }

    #[test]
    fn subordinate_mapping_puts_caller_at_zero_and_range_above() {
        let m = IdMapping::subordinate(
            1001,
            1001,
            (100000, 65536),
            (100000, 65536),
            "u".into(),
            "g".into(),
        );
        assert_eq!(map_lines(&m.uids), "0 1001 1\n1 100000 65536\n");
        assert!(m.allows_setgroups());
        assert!(!IdMapping::single(0, 0, 1, 1).allows_setgroups());
    }
}
