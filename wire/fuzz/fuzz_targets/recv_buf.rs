//! Arbitrary bytes fed into a `RecvBuf` of arbitrary size in arbitrary pieces, through every way
//! in (`feed`, `spare`/`spare_at_least` + `commit`) and out (`next_frame`, `data` + `consume`).
//! It must never panic or stall, and must give exactly the frames (and the error) that splitting
//! the whole input at once gives.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ferry_wire::limits::{HEADER_LEN, MAX_FRAME, MAX_FRAME_BODY};
use ferry_wire::{split_frame, RecvBuf, RecvError};
use ferry_wire_fuzz::{arbitrary_steps, split_input};
use libfuzzer_sys::fuzz_target;

/// One move of the driver.
#[derive(Arbitrary, Debug)]
enum Step {
    /// Copy up to `len` bytes in with `feed`.
    Feed { len: u16 },
    /// Read up to `len` bytes into `spare_at_least(min)`, committing `len + extra` (clamped).
    Read { len: u16, min: u16, extra: u8 },
    /// Take one frame with `next_frame`.
    NextFrame,
    /// Cut one frame off `data` by hand and `consume` it (as a session does).
    CutFrame,
    /// Check `has_frame` against the data.
    Peek,
}

fuzz_target!(|data: &[u8]| {
    let (choices, stream) = split_input(data);
    let mut u = Unstructured::new(choices);
    // Mostly small buffers (where the edges are), sometimes the protocol's own size.
    let capacity = match u.arbitrary::<u16>().unwrap_or(0) {
        0 => MAX_FRAME,
        n => usize::from(n % 600),
    };
    let steps: Vec<Step> = arbitrary_steps(&mut u);
    let mut driver = Driver::new(capacity, stream);
    for step in steps {
        if driver.stopped.is_some() {
            break;
        }
        driver.step(step);
    }
    driver.drain();
    driver.compare();
});

struct Driver<'a> {
    recv: RecvBuf<Vec<u8>>,
    capacity: usize,
    input: &'a [u8],
    /// Bytes of `input` handed to the buffer.
    given: usize,
    frames: Vec<Vec<u8>>,
    stopped: Option<RecvError>,
}

impl<'a> Driver<'a> {
    fn new(capacity: usize, input: &'a [u8]) -> Self {
        Driver {
            recv: RecvBuf::new(vec![0xa5; capacity]),
            capacity,
            input,
            given: 0,
            frames: Vec::new(),
            stopped: None,
        }
    }

    fn rest(&self) -> &'a [u8] {
        &self.input[self.given..]
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Feed { len } => {
                let chunk = &self.rest()[..usize::from(len).min(self.rest().len())];
                match self.recv.feed(chunk) {
                    Ok(n) => {
                        assert!(n <= chunk.len());
                        self.given += n;
                    }
                    Err(err) => self.stop(err),
                }
            }
            Step::Read { len, min, extra } => {
                let rest = self.rest();
                match self.recv.spare_at_least(usize::from(min)) {
                    Ok(spare) => {
                        assert!(!spare.is_empty(), "spare room is never empty");
                        let n = usize::from(len).min(spare.len()).min(rest.len());
                        spare[..n].copy_from_slice(&rest[..n]);
                        // Committing more than was read would invent bytes: only the clamp
                        // past the spare room's end is exercised.
                        let spare_len = spare.len();
                        let commit = if n == spare_len {
                            n + usize::from(extra)
                        } else {
                            n
                        };
                        self.recv.commit(commit);
                        self.given += n;
                    }
                    Err(err) => self.stop(err),
                }
            }
            Step::NextFrame => match self.recv.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= self.capacity.saturating_sub(HEADER_LEN));
                    self.frames.push(body.to_vec());
                }
                Ok(None) => {}
                Err(err) => self.stop(err),
            },
            Step::CutFrame => match split_frame(self.recv.data(), self.recv.max_body()) {
                Ok(Some((body, used))) => {
                    self.frames.push(body.to_vec());
                    self.recv.consume(used);
                }
                Ok(None) => {}
                Err(err) => self.stop(RecvError::FrameTooLarge(err)),
            },
            Step::Peek => {
                let data = self.recv.data();
                let whole = matches!(
                    split_frame(data, self.recv.max_body()),
                    Ok(Some(_)) | Err(_)
                );
                assert_eq!(self.recv.has_frame(), whole);
                assert_eq!(self.recv.is_empty(), data.is_empty());
            }
        }
    }

    fn stop(&mut self, err: RecvError) {
        // A buffer full with a frame not taken is the driver's doing, not the stream's: take it.
        if err == RecvError::FrameWaiting {
            assert!(self.recv.has_frame());
            return;
        }
        self.stopped = Some(err);
    }

    /// Finishes the stream the plain way: take every frame, then feed, until done or stopped.
    fn drain(&mut self) {
        while self.stopped.is_none() {
            match self.recv.next_frame() {
                Ok(Some(body)) => {
                    self.frames.push(body.to_vec());
                    continue;
                }
                Ok(None) => {}
                Err(err) => {
                    self.stop(err);
                    continue;
                }
            }
            if self.rest().is_empty() {
                return;
            }
            match self.recv.feed(self.rest()) {
                Ok(0) => panic!(
                    "stalled: no frame, no room, no error (capacity {})",
                    self.capacity
                ),
                Ok(n) => self.given += n,
                Err(err) => self.stop(err),
            }
        }
    }

    /// The frames and the error must be those of one split of the whole input.
    fn compare(&self) {
        let max_body = self.capacity.saturating_sub(HEADER_LEN).min(MAX_FRAME_BODY);
        let mut expected = Vec::new();
        let mut rest = self.input;
        let mut expected_err = None;
        loop {
            match split_frame(rest, max_body) {
                Ok(Some((body, used))) => {
                    expected.push(body);
                    rest = &rest[used..];
                }
                Ok(None) => break,
                Err(err) => {
                    expected_err = Some(err);
                    break;
                }
            }
        }
        if self.capacity < HEADER_LEN {
            // Nothing can ever be read through it; it says so once a header's worth arrived.
            assert!(self.frames.is_empty());
            if self.input.len() >= self.capacity.max(1) && self.stopped.is_some() {
                assert!(matches!(
                    self.stopped,
                    Some(RecvError::BufferTooSmall) | Some(RecvError::FrameTooLarge(_))
                ));
            }
            return;
        }
        assert!(self.frames.len() <= expected.len());
        for (got, want) in self.frames.iter().zip(&expected) {
            assert_eq!(got.as_slice(), *want);
        }
        match self.stopped {
            None => {
                assert_eq!(self.frames.len(), expected.len(), "frames lost");
                assert!(expected_err.is_none(), "an oversized frame went unnoticed");
            }
            Some(RecvError::FrameTooLarge(err)) => {
                assert_eq!(self.frames.len(), expected.len());
                assert_eq!(Some(err), expected_err);
            }
            Some(err) => panic!("unexpected {err:?} with capacity {}", self.capacity),
        }
    }
}
