//! Log offset arithmetic: every chunk is a duplicate, a gap or an append of
//! exactly the bytes past the committed length, at any u64.
#![no_main]

use hobotnica_common::logs::{AppendPlan, plan_append};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u64, u64, u32)| {
    let (committed, offset, len) = input;
    let len = len as usize;
    let end = offset.saturating_add(len as u64);
    match plan_append(committed, offset, len) {
        AppendPlan::Gap => assert!(offset > committed),
        AppendPlan::Duplicate => assert!(offset <= committed && end <= committed),
        AppendPlan::Append { skip } => {
            assert!(offset <= committed && end > committed);
            assert!(skip < len);
            assert_eq!(offset + skip as u64, committed);
        }
    }
});
