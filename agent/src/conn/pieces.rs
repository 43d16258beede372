//! A request whose argv or environment came in pieces (`ExecPart`, issue 10): put back together
//! in buffers mapped only then (see `sys::Assembly`), the request's own lists appended last.
//! The session has checked every piece against the limits as it passed (`ListCheck`); the
//! buffers hold the protocol's largest lists, so a piece that does not fit is refused, never
//! cut.

use ferry_wire::session::Refusal;
use ferry_wire::{ErrorCode, ListKind, ValidExec};

use crate::spawn::{self, Lists};
use crate::sys::{self, AssemblyBuffers};

/// Index slots a small environment gets on the stack (31 overrides); a larger one uses the
/// mapped buffers' index.
pub const SMALL_INDEX: usize = 64;

/// The pieces received so far.
pub struct Pieces {
    assembly: sys::Assembly,
    argv: usize,
    env: usize,
}

impl Pieces {
    pub const fn new() -> Self {
        Pieces {
            assembly: sys::Assembly::new(),
            argv: 0,
            env: 0,
        }
    }

    /// Forgets the last request's pieces (its buffers stay mapped for the next one).
    pub fn clear(&mut self) {
        self.argv = 0;
        self.env = 0;
    }

    /// Appends `data` to `list`.
    pub fn append(&mut self, list: ListKind, data: &[u8]) -> Result<(), Refusal> {
        let buffers = self.assembly.buffers().map_err(no_memory)?;
        let (buf, len) = match list {
            ListKind::Argv => (&mut buffers.argv[..], &mut self.argv),
            ListKind::Env => (&mut buffers.env[..], &mut self.env),
        };
        let end = len.checked_add(data.len()).ok_or(TOO_LARGE)?;
        buf.get_mut(*len..end)
            .ok_or(TOO_LARGE)?
            .copy_from_slice(data);
        *len = end;
        Ok(())
    }

    /// The lists `exec` asks for (its own, or the pieces with its own appended last) and room
    /// to index its environment: `small` when that is enough, else the mapped buffers' index.
    pub fn lists<'a>(
        &'a mut self,
        exec: &ValidExec<'a>,
        small: &'a mut [u32],
    ) -> Result<(Lists<'a>, &'a mut [u32]), Refusal> {
        let own = Lists::of(exec);
        if exec.has_parts() {
            self.append(ListKind::Argv, own.argv)?;
            self.append(ListKind::Env, own.env)?;
            let (argv_len, env_len) = (self.argv, self.env);
            let AssemblyBuffers {
                argv,
                env,
                env_index,
            } = self.assembly.buffers().map_err(no_memory)?;
            let lists = Lists {
                argv: argv.get(..argv_len).unwrap_or(&[]),
                env: env.get(..env_len).unwrap_or(&[]),
            };
            return Ok((lists, env_index));
        }
        if spawn::index_slots(own.env) <= small.len() {
            return Ok((own, small));
        }
        let buffers = self.assembly.buffers().map_err(no_memory)?;
        Ok((own, &mut buffers.env_index[..]))
    }
}

const TOO_LARGE: Refusal = Refusal::new(
    ErrorCode::LimitExceeded,
    "request exceeds the agent's limits",
);

fn no_memory(errno: rustix::io::Errno) -> Refusal {
    Refusal::os(
        ErrorCode::ResourceExhausted,
        errno.raw_os_error().unsigned_abs(),
        "no memory for the request",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wire::limits::{MAX_ARGV_BYTES, MAX_ENV_VARS};

    #[test]
    fn pieces_are_appended_in_order_and_bounded() {
        let mut pieces = Pieces::new();
        pieces.append(ListKind::Argv, b"printf\0%s\\n\0a").unwrap();
        pieces.append(ListKind::Argv, b"b\0").unwrap();
        pieces.append(ListKind::Env, b"A=1\0").unwrap();
        let buffers = pieces.assembly.buffers().unwrap();
        assert_eq!(&buffers.argv[..pieces.argv], b"printf\0%s\\n\0ab\0");
        assert_eq!(&buffers.env[..pieces.env], b"A=1\0");
        // The largest argv fits exactly; one byte more is refused, not cut.
        let mut pieces = Pieces::new();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..MAX_ARGV_BYTES / chunk.len() {
            pieces.append(ListKind::Argv, &chunk).unwrap();
        }
        assert_eq!(pieces.argv, MAX_ARGV_BYTES);
        let refused = pieces.append(ListKind::Argv, b"y").unwrap_err();
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert_eq!(pieces.argv, MAX_ARGV_BYTES);
        assert_eq!(
            pieces.assembly.buffers().unwrap().env_index.len(),
            2 * MAX_ENV_VARS
        );
    }
}
