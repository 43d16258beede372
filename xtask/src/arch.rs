//! The guest architectures: what each one's agent is built for, which Debian packages make its
//! kernel and userland, and which QEMU runs it.

use std::fmt;

/// A guest architecture (`--arch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Arch {
    /// x86_64 guests (QEMU `microvm`): the default.
    #[default]
    #[value(name = "x86_64")]
    X86_64,
    /// arm64 guests (QEMU `virt`).
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// Both, in the order `cargo xtask test` runs them.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The architecture this xtask runs on (the host's), if it is a guest architecture.
    pub fn host() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else {
            None
        }
    }

    /// The kernel's and Rust's name: `x86_64`, `aarch64` (`uname -m` in the guest).
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The agent's target: static, musl's crt and libc.a, flags in `.cargo/config.toml`.
    pub fn agent_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The QEMU system emulator, and the Debian package that ships it.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }

    /// The guest's serial console: the 8250 UART on x86, the PL011 on arm64's `virt`.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// Whether this guest runs on the host's own CPU (so KVM could run it).
    pub fn is_host(self) -> bool {
        Arch::host() == Some(self)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn flag_values_are_the_kernels_names() {
        for arch in Arch::ALL {
            let value = arch.to_possible_value().expect("not skipped");
            assert_eq!(value.get_name(), arch.name());
            assert!(arch.agent_target().starts_with(arch.name()));
        }
        assert_eq!(Arch::default(), Arch::X86_64);
    }
}
