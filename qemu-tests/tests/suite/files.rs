//! File transfer over the real transport: a put and a get round trip through raw sessions
//! ([`frames::Transfer`]), below the host library's own API, and the atomic put's promise that
//! content which does not check out replaces nothing. A tree round trip through the library,
//! with a special file skipped and an escaping entry refused.

use ferry_wire::{Bytes, ErrorCode, GetRequest, PutRequest, TransferKind};
use sha2::{Digest, Sha256};

use super::frames::{Outcome, Transfer};
use super::{pattern, sh, stdout_of, Fixture};

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

/// A small tree put as a tar stream and got back: the same entries, modes, times and links;
/// a fifo made in the guest comes back as a note; an entry climbing out is refused.
pub fn a_tree_round_trips_and_escapes_are_refused(fixture: &Fixture) {
    use ferry_host::{ErrorCode, Get, Put, SkipReason};
    use tar::EntryType::{Directory, Regular, Symlink};
    let client = fixture.client();
    let root = fixture.scratch_path("tree");
    // (name, kind, mode, link target, content)
    let entries: [(&str, tar::EntryType, u32, &str, &[u8]); 5] = [
        ("bin", Directory, 0o750, "", b""),
        ("bin/run", Regular, 0o755, "", b"#!/bin/sh\necho hi\n"),
        ("secret", Regular, 0o600, "", b"s3cret"),
        ("link", Symlink, 0o777, "bin/run", b""),
        ("dangling", Symlink, 0o777, "/no/such/file", b""),
    ];
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, mode, link, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(1_500_000_000);
        header.set_size(data.len() as u64);
        if kind == Symlink {
            header.set_link_name(link).unwrap();
        }
        builder.append_data(&mut header, name, data).unwrap();
    }
    let stream = builder.into_inner().unwrap();
    let mut put = Put::tree(&root);
    put.mode(0o700)
        .mtime(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000));
    let done = client.put(&put, &stream[..]).unwrap();
    assert_eq!(done.bytes, stream.len() as u64);
    let listing = stdout_of(
        &client,
        sh("cd \"$1\" && stat -c '%n %a %Y' . bin bin/run secret && readlink link && readlink dangling && cat bin/run && mkfifo bin/fifo")
            .arg("sh")
            .arg(&root),
    );
    assert_eq!(
        listing,
        ". 700 1500000000\nbin 750 1500000000\nbin/run 755 1500000000\n\
         secret 600 1500000000\nbin/run\n/no/such/file\n#!/bin/sh\necho hi\n"
    );

    let mut back = Vec::new();
    let done = client.get(&Get::tree(&root), &mut back).unwrap();
    assert_eq!(done.bytes, back.len() as u64);
    let skipped: Vec<_> = done
        .skipped
        .iter()
        .map(|s| (s.path.as_slice(), s.reason))
        .collect();
    assert_eq!(skipped, [(&b"bin/fifo"[..], SkipReason::Special)]);
    let mut archive = tar::Archive::new(&back[..]);
    let mut got = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        got.push((
            name,
            header.entry_type(),
            header.mode().unwrap() & 0o7777,
            link.unwrap_or_default(),
            data,
        ));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<_> = entries
        .iter()
        .map(|(name, kind, mode, link, data)| {
            (
                name.to_string(),
                *kind,
                *mode,
                link.to_string(),
                data.to_vec(),
            )
        })
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want);

    // An entry climbing out of a new destination: refused, nothing made.
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(Regular);
    header.set_mode(0o644);
    header.set_size(1);
    header.as_old_mut().name[..9].copy_from_slice(b"../escape");
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"x"[..]).unwrap();
    let hostile = builder.into_inner().unwrap();
    let err = client
        .put(&Put::tree(fixture.scratch_path("hostile")), &hostile[..])
        .unwrap_err();
    assert_eq!(err.remote_code(), Some(ErrorCode::PathEscape), "{err}");
    // Neither the destination nor its temporary directory.
    let script = "ls -A \"$1\" | grep hostile; true";
    let left = stdout_of(&client, sh(script).arg("sh").arg(&fixture.scratch));
    assert_eq!(left, "");
}
