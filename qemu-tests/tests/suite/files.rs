//! File transfer over the real transport: a put and a get round trip through raw sessions
//! ([`frames::Transfer`]), below the host library's own API, and the atomic put's promise that
//! content which does not check out replaces nothing.

use ferry_wire::{Bytes, ErrorCode, GetRequest, PutRequest, TransferKind};
use sha2::{Digest, Sha256};

use super::frames::{Outcome, Transfer};
use super::{pattern, Fixture};

fn open(fixture: &Fixture) -> Transfer {
    let stream = fixture.target.open_stream(&fixture.options()).unwrap();
    Transfer::open(stream, fixture.secret())
}

fn put_request(path: &str) -> PutRequest<'_> {
    PutRequest {
        path: Bytes(path.as_bytes()),
        kind: TransferKind::File,
        mode: Some(0o600),
        owner: None,
        mtime: None,
        size: None,
        create_parents: true,
        no_clobber: false,
        user: None,
    }
}

/// Puts `content` with `sha256` as its digest.
fn put(fixture: &Fixture, request: &PutRequest<'_>, content: &[u8], sha256: &[u8; 32]) -> Outcome {
    let mut transfer = open(fixture);
    transfer.start_put(request);
    if let Some(early) = transfer.send_content(content) {
        return early;
    }
    transfer.end_put(sha256);
    transfer.finish(&mut |_| {})
}

pub fn a_put_and_a_get_round_trip(fixture: &Fixture) {
    let path = fixture.scratch_path("sub/dir/file");
    let path = path.to_str().unwrap();
    let content = pattern(1 << 20);
    let digest: [u8; 32] = Sha256::digest(&content).into();
    let request = PutRequest {
        size: Some(content.len() as u64),
        ..put_request(path)
    };
    let outcome = put(fixture, &request, &content, &digest);
    assert!(
        matches!(&outcome, Outcome::Done(s) if s.sha256.0 == digest && s.bytes == 1 << 20),
        "{outcome:?}"
    );

    // A wrong digest: refused, and the file is still the first content.
    let mut wrong = digest;
    wrong[31] ^= 0x80;
    let outcome = put(fixture, &put_request(path), b"other", &wrong);
    assert_eq!(outcome.code(), ErrorCode::IntegrityMismatch);

    let mut transfer = open(fixture);
    transfer.start_get(&GetRequest {
        path: Bytes(path.as_bytes()),
        kind: TransferKind::File,
        user: None,
    });
    let mut back = Vec::new();
    let outcome = transfer.finish(&mut |data| back.extend_from_slice(data));
    assert!(
        matches!(&outcome, Outcome::Done(s) if s.sha256.0 == digest),
        "{outcome:?}"
    );
    assert!(back == content, "the content came back different");
    let header = transfer.header.unwrap();
    assert_eq!((header.size, header.mode & 0o7777), (1 << 20, 0o600));
}
