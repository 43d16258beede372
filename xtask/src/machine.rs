//! Which QEMU machine a guest boots on, and so which virtio transport its vsock device sits on.
//!
//! The transport decides the guest's module set: virtio-mmio devices (microvm, and arm64's
//! `virt` as Firecracker uses it) need `virtio_mmio`, PCI devices (q35 and `virt` with the PCI
//! device, like Cloud Hypervisor and most QEMU users) need `virtio_pci` and its two halves. Each
//! image carries only its own transport's modules, because every module costs boot time. Each
//! machine belongs to one guest architecture.

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::arch::Arch;

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Machine {
    /// `-M microvm`: no PCI, no firmware; the vsock device on virtio-mmio. The fastest boot.
    #[default]
    Microvm,
    /// `-M q35`: a PCI(e) machine with firmware; the vsock device is `vhost-vsock-pci` (or
    /// `vhost-user-vsock-pci`).
    Q35,
    /// aarch64: `-M virt` with the vsock device on one of its virtio-mmio slots (as Firecracker
    /// on arm64). The default there.
    Virt,
    /// aarch64: `-M virt` with the vsock device on its PCIe host bridge (as Cloud Hypervisor).
    VirtPci,
}

/// The bus a virtio device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mmio,
    Pci,
}

impl Machine {
    /// Every machine `cargo xtask test` boots the e2e suite on for `arch`, default first.
    pub fn all(arch: Arch) -> [Machine; 2] {
        match arch {
            Arch::X86_64 => [Machine::Microvm, Machine::Q35],
            Arch::Aarch64 => [Machine::Virt, Machine::VirtPci],
        }
    }

    /// `arch`'s default machine (`--machine` not given).
    pub fn default_for(arch: Arch) -> Machine {
        Machine::all(arch)[0]
    }

    /// The guest architecture this machine runs.
    pub fn arch(self) -> Arch {
        match self {
            Machine::Microvm | Machine::Q35 => Arch::X86_64,
            Machine::Virt | Machine::VirtPci => Arch::Aarch64,
        }
    }

    /// This machine, if it runs `arch`'s guests; an error naming the ones that do otherwise.
    pub fn check_arch(self, arch: Arch) -> Result<Machine> {
        if self.arch() != arch {
            let [first, second] = Machine::all(arch);
            bail!("--machine {self} is not an {arch} machine: use {first} or {second}");
        }
        Ok(self)
    }

    pub fn transport(self) -> Transport {
        match self {
            Machine::Microvm | Machine::Virt => Transport::Mmio,
            Machine::Q35 | Machine::VirtPci => Transport::Pci,
        }
    }

    /// QEMU's name for it (`-M NAME`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
            Machine::Virt | Machine::VirtPci => "virt",
        }
    }

    /// The name `--machine` takes.
    pub fn flag_name(self) -> String {
        self.to_possible_value()
            .map_or_else(String::new, |value| value.get_name().to_owned())
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
        f.write_str(&self.flag_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_architecture_has_an_mmio_and_a_pci_machine() {
        for arch in Arch::ALL {
            let [mmio, pci] = Machine::all(arch);
            assert_eq!(Machine::default_for(arch), mmio);
            assert_eq!(
                (mmio.transport(), pci.transport()),
                (Transport::Mmio, Transport::Pci)
            );
            for machine in [mmio, pci] {
                assert_eq!(machine.arch(), arch);
                assert!(machine.check_arch(arch).is_ok());
            }
        }
        assert_eq!(Machine::default(), Machine::default_for(Arch::default()));
        assert_eq!(Machine::VirtPci.to_string(), "virt-pci");
        let err = Machine::Q35
            .check_arch(Arch::Aarch64)
            .expect_err("x86_64 only");
        assert!(err.to_string().contains("use virt or virt-pci"), "{err}");
    }
}
