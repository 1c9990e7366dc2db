//! End-to-end tests of the `skein` binary: the daemon, its signals and its state,
//! the demo and the commands it prints. Tests that need root or network
//! namespaces say `skipped: needs root` when they cannot run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod acme;
mod daemon;
mod demo;
mod etcd;
mod kubernetes;
mod mesh;
mod platform;
mod support;
