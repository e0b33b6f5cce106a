//! Fuzz the ClientHello parser and check its invariants, not only "no panic":
//! - a verdict other than NeedMore is final: more bytes never change it;
//! - Done never claims more bytes than it was given, and every prefix shorter than the hello
//!   needs more;
//! - a name it returns is a valid, normalised host name.
#![no_main]

use gateway_proto::clienthello::{parse, ServerName, Verdict};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data, CAP);
    match &verdict {
        Verdict::NeedMore => assert!(data.len() < CAP),
        Verdict::Reject(_) => {
            let mut longer = data.to_vec();
            longer.extend_from_slice(&[0x16, 3, 1, 0, 1, 1]);
            assert_eq!(parse(&longer, CAP), verdict);
        }
        Verdict::Done(hello) => {
            assert!(hello.hello_bytes <= data.len());
            let mut longer = data.to_vec();
            longer.push(0);
            assert_eq!(parse(&longer, CAP), verdict);
            for end in [0, hello.hello_bytes / 2, hello.hello_bytes.saturating_sub(1)] {
                if end < hello.hello_bytes {
                    assert_eq!(parse(&data[..end], CAP), Verdict::NeedMore, "prefix {end}");
                }
            }
            if let Some(name) = &hello.server_name {
                let text = name.as_str();
                assert_eq!(ServerName::parse(text.as_bytes()).as_ref(), Ok(name));
                assert_eq!(text.to_ascii_lowercase(), text);
                assert!(!text.ends_with('.'));
            }
        }
    }
});
