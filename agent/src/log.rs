//! Console messages without formatting machinery: pieces of bytes and numbers copied into a
//! small stack buffer and written to stderr in one `write`.

/// A message under construction; longer messages are cut, never split.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// A line starting with the agent's name.
    pub fn new() -> Self {
        let mut line = Line {
            buf: [0; 256],
            len: 0,
        };
        line.push(b"ferry-agent: ");
        line
    }

    /// Appends bytes.
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let room = self.buf.len() - 1 - self.len;
        let take = bytes.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        self
    }

    /// Appends a number in decimal.
    pub fn num(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    /// Writes the line, newline-terminated, to stderr (the console when PID 1). Best effort:
    /// there is nowhere to report a failing console.
    pub fn emit(&mut self) {
        self.buf[self.len] = b'\n';
        let _ = rustix::io::write(crate::sys::stderr(), &self.buf[..self.len + 1]);
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
        assert_eq!(
            &line.buf[..line.len],
            b"ferry-agent: 0 18446744073709551615"
        );
        let long = [b'x'; 400];
        let mut line = Line::new();
        line.push(&long);
        assert_eq!(line.len, 255);
    }
}
