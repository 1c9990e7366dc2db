//! The eBPF programs (written with aya-ebpf, built by xtask with the nightly
//! toolchain and bpf-linker) and the typed userspace side that loads them:
//! attach to an interface, update maps, read counters. The address arithmetic
//! the programs use is `skein-sixpn`, shared and tested on the host.
//!
//! Status: the crate is in the workspace so the layout is fixed; the programs
//! land with the mesh issue.
