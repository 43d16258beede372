//! Shared fixtures for the QEMU scenario tests (being written).
