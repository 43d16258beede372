//! `cargo xtask bench --vm`: the same measurements over real virtio-vsock, plus boot figures.

use anyhow::{bail, Result};

use crate::bench::{BenchOptions, Row};

pub fn vm_rows(_options: &BenchOptions, _rows: &mut Vec<Row>) -> Result<()> {
    bail!("bench --vm: not wired up yet")
}
