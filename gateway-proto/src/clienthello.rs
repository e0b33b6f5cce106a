//! Sans-IO TLS ClientHello parser: bytes in, a verdict out.
//!
//! The gateway never decrypts. It buffers the client's first flight until one whole ClientHello
//! handshake message has arrived, reads the `server_name` (and ALPN, for logs) from it, and then
//! replays every buffered byte upstream unchanged. This module only decides; it does no IO,
//! reads no clock and allocates nothing: the verdict for a buffer is a pure function of it.
//!
//! Call [`parse`] with everything received so far. [`Verdict::NeedMore`] means "read more and
//! call again with the longer buffer"; the answer for a complete input never depends on how it
//! was split into reads.

use std::fmt;

/// RFC 8446 §5.1: "The length (in bytes) of the following TLSPlaintext.fragment. The length
/// MUST NOT exceed 2^14 bytes."
pub const MAX_RECORD_PAYLOAD: usize = 1 << 14;

/// RFC 1035 §2.3.4 limits a name to 255 octets on the wire, which is 253 characters in dotted
/// text form without the trailing dot.
pub const MAX_HOST_NAME: usize = 253;

/// The default cap on bytes buffered while waiting for a whole ClientHello. Real clients send
/// 21 KB hellos over two records; post-quantum key shares put ordinary ones at ~2 KB.
pub const DEFAULT_MAX_HELLO_BYTES: usize = 64 * 1024;

const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_TYPE_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_TYPE_ALERT: u8 = 21;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const CONTENT_TYPE_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
/// draft-ietf-tls-esni: `encrypted_client_hello` in the outer ClientHello.
const EXTENSION_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// The longest ALPN protocol id we keep for logs; longer ones are truncated (they are still
/// forwarded intact, this is only what we report).
pub const MAX_ALPN_KEPT: usize = 32;

/// The parser's answer for the bytes received so far.
// `Done` carries the name inline (~300 bytes): boxing it would allocate on every connection,
// and a verdict only lives on the stack for the moment it takes to act on it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The bytes so far are a valid beginning of a ClientHello; read more.
    NeedMore,
    /// A whole, well-formed ClientHello has arrived.
    Done(ClientHello),
    /// Not a ClientHello we will route: close without sending a byte.
    Reject(Reject),
}

/// Why a first flight was refused. Each variant is one bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The first byte is not a TLS handshake record (plaintext HTTP, an HTTP/2 preface, a PROXY
    /// header, garbage).
    NotTls,
    /// An SSLv2-compatible ClientHello (RFC 5246 Appendix E.2); TLS 1.3 forbids it.
    Sslv2Hello,
    /// A record that is not a handshake record (alert, ChangeCipherSpec, application data)
    /// before or inside the ClientHello.
    NotHandshakeRecord,
    /// A handshake record with a zero-length fragment. RFC 8446 §5.1: "Implementations MUST NOT
    /// send zero-length fragments of Handshake types".
    EmptyRecord,
    /// A record longer than 2^14 bytes, or a record version that is not TLS.
    BadRecord,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The ClientHello (with its record framing) is larger than the configured cap.
    TooLarge,
    /// A length overruns its container or does not consume it exactly, or a field is out of
    /// its allowed range.
    Malformed,
    /// An extension type appears twice. RFC 8446 §4.2: "There MUST NOT be more than one
    /// extension of the same type in a given extension block."
    DuplicateExtension,
    /// The server_name list holds two host_name entries. RFC 6066 §3: "The ServerNameList MUST
    /// NOT contain more than one name of the same name_type."
    DuplicateHostName,
    /// The host_name is empty, too long, has an empty label, or holds bytes other than
    /// letters, digits, hyphens and dots (NUL included).
    InvalidHostName,
    /// The host_name is an IP address literal. RFC 6066 §3: "Literal IPv4 and IPv6 addresses
    /// are not permitted in "HostName"."
    IpLiteralHostName,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::NotTls,
        Reject::Sslv2Hello,
        Reject::NotHandshakeRecord,
        Reject::EmptyRecord,
        Reject::BadRecord,
        Reject::NotClientHello,
        Reject::TooLarge,
        Reject::Malformed,
        Reject::DuplicateExtension,
        Reject::DuplicateHostName,
        Reject::InvalidHostName,
        Reject::IpLiteralHostName,
    ];

    /// The metric label and log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::NotTls => "not_tls",
            Reject::Sslv2Hello => "sslv2_hello",
            Reject::NotHandshakeRecord => "not_handshake_record",
            Reject::EmptyRecord => "empty_record",
            Reject::BadRecord => "bad_record",
            Reject::NotClientHello => "not_client_hello",
            Reject::TooLarge => "too_large",
            Reject::Malformed => "malformed",
            Reject::DuplicateExtension => "duplicate_extension",
            Reject::DuplicateHostName => "duplicate_host_name",
            Reject::InvalidHostName => "invalid_host_name",
            Reject::IpLiteralHostName => "ip_literal_host_name",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the gateway needs from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The normalised host_name, or `None` when the hello carries no server_name.
    pub server_name: Option<ServerName>,
    /// The first ALPN protocol offered, if any (for logs only).
    pub alpn: Option<Alpn>,
    /// `supported_versions` lists TLS 1.3.
    pub offers_tls13: bool,
    /// An `encrypted_client_hello` extension is present; we route on the outer name.
    pub offers_ech: bool,
    /// Bytes of the input up to the end of the record that completed the hello. Anything
    /// after it (e.g. 0-RTT data) is forwarded too, but is not part of the hello.
    pub hello_bytes: usize,
}

/// A validated host name: ASCII lowercase, at most 253 bytes, no trailing dot. Held inline so
/// that parsing allocates nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerName {
    len: u8,
    bytes: [u8; MAX_HOST_NAME],
}

impl ServerName {
    /// Validate and normalise a host name: lowercase it and drop one trailing dot.
    pub fn parse(raw: &[u8]) -> Result<ServerName, Reject> {
        let trimmed = raw.strip_suffix(b".").unwrap_or(raw);
        if trimmed.is_empty() || trimmed.len() > MAX_HOST_NAME {
            return Err(Reject::InvalidHostName);
        }
        let mut bytes = [0u8; MAX_HOST_NAME];
        let mut label_len = 0usize;
        let mut all_digits_and_dots = true;
        for (slot, &byte) in bytes.iter_mut().zip(trimmed) {
            match byte {
                b'.' => {
                    if label_len == 0 {
                        return Err(Reject::InvalidHostName);
                    }
                    label_len = 0;
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => {
                    label_len += 1;
                    // RFC 1035 §2.3.4: labels are 63 octets or less.
                    if label_len > 63 {
                        return Err(Reject::InvalidHostName);
                    }
                    all_digits_and_dots &= byte.is_ascii_digit();
                }
                _ => return Err(Reject::InvalidHostName),
            }
            *slot = byte.to_ascii_lowercase();
        }
        if label_len == 0 {
            return Err(Reject::InvalidHostName);
        }
        if all_digits_and_dots {
            // Only digits and dots: an IPv4 literal in some notation (RFC 6066 forbids them;
            // a name whose last label is numeric is never a valid DNS host name either).
            return Err(Reject::IpLiteralHostName);
        }
        Ok(ServerName {
            // The length is at most 253, so it fits in a u8.
            len: trimmed.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever stored (checked in `parse`).
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// The first ALPN protocol id (truncated to [`MAX_ALPN_KEPT`] bytes), for logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Alpn {
    len: u8,
    bytes: [u8; MAX_ALPN_KEPT],
}

impl Alpn {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for Alpn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// Decide on the bytes received so far. `max_bytes` caps the buffered first flight (record
/// headers included); a hello that cannot fit is rejected as soon as that is known.
pub fn parse(input: &[u8], max_bytes: usize) -> Verdict {
    match frame(input, max_bytes) {
        Framing::NeedMore => {
            if input.len() >= max_bytes {
                Verdict::Reject(Reject::TooLarge)
            } else {
                Verdict::NeedMore
            }
        }
        Framing::Reject(reason) => Verdict::Reject(reason),
        Framing::Complete {
            message_len,
            hello_bytes,
        } => {
            let mut reader = HandshakeReader::new(input, message_len);
            match parse_client_hello_body(&mut reader) {
                Ok(mut hello) => {
                    hello.hello_bytes = hello_bytes;
                    Verdict::Done(hello)
                }
                Err(reason) => Verdict::Reject(reason),
            }
        }
    }
}

enum Framing {
    NeedMore,
    Reject(Reject),
    /// The ClientHello body is `message_len` bytes long and wholly present in records ending
    /// at input offset `hello_bytes`.
    Complete {
        message_len: usize,
        hello_bytes: usize,
    },
}

/// Walk the record layer: check every record header up to the point where one whole
/// handshake message of type ClientHello is present.
fn frame(input: &[u8], max_bytes: usize) -> Framing {
    let Some(&first) = input.first() else {
        return Framing::NeedMore;
    };
    if first != CONTENT_TYPE_HANDSHAKE {
        return Framing::Reject(classify_foreign_first_byte(input));
    }
    // The handshake header (type + 24-bit length) may itself straddle records.
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut handshake_bytes = 0usize; // handshake-layer bytes seen so far
    let mut message_len: Option<usize> = None;
    let mut offset = 0usize;
    // Handshake-layer bytes delivered by the complete records so far.
    let mut delivered = 0usize;
    loop {
        let Some(record) = input.get(offset..offset + RECORD_HEADER) else {
            return Framing::NeedMore;
        };
        match record[0] {
            CONTENT_TYPE_HANDSHAKE => {}
            CONTENT_TYPE_ALERT
            | CONTENT_TYPE_CHANGE_CIPHER_SPEC
            | CONTENT_TYPE_APPLICATION_DATA => return Framing::Reject(Reject::NotHandshakeRecord),
            _ => return Framing::Reject(Reject::BadRecord),
        }
        // RFC 8446 §5.1 legacy_record_version: 0x0301 for the first ClientHello, any 0x03XX
        // seen in the wild (0x0300 from old stacks, 0x0303 on retries).
        if record[1] != 3 {
            return Framing::Reject(Reject::BadRecord);
        }
        let length = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if length == 0 {
            return Framing::Reject(Reject::EmptyRecord);
        }
        if length > MAX_RECORD_PAYLOAD {
            return Framing::Reject(Reject::BadRecord);
        }
        let body_start = offset + RECORD_HEADER;
        let available = input.len().saturating_sub(body_start).min(length);
        // Collect the handshake header bytes from this fragment.
        for &byte in &input[body_start..body_start + available] {
            if handshake_bytes < HANDSHAKE_HEADER {
                header[handshake_bytes] = byte;
                handshake_bytes += 1;
                if handshake_bytes == 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
                    return Framing::Reject(Reject::NotClientHello);
                }
            } else {
                break;
            }
        }
        if message_len.is_none() && handshake_bytes == HANDSHAKE_HEADER {
            let len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            // The smallest possible first flight carrying this message: one record per 2^14
            // bytes of handshake data.
            let total = HANDSHAKE_HEADER + len;
            let minimum_wire = total + RECORD_HEADER * total.div_ceil(MAX_RECORD_PAYLOAD);
            if minimum_wire > max_bytes {
                return Framing::Reject(Reject::TooLarge);
            }
            message_len = Some(len);
        }
        if available < length {
            return Framing::NeedMore;
        }
        offset = body_start + length;
        delivered += length;
        if let Some(len) = message_len {
            if delivered >= HANDSHAKE_HEADER + len {
                return Framing::Complete {
                    message_len: len,
                    hello_bytes: offset,
                };
            }
        }
        if offset >= max_bytes {
            return Framing::Reject(Reject::TooLarge);
        }
    }
}

/// Tell an SSLv2-compatible hello from everything else that is not a TLS handshake record.
fn classify_foreign_first_byte(input: &[u8]) -> Reject {
    // RFC 5246 Appendix E.2: msg_length has the high bit set in its first byte, and the third
    // byte is msg_type 1 (CLIENT-HELLO).
    if input[0] & 0x80 != 0 && input.get(2) == Some(&1) {
        return Reject::Sslv2Hello;
    }
    match input[0] {
        CONTENT_TYPE_ALERT | CONTENT_TYPE_CHANGE_CIPHER_SPEC | CONTENT_TYPE_APPLICATION_DATA
            if input.get(1) == Some(&3) =>
        {
            Reject::NotHandshakeRecord
        }
        _ => Reject::NotTls,
    }
}

/// Reads the handshake byte stream across record boundaries, sequentially, without copying.
/// Only used on input that `frame` has checked, so record headers are trusted here.
struct HandshakeReader<'a> {
    input: &'a [u8],
    /// Absolute position of the next byte in `input`.
    position: usize,
    /// Absolute end of the current record's payload.
    record_end: usize,
    /// Bytes of the ClientHello body consumed so far.
    consumed: usize,
    /// Length of the ClientHello body.
    limit: usize,
}

impl<'a> HandshakeReader<'a> {
    fn new(input: &'a [u8], message_len: usize) -> Self {
        let mut reader = HandshakeReader {
            input,
            position: 0,
            record_end: 0,
            consumed: 0,
            limit: HANDSHAKE_HEADER + message_len,
        };
        // Skip the handshake header; the body starts at logical offset 4. `frame` has
        // established that those bytes exist.
        for _ in 0..HANDSHAKE_HEADER {
            let _ = reader.byte();
        }
        reader
    }

    fn offset(&self) -> usize {
        self.consumed
    }

    fn byte(&mut self) -> Result<u8, Reject> {
        if self.consumed >= self.limit {
            return Err(Reject::Malformed);
        }
        while self.position >= self.record_end {
            let header = self
                .input
                .get(self.record_end..self.record_end + RECORD_HEADER)
                .ok_or(Reject::Malformed)?;
            let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
            self.position = self.record_end + RECORD_HEADER;
            self.record_end = self.position + length;
        }
        let value = *self.input.get(self.position).ok_or(Reject::Malformed)?;
        self.position += 1;
        self.consumed += 1;
        Ok(value)
    }

    fn u16(&mut self) -> Result<u16, Reject> {
        Ok(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    fn skip(&mut self, count: usize) -> Result<(), Reject> {
        if self.consumed + count > self.limit {
            return Err(Reject::Malformed);
        }
        let mut left = count;
        while left > 0 {
            if self.position >= self.record_end {
                // Cross into the next record through `byte`, which advances the framing.
                self.byte()?;
                left -= 1;
                continue;
            }
            let step = left.min(self.record_end - self.position);
            self.position += step;
            self.consumed += step;
            left -= step;
        }
        Ok(())
    }

    /// Fill `out` from the stream.
    fn read_into(&mut self, out: &mut [u8]) -> Result<(), Reject> {
        for slot in out.iter_mut() {
            *slot = self.byte()?;
        }
        Ok(())
    }

    /// The end offset of a container of `len` bytes starting here, if it fits.
    fn container_end(&self, len: usize) -> Result<usize, Reject> {
        let end = self.consumed + len;
        if end > self.limit {
            Err(Reject::Malformed)
        } else {
            Ok(end)
        }
    }

    fn expect_at(&self, end: usize) -> Result<(), Reject> {
        if self.consumed == end {
            Ok(())
        } else {
            Err(Reject::Malformed)
        }
    }
}

/// RFC 8446 §4.1.2 ClientHello (TLS 1.2's shape is the same on the wire).
fn parse_client_hello_body(reader: &mut HandshakeReader<'_>) -> Result<ClientHello, Reject> {
    let legacy_version = reader.u16()?;
    if legacy_version >> 8 != 3 {
        return Err(Reject::Malformed);
    }
    reader.skip(32)?; // random
    let session_id_len = usize::from(reader.byte()?);
    // "opaque legacy_session_id<0..32>"
    if session_id_len > 32 {
        return Err(Reject::Malformed);
    }
    reader.skip(session_id_len)?;
    let cipher_suites_len = usize::from(reader.u16()?);
    // "CipherSuite cipher_suites<2..2^16-2>"
    if cipher_suites_len < 2 || cipher_suites_len % 2 != 0 {
        return Err(Reject::Malformed);
    }
    reader.skip(cipher_suites_len)?;
    let compression_len = usize::from(reader.byte()?);
    // "opaque legacy_compression_methods<1..2^8-1>"
    if compression_len < 1 {
        return Err(Reject::Malformed);
    }
    reader.skip(compression_len)?;

    let mut hello = ClientHello {
        server_name: None,
        alpn: None,
        offers_tls13: false,
        offers_ech: false,
        hello_bytes: 0,
    };
    if reader.offset() == reader.limit {
        // RFC 5246 §7.4.1.2: a ClientHello may end after compression_methods (no extensions).
        return Ok(hello);
    }
    let extensions_len = usize::from(reader.u16()?);
    let extensions_end = reader.container_end(extensions_len)?;
    if extensions_end != reader.limit {
        return Err(Reject::Malformed);
    }
    let mut seen = SeenExtensions::new();
    while reader.offset() < extensions_end {
        let extension_type = reader.u16()?;
        let extension_len = usize::from(reader.u16()?);
        let extension_end = reader.container_end(extension_len)?;
        if extension_end > extensions_end {
            return Err(Reject::Malformed);
        }
        if !seen.insert(extension_type) {
            return Err(Reject::DuplicateExtension);
        }
        match extension_type {
            EXTENSION_SERVER_NAME => {
                hello.server_name = parse_server_name_list(reader, extension_end)?;
            }
            EXTENSION_ALPN => hello.alpn = parse_alpn(reader, extension_end)?,
            EXTENSION_SUPPORTED_VERSIONS => {
                hello.offers_tls13 = parse_supported_versions(reader, extension_end)?;
            }
            EXTENSION_ECH => {
                hello.offers_ech = true;
                reader.skip(extension_len)?;
            }
            // GREASE (RFC 8701), padding and everything we do not need: opaque here.
            _ => reader.skip(extension_len)?,
        }
        reader.expect_at(extension_end)?;
    }
    reader.expect_at(extensions_end)?;
    Ok(hello)
}

/// RFC 6066 §3: `ServerName server_name_list<1..2^16-1>`.
fn parse_server_name_list(
    reader: &mut HandshakeReader<'_>,
    extension_end: usize,
) -> Result<Option<ServerName>, Reject> {
    let list_len = usize::from(reader.u16()?);
    let list_end = reader.container_end(list_len)?;
    if list_end != extension_end || list_len == 0 {
        return Err(Reject::Malformed);
    }
    let mut found: Option<ServerName> = None;
    while reader.offset() < list_end {
        let name_type = reader.byte()?;
        let name_len = usize::from(reader.u16()?);
        let name_end = reader.container_end(name_len)?;
        if name_end > list_end {
            return Err(Reject::Malformed);
        }
        if name_type != NAME_TYPE_HOST_NAME {
            // "opaque HostName<1..2^16-1>" is the only defined type; others are skipped as
            // opaque data of the same framing, as RFC 6066 anticipates for future types.
            reader.skip(name_len)?;
            continue;
        }
        if found.is_some() {
            return Err(Reject::DuplicateHostName);
        }
        if name_len == 0 || name_len > MAX_HOST_NAME + 1 {
            return Err(Reject::InvalidHostName);
        }
        let mut raw = [0u8; MAX_HOST_NAME + 1];
        reader.read_into(&mut raw[..name_len])?;
        found = Some(ServerName::parse(&raw[..name_len])?);
    }
    reader.expect_at(list_end)?;
    Ok(found)
}

/// RFC 7301 §3.1: `ProtocolName protocol_name_list<2..2^16-1>`, `opaque ProtocolName<1..2^8-1>`.
fn parse_alpn(
    reader: &mut HandshakeReader<'_>,
    extension_end: usize,
) -> Result<Option<Alpn>, Reject> {
    let list_len = usize::from(reader.u16()?);
    let list_end = reader.container_end(list_len)?;
    if list_end != extension_end || list_len < 2 {
        return Err(Reject::Malformed);
    }
    let mut first: Option<Alpn> = None;
    while reader.offset() < list_end {
        let name_len = usize::from(reader.byte()?);
        if name_len == 0 || reader.container_end(name_len)? > list_end {
            return Err(Reject::Malformed);
        }
        if first.is_none() {
            let kept = name_len.min(MAX_ALPN_KEPT);
            let mut alpn = Alpn {
                len: kept as u8,
                bytes: [0; MAX_ALPN_KEPT],
            };
            reader.read_into(&mut alpn.bytes[..kept])?;
            reader.skip(name_len - kept)?;
            first = Some(alpn);
        } else {
            reader.skip(name_len)?;
        }
    }
    Ok(first)
}

/// RFC 8446 §4.2.1: `ProtocolVersion versions<2..254>` in a ClientHello.
fn parse_supported_versions(
    reader: &mut HandshakeReader<'_>,
    extension_end: usize,
) -> Result<bool, Reject> {
    let list_len = usize::from(reader.byte()?);
    let list_end = reader.container_end(list_len)?;
    if list_end != extension_end || list_len < 2 || list_len % 2 != 0 {
        return Err(Reject::Malformed);
    }
    let mut tls13 = false;
    while reader.offset() < list_end {
        tls13 |= reader.u16()? == 0x0304;
    }
    Ok(tls13)
}

/// Extension types seen in one block. Real clients send fewer than 32 extensions, which fit
/// the inline list; longer blocks fall back to a 64 Kibit bitmap on the (8 KiB of) stack, so
/// even a hand-made hello with thousands of extensions is checked in linear time without
/// allocating.
struct SeenExtensions {
    inline: [u16; 32],
    count: usize,
    bitmap: Option<[u64; 1024]>,
}

impl SeenExtensions {
    fn new() -> Self {
        SeenExtensions {
            inline: [0; 32],
            count: 0,
            bitmap: None,
        }
    }

    /// Record `extension_type`; false when it was already present.
    fn insert(&mut self, extension_type: u16) -> bool {
        if let Some(bitmap) = &mut self.bitmap {
            let (word, bit) = (usize::from(extension_type / 64), extension_type % 64);
            let fresh = bitmap[word] & (1 << bit) == 0;
            bitmap[word] |= 1 << bit;
            return fresh;
        }
        if self.inline[..self.count].contains(&extension_type) {
            return false;
        }
        if self.count < self.inline.len() {
            self.inline[self.count] = extension_type;
            self.count += 1;
            return true;
        }
        // More than 32 distinct extensions: only hand-made hellos get here.
        let mut bitmap = [0u64; 1024];
        for &seen in self.inline.iter().chain(std::iter::once(&extension_type)) {
            bitmap[usize::from(seen / 64)] |= 1 << (seen % 64);
        }
        self.bitmap = Some(bitmap);
        true
    }
}

#[cfg(test)]
mod tests;
