//! The mesh plane: one WireGuard device per host (userspace boringtun where the
//! kernel has none), peers from the catalog, routes for local machines, and the
//! eBPF guards attached through `skein-ebpf`.
//!
//! Status: the crate is in the workspace so the layout is fixed; the plane lands
//! with its own issue.
