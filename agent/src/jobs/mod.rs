//! Detached jobs: the supervising process (see ARCHITECTURE.md).

mod link;
mod record;
mod spool;
