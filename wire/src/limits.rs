//! Every bound the protocol enforces, as named constants derived from each other.

/// The length prefix: a little-endian `u32` counting the body bytes that follow.
pub const HEADER_LEN: usize = 4;

/// The largest stdin/stdout/stderr chunk carried by one frame.
pub const MAX_DATA: usize = 64 * 1024;

/// The largest argv, counted as the sum of its NUL-terminated entries: what `execve` takes on
/// a default Linux (a quarter of an 8 MiB stack). A request this large travels in pieces
/// ([`crate::ClientFrame::ExecPart`]).
pub const MAX_ARGV_BYTES: usize = 2 * 1024 * 1024;
/// The most argv entries one exec may carry.
pub const MAX_ARGS: usize = 128 * 1024;
/// The largest environment override list, counted like argv (`KEY=VALUE\0` entries).
pub const MAX_ENV_BYTES: usize = 1024 * 1024;
/// The most environment entries one exec may carry.
pub const MAX_ENV_VARS: usize = 32 * 1024;
/// The longest single argv or environment entry, NUL included (Linux's `MAX_ARG_STRLEN`).
pub const MAX_ARG_LEN: usize = 128 * 1024;
/// The most argv (or environment) bytes the exec frame itself carries; a client sends the rest
/// before it, in [`crate::ClientFrame::ExecPart`] frames of at most [`MAX_DATA`] bytes.
pub const MAX_INLINE_LIST: usize = 16 * 1024;
/// The longest working directory (Linux's `PATH_MAX`, NUL excluded).
pub const MAX_PATH: usize = 4095;
/// The longest human-readable message in an error frame.
pub const MAX_MESSAGE: usize = 256;
/// The longest user specification in a request (`NAME[:GROUP]`).
pub const MAX_USER: usize = 64;
/// The agent's per-connection challenge, and the client's.
pub const NONCE_LEN: usize = 32;
/// An HMAC-SHA-256 proof.
pub const MAC_LEN: usize = 32;
/// The shortest secret an agent or a client accepts.
pub const MIN_SECRET: usize = 16;
/// The longest secret (a secret file larger than this is refused, not cut).
pub const MAX_SECRET: usize = 4096;
/// The longest agent version string.
pub const MAX_VERSION_STRING: usize = 32;

/// The most random bytes one [`crate::ClientFrame::Reseed`] carries.
pub const MAX_RESEED: usize = 512;
/// The longest grace a shutdown may ask for (ten minutes).
pub const MAX_SHUTDOWN_GRACE_MS: u32 = 600_000;
/// The most mount and interface frames one info operation sends (the rest is left out).
pub const MAX_INFO_ITEMS: usize = 256;
/// The most bytes of a readiness report's module times.
pub const MAX_MODULE_TIMES: usize = 1024;
/// The longest job name (protocol 5).
pub const MAX_JOB_NAME: usize = 64;
/// A job record's argv is cut to this many bytes (on an entry boundary).
pub const MAX_JOB_ARGV: usize = 1024;
/// The most jobs any agent's registry holds (its policy's `max_jobs` is at most this).
pub const MAX_JOBS: usize = 256;
/// The highest signal number a request may name.
pub const MAX_SIGNAL: u8 = 64;

/// How many stdin bytes a client may have in flight before the agent grants more credit.
/// It bounds what the agent buffers for one command's stdin.
pub const STDIN_WINDOW: usize = 128 * 1024;

/// How often (milliseconds) the agent tells a client it is alive while an operation runs; a
/// client that hears nothing for three intervals gives up.
pub const KEEPALIVE_MS: u32 = 5_000;

/// How long (milliseconds) an agent keeps an idle connection open after an operation by
/// default (protocol 5, [`crate::Limits::idle_ms`]; the policy's `idle_timeout`).
pub const DEFAULT_IDLE_MS: u32 = 30_000;

/// Room every encoded exec request needs beyond its strings: tags, lengths, flags, the
/// terminal size, the timeouts and the output cap.
const EXEC_OVERHEAD: usize = 96;
/// Room a data frame needs beyond its payload: tag, a timestamp varint (output only; an exec
/// piece's list tag otherwise) and a length varint.
pub const DATA_OVERHEAD: usize = 1 + 10 + 3;

/// The largest frame body either side may send. Derived so that the largest exec frame (its
/// inline lists at their bound) and the largest data chunk both fit.
pub const MAX_FRAME_BODY: usize = max(
    2 * MAX_INLINE_LIST + MAX_PATH + MAX_USER + EXEC_OVERHEAD,
    MAX_DATA + DATA_OVERHEAD,
);
/// The largest frame on the wire, header included: size a receive buffer with this.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_FRAME_BODY;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

// A 3-byte varint covers lengths below 2^21: every data chunk's length prefix fits DATA_OVERHEAD.
const _: () = assert!(MAX_DATA < 1 << 21);
const _: () = assert!(MAX_FRAME_BODY <= u32::MAX as usize);
const _: () = assert!(MAX_FRAME_BODY >= MAX_DATA + DATA_OVERHEAD);
// Credit must allow at least one full chunk, or stdin could never move.
const _: () = assert!(STDIN_WINDOW >= MAX_DATA);
const _: () = assert!(MAX_ARGV_BYTES >= MAX_ARGS && MAX_ENV_BYTES >= MAX_ENV_VARS);
// A piece of a list is a data chunk; the inline rest of a list always fits one piece.
const _: () = assert!(MAX_INLINE_LIST <= MAX_DATA && MAX_ARG_LEN <= MAX_ARGV_BYTES);
const _: () = assert!(MAX_ARGV_BYTES <= u32::MAX as usize && MAX_ENV_BYTES <= MAX_ARGV_BYTES);
