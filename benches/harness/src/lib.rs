//! skein's bench harness: a load generator shaped like a platform's traffic
//! (thousands of hostnames with Zipf popularity; new, resumed and kept TLS
//! connections; h1 and h2; open or closed loop, latency without coordinated
//! omission) and its report (JSON, an HTML page with charts, a terminal
//! table). `cargo xtask bench` drives it against skein and its peers.

pub mod churn;
pub mod dns;
pub mod dnsperf;
pub mod iperf;
pub mod load;
pub mod report;
pub mod sample;
pub mod scenario;

pub use load::{RunResult, Target, run};
pub use report::Report;
pub use scenario::Scenario;
