//! Link settings that belong to the agent binary alone (the rest live in `.cargo/config.toml`).

fn main() {
    println!("cargo:rerun-if-changed=discard-unwind.ld");
    // Only the static release target: host-target builds (tests) keep the default layout.
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-musl") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
        println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/discard-unwind.ld");
    }
}
