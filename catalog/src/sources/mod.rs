//! Sources of catalog documents.
//!
//! How they combine: each source contributes one [`Document`](crate::Document)
//! (a layer), and the catalog in force is all layers validated together. A record
//! (kind and key) is owned by exactly one source: the file cannot override an API
//! record or the reverse; the second definition is rejected with a path naming
//! both. The API refuses to change or delete a record the file owns (409), so
//! the file stays the truth for what it declares and the API for what it wrote.

pub mod api;
pub mod client;
pub mod etcd;
pub mod file;
pub mod sqlite;
