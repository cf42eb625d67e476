//! The `iso87b` codec (BCD MTI, numerics and lengths, binary bitmaps, BER-TLV DE55) and the
//! EBCDIC test dialect `fixtures/iso87b/ebcdic500.toml` (EBCDIC MTI, hex bitmap, lengths and
//! characters): the same bytes through both, each as `codec_ascii1987`.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use refundgate::iso8583::{Spec, ISO87B};

static EBCDIC500: LazyLock<Spec> = LazyLock::new(|| {
    Spec::from_toml(
        "ebcdic500.toml",
        include_str!("../../fixtures/iso87b/ebcdic500.toml"),
    )
    .unwrap()
});

fuzz_target!(|data: &[u8]| {
    refundgate_fuzz::codec_round_trip(&ISO87B, data);
    refundgate_fuzz::codec_round_trip(&EBCDIC500, data);
});
