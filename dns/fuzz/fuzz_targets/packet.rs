//! Every byte string a client or an upstream could send: the query parser, the
//! response writer on whatever parsed, and the parser of upstream answers used
//! by the cache. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_dns::forward::{age_ttls, cache_ttl};
use skein_dns::wire::{Body, Records, parse_query, rcode, rtype, write_formerr, write_response};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    match parse_query(data) {
        Ok(q) => {
            let mut r = Records::default();
            r.push(rtype::AAAA, 5, &[0xfd; 16]);
            write_response(&mut out, data, &q, rcode::NOERROR, true, Body::Answer(r.answer()), q.udp_limit());
            let soa = [0u8, 6, 0, 1, 0, 0, 0, 5, 0, 0];
            write_response(&mut out, data, &q, rcode::NXDOMAIN, true, Body::Negative { apex_len: q.qname_len, soa: &soa }, 512);
        }
        Err(_) => write_formerr(&mut out, data),
    }
    let _ = cache_ttl(data);
    let mut aged = data.to_vec();
    let _ = age_ttls(&mut aged, 7);
});
