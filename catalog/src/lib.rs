//! The live catalog that every plane of skein reads: hosts, networks, apps,
//! machines, certificates and Kubernetes Services.
//!
//! - [`model`]: the records, as written in files and sent to the API (serde, no
//!   unknown fields).
//! - [`index`]: validation of all sources' documents together into a [`Catalog`];
//!   an invalid set is rejected whole with errors that name field paths.
//! - [`store`]: versioned immutable [`Snapshot`]s behind `arc-swap`, a `watch` for
//!   subscribers, and [`Changes`] between any two snapshots.
//! - [`sources`]: where documents come from: the TOML file (reloaded on change and
//!   on SIGHUP) and the admin API with its SQLite persistence.
//!
//! 6PN address arithmetic lives in the `no_std` crate `skein-sixpn`, shared with
//! the eBPF programs.

pub mod check;
pub mod error;
pub mod index;
pub mod model;
pub mod record;
pub mod sources;
pub mod store;

pub use error::{Invalid, Problem};
pub use index::{Catalog, MachinePatch, Source};
pub use model::Document;
pub use record::{Kind, Record};
pub use skein_sixpn as sixpn;
pub use store::{Changes, Diff, Snapshot, Store, Touched, WriteError, Written};

/// Threads for a plane's serving loops: the configured number, else one per
/// core this process may run on (at least one). Shared so every plane reads a
/// `threads` setting the same way.
pub fn serving_threads(configured: Option<usize>) -> usize {
    configured
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1)
}
