//! Helpers shared by ferry-wire's fuzz targets: how an input is split into the fuzzer's choices
//! and the wire bytes, and cutting a stream into frames.
//!
//! A session target's input is `[wire bytes][n bytes of choices][n]`: the choices (decoded with
//! `arbitrary`) drive the session's driver, the wire bytes are what the peer sent. A golden
//! transcript followed by a zero byte is therefore a valid input, which is how `cargo xtask fuzz`
//! seeds the corpora with real conversations. The choices sit at the end so that growing them
//! eats the end of a conversation, not its opening: the fuzzer keeps a hello and a request in
//! front while it explores what the driver does around them.

use ferry_wire::limits::MAX_FRAME_BODY;
use ferry_wire::split_frame;

/// Splits a fuzz input into the driver's choices and the peer's bytes.
pub fn split_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_last() else {
        return (&[], &[]);
    };
    let (wire, choices) = rest.split_at(rest.len() - usize::from(n).min(rest.len()));
    (choices, wire)
}

/// The whole frames at the front of `stream` (bodies, without their length prefix), and how many
/// bytes they took.
pub fn whole_frames(stream: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((body, used))) = split_frame(&stream[at..], MAX_FRAME_BODY) {
        frames.push(body);
        at += used;
    }
    (frames, at)
}

/// As many steps as the choices hold (none when they are used up).
pub fn arbitrary_steps<'a, T: arbitrary::Arbitrary<'a>>(
    u: &mut arbitrary::Unstructured<'a>,
) -> Vec<T> {
    match u.arbitrary_iter::<T>() {
        Ok(steps) => steps.map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// The protocol-4 operations' request rules (`ferry_wire::ops`), written apart from their
/// `validate*` functions, and requests built from the fuzzer's choices: mostly plausible, with
/// every rule broken now and then.
pub mod ops {
    use arbitrary::Arbitrary;
    use ferry_wire::limits::{MAX_PATH, MAX_RESEED, MAX_SHUTDOWN_GRACE_MS, MAX_USER};
    use ferry_wire::{
        Bytes, ErrorCode, GetRequest, Limits, PutRequest, ShutdownRequest, Timestamp, TransferKind,
    };

    /// A refused request: its code and message.
    pub type RequestRefusal = (ErrorCode, &'static str);

    /// The refusal of a request beyond the agent's (or the protocol's) limits.
    pub const LIMIT: RequestRefusal = (
        ErrorCode::LimitExceeded,
        "request exceeds the agent's limits",
    );

    fn invalid(message: &'static str) -> RequestRefusal {
        (ErrorCode::InvalidRequest, message)
    }

    /// A transfer's path: absolute, without NUL, within the tighter of both path limits.
    fn path_refusal(path: &[u8], limits: &Limits) -> Option<RequestRefusal> {
        if path.len() > (limits.max_path as usize).min(MAX_PATH) {
            return Some(LIMIT);
        }
        if path.first() != Some(&b'/') || path.contains(&0) {
            return Some(invalid("path is not absolute or contains NUL"));
        }
        None
    }

    /// A user (or owner): non-empty, without NUL, within the tighter of both user limits.
    fn user_refusal(user: Option<Bytes<'_>>, limits: &Limits) -> Option<RequestRefusal> {
        let Bytes(user) = user?;
        if user.len() > (limits.max_user as usize).min(MAX_USER) {
            return Some(LIMIT);
        }
        if user.is_empty() || user.contains(&0) {
            return Some(invalid("user is empty or contains NUL"));
        }
        None
    }

    /// Why a put must be refused, if it must: the path, the owner, the user, the mode, the
    /// modification time, then what a tree may not carry (the first rule broken, in that order).
    pub fn put_refusal(put: &PutRequest<'_>, limits: &Limits) -> Option<RequestRefusal> {
        path_refusal(put.path.0, limits)
            .or_else(|| user_refusal(put.owner, limits))
            .or_else(|| user_refusal(put.user, limits))
            .or_else(|| {
                put.mode
                    .is_some_and(|mode| mode > 0o7777)
                    .then(|| invalid("mode has bits beyond 0o7777"))
            })
            .or_else(|| {
                put.mtime
                    .is_some_and(|t| t.nanos >= 1_000_000_000)
                    .then(|| invalid("mtime nanoseconds out of range"))
            })
            .or_else(|| {
                (put.kind == TransferKind::Tree && (put.size.is_some() || put.owner.is_some()))
                    .then(|| {
                        invalid("a tree carries its own sizes, and its entries are the user's")
                    })
            })
    }

    /// Why a get must be refused, if it must: the path, then the user.
    pub fn get_refusal(get: &GetRequest<'_>, limits: &Limits) -> Option<RequestRefusal> {
        path_refusal(get.path.0, limits).or_else(|| user_refusal(get.user, limits))
    }

    /// Why a shutdown must be refused: a grace beyond ten minutes.
    pub fn shutdown_refusal(request: &ShutdownRequest) -> Option<RequestRefusal> {
        (request.grace_ms > MAX_SHUTDOWN_GRACE_MS)
            .then_some((ErrorCode::LimitExceeded, "shutdown grace too long"))
    }

    /// Why a time sync must be refused: nanoseconds beyond a second.
    pub fn time_sync_refusal(time: &Timestamp) -> Option<RequestRefusal> {
        (time.nanos >= 1_000_000_000).then(|| invalid("nanoseconds out of range"))
    }

    /// Why a reseed must be refused: no bytes, or more than 512.
    pub fn reseed_refusal(random: &[u8]) -> Option<RequestRefusal> {
        (random.is_empty() || random.len() > MAX_RESEED)
            .then(|| invalid("reseed needs 1 to 512 bytes"))
    }

    /// A path: mostly a plausible absolute one, sometimes relative, empty, with a NUL, or long
    /// (up to past the protocol's limit).
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct PathChoice(pub u16);

    impl PathChoice {
        pub fn bytes(self) -> Vec<u8> {
            let n = usize::from(self.0 >> 3);
            match self.0 & 7 {
                0..=2 => b"/srv/file".to_vec(),
                3 => [b"/".as_slice(), &vec![b'p'; n % (MAX_PATH + 8)]].concat(),
                4 => b"relative/file".to_vec(),
                5 => Vec::new(),
                6 => b"/a\0b".to_vec(),
                _ => b"/".to_vec(),
            }
        }
    }

    /// A user: none mostly, a name, an id pair, empty, with a NUL, or long.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct UserChoice(pub u8);

    impl UserChoice {
        pub fn bytes(self) -> Option<Vec<u8>> {
            match self.0 & 7 {
                0..=2 => None,
                3 => Some(b"nobody".to_vec()),
                4 => Some(b"0:0".to_vec()),
                5 => Some(Vec::new()),
                6 => Some(b"a\0b".to_vec()),
                _ => Some(vec![b'u'; usize::from(self.0 >> 3) * 4]),
            }
        }
    }

    /// A put request's fields, owned.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct PutChoice {
        pub path: PathChoice,
        pub tree: bool,
        pub mode: Option<u16>,
        pub owner: UserChoice,
        pub mtime: Option<(i64, u32)>,
        pub size: Option<u64>,
        pub create_parents: bool,
        pub no_clobber: bool,
        pub user: UserChoice,
    }

    /// What a [`PutChoice`] borrows from.
    pub struct PutParts {
        pub path: Vec<u8>,
        pub owner: Option<Vec<u8>>,
        pub user: Option<Vec<u8>>,
    }

    impl PutChoice {
        pub fn parts(&self) -> PutParts {
            PutParts {
                path: self.path.bytes(),
                owner: self.owner.bytes(),
                user: self.user.bytes(),
            }
        }

        /// The request; a mode above `0o7777` breaks its rule (16 bits of choice), a time's
        /// nanoseconds are mostly within a second.
        pub fn request<'a>(&self, parts: &'a PutParts) -> PutRequest<'a> {
            PutRequest {
                path: Bytes(&parts.path),
                kind: if self.tree {
                    TransferKind::Tree
                } else {
                    TransferKind::File
                },
                mode: self.mode.map(u32::from),
                owner: parts.owner.as_deref().map(Bytes),
                mtime: self.mtime.map(|(secs, nanos)| Timestamp {
                    secs,
                    nanos: if nanos & 1 == 0 {
                        nanos % 1_000_000_000
                    } else {
                        nanos
                    },
                }),
                size: self.size,
                create_parents: self.create_parents,
                no_clobber: self.no_clobber,
                user: parts.user.as_deref().map(Bytes),
            }
        }
    }

    /// A get request's fields, owned.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct GetChoice {
        pub path: PathChoice,
        pub tree: bool,
        pub user: UserChoice,
    }

    impl GetChoice {
        pub fn request<'a>(&self, path: &'a [u8], user: Option<&'a [u8]>) -> GetRequest<'a> {
            GetRequest {
                path: Bytes(path),
                kind: if self.tree {
                    TransferKind::Tree
                } else {
                    TransferKind::File
                },
                user: user.map(Bytes),
            }
        }
    }
}

/// The protocol-5 job requests' rules (`ferry_wire::jobs`), written apart from their
/// `validate*` and `check_job_*` functions, and requests built from the fuzzer's choices: mostly
/// plausible references, names and users, with every rule broken now and then.
pub mod jobs {
    use arbitrary::Arbitrary;
    use ferry_wire::limits::{MAX_JOB_NAME, MAX_USER};
    use ferry_wire::{AttachRequest, Bytes, ErrorCode, JobQuery, JobRequest, KillJob, Limits};

    use crate::ops::{RequestRefusal, LIMIT};

    fn invalid(message: &'static str) -> RequestRefusal {
        (ErrorCode::InvalidRequest, message)
    }

    /// Why a job name must be refused: its length (1 to 64), then its bytes (letters, digits,
    /// `.`, `_`, `-`, and not `-` first), then digits alone (those are ids).
    pub fn name_refusal(name: &[u8]) -> Option<RequestRefusal> {
        if !(1..=MAX_JOB_NAME).contains(&name.len()) {
            return Some(invalid("a job name has 1 to 64 bytes"));
        }
        let bad = |b: &u8| !(b.is_ascii_alphanumeric() || *b == b'.' || *b == b'_' || *b == b'-');
        if name.iter().any(bad) || name[0] == b'-' {
            return Some(invalid(
                "a job name is letters, digits, '.', '_' and '-', not first",
            ));
        }
        if name.iter().all(u8::is_ascii_digit) {
            return Some(invalid("a job name is not only digits"));
        }
        None
    }

    /// The id a reference written in digits names: 1 to `u32::MAX`, without a leading zero.
    pub fn job_id(job: &[u8]) -> Option<u32> {
        if job.is_empty() || !job.iter().all(u8::is_ascii_digit) || job[0] == b'0' {
            return None;
        }
        // Ten digits at most fit a u64 without overflow.
        if job.len() > 10 {
            return None;
        }
        let value = job.iter().fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
        u32::try_from(value).ok()
    }

    /// Why a job reference must be refused: digits that are no id, or a name that is none.
    pub fn ref_refusal(job: &[u8]) -> Option<RequestRefusal> {
        if !job.is_empty() && job.iter().all(u8::is_ascii_digit) {
            return job_id(job).is_none().then(|| invalid("no such job id"));
        }
        name_refusal(job)
    }

    /// A user: as for the other requests (non-empty, without NUL, within both limits).
    pub fn user_refusal(user: Option<Bytes<'_>>, limits: &Limits) -> Option<RequestRefusal> {
        let Bytes(user) = user?;
        if user.len() > (limits.max_user as usize).min(MAX_USER) {
            return Some(LIMIT);
        }
        if user.is_empty() || user.contains(&0) {
            return Some(invalid("user is empty or contains NUL"));
        }
        None
    }

    /// Why a job start must be refused: its name.
    pub fn start_refusal(name: Option<&[u8]>) -> Option<RequestRefusal> {
        name.and_then(name_refusal)
    }

    /// Why a listing must be refused: its user.
    pub fn query_refusal(query: &JobQuery<'_>, limits: &Limits) -> Option<RequestRefusal> {
        user_refusal(query.user, limits)
    }

    /// Why a wait or a removal must be refused: the reference, then the user.
    pub fn request_refusal(request: &JobRequest<'_>, limits: &Limits) -> Option<RequestRefusal> {
        ref_refusal(request.job.0).or_else(|| user_refusal(request.user, limits))
    }

    /// Why an attach must be refused: the reference, then the user.
    pub fn attach_refusal(request: &AttachRequest<'_>, limits: &Limits) -> Option<RequestRefusal> {
        ref_refusal(request.job.0).or_else(|| user_refusal(request.user, limits))
    }

    /// Why a kill must be refused: the reference, the user, then a signal beyond 64 (0 is the
    /// tree's end, as a cancel).
    pub fn kill_refusal(kill: &KillJob<'_>, limits: &Limits) -> Option<RequestRefusal> {
        ref_refusal(kill.job.0)
            .or_else(|| user_refusal(kill.user, limits))
            .or_else(|| (kill.signal > 64).then(|| invalid("no such signal")))
    }

    /// A job reference (or, for a start, a name): mostly an id or a plain name, sometimes at
    /// an edge (the largest id, one beyond, a leading zero, 0, 64 and 65 bytes, digits alone,
    /// a leading `-`, a byte outside the set, empty).
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct JobChoice(pub u16);

    impl JobChoice {
        pub fn bytes(self) -> Vec<u8> {
            let n = usize::from(self.0 >> 4);
            match self.0 & 15 {
                0..=2 => b"web".to_vec(),
                3 | 4 => (1 + n % 300).to_string().into_bytes(),
                5 => b"4294967295".to_vec(),
                6 => b"4294967296".to_vec(),
                7 => b"012".to_vec(),
                8 => b"0".to_vec(),
                9 => vec![b'j'; 60 + n % 8],
                10 => b"build-1.x_y".to_vec(),
                11 => b"-x".to_vec(),
                12 => b"a/b".to_vec(),
                13 => Vec::new(),
                14 => vec![b'9'; 1 + n % 14],
                _ => [&b"w"[..], &[(self.0 >> 8) as u8]].concat(),
            }
        }
    }

    /// A start's name: none mostly, else a [`JobChoice`]'s bytes.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct NameChoice(pub Option<JobChoice>);

    impl NameChoice {
        pub fn bytes(self) -> Option<Vec<u8>> {
            self.0.map(JobChoice::bytes)
        }
    }

    /// A job request's fields (a wait, a removal, an attach, a kill), owned.
    #[derive(Arbitrary, Debug, Clone, Copy)]
    pub struct JobRequestChoice {
        pub job: JobChoice,
        pub user: crate::ops::UserChoice,
        pub since_stdout: u64,
        pub since_stderr: u64,
        pub follow: bool,
        pub stdin: bool,
        pub signal: u8,
        pub grace_ms: Option<u32>,
    }

    /// What a [`JobRequestChoice`] borrows from.
    pub struct JobParts {
        pub job: Vec<u8>,
        pub user: Option<Vec<u8>>,
    }

    impl JobRequestChoice {
        pub fn parts(&self) -> JobParts {
            JobParts {
                job: self.job.bytes(),
                user: self.user.bytes(),
            }
        }

        pub fn query<'a>(&self, parts: &'a JobParts) -> JobQuery<'a> {
            JobQuery {
                user: parts.user.as_deref().map(Bytes),
            }
        }

        pub fn request<'a>(&self, parts: &'a JobParts) -> JobRequest<'a> {
            JobRequest {
                job: Bytes(&parts.job),
                user: parts.user.as_deref().map(Bytes),
            }
        }

        /// An attach; small offsets mostly (the top bit of a choice keeps it whole).
        pub fn attach<'a>(&self, parts: &'a JobParts) -> AttachRequest<'a> {
            let offset = |n: u64| if n >> 63 == 1 { n } else { n % 4096 };
            AttachRequest {
                job: Bytes(&parts.job),
                user: parts.user.as_deref().map(Bytes),
                since_stdout: offset(self.since_stdout),
                since_stderr: offset(self.since_stderr),
                follow: self.follow,
                stdin: self.stdin,
            }
        }

        /// A kill; a signal within 0–64 mostly, beyond now and then.
        pub fn kill<'a>(&self, parts: &'a JobParts) -> KillJob<'a> {
            KillJob {
                job: Bytes(&parts.job),
                user: parts.user.as_deref().map(Bytes),
                signal: if self.signal & 0x80 == 0 {
                    self.signal % 65
                } else {
                    self.signal
                },
                grace_ms: self.grace_ms,
            }
        }
    }
}
