//! Fixed-width little-endian binary records: the fastest input path.
//!
//! A binary file is a plain concatenation of [`BinaryRecord`]s (no header).
//! Dimension columns are `u32` codes; [`BINARY_NULL`] marks a missing value.
//! The source's `binary_dims` names the four dimension columns.

use bytemuck::{Pod, Zeroable};

/// Number of dimension columns in a binary record.
pub const BINARY_DIMS: usize = 4;
/// Dimension code meaning "no value" (JSON `null`).
pub const BINARY_NULL: u32 = u32::MAX;
/// Default names of the four dimension columns, as `tally gen` writes them.
pub const BINARY_DIM_NAMES_DEFAULT: [&str; BINARY_DIMS] = ["page", "event", "platform", "app_ver"];

/// One event, 32 bytes, little-endian on disk.
///
/// `did` is the device id as an unsigned integer; its text form (decimal) is
/// what identifies the device, so `123` here is the same device as `"123"`
/// or `123` in a JSON-lines source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BinaryRecord {
    pub ts_ms: i64,
    pub did: u64,
    pub dims: [u32; BINARY_DIMS],
}

/// Size of one record on disk.
pub const BINARY_RECORD_BYTES: usize = std::mem::size_of::<BinaryRecord>();
const _: () = assert!(BINARY_RECORD_BYTES == 32);

use super::{check_ts, EventBuf, Raw, Reject};

/// Decodes one record into `ev`. `slot_of_dim[i]` is the slot dimension
/// column `i` fills, if the job uses it. The device id's decimal text goes
/// to scratch so it hashes like the same id in a text format.
///
/// Values are not reset to null first (as text parsers do): every record
/// writes each slot of a dimension column, a dimension join writes its
/// slots for every event it keeps, and no other slot is ever written.
#[inline]
pub fn decode(rec: &BinaryRecord, slot_of_dim: &[Option<usize>; BINARY_DIMS], ev: &mut EventBuf) -> Result<(), Reject> {
    ev.did = None;
    ev.scratch.clear();
    ev.ts_ms = check_ts(rec.ts_ms)?;
    ev.did = Some(push_decimal(&mut ev.scratch, rec.did));
    for (dim, slot) in slot_of_dim.iter().enumerate() {
        if let Some(slot) = *slot {
            let v = rec.dims[dim];
            ev.values[slot] = if v == BINARY_NULL { Raw::Null } else { Raw::Int(v as i64) };
        }
    }
    Ok(())
}

/// Appends the decimal text of `v` to `scratch`, returns its span.
///
/// Ids of up to 16 digits are built in registers, eight digits at a time
/// with a few multiplications ([`eight_digits`]), and appended as 8 or 16
/// bytes (the span covers the digits). Writing digits to memory two at a time
/// and copying them stalled each record on a load of bytes still being
/// stored, and appending just the digits called `memcpy` (together 15% of
/// a binary run's time). Longer ids take the general way.
#[inline]
fn push_decimal(scratch: &mut Vec<u8>, v: u64) -> Raw {
    /// Eight ASCII zeros.
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    let start = scratch.len() as u32;
    // Little-endian: the leading zeros are the lowest bytes; their count
    // is that of the zero bytes at the bottom once `ZEROS` is taken away.
    let len = if v < 100_000_000 {
        let text = eight_digits(v as u32);
        let zeros = ((text ^ ZEROS).trailing_zeros() / 8).min(7);
        scratch.extend_from_slice(&(text >> (8 * zeros)).to_le_bytes());
        8 - zeros
    } else if v < 10_000_000_000_000_000 {
        let high = eight_digits((v / 100_000_000) as u32);
        let zeros = (high ^ ZEROS).trailing_zeros() / 8;
        let padded = u128::from(high) | u128::from(eight_digits((v % 100_000_000) as u32)) << 64;
        scratch.extend_from_slice(&(padded >> (8 * zeros)).to_le_bytes());
        16 - zeros
    } else {
        let mut buf = itoa::Buffer::new();
        let text = buf.format(v).as_bytes();
        scratch.extend_from_slice(text);
        text.len() as u32
    };
    Raw::Scratch { start, len }
}

/// The eight decimal digits of `n < 10^8` (leading zeros kept) as ASCII,
/// the first digit in the lowest byte: the 4-digit halves, then their
/// 2-digit halves, then digits, side by side in lanes of one u64, each
/// division by 100 or 10 a multiplication and shift exact in that range.
#[inline]
fn eight_digits(n: u32) -> u64 {
    debug_assert!(n < 100_000_000);
    let x = u64::from(n / 10_000) | u64::from(n % 10_000) << 32;
    let hundreds = ((x * 10_486) >> 20) & 0x0000_007F_0000_007F;
    let x = hundreds | (x - hundreds * 100) << 16;
    let tens = ((x * 103) >> 10) & 0x000F_000F_000F_000F;
    let x = tens | (x - tens * 10) << 8;
    x | 0x3030_3030_3030_3030
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_their_decimal_text() {
        let mut ev = EventBuf::new(0);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let edges = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 12_345, u32::MAX as u64, u64::MAX / 10, u64::MAX];
        let randoms = (0..2000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x >> (x % 64)
        });
        for did in edges.into_iter().chain(randoms) {
            let rec = BinaryRecord { ts_ms: 1_700_000_000_000, did, dims: [BINARY_NULL; BINARY_DIMS] };
            decode(&rec, &[None; BINARY_DIMS], &mut ev).unwrap();
            assert_eq!(ev.did_bytes(&[]), did.to_string().as_bytes(), "device id {did}");
        }
    }

    #[test]
    fn eight_digits_are_the_padded_decimal_text() {
        let edges = [0, 1, 9, 10, 99, 100, 9_999, 10_000, 10_001, 99_999_999];
        for n in (0..100_000_000).step_by(997).chain(edges) {
            assert_eq!(eight_digits(n).to_le_bytes(), *format!("{n:08}").as_bytes(), "{n}");
        }
    }
}
