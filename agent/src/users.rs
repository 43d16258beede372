//! As whom a command runs: `/etc/passwd` and `/etc/group` read into bounded buffers and parsed
//! (pure functions over bytes), a user specification (`NAME[:GROUP]` or `UID[:GID]`) resolved
//! into [`Credentials`], and [`authorize`], the policy's decision for one request.
//!
//! The files are read when a command starts, not at boot: the guest may add users. Each file is
//! read up to [`FILE_BUFFER`] bytes; of a longer one, the lines past that bound are ignored (a
//! user or group listed only there is unknown by name; numbers still work), which can only
//! lose supplementary groups, never grant one.

use core::ffi::CStr;

use ferry_wire::session::Refusal;
use ferry_wire::ErrorCode;

use crate::policy::Policy;

/// How much of `/etc/passwd` or `/etc/group` is read.
pub const FILE_BUFFER: usize = 16 * 1024;
/// The most groups (supplementary and primary) a command gets; more are dropped.
pub const MAX_GROUPS: usize = 32;
/// The longest user name the agent handles; longer entries are ignored.
pub const MAX_NAME: usize = 64;
/// The longest home directory or shell the agent handles; longer entries are ignored.
pub const MAX_FIELD_PATH: usize = 255;

/// The home directory of a user without one.
pub const DEFAULT_HOME: &[u8] = b"/";
/// The shell of a user without one.
pub const DEFAULT_SHELL: &[u8] = b"/bin/sh";

/// Who a command runs as, resolved before `clone`; the child only reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: those of `/etc/group` that list the user, and `gid`.
    pub groups: heapless::Vec<u32, MAX_GROUPS>,
    /// For `HOME`.
    pub home: heapless::Vec<u8, MAX_FIELD_PATH>,
    /// For `SHELL`.
    pub shell: heapless::Vec<u8, MAX_FIELD_PATH>,
    /// For `USER` and `LOGNAME`: the passwd name, or the uid in decimal.
    pub name: heapless::Vec<u8, MAX_NAME>,
    /// Whether the child sets groups, gid and uid; `false` keeps the agent's own (when the
    /// agent is not root, or runs commands as itself).
    pub switch: bool,
    /// Whether the child sets `PR_SET_NO_NEW_PRIVS` (no privileges gained through setuid or
    /// file capabilities), unless the policy has `allow_setuid`.
    pub no_new_privs: bool,
    /// The `tty` group of `/etc/group`, which a command's terminal belongs to (so `write` and
    /// `wall` work as on any Linux); `None` without one.
    pub tty_gid: Option<u32>,
}

/// Why a specification does not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserError {
    /// The user name is not in `/etc/passwd`.
    UnknownUser,
    /// The group name is not in `/etc/group`.
    UnknownGroup,
    /// Not `NAME[:GROUP]` or `UID[:GID]`.
    BadSpec,
}

impl UserError {
    /// For people, in one line.
    pub fn as_str(self) -> &'static str {
        match self {
            UserError::UnknownUser => "unknown user",
            UserError::UnknownGroup => "unknown group",
            UserError::BadSpec => "bad user specification",
        }
    }

    fn refusal(self) -> Refusal {
        Refusal::new(ErrorCode::InvalidRequest, self.as_str())
    }
}

/// One usable line of `/etc/passwd`: `name:password:uid:gid:gecos:home:shell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswdEntry<'a> {
    pub name: &'a [u8],
    pub uid: u32,
    pub gid: u32,
    pub home: &'a [u8],
    pub shell: &'a [u8],
}

/// One usable line of `/etc/group`: `name:password:gid[:member,member…]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupEntry<'a> {
    pub name: &'a [u8],
    pub gid: u32,
    /// Comma-separated user names.
    pub members: &'a [u8],
}

impl GroupEntry<'_> {
    /// Whether `user` is listed as a member.
    pub fn has_member(&self, user: &[u8]) -> bool {
        !user.is_empty() && self.members.split(|b| *b == b',').any(|m| m == user)
    }
}

/// The usable entries of a passwd file: lines with too few fields, a non-numeric uid or gid, or
/// a field longer than the agent handles are skipped; so are NIS `+`/`-` lines.
pub fn passwd_entries(text: &[u8]) -> impl Iterator<Item = PasswdEntry<'_>> {
    lines(text).filter_map(|line| {
        let mut fields = line.split(|b| *b == b':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let uid = crate::config::parse_u32(fields.next()?)?;
        let gid = crate::config::parse_u32(fields.next()?)?;
        let _gecos = fields.next()?;
        let home = fields.next()?;
        let shell = fields.next()?;
        // -1 means "unchanged" to the kernel: never a user.
        let usable = !name.is_empty()
            && uid != u32::MAX
            && gid != u32::MAX
            && name.len() <= MAX_NAME
            && home.len() <= MAX_FIELD_PATH
            && shell.len() <= MAX_FIELD_PATH;
        usable.then_some(PasswdEntry {
            name,
            uid,
            gid,
            home,
            shell,
        })
    })
}

/// The usable entries of a group file: lines with too few fields or a non-numeric gid are
/// skipped. The member list may be missing.
pub fn group_entries(text: &[u8]) -> impl Iterator<Item = GroupEntry<'_>> {
    lines(text).filter_map(|line| {
        let mut fields = line.splitn(4, |b| *b == b':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let gid = crate::config::parse_u32(fields.next()?)?;
        let members = fields.next().unwrap_or(&[]);
        (!name.is_empty() && gid != u32::MAX).then_some(GroupEntry { name, gid, members })
    })
}

/// Lines without their CR, blank ones and comments skipped.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
}

/// The contents of `/etc/passwd` and `/etc/group` (empty when missing).
#[derive(Debug, Clone, Copy)]
pub struct Files<'a> {
    pub passwd: &'a [u8],
    pub group: &'a [u8],
}

/// A specification resolved, with what the policy check needs besides the credentials.
struct Resolved {
    credentials: Credentials,
    /// Whether the gid is the user's own: its passwd group (its own number for a uid without
    /// an entry) or one that lists it (always when no group was named).
    own_group: bool,
}

/// Resolves `NAME[:GROUP]` or `UID[:GID]`. A number need not be in the files: a uid without a
/// passwd entry gets its own number as gid, home `/`, shell `/bin/sh` and its number as name.
/// A name must be in the files. Supplementary groups come from `/etc/group` by user name.
/// (The agent itself resolves through [`authorize`].)
#[cfg(test)]
pub fn resolve(spec: &[u8], files: Files<'_>) -> Result<Credentials, UserError> {
    resolve_spec(spec, files).map(|resolved| resolved.credentials)
}

fn resolve_spec(spec: &[u8], files: Files<'_>) -> Result<Resolved, UserError> {
    let mut parts = spec.splitn(2, |b| *b == b':');
    let user = parts.next().unwrap_or(&[]);
    let group = parts.next();
    if user.is_empty() || group.is_some_and(|g| g.is_empty()) {
        return Err(UserError::BadSpec);
    }
    let entry = match crate::config::parse_u32(user) {
        // -1 means "unchanged" to the kernel.
        Some(u32::MAX) => return Err(UserError::BadSpec),
        Some(uid) => passwd_entries(files.passwd).find(|e| e.uid == uid),
        None if is_number(user) => return Err(UserError::BadSpec),
        None => Some(
            passwd_entries(files.passwd)
                .find(|e| e.name == user)
                .ok_or(UserError::UnknownUser)?,
        ),
    };
    let mut credentials = match entry {
        Some(entry) => credentials_of(&entry),
        None => {
            // A number without an entry: `parse_u32` succeeded above.
            let uid = crate::config::parse_u32(user).ok_or(UserError::BadSpec)?;
            numeric_credentials(uid, uid)
        }
    };
    // The user's primary group: its passwd group, or its own number without an entry (what it
    // runs with when no group is named, so naming it is no privilege).
    let primary_gid = credentials.gid;
    let name = entry.map(|e| e.name).unwrap_or(&[]);
    if let Some(group) = group {
        credentials.gid = match crate::config::parse_u32(group) {
            Some(u32::MAX) => return Err(UserError::BadSpec),
            Some(gid) => gid,
            None if is_number(group) => return Err(UserError::BadSpec),
            None => group_entries(files.group)
                .find(|e| e.name == group)
                .map(|e| e.gid)
                .ok_or(UserError::UnknownGroup)?,
        };
    }
    let gid = credentials.gid;
    credentials.groups.clear();
    let _ = credentials.groups.push(gid);
    let mut own_group = group.is_none() || primary_gid == gid;
    for entry in group_entries(files.group).filter(|e| e.has_member(name)) {
        own_group |= entry.gid == gid;
        if !credentials.groups.contains(&entry.gid) {
            // Beyond MAX_GROUPS, a group is dropped: fewer privileges, never more.
            let _ = credentials.groups.push(entry.gid);
        }
    }
    Ok(Resolved {
        credentials,
        own_group,
    })
}

fn is_number(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(u8::is_ascii_digit)
}

fn credentials_of(entry: &PasswdEntry<'_>) -> Credentials {
    fn or<'f>(field: &'f [u8], default: &'static [u8]) -> &'f [u8] {
        if field.is_empty() {
            default
        } else {
            field
        }
    }
    let mut credentials = numeric_credentials(entry.uid, entry.gid);
    credentials.home.clear();
    credentials.shell.clear();
    credentials.name.clear();
    // Each fits: `passwd_entries` skips longer fields.
    let _ = credentials
        .home
        .extend_from_slice(or(entry.home, DEFAULT_HOME));
    let _ = credentials
        .shell
        .extend_from_slice(or(entry.shell, DEFAULT_SHELL));
    let _ = credentials.name.extend_from_slice(entry.name);
    credentials
}

/// `uid`/`gid` without a passwd entry: name the uid in decimal, home `/`, shell `/bin/sh`, no
/// other group; switched to, with `no_new_privs`.
pub fn numeric_credentials(uid: u32, gid: u32) -> Credentials {
    let mut credentials = Credentials {
        uid,
        gid,
        groups: heapless::Vec::new(),
        home: heapless::Vec::new(),
        shell: heapless::Vec::new(),
        name: heapless::Vec::new(),
        switch: true,
        no_new_privs: true,
        tty_gid: None,
    };
    let _ = credentials.groups.push(gid);
    let _ = credentials.home.extend_from_slice(DEFAULT_HOME);
    let _ = credentials.shell.extend_from_slice(DEFAULT_SHELL);
    let mut digits = [0u8; 10];
    let _ = credentials
        .name
        .extend_from_slice(decimal(uid, &mut digits));
    credentials
}

/// `value` in decimal, in `buf`.
pub fn decimal(mut value: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut first = buf.len();
    for (at, digit) in buf.iter_mut().enumerate().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
        first = at;
        if value == 0 {
            break;
        }
    }
    buf.get(first..).unwrap_or(&[])
}

/// The agent's own identity, as [`authorize`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentIdentity {
    pub uid: u32,
    pub gid: u32,
    /// Whether the agent may change a command's credentials (its effective uid is 0).
    pub is_root: bool,
}

impl AgentIdentity {
    /// This process's effective uid and gid.
    pub fn current() -> Self {
        let uid = rustix::process::geteuid().as_raw();
        AgentIdentity {
            uid,
            gid: rustix::process::getegid().as_raw(),
            is_root: uid == 0,
        }
    }
}

const NOT_ALLOWED: Refusal = Refusal::new(
    ErrorCode::PermissionDenied,
    "user not allowed by the agent's policy",
);
const GROUP_NOT_ALLOWED: Refusal = Refusal::new(
    ErrorCode::PermissionDenied,
    "group not allowed by the agent's policy",
);
const NOT_ROOT: Refusal = Refusal::new(ErrorCode::PermissionDenied, "the agent is not root");

/// Who a command runs as: `requested` (a `USER[:GROUP]` spec) or, when `None`, the policy's
/// `user`. Reads `/etc/passwd` and `/etc/group`; the rules are [`authorize_with`]'s.
// Kept out of line: its large stack frame (the two files) must not be probed into the caller's.
#[inline(never)]
pub fn authorize(
    policy: &Policy,
    requested: Option<&[u8]>,
    agent_is_root: bool,
) -> Result<Credentials, Refusal> {
    let mut passwd = [0u8; FILE_BUFFER];
    let mut group = [0u8; FILE_BUFFER];
    let files = Files {
        passwd: read_lines(c"/etc/passwd", &mut passwd),
        group: read_lines(c"/etc/group", &mut group),
    };
    let agent = AgentIdentity {
        is_root: agent_is_root,
        ..AgentIdentity::current()
    };
    authorize_with(policy, requested, agent, files)
}

/// The rules:
/// - An agent that is not root runs every command as itself (its uid and gid, unchanged);
///   asking for any other user or group is `PermissionDenied` ("the agent is not root").
/// - Otherwise, no request (`None`) means the policy's `user`, or the agent itself when the
///   policy has `run_as_agent_user`.
/// - A requested user is allowed when it is the policy's `user` as written, or `allow_users`
///   has `*`, or names it (by the name asked for, its passwd name or its uid). Root (uid 0) is
///   allowed only by `root`, `0` or `*`, never through another name for uid 0. A group in the
///   request must be the user's own (its passwd group or a group listing it) unless
///   `allow_users` has `*`.
/// - A name that does not resolve is `InvalidRequest` ("unknown user", "unknown group").
pub fn authorize_with(
    policy: &Policy,
    requested: Option<&[u8]>,
    agent: AgentIdentity,
    files: Files<'_>,
) -> Result<Credentials, Refusal> {
    let mut credentials = decide(policy, requested, agent, files)?;
    credentials.tty_gid = tty_gid(files.group);
    Ok(credentials)
}

/// The `tty` group's gid in a group file's contents.
pub fn tty_gid(group: &[u8]) -> Option<u32> {
    group_entries(group)
        .find(|e| e.name == b"tty")
        .map(|e| e.gid)
}

/// The system's `tty` group (see [`tty_gid`]), from `/etc/group`.
// Kept out of line: its large stack frame (the file) must not be probed into the caller's.
#[inline(never)]
pub fn system_tty_gid() -> Option<u32> {
    let mut group = [0u8; FILE_BUFFER];
    tty_gid(read_lines(c"/etc/group", &mut group))
}

/// [`authorize_with`]'s decision, before the terminal's group is added.
fn decide(
    policy: &Policy,
    requested: Option<&[u8]>,
    agent: AgentIdentity,
    files: Files<'_>,
) -> Result<Credentials, Refusal> {
    let no_new_privs = !policy.allow_setuid;
    if !agent.is_root || (requested.is_none() && !policy.unprivileged_default) {
        if let Some(spec) = requested {
            let resolved = resolve_spec(spec, files).map_err(UserError::refusal)?;
            let asked_group = spec.contains(&b':');
            let same = resolved.credentials.uid == agent.uid
                && (!asked_group || resolved.credentials.gid == agent.gid);
            if !same {
                return Err(NOT_ROOT);
            }
        }
        let mut credentials = match passwd_entries(files.passwd).find(|e| e.uid == agent.uid) {
            Some(entry) => credentials_of(&entry),
            None => numeric_credentials(agent.uid, agent.gid),
        };
        credentials.gid = agent.gid;
        credentials.groups.clear();
        let _ = credentials.groups.push(agent.gid);
        credentials.switch = false;
        credentials.no_new_privs = no_new_privs;
        return Ok(credentials);
    }
    let default = policy.user.as_slice();
    let spec = requested.unwrap_or(default);
    let resolved = resolve_spec(spec, files).map_err(UserError::refusal)?;
    if spec != default {
        let any = policy.allows_any_user();
        let user = spec.split(|b| *b == b':').next().unwrap_or(spec);
        let mut digits = [0u8; 10];
        let uid = decimal(resolved.credentials.uid, &mut digits);
        let listed = |entry: &[u8]| {
            if resolved.credentials.uid == 0 {
                entry == b"root" || entry == b"0"
            } else {
                entry == user || entry == uid || entry == resolved.credentials.name.as_slice()
            }
        };
        if !any && !policy.allowed_users().any(listed) {
            return Err(NOT_ALLOWED);
        }
        if !any && !resolved.own_group {
            return Err(GROUP_NOT_ALLOWED);
        }
    }
    let mut credentials = resolved.credentials;
    credentials.switch = true;
    credentials.no_new_privs = no_new_privs;
    Ok(credentials)
}

/// Reads as much of the file at `path` as fits `buf`, less a line cut off at the end; nothing
/// when the file cannot be read.
fn read_lines<'b>(path: &CStr, buf: &'b mut [u8]) -> &'b [u8] {
    match crate::file::read(path, buf) {
        Ok(crate::file::FileText {
            text,
            truncated: false,
        }) => text,
        Ok(crate::file::FileText {
            text,
            truncated: true,
        }) => {
            let end = text.iter().rposition(|b| *b == b'\n').unwrap_or(0);
            text.get(..end).unwrap_or(&[])
        }
        Err(_) => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        short:x:5\n\
        bad:x:abc:1::/:/bin/sh\n\
        +nis::::::\n\
        \n\
        app:x:1000:1000:App,,,:/home/app:/bin/zsh\r\n\
        toor:x:0:0::/root:/bin/sh\n\
        nohome:x:1001:1001:::\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin";
    const GROUP: &[u8] = b"root:x:0:\n\
        wheel:x:10:app,other\n\
        staff:x:50:app\r\n\
        audio:x:29\n\
        broken:x:zz:app\n\
        nogroup:x:65534:\n\
        empty:x:70:";

    fn files() -> Files<'static> {
        Files {
            passwd: PASSWD,
            group: GROUP,
        }
    }

    #[test]
    fn the_tty_group() {
        assert_eq!(tty_gid(GROUP), None);
        assert_eq!(tty_gid(b"root:x:0:\ntty:x:5:\n"), Some(5));
        assert_eq!(tty_gid(b"ttyx:x:7:\ntty:x:bad:\n"), None);
        assert_eq!(tty_gid(b"tty:x:9"), Some(9));
    }

    #[test]
    fn passwd_lines() {
        let names: Vec<&[u8]> = passwd_entries(PASSWD).map(|e| e.name).collect();
        let expected: [&[u8]; 6] = [b"root", b"daemon", b"app", b"toor", b"nohome", b"nobody"];
        assert_eq!(names, expected);
        let app = passwd_entries(PASSWD).find(|e| e.name == b"app").unwrap();
        assert_eq!(app.shell, b"/bin/zsh", "the CR is not part of it");
        assert_eq!(passwd_entries(b"").count(), 0);
        assert_eq!(passwd_entries(b"\n\n\n").count(), 0);
        // No newline at the end of the file: the last line still counts.
        assert_eq!(passwd_entries(b"a:x:1:2:::").count(), 1);
        assert_eq!(passwd_entries(b"a:x:1:2::").count(), 0, "too few fields");
        assert_eq!(passwd_entries(b":x:1:2:::").count(), 0, "no name");
        assert_eq!(passwd_entries(b"a:x:-1:2:::").count(), 0);
        assert_eq!(passwd_entries(b"a:x:4294967295:2:::").count(), 0, "-1");
        assert_eq!(passwd_entries(b"a:x:4294967296:2:::").count(), 0);
        let long = [b"a:x:1:2::/".as_slice(), &[b'h'; MAX_FIELD_PATH], b":"].concat();
        assert_eq!(passwd_entries(&long).count(), 0, "a home too long");
        let _ = passwd_entries(&[0xff; 5000]).count();
        let _ = passwd_entries(&[b':'; 5000]).count();
    }

    #[test]
    fn group_lines() {
        let entries: Vec<_> = group_entries(GROUP).collect();
        assert_eq!(
            entries.len(),
            6,
            "broken is skipped; audio's members are optional"
        );
        let wheel = entries.iter().find(|e| e.name == b"wheel").unwrap();
        assert!(wheel.has_member(b"app") && wheel.has_member(b"other"));
        assert!(!wheel.has_member(b"ap") && !wheel.has_member(b""));
        let staff = entries.iter().find(|e| e.name == b"staff").unwrap();
        assert!(staff.has_member(b"app"), "the CR is not part of it");
        assert_eq!(group_entries(b"g:x").count(), 0);
        assert_eq!(group_entries(b"g:x:4294967295:").count(), 0);
    }

    #[test]
    fn resolution_by_name() {
        let app = resolve(b"app", files()).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups.as_slice(), &[1000, 10, 50]);
        assert_eq!(app.home.as_slice(), b"/home/app");
        assert_eq!(app.shell.as_slice(), b"/bin/zsh");
        assert_eq!(app.name.as_slice(), b"app");

        let app = resolve(b"app:staff", files()).unwrap();
        assert_eq!(app.gid, 50);
        assert_eq!(app.groups.as_slice(), &[50, 10]);
        let app = resolve(b"app:7", files()).unwrap();
        assert_eq!(app.groups.as_slice(), &[7, 10, 50]);

        let nohome = resolve(b"nohome", files()).unwrap();
        assert_eq!(nohome.home.as_slice(), DEFAULT_HOME);
        assert_eq!(nohome.shell.as_slice(), DEFAULT_SHELL);

        assert_eq!(resolve(b"ghost", files()), Err(UserError::UnknownUser));
        assert_eq!(
            resolve(b"app:ghosts", files()),
            Err(UserError::UnknownGroup)
        );
        assert_eq!(
            resolve(
                b"app",
                Files {
                    passwd: b"",
                    group: b""
                }
            ),
            Err(UserError::UnknownUser)
        );
    }

    #[test]
    fn resolution_by_number() {
        let root = resolve(b"0", files()).unwrap();
        assert_eq!(root.name.as_slice(), b"root", "the first entry for uid 0");
        let nobody = resolve(b"65534:65534", files()).unwrap();
        assert_eq!(nobody.name.as_slice(), b"nobody");
        assert_eq!(nobody.groups.as_slice(), &[65534]);

        // Numbers need no file.
        let none = Files {
            passwd: b"",
            group: b"",
        };
        let unknown = resolve(b"4242", none).unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4242, 4242));
        assert_eq!(unknown.name.as_slice(), b"4242");
        assert_eq!(unknown.home.as_slice(), b"/");
        assert_eq!(unknown.shell.as_slice(), b"/bin/sh");
        assert_eq!(unknown.groups.as_slice(), &[4242]);
        let unknown = resolve(b"4242:7", none).unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4242, 7));
        assert_eq!(resolve(b"app:50", none), Err(UserError::UnknownUser));

        for bad in [
            &b""[..],
            b":",
            b"a:",
            b":1",
            b"4294967295",
            b"1:4294967295",
            b"99999999999",
        ] {
            assert!(resolve(bad, files()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn groups_are_bounded() {
        let mut group = Vec::new();
        for gid in 0..100 {
            group.extend_from_slice(format!("g{gid}:x:{}:app\n", gid + 100).as_bytes());
        }
        let files = Files {
            passwd: PASSWD,
            group: &group,
        };
        let app = resolve(b"app", files).unwrap();
        assert_eq!(app.groups.len(), MAX_GROUPS);
        assert_eq!(
            app.groups.first(),
            Some(&1000),
            "the primary group first, always"
        );
    }

    const AGENT_ROOT: AgentIdentity = AgentIdentity {
        uid: 0,
        gid: 0,
        is_root: true,
    };

    fn policy(settings: &[(&str, &str)]) -> Policy {
        let mut policy = Policy::defaults();
        for (key, value) in settings {
            policy.apply(key.as_bytes(), value.as_bytes()).unwrap();
        }
        policy
    }

    fn authorized(policy: &Policy, requested: Option<&str>) -> Result<Credentials, Refusal> {
        authorize_with(policy, requested.map(str::as_bytes), AGENT_ROOT, files())
    }

    fn refused(policy: &Policy, requested: &str) -> (ErrorCode, &'static str) {
        let refusal = authorized(policy, Some(requested)).unwrap_err();
        (refusal.code, refusal.message)
    }

    const DENIED: (ErrorCode, &str) = (
        ErrorCode::PermissionDenied,
        "user not allowed by the agent's policy",
    );

    #[test]
    fn the_default_user() {
        let nobody = authorized(&Policy::defaults(), None).unwrap();
        assert_eq!((nobody.uid, nobody.gid), (65534, 65534));
        assert!(nobody.switch && nobody.no_new_privs);
        let app = authorized(&policy(&[("user", "app"), ("allow_setuid", "1")]), None).unwrap();
        assert_eq!(app.uid, 1000);
        assert!(!app.no_new_privs);
        // The default user as written is always allowed, even asked for by name.
        assert!(authorized(&Policy::defaults(), Some("65534:65534")).is_ok());
        // A default that does not resolve is reported per request.
        let ghost = authorized(&policy(&[("user", "ghost")]), None).unwrap_err();
        assert_eq!(ghost.code, ErrorCode::InvalidRequest);
        assert_eq!(ghost.message, "unknown user");
    }

    #[test]
    fn run_as_agent_user() {
        let policy = policy(&[("run_as_agent_user", "true")]);
        let itself = authorized(&policy, None).unwrap();
        assert_eq!((itself.uid, itself.gid), (0, 0));
        assert!(!itself.switch);
        assert_eq!(itself.name.as_slice(), b"root");
        assert_eq!(itself.home.as_slice(), b"/root");
        // A request still goes by the rules.
        assert_eq!(refused(&policy, "app"), DENIED);
    }

    #[test]
    fn allow_users() {
        let none = Policy::defaults();
        assert_eq!(refused(&none, "app"), DENIED);
        assert_eq!(refused(&none, "0"), DENIED);
        assert_eq!(
            refused(&none, "65534"),
            DENIED,
            "not the default as written"
        );

        let by_name = policy(&[("allow_users", "app")]);
        assert_eq!(authorized(&by_name, Some("app")).unwrap().uid, 1000);
        assert_eq!(
            authorized(&by_name, Some("1000")).unwrap().uid,
            1000,
            "its number"
        );
        assert_eq!(refused(&by_name, "daemon"), DENIED);

        let by_number = policy(&[("allow_users", "1000,4242")]);
        assert_eq!(authorized(&by_number, Some("app")).unwrap().uid, 1000);
        assert_eq!(
            authorized(&by_number, Some("4242"))
                .unwrap()
                .name
                .as_slice(),
            b"4242"
        );

        // Root only as root, 0 or *: not through another name for uid 0.
        let toor = policy(&[("allow_users", "toor")]);
        assert_eq!(refused(&toor, "toor"), DENIED);
        for allowed in ["root", "0", "*"] {
            let policy = policy(&[("allow_users", allowed)]);
            let root = authorized(&policy, Some("root")).unwrap();
            assert_eq!(root.uid, 0);
            assert!(root.switch);
            assert_eq!(authorized(&policy, Some("toor")).unwrap().uid, 0);
        }

        let any = policy(&[("allow_users", "*")]);
        assert_eq!(authorized(&any, Some("daemon")).unwrap().uid, 1);
        assert_eq!(authorized(&any, Some("app:0")).unwrap().gid, 0);
        assert_eq!(
            refused(&any, "ghost"),
            (ErrorCode::InvalidRequest, "unknown user")
        );
        assert_eq!(
            refused(&any, "app:ghosts"),
            (ErrorCode::InvalidRequest, "unknown group")
        );
        assert_eq!(
            refused(&any, "app:"),
            (ErrorCode::InvalidRequest, "bad user specification")
        );
    }

    #[test]
    fn requested_groups_must_be_the_users_own() {
        let policy = policy(&[("allow_users", "app")]);
        assert_eq!(
            authorized(&policy, Some("app:app")).err().map(|r| r.code),
            Some(ErrorCode::InvalidRequest),
            "no group named app"
        );
        assert_eq!(authorized(&policy, Some("app:1000")).unwrap().gid, 1000);
        assert_eq!(authorized(&policy, Some("app:staff")).unwrap().gid, 50);
        assert_eq!(authorized(&policy, Some("app:wheel")).unwrap().gid, 10);
        let root_group = authorized(&policy, Some("app:root")).unwrap_err();
        assert_eq!(root_group.code, ErrorCode::PermissionDenied);
        assert_eq!(
            root_group.message,
            "group not allowed by the agent's policy"
        );
        assert_eq!(
            authorized(&policy, Some("app:0")).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
    }

    #[test]
    fn a_uid_without_an_entry_owns_its_own_number_as_group() {
        // It runs with its own number as gid: naming that group is no more than the default;
        // any other is not its own.
        let numeric = policy(&[("allow_users", "4242")]);
        let own = authorized(&numeric, Some("4242:4242")).unwrap();
        assert_eq!((own.uid, own.gid), (4242, 4242));
        assert_eq!(
            authorized(&numeric, Some("4242:4243")).unwrap_err().message,
            "group not allowed by the agent's policy"
        );
        assert_eq!(
            authorized(&numeric, Some("4242:0")).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
    }

    #[test]
    fn an_agent_that_is_not_root_runs_commands_as_itself() {
        let agent = AgentIdentity {
            uid: 1000,
            gid: 1000,
            is_root: false,
        };
        let any = policy(&[("allow_users", "*")]);
        let run = |policy: &Policy, requested: Option<&str>| {
            authorize_with(policy, requested.map(str::as_bytes), agent, files())
        };
        for policy in [&Policy::defaults(), &any] {
            let itself = run(policy, None).unwrap();
            assert_eq!((itself.uid, itself.gid), (1000, 1000));
            assert!(!itself.switch);
            assert!(itself.no_new_privs);
            assert_eq!(itself.name.as_slice(), b"app");
            assert_eq!(itself.home.as_slice(), b"/home/app");
            // Itself, asked for.
            assert!(run(policy, Some("app")).is_ok());
            assert!(run(policy, Some("1000:1000")).is_ok());
            for other in ["root", "nobody", "app:staff", "4242"] {
                let refusal = run(policy, Some(other)).unwrap_err();
                assert_eq!(refusal.code, ErrorCode::PermissionDenied, "{other}");
                assert_eq!(refusal.message, "the agent is not root");
            }
        }
        // Without a passwd entry, its numbers.
        let stranger = AgentIdentity {
            uid: 4242,
            gid: 7,
            is_root: false,
        };
        let itself = authorize_with(&Policy::defaults(), None, stranger, files()).unwrap();
        assert_eq!((itself.uid, itself.gid), (4242, 7));
        assert_eq!(itself.name.as_slice(), b"4242");
        assert_eq!(itself.groups.as_slice(), &[7]);
    }

    #[test]
    fn reading_files() {
        let dir = std::env::temp_dir().join(format!("ferry-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("passwd");
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        std::fs::write(&path, b"a:x:1:1:::\nb:x:2:2:::\n").unwrap();
        let mut buf = [0u8; 22];
        let read = crate::file::read(&c_path, &mut buf).unwrap();
        assert_eq!(
            (read.text.len(), read.truncated),
            (22, false),
            "exactly full"
        );
        let mut buf = [0u8; 15];
        let read = crate::file::read(&c_path, &mut buf).unwrap();
        assert!(read.truncated);
        // A cut-off last line is dropped, not half-parsed.
        assert_eq!(read_lines(&c_path, &mut buf), b"a:x:1:1:::");
        let mut buf = [0u8; 5];
        assert_eq!(read_lines(&c_path, &mut buf), b"");
        assert_eq!(read_lines(c"/nonexistent/passwd", &mut buf), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
