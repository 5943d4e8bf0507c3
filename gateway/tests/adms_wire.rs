//! The ADMS router on a real socket, spoken to byte for byte as a terminal does (raw
//! HTTP/1.1 over TCP, `User-Agent: iClock Proxy/1.09`, text body, keep-alive).

use outpost_gateway::clock::{Clock, RelayTime};
use outpost_gateway::committer;
use outpost_gateway::ingest::adms::{router, AdmsConfig, AdmsDevice, AdmsState, UtcOffset};
use outpost_gateway::journal::{Journal, JournalConfig};
use outpost_gateway::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(s: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8(buf[end + 4..end + 4 + len].to_vec()).unwrap();
            return (head, body);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn terminal_session_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path().join("journal"), &JournalConfig::default()).unwrap();
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (handle, _task) = committer::spawn(journal.clone(), metrics.clone(), shutdown.clone());
    let mut cfg = AdmsConfig::default();
    cfg.devices.insert(
        "BJ2C190360017".into(),
        AdmsDevice {
            name: Some("Gate".into()),
            utc_offset: UtcOffset::parse("+03:00"),
        },
    );
    let state = AdmsState::new(
        cfg,
        dir.path(),
        handle,
        Clock::new(),
        RelayTime::default(),
        metrics,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, router(state)).await.unwrap();
    });

    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = format!(
        "GET /iclock/cdata?SN=BJ2C190360017&options=all&pushver=2.4.1&language=69 HTTP/1.1\r\n\
         Host: {addr}\r\nUser-Agent: iClock Proxy/1.09\r\nConnection: Keep-Alive\r\nAccept: */*\r\n\r\n"
    );
    s.write_all(hello.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        head.to_ascii_lowercase().matches("\r\ndate: ").count(),
        1,
        "{head}"
    );
    assert!(
        body.starts_with("GET OPTION FROM: BJ2C190360017\n"),
        "{body}"
    );
    assert!(body.contains("\nTimeZone=3\n"), "{body}");

    let punches = "8\t2024-05-20 08:30:00\t0\t1\t0\t0\t0\t255\t0\t0\n9\t2024-05-20 08:31:00\t1\t15\t0\t0\t0\t255\t0\t0\n";
    let post = format!(
        "POST /iclock/cdata?SN=BJ2C190360017&table=ATTLOG&Stamp=9999 HTTP/1.1\r\n\
         Host: {addr}\r\nUser-Agent: iClock Proxy/1.09\r\nConnection: Keep-Alive\r\nAccept: */*\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{punches}",
        punches.len()
    );
    s.write_all(post.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "OK: 2");

    s.write_all(format!("GET /iclock/getrequest?SN=BJ2C190360017 HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: iClock Proxy/1.09\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "OK");

    let recs = journal.read_from(0, 100, usize::MAX).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].punch.device_id.as_str(), "zk:BJ2C190360017");
    // 08:30 at +03:00 = 05:30Z
    assert_eq!(recs[0].punch.device_time_ms, 1_716_183_000_000);
    shutdown.cancel();
    server.abort();
}
