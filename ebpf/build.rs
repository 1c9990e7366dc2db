//! Embeds the eBPF object that `cargo xtask build-ebpf` built (nightly,
//! `bpfel-unknown-none`), or an empty one so that a plain stable `cargo build`
//! still works; `skein_ebpf::Datapath::load` then says how to get the programs.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let default = manifest.join("programs/target/bpfel-unknown-none/release/skein-ebpf");
    println!("cargo:rerun-if-env-changed=SKEIN_EBPF_OBJECT");
    let object = env::var_os("SKEIN_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("skein-ebpf.o");
    let bytes = fs::read(&object).unwrap_or_default();
    if let Err(e) = fs::write(&out, bytes) {
        panic!("writing {}: {e}", out.display());
    }
}
