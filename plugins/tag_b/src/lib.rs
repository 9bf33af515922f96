//! `tag_b`: version "b" of a two-version fixture for hot-reload tests (see
//! `../../tag_common.rs`).

const TAG: &str = "b";

include!("../../tag_common.rs");
