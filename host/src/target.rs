//! Where an agent listens, and how to open a byte stream to it.
//!
//! Three transports, one stream type: AF_VSOCK, the hybrid-vsock Unix socket that Firecracker,
//! Cloud Hypervisor and vhost-device-vsock expose on the host (with its `CONNECT` handshake),
//! and plain Unix sockets (the agent's test transport).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::secret::Secret;
use crate::sys;

/// An agent's address, as written on the command line: `unix://PATH`, `vsock://CID:PORT` or
/// `hvsock://PATH:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A Unix stream socket the agent listens on (`ferry-agent --listen unix:PATH`).
    Unix(PathBuf),
    /// AF_VSOCK: the guest's context id and the agent's port.
    Vsock {
        /// The guest's CID (3 or above for guests).
        cid: u32,
        /// The agent's port.
        port: u32,
    },
    /// Hybrid vsock: a VMM's host-side Unix socket, multiplexed by a `CONNECT <port>` line.
    Hvsock {
        /// The VMM's Unix socket (Firecracker's `uds_path`, Cloud Hypervisor's `socket`).
        path: PathBuf,
        /// The agent's vsock port inside the guest.
        port: u32,
    },
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let invalid = |reason: &'static str| Error::InvalidTarget {
            target: text.to_owned(),
            reason,
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            invalid("expected unix://PATH, vsock://CID:PORT or hvsock://PATH:PORT")
        })?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(invalid("empty socket path"));
                }
                Ok(Target::Unix(PathBuf::from(rest)))
            }
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| invalid("expected vsock://CID:PORT"))?;
                let cid = cid
                    .parse::<u32>()
                    .map_err(|_| invalid("the CID is not a number"))?;
                Ok(Target::Vsock {
                    cid,
                    port: parse_port(port).map_err(invalid)?,
                })
            }
            "hvsock" => {
                // The path may itself contain ':'; the port is what follows the last one.
                let (path, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| invalid("expected hvsock://PATH:PORT"))?;
                if path.is_empty() {
                    return Err(invalid("empty socket path"));
                }
                Ok(Target::Hvsock {
                    path: PathBuf::from(path),
                    port: parse_port(port).map_err(invalid)?,
                })
            }
            _ => Err(invalid(
                "unknown scheme (expected unix://, vsock:// or hvsock://)",
            )),
        }
    }
}

fn parse_port(port: &str) -> Result<u32, &'static str> {
    match port.parse::<u32>() {
        // u32::MAX is VMADDR_PORT_ANY: not a port anyone can listen on.
        Ok(port) if port != u32::MAX => Ok(port),
        _ => Err("the port is not a number below 4294967295"),
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(path) => write!(f, "unix://{}", path.display()),
            Target::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Target::Hvsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
        }
    }
}

/// How hard to try when opening a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on connecting, the hybrid-vsock handshake and the protocol hello together.
    pub connect_timeout: Duration,
    /// How many times a hybrid-vsock handshake that ends in EOF is retried. VMMs close the
    /// connection when the guest side is not (yet) accepting, and some do so spuriously.
    pub hvsock_retries: u32,
    /// The pause before the first retry; it doubles with each one.
    pub hvsock_retry_delay: Duration,
    /// The agent's secret ([`crate::read_secret_file`]). With one, the client proves it on
    /// every connection and talks only to an agent that proves it too; without one, only to an
    /// agent started `--insecure`.
    pub secret: Option<Secret>,
    /// How many idle connections a [`crate::Client`] keeps for its next operations (protocol
    /// 5 keep-alive: an operation on one pays no connect, hello or proof). 0: a connection per
    /// operation.
    pub max_idle: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            hvsock_retries: 5,
            hvsock_retry_delay: Duration::from_millis(20),
            secret: None,
            max_idle: 4,
        }
    }
}

/// The longest reply line a hybrid-vsock socket may send (`OK 1073741824\n` is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;

impl Target {
    /// Opens a byte stream to the agent, hybrid-vsock handshake done and protocol hello not yet
    /// sent: for callers that speak `ferry_wire` themselves (a VMM's event loop, a fuzzer). The
    /// stream's read and write timeouts are left at `options.connect_timeout`.
    pub fn open_stream(&self, options: &ConnectOptions) -> Result<UnixStream, Error> {
        let opened = self.open_raw(options)?;
        let remaining = remaining(opened.deadline).map_err(|source| Error::Connect {
            target: self.to_string(),
            source,
        })?;
        let stream = opened.stream;
        stream
            .set_read_timeout(Some(remaining))
            .map_err(Error::Io)?;
        stream
            .set_write_timeout(Some(remaining))
            .map_err(Error::Io)?;
        Ok(stream)
    }

    /// Connects (and does the hybrid-vsock handshake) without touching the socket's timeouts
    /// unless the handshake needed them: a connection's setup is a handful of syscalls.
    pub(crate) fn open_raw(&self, options: &ConnectOptions) -> Result<Opened, Error> {
        let deadline = Instant::now() + options.connect_timeout;
        let connect_error = |source: io::Error| Error::Connect {
            target: self.to_string(),
            source,
        };
        let stream = match self {
            Target::Unix(path) => UnixStream::connect(path).map_err(connect_error)?,
            Target::Vsock { cid, port } => {
                sys::connect_vsock(*cid, *port, options.connect_timeout).map_err(connect_error)?
            }
            Target::Hvsock { path, port } => hvsock_connect(path, *port, options, deadline)
                .map_err(|err| err.into_error(self))?,
        };
        Ok(Opened {
            stream,
            deadline,
            timeouts_set: matches!(self, Target::Hvsock { .. }),
        })
    }
}

/// A freshly connected stream, before the protocol hello.
pub(crate) struct Opened {
    pub stream: UnixStream,
    /// When the connection (hello included) must be up.
    pub deadline: Instant,
    /// Whether read/write timeouts are set on the socket (the hybrid-vsock handshake sets them).
    pub timeouts_set: bool,
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// How a hybrid-vsock handshake failed (both the blocking and the async transport).
pub(crate) enum HandshakeError {
    Io(io::Error),
    /// The VMM answered something other than `OK <n>`.
    Refused(String),
}

impl HandshakeError {
    /// The library's error for a handshake with `target` that failed.
    pub(crate) fn into_error(self, target: &Target) -> Error {
        match self {
            HandshakeError::Io(source) => Error::Connect {
                target: target.to_string(),
                source,
            },
            HandshakeError::Refused(reply) => Error::HvsockRefused {
                target: target.to_string(),
                reply,
            },
        }
    }

    /// Whether the VMM closed the connection instead of replying: worth another attempt.
    pub(crate) fn is_eof(&self) -> bool {
        matches!(self, HandshakeError::Io(err) if err.kind() == io::ErrorKind::UnexpectedEof)
    }
}

/// The hybrid-vsock request for `port`.
pub(crate) fn hvsock_request(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The VMM's reply to `CONNECT`, read one byte at a time: anything after the newline already
/// belongs to the agent.
#[derive(Default)]
pub(crate) struct HandshakeReply {
    line: Vec<u8>,
}

impl HandshakeReply {
    /// Takes the next byte read (`None`: the VMM closed the connection). `None` while the line
    /// goes on; then whether the VMM accepted.
    pub(crate) fn push(&mut self, byte: Option<u8>) -> Option<Result<(), HandshakeError>> {
        match byte {
            None => Some(Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the VMM closed the connection during the CONNECT handshake",
            )))),
            Some(b'\n') => Some(match self.line.strip_prefix(b"OK ") {
                Some(n) if !n.is_empty() && n.iter().all(u8::is_ascii_digit) => Ok(()),
                _ => Err(HandshakeError::Refused(lossy(&self.line))),
            }),
            Some(_) if self.line.len() >= MAX_HANDSHAKE_LINE => {
                Some(Err(HandshakeError::Refused(lossy(&self.line) + "…")))
            }
            Some(byte) => {
                self.line.push(byte);
                None
            }
        }
    }
}

/// Hybrid vsock: connect the Unix socket, send `CONNECT <port>\n`, expect `OK <n>\n`. An EOF
/// instead of a reply (nobody listening on the port yet, or the VMM's known flakiness) is retried
/// a bounded number of times with exponential backoff.
fn hvsock_connect(
    path: &Path,
    port: u32,
    options: &ConnectOptions,
    deadline: Instant,
) -> Result<UnixStream, HandshakeError> {
    let mut delay = options.hvsock_retry_delay;
    let mut attempt = 0;
    loop {
        match hvsock_attempt(path, port, deadline) {
            Err(err) if err.is_eof() && attempt < options.hvsock_retries => {
                attempt += 1;
                let left = remaining(deadline).map_err(HandshakeError::Io)?;
                thread::sleep(delay.min(left));
                delay = delay.saturating_mul(2);
            }
            other => return other,
        }
    }
}

fn hvsock_attempt(path: &Path, port: u32, deadline: Instant) -> Result<UnixStream, HandshakeError> {
    let io = HandshakeError::Io;
    let mut stream = UnixStream::connect(path).map_err(io)?;
    let left = remaining(deadline).map_err(io)?;
    stream.set_read_timeout(Some(left)).map_err(io)?;
    stream.set_write_timeout(Some(left)).map_err(io)?;
    stream
        .write_all(hvsock_request(port).as_bytes())
        .map_err(io)?;
    let mut reply = HandshakeReply::default();
    loop {
        let mut byte = [0u8];
        let read = match stream.read(&mut byte) {
            Ok(0) => None,
            Ok(_) => Some(byte[0]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) if is_timeout(&err) => {
                return Err(io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reply to the CONNECT handshake",
                )))
            }
            Err(err) => return Err(io(err)),
        };
        if let Some(verdict) = reply.push(read) {
            return verdict.map(|()| stream);
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether a socket error is an expired `SO_RCVTIMEO`/`SO_SNDTIMEO`.
pub(crate) fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn parse(text: &str) -> Result<Target, Error> {
        text.parse()
    }

    #[test]
    fn parses_every_scheme_and_prints_it_back() {
        for (text, target) in [
            (
                "unix:///run/ferry.sock",
                Target::Unix("/run/ferry.sock".into()),
            ),
            ("unix://rel/sock", Target::Unix("rel/sock".into())),
            ("vsock://3:1024", Target::Vsock { cid: 3, port: 1024 }),
            (
                "vsock://4294967295:4294967294",
                Target::Vsock {
                    cid: u32::MAX,
                    port: u32::MAX - 1,
                },
            ),
            (
                "hvsock:///tmp/a:b/vm.vsock:52",
                Target::Hvsock {
                    path: "/tmp/a:b/vm.vsock".into(),
                    port: 52,
                },
            ),
        ] {
            assert_eq!(parse(text).unwrap(), target, "{text}");
            assert_eq!(target.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed_targets_with_a_reason() {
        for text in [
            "",
            "/run/ferry.sock",
            "tcp://1.2.3.4:5",
            "unix://",
            "vsock://3",
            "vsock://x:1",
            "vsock://3:",
            "vsock://3:4294967295",
            "vsock://3:4294967296",
            "vsock://-1:5",
            "hvsock:///tmp/vm.vsock",
            "hvsock://:1024",
            "hvsock:///tmp/vm.vsock:port",
        ] {
            match parse(text) {
                Err(Error::InvalidTarget { target, reason }) => {
                    assert_eq!(target, text);
                    assert!(!reason.is_empty());
                }
                other => panic!("{text:?} parsed as {other:?}"),
            }
        }
    }

    /// A fake VMM socket: each connection gets the next scripted reply (None: close at once).
    fn fake_vmm(replies: Vec<Option<&'static [u8]>>) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new("hvsock");
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            for reply in replies {
                let (mut conn, _) = listener.accept().unwrap();
                let mut line = [0u8; 13];
                conn.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"CONNECT 1024\n");
                if let Some(reply) = reply {
                    conn.write_all(reply).unwrap();
                    // Keep it open so the client sees the reply, not EOF.
                    thread::sleep(Duration::from_millis(200));
                }
            }
        });
        (dir, path)
    }

    fn options() -> ConnectOptions {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            hvsock_retries: 2,
            hvsock_retry_delay: Duration::from_millis(1),
            secret: None,
            max_idle: 4,
        }
    }

    #[test]
    fn hvsock_handshake_leaves_agent_bytes_unread() {
        let (_dir, path) = fake_vmm(vec![Some(b"OK 1073741824\nFRRY")]);
        let target = Target::Hvsock { path, port: 1024 };
        let mut stream = target.open_stream(&options()).unwrap();
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"FRRY");
    }

    #[test]
    fn hvsock_eof_is_retried_a_bounded_number_of_times() {
        let (_dir, path) = fake_vmm(vec![None, None, Some(b"OK 5\n")]);
        let target = Target::Hvsock { path, port: 1024 };
        target.open_stream(&options()).unwrap();

        let (_dir, path) = fake_vmm(vec![None, None, None]);
        let target = Target::Hvsock { path, port: 1024 };
        match target.open_stream(&options()) {
            Err(Error::Connect { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hvsock_refusal_and_garbage_are_typed_errors() {
        for reply in [
            &b"ERR no listener\n"[..],
            b"OK\n",
            b"OK x\n",
            &[b'A'; 100][..],
        ] {
            let (_dir, path) = fake_vmm(vec![Some(reply)]);
            let target = Target::Hvsock { path, port: 1024 };
            match target.open_stream(&options()) {
                Err(Error::HvsockRefused { .. }) => {}
                other => panic!("{reply:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn hvsock_silence_times_out() {
        let dir = tempdir::Dir::new("hvsock-silent");
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let target = Target::Hvsock { path, port: 1024 };
        let options = ConnectOptions {
            connect_timeout: Duration::from_millis(200),
            ..options()
        };
        match target.open_stream(&options) {
            Err(Error::Connect { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut)
            }
            other => panic!("{other:?}"),
        }
        drop(listener);
    }

    #[test]
    fn missing_unix_socket_is_a_connect_error() {
        let target = Target::Unix("/nonexistent/ferry.sock".into());
        match target.open_stream(&options()) {
            Err(Error::Connect { target, source }) => {
                assert_eq!(target, "unix:///nonexistent/ferry.sock");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A throwaway directory removed on drop (no tempfile dependency for a few tests).
    pub(crate) mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new(tag: &str) -> Dir {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
