//! TLS ClientHello bytes: building synthetic ones so that the bench works without captured
//! hellos, and reading them with the gateway's own parser (`gateway-proto`), so the bench
//! and the gateway cannot disagree on where a hello ends or what it names.
//!
//! Everything here is sans-IO: plain functions over byte slices.

use gateway_proto::clienthello::{self, Reject, Verdict};

/// RFC 8446 §5.1: "The length MUST NOT exceed 2^14 bytes."
pub const MAX_RECORD_PAYLOAD: usize = clienthello::MAX_RECORD_PAYLOAD;
/// The largest ClientHello we accept: the gateway's default cap.
pub const MAX_CLIENT_HELLO: usize = clienthello::DEFAULT_MAX_HELLO_BYTES;
const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
/// TLSPlaintext.type for handshake records (RFC 8446 §5.1, `handshake(22)`).
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// HandshakeType `client_hello(1)` (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// Returns the offset just past the record that completes the first ClientHello in `stream`,
/// `Ok(None)` if more bytes are needed, or why the stream is not a ClientHello.
pub fn client_hello_end(stream: &[u8]) -> Result<Option<usize>, Reject> {
    match clienthello::parse(stream, MAX_CLIENT_HELLO) {
        Verdict::NeedMore => Ok(None),
        Verdict::Done(hello) => Ok(Some(hello.hello_bytes)),
        Verdict::Reject(reason) => Err(reason),
    }
}

/// The `host_name` of a complete ClientHello (records included), or `None` if it has none or
/// is not a ClientHello the gateway would route.
pub fn server_name(stream: &[u8]) -> Option<String> {
    match clienthello::parse(stream, MAX_CLIENT_HELLO) {
        Verdict::Done(hello) => hello.server_name.map(|name| name.as_str().to_owned()),
        Verdict::NeedMore | Verdict::Reject(_) => None,
    }
}

const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_SUPPORTED_GROUPS: u16 = 10;
const EXTENSION_EC_POINT_FORMATS: u16 = 11;
const EXTENSION_SIGNATURE_ALGORITHMS: u16 = 13;
const EXTENSION_ALPN: u16 = 16;
const EXTENSION_PADDING: u16 = 21;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
const EXTENSION_PSK_MODES: u16 = 45;
const EXTENSION_KEY_SHARE: u16 = 51;
const GROUP_X25519: u16 = 0x001d;
/// X25519MLKEM768 (draft-kwiatkowski-tls-ecdhe-mlkem): 1184-byte ML-KEM key + 32-byte X25519.
const GROUP_X25519_MLKEM768: u16 = 0x11ec;
const X25519_MLKEM768_SHARE: usize = 1184 + 32;

/// What [`build_client_hello`] should produce.
#[derive(Debug, Clone)]
pub struct HelloSpec {
    pub server_name: String,
    /// Total size on the wire, record headers included; 0 means the natural size. Sizes between
    /// the natural size and natural + 4 round up to natural + 4 (the padding extension header).
    pub size: usize,
    /// Add an X25519MLKEM768 key share like current browsers and rustls (~1.2 KiB more).
    pub post_quantum: bool,
    /// Split the handshake message into records of at most this many bytes (1..=2^14).
    pub fragment: usize,
}

impl HelloSpec {
    pub fn new(server_name: &str) -> HelloSpec {
        HelloSpec {
            server_name: server_name.to_owned(),
            size: 0,
            post_quantum: false,
            fragment: MAX_RECORD_PAYLOAD,
        }
    }
}

fn push_u16(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(&u16::try_from(value).unwrap_or(u16::MAX).to_be_bytes());
}

fn push_extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    push_u16(out, body.len());
    out.extend_from_slice(body);
}

/// Deterministic filler for random, session id and key shares: a proxy never looks at them.
fn filler(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Builds a syntactically valid TLS 1.3 ClientHello (as a browser or rustls would send it) with
/// the given server name, wrapped in handshake records.
pub fn build_client_hello(spec: &HelloSpec) -> Vec<u8> {
    let natural = hello_body(spec, None);
    let body = if spec.size == 0 {
        natural
    } else {
        let wire = wire_size(natural.len(), spec.fragment);
        if spec.size <= wire {
            natural
        } else {
            // Grow the padding until the wire size reaches the target; record headers of
            // extra fragments make this a small fixed-point search.
            let fragment = spec.fragment.clamp(1, MAX_RECORD_PAYLOAD);
            let extra_headers = RECORD_HEADER * (spec.size / fragment + 1);
            let mut padding = (spec.size - wire).saturating_sub(4 + extra_headers);
            loop {
                let body = hello_body(spec, Some(padding));
                if wire_size(body.len(), spec.fragment) >= spec.size {
                    break body;
                }
                padding += 1;
            }
        }
    };
    let mut message = vec![HANDSHAKE_CLIENT_HELLO];
    message.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    into_records(&message, spec.fragment)
}

fn wire_size(body: usize, fragment: usize) -> usize {
    let message = body + HANDSHAKE_HEADER;
    message + RECORD_HEADER * message.div_ceil(fragment.clamp(1, MAX_RECORD_PAYLOAD))
}

/// Wraps a handshake message into handshake records of at most `fragment` bytes each.
pub fn into_records(message: &[u8], fragment: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + RECORD_HEADER * 4);
    for (index, chunk) in message
        .chunks(fragment.clamp(1, MAX_RECORD_PAYLOAD))
        .enumerate()
    {
        out.push(CONTENT_TYPE_HANDSHAKE);
        // legacy_record_version: 0x0301 on the first ClientHello record for compatibility
        // (RFC 8446 §5.1), 0x0303 is also common; use what browsers send.
        out.extend_from_slice(if index == 0 { &[3, 1] } else { &[3, 3] });
        push_u16(&mut out, chunk.len());
        out.extend_from_slice(chunk);
    }
    out
}

fn hello_body(spec: &HelloSpec, padding: Option<usize>) -> Vec<u8> {
    let mut body = vec![3, 3]; // legacy_version TLS 1.2
    body.extend_from_slice(&filler(32, 7)); // random
    body.push(32);
    body.extend_from_slice(&filler(32, 11)); // legacy_session_id
    let suites: [u16; 9] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8,
    ];
    push_u16(&mut body, suites.len() * 2);
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // legacy_compression_methods: null

    let mut extensions = Vec::new();
    let name = spec.server_name.as_bytes();
    let mut sni = Vec::new();
    push_u16(&mut sni, name.len() + 3);
    sni.push(0); // name_type host_name
    push_u16(&mut sni, name.len());
    sni.extend_from_slice(name);
    push_extension(&mut extensions, EXTENSION_SERVER_NAME, &sni);

    let mut groups_list = vec![GROUP_X25519, 0x0017, 0x0018];
    if spec.post_quantum {
        groups_list.insert(0, GROUP_X25519_MLKEM768);
    }
    let mut groups = Vec::new();
    push_u16(&mut groups, groups_list.len() * 2);
    for group in groups_list {
        groups.extend_from_slice(&group.to_be_bytes());
    }
    push_extension(&mut extensions, EXTENSION_SUPPORTED_GROUPS, &groups);
    push_extension(&mut extensions, EXTENSION_EC_POINT_FORMATS, &[1, 0]);

    let schemes: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];
    let mut signatures = Vec::new();
    push_u16(&mut signatures, schemes.len() * 2);
    for scheme in schemes {
        signatures.extend_from_slice(&scheme.to_be_bytes());
    }
    push_extension(&mut extensions, EXTENSION_SIGNATURE_ALGORITHMS, &signatures);

    let mut alpn = Vec::new();
    push_u16(&mut alpn, 3 + 9);
    alpn.push(2);
    alpn.extend_from_slice(b"h2");
    alpn.push(8);
    alpn.extend_from_slice(b"http/1.1");
    push_extension(&mut extensions, EXTENSION_ALPN, &alpn);
    push_extension(
        &mut extensions,
        EXTENSION_SUPPORTED_VERSIONS,
        &[4, 0x03, 0x04, 0x03, 0x03],
    );
    push_extension(&mut extensions, EXTENSION_PSK_MODES, &[1, 1]);

    let mut shares = Vec::new();
    if spec.post_quantum {
        shares.extend_from_slice(&GROUP_X25519_MLKEM768.to_be_bytes());
        push_u16(&mut shares, X25519_MLKEM768_SHARE);
        shares.extend_from_slice(&filler(X25519_MLKEM768_SHARE, 13));
    }
    shares.extend_from_slice(&GROUP_X25519.to_be_bytes());
    push_u16(&mut shares, 32);
    shares.extend_from_slice(&filler(32, 17));
    let mut key_share = Vec::new();
    push_u16(&mut key_share, shares.len());
    key_share.extend_from_slice(&shares);
    push_extension(&mut extensions, EXTENSION_KEY_SHARE, &key_share);

    if let Some(padding) = padding {
        // RFC 7685 §3: "The client MUST fill the padding extension completely with zero bytes".
        push_extension(&mut extensions, EXTENSION_PADDING, &vec![0; padding]);
    }
    push_u16(&mut body, extensions.len());
    body.extend_from_slice(&extensions);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        build_client_hello(&HelloSpec::new("echo.bench.test"))
    }

    #[test]
    fn whole_hello_ends_at_its_last_byte() {
        let hello = sample();
        assert_eq!(client_hello_end(&hello), Ok(Some(hello.len())));
    }

    #[test]
    fn every_prefix_needs_more_and_then_gives_the_same_answer() {
        for fragment in [16384, 500, 100, 7, 3, 1] {
            let mut spec = HelloSpec::new("echo.bench.test");
            spec.fragment = fragment;
            let hello = build_client_hello(&spec);
            for cut in 0..hello.len() {
                assert_eq!(
                    client_hello_end(&hello[..cut]),
                    Ok(None),
                    "fragment {fragment} cut {cut}"
                );
            }
            let mut followed = hello.clone();
            followed.extend_from_slice(b"payload after the hello");
            assert_eq!(client_hello_end(&followed), Ok(Some(hello.len())));
        }
    }

    #[test]
    fn hello_spanning_records_is_found_and_parsed() {
        let mut spec = HelloSpec::new("split.bench.test");
        spec.post_quantum = true;
        spec.fragment = 512;
        let hello = build_client_hello(&spec);
        assert!(hello.len() > 1200);
        assert_eq!(client_hello_end(&hello), Ok(Some(hello.len())));
        assert_eq!(server_name(&hello).as_deref(), Some("split.bench.test"));
    }

    #[test]
    fn non_tls_and_non_hello_are_rejected() {
        assert_eq!(client_hello_end(b"GET / HTTP/1.1\r\n"), Err(Reject::NotTls));
        assert_eq!(client_hello_end(b"G"), Err(Reject::NotTls));
        // A ServerHello (type 2) in a handshake record.
        assert_eq!(
            client_hello_end(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(Reject::NotClientHello)
        );
        assert_eq!(
            client_hello_end(&[22, 3, 3, 0, 0]),
            Err(Reject::EmptyRecord)
        );
        assert_eq!(
            client_hello_end(&[22, 3, 3, 0x40, 1]),
            Err(Reject::BadRecord)
        );
        assert_eq!(
            client_hello_end(&[22, 3, 3, 0, 4, 1, 0x10, 0, 0]),
            Err(Reject::TooLarge)
        );
        // A record of another type after a fragment that left the hello incomplete.
        let hello = sample();
        let mut message = hello[RECORD_HEADER..].to_vec();
        message.truncate(50);
        let mut stream = into_records(&message, 16384);
        stream.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(client_hello_end(&stream), Err(Reject::NotHandshakeRecord));
    }

    #[test]
    fn builder_hits_the_requested_size_and_keeps_the_name() {
        for (size, post_quantum) in [(517, false), (1800, true), (6000, false), (20000, true)] {
            let mut spec = HelloSpec::new("sized.bench.test");
            spec.size = size;
            spec.post_quantum = post_quantum;
            let hello = build_client_hello(&spec);
            assert_eq!(hello.len(), size);
            assert_eq!(client_hello_end(&hello), Ok(Some(size)));
            assert_eq!(server_name(&hello).as_deref(), Some("sized.bench.test"));
        }
    }

    #[test]
    fn captured_hellos_end_where_they_end_and_name_their_server() {
        let shipped: [(&[u8], &str); 2] = [
            (
                include_bytes!("../hellos/classic-curl.bin"),
                "curl.example.test",
            ),
            (
                include_bytes!("../hellos/pq-rustls.bin"),
                "web.default.dc1.internal.11111111-2222-3333-4444-555555555555.consul",
            ),
        ];
        for (bytes, name) in shipped {
            assert_eq!(client_hello_end(bytes), Ok(Some(bytes.len())));
            assert_eq!(server_name(bytes).as_deref(), Some(name));
            for cut in 0..bytes.len() {
                assert_eq!(client_hello_end(&bytes[..cut]), Ok(None));
            }
        }
        // The gateway's full capture set, when it is in the tree next to us.
        let directory = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway-proto/testdata/clienthello"
        );
        let Ok(manifest) = std::fs::read_to_string(format!("{directory}/MANIFEST.tsv")) else {
            return;
        };
        for line in manifest.lines().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            let (Some(file), Some(sni)) = (fields.first(), fields.get(3)) else {
                continue;
            };
            let Ok(bytes) = std::fs::read(format!("{directory}/{file}")) else {
                continue;
            };
            assert_eq!(client_hello_end(&bytes), Ok(Some(bytes.len())), "{file}");
            let expected = (*sni != "-").then(|| (*sni).to_owned());
            assert_eq!(server_name(&bytes), expected, "{file}");
        }
    }

    #[test]
    fn post_quantum_hello_is_larger_than_one_classic() {
        let classic = sample();
        let mut spec = HelloSpec::new("echo.bench.test");
        spec.post_quantum = true;
        let post_quantum = build_client_hello(&spec);
        assert!(classic.len() < 400, "classic is {} bytes", classic.len());
        assert!(post_quantum.len() > classic.len() + 1200);
    }
}
