//! Sources: where events come from. Each yields blocks of records that the
//! routers parse.

pub mod file;
pub mod kafka;
pub mod stream;
pub mod tail;
pub mod tcp;
pub mod throttle;
