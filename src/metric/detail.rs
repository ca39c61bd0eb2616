//! The minute-dedup detail stream of a DAU metric: one row per (source,
//! step, group key, device) the minute dedup passed, for a
//! `kind = "minute_devices"` sink.
//!
//! A shard collects the rows of its open slices in [`Details`] (per slice,
//! the ids of a slice in one arena: no allocation per row) and ships a
//! slice's rows when it ships the slice's counters; the emitter holds them
//! until the job's watermark passes the slice, then they are written in a
//! fixed order, so the output does not depend on the number of workers.

use std::collections::BTreeMap;
use std::io;

use serde::{Deserialize, Serialize};

/// One row of a slice: the source, the group key id, and where the device
/// id ends in the arena (it starts where the previous row's ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailRow {
    pub source: u32,
    pub key: u32,
    pub end: u32,
}

/// The rows of one slice with their device ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetailBuf {
    pub rows: Vec<DetailRow>,
    pub ids: Vec<u8>,
}

impl DetailBuf {
    #[inline]
    pub fn push(&mut self, source: u32, key: u32, id: &[u8]) -> io::Result<()> {
        self.ids.extend_from_slice(id);
        let end = u32::try_from(self.ids.len())
            .map_err(|_| io::Error::other("minute_devices: over 4 GiB of device ids in one step"))?;
        self.rows.push(DetailRow { source, key, end });
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The device id of row `i`.
    #[inline]
    pub fn id(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.rows[i - 1].end as usize };
        &self.ids[start..self.rows[i].end as usize]
    }

    /// Every row with its device id.
    pub fn iter(&self) -> impl Iterator<Item = (&DetailRow, &[u8])> {
        (0..self.rows.len()).map(|i| (&self.rows[i], self.id(i)))
    }

    /// Appends another buffer's rows.
    pub fn append(&mut self, other: &DetailBuf) -> io::Result<()> {
        for (r, id) in other.iter() {
            self.push(r.source, r.key, id)?;
        }
        Ok(())
    }
}

/// Rows by slice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    pub slices: BTreeMap<u32, DetailBuf>,
}

impl Details {
    #[inline]
    pub fn push(&mut self, slice: u32, source: u32, key: u32, id: &[u8]) -> io::Result<()> {
        self.slices.entry(slice).or_default().push(source, key, id)
    }

    /// Adds a shipped slice's rows.
    pub fn add(&mut self, slice: u32, buf: DetailBuf) -> io::Result<()> {
        match self.slices.get_mut(&slice) {
            Some(into) => into.append(&buf),
            None => {
                self.slices.insert(slice, buf);
                Ok(())
            }
        }
    }

    /// Takes the slices, in order, while `done(slice)` holds.
    pub fn take_while(&mut self, done: impl Fn(u32) -> bool) -> Vec<(u32, DetailBuf)> {
        let mut out = Vec::new();
        while let Some(entry) = self.slices.first_entry() {
            if !done(*entry.key()) {
                break;
            }
            let (slice, buf) = entry.remove_entry();
            out.push((slice, buf));
        }
        out
    }

    /// Every row with its slice and device id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &DetailRow, &[u8])> {
        self.slices.iter().flat_map(|(&s, b)| b.iter().map(move |(r, id)| (s, r, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_come_out_in_order_with_their_ids() {
        let mut d = Details::default();
        for i in 0..10u32 {
            d.push(5 - i % 3, i, i * 2, format!("dev{i}").as_bytes()).unwrap();
        }
        let taken = d.take_while(|s| s <= 4);
        assert_eq!(taken.iter().map(|(s, b)| (*s, b.len())).collect::<Vec<_>>(), [(3, 3), (4, 3)]);
        let ids: Vec<String> =
            taken[0].1.iter().map(|(r, id)| format!("{}:{}", r.source, std::str::from_utf8(id).unwrap())).collect();
        assert_eq!(ids, ["2:dev2", "5:dev5", "8:dev8"]);
        assert_eq!(d.iter().count(), 4);
        let mut more = DetailBuf::default();
        more.push(99, 0, b"x").unwrap();
        d.add(5, more).unwrap();
        assert_eq!(d.slices[&5].len(), 5);
        assert_eq!(d.slices[&5].id(4), b"x");
    }
}
