//! dnsperf's peak figures (the table `../shared/bench/dns-peers.sh` prints:
//! server, repeat, queries per second, lost, average latency, the server
//! core's CPU microseconds per query) in the same reports as the load runs.

use std::collections::BTreeMap;

use crate::load::{Percentiles, RunResult};

/// The rows of a dns-peers table as results of `scenario`; lines that are
/// not rows (the header, anything else the script printed) are skipped.
pub fn results(scenario: &str, table: &str) -> Vec<RunResult> {
    let mut out = Vec::new();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, rep, qps, lost, avg_ms, us] = f.as_slice() else {
            continue;
        };
        let (Ok(rep), Ok(qps), Ok(lost), Ok(avg_ms)) = (
            rep.parse::<u32>(),
            qps.parse::<f64>(),
            lost.parse::<u64>(),
            avg_ms.parse::<f64>(),
        ) else {
            continue;
        };
        let mut errors = BTreeMap::new();
        if lost > 0 {
            errors.insert("lost".to_string(), lost);
        }
        let avg_us = (avg_ms * 1000.0) as u64;
        out.push(RunResult {
            scenario: scenario.to_string(),
            target: name.to_string(),
            repeat: rep.saturating_sub(1),
            mode: "dnsperf".into(),
            rate: None,
            seconds: 0.0,
            sent: 0,
            ok: 0,
            errors,
            overflow: 0,
            sent_per_second: qps,
            ok_per_second: qps,
            // dnsperf's summary has the mean only: it stands in the p50 column.
            latency_us: Percentiles {
                p50: avg_us,
                ..Default::default()
            },
            by_kind: BTreeMap::new(),
            drawn: BTreeMap::new(),
            resumed_handshakes: 0,
            connections: 0,
            hosts: Vec::new(),
            series: Vec::new(),
            cpu_us_per_req: us.parse().ok(),
            dns: None,
            churn: None,
            kib_per_conn: None,
            steal_pct: None,
            gbit_per_s: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_peers_table_becomes_results() {
        let table = "\
== dnsperf against 3 servers ==
server     rep           qps     lost     avg_ms     core0_us/q
nsd        1          136635        0      0.412           6.53
skein      1          146287        3      0.389           5.43
skein      2          139027        0      0.401           5.61
";
        let r = results("dnsperf-peak", table);
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].target.as_str(), r[0].ok_per_second),
            ("nsd", 136635.0)
        );
        assert_eq!(r[1].cpu_us_per_req, Some(5.43));
        assert_eq!(r[1].errors["lost"], 3);
        assert_eq!((r[2].repeat, r[2].latency_us.p50), (1, 401));
    }
}
