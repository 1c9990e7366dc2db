//! Throughput runs by iperf3 (the mesh's figure) in the same reports as the
//! load runs: `iperf3 -J` output becomes a [`RunResult`] with `gbit_per_s`,
//! so the mesh's paths sit in the table, the page and its history.

use std::collections::BTreeMap;

use anyhow::Context as _;
use serde_json::Value;

use crate::load::{Percentiles, RunResult};

/// One iperf3 client run (`iperf3 -c ... -J`) as a result of `scenario`
/// against `target`.
pub fn result(scenario: &str, target: &str, repeat: u32, json: &str) -> anyhow::Result<RunResult> {
    let v: Value = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        anyhow::bail!("iperf3 failed: {e}");
    }
    let received = &v["end"]["sum_received"];
    let bits = received["bits_per_second"]
        .as_f64()
        .context("iperf3 output has no end.sum_received.bits_per_second")?;
    let seconds = received["seconds"].as_f64().unwrap_or(0.0);
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let mut errors = BTreeMap::new();
    if retransmits > 0 {
        errors.insert("tcp_retransmits".to_string(), retransmits);
    }
    Ok(RunResult {
        scenario: scenario.to_string(),
        target: target.to_string(),
        repeat,
        mode: "iperf3".into(),
        rate: None,
        seconds,
        sent: 0,
        ok: 0,
        errors,
        overflow: 0,
        sent_per_second: 0.0,
        ok_per_second: 0.0,
        latency_us: Percentiles::default(),
        by_kind: BTreeMap::new(),
        drawn: BTreeMap::new(),
        resumed_handshakes: 0,
        connections: 1,
        hosts: Vec::new(),
        series: Vec::new(),
        cpu_us_per_req: None,
        dns: None,
        churn: None,
        kib_per_conn: None,
        steal_pct: None,
        gbit_per_s: Some(bits / 1e9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iperf3_run_becomes_a_throughput_result() {
        let json = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"seconds":10.0,"bytes":1,"bits_per_second":1.1e9,"retransmits":12},"sum_received":{"seconds":10.0,"bytes":1,"bits_per_second":1.05e9}}}"#;
        let r = result("mesh", "skein", 1, json).unwrap();
        assert_eq!(r.gbit_per_s, Some(1.05));
        assert_eq!(r.errors["tcp_retransmits"], 12);
        assert_eq!((r.repeat, r.mode.as_str()), (1, "iperf3"));
        let e = result("mesh", "x", 0, r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(e.to_string().contains("unable to connect"), "{e}");
        assert!(result("mesh", "x", 0, "Traceback").is_err());
    }
}
