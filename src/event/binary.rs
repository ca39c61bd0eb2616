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
#[inline]
pub fn decode(rec: &BinaryRecord, slot_of_dim: &[Option<usize>; BINARY_DIMS], ev: &mut EventBuf) -> Result<(), Reject> {
    ev.reset();
    ev.ts_ms = check_ts(rec.ts_ms)?;
    let mut buf = itoa::Buffer::new();
    ev.did = Some(ev.push_scratch(buf.format(rec.did).as_bytes()));
    for (dim, slot) in slot_of_dim.iter().enumerate() {
        if let Some(slot) = *slot {
            let v = rec.dims[dim];
            ev.values[slot] = if v == BINARY_NULL { Raw::Null } else { Raw::Int(v as i64) };
        }
    }
    Ok(())
}
