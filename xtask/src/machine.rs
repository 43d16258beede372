//! Which QEMU machine a guest boots on, and so which virtio transport its vsock device sits on.
//!
//! The transport decides the guest's module set: virtio-mmio devices (microvm, like Firecracker)
//! need `virtio_mmio`, PCI devices (q35, like Cloud Hypervisor and most QEMU users) need
//! `virtio_pci` and its two halves. Each image carries only its own transport's modules, because
//! every module costs boot time.

use clap::ValueEnum;

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Machine {
    /// `-M microvm`: no PCI, no firmware; the vsock device on virtio-mmio. The fastest boot.
    #[default]
    Microvm,
    /// `-M q35`: a PCI(e) machine with firmware; the vsock device is `vhost-vsock-pci` (or
    /// `vhost-user-vsock-pci`).
    Q35,
}

/// The bus a virtio device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mmio,
    Pci,
}

impl Machine {
    /// Every machine `cargo xtask test` boots the e2e suite on, default first.
    pub const ALL: [Machine; 2] = [Machine::Microvm, Machine::Q35];

    pub fn transport(self) -> Transport {
        match self {
            Machine::Microvm => Transport::Mmio,
            Machine::Q35 => Transport::Pci,
        }
    }

    /// QEMU's name for it (`-M NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        }
    }
}

impl Transport {
    /// The suffix of the QEMU vsock device for this bus: `vhost-vsock-device` (mmio) or
    /// `vhost-vsock-pci`.
    pub fn device_suffix(self) -> &'static str {
        match self {
            Transport::Mmio => "device",
            Transport::Pci => "pci",
        }
    }

    /// For file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.qemu_name())
    }
}
