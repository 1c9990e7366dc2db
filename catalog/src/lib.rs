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
pub use index::{Catalog, Source};
pub use model::Document;
pub use record::{Kind, Record};
pub use skein_sixpn as sixpn;
pub use store::{Changes, Diff, Snapshot, Store, WriteError, Written};
