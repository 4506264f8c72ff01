//! The user workers run as (`--user USER[:GROUP]`): resolved once at start-up from the user and
//! group databases, applied by [`crate::spawn`] between fork and exec. A leaf module (the config
//! parser and the spawner both name it).

/// The user and groups workers run as (`--user USER[:GROUP]`), resolved once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    /// The user's name (for `USER`/`LOGNAME`).
    pub name: String,
    /// Its uid.
    pub uid: libc::uid_t,
    /// The primary group (the user's, or `:GROUP`).
    pub gid: libc::gid_t,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<libc::gid_t>,
    /// Its home directory (for `HOME`).
    pub home: std::path::PathBuf,
}

impl WorkerUser {
    /// Resolves `USER[:GROUP]` (names or numbers) from the user and group databases.
    pub fn resolve(spec: &str) -> Result<Self, String> {
        use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let user = match u.parse::<u32>() {
            Ok(n) => User::from_uid(Uid::from_raw(n)),
            Err(_) => User::from_name(u),
        }
        .map_err(|e| format!("cannot look up user `{u}`: {e}"))?
        .ok_or_else(|| format!("no such user `{u}`"))?;
        let gid = match g {
            None => user.gid,
            Some(g) => match g.parse::<u32>() {
                Ok(n) => Gid::from_raw(n),
                Err(_) => {
                    Group::from_name(g)
                        .map_err(|e| format!("cannot look up group `{g}`: {e}"))?
                        .ok_or_else(|| format!("no such group `{g}`"))?
                        .gid
                }
            },
        };
        let cname = std::ffi::CString::new(user.name.clone())
            .map_err(|_| format!("bad user name `{}`", user.name))?;
        let mut groups: Vec<libc::gid_t> = getgrouplist(&cname, user.gid)
            .map_err(|e| format!("cannot list the groups of `{}`: {e}", user.name))?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        if !groups.contains(&gid.as_raw()) {
            groups.push(gid.as_raw());
        }
        Ok(Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: gid.as_raw(),
            groups,
            home: user.dir,
        })
    }
}
