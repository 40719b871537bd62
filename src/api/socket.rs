//! Creating the API's unix socket: private from the first instant, never stealing a live one.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{fchmod, Mode};

/// Bind the API socket at `path` with mode 0600. A stale socket there (nobody accepting) is
/// removed; a live one, or anything that is not a socket, is an error. Must be called inside a
/// tokio runtime.
///
/// The socket's mode is set on the fd before `bind` (Linux creates the file with the socket
/// inode's mode less the umask), so the file is never reachable by others, and again on the
/// path after.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => bail!(
                "API socket {}: another process is serving it",
                path.display()
            ),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale API socket {}", path.display()))?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("API socket {}: probing the existing socket", path.display())
                })
            }
        },
        Ok(_) => bail!(
            "API socket {}: the path exists and is not a socket",
            path.display()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("API socket {}", path.display()));
        }
    }

    let ctx = || format!("binding API socket {}", path.display());
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .with_context(ctx)?;
    fchmod(&fd, Mode::from_bits_truncate(0o600)).with_context(ctx)?;
    let addr = UnixAddr::new(path).with_context(ctx)?;
    {
        use std::os::fd::AsRawFd;
        socket::bind(fd.as_raw_fd(), &addr).with_context(ctx)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(ctx)?;
    socket::listen(&fd, Backlog::new(128).expect("backlog 128 is valid")).with_context(ctx)?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    tokio::net::UnixListener::from_std(std_listener).with_context(ctx)
}
