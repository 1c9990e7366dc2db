//! The DNS wire format, only as much as an authoritative server needs: parse a
//! query (header, one question, an optional EDNS OPT record) strictly, and write
//! a response from pre-encoded answer bytes. No allocation on the query path;
//! every malformed input is an error value, never a panic.

/// Record types used here.
pub mod rtype {
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Canonical name.
    pub const CNAME: u16 = 5;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// Pointer.
    pub const PTR: u16 = 12;
    /// Text.
    pub const TXT: u16 = 16;
    /// Service.
    pub const SRV: u16 = 33;
    /// EDNS0 pseudo-record.
    pub const OPT: u16 = 41;
    /// Any (refused politely: answered as NOTIMP).
    pub const ANY: u16 = 255;
}

/// Response codes.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// Malformed query.
    pub const FORMERR: u8 = 1;
    /// Server failure.
    pub const SERVFAIL: u8 = 2;
    /// Name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// Not implemented.
    pub const NOTIMP: u8 = 4;
    /// Refused.
    pub const REFUSED: u8 = 5;
}

/// Largest name in wire form.
pub const MAX_NAME: usize = 255;
/// UDP payload assumed without EDNS.
pub const CLASSIC_UDP: usize = 512;
/// Largest UDP payload this server sends (the DNS flag day 2020 figure).
pub const MAX_UDP: usize = 1232;

/// Why a query could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header: no answer possible (dropped).
    TooShort,
    /// A response, not a query (dropped: never answer answers).
    NotAQuery,
    /// Malformed after the header: answered FORMERR.
    Malformed,
}

/// A parsed query. `name` is the question name in wire form, lowercased;
/// `qname_len` is its length in the packet (the same bytes, original case).
#[derive(Debug, Clone)]
pub struct Query {
    /// Message id.
    pub id: u16,
    /// Header flags as sent.
    pub flags: u16,
    /// Opcode.
    pub opcode: u8,
    /// The lowercased question name, wire form, in `name[..qname_len]`.
    pub name: [u8; MAX_NAME],
    /// Length of the question name in wire form.
    pub qname_len: usize,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// End of the question section in the packet.
    pub question_end: usize,
    /// The EDNS UDP payload size, when the query carried an OPT record.
    pub edns: Option<u16>,
}

impl Query {
    /// The lowercased question name.
    pub fn qname(&self) -> &[u8] {
        &self.name[..self.qname_len]
    }

    /// The largest UDP response the asker accepts.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(n) => usize::from(n).clamp(CLASSIC_UDP, MAX_UDP),
            None => CLASSIC_UDP,
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Parses a query packet.
pub fn parse_query(p: &[u8]) -> Result<Query, ParseError> {
    if p.len() < 12 {
        return Err(ParseError::TooShort);
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let flags = u16::from_be_bytes([p[2], p[3]]);
    if flags & 0x8000 != 0 {
        return Err(ParseError::NotAQuery);
    }
    let (qd, an, ns, ar) = (
        u16::from_be_bytes([p[4], p[5]]),
        u16::from_be_bytes([p[6], p[7]]),
        u16::from_be_bytes([p[8], p[9]]),
        u16::from_be_bytes([p[10], p[11]]),
    );
    // One question, nothing in answer or authority, at most the OPT record.
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Err(ParseError::Malformed);
    }
    let mut q = Query {
        id,
        flags,
        opcode: ((flags >> 11) & 0xf) as u8,
        name: [0; MAX_NAME],
        qname_len: 0,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        edns: None,
    };
    // The question name: plain labels only (a pointer in a question is not
    // something a resolver sends; refusing it also rules out pointer loops).
    let mut i = 12;
    loop {
        let len = *p.get(i).ok_or(ParseError::Malformed)? as usize;
        if len & 0xc0 != 0 {
            return Err(ParseError::Malformed);
        }
        if q.qname_len + len + 1 > MAX_NAME {
            return Err(ParseError::Malformed);
        }
        let label = p.get(i..i + 1 + len).ok_or(ParseError::Malformed)?;
        for (k, b) in label.iter().enumerate() {
            q.name[q.qname_len + k] = if k == 0 { *b } else { b.to_ascii_lowercase() };
        }
        q.qname_len += len + 1;
        i += len + 1;
        if len == 0 {
            break;
        }
    }
    q.qtype = u16_at(p, i).ok_or(ParseError::Malformed)?;
    q.qclass = u16_at(p, i + 2).ok_or(ParseError::Malformed)?;
    i += 4;
    q.question_end = i;
    if ar == 1 {
        // OPT: root name, type 41, class = payload size, ttl, rdlen, rdata.
        if p.get(i) != Some(&0) || u16_at(p, i + 1) != Some(rtype::OPT) {
            return Err(ParseError::Malformed);
        }
        let payload = u16_at(p, i + 3).ok_or(ParseError::Malformed)?;
        let rdlen = u16_at(p, i + 9).ok_or(ParseError::Malformed)? as usize;
        if p.len() != i + 11 + rdlen {
            return Err(ParseError::Malformed);
        }
        q.edns = Some(payload);
    } else if p.len() != i {
        return Err(ParseError::Malformed);
    }
    Ok(q)
}

/// Writes a name in wire form from text (`a.b.c`, no trailing dot needed).
pub fn encode_name(text: &str, out: &mut Vec<u8>) {
    for label in text
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let l = &label.as_bytes()[..label.len().min(63)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
}

/// A name in wire form, lowercased.
pub fn wire_name(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 2);
    encode_name(&text.to_ascii_lowercase(), &mut v);
    v
}

/// Pre-encoded records whose owner is the question name: each starts with the
/// pointer 0xC00C (offset 12, where the question name sits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// How many records.
    pub count: u16,
    /// Their bytes.
    pub bytes: Vec<u8>,
}

impl Records {
    /// Appends one record owned by the question name.
    pub fn push(&mut self, rtype: u16, ttl: u32, rdata: &[u8]) {
        self.bytes.extend_from_slice(&[0xc0, 0x0c]);
        self.bytes.extend_from_slice(&rtype.to_be_bytes());
        self.bytes.extend_from_slice(&1u16.to_be_bytes());
        self.bytes.extend_from_slice(&ttl.to_be_bytes());
        self.bytes
            .extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(rdata);
        self.count += 1;
    }

    /// The records as an answer.
    pub fn answer(&self) -> Answer<'_> {
        Answer {
            count: self.count,
            bytes: &self.bytes,
        }
    }
}

/// Records to answer with, borrowed from wherever they are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<'a> {
    /// How many records.
    pub count: u16,
    /// Their bytes (see [`Records`]).
    pub bytes: &'a [u8],
}

/// What a response holds besides the question.
pub enum Body<'a> {
    /// Answers.
    Answer(Answer<'a>),
    /// No answer; the zone's SOA record in the authority section. `apex_len` is
    /// the apex name's wire length (a suffix of the question name); `soa` is the
    /// SOA's TTL, type, class and RDATA, without the owner.
    Negative { apex_len: usize, soa: &'a [u8] },
    /// Nothing at all (errors).
    Empty,
}

/// Writes a response to `q` into `out` (cleared first). The question is copied
/// from the packet so its case is kept. If it would not fit in `limit` bytes,
/// the answer is left out and TC set.
pub fn write_response(
    out: &mut Vec<u8>,
    packet: &[u8],
    q: &Query,
    rcode: u8,
    authoritative: bool,
    body: Body<'_>,
    limit: usize,
) {
    out.clear();
    let rd = q.flags & 0x0100;
    let mut flags = 0x8000 | (u16::from(q.opcode) << 11) | rd | u16::from(rcode);
    if authoritative {
        flags |= 0x0400;
    }
    let question = packet.get(12..q.question_end).unwrap_or(&[]);
    let (an, ns): (u16, u16) = match &body {
        Body::Answer(r) => (r.count, 0),
        Body::Negative { .. } => (0, 1),
        Body::Empty => (0, 0),
    };
    let opt_len = if q.edns.is_some() { 11 } else { 0 };
    let body_len = match &body {
        Body::Answer(r) => r.bytes.len(),
        Body::Negative { soa, .. } => 2 + soa.len(),
        Body::Empty => 0,
    };
    let truncated = 12 + question.len() + body_len + opt_len > limit;
    if truncated {
        flags |= 0x0200;
    }
    let (an, ns) = if truncated { (0, 0) } else { (an, ns) };
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&u16::from(!question.is_empty()).to_be_bytes());
    out.extend_from_slice(&an.to_be_bytes());
    out.extend_from_slice(&ns.to_be_bytes());
    out.extend_from_slice(&u16::from(q.edns.is_some()).to_be_bytes());
    out.extend_from_slice(question);
    if !truncated {
        match body {
            Body::Answer(r) => out.extend_from_slice(r.bytes),
            Body::Negative { apex_len, soa } => {
                let offset = 12 + q.qname_len.saturating_sub(apex_len);
                out.extend_from_slice(&(0xc000 | offset as u16).to_be_bytes());
                out.extend_from_slice(soa);
            }
            Body::Empty => {}
        }
    }
    if q.edns.is_some() {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&(MAX_UDP as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
}

/// Writes the FORMERR answer to a packet that has at least a header.
pub fn write_formerr(out: &mut Vec<u8>, packet: &[u8]) {
    out.clear();
    if packet.len() < 12 {
        return;
    }
    out.extend_from_slice(&packet[..2]);
    let opcode_rd = u16::from_be_bytes([packet[2], packet[3]]) & 0x7900;
    out.extend_from_slice(&(0x8000 | opcode_rd | u16::from(rcode::FORMERR)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        encode_name(name, &mut p);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        if edns {
            p.extend_from_slice(&[0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn parses_and_lowercases() {
        let p = query("Web.Example.COM", rtype::AAAA, true);
        let q = parse_query(&p).unwrap();
        assert_eq!(q.qname(), wire_name("web.example.com").as_slice());
        assert_eq!((q.qtype, q.qclass, q.edns), (rtype::AAAA, 1, Some(4096)));
        assert_eq!(q.udp_limit(), MAX_UDP);
    }

    #[test]
    fn hostile_packets_are_errors_not_panics() {
        assert_eq!(parse_query(&[0; 5]).unwrap_err(), ParseError::TooShort);
        let mut p = query("a.b", 1, false);
        p[2] |= 0x80;
        assert_eq!(parse_query(&p).unwrap_err(), ParseError::NotAQuery);
        // A compression pointer (a loop to itself) in the question.
        let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(parse_query(&p).unwrap_err(), ParseError::Malformed);
        // Two questions.
        p = query("a.b", 1, false);
        p[5] = 2;
        assert_eq!(parse_query(&p).unwrap_err(), ParseError::Malformed);
        // A label running past the end.
        let p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 40, b'a'];
        assert_eq!(parse_query(&p).unwrap_err(), ParseError::Malformed);
        // Trailing garbage.
        let mut p = query("a.b", 1, false);
        p.push(7);
        assert_eq!(parse_query(&p).unwrap_err(), ParseError::Malformed);
        // Every prefix of a good query and random bytes: never a panic.
        let good = query("svc.ns.svc.cluster.local", rtype::SRV, true);
        for n in 0..good.len() {
            let _ = parse_query(&good[..n]);
        }
        let mut x: u64 = 7;
        for _ in 0..20_000 {
            let len = (x % 80) as usize;
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            let _ = parse_query(&b);
        }
    }

    #[test]
    fn responses_keep_the_question_case_and_truncate() {
        let p = query("WEB.example.com", rtype::AAAA, false);
        let q = parse_query(&p).unwrap();
        let mut r = Records::default();
        for _ in 0..40 {
            r.push(rtype::AAAA, 5, &[0xfd; 16]);
        }
        let mut out = Vec::new();
        write_response(
            &mut out,
            &p,
            &q,
            rcode::NOERROR,
            true,
            Body::Answer(r.answer()),
            q.udp_limit(),
        );
        assert_eq!(out[2] & 0x02, 0x02, "TC set");
        assert_eq!(&out[6..8], &[0, 0]);
        assert_eq!(&out[12..12 + q.qname_len], &p[12..12 + q.qname_len]);
        write_response(
            &mut out,
            &p,
            &q,
            rcode::NOERROR,
            true,
            Body::Answer(r.answer()),
            65535,
        );
        assert_eq!(out[2] & 0x02, 0);
        assert_eq!(u16::from_be_bytes([out[6], out[7]]), 40);
    }
}
