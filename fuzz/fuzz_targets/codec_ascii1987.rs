//! The `ascii1987` codec: decode (and decode_partial, every accessor, the JSON view) of
//! arbitrary bytes; a message that decodes must re-encode (element copies and JSON view) to
//! bytes that decode to the same elements.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::iso8583::ASCII1987;

fuzz_target!(|data: &[u8]| {
    refundgate_fuzz::codec_round_trip(&ASCII1987, data);
});
