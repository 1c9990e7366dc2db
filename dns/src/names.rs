//! A view's names laid out for answering: a small open-addressed index and
//! one arena where each name's key and all its pre-encoded records sit side
//! by side.
//!
//! A hash map of `Vec<u8>` keys to entries holding vectors of records costs a
//! question four cache misses on a large zone: the bucket, the key's bytes,
//! the entry's type list and the records' bytes. Here the index is 8 bytes a
//! slot (a 10,000-Service zone's index stays in cache) and one slot leads to
//! one place in the arena that holds the key to compare and, right after it,
//! the answer to copy.
//!
//! Arena layout of one name: key length (u16 LE), key, CNAME present (u8),
//! number of types (u8); then the CNAME's records if present and each type's
//! records, each as type (u16), record count (u16), byte length (u32), bytes.

use rustc_hash::FxHashMap;

use crate::wire::{Answer, Records, rtype};

/// Records of one name, by type, with the CNAME that answers every type.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    /// Records by type.
    pub types: Vec<(u16, Records)>,
    /// A CNAME (then the name has no other data).
    pub cname: Option<Records>,
}

/// The frozen name table.
#[derive(Debug, Default, Clone)]
pub struct NameTable {
    /// Power-of-two length, at most half full; 0 is empty, else the hash's
    /// low 32 bits above and the arena offset plus one below.
    slots: Box<[u64]>,
    /// High bits of the hash pick the first slot: `64 - log2(slots)`.
    shift: u32,
    /// Seeded at random for each table: names chosen to collide (a customer
    /// names its services) cannot be worked out in advance to pile up into
    /// one long probe run.
    seed: foldhash::fast::RandomState,
    arena: Vec<u8>,
    len: usize,
}

impl NameTable {
    fn hash(&self, key: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.seed.hash_one(key)
    }

    /// Lays out `names` (wire-form lowercased keys). Names too long to be
    /// DNS names, or past an arena of 4 GiB, are left out and counted in the
    /// returned number.
    pub fn build(names: FxHashMap<Vec<u8>, Entry>) -> (NameTable, usize) {
        let want = (names.len() * 2).max(8).next_power_of_two();
        let mut t = NameTable {
            slots: vec![0u64; want].into_boxed_slice(),
            shift: 64 - want.trailing_zeros(),
            seed: foldhash::fast::RandomState::default(),
            arena: Vec::new(),
            len: 0,
        };
        let mut skipped = 0;
        for (key, e) in names {
            if t.insert(&key, &e).is_none() {
                skipped += 1;
            }
        }
        t.arena.shrink_to_fit();
        (t, skipped)
    }

    fn insert(&mut self, key: &[u8], e: &Entry) -> Option<()> {
        let start = self.arena.len();
        let laid = self.lay_out(key, e);
        // The arena's end must stay addressable by a slot's 32-bit offset.
        if laid.is_none() || u32::try_from(self.arena.len()).is_err() {
            self.arena.truncate(start);
            return None;
        }
        let off = u64::from(u32::try_from(start).ok()?) + 1;
        let h = self.hash(key);
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = (h << 32) | off;
        self.len += 1;
        Some(())
    }

    /// Appends one name's key and records to the arena (None: a field does
    /// not fit its width; the caller drops what was appended).
    fn lay_out(&mut self, key: &[u8], e: &Entry) -> Option<()> {
        let a = &mut self.arena;
        a.extend_from_slice(&u16::try_from(key.len()).ok()?.to_le_bytes());
        a.extend_from_slice(key);
        a.push(u8::from(e.cname.is_some()));
        a.push(u8::try_from(e.types.len()).ok()?);
        let cname = e.cname.as_ref().map(|r| (rtype::CNAME, r));
        for (t, r) in cname
            .into_iter()
            .chain(e.types.iter().map(|(t, r)| (*t, r)))
        {
            a.extend_from_slice(&t.to_le_bytes());
            a.extend_from_slice(&r.count.to_le_bytes());
            a.extend_from_slice(&u32::try_from(r.bytes.len()).ok()?.to_le_bytes());
            a.extend_from_slice(&r.bytes);
        }
        Some(())
    }

    /// The records of `key`, if it is a name of the table.
    pub fn get(&self, key: &[u8]) -> Option<EntryRef<'_>> {
        if self.len == 0 {
            return None;
        }
        let h = self.hash(key);
        let tag = h << 32;
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        loop {
            let s = *self.slots.get(i)?;
            if s == 0 {
                return None;
            }
            if s & !0xffff_ffff == tag {
                let off = (s & 0xffff_ffff) as usize - 1;
                let at = self.arena.get(off..)?;
                let klen = usize::from(u16::from_le_bytes([*at.first()?, *at.get(1)?]));
                if at.get(2..2 + klen) == Some(key) {
                    return Some(EntryRef {
                        rest: at.get(2 + klen..)?,
                    });
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it has no names.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One name's records in the arena.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    rest: &'a [u8],
}

impl<'a> EntryRef<'a> {
    /// The CNAME, which answers every type.
    pub fn cname(&self) -> Option<Answer<'a>> {
        if *self.rest.first()? == 0 {
            return None;
        }
        self.records().next().map(|(_, a)| a)
    }

    /// The records of type `t` (never the CNAME: see [`EntryRef::cname`]).
    pub fn get(&self, t: u16) -> Option<Answer<'a>> {
        let skip = usize::from(*self.rest.first()? != 0);
        self.records()
            .skip(skip)
            .find(|(rt, _)| *rt == t)
            .map(|(_, a)| a)
    }

    fn records(&self) -> impl Iterator<Item = (u16, Answer<'a>)> + 'a {
        let n = usize::from(self.rest.first().copied().unwrap_or(0))
            + usize::from(self.rest.get(1).copied().unwrap_or(0));
        let mut at = self.rest.get(2..).unwrap_or(&[]);
        (0..n).map_while(move |_| {
            let head = at.get(..8)?;
            let t = u16::from_le_bytes([head[0], head[1]]);
            let count = u16::from_le_bytes([head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let bytes = at.get(8..8 + len)?;
            at = at.get(8 + len..)?;
            Some((t, Answer { count, bytes }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::wire_name;

    fn records(tag: u8, n: u16) -> Records {
        let mut r = Records::default();
        for i in 0..n {
            r.push(rtype::AAAA, 5, &[tag, i as u8]);
        }
        r
    }

    #[test]
    fn every_name_is_found_with_its_own_records_and_no_other_name_is() {
        let mut m: FxHashMap<Vec<u8>, Entry> = FxHashMap::default();
        for n in 0..20_000u32 {
            let mut e = Entry::default();
            e.types
                .push((rtype::AAAA, records((n % 251) as u8, 1 + (n % 3) as u16)));
            if n % 7 == 0 {
                e.types.push((rtype::TXT, records(9, 1)));
            }
            m.insert(
                wire_name(&format!("svc-{n}.ns-{}.svc.cluster.local", n % 50)),
                e,
            );
        }
        let expect = m.clone();
        let (t, skipped) = NameTable::build(m);
        assert_eq!((t.len(), skipped), (20_000, 0));
        for (k, e) in &expect {
            let got = t.get(k).expect("a name of the table");
            assert!(got.cname().is_none());
            for (ty, r) in &e.types {
                let a = got.get(*ty).expect("its type");
                assert_eq!((a.count, a.bytes), (r.count, &r.bytes[..]));
            }
            assert!(got.get(rtype::SRV).is_none());
        }
        for absent in [
            "svc-20000.ns-0.svc.cluster.local",
            "cluster.local",
            "svc-1.ns-1.svc.cluster",
            "",
        ] {
            assert!(t.get(&wire_name(absent)).is_none(), "{absent}");
        }
        // A key is matched whole: a prefix or an extension of a name is not it.
        let k = wire_name("svc-1.ns-1.svc.cluster.local");
        assert!(t.get(&k[..k.len() - 1]).is_none());
        assert!(t.get(&[k.as_slice(), &[0]].concat()).is_none());
    }

    #[test]
    fn a_cname_answers_every_type_and_an_empty_name_exists_with_no_data() {
        let mut m: FxHashMap<Vec<u8>, Entry> = FxHashMap::default();
        let cname = records(1, 1);
        m.insert(
            wire_name("ext.ns.svc.cluster.local"),
            Entry {
                types: Vec::new(),
                cname: Some(cname.clone()),
            },
        );
        m.insert(wire_name("ns.svc.cluster.local"), Entry::default());
        let (t, _) = NameTable::build(m);
        let e = t
            .get(&wire_name("ext.ns.svc.cluster.local"))
            .expect("cname");
        let c = e.cname().expect("its cname");
        assert_eq!((c.count, c.bytes), (1, &cname.bytes[..]));
        assert!(
            e.get(rtype::CNAME).is_none(),
            "the CNAME is not a type of its own here"
        );
        let ent = t
            .get(&wire_name("ns.svc.cluster.local"))
            .expect("empty non-terminal");
        assert!(ent.cname().is_none() && ent.get(rtype::AAAA).is_none());
        assert!(NameTable::default().get(b"\x00").is_none());
    }
}
