//! What to run: a builder in the spirit of `std::process::Command`, byte-exact (arguments and
//! environment are raw bytes, as `execve` takes them).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use ferry_wire::{Bytes, ExecRequest, StdinMode, StrList, WindowSize};

use crate::error::Error;

/// Where the remote command's stdin comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stdin {
    /// `/dev/null`: the command sees EOF at once.
    #[default]
    Null,
    /// A pipe the caller feeds through [`crate::Execution::take_stdin`].
    Pipe,
    /// These bytes, then EOF (fed by the library as the agent grants credit).
    Bytes(Vec<u8>),
}

/// A program to run in the guest, with its arguments, environment, directory and stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    argv: Vec<u8>,
    env: Vec<u8>,
    clean_env: bool,
    cwd: Option<Vec<u8>>,
    stdin: Stdin,
    user: Option<Vec<u8>>,
    pty: Option<WindowSize>,
    timeout: Duration,
    kill_after: Option<Duration>,
    kill_tree_on_exit: bool,
    max_output: Option<u64>,
    /// The first builder misuse (a NUL in an argument, a bad variable name), reported when the
    /// command is run: builders do not return errors.
    invalid: Option<String>,
}

impl Command {
    /// A command running `program` (looked up in the guest's `PATH` unless it contains a '/'),
    /// with `program` as `argv[0]`.
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        let mut command = Command {
            argv: Vec::new(),
            env: Vec::new(),
            clean_env: false,
            cwd: None,
            stdin: Stdin::Null,
            user: None,
            pty: None,
            timeout: Duration::ZERO,
            kill_after: None,
            kill_tree_on_exit: false,
            max_output: None,
            invalid: None,
        };
        let program = program.as_ref().as_bytes();
        if program.is_empty() {
            command.reject("the program name is empty".into());
        }
        command.push_arg(program);
        command
    }

    /// Appends an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.push_arg(arg.as_ref().as_bytes());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self.arg(arg);
        }
        self
    }

    /// Sets an environment variable for the command (over the agent's environment, or over
    /// nothing after [`Command::env_clear`]).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        let (key, value) = (key.as_ref().as_bytes(), value.as_ref().as_bytes());
        if key.is_empty() || key.contains(&b'=') || key.contains(&0) {
            self.reject(format!(
                "invalid environment variable name {:?}",
                String::from_utf8_lossy(key)
            ));
        } else if value.contains(&0) {
            self.reject(format!(
                "environment variable {} contains a NUL byte",
                String::from_utf8_lossy(key)
            ));
        }
        self.env.extend_from_slice(key);
        self.env.push(b'=');
        self.env.extend_from_slice(value);
        self.env.push(0);
        self
    }

    /// Sets environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Command
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self.env(key, value);
        }
        self
    }

    /// Starts from an empty environment instead of the agent's.
    pub fn env_clear(&mut self) -> &mut Command {
        self.clean_env = true;
        self
    }

    /// Runs the command in `dir` (a guest path).
    pub fn current_dir(&mut self, dir: impl AsRef<OsStr>) -> &mut Command {
        let dir = dir.as_ref().as_bytes();
        if dir.is_empty() || dir.contains(&0) {
            self.reject("the working directory is empty or contains a NUL byte".into());
        }
        self.cwd = Some(dir.to_vec());
        self
    }

    /// Chooses where stdin comes from (default: [`Stdin::Null`]).
    pub fn stdin(&mut self, stdin: Stdin) -> &mut Command {
        self.stdin = stdin;
        self
    }

    /// Runs the command as `user` (`NAME[:GROUP]` or `UID[:GID]`, resolved in the guest)
    /// instead of the agent's default user. The agent's policy decides whether that is allowed.
    pub fn user(&mut self, user: impl AsRef<OsStr>) -> &mut Command {
        let user = user.as_ref().as_bytes();
        if user.is_empty() || user.contains(&0) {
            self.reject("the user is empty or contains a NUL byte".into());
        }
        self.user = Some(user.to_vec());
        self
    }

    /// Runs the command on a pseudo-terminal of `size` in the guest, as its controlling terminal:
    /// it sees a terminal on stdin, stdout and stderr (`tty`, `isatty`), and everything it
    /// writes arrives as [`crate::Event::Stdout`] (one stream, as over `ssh -t`). Stdin, when
    /// piped, is what is typed: `^C` (byte 3) interrupts it, `^D` ends a line-reading shell.
    ///
    /// `TERM` is not set for you: add it with [`Command::env`] (the CLI sends its own).
    pub fn pty(&mut self, size: WindowSize) -> &mut Command {
        self.pty = Some(size);
        self
    }

    /// Ends the command's whole tree when it runs longer than `timeout`, enforced by the agent
    /// (whatever becomes of this client): `SIGTERM`, then `SIGKILL` after
    /// [`Command::kill_after`]'s grace. The record then says [`crate::Ending::TimedOut`].
    /// [`Duration::ZERO`] (the default) is no timeout; anything shorter than a millisecond counts
    /// as one.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Command {
        self.timeout = timeout;
        self
    }

    /// The grace between the `SIGTERM` and the `SIGKILL` that end a command on timeout or
    /// cancel (default: the agent's, 2 s). Zero sends `SIGKILL` right behind the `SIGTERM`; at
    /// most `u32::MAX` milliseconds (49 days).
    pub fn kill_after(&mut self, grace: Duration) -> &mut Command {
        self.kill_after = Some(grace);
        self
    }

    /// When the command itself exits, kill what is left of its tree too (background jobs,
    /// daemons), for CI-style isolation. By default they are left running.
    pub fn kill_tree_on_exit(&mut self, kill: bool) -> &mut Command {
        self.kill_tree_on_exit = kill;
        self
    }

    /// Keeps at most `bytes` of each output stream, capped by the agent's own maximum: past it
    /// the agent keeps the head and a tail window (the last bytes before the end), drops the
    /// middle and says so ([`crate::Execution::dropped`], [`crate::Termination`]), and keeps
    /// draining, so the command is never blocked by the cap.
    ///
    /// NOTE: a cap of 0 ("keep nothing") is refused for now: protocol 3 encodes 0 as "the
    /// agent's own maximum", so it cannot be asked for.
    pub fn max_output(&mut self, bytes: u64) -> &mut Command {
        self.max_output = Some(bytes);
        self
    }

    /// The configured stdin.
    pub fn stdin_mode(&self) -> &Stdin {
        &self.stdin
    }

    fn push_arg(&mut self, arg: &[u8]) {
        if arg.contains(&0) {
            self.reject(format!(
                "argument {:?} contains a NUL byte",
                String::from_utf8_lossy(arg)
            ));
        }
        self.argv.extend_from_slice(arg);
        self.argv.push(0);
    }

    fn reject(&mut self, why: String) {
        self.invalid.get_or_insert(why);
    }

    /// The wire request. Builder misuse is reported here; the protocol's rules and limits
    /// are the session's to check.
    pub(crate) fn request(&self) -> Result<ExecRequest<'_>, Error> {
        if let Some(why) = &self.invalid {
            return Err(Error::InvalidRequest(why.clone()));
        }
        let kill_grace_ms = match self.kill_after {
            None => None,
            Some(grace) => Some(u32::try_from(ceil_millis(grace)).map_err(|_| {
                Error::InvalidRequest("the kill grace is longer than u32::MAX milliseconds".into())
            })?),
        };
        let max_output =
            match self.max_output {
                None => 0,
                Some(0) => return Err(Error::InvalidRequest(
                    "an output cap of 0 cannot be asked for (protocol 3 reads 0 as the agent's \
                     own maximum)"
                        .into(),
                )),
                Some(bytes) => bytes,
            };
        Ok(ExecRequest {
            argv: StrList::new(&self.argv),
            env: StrList::new(&self.env),
            clean_env: self.clean_env,
            cwd: self.cwd.as_deref().map(Bytes),
            stdin: match self.stdin {
                Stdin::Null => StdinMode::Null,
                Stdin::Pipe | Stdin::Bytes(_) => StdinMode::Pipe,
            },
            user: self.user.as_deref().map(Bytes),
            pty: self.pty,
            timeout_ms: ceil_millis(self.timeout),
            kill_grace_ms,
            kill_tree_on_exit: self.kill_tree_on_exit,
            max_output,
        })
    }

    /// Adds this command's sizes to a refusal of the request, so the reader sees what was
    /// too large.
    pub(crate) fn explain(&self, err: Error) -> Error {
        let Error::InvalidRequest(why) = err else {
            return err;
        };
        let entries = |list: &[u8]| list.iter().filter(|b| **b == 0).count();
        Error::InvalidRequest(format!(
            "{why} (argv: {} entries, {} bytes; environment: {} entries, {} bytes; \
             working directory: {} bytes)",
            entries(&self.argv),
            self.argv.len(),
            entries(&self.env),
            self.env.len(),
            self.cwd.as_ref().map_or(0, Vec::len),
        ))
    }
}

/// Whole milliseconds, rounded up (a positive duration never becomes 0, which means "none"),
/// saturating at `u64::MAX`.
pub(crate) fn ceil_millis(duration: Duration) -> u64 {
    let millis = duration.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::limits::{MAX_ARGS, MAX_ARGV_BYTES, MAX_ARG_LEN, MAX_ENV_VARS, MAX_PATH};

    /// What `Client::spawn` does before it connects: the builder's request, validated.
    fn check(command: &Command) -> Result<(), Error> {
        let request = command.request()?;
        request
            .validate()
            .map_err(|e| command.explain(Error::InvalidRequest(e.message.into())))?;
        Ok(())
    }

    #[test]
    fn builds_packed_lists() {
        let mut command = Command::new("ls");
        command
            .arg("-l")
            .args(["a b", ""])
            .env("K", "v=w")
            .env_clear()
            .current_dir("/tmp")
            .stdin(Stdin::Pipe);
        let request = command.request().unwrap();
        assert_eq!(request.argv.as_bytes(), b"ls\0-l\0a b\0\0");
        assert_eq!(request.env.as_bytes(), b"K=v=w\0");
        assert!(request.clean_env);
        assert_eq!(request.cwd, Some(Bytes(b"/tmp")));
        assert_eq!(request.stdin, StdinMode::Pipe);
    }

    #[test]
    fn misuse_is_reported_when_run() {
        let cases: [fn(&mut Command); 6] = [
            |c| {
                c.arg("a\0b");
            },
            |c| {
                c.env("", "v");
            },
            |c| {
                c.env("A=B", "v");
            },
            |c| {
                c.env("A", "v\0");
            },
            |c| {
                c.current_dir("");
            },
            |c| {
                c.current_dir("/a\0");
            },
        ];
        for case in cases {
            let mut command = Command::new("true");
            case(&mut command);
            assert!(matches!(check(&command), Err(Error::InvalidRequest(_))));
        }
        assert!(Command::new("").request().is_err());
    }

    #[test]
    fn limits_hold_exactly_at_their_edge() {
        // argv: MAX_ARGS entries fit, one more does not.
        let mut command = Command::new("x");
        command.args(std::iter::repeat_n("y", MAX_ARGS - 1));
        assert!(check(&command).is_ok());
        command.arg("z");
        assert!(check(&command).is_err());

        // argv bytes: exactly MAX_ARGV_BYTES with NULs fits, in entries of the longest length.
        let longest = "a".repeat(MAX_ARG_LEN - 1);
        let mut command = Command::new(&longest);
        command.args(std::iter::repeat_n(
            &longest,
            MAX_ARGV_BYTES / MAX_ARG_LEN - 1,
        ));
        assert!(check(&command).is_ok());
        command.arg("");
        assert!(check(&command).is_err());

        // One entry: MAX_ARG_LEN with its NUL fits, a byte more does not.
        assert!(check(&Command::new(&longest)).is_ok());
        assert!(check(Command::new("x").arg(format!("{longest}b"))).is_err());

        let mut command = Command::new("x");
        for i in 0..MAX_ENV_VARS {
            command.env(format!("V{i}"), "");
        }
        assert!(check(&command).is_ok());
        command.env("W", "");
        assert!(check(&command).is_err());

        let mut command = Command::new("x");
        command.current_dir("/".repeat(MAX_PATH));
        assert!(check(&command).is_ok());
        command.current_dir("/".repeat(MAX_PATH + 1));
        assert!(check(&command).is_err());
    }

    #[test]
    fn a_refusal_names_the_sizes() {
        let mut command = Command::new("x");
        command.args(std::iter::repeat_n("y", MAX_ARGS));
        let err = check(&command).unwrap_err().to_string();
        assert!(err.contains("argv: 131073 entries, 262146 bytes"), "{err}");
    }

    #[test]
    fn bounds_and_terminal_reach_the_request() {
        let mut command = Command::new("x");
        let request = command.request().unwrap();
        assert_eq!(
            (request.pty, request.timeout_ms, request.kill_grace_ms),
            (None, 0, None)
        );
        assert_eq!((request.kill_tree_on_exit, request.max_output), (false, 0));
        command
            .pty(WindowSize {
                rows: 30,
                cols: 100,
            })
            .timeout(Duration::from_micros(1))
            .kill_after(Duration::ZERO)
            .kill_tree_on_exit(true)
            .max_output(1 << 20);
        let request = command.request().unwrap();
        assert_eq!(
            request.pty,
            Some(WindowSize {
                rows: 30,
                cols: 100
            })
        );
        // A positive timeout never becomes 0 ("none").
        assert_eq!(request.timeout_ms, 1);
        assert_eq!(request.kill_grace_ms, Some(0));
        assert!(request.kill_tree_on_exit);
        assert_eq!(request.max_output, 1 << 20);

        command
            .timeout(Duration::from_millis(1500))
            .kill_after(Duration::from_nanos(1_000_001));
        let request = command.request().unwrap();
        assert_eq!((request.timeout_ms, request.kill_grace_ms), (1500, Some(2)));
        command.timeout(Duration::MAX);
        assert_eq!(command.request().unwrap().timeout_ms, u64::MAX);

        command.kill_after(Duration::from_millis(u64::from(u32::MAX) + 1));
        assert!(matches!(command.request(), Err(Error::InvalidRequest(_))));
        command.kill_after(Duration::from_millis(u64::from(u32::MAX)));
        assert!(command.request().is_ok());
        command.max_output(0);
        let err = command.request().unwrap_err().to_string();
        assert!(err.contains("output cap of 0"), "{err}");
    }
}
