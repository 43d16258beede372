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
