//! Console messages without formatting machinery: pieces of bytes and numbers copied into a
//! small stack buffer and written to stderr in one `write`.

/// A message under construction; longer messages are cut, never split.
pub struct Line {
    /// The text so far; one byte is always left for the newline.
    buf: heapless::Vec<u8, { Line::CAPACITY }>,
}

impl Line {
    const CAPACITY: usize = 256;

    /// A line starting with the agent's name.
    pub fn new() -> Self {
        let mut line = Line {
            buf: heapless::Vec::new(),
        };
        line.push(b"ferry-agent: ");
        line
    }

    /// Appends bytes.
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let room = (Self::CAPACITY - 1).saturating_sub(self.buf.len());
        let take = bytes.get(..room).unwrap_or(bytes);
        let _ = self.buf.extend_from_slice(take);
        self
    }

    /// Appends a number in decimal.
    pub fn num(&mut self, mut value: u64) -> &mut Self {
        // u64::MAX has 20 digits.
        let mut digits = [0u8; 20];
        let mut first = digits.len();
        for (at, digit) in digits.iter_mut().enumerate().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
            first = at;
            if value == 0 {
                break;
            }
        }
        self.push(digits.get(first..).unwrap_or(&[]))
    }

    /// Writes the line, newline-terminated, to stderr (the console when PID 1). Best effort:
    /// there is nowhere to report a failing console.
    pub fn emit(&mut self) {
        let _ = self.buf.push(b'\n');
        let _ = rustix::io::write(crate::sys::stderr(), &self.buf);
        self.buf.pop();
    }
}

/// Writes `what: <errno text>` as one line.
pub fn error(what: &[u8], err: rustix::io::Errno) {
    Line::new()
        .push(what)
        .push(b": errno ")
        .num(err.raw_os_error().unsigned_abs() as u64)
        .emit();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_truncation() {
        let mut line = Line::new();
        line.num(0).push(b" ").num(18446744073709551615);
        assert_eq!(&line.buf[..], b"ferry-agent: 0 18446744073709551615");
        let long = [b'x'; 400];
        let mut line = Line::new();
        line.push(&long);
        assert_eq!(line.buf.len(), 255);
        line.num(7);
        assert_eq!(line.buf.len(), 255, "cut, never split");
    }
}
