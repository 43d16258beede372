//! C strings assembled from pieces in a caller's buffer: no allocation, total on any input, and
//! fit for the child between `clone` and `execve` (plain byte copies, nothing shared).

use core::ffi::CStr;

/// Writes `parts` one after another, then a NUL, into `buf`. `None` when they do not fit or
/// contain a NUL themselves.
pub fn join<'b>(buf: &'b mut [u8], parts: &[&[u8]]) -> Option<&'b CStr> {
    let mut len = 0usize;
    for part in parts {
        let end = len.checked_add(part.len())?;
        buf.get_mut(len..end)?.copy_from_slice(part);
        len = end;
    }
    *buf.get_mut(len)? = 0;
    let buf: &'b [u8] = buf;
    crate::sys::cstr_with_nul(buf.get(..=len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_exactly_into_the_buffer() {
        let mut buf = [0xaa; 8];
        assert_eq!(join(&mut buf, &[b"/bin", b"/", b"sh"]), Some(c"/bin/sh"));
        let mut buf = [0xaa; 7];
        assert_eq!(
            join(&mut buf, &[b"/bin", b"/", b"sh"]),
            None,
            "no room for the NUL"
        );
        let mut buf = [0u8; 1];
        assert_eq!(join(&mut buf, &[]), Some(c""));
        let mut buf = [0u8; 0];
        assert_eq!(join(&mut buf, &[]), None);
    }

    #[test]
    fn refuses_an_inner_nul() {
        let mut buf = [0u8; 16];
        assert_eq!(join(&mut buf, &[b"a\0b"]), None);
    }
}
