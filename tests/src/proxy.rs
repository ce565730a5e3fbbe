//! A TCP proxy that can cut every connection through it, for partitions
//! (the transport-level fault injection TiKV uses, in its simplest form).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    open: Mutex<bool>,
    /// Where new connections go; [`Proxy::retarget`] changes it (a
    /// restarted master on another port).
    target: Mutex<SocketAddr>,
    /// While set, connections stay open but no byte is forwarded: the
    /// peers see silence, not a reset (missed heartbeats, not a lost stream).
    stalled: tokio::sync::watch::Sender<bool>,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            open: Mutex::new(true),
            target: Mutex::new(target),
            stalled: tokio::sync::watch::channel(false).0,
            connections: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !*s.open.lock().expect("proxy lock") {
                    drop(inbound); // partitioned: refuse by closing
                    continue;
                }
                let stalled = s.stalled.subscribe();
                let target = *s.target.lock().expect("proxy lock");
                let conn = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pipe(ri, wo, stalled.clone()) => {}
                            _ = pipe(ro, wi, stalled) => {}
                        }
                    }
                });
                let mut conns = s.connections.lock().expect("proxy lock");
                conns.retain(|c| !c.is_finished());
                conns.push(conn);
            }
        });
        Proxy {
            address,
            shared,
            accept,
        }
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        *self.shared.open.lock().expect("proxy lock") = false;
        for c in self
            .shared
            .connections
            .lock()
            .expect("proxy lock")
            .drain(..)
        {
            c.abort();
        }
    }

    /// Sends new connections to `target` from now on (existing ones keep
    /// their peer until they end).
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().expect("proxy lock") = target;
    }

    pub fn restore(&self) {
        *self.shared.open.lock().expect("proxy lock") = true;
        self.shared.stalled.send_replace(false);
    }

    /// Stops forwarding without closing anything, until [`Proxy::restore`].
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    pub fn shutdown(&self) {
        self.cut();
        self.accept.abort();
    }
}

/// Copies `from` to `to`, pausing while `stalled` is set.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Data read just before a stall is held back until it lifts.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}
