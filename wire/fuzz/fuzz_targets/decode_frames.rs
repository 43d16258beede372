//! Arbitrary bytes through `split_frame` and both decoders. Whatever decodes must survive a round
//! trip (encode → decode gives the same frame, and re-encoding gives the same bytes); the data
//! frames built in place must match the encoder byte for byte (output with its timestamp); a
//! request's lists checked in pieces must give the answer of the whole; protocol 4's requests
//! and protocol 5's job requests are validated as the model's own rules say
//! (`ferry_wire_fuzz::ops`, `ferry_wire_fuzz::jobs`); nothing may panic.

#![no_main]

use ferry_wire::limits::{HEADER_LEN, MAX_DATA, MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::{check_job_name, check_job_ref, parse_job_id};
use ferry_wire::{
    decode_agent_frame, decode_client_frame, encode_agent_frame, encode_client_frame,
    frame_data_in_place, split_frame, AgentFrame, ClientFrame, DataKind, ExecRequest, Limits,
    ListCheck, ListKind, RequestError, StrList, DATA_HEADROOM,
};
use ferry_wire_fuzz::{jobs, ops};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match split_frame(rest, MAX_FRAME_BODY) {
            Ok(Some((body, used))) => {
                assert!(used == body.len() + 4 && used <= rest.len());
                check_client(body);
                check_agent(body);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(err) => {
                assert!(err.declared as usize > MAX_FRAME_BODY);
                break;
            }
        }
    }
    // Every body, framed or not, goes through both decoders too: the front of a stream is not
    // the only place a decoder meets bytes.
    check_client(data);
    check_agent(data);
});

fn check_client(body: &[u8]) {
    let Ok(frame) = decode_client_frame(body) else {
        return;
    };
    // Room for the frame as it came: its re-encoding is never longer (below). A whole
    // `MAX_FRAME` per input would cost more than the decoding.
    let mut out = vec![0u8; room(body)];
    let n = encode_client_frame(&frame, &mut out).expect("a decoded client frame encodes");
    // A re-encoding is never longer than what decoded (postcard's encoding is the shortest).
    assert!(n <= body.len() + 4, "{frame:?}: {n} > {}", body.len() + 4);
    let (again, used) = split_frame(&out[..n], MAX_FRAME_BODY)
        .expect("within the limit")
        .expect("whole");
    assert_eq!(used, n);
    let decoded = decode_client_frame(again).expect("an encoded client frame decodes");
    assert_eq!(decoded, frame);
    let mut twice = vec![0u8; n];
    let m = encode_client_frame(&decoded, &mut twice).expect("encodes again");
    assert_eq!(out[..n], twice[..m]);
    if let ClientFrame::Exec(request) = frame {
        // Validation is total, and what it accepts stays accepted.
        let whole = request.validate();
        if let Ok(valid) = whole {
            assert_eq!(*valid.request(), request);
            assert!(!request.argv.is_empty());
            assert!(!valid.has_parts());
        }
        let _ = request.argv.entries().count() + request.env.entries().count();
        check_in_pieces(&request, whole.map(|_| ()), body);
    }
    if let ClientFrame::ExecPart(part) = frame {
        // A piece on its own is checked without a panic, and what it left open shows at the end.
        let mut check = ListCheck::new(part.list, &Limits::CURRENT);
        if check.feed(part.data.0).is_ok() {
            assert_eq!(check.bytes(), part.data.0.len());
            let ends = part.data.0.last().is_none_or(|b| *b == 0);
            if check.finish().is_ok() {
                assert!(ends, "an open entry passed");
            }
        }
    }
    if let ClientFrame::Stdin(data) = frame {
        check_in_place(DataKind::Stdin, data.0, 0, &out[..n]);
    }
    // Protocol 4's requests: each `validate*` gives the model's answer.
    let limits = Limits::CURRENT;
    let verdict = |result: Result<(), RequestError>| result.err().map(|e| (e.code, e.message));
    match frame {
        ClientFrame::Put(put) => {
            assert_eq!(
                verdict(put.validate_within(&limits)),
                ops::put_refusal(&put, &limits)
            )
        }
        ClientFrame::Get(get) => {
            assert_eq!(
                verdict(get.validate_within(&limits)),
                ops::get_refusal(&get, &limits)
            )
        }
        ClientFrame::Shutdown(request) => {
            assert_eq!(verdict(request.validate()), ops::shutdown_refusal(&request))
        }
        ClientFrame::TimeSync(time) => {
            assert_eq!(time.is_valid(), ops::time_sync_refusal(&time).is_none())
        }
        _ => {}
    }
    check_job_request(&frame);
}

/// Protocol 5's job requests: each `validate*` (and the reference and name checks) gives the
/// model's answer.
fn check_job_request(frame: &ClientFrame<'_>) {
    let limits = Limits::CURRENT;
    let verdict = |result: Result<(), RequestError>| result.err().map(|e| (e.code, e.message));
    let job_ref = |job: &[u8]| {
        assert_eq!(verdict(check_job_ref(job)), jobs::ref_refusal(job));
        assert_eq!(parse_job_id(job), jobs::job_id(job));
        assert_eq!(verdict(check_job_name(job)), jobs::name_refusal(job));
    };
    match *frame {
        ClientFrame::StartJob(start) => {
            if let Some(name) = start.name {
                job_ref(name.0);
            }
            assert_eq!(
                verdict(start.validate()),
                jobs::start_refusal(start.name.map(|name| name.0))
            );
        }
        ClientFrame::Jobs(query) => {
            assert_eq!(
                verdict(query.validate_within(&limits)),
                jobs::query_refusal(&query, &limits)
            )
        }
        ClientFrame::Attach(request) => {
            job_ref(request.job.0);
            assert_eq!(
                verdict(request.validate_within(&limits)),
                jobs::attach_refusal(&request, &limits)
            )
        }
        ClientFrame::Wait(request) | ClientFrame::Remove(request) => {
            job_ref(request.job.0);
            assert_eq!(
                verdict(request.validate_within(&limits)),
                jobs::request_refusal(&request, &limits)
            )
        }
        ClientFrame::Kill(kill) => {
            job_ref(kill.job.0);
            assert_eq!(
                verdict(kill.validate_within(&limits)),
                jobs::kill_refusal(&kill, &limits)
            )
        }
        _ => {}
    }
}

fn check_agent(body: &[u8]) {
    let Ok(frame) = decode_agent_frame(body) else {
        return;
    };
    let mut out = vec![0u8; room(body)];
    let n = encode_agent_frame(&frame, &mut out).expect("a decoded agent frame encodes");
    assert!(n <= body.len() + 4, "{frame:?}: {n} > {}", body.len() + 4);
    let (again, used) = split_frame(&out[..n], MAX_FRAME_BODY)
        .expect("within the limit")
        .expect("whole");
    assert_eq!(used, n);
    let decoded = decode_agent_frame(again).expect("an encoded agent frame decodes");
    assert_eq!(decoded, frame);
    let mut twice = vec![0u8; n];
    let m = encode_agent_frame(&decoded, &mut twice).expect("encodes again");
    assert_eq!(out[..n], twice[..m]);
    match frame {
        AgentFrame::Stdout(out_) => {
            check_in_place(DataKind::Stdout, out_.data.0, out_.at_us, &out[..n])
        }
        AgentFrame::Stderr(out_) => {
            check_in_place(DataKind::Stderr, out_.data.0, out_.at_us, &out[..n])
        }
        AgentFrame::FileData(data) => check_in_place(DataKind::FileData, data.0, 0, &out[..n]),
        AgentFrame::Exited(end) => {
            let _ = end.status.shell_code();
        }
        AgentFrame::Error(err) => {
            let _ = err.code.as_str();
        }
        _ => {}
    }
}

/// A request's lists checked in pieces (as `ClientFrame::ExecPart`s would bring them) give the
/// answer of the whole request: the same error when only argv is cut (its first broken rule, in
/// the list's order), the same verdict when both are.
fn check_in_pieces(request: &ExecRequest<'_>, whole: Result<(), RequestError>, body: &[u8]) {
    let limits = Limits::CURRENT;
    let argv = request.argv.as_bytes();
    let env = request.env.as_bytes();
    let cut = |len: usize, salt: u8| match len {
        0 => 0,
        _ => usize::from(body.len() as u8 ^ salt) % (len + 1),
    };
    let (argv_head, argv_tail) = argv.split_at(cut(argv.len(), 0));
    let (env_head, env_tail) = env.split_at(cut(env.len(), 0x5a));
    let in_pieces = |env_head: &[u8], env_tail: &'_ [u8]| {
        let mut argv_check = ListCheck::new(ListKind::Argv, &limits);
        let mut env_check = ListCheck::new(ListKind::Env, &limits);
        argv_check.feed(argv_head)?;
        env_check.feed(env_head)?;
        let last = ExecRequest {
            argv: StrList::new(argv_tail),
            env: StrList::new(env_tail),
            ..*request
        };
        let valid = last.validate_after(&limits, argv_check, env_check)?;
        assert_eq!(
            valid.has_parts(),
            !argv_head.is_empty() || !env_head.is_empty()
        );
        Ok::<(), RequestError>(())
    };
    assert_eq!(
        in_pieces(&[], env),
        whole,
        "argv cut at {}",
        argv_head.len()
    );
    assert_eq!(
        in_pieces(env_head, env_tail).is_ok(),
        whole.is_ok(),
        "cut at {} and {}",
        argv_head.len(),
        env_head.len()
    );
}

/// A buffer for re-encoding `body`: its header, itself, and a little slack so that a longer
/// re-encoding shows as the assertion below rather than as a buffer error.
fn room(body: &[u8]) -> usize {
    (HEADER_LEN + body.len() + 16).min(MAX_FRAME)
}

/// A data frame built in place around its payload is byte for byte the encoder's.
fn check_in_place(kind: DataKind, payload: &[u8], at_us: u64, encoded: &[u8]) {
    let mut buf = vec![0u8; DATA_HEADROOM + payload.len()];
    buf[DATA_HEADROOM..].copy_from_slice(payload);
    match frame_data_in_place(&mut buf, kind, payload.len(), at_us) {
        Ok(start) => assert_eq!(&buf[start..], encoded, "{kind:?} of {}", payload.len()),
        Err(err) => assert!(payload.len() > MAX_DATA, "{kind:?}: {err}"),
    }
}
