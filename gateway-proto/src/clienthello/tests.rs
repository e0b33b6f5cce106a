//! Tests of the ClientHello parser: a corpus captured from real clients (testdata/), a
//! builder for hand-made hellos, every reject reason, re-framing, and property tests.

use super::*;
use proptest::prelude::*;

const CAP: usize = DEFAULT_MAX_HELLO_BYTES;

/// A captured hello with what its manifest says it carries.
struct Capture {
    file: String,
    bytes: Vec<u8>,
    sni: Option<String>,
    alpn: Option<String>,
    records: usize,
}

fn corpus() -> Vec<Capture> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/clienthello");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.tsv")).expect("manifest");
    let captures: Vec<Capture> = manifest
        .lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let columns: Vec<&str> = line.split('\t').collect();
            let optional = |v: &str| (v != "-").then(|| v.to_owned());
            Capture {
                file: columns[0].to_owned(),
                bytes: std::fs::read(dir.join(columns[0])).expect("capture file"),
                sni: optional(columns[3]),
                alpn: optional(columns[4]),
                records: columns[6].parse().expect("record count"),
            }
        })
        .collect();
    assert!(
        captures.len() >= 10,
        "the corpus shrank: {}",
        captures.len()
    );
    captures
}

fn done(input: &[u8]) -> ClientHello {
    match parse(input, CAP) {
        Verdict::Done(hello) => hello,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn rejected(input: &[u8]) -> Reject {
    match parse(input, CAP) {
        Verdict::Reject(reason) => reason,
        other => panic!("expected Reject, got {other:?}"),
    }
}

#[test]
fn real_clients_parse_with_the_expected_name_and_alpn() {
    for capture in corpus() {
        let hello = done(&capture.bytes);
        assert_eq!(
            hello.server_name.as_ref().map(|n| n.as_str().to_owned()),
            capture.sni,
            "{}",
            capture.file
        );
        let first_alpn = capture
            .alpn
            .as_deref()
            .map(|list| list.split(',').next().unwrap_or("").to_owned());
        let parsed_alpn = hello
            .alpn
            .as_ref()
            .map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned());
        match (&first_alpn, &parsed_alpn) {
            (Some(expected), Some(parsed)) => {
                assert!(expected.starts_with(parsed.as_str()), "{}", capture.file)
            }
            (None, None) => {}
            _ => panic!("{}: ALPN {first_alpn:?} vs {parsed_alpn:?}", capture.file),
        }
        assert_eq!(hello.hello_bytes, capture.bytes.len(), "{}", capture.file);
        assert_eq!(
            records(&capture.bytes).len(),
            capture.records,
            "{}",
            capture.file
        );
    }
}

#[test]
fn every_prefix_of_a_real_hello_needs_more_then_the_same_answer() {
    for capture in corpus() {
        let full = parse(&capture.bytes, CAP);
        for end in 0..capture.bytes.len() {
            assert_eq!(
                parse(&capture.bytes[..end], CAP),
                Verdict::NeedMore,
                "{} prefix {end}",
                capture.file
            );
        }
        assert!(matches!(full, Verdict::Done(_)), "{}", capture.file);
    }
}

#[test]
fn re_split_into_small_records_gives_the_same_answer() {
    for capture in corpus() {
        let original = done(&capture.bytes);
        for size in [1, 2, 3, 7, 100, 511] {
            let reframed = reframe(&capture.bytes, size);
            if reframed.len() >= CAP {
                assert_eq!(parse(&reframed, CAP), Verdict::Reject(Reject::TooLarge));
                continue;
            }
            let hello = done(&reframed);
            assert_eq!(
                hello.server_name, original.server_name,
                "{} / {size}",
                capture.file
            );
            assert_eq!(hello.alpn, original.alpn, "{} / {size}", capture.file);
            assert_eq!(hello.hello_bytes, reframed.len());
        }
    }
}

#[test]
fn bytes_after_the_hello_are_not_part_of_it() {
    let capture = &corpus()[0];
    let mut flight = capture.bytes.clone();
    flight.extend_from_slice(&[23, 3, 3, 0, 4, 1, 2, 3, 4]); // early data record
    let hello = done(&flight);
    assert_eq!(hello.hello_bytes, capture.bytes.len());
}

#[test]
fn the_size_cap_is_enforced_early_and_on_buffered_bytes() {
    let large = corpus()
        .into_iter()
        .find(|c| c.bytes.len() > 16 * 1024)
        .expect("the corpus has a hello over 16 KiB");
    assert!(matches!(parse(&large.bytes, CAP), Verdict::Done(_)));
    // Rejected as soon as the handshake header announces a length over the cap.
    assert_eq!(
        parse(&large.bytes[..9], 4096),
        Verdict::Reject(Reject::TooLarge)
    );
    // A hello split into 1-byte records grows six-fold on the wire: over the cap too.
    let reframed = reframe(&large.bytes, 1);
    assert_eq!(parse(&reframed, CAP), Verdict::Reject(Reject::TooLarge));
}

// ---- The builder: hand-made ClientHellos. ----

#[derive(Clone, Debug)]
struct Builder {
    version: u16,
    session_id: Vec<u8>,
    cipher_suites: Vec<u16>,
    compression: Vec<u8>,
    extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Builder {
    fn with_sni(name: &[u8]) -> Builder {
        Builder {
            version: 0x0303,
            session_id: vec![7; 32],
            cipher_suites: vec![0x1301, 0x1302, 0xc02b],
            compression: vec![0],
            extensions: Some(vec![
                (0x0a0a, vec![]), // GREASE, empty
                (EXTENSION_SERVER_NAME, server_name_list(&[(0, name)])),
                (EXTENSION_ALPN, alpn_list(&[b"h2", b"http/1.1"])),
                (
                    EXTENSION_SUPPORTED_VERSIONS,
                    vec![4, 0x03, 0x04, 0x03, 0x03],
                ),
                (21, vec![0; 10]), // padding
            ]),
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.version.to_be_bytes());
        body.extend_from_slice(&[0x42; 32]);
        body.push(self.session_id.len() as u8);
        body.extend_from_slice(&self.session_id);
        body.extend_from_slice(&((self.cipher_suites.len() * 2) as u16).to_be_bytes());
        for suite in &self.cipher_suites {
            body.extend_from_slice(&suite.to_be_bytes());
        }
        body.push(self.compression.len() as u8);
        body.extend_from_slice(&self.compression);
        if let Some(extensions) = &self.extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend_from_slice(&kind.to_be_bytes());
                block.extend_from_slice(&(data.len() as u16).to_be_bytes());
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&(block.len() as u16).to_be_bytes());
            body.extend_from_slice(&block);
        }
        body
    }

    fn handshake(&self) -> Vec<u8> {
        handshake_message(HANDSHAKE_CLIENT_HELLO, &self.body())
    }

    fn record(&self) -> Vec<u8> {
        reframe_stream(&self.handshake(), MAX_RECORD_PAYLOAD)
    }
}

fn handshake_message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut message = vec![kind];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(body);
    message
}

fn server_name_list(names: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in names {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

fn alpn_list(protocols: &[&[u8]]) -> Vec<u8> {
    let mut list = Vec::new();
    for protocol in protocols {
        list.push(protocol.len() as u8);
        list.extend_from_slice(protocol);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

/// Split a handshake byte stream into handshake records of at most `size` bytes.
fn reframe_stream(stream: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in stream.chunks(size) {
        out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The payloads of the records in `input`.
fn records(input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 5 <= input.len() {
        let len = usize::from(u16::from_be_bytes([input[offset + 3], input[offset + 4]]));
        out.push(&input[offset + 5..offset + 5 + len]);
        offset += 5 + len;
    }
    out
}

/// Re-frame a captured flight's handshake stream into records of `size` bytes.
fn reframe(input: &[u8], size: usize) -> Vec<u8> {
    let stream: Vec<u8> = records(input).concat();
    reframe_stream(&stream, size)
}

fn with_extensions(extensions: Vec<(u16, Vec<u8>)>) -> Vec<u8> {
    let mut builder = Builder::with_sni(b"a.test");
    builder.extensions = Some(extensions);
    builder.record()
}

#[test]
fn built_hellos_parse() {
    let hello = done(&Builder::with_sni(b"Web.Example.COM.").record());
    assert_eq!(hello.server_name.expect("sni").as_str(), "web.example.com");
    assert_eq!(hello.alpn.expect("alpn").as_bytes(), b"h2");
    assert!(hello.offers_tls13);
}

#[test]
fn a_hello_without_extensions_has_no_name() {
    let mut builder = Builder::with_sni(b"a.test");
    builder.extensions = None;
    assert_eq!(done(&builder.record()).server_name, None);
}

#[test]
fn non_tls_first_bytes_are_refused() {
    assert_eq!(
        rejected(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        Reject::NotTls
    );
    assert_eq!(
        rejected(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        Reject::NotTls
    );
    assert_eq!(
        rejected(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
        Reject::NotTls
    );
    assert_eq!(
        rejected(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
        Reject::Sslv2Hello
    );
    assert_eq!(
        rejected(&[21, 3, 3, 0, 2, 2, 40]),
        Reject::NotHandshakeRecord
    );
    assert_eq!(rejected(&[20, 3, 3, 0, 1, 1]), Reject::NotHandshakeRecord);
}

#[test]
fn record_layer_violations_are_refused() {
    let hello = Builder::with_sni(b"a.test").handshake();
    // A non-handshake record inside the hello.
    let mut flight = reframe_stream(&hello[..10], 10);
    flight.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
    assert_eq!(rejected(&flight), Reject::NotHandshakeRecord);
    // An empty handshake record.
    let mut flight = reframe_stream(&hello[..10], 10);
    flight.extend_from_slice(&[22, 3, 1, 0, 0]);
    assert_eq!(rejected(&flight), Reject::EmptyRecord);
    assert_eq!(rejected(&[22, 3, 1, 0, 0]), Reject::EmptyRecord);
    // A record over 2^14 bytes.
    assert_eq!(rejected(&[22, 3, 1, 0x40, 0x01]), Reject::BadRecord);
    // A record version that is not TLS.
    assert_eq!(rejected(&[22, 2, 0, 0, 5]), Reject::BadRecord);
    // A handshake message that is not a ClientHello (ServerHello).
    assert_eq!(
        rejected(&reframe_stream(&handshake_message(2, &[0; 40]), 100)),
        Reject::NotClientHello
    );
}

#[test]
fn lengths_that_do_not_fit_are_refused() {
    let body = Builder::with_sni(b"a.test").body();
    // The handshake length claims one byte less than the body: the extension block overruns.
    let mut short = handshake_message(HANDSHAKE_CLIENT_HELLO, &body);
    let declared = body.len() - 1;
    short[1..4].copy_from_slice(&(declared as u32).to_be_bytes()[1..]);
    short.pop();
    assert_eq!(rejected(&reframe_stream(&short, 16384)), Reject::Malformed);
    // A body with a trailing byte after the extensions.
    let mut long_body = body.clone();
    long_body.push(0);
    assert_eq!(
        rejected(&reframe_stream(&handshake_message(1, &long_body), 16384)),
        Reject::Malformed
    );
    // An extension whose length overruns the block.
    let mut bad = Builder::with_sni(b"a.test");
    bad.extensions = Some(vec![(
        EXTENSION_SERVER_NAME,
        server_name_list(&[(0, b"a.test")]),
    )]);
    let mut bytes = bad.handshake();
    let len_at = bytes.len() - server_name_list(&[(0, b"a.test")]).len() - 2;
    bytes[len_at + 1] += 1;
    assert_eq!(rejected(&reframe_stream(&bytes, 16384)), Reject::Malformed);
    // Inner lengths that do not match their container.
    let mut inner = server_name_list(&[(0, b"a.test")]);
    inner[1] += 1;
    assert_eq!(
        rejected(&with_extensions(vec![(EXTENSION_SERVER_NAME, inner)])),
        Reject::Malformed
    );
    assert_eq!(
        rejected(&with_extensions(vec![(EXTENSION_SERVER_NAME, vec![])])),
        Reject::Malformed
    );
    assert_eq!(
        rejected(&with_extensions(vec![(EXTENSION_ALPN, vec![0, 1, 0])])),
        Reject::Malformed
    );
    // Field ranges: session id over 32, odd cipher suite bytes, no compression method.
    let mut builder = Builder::with_sni(b"a.test");
    builder.session_id = vec![0; 33];
    assert_eq!(rejected(&builder.record()), Reject::Malformed);
    let mut builder = Builder::with_sni(b"a.test");
    builder.compression = vec![];
    assert_eq!(rejected(&builder.record()), Reject::Malformed);
    let mut builder = Builder::with_sni(b"a.test");
    builder.cipher_suites = vec![];
    assert_eq!(rejected(&builder.record()), Reject::Malformed);
}

#[test]
fn duplicates_are_refused() {
    let sni = server_name_list(&[(0, b"a.test")]);
    assert_eq!(
        rejected(&with_extensions(vec![
            (0, sni.clone()),
            (16, alpn_list(&[b"h2"])),
            (0, sni)
        ])),
        Reject::DuplicateExtension
    );
    assert_eq!(
        rejected(&with_extensions(vec![(
            0,
            server_name_list(&[(0, b"a.test"), (0, b"b.test")])
        )])),
        Reject::DuplicateHostName
    );
    // An unknown name type next to a host_name is skipped.
    let hello = done(&with_extensions(vec![(
        0,
        server_name_list(&[(7, b"opaque"), (0, b"b.test")]),
    )]));
    assert_eq!(hello.server_name.expect("sni").as_str(), "b.test");
}

#[test]
fn many_distinct_extensions_are_fine_and_a_late_duplicate_is_caught() {
    let mut extensions: Vec<(u16, Vec<u8>)> = (100..300).map(|t| (t, vec![])).collect();
    extensions.push((0, server_name_list(&[(0, b"a.test")])));
    assert!(matches!(
        parse(&with_extensions(extensions.clone()), CAP),
        Verdict::Done(_)
    ));
    extensions.push((250, vec![]));
    assert_eq!(
        rejected(&with_extensions(extensions)),
        Reject::DuplicateExtension
    );
}

#[test]
fn bad_host_names_are_refused() {
    let long = vec![b'a'; 254];
    let label = [vec![b'a'; 64], b".test".to_vec()].concat();
    for (name, reason) in [
        (&b""[..], Reject::InvalidHostName),
        (&long[..], Reject::InvalidHostName),
        (&label[..], Reject::InvalidHostName),
        (b"a\0.test", Reject::InvalidHostName),
        (b"a_b.test", Reject::InvalidHostName),
        (b"a..test", Reject::InvalidHostName),
        (b".", Reject::InvalidHostName),
        (b"*.test", Reject::InvalidHostName),
        (b"caf\xc3\xa9.test", Reject::InvalidHostName),
        (b"10.0.0.1", Reject::IpLiteralHostName),
        (b"::1", Reject::InvalidHostName),
    ] {
        let reject = rejected(&with_extensions(vec![(0, server_name_list(&[(0, name)]))]));
        assert_eq!(reject, reason, "{:?}", String::from_utf8_lossy(name));
    }
    // 253 characters plus a trailing dot is the longest valid name.
    let longest = [
        vec![b'a'; 63],
        vec![b'.'],
        vec![b'b'; 63],
        vec![b'.'],
        vec![b'c'; 63],
        vec![b'.'],
        vec![b'd'; 61],
        vec![b'.'],
    ]
    .concat();
    let hello = done(&with_extensions(vec![(
        0,
        server_name_list(&[(0, &longest)]),
    )]));
    assert_eq!(hello.server_name.expect("sni").as_str().len(), 253);
}

#[test]
fn ech_routes_on_the_outer_name() {
    let mut builder = Builder::with_sni(b"public.example.com");
    if let Some(extensions) = &mut builder.extensions {
        extensions.push((EXTENSION_ECH, vec![0, 0, 1, 0, 1, 0x42, 0, 0, 0, 0]));
    }
    let hello = done(&builder.record());
    assert!(hello.offers_ech);
    assert_eq!(
        hello.server_name.expect("sni").as_str(),
        "public.example.com"
    );
}

// ---- Properties. ----

fn host_name() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 1..5).prop_map(|labels| labels.join("."))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any built hello, framed into any record sizes and with GREASE and unknown extensions in
    /// any order, parses to its name; every prefix needs more.
    #[test]
    fn built_hellos_round_trip(
        name in host_name(),
        upper in any::<bool>(),
        record_size in 1usize..400,
        extra in prop::collection::vec((1000u16..2000, prop::collection::vec(any::<u8>(), 0..20)), 0..8),
        sni_position in 0usize..8,
    ) {
        let mut builder = Builder::with_sni(name.as_bytes());
        if upper {
            builder = Builder::with_sni(name.to_ascii_uppercase().as_bytes());
        }
        if let Some(extensions) = &mut builder.extensions {
            let sni = extensions.remove(1);
            let mut seen = std::collections::HashSet::new();
            for (kind, data) in extra {
                if seen.insert(kind) {
                    extensions.push((kind, data));
                }
            }
            let at = sni_position.min(extensions.len());
            extensions.insert(at, sni);
        }
        let flight = reframe_stream(&builder.handshake(), record_size);
        let hello = match parse(&flight, CAP) {
            Verdict::Done(hello) => hello,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        let parsed = hello.server_name.expect("sni");
        prop_assert_eq!(parsed.as_str(), name.as_str());
        for end in (0..flight.len()).step_by(7) {
            prop_assert_eq!(parse(&flight[..end], CAP), Verdict::NeedMore);
        }
    }

    /// Arbitrary bytes never panic, and a verdict other than NeedMore is final: it does not
    /// change when more bytes arrive.
    #[test]
    fn verdicts_are_final(bytes in prop::collection::vec(any::<u8>(), 0..600), more in prop::collection::vec(any::<u8>(), 0..50)) {
        let first = parse(&bytes, CAP);
        let mut longer = bytes.clone();
        longer.extend_from_slice(&more);
        match first {
            Verdict::NeedMore => {}
            Verdict::Reject(reason) => prop_assert_eq!(parse(&longer, CAP), Verdict::Reject(reason)),
            Verdict::Done(hello) => {
                prop_assert!(hello.hello_bytes <= bytes.len());
                prop_assert_eq!(parse(&longer, CAP), Verdict::Done(hello));
            }
        }
    }

    /// Corrupting one byte of a real hello never panics and never yields a name that is not
    /// a valid normalised host name.
    #[test]
    fn corrupted_real_hellos_stay_safe(index in any::<prop::sample::Index>(), byte in any::<u8>(), which in 0usize..10) {
        let captures = corpus();
        let capture = &captures[which % captures.len()];
        let mut bytes = capture.bytes.clone();
        let at = index.index(bytes.len());
        bytes[at] = byte;
        if let Verdict::Done(hello) = parse(&bytes, CAP) {
            if let Some(name) = hello.server_name {
                prop_assert!(ServerName::parse(name.as_str().as_bytes()).is_ok());
                prop_assert_eq!(name.as_str().to_ascii_lowercase(), name.as_str());
            }
        }
    }
}

/// The fuzz target's invariants, replayed over its committed corpus (seeds and every crasher
/// ever found), so a fixed crash stays fixed without nightly.
#[test]
fn fuzz_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/clienthello");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz corpus") {
        let data = std::fs::read(entry.expect("entry").path()).expect("read");
        let cap = 16 * 1024;
        match parse(&data, cap) {
            Verdict::NeedMore => assert!(data.len() < cap),
            Verdict::Reject(reason) => {
                let mut longer = data.clone();
                longer.extend_from_slice(&[0x16, 3, 1, 0, 1, 1]);
                assert_eq!(parse(&longer, cap), Verdict::Reject(reason));
            }
            Verdict::Done(hello) => {
                assert!(hello.hello_bytes <= data.len());
                if let Some(name) = &hello.server_name {
                    assert_eq!(
                        ServerName::parse(name.as_str().as_bytes()).as_ref(),
                        Ok(name)
                    );
                }
            }
        }
        count += 1;
    }
    assert!(count >= 10, "corpus has {count} files");
}
