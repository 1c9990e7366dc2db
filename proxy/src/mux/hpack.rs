//! HPACK (RFC 7541), as skein's h2 connection needs it: a decoder with the
//! dynamic table for the peer's header blocks, and an encoder that writes
//! every field as a literal that is not indexed (static-table names where
//! they exist, no Huffman), which needs no state and costs one copy.
//!
//! Decoded fields keep their bytes as `Bytes` slices of the block where they
//! are plain, and entries of the dynamic table are shared, not copied, each
//! time a block refers to them: a client's repeated headers cost a reference
//! count, not a parse.

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::HeaderName;

/// What a peer's block did wrong: a connection error (COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Error(pub &'static str);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A field's name as h2 sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Name {
    Authority,
    Method,
    Path,
    Scheme,
    Status,
    Protocol,
    /// A pseudo-header h2 does not define (the request is malformed).
    UnknownPseudo,
    /// A regular field.
    Header(HeaderName),
    /// Not a valid h2 field name (uppercase, a character outside a token):
    /// the request is malformed, but the block is still decoded.
    Invalid,
}

impl Name {
    fn parse(b: &[u8]) -> Name {
        match b {
            b":authority" => Name::Authority,
            b":method" => Name::Method,
            b":path" => Name::Path,
            b":scheme" => Name::Scheme,
            b":status" => Name::Status,
            b":protocol" => Name::Protocol,
            [b':', ..] => Name::UnknownPseudo,
            // HeaderName would lowercase these; h2 forbids them.
            _ if b.iter().any(u8::is_ascii_uppercase) => Name::Invalid,
            _ => HeaderName::from_bytes(b).map_or(Name::Invalid, Name::Header),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    name: Name,
    value: Bytes,
    /// Name length + value length + 32 (RFC 7541, 4.1).
    size: usize,
}

/// RFC 7541, Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

fn static_table() -> &'static [Entry] {
    static T: OnceLock<Vec<Entry>> = OnceLock::new();
    T.get_or_init(|| {
        STATIC
            .iter()
            .map(|(n, v)| Entry {
                name: Name::parse(n.as_bytes()),
                value: Bytes::from_static(v.as_bytes()),
                size: n.len() + v.len() + 32,
            })
            .collect()
    })
}

/// The decoding side of one connection.
pub(crate) struct Decoder {
    table: VecDeque<Entry>,
    size: usize,
    /// The most the table may hold: what this side announced
    /// (SETTINGS_HEADER_TABLE_SIZE), which bounds the peer's updates.
    max_allowed: usize,
    /// The most the peer's last update allows.
    max: usize,
}

impl Decoder {
    /// A decoder whose table may grow to `max` bytes (what this side's
    /// SETTINGS_HEADER_TABLE_SIZE says; 4096 unless it said otherwise).
    pub(crate) fn new(max: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_allowed: max,
            max,
        }
    }

    /// Decodes a whole block, giving each field to `each` in order. The
    /// table is updated whatever `each` makes of the fields, so a request
    /// that is refused keeps the connection's state in step.
    pub(crate) fn decode(
        &mut self,
        block: Bytes,
        mut each: impl FnMut(Name, Bytes),
    ) -> Result<(), Error> {
        let mut r = Reader { buf: block, pos: 0 };
        let mut first = true;
        while let Some(&b) = r.peek() {
            if b & 0x80 != 0 {
                let i = r.int(7)?;
                let e = self.get(i)?;
                each(e.name.clone(), e.value.clone());
            } else if b & 0xc0 == 0x40 {
                let (name, name_len, value) = self.literal(&mut r, 6)?;
                each(name.clone(), value.clone());
                self.insert(Entry {
                    size: name_len + value.len() + 32,
                    name,
                    value,
                });
            } else if b & 0xe0 == 0x20 {
                if !first {
                    return Err(Error("table size update after a field"));
                }
                let n = r.int(5)?;
                if n > self.max_allowed {
                    return Err(Error("table size update over the announced size"));
                }
                self.max = n;
                self.evict();
                continue;
            } else {
                // Without indexing (0000) or never indexed (0001).
                let (name, _, value) = self.literal(&mut r, 4)?;
                each(name, value);
            }
            first = false;
        }
        Ok(())
    }

    fn get(&self, i: usize) -> Result<&Entry, Error> {
        let s = static_table();
        match i {
            0 => Err(Error("index 0")),
            i if i <= s.len() => Ok(&s[i - 1]),
            i => self
                .table
                .get(i - s.len() - 1)
                .ok_or(Error("index past the table")),
        }
    }

    /// A literal field: its name (indexed or literal), the name's length
    /// and its value.
    fn literal(&self, r: &mut Reader, prefix: u8) -> Result<(Name, usize, Bytes), Error> {
        let i = r.int(prefix)?;
        let (name, name_len) = if i == 0 {
            let raw = r.string()?;
            (Name::parse(&raw), raw.len())
        } else {
            let e = self.get(i)?;
            let len = e.size - e.value.len() - 32;
            (e.name.clone(), len)
        };
        Ok((name, name_len, r.string()?))
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max {
            // Larger than the table: it empties it and is not kept.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.size += e.size;
        self.table.push_front(e);
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.table.pop_back() {
                Some(old) => self.size -= old.size,
                None => self.size = 0,
            }
        }
    }
}

impl Entry {
    #[cfg(test)]
    fn name_len(&self) -> usize {
        self.size - self.value.len() - 32
    }
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn peek(&self) -> Option<&u8> {
        self.buf.get(self.pos)
    }

    fn byte(&mut self) -> Result<u8, Error> {
        let b = *self.buf.get(self.pos).ok_or(Error("block cut short"))?;
        self.pos += 1;
        Ok(b)
    }

    /// An integer with an `n`-bit prefix (RFC 7541, 5.1), at most 2^28.
    fn int(&mut self, n: u8) -> Result<usize, Error> {
        let mask = (1u16 << n) as u8 - 1;
        let mut v = (self.byte()? & mask) as usize;
        if v < mask as usize {
            return Ok(v);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            v += ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 21 {
                return Err(Error("integer too large"));
            }
        }
    }

    /// A string (RFC 7541, 5.2): a slice of the block, or its Huffman
    /// decoding.
    fn string(&mut self) -> Result<Bytes, Error> {
        let huffman = self.peek().is_some_and(|b| b & 0x80 != 0);
        let len = self.int(7)?;
        if len > self.buf.len() - self.pos {
            return Err(Error("string past the block"));
        }
        let raw = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        if huffman {
            huffman_decode(&raw)
        } else {
            Ok(raw)
        }
    }
}

/// Code lengths of the HPACK Huffman code (RFC 7541, Appendix B), symbol 0
/// to 255 then EOS. The code is canonical: codes of one length are
/// consecutive, in symbol order, and each length's first code follows the
/// last of the length before, so the lengths alone define it.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The canonical code, arranged for decoding: for each length, the first
/// code (left-aligned in 32 bits) past the codes of that length and all
/// shorter ones, and where its symbols start in `symbols`.
struct Canonical {
    /// By length 1..=30: codes of this length are below `limit[len]` (left
    /// aligned) and at or above `limit[len - 1]`.
    limit: [u64; 31],
    /// First code of each length (right-aligned).
    first: [u32; 31],
    /// Index in `symbols` of each length's first symbol.
    offset: [u16; 31],
    /// Symbols in code order.
    symbols: [u16; 257],
}

fn canonical() -> &'static Canonical {
    static C: OnceLock<Canonical> = OnceLock::new();
    C.get_or_init(|| {
        let mut c = Canonical {
            limit: [0; 31],
            first: [0; 31],
            offset: [0; 31],
            symbols: [0; 257],
        };
        let mut n = 0usize;
        let mut code: u32 = 0;
        for len in 1..=30u8 {
            c.first[len as usize] = code;
            c.offset[len as usize] = n as u16;
            for (sym, &l) in LENGTHS.iter().enumerate() {
                if l == len {
                    c.symbols[n] = sym as u16;
                    n += 1;
                    code += 1;
                }
            }
            c.limit[len as usize] = u64::from(code) << (32 - len);
            code <<= 1;
        }
        c
    })
}

/// Decodes a Huffman-coded string (RFC 7541, 5.2): the padding must be
/// shorter than a byte and all ones, and EOS must not appear.
pub(crate) fn huffman_decode(src: &[u8]) -> Result<Bytes, Error> {
    let c = canonical();
    let mut out = BytesMut::with_capacity(src.len() * 8 / 5 + 1);
    // Bits not yet decoded, left-aligned in `acc`'s low 32 + spare bits.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut input = src.iter();
    loop {
        while bits <= 32 {
            match input.next() {
                Some(&b) => {
                    acc |= u64::from(b) << (56 - bits);
                    bits += 8;
                }
                None => break,
            }
        }
        if bits == 0 {
            break;
        }
        let window = acc >> 32;
        let Some(len) = (5..=30usize).find(|&l| window < c.limit[l]) else {
            return Err(Error("bad huffman code"));
        };
        if len as u32 > bits {
            // The rest is padding: under a byte, all ones.
            let mask = (1u64 << bits) - 1;
            if bits >= 8 || (window >> (32 - bits)) & mask != mask {
                return Err(Error("bad huffman padding"));
            }
            break;
        }
        let code = (window >> (32 - len)) as u32;
        let i = c.offset[len] as usize + (code - c.first[len]) as usize;
        let sym = c.symbols[i];
        if sym == 256 {
            return Err(Error("EOS in a huffman string"));
        }
        out.extend_from_slice(&[sym as u8]);
        acc <<= len;
        bits -= len as u32;
    }
    Ok(out.freeze())
}

/// Appends an integer with an `n`-bit prefix; `first` holds the bits above
/// the prefix.
pub(crate) fn put_int(out: &mut Vec<u8>, first: u8, n: u8, v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        out.push(first | v as u8);
        return;
    }
    out.push(first | mask as u8);
    let mut v = v - mask;
    while v >= 128 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a plain (not Huffman) string.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Index of a name in the static table, for names that have one: by
/// length first, so most names are told apart by one comparison.
fn static_name(name: &str) -> Option<usize> {
    match name.len() {
        3 => match name.as_bytes() {
            b"age" => Some(21),
            b"via" => Some(60),
            _ => None,
        },
        4 => match name.as_bytes() {
            b"date" => Some(33),
            b"etag" => Some(34),
            b"from" => Some(37),
            b"host" => Some(38),
            b"link" => Some(45),
            b"vary" => Some(59),
            _ => None,
        },
        5 => match name.as_bytes() {
            b":path" => Some(4),
            b"allow" => Some(22),
            b"range" => Some(50),
            _ => None,
        },
        6 => match name.as_bytes() {
            b"accept" => Some(19),
            b"cookie" => Some(32),
            b"expect" => Some(35),
            b"server" => Some(54),
            _ => None,
        },
        7 => match name.as_bytes() {
            b":method" => Some(2),
            b":scheme" => Some(6),
            b":status" => Some(8),
            b"expires" => Some(36),
            b"referer" => Some(51),
            b"refresh" => Some(52),
            _ => None,
        },
        8 => match name.as_bytes() {
            b"if-match" => Some(39),
            b"if-range" => Some(42),
            b"location" => Some(46),
            _ => None,
        },
        10 => match name.as_bytes() {
            b":authority" => Some(1),
            b"set-cookie" => Some(55),
            b"user-agent" => Some(58),
            _ => None,
        },
        11 => match name.as_bytes() {
            b"retry-after" => Some(53),
            _ => None,
        },
        12 => match name.as_bytes() {
            b"content-type" => Some(31),
            b"max-forwards" => Some(47),
            _ => None,
        },
        13 => match name.as_bytes() {
            b"accept-ranges" => Some(18),
            b"authorization" => Some(23),
            b"cache-control" => Some(24),
            b"content-range" => Some(30),
            b"if-none-match" => Some(41),
            b"last-modified" => Some(44),
            _ => None,
        },
        14 => match name.as_bytes() {
            b"accept-charset" => Some(15),
            b"content-length" => Some(28),
            _ => None,
        },
        15 => match name.as_bytes() {
            b"accept-encoding" => Some(16),
            b"accept-language" => Some(17),
            _ => None,
        },
        16 => match name.as_bytes() {
            b"content-encoding" => Some(26),
            b"content-language" => Some(27),
            b"content-location" => Some(29),
            b"www-authenticate" => Some(61),
            _ => None,
        },
        17 => match name.as_bytes() {
            b"if-modified-since" => Some(40),
            b"transfer-encoding" => Some(57),
            _ => None,
        },
        18 => match name.as_bytes() {
            b"proxy-authenticate" => Some(48),
            _ => None,
        },
        19 => match name.as_bytes() {
            b"content-disposition" => Some(25),
            b"if-unmodified-since" => Some(43),
            b"proxy-authorization" => Some(49),
            _ => None,
        },
        25 => match name.as_bytes() {
            b"strict-transport-security" => Some(56),
            _ => None,
        },
        27 => match name.as_bytes() {
            b"access-control-allow-origin" => Some(20),
            _ => None,
        },
        _ => None,
    }
}

/// Appends `:status` (indexed where the static table has it).
pub(crate) fn put_status(out: &mut Vec<u8>, status: u16) {
    let indexed = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if indexed != 0 {
        out.push(0x80 | indexed);
    } else {
        put_int(out, 0, 4, 8);
        let s = status.min(999);
        put_str(
            out,
            &[
                b'0' + (s / 100) as u8,
                b'0' + (s / 10 % 10) as u8,
                b'0' + (s % 10) as u8,
            ],
        );
    }
}

/// Appends a pseudo-header or field as a literal not indexed (never
/// indexed when `sensitive`), its name from the static table when it is
/// there. `name` must be lowercase.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &str, value: &[u8], sensitive: bool) {
    // A request's commonest pseudo-headers are whole entries of the table.
    let whole = match (name, value) {
        (":method", b"GET") => 2,
        (":method", b"POST") => 3,
        (":path", b"/") => 4,
        (":scheme", b"http") => 6,
        (":scheme", b"https") => 7,
        _ => 0,
    };
    if whole != 0 {
        out.push(0x80 | whole);
        return;
    }
    let first = if sensitive { 0x10 } else { 0x00 };
    match static_name(name) {
        Some(i) => put_int(out, first, 4, i),
        None => {
            out.push(first);
            put_str(out, name.as_bytes());
        }
    }
    put_str(out, value);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hex(s: &str) -> Bytes {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    fn text(n: &Name) -> String {
        match n {
            Name::Authority => ":authority".into(),
            Name::Method => ":method".into(),
            Name::Path => ":path".into(),
            Name::Scheme => ":scheme".into(),
            Name::Status => ":status".into(),
            Name::Protocol => ":protocol".into(),
            Name::Header(h) => h.to_string(),
            Name::UnknownPseudo => "?pseudo".into(),
            Name::Invalid => "?invalid".into(),
        }
    }

    fn decode(d: &mut Decoder, block: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        d.decode(hex(block), |n, val| {
            v.push((text(&n), String::from_utf8(val.to_vec()).unwrap()))
        })
        .unwrap();
        v
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// RFC 7541 C.3 and C.4: three requests on one connection, first with
    /// plain strings, then the same with Huffman; the table carries over.
    #[test]
    fn the_rfc_examples_decode_with_the_table_carried_between_blocks() {
        for (blocks, size) in [
            (
                [
                    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                    "8286 84be 5808 6e6f 2d63 6163 6865",
                    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                ],
                164,
            ),
            (
                [
                    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                    "8286 84be 5886 a8eb 1064 9cbf",
                    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                ],
                164,
            ),
        ] {
            let mut d = Decoder::new(4096);
            assert_eq!(
                decode(&mut d, blocks[0]),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com")
                ])
            );
            assert_eq!(d.size, 57);
            assert_eq!(
                decode(&mut d, blocks[1]),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com"),
                    ("cache-control", "no-cache")
                ])
            );
            assert_eq!(
                decode(&mut d, blocks[2]),
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value")
                ])
            );
            assert_eq!(d.size, size);
            assert_eq!(d.table.len(), 3);
            assert_eq!(d.table[0].name_len(), "custom-key".len());
        }
    }

    /// RFC 7541 C.6 (Huffman responses, a 256-byte table): entries evicted
    /// as the table fills.
    #[test]
    fn entries_are_evicted_when_the_table_is_full() {
        let mut d = Decoder::new(256);
        let first = decode(
            &mut d,
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        );
        assert_eq!(
            first,
            pairs(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ])
        );
        assert_eq!(d.size, 222);
        let second = decode(&mut d, "4883 640e ffc1 c0bf");
        assert_eq!(second[0], (":status".into(), "307".into()));
        assert_eq!(d.size, 222, "302 evicted for 307");
        let third = decode(
            &mut d,
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        );
        assert_eq!(third.len(), 6);
        assert_eq!(
            third[5],
            (
                "set-cookie".into(),
                "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1".into()
            )
        );
        assert_eq!(d.size, 215);
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        for bad in [
            "80",                   // index 0
            "be",                   // past an empty table
            "41",                   // literal cut short
            "418f",                 // a string past the block
            "ff ff ff ff ff ff ff", // an integer too large
            "82 3f e1 1f",          // a size update after a field
            "3f e2 1f",             // a size update over the announced size
            "41 81 ff",             // Huffman padding of a whole byte... of ones, 8 bits
            "41 84 ff ff ff ff",    // EOS inside a string
        ] {
            let mut d = Decoder::new(4096);
            assert!(
                d.decode(hex(bad), |_, _| {}).is_err(),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn invalid_names_are_marked_not_lowercased() {
        let mut d = Decoder::new(4096);
        let mut names = Vec::new();
        let mut block = Vec::new();
        for n in ["X-Upper", ":bogus", "ok-name", "bad name"] {
            block.push(0);
            put_str(&mut block, n.as_bytes());
            put_str(&mut block, b"v");
        }
        d.decode(block.into(), |n, _| names.push(n)).unwrap();
        assert_eq!(names[0], Name::Invalid);
        assert_eq!(names[1], Name::UnknownPseudo);
        assert_eq!(names[2], Name::Header(HeaderName::from_static("ok-name")));
        assert_eq!(names[3], Name::Invalid);
    }

    #[test]
    fn what_the_encoder_writes_decodes_to_the_same_fields() {
        let mut out = Vec::new();
        put_status(&mut out, 200);
        put_status(&mut out, 418);
        put_field(&mut out, "content-length", b"1024", false);
        put_field(&mut out, "x-request-id", b"abc", false);
        put_field(&mut out, "set-cookie", b"secret", true);
        let long = "v".repeat(300);
        put_field(&mut out, "x-long", long.as_bytes(), false);
        let mut d = Decoder::new(4096);
        let mut got = Vec::new();
        d.decode(out.into(), |n, v| {
            got.push((text(&n), String::from_utf8(v.to_vec()).unwrap()))
        })
        .unwrap();
        assert_eq!(
            got,
            pairs(&[
                (":status", "200"),
                (":status", "418"),
                ("content-length", "1024"),
                ("x-request-id", "abc"),
                ("set-cookie", "secret"),
                ("x-long", &long),
            ])
        );
        assert!(d.table.is_empty(), "nothing indexed");
    }

    #[test]
    fn every_static_name_is_found_and_common_request_pairs_take_one_byte() {
        for (i, (name, _)) in STATIC.iter().enumerate() {
            let first = STATIC.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_name(name), Some(first), "{name} (entry {})", i + 1);
        }
        assert_eq!(static_name("x-forwarded-for"), None);
        assert_eq!(static_name("hosts"), None);
        let fields: &[(&str, &str)] = &[
            (":method", "GET"),
            (":method", "POST"),
            (":method", "DELETE"),
            (":scheme", "http"),
            (":scheme", "https"),
            (":authority", "a.example"),
            (":path", "/"),
            (":path", "/x?y=1"),
            ("accept-encoding", "br"),
            ("www-authenticate", "Basic"),
        ];
        let mut out = Vec::new();
        for (n, v) in &fields[..2] {
            put_field(&mut out, n, v.as_bytes(), false);
        }
        assert_eq!(out, [0x82, 0x83], "GET and POST indexed whole");
        for (n, v) in &fields[2..] {
            put_field(&mut out, n, v.as_bytes(), false);
        }
        let mut d = Decoder::new(4096);
        let mut got = Vec::new();
        d.decode(out.into(), |n, v| {
            got.push((text(&n), String::from_utf8(v.to_vec()).unwrap()))
        })
        .unwrap();
        assert_eq!(got, pairs(fields));
    }

    #[test]
    fn every_byte_survives_huffman() {
        // Encode with the canonical code built from the lengths, decode back.
        let c = canonical();
        let mut codes = [0u32; 257];
        for len in 1..=30usize {
            let start = c.offset[len] as usize;
            let end = if len < 30 {
                c.offset[len + 1] as usize
            } else {
                257
            };
            for (k, i) in (start..end).enumerate() {
                codes[c.symbols[i] as usize] = c.first[len] + k as u32;
            }
        }
        let input: Vec<u8> = (0..=255u8)
            .chain(b"www.example.com".iter().copied())
            .collect();
        let (mut acc, mut bits, mut enc) = (0u64, 0u32, Vec::new());
        for &b in &input {
            let len = u32::from(LENGTHS[b as usize]);
            acc = (acc << len) | u64::from(codes[b as usize]);
            bits += len;
            while bits >= 8 {
                enc.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            enc.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        assert_eq!(&huffman_decode(&enc).unwrap()[..], &input[..]);
        // RFC 7541 C.4.1's "www.example.com".
        assert_eq!(
            &huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap()[..],
            b"www.example.com"
        );
    }
}
