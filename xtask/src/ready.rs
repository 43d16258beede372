//! Readiness without polling the guest: the host listens before QEMU starts, and the agent, once
//! listening and once the guest has a CID, connects to that port and sends its hello and a
//! [`ReadyReport`].
//!
//! Listening first matters beyond speed: connecting to vhost-device-vsock before the guest's
//! driver is up wedges the daemon (REFERENCE.md §4, pitfall 1).

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_host::vsock;
use ferry_wire::limits::MAX_FRAME;
use ferry_wire::session::{ReadyEvent, ReadyReceiver, SessionError};
use ferry_wire::{ReadyReport, RecvBuf};

/// What the agent announced, and how long it took to.
#[derive(Debug, Clone)]
pub struct ReadyInfo {
    /// The agent's crate version, from its hello.
    pub agent_version: String,
    /// The protocol version the agent speaks.
    pub protocol_version: u16,
    /// The guest's own boot timings (`CLOCK_BOOTTIME` µs); its module times are in
    /// `module_times`.
    pub report: ReadyReport<'static>,
    /// Each module the agent loaded and the microseconds it took.
    pub module_times: Vec<(String, u64)>,
    /// Host side: QEMU spawned → the agent's hello received.
    pub boot_to_ready: Duration,
}

impl ReadyInfo {
    /// Time inside the guest from the agent's `main` to its listener being ready, modules
    /// included.
    pub fn init_to_listening(&self) -> Duration {
        Duration::from_micros(
            self.report
                .listening_us
                .saturating_sub(self.report.init_started_us),
        )
    }

    /// [`Self::init_to_listening`] without the module loading.
    pub fn init_to_listening_without_modules(&self) -> Duration {
        self.init_to_listening()
            .saturating_sub(Duration::from_micros(self.report.modules_us))
    }

    /// One line for humans.
    pub fn summary(&self) -> String {
        format!(
            "agent {} (protocol {}), guest CID {}: boot-to-ready {:.0} ms; in the guest: kernel → /init {:.0} ms, /init → listening {:.1} ms ({:.1} ms of it loading modules)",
            self.agent_version,
            self.protocol_version,
            self.report.cid,
            self.boot_to_ready.as_secs_f64() * 1e3,
            self.report.init_started_us as f64 / 1e3,
            self.init_to_listening().as_secs_f64() * 1e3,
            self.report.modules_us as f64 / 1e3,
        ) + &self.module_summary()
    }

    /// `; modules: virtio_mmio 1.2 ms, vsock 3.4 ms, …` (empty when none was loaded).
    pub fn module_summary(&self) -> String {
        if self.module_times.is_empty() {
            return String::new();
        }
        let each: Vec<String> = self
            .module_times
            .iter()
            .map(|(name, us)| format!("{name} {:.1} ms", *us as f64 / 1e3))
            .collect();
        format!("; modules: {}", each.join(", "))
    }
}

/// The host end of the readiness connection, bound before the guest starts.
pub enum ReadyListener {
    /// vhost-device-vsock's hybrid vsock: guest → host port P arrives on `<uds-path>_P`.
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    /// In-kernel vhost-vsock: an AF_VSOCK listener on any CID.
    Vsock(OwnedFd),
}

impl ReadyListener {
    /// Listens on `path`, replacing a stale socket left there.
    pub fn bind_unix(path: &Path) -> Result<ReadyListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("removing stale {}", path.display()))
            }
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(ReadyListener::Unix {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Listens on AF_VSOCK port `port` of any local CID.
    pub fn bind_vsock(port: u32) -> Result<ReadyListener> {
        let fd = vsock::listen(vsock::CID_ANY, port)
            .with_context(|| format!("listening on vsock port {port}"))?;
        Ok(ReadyListener::Vsock(fd))
    }

    /// Waits until the agent connects and reads its hello and ready report. `spawned` is when
    /// QEMU started; `check` runs between polls and aborts the wait with its error (QEMU died, the
    /// user pressed Ctrl-C).
    pub fn wait(
        &self,
        spawned: Instant,
        deadline: Instant,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<ReadyInfo> {
        loop {
            if let Some(stream) = self.accept()? {
                return read_announcement(stream, spawned, deadline);
            }
            check()?;
            if Instant::now() >= deadline {
                bail!(
                    "the agent did not announce itself within {:.0} s",
                    (deadline - spawned).as_secs_f64()
                );
            }
            // Short enough not to blur the boot-to-ready figure.
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn accept(&self) -> Result<Option<UnixStream>> {
        let accepted = match self {
            ReadyListener::Unix { listener, .. } => listener.accept().map(|(stream, _)| stream),
            ReadyListener::Vsock(fd) => vsock::accept(fd.as_fd()),
        };
        match accepted {
            Ok(stream) => {
                stream.set_nonblocking(false)?;
                Ok(Some(stream))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(err) => Err(err).context("accepting the readiness connection"),
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        if let ReadyListener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads the announcement on the readiness connection (its hello, then the report) through
/// `ferry_wire`'s `ReadyReceiver`, which holds the rules.
fn read_announcement(
    mut stream: UnixStream,
    spawned: Instant,
    deadline: Instant,
) -> Result<ReadyInfo> {
    // The frames follow the connect immediately; a generous floor covers a slow TCG guest.
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5));
    stream.set_read_timeout(Some(timeout))?;
    let mut recv = RecvBuf::new(vec![0u8; MAX_FRAME]);
    let mut receiver = ReadyReceiver::new();
    // `RecvError` and `SessionError` are no_std, not `std::error::Error`: their message is the error.
    let session_error = |err: SessionError| anyhow!("readiness connection: {err}");
    let mut hello = None;
    loop {
        let input = receiver.handle_input(recv.data()).map_err(session_error)?;
        match input.event {
            Some(ReadyEvent::Hello(info)) => {
                hello = Some((
                    info.agent_version.to_owned(),
                    info.protocol_version,
                    spawned.elapsed(),
                ));
            }
            Some(ReadyEvent::Ready(report)) => {
                let (agent_version, protocol_version, boot_to_ready) =
                    hello.context("a report without a hello")?;
                let module_times = report
                    .module_times
                    .entries()
                    .filter_map(|entry| {
                        let entry = String::from_utf8_lossy(entry);
                        let (name, us) = entry.split_once('=')?;
                        Some((name.to_owned(), us.parse().ok()?))
                    })
                    .collect();
                return Ok(ReadyInfo {
                    agent_version,
                    protocol_version,
                    report: ReadyReport {
                        module_times: ferry_wire::StrList::new(b""),
                        ..report
                    },
                    module_times,
                    boot_to_ready,
                });
            }
            None if input.consumed == 0 => {
                let spare = recv.spare().map_err(|err| anyhow!("{err}"))?;
                let n = stream.read(spare).context("reading the announcement")?;
                if n == 0 {
                    receiver
                        .handle_eof(recv.data().len())
                        .map_err(session_error)?;
                    bail!("the readiness connection closed before the report");
                }
                recv.commit(n);
                continue;
            }
            None => {}
        }
        recv.consume(input.consumed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};

    use ferry_wire::{encode_agent_frame, AgentFrame, AgentHello, Limits, MAGIC, PROTOCOL_VERSION};

    fn socket_path() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "ferry-ready-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn announce(path: &Path, frames: &[AgentFrame<'_>]) {
        let mut stream = UnixStream::connect(path).expect("connect");
        let mut buf = [0u8; 256];
        for frame in frames {
            let n = encode_agent_frame(frame, &mut buf).expect("encode");
            // Byte by byte: the reader must reassemble frames split across reads.
            for byte in &buf[..n] {
                stream.write_all(&[*byte]).expect("write");
            }
        }
    }

    #[test]
    fn reads_hello_and_report() {
        let path = socket_path();
        let listener = ReadyListener::bind_unix(&path).expect("bind");
        let report = ReadyReport {
            cid: 3,
            init_started_us: 900_000,
            modules_us: 150_000,
            listening_us: 1_060_000,
            module_times: ferry_wire::StrList::new(b"virtio_mmio=1500\0vsock=250\0bad\0x=y\0"),
        };
        let writer = {
            let path = path.clone();
            thread::spawn(move || {
                announce(
                    &path,
                    &[
                        AgentFrame::Hello(AgentHello {
                            magic: MAGIC,
                            min_version: PROTOCOL_VERSION,
                            version: PROTOCOL_VERSION,
                            agent_version: "9.9.9",
                            limits: Limits::CURRENT,
                            nonce: ferry_wire::ByteArray([0; 32]),
                            security: ferry_wire::Security::Authenticated,
                            bounds: ferry_wire::Bounds::default(),
                        }),
                        AgentFrame::Ready(report),
                    ],
                )
            })
        };
        let start = Instant::now();
        let info = listener
            .wait(start, start + Duration::from_secs(10), || Ok(()))
            .expect("ready");
        writer.join().expect("writer thread");
        assert_eq!(info.agent_version, "9.9.9");
        assert_eq!(info.protocol_version, PROTOCOL_VERSION);
        assert_eq!(
            info.report,
            ReadyReport {
                module_times: ferry_wire::StrList::new(b""),
                ..report
            }
        );
        // Malformed entries are left out.
        assert_eq!(
            info.module_times,
            [("virtio_mmio".to_owned(), 1500), ("vsock".to_owned(), 250)]
        );
        assert!(info
            .summary()
            .ends_with("; modules: virtio_mmio 1.5 ms, vsock 0.2 ms"));
        assert_eq!(info.init_to_listening(), Duration::from_millis(160));
        assert_eq!(
            info.init_to_listening_without_modules(),
            Duration::from_millis(10)
        );
        drop(listener);
        assert!(!path.exists(), "the socket is removed on drop");
    }

    #[test]
    fn times_out_and_aborts() {
        let path = socket_path();
        let listener = ReadyListener::bind_unix(&path).expect("bind");
        let start = Instant::now();
        let err = listener
            .wait(start, start + Duration::from_millis(30), || Ok(()))
            .expect_err("nobody connects");
        assert!(err.to_string().contains("did not announce"), "{err}");
        let err = listener
            .wait(start, start + Duration::from_secs(10), || {
                bail!("qemu died")
            })
            .expect_err("check fails");
        assert!(err.to_string().contains("qemu died"), "{err}");
    }

    /// Sends `bytes` on a readiness connection and returns the error reading it ends with.
    fn announcement_error(bytes: Vec<u8>) -> String {
        let path = socket_path();
        let listener = ReadyListener::bind_unix(&path).expect("bind");
        let writer = {
            let path = path.clone();
            thread::spawn(move || {
                let mut stream = UnixStream::connect(&path).expect("connect");
                stream.write_all(&bytes).expect("write");
            })
        };
        let start = Instant::now();
        let err = listener
            .wait(start, start + Duration::from_secs(10), || Ok(()))
            .expect_err("no announcement");
        writer.join().expect("writer thread");
        format!("{err:#}")
    }

    #[test]
    fn a_connection_closed_mid_frame_is_an_error() {
        // A header announcing 10 bytes, then 3 of them.
        let err = announcement_error(vec![10, 0, 0, 0, 1, 2, 3]);
        assert!(err.contains("closed the connection mid-frame"), "{err}");
        let err = announcement_error(Vec::new());
        assert!(
            err.contains("closed the connection during the hello"),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_at_its_header() {
        let err = announcement_error(u32::MAX.to_le_bytes().to_vec());
        assert!(err.contains("readiness connection"), "{err}");
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn rejects_a_report_without_hello() {
        let path = socket_path();
        let listener = ReadyListener::bind_unix(&path).expect("bind");
        let report = ReadyReport {
            cid: 3,
            init_started_us: 0,
            modules_us: 0,
            listening_us: 0,
            module_times: ferry_wire::StrList::new(b""),
        };
        let writer = {
            let path = path.clone();
            thread::spawn(move || announce(&path, &[AgentFrame::Ready(report)]))
        };
        let start = Instant::now();
        let err = listener
            .wait(start, start + Duration::from_secs(10), || Ok(()))
            .expect_err("no hello");
        writer.join().expect("writer thread");
        assert!(
            format!("{err:#}").contains("unexpected frame: a readiness report during the hello"),
            "{err:#}"
        );
    }
}
