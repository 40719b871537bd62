//! Frame transports: each one connects some kind of socket to one port of the switch (or, for
//! listeners, one port per accepted peer). Framing lives in [`stream`] (4-byte big-endian
//! length prefix) and [`dgram`] (one frame per datagram); the rest are ways of getting such a
//! socket: listening, connecting, an inherited fd, fds received over a unix socket, a tap device.

pub mod busypoll;
pub mod dgram;
pub mod fd;
pub mod fdpass;
pub mod stream;
pub mod tap;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A stream socket address as the flags take it: `PATH`, `unix://PATH` or `tcp://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamAddr {
    /// A unix stream socket path.
    Unix(PathBuf),
    /// A TCP address (listen only on loopback unless you mean it).
    Tcp(SocketAddr),
}

impl std::str::FromStr for StreamAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            return rest
                .parse()
                .map(StreamAddr::Tcp)
                .map_err(|_| format!("{s} is not tcp://IP:PORT"));
        }
        let path = s.strip_prefix("unix://").unwrap_or(s);
        if path.is_empty() || path.contains("://") {
            return Err(format!("{s} is not PATH, unix://PATH or tcp://IP:PORT"));
        }
        Ok(StreamAddr::Unix(PathBuf::from(path)))
    }
}

impl fmt::Display for StreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamAddr::Unix(p) => write!(f, "unix://{}", p.display()),
            StreamAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A datagram socket path as the flags take it: `PATH` or `unixgram://PATH`.
pub fn parse_dgram_path(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unixgram://").unwrap_or(s);
    if path.is_empty() || path.contains("://") {
        return Err(format!("{s} is not PATH or unixgram://PATH"));
    }
    Ok(PathBuf::from(path))
}

/// Make room for a listening unix socket at `path`: a stale socket file (nobody accepts on it)
/// is removed; a live one, or a file that is not a socket, is an error.
pub fn claim_socket_path(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!("{} exists and is not a socket", path.display());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by another process", path.display());
    }
    // A datagram socket cannot be connected to with a stream; it is ours to replace only if
    // nobody is bound to it, which a datagram connect tells.
    let probe = std::os::unix::net::UnixDatagram::unbound()?;
    if probe.connect(path).is_ok() {
        anyhow::bail!("{} is in use by another process", path.display());
    }
    std::fs::remove_file(path)?;
    Ok(())
}
