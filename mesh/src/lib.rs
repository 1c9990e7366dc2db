//! The mesh plane: one WireGuard device per host (skein's own userspace device on
//! boringtun's Noise implementation where the kernel has no WireGuard, any UAPI
//! device otherwise), peers from the catalog, routes for local machines, and the
//! eBPF guards and rewrite attached through `skein-ebpf`.

pub mod agent;
pub mod batch;
pub mod control;
pub mod device;
pub mod key;
pub mod netlink;
pub mod tun;
pub mod uapi;

pub use agent::{Agent, MeshConfig};
pub use device::{Device, DeviceConfig};
pub use key::Key;
