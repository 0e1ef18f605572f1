//! The workload's user: `USER[:GROUP]` (names or numbers) resolved against
//! the image's `/etc/passwd` and `/etc/group`, as docker and podman do.
//!
//! - a number needs no entry; a name must have one;
//! - without a group, the user's primary group from `/etc/passwd`, else 0;
//! - the home directory is the user's entry's, else `/` (`/root` for uid 0);
//! - the supplementary groups are the group, then, when no group was given,
//!   every group that lists the user's name as a member (as docker and runc
//!   set them; with an explicit group, that group alone).

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    /// Supplementary group ids: `gid` first, no duplicates.
    pub groups: Vec<u32>,
}

/// Why a user spec could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unknown user `{0}`: the image's /etc/passwd has no such entry")]
    UnknownUser(String),
    #[error("unknown group `{0}`: the image's /etc/group has no such entry")]
    UnknownGroup(String),
    #[error("invalid user `{0}`: expected USER[:GROUP] with names or numbers")]
    Invalid(String),
}

/// One line of `/etc/passwd`.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6).then_some(())?;
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[0] == name).then(|| f[2].parse().ok()).flatten()
    })
}

/// `gid`, then the ids of the groups whose member list names `user`.
fn groups_of(group: &str, user: Option<&str>, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    let member_of = group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let listed = f.len() >= 4 && f[3].split(',').any(|m| Some(m.trim()) == user);
        listed.then(|| f[2].parse().ok()).flatten()
    });
    for id in member_of {
        if !groups.contains(&id) {
            groups.push(id);
        }
    }
    groups
}

/// Resolves `spec` (`""` means root) with the image's `passwd` and `group`
/// contents (empty when the image has none).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<User, UserError> {
    let spec = spec.trim();
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_spec == Some("") || (user.is_empty() && group_spec.is_some()) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user = if user.is_empty() { "0" } else { user };
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd_entries(passwd).find(|e| e.uid == uid)),
        Err(_) => {
            let entry = passwd_entries(passwd)
                .find(|e| e.name == user)
                .ok_or_else(|| UserError::UnknownUser(user.to_string()))?;
            (entry.uid, Some(entry))
        }
    };
    let gid = match group_spec {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_id(group, g).ok_or_else(|| UserError::UnknownGroup(g.to_string()))?,
        },
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    let home = match &entry {
        Some(e) if !e.home.is_empty() => e.home.to_string(),
        _ if uid == 0 => "/root".to_string(),
        _ => "/".to_string(),
    };
    let groups = match group_spec {
        Some(_) => vec![gid],
        None => groups_of(group, entry.as_ref().map(|e| e.name), gid),
    };
    Ok(User { uid, gid, home, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65533:nonroot:/home/nonroot:/sbin/nologin\nbad line\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\nwheel:x:10:root,nonroot\nadm:x:4: nonroot\n";

    #[test]
    fn names_and_numbers_resolve_like_docker() {
        let user = |spec| resolve(spec, PASSWD, GROUP);
        let ok = |uid, gid, home: &str, groups: &[u32]| {
            Ok(User { uid, gid, home: home.into(), groups: groups.to_vec() })
        };
        assert_eq!(user(""), ok(0, 0, "/root", &[0, 10]));
        assert_eq!(user("nonroot"), ok(65532, 65533, "/home/nonroot", &[65533, 10, 4]));
        assert_eq!(user("65532"), ok(65532, 65533, "/home/nonroot", &[65533, 10, 4]));
        // No entry, so no name to be a member by.
        assert_eq!(user("1234"), ok(1234, 0, "/", &[0]));
        // An explicit group is the only one, as with docker.
        assert_eq!(user("1234:staff"), ok(1234, 50, "/", &[50]));
        assert_eq!(user("nonroot:7"), ok(65532, 7, "/home/nonroot", &[7]));
        assert_eq!(user("root:wheel"), ok(0, 10, "/root", &[10]));
        assert_eq!(user("nobody"), Err(UserError::UnknownUser("nobody".into())));
        assert_eq!(user("0:floppy"), Err(UserError::UnknownGroup("floppy".into())));
        assert_eq!(user("0:"), Err(UserError::Invalid("0:".into())));
        assert_eq!(user(":0"), Err(UserError::Invalid(":0".into())));
    }
}
