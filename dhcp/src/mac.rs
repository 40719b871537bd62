//! Ethernet MAC addresses: the key of every lease.
//!
//! Displayed and parsed as lowercase colon-separated hex (`52:55:55:12:34:56`), and
//! serialized the same way so lease files stay human-readable. Parsing also accepts
//! uppercase hex and `-` separators; it does not accept other hardware address
//! types or lengths (the server only speaks Ethernet, htype 1 / hlen 6).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A 48-bit Ethernet hardware address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        MacAddr(b)
    }
}

impl From<MacAddr> for [u8; 6] {
    fn from(m: MacAddr) -> Self {
        m.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// A string that is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid MAC address {0:?} (expected six hex octets like 52:55:55:12:34:56)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let m = MacAddr([0x52, 0x55, 0x55, 0x12, 0x34, 0xab]);
        assert_eq!(m.to_string(), "52:55:55:12:34:ab");
        assert_eq!("52:55:55:12:34:ab".parse::<MacAddr>().unwrap(), m);
        assert_eq!("52:55:55:12:34:AB".parse::<MacAddr>().unwrap(), m);
        assert_eq!("52-55-55-12-34-ab".parse::<MacAddr>().unwrap(), m);
        assert!(
            "2:55:55:12:34:ab".parse::<MacAddr>().is_err(),
            "octets are two hex digits"
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "52:55:55:12:34",
            "52:55:55:12:34:56:78",
            "52:55:55:12:34:5g",
            "52:55:55:12:34:",
            "525:55:55:12:34:56",
            "52:55:55-12:34:56",
            "+5:55:55:12:34:56",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn serde_as_string() {
        let m = MacAddr([0x52, 0x55, 0x55, 0x12, 0x34, 0x56]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"52:55:55:12:34:56\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
    }
}
