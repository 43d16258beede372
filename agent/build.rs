//! Link settings that belong to the agent binary alone (the rest live in `.cargo/config.toml`).

fn main() {
    println!("cargo:rerun-if-changed=discard-unwind.ld");
    // Only the static release target: host-target builds (tests) keep the default layout.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    match std::env::var("TARGET").as_deref() {
        // Linked through `cc` (GNU ld): linker flags go through `-Wl,`.
        Ok("x86_64-unknown-linux-musl") => {
            println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
            println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/discard-unwind.ld");
        }
        // Linked by rust-lld directly (see .cargo/config.toml).
        Ok("aarch64-unknown-linux-musl") => {
            println!("cargo:rustc-link-arg-bins=--no-eh-frame-hdr");
            println!("cargo:rustc-link-arg-bins=-T{dir}/discard-unwind.ld");
        }
        _ => {}
    }
}
