//! A writer for the newc ("070701") cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Written here rather than shelling out to `cpio` so the image is byte-for-byte reproducible
//! (fixed inode numbers, owner root, mtime 0) and needs no extra host tool.

use std::io::{self, Write};

/// File type bits of `st_mode`, as the kernel's initramfs unpacker expects them.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// The newc magic; "070702" would be the variant with checksums, which the kernel also accepts.
const MAGIC: &[u8; 6] = b"070701";
/// The name of the last entry; the kernel stops unpacking there.
const TRAILER: &str = "TRAILER!!!";
/// Six bytes of magic and thirteen 8-digit hex fields.
const HEADER_LEN: usize = 6 + 13 * 8;

/// Streams a newc archive into `out`. Paths are given without a leading `/` (one is stripped if
/// present); parents must be written before their children.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
}

/// The fields of one entry's header that differ between entry kinds.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter { out, next_ino: 1 }
    }

    /// A directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(Entry {
            name: path,
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            rdev: (0, 0),
            data: &[],
        })
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(Entry {
            name: path,
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            rdev: (0, 0),
            data,
        })
    }

    /// A symbolic link: the data is the target, without a terminating NUL.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(Entry {
            name: path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            rdev: (0, 0),
            data: target.as_bytes(),
        })
    }

    /// A character device node, e.g. `/dev/console` is 5,1.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(Entry {
            name: path,
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            rdev: (major, minor),
            data: &[],
        })
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        // The trailer carries no inode: tools write 0 there, and so do we.
        self.next_ino = 0;
        self.entry(Entry {
            name: TRAILER,
            mode: 0,
            nlink: 1,
            rdev: (0, 0),
            data: &[],
        })?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, entry: Entry<'_>) -> io::Result<()> {
        let name = entry.name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio path {:?}", entry.name),
            ));
        }
        let filesize = u32::try_from(entry.data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: newc cannot hold files of 4 GiB or more"),
            )
        })?;
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        let fields = [
            ino,
            entry.mode,
            0, // uid: root
            0, // gid: root
            entry.nlink,
            0, // mtime: fixed, for reproducible images
            filesize,
            0, // devmajor of the filesystem the entry came from: meaningless here
            0, // devminor
            entry.rdev.0,
            entry.rdev.1,
            name.len() as u32 + 1, // namesize counts the NUL
            0,                     // check: only used by "070702"
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        // Header plus name is padded to a multiple of four, and so is the data.
        header.resize(header.len().next_multiple_of(4), 0);
        self.write(&header)?;
        self.write(entry.data)?;
        let pad = entry.data.len().next_multiple_of(4) - entry.data.len();
        self.write(&[0u8; 3][..pad])
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut CpioWriter<Vec<u8>>) -> io::Result<()>) -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        build(&mut writer).expect("writing to a Vec");
        writer.finish().expect("writing to a Vec")
    }

    /// A directory, a 3-byte file, a symlink and a device node, checked byte for byte.
    #[test]
    fn golden_archive() {
        let bytes = archive(|w| {
            w.dir("/dev", 0o755)?;
            w.file("init", 0o755, b"abc")?;
            w.symlink("sh", "busybox")?;
            w.char_dev("dev/console", 0o600, 5, 1)
        });
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            // magic  ino       mode      uid       gid       nlink     mtime     filesize
            "070701", "00000001", "000041ED", "00000000", "00000000", "00000002", "00000000", "00000000",
            // devmaj devmin    rdevmaj   rdevmin   namesize  check
            "00000000", "00000000", "00000000", "00000000", "00000004", "00000000",
            // "dev\0": 110 + 4 = 114, padded to 116
            "dev\0", "\0\0",
            "070701", "00000002", "000081ED", "00000000", "00000000", "00000001", "00000000", "00000003",
            "00000000", "00000000", "00000000", "00000000", "00000005", "00000000",
            // "init\0": 110 + 5 = 115, padded to 116; then 3 data bytes padded to 4
            "init\0", "\0",
            "abc", "\0",
            "070701", "00000003", "0000A1FF", "00000000", "00000000", "00000001", "00000000", "00000007",
            "00000000", "00000000", "00000000", "00000000", "00000003", "00000000",
            // "sh\0": 110 + 3 = 113, padded to 116; the target's 7 bytes padded to 8
            "sh\0", "\0\0\0",
            "busybox", "\0",
            "070701", "00000004", "00002180", "00000000", "00000000", "00000001", "00000000", "00000000",
            "00000000", "00000000", "00000005", "00000001", "0000000C", "00000000",
            // "dev/console\0": 110 + 12 = 122, padded to 124
            "dev/console\0", "\0\0",
            "070701", "00000000", "00000000", "00000000", "00000000", "00000001", "00000000", "00000000",
            "00000000", "00000000", "00000000", "00000000", "0000000B", "00000000",
            // "TRAILER!!!\0": 110 + 11 = 121, padded to 124
            "TRAILER!!!\0", "\0\0\0",
        ]
        .concat()
        .into_bytes();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn every_entry_starts_aligned() {
        for len in 0..9 {
            let bytes = archive(|w| w.file("f", 0o644, &vec![7u8; len]));
            let trailer = bytes
                .windows(6)
                .rposition(|window| window == MAGIC)
                .expect("a trailer header");
            assert_eq!(trailer % 4, 0, "data length {len}");
        }
    }

    #[test]
    fn rejects_empty_names() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.dir("/", 0o755).is_err());
    }
}
