//! The `cup_pos` codec (BCD MTI and lengths, binary bitmap): as `codec_ascii1987`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::iso8583::CUP_POS;

fuzz_target!(|data: &[u8]| {
    refundgate_fuzz::codec_round_trip(&CUP_POS, data);
});
