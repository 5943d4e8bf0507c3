//! A fault-injecting TCP proxy for uplink tests, on 127.0.0.1.
//!
//! [`Proxy::start`] listens on a random port and forwards every connection to `upstream`.
//! While it runs, a test can, at any moment:
//!
//! - add latency each way ([`Proxy::set_delay`]), which keeps throughput (a pipe with
//!   latency, not a sleep per read);
//! - stall every connection: bytes are held, not forwarded, until released
//!   ([`Proxy::set_stalled`]);
//! - drop everything the relay sends back, so acks are lost while batches still arrive
//!   ([`Proxy::set_drop_down`]);
//! - reset every open connection with an RST ([`Proxy::reset_all`]);
//! - cut the next connection that sends data after `n` more upstream bytes, i.e. in the
//!   middle of a frame ([`Proxy::cut_after`]);
//! - refuse new connections (accept and reset at once) ([`Proxy::set_refusing`]).
//!
//! It counts the bytes forwarded each way ([`Proxy::bytes_up`], [`Proxy::bytes_down`]),
//! which is how the benchmark measures bytes on the wire. It runs on its own tokio runtime
//! thread, so synchronous tests can use it; dropping the [`Proxy`] stops it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The shared fault switches.
#[derive(Default)]
struct Faults {
    delay_ms: AtomicU64,
    stalled: AtomicBool,
    drop_down: AtomicBool,
    refusing: AtomicBool,
    /// 0 = no cut pending; else forward this many more upstream bytes, then cut.
    cut_after: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    connections: AtomicU64,
    resets: AtomicU64,
}

/// A running proxy (stopped on drop).
pub struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    reset_tx: watch::Sender<u64>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` on a random port of 127.0.0.1.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy addr");
        let faults = Arc::new(Faults::default());
        let (reset_tx, reset_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let f = faults.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        if f.refusing.load(Ordering::SeqCst) {
                            rst_on_close(&client);
                            drop(client);
                            continue;
                        }
                        f.connections.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve(client, upstream, f.clone(), reset_rx.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        Proxy {
            addr,
            faults,
            reset_tx,
            stop_tx: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://addr/v1/uplink`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/uplink", self.addr)
    }

    /// Latency added to each direction.
    pub fn set_delay(&self, d: Duration) {
        self.faults
            .delay_ms
            .store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds (true) or releases (false) every byte in both directions.
    pub fn set_stalled(&self, on: bool) {
        self.faults.stalled.store(on, Ordering::SeqCst);
    }

    /// Drops (true) every byte from the relay to the gateway: acks are lost.
    pub fn set_drop_down(&self, on: bool) {
        self.faults.drop_down.store(on, Ordering::SeqCst);
    }

    /// Refuses (true) new connections: accepted and reset at once.
    pub fn set_refusing(&self, on: bool) {
        self.faults.refusing.store(on, Ordering::SeqCst);
    }

    /// Resets every open connection (RST both ways).
    pub fn reset_all(&self) {
        self.faults.resets.fetch_add(1, Ordering::SeqCst);
        self.reset_tx.send_modify(|g| *g += 1);
    }

    /// Cuts the connection that next sends upstream after `n` more bytes (n ≥ 1): with
    /// frames in flight, that is in the middle of one.
    pub fn cut_after(&self, n: u64) {
        self.faults.cut_after.store(n.max(1), Ordering::SeqCst);
    }

    /// Bytes forwarded gateway → relay.
    pub fn bytes_up(&self) -> u64 {
        self.faults.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded relay → gateway.
    pub fn bytes_down(&self) -> u64 {
        self.faults.bytes_down.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.faults.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.reset_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes closing `s` send an RST (SO_LINGER 0) rather than a FIN, as a broken link does.
/// With a zero linger time, close never blocks (the reason tokio deprecates `set_linger`).
#[allow(deprecated)]
fn rst_on_close(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    f: Arc<Faults>,
    mut reset: watch::Receiver<u64>,
) {
    reset.borrow_and_update();
    let Ok(server) = TcpStream::connect(upstream).await else {
        rst_on_close(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    rst_on_close(&client);
    rst_on_close(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, f.clone(), true);
    let down = pump(sr, cw, f.clone(), false);
    // Either direction ending, or a reset, ends the connection (both halves dropped: RST).
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = reset.changed() => {}
    }
}

/// Copies `from` → `to` through a latency line: a reader stamps each chunk with its due
/// time, a writer sends it then.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
    upstream: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let fr = f.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut chunk = buf[..n].to_vec();
            if !upstream && fr.drop_down.load(Ordering::SeqCst) {
                continue;
            }
            let mut cut = false;
            if upstream {
                let pending = fr.cut_after.load(Ordering::SeqCst);
                if pending > 0 {
                    let keep = pending.min(chunk.len() as u64);
                    let left = pending - keep;
                    if fr
                        .cut_after
                        .compare_exchange(pending, left, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                        && left == 0
                    {
                        chunk.truncate(keep as usize);
                        cut = true;
                    }
                }
            }
            let due = tokio::time::Instant::now()
                + Duration::from_millis(fr.delay_ms.load(Ordering::SeqCst));
            if tx.send((due, chunk)).is_err() {
                return;
            }
            if cut {
                // Let the writer forward the partial frame, then end this connection.
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            while f.stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            let counter = if upstream { &f.bytes_up } else { &f.bytes_down };
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    };
    // The reader ending (EOF, error, cut) closes the channel; the writer drains what is
    // queued and ends too.
    tokio::join!(reader, writer);
}
