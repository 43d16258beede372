//! The shipped agent's identity and start-up rules: as whom commands run (the policy's `user`,
//! `allow_users`, requested users and groups), the environment and privileges they get, the
//! file-size rlimit at its edge, the refusals that stop the agent before it serves (secret file,
//! policy), and `--insecure`. These tests run as root: the agent can switch users.
#![allow(clippy::unwrap_used)] // a test reports failure by panicking

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Agent;
use ferry_host::{Client, Command, ConnectOptions, Error, ErrorCode, ExitStatus, Security};

const NOT_ALLOWED: &str = "user not allowed by the agent's policy";
const GROUP_NOT_ALLOWED: &str = "group not allowed by the agent's policy";

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `command` and expects it to exit 0; its stdout.
fn stdout_of(client: &Client, command: &Command) -> String {
    let out = client.output(command).unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stdout {:?}, stderr {:?}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `id -u`, `id -g` and `id -G` of a command run as `user` (the default when `None`).
fn ids(client: &Client, user: Option<&str>) -> String {
    let mut command = sh("id -u; id -g; id -G");
    if let Some(user) = user {
        command.user(user);
    }
    stdout_of(client, &command)
}

/// The agent's refusal of a command run as `user`: its code and message.
fn refusal(client: &Client, user: &str) -> (ErrorCode, String) {
    let mut command = Command::new("true");
    command.user(user);
    match client.output(&command) {
        Err(Error::Remote(remote)) => (remote.code, remote.message),
        other => panic!("{user}: expected a refusal, got {other:?}"),
    }
}

/// The `ferry` CLI, pointed at `agent` with its secret.
fn ferry(agent: &Agent) -> std::process::Command {
    let mut command = common::ferry(agent);
    command.stdin(Stdio::null());
    command
}

fn run_cli(agent: &Agent, args: &[&str]) -> std::process::Output {
    ferry(agent).args(args).output().unwrap()
}

/// A fresh directory owned by root, mode 0755: anyone may look in, only root may write.
fn root_dir(prefix: &str) -> PathBuf {
    let dir = common::fresh_dir(prefix);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().uid(),
        0,
        "the tests run as root"
    );
    dir
}

/// Writes `bytes` to a new file at `path` with `mode` (exactly, whatever the umask).
fn write_file(path: &Path, bytes: &[u8], mode: u32) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The `/etc/passwd` entry of `uid`: (name, home, shell), as the agent reads them.
fn passwd_entry(uid: u32) -> Option<(String, String, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 7 && fields[2].parse() == Ok(uid)).then(|| {
            let or = |field: &str, default: &str| {
                if field.is_empty() { default } else { field }.to_owned()
            };
            (
                fields[0].to_owned(),
                or(fields[5], "/"),
                or(fields[6], "/bin/sh"),
            )
        })
    })
}

/// `KEY=VALUE` lines of `env` as pairs, in order.
fn env_pairs(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn env_var<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn by_default_commands_run_as_65534_without_new_privileges() {
    let agent = Agent::start_unprivileged(&[]);
    let client = agent.client();
    assert_eq!(ids(&client, None), "65534\n65534\n65534\n");
    assert_eq!(
        stdout_of(&client, &sh("grep NoNewPrivs /proc/self/status")),
        "NoNewPrivs:\t1\n"
    );
    // The hello announces it.
    let bounds = client.health().unwrap().info.bounds;
    assert_eq!((bounds.default_uid, bounds.default_gid), (65534, 65534));

    // The agent started with --run-as-agent-user (the harness's default) runs them as itself.
    let itself = Agent::start();
    let client = itself.client();
    assert_eq!(ids(&client, None), "0\n0\n0\n");
    let bounds = client.health().unwrap().info.bounds;
    assert_eq!((bounds.default_uid, bounds.default_gid), (0, 0));
    assert_eq!(
        stdout_of(&client, &sh("grep NoNewPrivs /proc/self/status")),
        "NoNewPrivs:\t1\n",
        "no_new_privs unless allow_setuid, as the agent user too"
    );
    let setuid = Agent::start_with(&["--set", "allow_setuid=true"]);
    assert_eq!(
        stdout_of(&setuid.client(), &sh("grep NoNewPrivs /proc/self/status")),
        "NoNewPrivs:\t0\n"
    );
}

#[test]
fn the_default_user_gets_its_passwd_identity_in_the_environment() {
    // The agent's own identity variables must be replaced, its PATH kept.
    let agent = Agent::start_unprivileged_with(&[], |command| {
        command
            .env("HOME", "/agent-home")
            .env("USER", "agent")
            .env("LOGNAME", "agent")
            .env("SHELL", "/bin/agent-sh")
            .env("PATH", "/agent/bin:/usr/bin:/bin");
    });
    let client = agent.client();
    let (name, home, shell) = passwd_entry(65534)
        .unwrap_or_else(|| ("65534".to_owned(), "/".to_owned(), "/bin/sh".to_owned()));
    let env = env_pairs(&stdout_of(&client, &Command::new("env")));
    assert_eq!(env_var(&env, "HOME"), Some(home.as_str()), "{env:?}");
    assert_eq!(env_var(&env, "USER"), Some(name.as_str()), "{env:?}");
    assert_eq!(env_var(&env, "LOGNAME"), Some(name.as_str()), "{env:?}");
    assert_eq!(env_var(&env, "SHELL"), Some(shell.as_str()), "{env:?}");
    assert_eq!(
        env_var(&env, "PATH"),
        Some("/agent/bin:/usr/bin:/bin"),
        "{env:?}"
    );
    for key in ["HOME", "USER", "LOGNAME", "SHELL", "PATH"] {
        assert_eq!(
            env.iter().filter(|(k, _)| k == key).count(),
            1,
            "{key} once: {env:?}"
        );
    }

    // The request's variables win.
    let mut command = Command::new("env");
    command.env("HOME", "/mine").env("USER", "me");
    let env = env_pairs(&stdout_of(&client, &command));
    assert_eq!(env_var(&env, "HOME"), Some("/mine"));
    assert_eq!(env_var(&env, "USER"), Some("me"));
    assert_eq!(env_var(&env, "LOGNAME"), Some(name.as_str()));

    // A clean environment is exactly what was asked for (env is still found on PATH).
    let mut command = Command::new("env");
    command.env_clear().env("ONLY", "1");
    assert_eq!(stdout_of(&client, &command), "ONLY=1\n");

    // Without a PATH in the agent's environment, the documented default.
    let bare = Agent::start_unprivileged_with(&[], |command| {
        command.env_clear();
    });
    let env = env_pairs(&stdout_of(&bare.client(), &Command::new("env")));
    assert_eq!(
        env_var(&env, "PATH"),
        Some("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "{env:?}"
    );
    assert_eq!(env_var(&env, "USER"), Some(name.as_str()), "{env:?}");
    assert_eq!(env_var(&env, "HOME"), Some(home.as_str()), "{env:?}");
}

#[test]
fn the_default_user_cannot_read_or_write_roots_files() {
    let dir = root_dir("ferry-identity-files");
    let secret = dir.join("root-only");
    write_file(&secret, b"root's\n", 0o600);
    let agent = Agent::start_unprivileged(&[]);
    let client = agent.client();

    let mut cat = Command::new("cat");
    cat.arg(&secret);
    let out = client.output(&cat).unwrap();
    assert_eq!(out.status, ExitStatus::Code(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{:?}",
        text(&out.stderr)
    );

    let created = dir.join("created");
    let mut touch = Command::new("touch");
    touch.arg(&created);
    let out = client.output(&touch).unwrap();
    assert_eq!(out.status, ExitStatus::Code(1));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{:?}",
        text(&out.stderr)
    );
    assert!(!created.exists());

    // The directory itself is readable: traversal is not what failed.
    let mut ls = Command::new("ls");
    ls.arg(&dir);
    assert_eq!(stdout_of(&client, &ls), "root-only\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn root_is_refused_unless_the_policy_allows_it() {
    let dir = root_dir("ferry-identity-marker");
    let marker = dir.join("ran");
    let marker_text = marker.to_str().unwrap();
    let agent = Agent::start_unprivileged(&[]);
    let client = agent.client();

    // The library: PermissionDenied, naming the policy, and nothing ran.
    let mut touch = Command::new("touch");
    touch.arg(&marker).user("root");
    match client.output(&touch) {
        Err(Error::Remote(remote)) => {
            assert_eq!(remote.code, ErrorCode::PermissionDenied);
            assert_eq!(remote.message, NOT_ALLOWED);
            assert_eq!(remote.errno, None);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    for spec in ["0", "root:root", "0:0"] {
        assert_eq!(
            refusal(&client, spec),
            (ErrorCode::PermissionDenied, NOT_ALLOWED.to_owned()),
            "{spec}"
        );
    }

    // The CLI: non-zero, the reason on stderr, nothing on stdout, nothing ran.
    let out = run_cli(&agent, &["exec", "-u", "root", "--", "touch", marker_text]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(stderr.contains(NOT_ALLOWED), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(!marker.exists(), "the refused command ran");

    // Allowed: root it is, by name or number, with its own group.
    let allowed = Agent::start_unprivileged(&["--allow-users", "root"]);
    let client = allowed.client();
    assert_eq!(ids(&client, Some("root")), "0\n0\n0\n");
    assert_eq!(ids(&client, Some("0")), "0\n0\n0\n");
    assert_eq!(ids(&client, Some("root:0")), "0\n0\n0\n");
    assert_eq!(ids(&client, Some("root:root")), "0\n0\n0\n");
    assert_eq!(
        ids(&client, None),
        "65534\n65534\n65534\n",
        "the default stays"
    );
    let out = run_cli(&allowed, &["exec", "-u", "root", "--", "id", "-u"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"0\n");
    let out = run_cli(
        &allowed,
        &["exec", "-u", "root", "--", "touch", marker_text],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists());
    // Still no new privileges for root.
    let mut status = sh("grep NoNewPrivs /proc/self/status");
    status.user("root");
    assert_eq!(stdout_of(&client, &status), "NoNewPrivs:\t1\n");
    // Allowing root allows no one else.
    assert_eq!(
        refusal(&client, "nobody"),
        (ErrorCode::PermissionDenied, NOT_ALLOWED.to_owned())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_users_by_name_or_number_only_when_listed() {
    let agent = Agent::start_unprivileged(&[]);
    let client = agent.client();
    // Not listed: refused, by name, by number, by a group.
    for spec in ["nobody", "65534", "1234", "1234:1234", "65534:0"] {
        assert_eq!(
            refusal(&client, spec),
            (ErrorCode::PermissionDenied, NOT_ALLOWED.to_owned()),
            "{spec}"
        );
    }
    // The policy's `user` exactly as written needs no listing.
    assert_eq!(ids(&client, Some("65534:65534")), "65534\n65534\n65534\n");

    let listed = Agent::start_unprivileged(&["--allow-users", "nobody,1234"]);
    let client = listed.client();
    assert_eq!(ids(&client, Some("nobody")), "65534\n65534\n65534\n");
    assert_eq!(
        ids(&client, Some("65534")),
        "65534\n65534\n65534\n",
        "its uid"
    );
    let mut env = Command::new("env");
    env.user("nobody");
    let env = env_pairs(&stdout_of(&client, &env));
    if let Some((name, home, _)) = passwd_entry(65534) {
        assert_eq!(env_var(&env, "USER"), Some(name.as_str()));
        assert_eq!(env_var(&env, "HOME"), Some(home.as_str()));
    }

    // A number without a passwd entry: its own number as gid, name, home / and /bin/sh.
    assert!(passwd_entry(1234).is_none(), "uid 1234 must be unused here");
    assert_eq!(ids(&client, Some("1234:1234")), "1234\n1234\n1234\n");
    assert_eq!(ids(&client, Some("1234")), "1234\n1234\n1234\n");
    let mut env = Command::new("env");
    env.user("1234:1234");
    let env = env_pairs(&stdout_of(&client, &env));
    assert_eq!(env_var(&env, "USER"), Some("1234"), "{env:?}");
    assert_eq!(env_var(&env, "LOGNAME"), Some("1234"), "{env:?}");
    assert_eq!(env_var(&env, "HOME"), Some("/"), "{env:?}");
    assert_eq!(env_var(&env, "SHELL"), Some("/bin/sh"), "{env:?}");
    let out = run_cli(&listed, &["exec", "-u", "1234:1234", "--", "id", "-u"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"1234\n");

    // A group that is not the user's own: refused unless allow_users has `*`.
    for spec in ["nobody:0", "nobody:root", "1234:0", "1234:1235"] {
        assert_eq!(
            refusal(&client, spec),
            (ErrorCode::PermissionDenied, GROUP_NOT_ALLOWED.to_owned()),
            "{spec}"
        );
    }
    // Root is still refused.
    assert_eq!(
        refusal(&client, "root"),
        (ErrorCode::PermissionDenied, NOT_ALLOWED.to_owned())
    );
    let any = Agent::start_unprivileged(&["--allow-users", "*"]);
    let client = any.client();
    assert_eq!(ids(&client, Some("nobody:0")), "65534\n0\n0\n");
    assert_eq!(ids(&client, Some("root")), "0\n0\n0\n");
    assert_eq!(ids(&client, Some("4321:4322")), "4321\n4322\n4322\n");
}

#[test]
fn unknown_users_and_groups_and_bad_specs_are_named() {
    // Resolution comes first: the same answers whether or not the user would be allowed.
    for args in [&[][..], &["--allow-users", "*"][..]] {
        let agent = Agent::start_unprivileged(args);
        let client = agent.client();
        for (spec, message) in [
            ("ferry-no-such-user", "unknown user"),
            ("root:ferry-no-such-group", "unknown group"),
            ("root:", "bad user specification"),
            (":0", "bad user specification"),
            ("4294967295", "bad user specification"),
            ("99999999999", "bad user specification"),
        ] {
            assert_eq!(
                refusal(&client, spec),
                (ErrorCode::InvalidRequest, message.to_owned()),
                "{spec} with {args:?}"
            );
        }
        let out = run_cli(&agent, &["exec", "-u", "ferry-no-such-user", "--", "true"]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("unknown user"), "{stderr}");
    }
}

#[test]
fn the_file_size_limit_at_its_edge() {
    let dir = common::fresh_dir("ferry-identity-fsize");
    let agent = Agent::start_with(&["--set", "max_file_size=4096", "--set", "rlimit_core=0"]);
    let client = agent.client();
    let mut command = sh("ulimit -c; head -c 4096 /dev/zero > exact; echo status=$?");
    command.current_dir(&dir);
    assert_eq!(stdout_of(&client, &command), "0\nstatus=0\n");
    assert_eq!(std::fs::metadata(dir.join("exact")).unwrap().len(), 4096);

    // One byte past: SIGXFSZ, after the bytes up to the limit were written.
    let mut command = sh("head -c 4097 /dev/zero > over; echo status=$?");
    command.current_dir(&dir);
    assert_eq!(
        stdout_of(&client, &command),
        format!("status={}\n", 128 + 25)
    );
    assert_eq!(std::fs::metadata(dir.join("over")).unwrap().len(), 4096);
    let mut dd = Command::new("dd");
    dd.args(["if=/dev/zero", "of=dd", "bs=4097", "count=1"])
        .current_dir(&dir);
    let out = client.output(&dd).unwrap();
    assert_eq!(
        out.status,
        ExitStatus::Signal {
            number: 25,
            core_dumped: false
        },
        "{}",
        text(&out.stderr)
    );
    // The CLI: the shell's 128 + SIGXFSZ.
    let dd_path = dir.join("dd-cli");
    let out = run_cli(
        &agent,
        &[
            "exec",
            "--",
            "dd",
            "if=/dev/zero",
            &format!("of={}", dd_path.display()),
            "bs=4097",
            "count=1",
        ],
    );
    assert_eq!(out.status.code(), Some(128 + 25), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&dd_path).unwrap().len(), 4096);

    // With SIGXFSZ ignored, the write fails with EFBIG instead.
    let mut command = sh("trap '' XFSZ; head -c 4097 /dev/zero > efbig; echo status=$?");
    command.current_dir(&dir);
    let out = client.output(&command).unwrap();
    assert_eq!(out.stdout, b"status=1\n");
    assert!(
        text(&out.stderr).contains("File too large"),
        "{:?}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn limits_hold_for_the_unprivileged_user_too() {
    let dir = common::fresh_dir("ferry-identity-limits");
    // Anyone may write here (it is private to this test).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let agent = Agent::start_unprivileged(&[
        "--set",
        "max_file_size=4096",
        "--set",
        "rlimit_nofile=64",
        "--set",
        "rlimit_core=0",
    ]);
    let client = agent.client();
    let mut command = sh("id -u; ulimit -n; ulimit -H -n; \
         head -c 4096 /dev/zero > exact; echo $?; head -c 4097 /dev/zero > over; echo $?");
    command.current_dir(&dir);
    assert_eq!(
        stdout_of(&client, &command),
        format!("65534\n64\n64\n0\n{}\n", 128 + 25)
    );
    let exact = std::fs::metadata(dir.join("exact")).unwrap();
    assert_eq!((exact.len(), exact.uid()), (4096, 65534));
    // The user cannot raise its hard limits back.
    let out = client.output(&sh("ulimit -n 65")).unwrap();
    assert_ne!(out.status, ExitStatus::Code(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the agent directly with `args` after `--listen`, expecting it to refuse to start:
/// its exit code and stderr lines.
fn refused_start(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let dir = common::fresh_dir("ferry-identity-start");
    let socket = dir.join("agent.sock");
    let mut child = std::process::Command::new(common::agent_binary())
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not exit with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!socket.exists(), "it bound its socket: {args:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    (status.code(), stderr.lines().map(str::to_owned).collect())
}

/// The agent exits 2 and its last stderr line is `expected`, the only one about `topic`.
fn assert_refused(args: &[&str], expected: &str, topic: &str) {
    let (code, lines) = refused_start(args);
    assert_eq!(code, Some(2), "{args:?}: {lines:?}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some(expected),
        "{args:?}: {lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|line| line.contains(topic)).count(),
        1,
        "{args:?}: {lines:?}"
    );
}

#[test]
fn bad_secret_files_stop_the_agent() {
    let dir = root_dir("ferry-identity-secrets");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    write_file(&dir.join("empty"), b"", 0o600);
    write_file(&dir.join("short"), &[7; 15], 0o600);
    write_file(&dir.join("long"), &[7; 4097], 0o600);
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
        write_file(&dir.join(format!("mode{mode:o}")), &[7; 32], mode);
    }
    std::fs::create_dir(dir.join("dir")).unwrap();
    std::fs::set_permissions(dir.join("dir"), std::fs::Permissions::from_mode(0o700)).unwrap();

    let cases = [
        (path("missing"), "cannot read it", " (errno 2)"),
        (path("empty"), "shorter than 16 bytes", ""),
        (path("short"), "shorter than 16 bytes", ""),
        (path("long"), "longer than 4096 bytes", ""),
        (path("dir"), "not a regular file", ""),
    ];
    for (file, problem, suffix) in &cases {
        assert_refused(
            &["--secret-file", file],
            &format!("ferry-agent: secret file: {problem}: {file}{suffix}"),
            "secret file",
        );
    }
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
        let file = path(&format!("mode{mode:o}"));
        assert_refused(
            &["--secret-file", &file],
            &format!(
                "ferry-agent: secret file: group or others may read or write it \
                 (chmod 600 or 400): {file}"
            ),
            "secret file",
        );
    }
    assert_refused(
        &["--secret-file", "relative/secret"],
        "ferry-agent: policy flag secret_file: bad value",
        "secret_file",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_agent_needs_exactly_one_of_a_secret_and_insecure() {
    assert_refused(
        &[],
        "ferry-agent: policy: neither secret_file nor insecure is set: \
         give --secret-file PATH (ferry.secret_file= as PID 1), or --insecure",
        "secret_file",
    );
    let secret = common::secret_path().to_str().unwrap();
    for args in [
        &["--secret-file", secret, "--insecure"][..],
        &["--insecure", "--secret-file", secret][..],
        &["--secret-file", secret, "--set", "insecure=yes"][..],
    ] {
        assert_refused(
            args,
            "ferry-agent: policy: secret_file and insecure exclude each other",
            "exclude",
        );
    }
    // `insecure=false` is not insecure.
    let agent = Agent::start_unprivileged(&["--set", "insecure=false"]);
    assert_eq!(
        agent.client().health().unwrap().info.security,
        Security::Authenticated
    );
}

#[test]
fn bad_policies_stop_the_agent_naming_the_line_or_key() {
    let dir = root_dir("ferry-identity-policy");
    let unknown = dir.join("unknown");
    std::fs::write(&unknown, "# ferry\nmax_runtime = 1s\n\nbogus_key = 3\n").unwrap();
    let unknown = unknown.to_str().unwrap();
    let bad = dir.join("bad");
    std::fs::write(&bad, "max_runtime = soon\n").unwrap();
    let bad = bad.to_str().unwrap();
    let no_equals = dir.join("no-equals");
    std::fs::write(&no_equals, "user = app\ninsecure\n").unwrap();
    let no_equals = no_equals.to_str().unwrap();
    let missing = dir.join("missing");
    let missing = missing.to_str().unwrap();

    assert_refused(
        &["--insecure", "--policy", unknown],
        &format!("ferry-agent: {unknown} line 4: unknown key"),
        "unknown key",
    );
    assert_refused(
        &["--insecure", "--policy", bad],
        &format!("ferry-agent: {bad} line 1: bad value"),
        "bad value",
    );
    assert_refused(
        &["--insecure", "--policy", no_equals],
        &format!("ferry-agent: {no_equals} line 2: expected key = value"),
        "line 2",
    );
    let (code, lines) = refused_start(&["--insecure", "--policy", missing]);
    assert_eq!(code, Some(2), "{lines:?}");
    assert!(
        lines.last().is_some_and(|line| line.contains(missing)),
        "{lines:?}"
    );
    for (setting, expected) in [
        ("bogus=1", "policy flag bogus: unknown key"),
        // Whole seconds only; a bare number is no duration.
        ("max_runtime=1500ms", "policy flag max_runtime: bad value"),
        ("max_runtime=5", "policy flag max_runtime: bad value"),
        (
            "max_file_size=4096X",
            "policy flag max_file_size: bad value",
        ),
        ("rlimit_nofile=-1", "policy flag rlimit_nofile: bad value"),
        (
            "max_connections=0",
            "policy flag max_connections: value out of range",
        ),
        ("user=", "policy flag user: bad value"),
    ] {
        assert_refused(
            &["--insecure", "--set", setting],
            &format!("ferry-agent: {expected}"),
            "policy flag",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_of_16_and_4096_bytes_owner_only_start_and_serve() {
    let dir = root_dir("ferry-identity-good-secrets");
    for (name, len, mode) in [("s16", 16, 0o400), ("s4096", 4096, 0o600)] {
        let path = dir.join(name);
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        write_file(&path, &bytes, mode);
        let file = path.to_str().unwrap();
        let agent = Agent::start_unprivileged(&["--secret-file", file]);
        let options = ConnectOptions {
            secret: Some(ferry_host::read_secret_file(&path).unwrap()),
            ..ConnectOptions::default()
        };
        let client = Client::connect_with(&agent.target(), options).unwrap();
        assert_eq!(
            client.health().unwrap().info.security,
            Security::Authenticated
        );
        assert_eq!(stdout_of(&client, &sh("echo served")), "served\n");
        // Another secret is refused; no secret at all too.
        match Client::connect_with(&agent.target(), common::secret_options()) {
            Err(Error::Unauthenticated(_)) => {}
            other => panic!("{name}: a wrong secret: {other:?}"),
        }
        match Client::connect_with(&agent.target(), ConnectOptions::default()) {
            Err(Error::SecretRequired) => {}
            other => panic!("{name}: no secret: {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn insecure_agents_say_so_and_serve_clients_without_a_secret() {
    let mut agent = Agent::start_unprivileged_with(&["--insecure"], |command| {
        command.stderr(Stdio::piped());
    });
    let stderr = agent.take_stderr().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("WITHOUT authentication") => break line,
            Ok(line) => seen.push(line),
            Err(err) => panic!("no warning ({err}); stderr so far: {seen:?}"),
        }
    };
    assert_eq!(
        warning,
        "ferry-agent: running WITHOUT authentication (--insecure): \
         anyone who reaches the agent may run commands"
    );

    let client = Client::connect_with(&agent.target(), ConnectOptions::default()).unwrap();
    let info = client.health().unwrap().info;
    assert_eq!(info.security, Security::Insecure);
    // Insecure changes who may connect, not as whom commands run.
    assert_eq!(ids(&client, None), "65534\n65534\n65534\n");
    assert_eq!(
        refusal(&client, "root"),
        (ErrorCode::PermissionDenied, NOT_ALLOWED.to_owned())
    );
    // A client holding a secret does not talk to an agent that cannot prove it.
    match Client::connect_with(&agent.target(), common::secret_options()) {
        Err(Error::AgentInsecure) => {}
        other => panic!("a secret against an insecure agent: {other:?}"),
    }
    // The CLI without a secret works, and warns.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env("FERRY_CONNECT", agent.target_url())
        .env_remove("FERRY_SECRET_FILE")
        .args(["exec", "--", "id", "-u"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout, b"65534\n");
    assert!(
        text(&out.stderr).contains("runs without authentication"),
        "{}",
        text(&out.stderr)
    );
}
