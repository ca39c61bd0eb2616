//! What a summary over result rows (`format = "rows"`) counted for each
//! upstream row: the layer that makes ADS totals exact when an upstream
//! job restarts and writes rows again.
//!
//! An upstream row is identified by its upsert key (its fingerprint is the
//! record's device fingerprint, so one shard sees every arrival of it, in
//! input order). The first arrival is counted like an event; a later one
//! with the same group key and values changes nothing; one with other
//! values (or another group key: a dimension changed upstream) takes back
//! what the row counted, in the slice it was counted in, and counts the
//! new values. Taking back needs that slice still open: an update whose
//! earlier value was already shipped (its window emitted) is counted as a
//! late update and changes nothing. Entries of a period are forgotten when
//! it closes, like the dedup tables'.

use ahash::AHashMap;
use serde::{Deserialize, Serialize};

/// One upstream row as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    pub fp: u64,
    /// Group key id and slice it was counted in.
    pub key: u32,
    pub slice: u32,
}

/// Every upstream row of the open periods a shard counted, with its values.
#[derive(Debug, Default)]
pub struct Upserts {
    index: AHashMap<u64, u32>,
    rows: Vec<Counted>,
    /// `values` per row, in `rows` order (NaN: none).
    vals: Vec<f64>,
    values: usize,
}

/// What an arriving row is to the rows counted before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    New,
    /// Same group key, same values.
    Unchanged,
    /// Other values or another group key: `at` names the row counted.
    Changed {
        at: usize,
        was: Counted,
    },
}

/// [`Upserts`] as a checkpoint records it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpsertsSaved {
    pub rows: Vec<Counted>,
    pub vals: Vec<f64>,
}

impl Upserts {
    pub fn new(values: usize) -> Upserts {
        Upserts { values, ..Upserts::default() }
    }

    pub fn arrival(&self, fp: u64, key: u32, vals: &[f64]) -> Arrival {
        let Some(&at) = self.index.get(&fp) else {
            return Arrival::New;
        };
        let at = at as usize;
        let was = self.rows[at];
        let same = was.key == key && self.vals(at).iter().zip(vals).all(|(a, b)| a.to_bits() == b.to_bits());
        if same {
            Arrival::Unchanged
        } else {
            Arrival::Changed { at, was }
        }
    }

    /// The values row `at` was counted with.
    pub fn vals(&self, at: usize) -> &[f64] {
        &self.vals[at * self.values..(at + 1) * self.values]
    }

    /// Records what a new row, or a changed one (`at`), was counted as.
    pub fn set(&mut self, at: Option<usize>, counted: Counted, vals: &[f64]) {
        match at {
            Some(at) => {
                self.rows[at] = counted;
                self.vals[at * self.values..(at + 1) * self.values].copy_from_slice(vals);
            }
            None => {
                self.index.insert(counted.fp, self.rows.len() as u32);
                self.rows.push(counted);
                self.vals.extend_from_slice(vals);
            }
        }
    }

    /// Forgets the rows whose slice `open` says is of a closed period.
    pub fn retain(&mut self, open: impl Fn(u32) -> bool) {
        if self.rows.iter().all(|r| open(r.slice)) {
            return;
        }
        let (rows, vals) = (std::mem::take(&mut self.rows), std::mem::take(&mut self.vals));
        self.index.clear();
        for (i, r) in rows.into_iter().enumerate() {
            if open(r.slice) {
                self.set(None, r, &vals[i * self.values..(i + 1) * self.values]);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.rows.capacity() * size_of::<Counted>() + self.vals.capacity() * 8 + self.index.capacity() * 16
    }

    pub fn saved(&self) -> UpsertsSaved {
        UpsertsSaved { rows: self.rows.clone(), vals: self.vals.clone() }
    }

    /// The rows of this shard's checkpoint.
    pub fn extend_from(&mut self, saved: &UpsertsSaved) {
        for (i, r) in saved.rows.iter().enumerate() {
            self.set(None, *r, &saved.vals[i * self.values..(i + 1) * self.values]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_new_unchanged_or_changed() {
        let mut u = Upserts::new(2);
        let a = Counted { fp: 7, key: 1, slice: 10 };
        assert_eq!(u.arrival(7, 1, &[1.0, f64::NAN]), Arrival::New);
        u.set(None, a, &[1.0, f64::NAN]);
        assert_eq!(u.arrival(7, 1, &[1.0, f64::NAN]), Arrival::Unchanged);
        assert_eq!(u.arrival(7, 1, &[2.0, f64::NAN]), Arrival::Changed { at: 0, was: a });
        assert_eq!(u.arrival(7, 2, &[1.0, f64::NAN]), Arrival::Changed { at: 0, was: a });
        u.set(Some(0), Counted { slice: 11, ..a }, &[2.0, 3.0]);
        assert_eq!(u.vals(0), &[2.0, 3.0]);
        u.set(None, Counted { fp: 8, key: 1, slice: 20 }, &[5.0, 6.0]);
        u.retain(|s| s >= 20);
        assert_eq!((u.len(), u.arrival(7, 1, &[2.0, 3.0])), (1, Arrival::New));
        assert_eq!(u.arrival(8, 1, &[5.0, 6.0]), Arrival::Unchanged);
        let mut back = Upserts::new(2);
        back.extend_from(&u.saved());
        assert_eq!(back.arrival(8, 1, &[5.0, 6.0]), Arrival::Unchanged);
    }
}
