//! The gateway configuration (`serve --config FILE`): arbitrary TOML through parse + validate;
//! an error names a key and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refundgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            config
                .validate()
                .expect("a loaded configuration stays valid");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
