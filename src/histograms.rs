//! Histograms a request can afford: fixed buckets counted where they are
//! recorded, with nothing to drain.
//!
//! The Prometheus exporter keeps each recorded value (with a clock read of its
//! own) in a list that a periodic task drains into buckets. On an edge that
//! records two per request that is ~150,000 values a second to allocate for,
//! and a drain of 5 s of them took 1-4 ms in one go; with that task on the same
//! core as a serving thread (the proxy bench pins the whole daemon to one core,
//! a small host does it by necessity) the serving thread stood still that long
//! every 5 s, in the tail of every latency figure. Here a record is a bucket
//! search and two uncontended atomic adds on the recording thread's shard, a
//! scrape sums the shards, and nothing runs in between.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use metrics::{HistogramFn, Key, SharedString};

/// Upper bounds (seconds, inclusive) of every histogram's buckets, plus `+Inf`.
/// Fixed buckets, not quantiles: buckets sum across hosts, quantiles do not.
pub const BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Shards per histogram. A recording thread keeps to one, so serving threads
/// on different cores do not share a cache line; threads beyond this many
/// share shards (still correct, only contended).
const SHARDS: usize = 16;

/// One thread's counts: a cache line of its own (and the next, for the
/// adjacent-line prefetcher).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    counts: [AtomicU64; BOUNDS.len() + 1],
    /// The sum of the values, as `f64` bits.
    sum: AtomicU64,
}

/// One histogram series. Shards are allocated by the first record on them: a
/// series nobody records into (an app with no traffic, of thousands) costs
/// 16 empty cells.
#[derive(Default)]
pub struct Buckets {
    shards: [OnceLock<Box<Shard>>; SHARDS],
}

/// The shard the calling thread records into.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let shard = self.shards[shard_index()].get_or_init(Box::default);
        // The first bound at or above the value (`le`), else +Inf.
        let i = BOUNDS.partition_point(|b| *b < value);
        shard.counts[i].fetch_add(1, Ordering::Relaxed);
        // One writer per shard in practice: the loop runs once.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

impl Buckets {
    /// Counts per bucket (not cumulative) and the sum, over every shard.
    fn totals(&self) -> ([u64; BOUNDS.len() + 1], f64) {
        let mut counts = [0u64; BOUNDS.len() + 1];
        let mut sum = 0.0;
        for shard in self.shards.iter().filter_map(OnceLock::get) {
            for (c, s) in counts.iter_mut().zip(&shard.counts) {
                *c += s.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
        }
        (counts, sum)
    }
}

/// A series to render: its name, its labels, its counts.
type Row = (String, Vec<(String, String)>, Arc<Buckets>);

/// Every histogram series of the process, by name and labels.
#[derive(Default)]
pub struct Histograms {
    series: Mutex<HashMap<Key, Arc<Buckets>>>,
    help: Mutex<HashMap<String, SharedString>>,
}

impl Histograms {
    /// The series of `key`, created on first use (registration is rare: the
    /// proxy resolves its handles once per route table).
    pub fn register(&self, key: &Key) -> Arc<Buckets> {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.entry(key.clone()).or_default().clone()
    }

    /// The `# HELP` text of a histogram name.
    pub fn describe(&self, name: &str, help: SharedString) {
        self.help
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), help);
    }

    /// Every series in the Prometheus text format, grouped by name, names and
    /// label sets in order (a scrape reads the same order each time).
    pub fn render(&self) -> String {
        let mut rows: Vec<Row> = self
            .series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, b)| {
                let labels = k
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                (k.name().to_string(), labels, b.clone())
            })
            .collect();
        rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let help = self.help.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        let mut last: Option<&str> = None;
        for (name, labels, buckets) in &rows {
            if last != Some(name.as_str()) {
                if let Some(h) = help.get(name) {
                    let _ = writeln!(out, "# HELP {name} {}", h.replace('\n', " "));
                }
                let _ = writeln!(out, "# TYPE {name} histogram");
                last = Some(name.as_str());
            }
            let mut base = String::new();
            for (k, v) in labels {
                let _ = write!(base, "{k}=\"{}\",", escape(v));
            }
            let (counts, sum) = buckets.totals();
            let mut cumulative = 0u64;
            for (i, c) in counts.iter().enumerate() {
                cumulative += c;
                match BOUNDS.get(i) {
                    Some(b) => {
                        let _ = writeln!(out, "{name}_bucket{{{base}le=\"{b}\"}} {cumulative}");
                    }
                    None => {
                        let _ = writeln!(out, "{name}_bucket{{{base}le=\"+Inf\"}} {cumulative}");
                    }
                }
            }
            let plain = base.trim_end_matches(',');
            let braces = if plain.is_empty() {
                String::new()
            } else {
                format!("{{{plain}}}")
            };
            let _ = writeln!(out, "{name}_sum{braces} {sum}");
            let _ = writeln!(out, "{name}_count{braces} {cumulative}");
        }
        out
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_their_buckets_and_render_cumulatively() {
        let h = Histograms::default();
        let key = Key::from_parts("req_seconds", vec![metrics::Label::new("app", "a\"b")]);
        let series = h.register(&key);
        // A bound is inclusive (`le`); past the last bound is +Inf; NaN is dropped.
        for v in [0.0001, 0.0002, 0.0009, 0.001, 30.0, f64::NAN] {
            series.record(v);
        }
        // Another thread's values are in the same series.
        let other = h.register(&key);
        std::thread::spawn(move || other.record(0.3))
            .join()
            .unwrap();
        h.register(&Key::from_name("idle_seconds"));
        h.describe("req_seconds", "Time to response headers.".into());
        let text = h.render();
        let line = |s: &str| assert!(text.lines().any(|l| l == s), "no {s:?} in\n{text}");
        line("# HELP req_seconds Time to response headers.");
        line("# TYPE req_seconds histogram");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"0.0001\"} 1");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"0.00025\"} 2");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"0.001\"} 4");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"0.25\"} 4");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"0.5\"} 5");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"10\"} 5");
        line("req_seconds_bucket{app=\"a\\\"b\",le=\"+Inf\"} 6");
        line("req_seconds_count{app=\"a\\\"b\"} 6");
        // A series nobody recorded into renders as zeros, without braces.
        line("idle_seconds_bucket{le=\"+Inf\"} 0");
        line("idle_seconds_count 0");
        line("idle_seconds_sum 0");
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("req_seconds_sum{app=\"a\\\"b\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 30.3022).abs() < 1e-9, "{sum}");
        // Names in order, each with one TYPE line.
        assert!(text.find("idle_seconds").unwrap() < text.find("req_seconds").unwrap());
        assert_eq!(text.matches("# TYPE req_seconds histogram").count(), 1);
    }
}
