//! `pkg doctor`: report what this machine can do, and how to fix what it cannot.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;

use super::{Settings, write_stdout};
use crate::doctor::{Check, HostFacts, Status};
use crate::tool::HostTools;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as one JSON array
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs, settings: &Settings) -> miette::Result<ExitCode> {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let scratch = tempfile::tempdir()
        .map_err(|e| miette::miette!("cannot create a scratch directory for the checks: {e}"))?;
    let tools = HostTools::new(settings.path.clone());
    let host = HostFacts {
        uid,
        gid,
        user,
        subuid: std::fs::read_to_string("/etc/subuid").unwrap_or_default(),
        subgid: std::fs::read_to_string("/etc/subgid").unwrap_or_default(),
        tools: &tools,
        scratch: scratch.path(),
        store: settings.store.clone(),
    };
    let checks = crate::doctor::check(&host);
    let text = if args.json {
        serde_json::to_string_pretty(&checks).map_err(|e| miette::miette!("{e}"))? + "\n"
    } else {
        render(&checks)
    };
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    write_stdout(text.as_bytes())?;
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let status = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(out, "{status}  {:<16} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            let _ = writeln!(out, "      {:<16} fix: {fix}", "");
        }
    }
    let (warn, fail) = checks.iter().fold((0, 0), |(w, f), c| match c.status {
        Status::Warn => (w + 1, f),
        Status::Fail => (w, f + 1),
        Status::Ok => (w, f),
    });
    let _ = match (warn, fail) {
        (0, 0) => writeln!(out, "\neverything pkg needs is here"),
        (w, 0) => writeln!(out, "\npkg works here; {w} optional piece(s) missing"),
        (_, f) => writeln!(out, "\n{f} problem(s) stop pkg from working here"),
    };
    out
}
