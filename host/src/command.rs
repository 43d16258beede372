//! What to run: a builder in the spirit of `std::process::Command`, byte-exact (arguments and
//! environment are raw bytes, as `execve` takes them).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use ferry_wire::{Bytes, ExecRequest, StdinMode, StrList};

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
            pty: None,
            timeout_ms: 0,
            kill_grace_ms: None,
            kill_tree_on_exit: false,
            max_output: 0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::limits::{MAX_ARGS, MAX_ARGV_BYTES, MAX_ENV_VARS, MAX_PATH};

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

        // argv bytes: exactly MAX_ARGV_BYTES with NULs fits.
        let mut command = Command::new("a".repeat(MAX_ARGV_BYTES - 1));
        assert!(check(&command).is_ok());
        command.arg("");
        assert!(check(&command).is_err());

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
        assert!(err.contains("argv: 1025 entries, 2050 bytes"), "{err}");
    }
}
