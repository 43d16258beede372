//! What configures the agent: where it listens, decimal numbers, and the `ferry.*` parameters of
//! the kernel command line. Pure parsing, total on any bytes.

use crate::cstr;

/// The longest Unix socket path (`sun_path` less its NUL).
pub const MAX_UNIX_PATH: usize = 107;

/// Where the agent listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK, any CID, this port.
    Vsock(u32),
    /// A Unix socket path (NUL-terminated in `path`).
    Unix { path: [u8; MAX_UNIX_PATH + 1] },
}

impl ListenAddr {
    /// Parses `vsock:PORT` or `unix:PATH`.
    pub fn parse(spec: &[u8]) -> Option<Self> {
        if let Some(port) = spec.strip_prefix(b"vsock:") {
            return parse_u32(port).map(ListenAddr::Vsock);
        }
        let path = spec.strip_prefix(b"unix:")?;
        if path.is_empty() {
            return None;
        }
        let mut buf = [0u8; MAX_UNIX_PATH + 1];
        // Fails on a path too long or with a NUL in it.
        cstr::join(&mut buf, &[path])?;
        Some(ListenAddr::Unix { path: buf })
    }

    /// The vsock port, if this is a vsock address.
    pub fn vsock_port(&self) -> Option<u32> {
        match self {
            ListenAddr::Vsock(port) => Some(*port),
            ListenAddr::Unix { .. } => None,
        }
    }
}

/// Parses a decimal `u32` (digits only, no sign, no spaces).
pub fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |value, d| {
        let digit = d
            .is_ascii_digit()
            .then(|| u32::from(d.wrapping_sub(b'0')))?;
        value.checked_mul(10)?.checked_add(digit)
    })
}

/// The `ferry.*` parameters of a kernel command line; the last of each kind wins.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KernelParams<'a> {
    /// `ferry.listen=`: the address, or the text that did not parse.
    pub listen: Option<Result<ListenAddr, &'a [u8]>>,
    /// `ferry.ready=`: the host port to announce readiness to (`None` also when it did not
    /// parse).
    pub ready_port: Option<u32>,
    /// `ferry.modules=`: module names separated by commas.
    pub modules: Option<&'a [u8]>,
    /// `ferry.hostname=`: the guest's hostname, or the text that is not one (see
    /// [`is_valid_hostname`]).
    pub hostname: Option<Result<&'a [u8], &'a [u8]>>,
}

/// The longest hostname Linux takes (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// Whether `name` may be the guest's hostname: 1 to 64 bytes, no `/`, no NUL, no blanks or
/// other controls.
pub fn is_valid_hostname(name: &[u8]) -> bool {
    (1..=MAX_HOSTNAME).contains(&name.len())
        && name
            .iter()
            .all(|b| (*b != b'/' && b.is_ascii_graphic()) || *b >= 0x80)
}

impl<'a> KernelParams<'a> {
    /// Picks the `ferry.*` parameters out of `/proc/cmdline`'s text.
    pub fn parse(cmdline: &'a [u8]) -> Self {
        let mut params = KernelParams::default();
        for param in cmdline.split(|b| b.is_ascii_whitespace()) {
            if let Some(value) = param.strip_prefix(b"ferry.listen=") {
                params.listen = Some(ListenAddr::parse(value).ok_or(value));
            } else if let Some(value) = param.strip_prefix(b"ferry.ready=") {
                params.ready_port = parse_u32(value);
            } else if let Some(value) = param.strip_prefix(b"ferry.modules=") {
                params.modules = Some(value);
            } else if let Some(value) = param.strip_prefix(b"ferry.hostname=") {
                params.hostname = Some(Some(value).filter(|v| is_valid_hostname(v)).ok_or(value));
            }
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_u32_edges() {
        assert_eq!(parse_u32(b"0"), Some(0));
        assert_eq!(parse_u32(b"007"), Some(7));
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u32(b""), None);
        assert_eq!(parse_u32(b"12a"), None);
        assert_eq!(parse_u32(b"-1"), None);
        assert_eq!(parse_u32(b"99999999999999999999999"), None);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse(b"vsock:1024").and_then(|a| a.vsock_port()),
            Some(1024)
        );
        assert!(ListenAddr::parse(b"unix:/tmp/x.sock").is_some());
        assert!(ListenAddr::parse(b"unix:").is_none());
        assert!(ListenAddr::parse(b"unix:a\0b").is_none());
        assert!(ListenAddr::parse(b"tcp:1").is_none());
        assert!(ListenAddr::parse(b"vsock:").is_none());
        assert!(ListenAddr::parse(b"").is_none());
        assert!(ListenAddr::parse(&[b"unix:".as_slice(), &[b'a'; 108]].concat()).is_none());
        let longest = [b"unix:".as_slice(), &[b'a'; 107]].concat();
        let Some(ListenAddr::Unix { path }) = ListenAddr::parse(&longest) else {
            panic!("the longest path is refused");
        };
        assert_eq!(path[106], b'a');
        assert_eq!(path[107], 0);
    }

    #[test]
    fn kernel_params() {
        let params = KernelParams::parse(
            b"console=ttyS0 ferry.listen=vsock:7 ferry.ready=9000\tferry.modules=a,b quiet\n",
        );
        assert_eq!(params.listen, Some(Ok(ListenAddr::Vsock(7))));
        assert_eq!(params.ready_port, Some(9000));
        assert_eq!(params.modules, Some(b"a,b".as_slice()));

        let params = KernelParams::parse(b"ferry.listen=bogus ferry.ready= ferry.ready=x");
        assert_eq!(params.listen, Some(Err(b"bogus".as_slice())));
        assert_eq!(params.ready_port, None);
        assert_eq!(params.modules, None);

        // Whatever the bytes, no panic and nothing invented.
        for cmdline in [&b""[..], b"ferry.", b"ferry.listen=", b"  \n", &[0xff; 300]] {
            let params = KernelParams::parse(cmdline);
            assert_eq!(params.ready_port, None);
        }
        assert_eq!(
            KernelParams::parse(b"ferry.listen=").listen,
            Some(Err(b"".as_slice()))
        );
    }

    #[test]
    fn hostnames() {
        let params = KernelParams::parse(b"quiet ferry.hostname=vm-1.example ferry.ready=1");
        assert_eq!(params.hostname, Some(Ok(b"vm-1.example".as_slice())));
        assert_eq!(KernelParams::parse(b"quiet").hostname, None);
        let longest = [b"ferry.hostname=".as_slice(), &[b'h'; 64]].concat();
        assert_eq!(
            KernelParams::parse(&longest).hostname,
            Some(Ok(&[b'h'; 64][..]))
        );
        for bad in [
            &b"ferry.hostname="[..],
            b"ferry.hostname=a/b",
            b"ferry.hostname=a\0b",
            b"ferry.hostname=a\x7fb",
            b"ferry.hostname=a\x01b",
        ] {
            let params = KernelParams::parse(bad);
            assert!(matches!(params.hostname, Some(Err(_))), "{bad:?}");
        }
        let too_long = [b"ferry.hostname=".as_slice(), &[b'h'; 65]].concat();
        assert!(matches!(
            KernelParams::parse(&too_long).hostname,
            Some(Err(_))
        ));
        // The last one wins, valid or not.
        let params = KernelParams::parse(b"ferry.hostname=a ferry.hostname=b");
        assert_eq!(params.hostname, Some(Ok(b"b".as_slice())));
    }
}
