//! gvproxy's `-forward-sock`: a unix socket on the host whose every connection is carried over
//! SSH to a unix socket in the guest (Podman machine's API socket).
//!
//! Podman passes repeated groups `-forward-sock HOSTPATH -forward-dest GUESTPATH -forward-user
//! USER -forward-identity KEYFILE`; each group is one [`SockForward`] and one [`serve`] task.
//! [`serve`] listens on HOSTPATH; for each accepted connection it opens a
//! `direct-streamlocal@openssh.com` channel to GUESTPATH over one SSH session to the guest's sshd
//! (user USER, public-key auth with the private key KEYFILE, the host key not verified, as
//! gvproxy does) and relays bytes both ways until both sides are done; a half-close on either
//! side travels as EOF to the other (`shutdown(SHUT_WR)` on the host socket, SSH channel EOF in
//! the guest, where sshd turns it into `shutdown(SHUT_WR)` on GUESTPATH).
//!
//! The session is shared by all connections and made lazily (plus one warm-up attempt at start):
//! while the guest boots, sshd is retried with backoff (100 ms doubling to 1 s, about a minute in
//! all, as gvproxy's "Waiting for sshd"). A dropped session (guest rebooted, sshd restarted) is
//! noticed on the next connection, which makes a new one. A refused public key is final for that
//! connection: it is closed at once and the refusal logged, and the next connection tries again.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use russh::client::{self, Handle};
use russh::keys::{load_secret_key, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// How long one attempt at the SSH session (TCP connect, handshake, authentication) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many attempts at the SSH session one connection makes while sshd is not answering.
const CONNECT_ATTEMPTS: u32 = 60;
/// The first pause between those attempts; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long the guest's sshd may take to answer a channel open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Channel opens per connection (the guest socket may appear a moment after sshd), and the
/// pause between them (gvproxy: 3 tries, 200 ms apart).
const OPEN_ATTEMPTS: u32 = 3;
const OPEN_PAUSE: Duration = Duration::from_millis(200);
/// SSH keepalives: a session that answers none of 3, 15 s apart, is dropped.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Relay buffer per direction.
const RELAY_BUF: usize = 64 * 1024;
/// Pause after a failed accept (out of descriptors, say) before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// One `-forward-sock` group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockForward {
    /// `-forward-sock`: the unix socket to listen on, on the host.
    pub local: PathBuf,
    /// `-forward-dest`: the unix socket to reach, in the guest.
    pub dest: String,
    /// `-forward-user`: the guest user to log in as.
    pub user: String,
    /// `-forward-identity`: the private key to log in with (OpenSSH or PEM format, unencrypted).
    pub identity: PathBuf,
}

impl fmt::Display for SockForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}@guest:{}",
            self.local.display(),
            self.user,
            self.dest
        )
    }
}

/// Serves `f` forever: binds `f.local` (a stale socket there is replaced, a live one or any other
/// file is refused), then forwards each connection to `f.dest` over SSH to `ssh`, where the
/// guest's sshd is reachable (the host side of the `-ssh-port` forward). Returns only on a setup
/// error: the identity cannot be loaded, or `f.local` cannot be bound. Dropping the future stops
/// the listener, removes the socket file and ends the connections it carries.
pub async fn serve(f: SockForward, ssh: SocketAddr) -> Result<()> {
    let key = load_secret_key(&f.identity, None).with_context(|| {
        format!(
            "forward-sock {}: loading identity {}",
            f.local.display(),
            f.identity.display()
        )
    })?;
    let (listener, _unlink) =
        bind(&f.local).with_context(|| format!("forward-sock {}", f.local.display()))?;
    info!(forward = %f, ssh = %ssh, "forward-sock listening");

    let fwd = Arc::new(Forwarder::new(f, ssh, key));
    let mut tasks = JoinSet::new();
    {
        // Warm-up: have the session ready for the first connection, as gvproxy does at start.
        let fwd = fwd.clone();
        tasks.spawn(async move {
            if let Err(e) = fwd.session().await {
                warn!(forward = %fwd.f, "forward-sock: no SSH session yet: {e:#}");
            }
        });
    }
    loop {
        while tasks.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((conn, _)) => {
                let fwd = fwd.clone();
                tasks.spawn(async move { fwd.carry(conn).await });
            }
            Err(e) => {
                warn!(forward = %fwd.f, "forward-sock: accept failed: {e}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

/// Binds the host socket at `path`, mode 0600 (gvproxy binds under umask 0177).
fn bind(path: &Path) -> Result<(UnixListener, Unlink)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "{} is in use: another process listens on it",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!("removing stale socket {}", path.display());
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(e).context(format!("removing stale socket {}", path.display()))
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(e).context(format!("probing existing socket {}", path.display())),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(format!("inspecting {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("inspecting {}", path.display()))?;
    Ok((
        listener,
        Unlink {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Removes the socket file on drop, unless something else has replaced it meanwhile.
struct Unlink {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The SSH client side: trusts any host key (gvproxy sets `InsecureIgnoreHostKey`; the guest's
/// sshd is reached over usernet's own forward to the VM it runs).
struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Why one attempt at the session failed.
enum ConnectError {
    /// sshd is not there yet or the handshake broke: try again after a pause.
    Retry(anyhow::Error),
    /// sshd refused the key: trying again will not help this connection.
    Refused(anyhow::Error),
}

/// One forward's shared state: the key and the session all its connections use.
struct Forwarder {
    f: SockForward,
    ssh: SocketAddr,
    key: Arc<PrivateKey>,
    config: Arc<client::Config>,
    /// The session, once made; replaced when found closed. Held across a (re)connect, so
    /// connections arriving meanwhile wait for that session instead of making their own.
    session: Mutex<Option<Arc<Handle<Client>>>>,
}

impl Forwarder {
    fn new(f: SockForward, ssh: SocketAddr, key: PrivateKey) -> Forwarder {
        let config = client::Config {
            keepalive_interval: Some(KEEPALIVE),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };
        Forwarder {
            f,
            ssh,
            key: Arc::new(key),
            config: Arc::new(config),
            session: Mutex::new(None),
        }
    }

    /// Carries one accepted connection; on failure closes it and logs why.
    async fn carry(self: Arc<Self>, mut conn: UnixStream) {
        let channel = match self.open().await {
            Ok(c) => c,
            Err(e) => {
                error!(forward = %self.f, "forward-sock: closing connection: {e:#}");
                return; // drops (closes) conn
            }
        };
        debug!(forward = %self.f, "forward-sock: connection open");
        let mut remote = channel.into_stream();
        match tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut remote, RELAY_BUF, RELAY_BUF)
            .await
        {
            Ok((to_guest, to_host)) => {
                debug!(forward = %self.f, to_guest, to_host, "forward-sock: connection done")
            }
            Err(e) => debug!(forward = %self.f, "forward-sock: connection ended: {e}"),
        }
        // Dropping `remote` closes the channel; dropping `conn` closes the host socket.
    }

    /// Opens a channel to the guest socket, making or remaking the session as needed.
    async fn open(&self) -> Result<russh::Channel<client::Msg>> {
        let mut last = anyhow!("no attempt made");
        for attempt in 1..=OPEN_ATTEMPTS {
            let session = self.session().await?;
            match tokio::time::timeout(
                OPEN_TIMEOUT,
                session.channel_open_direct_streamlocal(self.f.dest.as_str()),
            )
            .await
            {
                Ok(Ok(channel)) => return Ok(channel),
                Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                    // The session is fine; the guest refused (its socket may not exist yet).
                    last = anyhow!("guest refused to connect to {}: {reason:?}", self.f.dest);
                    if attempt < OPEN_ATTEMPTS {
                        tokio::time::sleep(OPEN_PAUSE).await;
                    }
                }
                Ok(Err(e)) => {
                    // The session is gone (sshd restarted, guest rebooted): make a new one.
                    debug!(forward = %self.f, "forward-sock: SSH session lost: {e}");
                    last = anyhow!("opening a channel to {}: {e}", self.f.dest);
                    self.drop_session(&session).await;
                }
                Err(_) => {
                    last = anyhow!(
                        "opening a channel to {}: no answer in {OPEN_TIMEOUT:?}",
                        self.f.dest
                    );
                    self.drop_session(&session).await;
                }
            }
        }
        Err(last)
    }

    /// The live session, made now if there is none or it has closed.
    async fn session(&self) -> Result<Arc<Handle<Client>>> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
            debug!(forward = %self.f, "forward-sock: SSH session closed; reconnecting");
        }
        *slot = None;
        let s = Arc::new(self.connect().await?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forgets `dead` if it is still the current session. Channels open on it keep it alive
    /// until they close.
    async fn drop_session(&self, dead: &Arc<Handle<Client>>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, dead)) {
            *slot = None;
        }
    }

    /// Makes a session, retrying with backoff while sshd is not answering.
    async fn connect(&self) -> Result<Handle<Client>> {
        let mut pause = BACKOFF_FIRST;
        for attempt in 1..=CONNECT_ATTEMPTS {
            let err = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_once()).await {
                Ok(Ok(session)) => {
                    let ssh = self.ssh;
                    info!(
                        forward = %self.f,
                        attempt,
                        "forward-sock: SSH session to {ssh} established"
                    );
                    return Ok(session);
                }
                Ok(Err(ConnectError::Refused(e))) => return Err(e),
                Ok(Err(ConnectError::Retry(e))) => e,
                Err(_) => anyhow!("no SSH session in {CONNECT_TIMEOUT:?}"),
            };
            if attempt == CONNECT_ATTEMPTS {
                return Err(err.context(format!(
                    "giving up on sshd at {} after {attempt} attempts",
                    self.ssh
                )));
            }
            let ssh = self.ssh;
            debug!(
                forward = %self.f,
                "forward-sock: waiting for sshd at {ssh}: {err:#} (retry in {pause:?})"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKOFF_MAX);
        }
        unreachable!("the last attempt returns")
    }

    async fn connect_once(&self) -> Result<Handle<Client>, ConnectError> {
        let retry =
            |what: &'static str| move |e: russh::Error| ConnectError::Retry(anyhow!("{what}: {e}"));
        let mut session = client::connect(self.config.clone(), self.ssh, Client)
            .await
            .map_err(retry("connecting"))?;
        let hash = if self.key.algorithm().is_rsa() {
            session
                .best_supported_rsa_hash()
                .await
                .map_err(retry("negotiating"))?
                .flatten()
        } else {
            None
        };
        let auth = session
            .authenticate_publickey(
                self.f.user.as_str(),
                PrivateKeyWithHashAlg::new(self.key.clone(), hash),
            )
            .await
            .map_err(retry("authenticating"))?;
        if !auth.success() {
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
            return Err(ConnectError::Refused(anyhow!(
                "sshd at {} refused user {} with the key {}",
                self.ssh,
                self.f.user,
                self.f.identity.display()
            )));
        }
        Ok(session)
    }
}
