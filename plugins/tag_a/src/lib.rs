//! `tag_a`: version "a" of a two-version fixture for hot-reload tests (see
//! `../../tag_common.rs`).

const TAG: &str = "a";

include!("../../tag_common.rs");
