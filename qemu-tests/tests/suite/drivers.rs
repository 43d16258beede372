//! The three ways a program drives an exec: the blocking API, the async API, and the embedding
//! example (`host/examples/epoll_exec.rs`, run as a program). Each runs one command and reports
//! what it printed and how it ended in one shape, [`Outcome`], so an exec case (`cases.rs`) is
//! written once and checked through all three.
//!
//! The async driver needs ferry-host's `tokio` feature; both crates that include the suite have
//! a feature of that name (`qemu-tests`' is part of its `qemu` switch).

use std::fmt;
use std::io::Write;
use std::thread;

use ferry_host::{Command, Error, ErrorCode, ExitStatus, Stdin};

use super::{epoll_exec, Fixture};

/// Stdin goes out in writes of this size: odd, so writes, frames and credit never line up.
const STDIN_CHUNK: usize = 7919;

/// A way into the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// [`ferry_host::Client`]: `output`, or `spawn` with the stdin writer on a thread of its own
    /// (a write blocks for credit, which the reading thread brings in).
    Blocking,
    /// [`ferry_host::tokio::Client`] on a current-thread runtime: `output`, or `spawn` with the
    /// `AsyncWrite` stdin polled beside `collect` in one task (`join!`).
    #[cfg(feature = "tokio")]
    Async,
    /// `epoll_exec TARGET -- ARGV…`, stdin piped (or `-n`): one mio loop and `ferry_wire`
    /// alone. It reports only what the `ferry` CLI would: the output and an exit status.
    Example,
}

/// One command to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// The program and its arguments.
    pub argv: &'a [&'a str],
    /// Fed through a pipe within credit; `None`: the command's stdin is /dev/null.
    pub stdin: Option<&'a [u8]>,
    /// The command's working directory; `None`: the agent's.
    pub cwd: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub fn new(argv: &'a [&'a str]) -> Request<'a> {
        Request {
            argv,
            ..Request::default()
        }
    }

    pub fn stdin(self, stdin: &'a [u8]) -> Request<'a> {
        Request {
            stdin: Some(stdin),
            ..self
        }
    }

    pub fn cwd(self, cwd: &'a str) -> Request<'a> {
        Request {
            cwd: Some(cwd),
            ..self
        }
    }

    /// The library's command for it (stdin: a pipe, when there is any).
    fn command(&self) -> Command {
        let (program, args) = self.argv.split_first().expect("a program");
        let mut command = Command::new(program);
        command.args(args);
        if let Some(cwd) = self.cwd {
            command.current_dir(cwd);
        }
        if self.stdin.is_some() {
            command.stdin(Stdin::Pipe);
        }
        command
    }
}

/// What a driver saw of one command.
pub struct Outcome {
    pub driver: Driver,
    /// Every byte of its stdout (for the example: what it copied to its own stdout).
    pub stdout: Vec<u8>,
    /// Every byte of its stderr (the example's own messages included).
    pub stderr: Vec<u8>,
    pub end: End,
}

/// How a run ended, in the driver's own terms.
#[derive(Debug)]
pub enum End {
    /// A library driver: the command's status.
    Status(ExitStatus),
    /// A library driver: its error (a refusal from the agent, a request refused locally, …).
    Error(Error),
    /// The example's exit status, the `ferry` CLI's: the remote code, 128+N for signal N, 127
    /// not found, 126 cannot execute, 255 its own errors. `None`: it was killed itself.
    ExitCode(Option<i32>),
}

/// What a case expects, in the library's terms; [`Outcome::assert_end`] holds the example's exit
/// status (and its message) to the CLI's translation of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Exited with this code.
    Exit(u8),
    /// Killed by this signal (no core dump).
    Signal(u8),
    /// The agent could not start it, for this reason and errno.
    Refused { code: ErrorCode, errno: u32 },
    /// Refused before anything was sent.
    InvalidRequest,
}

impl Driver {
    /// Runs `request` on the fixture's agent to its end.
    pub fn run(self, fixture: &Fixture, request: &Request<'_>) -> Outcome {
        match self {
            Driver::Blocking => run_blocking(fixture, request),
            #[cfg(feature = "tokio")]
            Driver::Async => run_async(fixture, request),
            Driver::Example => run_example(fixture, request),
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Blocking => "blocking API",
            #[cfg(feature = "tokio")]
            Driver::Async => "async API",
            Driver::Example => "epoll_exec example",
        })
    }
}

impl Outcome {
    fn from_library(driver: Driver, result: Result<ferry_host::Output, Error>) -> Outcome {
        match result {
            Ok(output) => Outcome {
                driver,
                stdout: output.stdout,
                stderr: output.stderr,
                end: End::Status(output.status),
            },
            Err(err) => Outcome {
                driver,
                stdout: Vec::new(),
                stderr: Vec::new(),
                end: End::Error(err),
            },
        }
    }

    /// Fails the case unless the run ended as `expected`. For the example: with the CLI's exit
    /// status for it, and for a refusal, with a message naming the errno (or the local refusal).
    #[track_caller]
    pub fn assert_end(&self, expected: Expected) {
        let matches = match (&self.end, expected) {
            (End::Status(status), Expected::Exit(code)) => *status == ExitStatus::Code(code),
            (End::Status(status), Expected::Signal(number)) => {
                *status
                    == ExitStatus::Signal {
                        number,
                        core_dumped: false,
                    }
            }
            (End::Error(Error::Remote(remote)), Expected::Refused { code, errno }) => {
                remote.code == code && remote.errno == Some(errno)
            }
            (End::Error(Error::InvalidRequest(_)), Expected::InvalidRequest) => true,
            (End::ExitCode(Some(status)), expected) => {
                let stderr = String::from_utf8_lossy(&self.stderr);
                let says = match expected {
                    Expected::Exit(_) | Expected::Signal(_) => true,
                    Expected::Refused { errno, .. } => stderr.contains(&format!("(errno {errno})")),
                    Expected::InvalidRequest => stderr.contains("invalid request"),
                };
                *status == i32::from(cli_status(expected)) && says
            }
            _ => false,
        };
        assert!(matches, "{}: expected {expected:?}, {self}", self.driver);
    }

    /// Fails the case unless stdout is exactly `expected` (without printing megabytes).
    #[track_caller]
    pub fn assert_stdout(&self, expected: &[u8]) {
        assert!(
            self.stdout == expected,
            "{}: stdout differs: {self}",
            self.driver
        );
    }

    /// Fails the case unless stderr is exactly `expected`.
    #[track_caller]
    pub fn assert_stderr(&self, expected: &[u8]) {
        assert!(
            self.stderr == expected,
            "{}: stderr differs: {self}",
            self.driver
        );
    }
}

/// A summary for failure messages: the end, the sizes, and the start of each stream.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head =
            |bytes: &[u8]| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        write!(
            f,
            "got {:?}; stdout {} bytes {:?}; stderr {} bytes {:?}",
            self.end,
            self.stdout.len(),
            head(&self.stdout),
            self.stderr.len(),
            head(&self.stderr),
        )
    }
}

/// The `ferry` CLI's exit status for an outcome.
fn cli_status(expected: Expected) -> u8 {
    match expected {
        Expected::Exit(code) => code,
        Expected::Signal(number) => 128 + number,
        Expected::Refused {
            code: ErrorCode::NotFound,
            ..
        } => 127,
        // Every other reason a command could not start: it cannot be executed.
        Expected::Refused { .. } => 126,
        Expected::InvalidRequest => 255,
    }
}

fn run_blocking(fixture: &Fixture, request: &Request<'_>) -> Outcome {
    let client = fixture.client();
    let command = request.command();
    let result = match request.stdin {
        None => client.output(&command),
        Some(data) => client.spawn(&command).and_then(|mut execution| {
            let mut writer = execution.take_stdin().expect("stdin is a pipe");
            thread::scope(|scope| {
                let feeder = scope.spawn(move || {
                    for chunk in data.chunks(STDIN_CHUNK) {
                        writer.write_all(chunk)?;
                    }
                    writer.close()
                });
                let output = execution.collect();
                let fed = feeder.join().unwrap();
                // A failed exec fails the writer too; the exec's error is the one to report.
                if output.is_ok() {
                    fed.expect("feeding stdin");
                }
                output
            })
        }),
    };
    Outcome::from_library(Driver::Blocking, result)
}

#[cfg(feature = "tokio")]
fn run_async(fixture: &Fixture, request: &Request<'_>) -> Outcome {
    use tokio::io::AsyncWriteExt;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = ferry_host::tokio::Client::new(&fixture.target, fixture.options());
    let command = request.command();
    let result = runtime.block_on(async {
        let Some(data) = request.stdin else {
            return client.output(&command).await;
        };
        let mut execution = client.spawn(&command).await?;
        let mut writer = execution.take_stdin().expect("stdin is a pipe");
        let feed = async {
            for chunk in data.chunks(STDIN_CHUNK) {
                writer.write_all(chunk).await?;
            }
            writer.shutdown().await
        };
        let (fed, output) = tokio::join!(feed, execution.collect());
        if output.is_ok() {
            fed.expect("feeding stdin");
        }
        output
    });
    Outcome::from_library(Driver::Async, result)
}

fn run_example(fixture: &Fixture, request: &Request<'_>) -> Outcome {
    let target = fixture.target.to_string();
    let mut args = Vec::new();
    if request.stdin.is_none() {
        args.push("-n");
    }
    if let Some(cwd) = request.cwd {
        args.extend(["-C", cwd]);
    }
    args.extend([target.as_str(), "--"]);
    args.extend(request.argv);
    let output = epoll_exec::run(fixture.secret_file.as_deref(), &args, request.stdin);
    Outcome {
        driver: Driver::Example,
        stdout: output.stdout,
        stderr: output.stderr,
        end: End::ExitCode(output.status.code()),
    }
}
