//! Opening a target without blocking: a Unix socket, AF_VSOCK (`crate::vsock`'s non-blocking
//! connect), or hybrid vsock with its `CONNECT <port>\n` → `OK <n>\n`
//! handshake. Same rules as the blocking transport: one deadline over connect and handshake, a
//! handshake that ends in EOF retried a bounded number of times with a doubling pause.

use std::io;
use std::path::Path;

use ::tokio::net::UnixStream;
use ::tokio::time::{sleep, timeout_at, Instant};

use crate::target::{hvsock_request, HandshakeError, HandshakeReply};
use crate::{ConnectOptions, Error, Target};

/// Opens a byte stream to the agent by `deadline`, hybrid-vsock handshake done, nothing of the
/// protocol sent.
pub(super) async fn open(
    target: &Target,
    options: &ConnectOptions,
    deadline: Instant,
) -> Result<UnixStream, Error> {
    let connect_error = |source: io::Error| Error::Connect {
        target: target.to_string(),
        source,
    };
    let timed_out = |what: &str| connect_error(io::Error::new(io::ErrorKind::TimedOut, what));
    match target {
        Target::Unix(path) => timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| timed_out("connect timed out"))?
            .map_err(connect_error),
        Target::Vsock { cid, port } => timeout_at(deadline, connect_vsock(*cid, *port))
            .await
            .map_err(|_| timed_out("connect timed out"))?
            .map_err(connect_error),
        Target::Hvsock { path, port } => {
            let mut delay = options.hvsock_retry_delay;
            let mut attempt = 0;
            loop {
                let result = timeout_at(deadline, hvsock_attempt(path, *port)).await;
                match result {
                    Err(_) => return Err(timed_out("no reply to the CONNECT handshake")),
                    Ok(Ok(stream)) => return Ok(stream),
                    Ok(Err(err)) if err.is_eof() && attempt < options.hvsock_retries => {
                        attempt += 1;
                        if Instant::now() + delay >= deadline {
                            return Err(timed_out("connect timed out"));
                        }
                        sleep(delay).await;
                        delay = delay.saturating_mul(2);
                    }
                    Ok(Err(err)) => return Err(err.into_error(target)),
                }
            }
        }
    }
}

/// A non-blocking AF_VSOCK connect, awaited through the socket's write readiness.
async fn connect_vsock(cid: u32, port: u32) -> io::Result<UnixStream> {
    let stream = UnixStream::from_std(crate::vsock::connect_nonblocking(cid, port)?)?;
    stream.writable().await?;
    match stream.take_error()? {
        Some(err) => Err(err),
        None => Ok(stream),
    }
}

/// Hybrid vsock: connect the Unix socket, send `CONNECT <port>\n`, expect `OK <n>\n`.
async fn hvsock_attempt(path: &Path, port: u32) -> Result<UnixStream, HandshakeError> {
    let io = HandshakeError::Io;
    let stream = UnixStream::connect(path).await.map_err(io)?;
    let line = hvsock_request(port);
    let mut sent = 0;
    while sent < line.len() {
        stream.writable().await.map_err(io)?;
        match stream.try_write(&line.as_bytes()[sent..]) {
            Ok(n) => sent += n,
            Err(err) if is_retry(&err) => {}
            Err(err) => return Err(io(err)),
        }
    }
    let mut reply = HandshakeReply::default();
    loop {
        stream.readable().await.map_err(io)?;
        let mut byte = [0u8];
        let read = match stream.try_read(&mut byte) {
            Ok(0) => None,
            Ok(_) => Some(byte[0]),
            Err(err) if is_retry(&err) => continue,
            Err(err) => return Err(io(err)),
        };
        if let Some(verdict) = reply.push(read) {
            return verdict.map(|()| stream);
        }
    }
}

fn is_retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
