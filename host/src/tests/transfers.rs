//! Put and get against the scripted fake agent: credit kept to, digests and byte counts checked
//! on both ends, refusals typed, and nothing reported as transferred that was not.

use sha2::{Digest, Sha256};

use ferry_wire::{FileHeader, FileSummary, Timestamp};

use super::*;

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn header(size: u64) -> AgentFrame<'static> {
    AgentFrame::FileReady(FileHeader {
        size,
        mode: 0o100640,
        mtime: Timestamp {
            secs: 1_700_000_000,
            nanos: 5,
        },
        uid: 1000,
        gid: 100,
    })
}

fn done(bytes: u64, sha256: [u8; 32]) -> AgentFrame<'static> {
    AgentFrame::FileDone(FileSummary {
        bytes,
        sha256: ByteArray(sha256),
    })
}

fn refusal(code: ErrorCode, errno: u32, message: &'static str) -> AgentFrame<'static> {
    AgentFrame::Error(ErrorFrame {
        code,
        errno,
        message,
    })
}

fn small_window(window: u32) -> Limits {
    Limits {
        stdin_window: window,
        ..Limits::CURRENT
    }
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Plays the agent's side of a put: the header, then credit for what it consumed, never more
/// than `window` in flight; checks the digest; answers with `summary` (`None`: the true one).
fn serve_put(peer: &mut Peer, window: usize, summary: Option<(u64, [u8; 32])>) -> Vec<u8> {
    assert!(matches!(peer.recv(), Some(Sent::Put(path)) if path == b"/dst/file"));
    peer.send(header(0));
    let mut received = Vec::new();
    let mut in_flight = 0;
    loop {
        match peer.recv() {
            Some(Sent::Stdin(data)) => {
                in_flight += data.len();
                assert!(
                    in_flight <= window,
                    "{in_flight} bytes beyond a {window}-byte window"
                );
                received.extend_from_slice(&data);
                // Credit back in batches, as the agent does.
                if in_flight >= window / 2 {
                    peer.send(AgentFrame::StdinCredit(in_flight as u32));
                    in_flight = 0;
                }
            }
            Some(Sent::PutEnd(digest)) => {
                assert_eq!(digest, sha256(&received), "the put's digest");
                let (bytes, digest) = summary.unwrap_or((received.len() as u64, digest));
                peer.send(done(bytes, digest));
                return received;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_put_streams_within_credit_and_ends_with_its_digest() {
    let data = content(300_000);
    let expected = data.clone();
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello_with(small_window(10_000));
        let received = serve_put(peer, 10_000, None);
        assert_eq!(received, expected);
    });
    let progress = Progress::new();
    let mut put = Put::file("/dst/file");
    put.progress(&progress);
    let done = client.put(&put, &data[..]).unwrap();
    handle.join().unwrap();
    assert_eq!(done.bytes, 300_000);
    assert_eq!(done.sha256, sha256(&data));
    assert_eq!(progress.bytes(), 300_000);
    let file = done.file.unwrap();
    assert_eq!((file.mode, file.uid, file.gid), (0o100640, 1000, 100));
}

#[test]
fn an_upload_is_a_writer() {
    let data = content(70_000);
    let (client, _dir, handle) = fake(|peer| {
        peer.hello_with(small_window(4096));
        serve_put(peer, 4096, None);
    });
    let mut upload = client.upload(&Put::file("/dst/file")).unwrap();
    for piece in data.chunks(999) {
        upload.write_all(piece).unwrap();
    }
    let done = upload.finish().unwrap();
    handle.join().unwrap();
    assert_eq!(done.sha256, sha256(&data));
}

#[test]
fn an_empty_put_sends_only_its_end() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(serve_put(peer, STDIN_WINDOW, None).is_empty());
    });
    let done = client.put(&Put::file("/dst/file"), &b""[..]).unwrap();
    handle.join().unwrap();
    assert_eq!((done.bytes, done.sha256), (0, sha256(b"")));
}

/// The agent refuses the put (a missing directory) while the client has megabytes to send:
/// the refusal comes back typed, with its errno, not as a broken pipe.
#[test]
fn a_put_refused_before_its_content_is_a_typed_error() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello_with(small_window(8192));
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(refusal(ErrorCode::NotFound, 2, "no such directory"));
        // Gone without reading the rest, as a refusing agent is.
    });
    let data = content(4 << 20);
    let err = client.put(&Put::file("/dst/file"), &data[..]).unwrap_err();
    handle.join().unwrap();
    let Error::Remote(remote) = err else {
        panic!("{err:?}")
    };
    assert_eq!((remote.code, remote.errno), (ErrorCode::NotFound, Some(2)));
}

/// A refusal of the digest (the agent read other bytes than we sent) is the agent's
/// `IntegrityMismatch`; a summary that differs from what we sent is ours.
#[test]
fn a_put_whose_summary_differs_is_an_integrity_mismatch() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        serve_put(peer, STDIN_WINDOW, Some((5, [0; 32])));
    });
    let err = client
        .put(&Put::file("/dst/file"), &b"hello"[..])
        .unwrap_err();
    handle.join().unwrap();
    assert!(
        matches!(
            err,
            Error::IntegrityMismatch {
                agent_bytes: 5,
                bytes: 5,
                ..
            }
        ),
        "{err:?}"
    );

    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(header(0));
        assert!(matches!(peer.recv(), Some(Sent::Stdin(_))));
        assert!(matches!(peer.recv(), Some(Sent::PutEnd(_))));
        peer.send(refusal(ErrorCode::IntegrityMismatch, 0, "digest differs"));
    });
    let err = client
        .put(&Put::file("/dst/file"), &b"hello"[..])
        .unwrap_err();
    handle.join().unwrap();
    assert_eq!(err.remote_code(), Some(ErrorCode::IntegrityMismatch));
}

/// Content of another size than declared is not ended: the put is abandoned (the agent sees
/// the connection close before any end) and the caller is told.
#[test]
fn content_of_another_size_than_declared_is_abandoned() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(header(0));
        assert_eq!(peer.recv(), Some(Sent::Stdin(b"short".to_vec())));
        assert_eq!(peer.recv(), None, "no end after content of the wrong size");
    });
    let mut put = Put::file("/dst/file");
    put.size(10);
    let err = client.put(&put, &b"short"[..]).unwrap_err();
    handle.join().unwrap();
    assert!(
        err.to_string().contains("5 bytes, not the 10 declared"),
        "{err}"
    );
}

/// A put's end refused by the session: `FileDone` before the client's end is a protocol error.
#[test]
fn a_put_done_before_its_end_is_a_protocol_error() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello_with(small_window(1000));
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(header(0));
        peer.send(done(0, [0; 32]));
    });
    let err = client
        .put(&Put::file("/dst/file"), &content(5000)[..])
        .unwrap_err();
    handle.join().unwrap();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

/// An agent that stops granting credit and says nothing (a frozen guest) ends the put with
/// `AgentSilent`; one that keeps sending keepalives while it is slow does not.
#[test]
fn a_put_waiting_for_credit_tells_a_slow_agent_from_a_silent_one() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello_with(Limits {
            stdin_window: 1000,
            ..quick_keepalive()
        });
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(header(0));
        assert!(matches!(peer.recv(), Some(Sent::Stdin(_))));
        assert_eq!(peer.recv(), None);
    });
    let started = Instant::now();
    let err = client
        .put(&Put::file("/dst/file"), &content(5000)[..])
        .unwrap_err();
    handle.join().unwrap();
    assert!(matches!(err, Error::AgentSilent), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let data = content(3000);
    let (client, _dir, handle) = fake(|peer| {
        peer.hello_with(Limits {
            stdin_window: 1000,
            ..quick_keepalive()
        });
        assert!(matches!(peer.recv(), Some(Sent::Put(_))));
        peer.send(header(0));
        let mut received = Vec::new();
        loop {
            match peer.recv() {
                Some(Sent::Stdin(data)) => {
                    // A slow disk: five keepalive intervals per window, keepalives meanwhile.
                    for _ in 0..5 {
                        thread::sleep(Duration::from_millis(100));
                        peer.send(AgentFrame::Keepalive);
                    }
                    received.extend_from_slice(&data);
                    peer.send(AgentFrame::StdinCredit(data.len() as u32));
                }
                Some(Sent::PutEnd(digest)) => {
                    peer.send(done(received.len() as u64, digest));
                    return;
                }
                other => panic!("{other:?}"),
            }
        }
    });
    let done = client.put(&Put::file("/dst/file"), &data[..]).unwrap();
    handle.join().unwrap();
    assert_eq!(done.bytes, 3000);
}

/// Plays a get: the header, `data` in chunks, then the summary `summary` (`None`: the true
/// one).
fn serve_get(peer: &mut Peer, data: &[u8], summary: Option<(u64, [u8; 32])>) {
    assert!(matches!(peer.recv(), Some(Sent::Get(path)) if path == b"/src/file"));
    peer.send(header(data.len() as u64));
    for chunk in data.chunks(ferry_wire::limits::MAX_DATA) {
        peer.send(AgentFrame::FileData(Bytes(chunk)));
    }
    let (bytes, digest) = summary.unwrap_or((data.len() as u64, sha256(data)));
    peer.send(done(bytes, digest));
}

#[test]
fn a_get_copies_the_content_and_checks_its_digest() {
    let data = content(200_000);
    let served = data.clone();
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello();
        serve_get(peer, &served, None);
    });
    let mut sink = Vec::new();
    let done = client.get(&Get::file("/src/file"), &mut sink).unwrap();
    handle.join().unwrap();
    assert_eq!(sink, data);
    assert_eq!((done.bytes, done.sha256), (200_000, sha256(&data)));
    let file = done.file.unwrap();
    assert_eq!(file.size, 200_000);
    assert_eq!(
        file.mtime,
        std::time::UNIX_EPOCH + Duration::new(1_700_000_000, 5)
    );
}

#[test]
fn a_download_is_a_reader_that_ends_only_when_the_digest_matched() {
    let data = content(100_000);
    let served = data.clone();
    let (client, _dir, handle) = fake(move |peer| {
        peer.hello();
        serve_get(peer, &served, None);
    });
    let mut download = client.download(&Get::file("/src/file")).unwrap();
    assert_eq!(download.file_info().size, 100_000);
    let mut read = Vec::new();
    let mut small = [0u8; 777];
    loop {
        let n = download.read(&mut small).unwrap();
        if n == 0 {
            break;
        }
        read.extend_from_slice(&small[..n]);
    }
    let done = download.finish().unwrap();
    handle.join().unwrap();
    assert_eq!(read, data);
    assert_eq!(done.sha256, sha256(&data));
}

/// Content that differs from the agent's digest, or a byte count that differs, is detected
/// and reported as `IntegrityMismatch`, never as success.
#[test]
fn a_get_whose_digest_or_count_differs_is_an_integrity_mismatch() {
    let data = content(50_000);
    let cases: [Option<(u64, [u8; 32])>; 2] = [
        // A bit flipped on the way: the agent's digest is of other bytes.
        Some((50_000, sha256(b"other bytes"))),
        // The agent says it sent more than arrived.
        Some((50_001, sha256(&data))),
    ];
    for summary in cases {
        let served = data.clone();
        let (client, _dir, handle) = fake(move |peer| {
            peer.hello();
            serve_get(peer, &served, summary);
        });
        let err = client
            .get(&Get::file("/src/file"), std::io::sink())
            .unwrap_err();
        handle.join().unwrap();
        match err {
            Error::IntegrityMismatch {
                agent_bytes, bytes, ..
            } => {
                assert_eq!(agent_bytes, summary.unwrap().0);
                assert_eq!(bytes, 50_000);
            }
            other => panic!("{other:?}"),
        }

        // Read as a stream: the end is an error, not EOF.
        let served = data.clone();
        let (client, _dir, handle) = fake(move |peer| {
            peer.hello();
            serve_get(peer, &served, summary);
        });
        let mut download = client.download(&Get::file("/src/file")).unwrap();
        let err = std::io::copy(&mut download, &mut std::io::sink()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(matches!(
            download.finish(),
            Err(Error::IntegrityMismatch { .. })
        ));
        handle.join().unwrap();
    }
}

/// A refusal comes before any content: the sink is never written to.
#[test]
fn a_get_refused_writes_nothing_and_names_the_errno() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Get(_))));
        peer.send(refusal(ErrorCode::PermissionDenied, 13, "open"));
    });
    struct NoWrites;
    impl Write for NoWrites {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("written to before the file was ready")
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = client.get(&Get::file("/src/file"), NoWrites).unwrap_err();
    handle.join().unwrap();
    let Error::Remote(remote) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (remote.code, remote.errno),
        (ErrorCode::PermissionDenied, Some(13))
    );
    assert_eq!(remote.to_string(), "permission denied: open (EACCES)");
}

/// An agent that fails mid-transfer: its error, not a partial success.
#[test]
fn a_get_failing_midway_is_the_agents_error() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Get(_))));
        peer.send(header(10));
        peer.send(AgentFrame::FileData(Bytes(b"12345")));
        peer.send(refusal(ErrorCode::Io, 5, "read"));
    });
    let mut sink = Vec::new();
    let err = client.get(&Get::file("/src/file"), &mut sink).unwrap_err();
    handle.join().unwrap();
    assert_eq!(err.remote_code(), Some(ErrorCode::Io));
    assert_eq!(sink, b"12345");
}

/// Frames out of order for a get end in a protocol error: content before the header, a put's
/// credit, a second header.
#[test]
fn a_get_with_frames_out_of_order_is_a_protocol_error() {
    let scripts: [fn(&mut Peer); 3] = [
        |peer| peer.send(AgentFrame::FileData(Bytes(b"early"))),
        |peer| {
            peer.send(header(1));
            peer.send(AgentFrame::StdinCredit(1));
        },
        |peer| {
            peer.send(header(1));
            peer.send(header(1));
        },
    ];
    for script in scripts {
        let (client, _dir, handle) = fake(move |peer| {
            peer.hello();
            assert!(matches!(peer.recv(), Some(Sent::Get(_))));
            script(peer);
        });
        let err = client
            .get(&Get::file("/src/file"), std::io::sink())
            .unwrap_err();
        handle.join().unwrap();
        assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    }
}

/// A tree's skipped entries are kept (the first ones by name) and counted.
#[test]
fn a_trees_skipped_entries_are_reported() {
    let (client, _dir, handle) = fake(|peer| {
        peer.hello();
        assert!(matches!(peer.recv(), Some(Sent::Get(_))));
        peer.send(header(0));
        for _ in 0..MAX_SKIPPED_KEPT + 5 {
            peer.send(AgentFrame::Skipped(ferry_wire::Skipped {
                path: Bytes(b"dev/null"),
                reason: SkipReason::Special,
            }));
        }
        peer.send(AgentFrame::FileData(Bytes(b"tar")));
        peer.send(done(3, sha256(b"tar")));
    });
    let mut sink = Vec::new();
    let done = client.get(&Get::tree("/src/file"), &mut sink).unwrap();
    handle.join().unwrap();
    assert_eq!(sink, b"tar");
    assert_eq!(done.skipped.len(), MAX_SKIPPED_KEPT);
    assert_eq!(done.skipped_total, MAX_SKIPPED_KEPT as u64 + 5);
    assert_eq!(done.skipped[0].path, b"dev/null");
}

/// Requests the protocol refuses never reach a socket.
#[test]
fn invalid_transfers_are_refused_before_connecting() {
    let client = Client::new(
        &Target::Unix("/nonexistent/agent.sock".into()),
        ConnectOptions::default(),
    );
    let cases = [
        client.put(&Put::file("relative"), &b""[..]).unwrap_err(),
        client
            .put(Put::file("/x").mode(0o10000), &b""[..])
            .unwrap_err(),
        client.put(Put::tree("/x").size(3), &b""[..]).unwrap_err(),
        client
            .get(&Get::file("/a\0b"), std::io::sink())
            .unwrap_err(),
    ];
    for err in cases {
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    }
}
