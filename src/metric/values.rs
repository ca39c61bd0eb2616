//! `sum`, `min` and `max` of a summary metric's value fields.
//!
//! Sums are exact and independent of the order events arrive in (so of
//! the number of workers): each value is counted in millionths as an
//! integer (`i128`), like SQL's `DECIMAL(38, 6)`. A value with more than
//! six decimals is rounded to six; integers and decimals up to about
//! 2⁵³ / 10⁶ in magnitude, beyond which an `f64` holds no sixth decimal,
//! are exact. `min` and `max` keep the value as read. Over no values
//! (the field absent or `null` in every event) all three are `null`.

use serde::{Deserialize, Serialize};

use crate::job::filter::FieldValue;

/// Most distinct value fields one summary metric reads.
pub const SUMMARY_VALUES_MAX: usize = 16;

/// Millionths in one.
const SCALE: i128 = 1_000_000;

/// The aggregate of one value field over a set of events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    /// Values counted (not `null`).
    pub n: u64,
    /// Their sum in millionths.
    pub sum: i128,
    /// Smallest and largest (meaningless while `n` is 0).
    pub min: f64,
    pub max: f64,
}

impl Agg {
    /// Counts one value.
    #[inline]
    pub fn add(&mut self, v: f64) {
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += to_millionths(v);
    }

    /// Takes back a value counted before (`min` and `max` keep it: a
    /// summary over result rows has neither).
    #[inline]
    pub fn take_back(&mut self, v: f64) {
        self.n -= 1;
        self.sum -= to_millionths(v);
    }

    /// Adds another aggregate (of disjoint events).
    #[inline]
    pub fn merge(&mut self, o: &Agg) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            self.min = o.min;
            self.max = o.max;
        } else {
            self.min = self.min.min(o.min);
            self.max = self.max.max(o.max);
        }
        self.n += o.n;
        self.sum += o.sum;
    }

    /// Appends `sum`, `min` or `max` as JSON (`null` over no values).
    pub fn render(&self, what: Which, out: &mut String) {
        if self.n == 0 {
            out.push_str("null");
            return;
        }
        match what {
            Which::Sum => render_millionths(self.sum, out),
            Which::Min => render_f64(self.min, out),
            Which::Max => render_f64(self.max, out),
        }
    }
}

/// Which of an [`Agg`]'s values a measure shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Sum,
    Min,
    Max,
}

/// A field's value as a number: integers and decimals, and strings that
/// hold one (CSV cells); anything else (text, `null`) is no value (NaN).
#[inline]
pub fn number(v: FieldValue) -> f64 {
    match v {
        FieldValue::Int(i) => i as f64,
        FieldValue::Float(f) if f.is_finite() => f,
        FieldValue::Str(s) => std::str::from_utf8(s)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|f| f.is_finite())
            .unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

/// `v` in millionths, rounded: the whole part and the fraction apart, so
/// that large whole values stay exact.
#[inline]
pub fn to_millionths(v: f64) -> i128 {
    let whole = v.trunc();
    let frac = ((v - whole) * SCALE as f64).round();
    whole as i128 * SCALE + frac as i128
}

/// Appends a sum in millionths as a JSON number without trailing zeros:
/// `420.5`, `100`, `-0.000001`.
pub fn render_millionths(m: i128, out: &mut String) {
    if m < 0 {
        out.push('-');
    }
    let a = m.unsigned_abs();
    let (whole, frac) = (a / SCALE as u128, (a % SCALE as u128) as u32);
    out.push_str(itoa::Buffer::new().format(whole));
    if frac != 0 {
        // Six digits with their leading zeros, without the trailing ones.
        let mut buf = itoa::Buffer::new();
        let text = buf.format(frac);
        out.push('.');
        (text.len()..6).for_each(|_| out.push('0'));
        out.push_str(text.trim_end_matches('0'));
    }
}

/// Appends an `f64` as JSON: whole values as integers (`100`), others in
/// their shortest form (`12.5`).
pub fn render_f64(v: f64, out: &mut String) {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        out.push_str(itoa::Buffer::new().format(v as i64));
    } else {
        out.push_str(ryu::Buffer::new().format_finite(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_of(vals: &[f64]) -> String {
        let mut a = Agg::default();
        vals.iter().for_each(|&v| a.add(v));
        let mut s = String::new();
        a.render(Which::Sum, &mut s);
        s
    }

    #[test]
    fn sums_are_exact_decimals_in_any_order() {
        assert_eq!(sum_of(&[0.1, 0.2]), "0.3");
        assert_eq!(sum_of(&[0.2, 0.1]), "0.3");
        assert_eq!(sum_of(&[420.5, 0.25, -0.75]), "420");
        assert_eq!(sum_of(&[123_456_789_012.0, 0.000001]), "123456789012.000001");
        assert_eq!(sum_of(&[-1.5]), "-1.5");
        assert_eq!(sum_of(&[0.05]), "0.05");
        assert_eq!(sum_of(&[2.0001, 1e-6]), "2.000101");
        assert_eq!(sum_of(&[-0.000_01]), "-0.00001");
        assert_eq!(sum_of(&[]), "null");
    }

    #[test]
    fn merge_equals_adding_one_by_one() {
        let (mut a, mut b, mut all) = (Agg::default(), Agg::default(), Agg::default());
        for (i, v) in [3.5, -2.0, 7.25, 0.0, 100.0].into_iter().enumerate() {
            if i % 2 == 0 { &mut a } else { &mut b }.add(v);
            all.add(v);
        }
        let mut empty = Agg::default();
        empty.merge(&Agg::default());
        a.merge(&b);
        a.merge(&empty);
        assert_eq!(a, all);
        let (mut lo, mut hi) = (String::new(), String::new());
        a.render(Which::Min, &mut lo);
        a.render(Which::Max, &mut hi);
        assert_eq!((lo.as_str(), hi.as_str()), ("-2", "100"));
    }

    #[test]
    fn numbers_from_fields() {
        assert_eq!(number(FieldValue::Int(7)), 7.0);
        assert_eq!(number(FieldValue::Str(b"12.5")), 12.5);
        assert!(number(FieldValue::Str(b"gift")).is_nan());
        assert!(number(FieldValue::Null).is_nan());
    }
}
