//! Logs (tracing: human on a terminal, JSON lines otherwise) and the Prometheus
//! recorder behind every `metrics::` call in the process.

use std::io::IsTerminal as _;
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::histograms::Histograms;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init_logs(cfg: &LogConfig) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.level.clone());
    let filter = EnvFilter::try_new(quiet_rustls(&wanted))
        .or_else(|_| EnvFilter::try_new(quiet_rustls(&cfg.level)))
        .unwrap_or_else(|_| EnvFilter::new(quiet_rustls("info")));
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

/// `filter` with rustls held to errors unless it names rustls itself. rustls
/// warns once per handshake about what a client sent (an IP address as the
/// server name, as every client given `https://<ip>/` does): a log line per
/// new connection, written from the serving thread, is a cost a client chooses
/// and floods the log. The proxy counts those handshakes instead
/// (`skein_proxy_handshakes_without_sni_total`).
fn quiet_rustls(filter: &str) -> String {
    if filter.contains("rustls") {
        filter.to_string()
    } else if filter.trim().is_empty() {
        "info,rustls=error".to_string()
    } else {
        format!("{filter},rustls=error")
    }
}

/// What `/metrics` renders: the exporter's counters and gauges, and the
/// histograms ([`crate::histograms`]).
#[derive(Clone)]
pub struct MetricsHandle {
    prom: PrometheusHandle,
    histograms: Arc<Histograms>,
}

impl MetricsHandle {
    /// The Prometheus text of every metric in the process.
    pub fn render(&self) -> String {
        let mut out = self.prom.render();
        out.push_str(&self.histograms.render());
        out
    }
}

/// The process's recorder: counters and gauges go to the Prometheus exporter,
/// histograms to fixed buckets counted in place.
struct Recorder {
    prom: PrometheusRecorder,
    histograms: Arc<Histograms>,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prom.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prom.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.histograms.describe(key.as_str(), description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.prom.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.prom.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.histograms.register(key))
    }
}

/// Installs the process's metrics recorder.
pub fn init_metrics() -> anyhow::Result<MetricsHandle> {
    let prom = PrometheusBuilder::new().build_recorder();
    let handle = MetricsHandle {
        prom: prom.handle(),
        histograms: Arc::default(),
    };
    metrics::set_global_recorder(Recorder {
        prom,
        histograms: handle.histograms.clone(),
    })
    .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    metrics::gauge!("skein_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::quiet_rustls;

    #[test]
    fn rustls_is_held_to_errors_unless_the_filter_names_it() {
        assert_eq!(quiet_rustls("warn"), "warn,rustls=error");
        assert_eq!(
            quiet_rustls("skein_proxy=debug,info"),
            "skein_proxy=debug,info,rustls=error"
        );
        assert_eq!(quiet_rustls(""), "info,rustls=error");
        assert_eq!(quiet_rustls("info,rustls=debug"), "info,rustls=debug");
        // What comes out still parses as a filter.
        for f in ["warn", "skein_proxy=debug,info", ""] {
            assert!(tracing_subscriber::EnvFilter::try_new(quiet_rustls(f)).is_ok());
        }
    }
}
