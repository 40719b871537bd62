//! Strict parsing of incoming DHCP client messages (the UDP payload sent to port 67).
//!
//! The whole option area is walked and checked before anything is believed: every
//! option must fit in the packet and the list must end with the End option, so a
//! truncated packet or a lying length byte is rejected instead of half-read.
//! Repeated options are concatenated (RFC 3396). Only the fields and options the
//! server acts on are extracted; others are skipped unread. Option overload
//! (option 52, options inside `sname`/`file`) and non-Ethernet hardware are not
//! supported. Replies are built by [`crate::reply`], not here.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use thiserror::Error;

use crate::mac::MacAddr;

/// Fixed BOOTP header (236 bytes) plus the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const BOOT_REQUEST: u8 = 1;
const BOOT_REPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;
const FLAG_BROADCAST: u16 = 0x8000;

const OPT_PAD: u8 = 0;
const OPT_HOSTNAME: u8 = 12;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_END: u8 = 255;

/// Longest hostname recorded from option 12.
const MAX_HOSTNAME: usize = 63;

/// Why a packet could not be parsed at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error("packet is {0} bytes, shorter than the 240-byte DHCP header")]
    Truncated(usize),
    #[error("unknown BOOTP op code {0}")]
    BadOp(u8),
    #[error("bad magic cookie {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("option {code} at offset {offset} runs past the end of the packet")]
    OptionOverrun { code: u8, offset: usize },
    #[error("option list has no End option")]
    MissingEnd,
    #[error("option {code} has invalid length {len}")]
    BadOptionLength { code: u8, len: usize },
}

/// DHCP message types a client sends (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientMessage {
    Discover,
    Request,
    Decline,
    Release,
    Inform,
}

/// What parsing found, short of a valid client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseFailure {
    Malformed(Malformed),
    /// A BOOTREPLY, or a server message type (OFFER, ACK, NAK).
    NotRequest,
    UnsupportedHardware {
        htype: u8,
        hlen: u8,
    },
    MissingMessageType,
    UnsupportedMessageType(u8),
}

impl From<Malformed> for ParseFailure {
    fn from(m: Malformed) -> Self {
        ParseFailure::Malformed(m)
    }
}

/// The parts of a client message the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub kind: ClientMessage,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: MacAddr,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub hostname: Option<String>,
}

impl Request {
    pub fn broadcast_flag(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parse and validate one client message.
pub(crate) fn parse(b: &[u8]) -> Result<Request, ParseFailure> {
    if b.len() < HEADER_LEN {
        return Err(Malformed::Truncated(b.len()).into());
    }
    match b[0] {
        BOOT_REQUEST => {}
        BOOT_REPLY => return Err(ParseFailure::NotRequest),
        op => return Err(Malformed::BadOp(op).into()),
    }
    let (htype, hlen) = (b[1], b[2]);
    if htype != HTYPE_ETHERNET || hlen != 6 {
        return Err(ParseFailure::UnsupportedHardware { htype, hlen });
    }
    let magic = [b[236], b[237], b[238], b[239]];
    if magic != MAGIC {
        return Err(Malformed::BadMagic(magic).into());
    }

    let opts = walk_options(&b[HEADER_LEN..])?;
    let kind = match opts.get(&OPT_MESSAGE_TYPE) {
        None => return Err(ParseFailure::MissingMessageType),
        Some(v) if v.len() != 1 => {
            return Err(Malformed::BadOptionLength {
                code: OPT_MESSAGE_TYPE,
                len: v.len(),
            }
            .into())
        }
        Some(v) => match v[0] {
            1 => ClientMessage::Discover,
            3 => ClientMessage::Request,
            4 => ClientMessage::Decline,
            7 => ClientMessage::Release,
            8 => ClientMessage::Inform,
            2 | 5 | 6 => return Err(ParseFailure::NotRequest),
            t => return Err(ParseFailure::UnsupportedMessageType(t)),
        },
    };
    let addr_opt = |code: u8| -> Result<Option<Ipv4Addr>, Malformed> {
        match opts.get(&code) {
            None => Ok(None),
            Some(v) if v.len() == 4 => Ok(Some(ip_at(v, 0))),
            Some(v) => Err(Malformed::BadOptionLength { code, len: v.len() }),
        }
    };
    let requested_ip = addr_opt(OPT_REQUESTED_IP)?;
    let server_id = addr_opt(OPT_SERVER_ID)?;
    let hostname = match opts.get(&OPT_HOSTNAME) {
        Some(v) if v.is_empty() => {
            return Err(Malformed::BadOptionLength {
                code: OPT_HOSTNAME,
                len: 0,
            }
            .into())
        }
        Some(v) => sanitize_hostname(v),
        None => None,
    };

    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&b[28..34]);
    Ok(Request {
        kind,
        xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        flags: u16::from_be_bytes([b[10], b[11]]),
        ciaddr: ip_at(b, 12),
        giaddr: ip_at(b, 24),
        chaddr: MacAddr(chaddr),
        requested_ip,
        server_id,
        hostname,
    })
}

/// Check the TLV structure of the option area and collect the options, concatenating
/// repeated ones. Anything after the End option is padding and ignored.
fn walk_options(area: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, Malformed> {
    let mut opts: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut i = 0;
    loop {
        let Some(&code) = area.get(i) else {
            return Err(Malformed::MissingEnd);
        };
        match code {
            OPT_PAD => i += 1,
            OPT_END => return Ok(opts),
            _ => {
                let offset = HEADER_LEN + i;
                let len = *area
                    .get(i + 1)
                    .ok_or(Malformed::OptionOverrun { code, offset })?
                    as usize;
                let data = area
                    .get(i + 2..i + 2 + len)
                    .ok_or(Malformed::OptionOverrun { code, offset })?;
                opts.entry(code).or_default().extend_from_slice(data);
                i += 2 + len;
            }
        }
    }
}

/// Keep printable ASCII (no spaces or control characters), at most 63 characters.
fn sanitize_hostname(raw: &[u8]) -> Option<String> {
    let s: String = raw
        .iter()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_HOSTNAME)
        .map(|&c| char::from(c))
        .collect();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0] = BOOT_REQUEST;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[10] = 0x80;
        b[28..34].copy_from_slice(&[0x52, 0x55, 0x55, 1, 2, 3]);
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn parses_fields_and_options() {
        let r = parse(&packet(&[
            53, 1, 3, 0, 0, 50, 4, 192, 168, 5, 15, 54, 4, 192, 168, 5, 2, 12, 3, b'v', b'm', b'1',
            255, 0, 0,
        ]))
        .unwrap();
        assert_eq!(r.kind, ClientMessage::Request);
        assert_eq!(r.xid, 0x1234_5678);
        assert!(r.broadcast_flag());
        assert_eq!(r.chaddr, MacAddr([0x52, 0x55, 0x55, 1, 2, 3]));
        assert_eq!(r.requested_ip, Some(Ipv4Addr::new(192, 168, 5, 15)));
        assert_eq!(r.server_id, Some(Ipv4Addr::new(192, 168, 5, 2)));
        assert_eq!(r.hostname.as_deref(), Some("vm1"));
    }

    #[test]
    fn concatenates_split_options() {
        let r = parse(&packet(&[53, 1, 1, 12, 2, b'a', b'b', 12, 1, b'c', 255])).unwrap();
        assert_eq!(r.hostname.as_deref(), Some("abc"));
    }

    #[test]
    fn hostname_is_sanitized() {
        let mut opts = vec![53, 1, 1, 12, 100];
        opts.extend(b"a b\x00\x07c\xff".iter().copied().cycle().take(100));
        opts.push(255);
        let h = parse(&packet(&opts)).unwrap().hostname.unwrap();
        assert!(h.len() <= 63);
        assert!(h.bytes().all(|c| c.is_ascii_graphic()));
        assert!(h.starts_with("abcabc"));
        let r = parse(&packet(&[53, 1, 1, 12, 2, b' ', 0, 255])).unwrap();
        assert_eq!(r.hostname, None);
    }

    #[test]
    fn rejects_structural_errors() {
        use ParseFailure as F;
        assert_eq!(parse(&[]), Err(F::Malformed(Malformed::Truncated(0))));
        let mut p = packet(&[53, 1, 1, 255]);
        p[0] = 2;
        assert_eq!(parse(&p), Err(F::NotRequest));
        p[0] = 7;
        assert_eq!(parse(&p), Err(F::Malformed(Malformed::BadOp(7))));
        let mut p = packet(&[53, 1, 1, 255]);
        p[1] = 6;
        assert_eq!(parse(&p), Err(F::UnsupportedHardware { htype: 6, hlen: 6 }));
        let mut p = packet(&[53, 1, 1, 255]);
        p[2] = 16;
        assert_eq!(
            parse(&p),
            Err(F::UnsupportedHardware { htype: 1, hlen: 16 })
        );
        let mut p = packet(&[53, 1, 1, 255]);
        p[239] = 0;
        assert!(matches!(
            parse(&p),
            Err(F::Malformed(Malformed::BadMagic(_)))
        ));
        assert_eq!(
            parse(&packet(&[53, 1, 1])),
            Err(F::Malformed(Malformed::MissingEnd))
        );
        assert_eq!(
            parse(&packet(&[53, 1, 1, 12, 9, b'a', 255])),
            Err(F::Malformed(Malformed::OptionOverrun {
                code: 12,
                offset: 243
            }))
        );
        assert_eq!(
            parse(&packet(&[53, 1, 1, 12])),
            Err(F::Malformed(Malformed::OptionOverrun {
                code: 12,
                offset: 243
            }))
        );
        assert_eq!(parse(&packet(&[255])), Err(F::MissingMessageType));
        assert_eq!(
            parse(&packet(&[53, 2, 1, 1, 255])),
            Err(F::Malformed(Malformed::BadOptionLength {
                code: 53,
                len: 2
            }))
        );
        assert_eq!(
            parse(&packet(&[53, 1, 1, 50, 3, 1, 2, 3, 255])),
            Err(F::Malformed(Malformed::BadOptionLength {
                code: 50,
                len: 3
            }))
        );
        assert_eq!(
            parse(&packet(&[53, 1, 1, 54, 0, 255])),
            Err(F::Malformed(Malformed::BadOptionLength {
                code: 54,
                len: 0
            }))
        );
        assert_eq!(
            parse(&packet(&[53, 1, 1, 12, 0, 255])),
            Err(F::Malformed(Malformed::BadOptionLength {
                code: 12,
                len: 0
            }))
        );
        assert_eq!(parse(&packet(&[53, 1, 2, 255])), Err(F::NotRequest));
        assert_eq!(parse(&packet(&[53, 1, 5, 255])), Err(F::NotRequest));
        assert_eq!(
            parse(&packet(&[53, 1, 10, 255])),
            Err(F::UnsupportedMessageType(10))
        );
    }
}
