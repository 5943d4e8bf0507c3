//! The real `outpost-relay` on a private PostgreSQL: a database restart during intake,
//! two relay processes sharing one database with a gateway alternating between them, and
//! TLS to the database (`store.tls`, `store.ca_file`).

use std::time::{Duration, Instant};

use outpost_protocol::frame;
use outpost_tests::pki::Pki;
use outpost_tests::postgres::PgServer;
use outpost_tests::proc::{free_port, ChildProc};
use outpost_tests::relay::{
    batch, frame as zframe, post_frame, punches, records, ws_connect, ws_reply, ws_send, Relay,
    Reply, StoreKind,
};

fn count_punches(relay: &Relay, site: &str) -> (usize, std::collections::BTreeSet<u64>) {
    let mut seqs = std::collections::BTreeSet::new();
    let mut n = 0;
    let mut cursor = String::new();
    loop {
        let (s, body) = relay
            .admin_get(&format!(
                "/v1/punches?site={site}&limit=1000&cursor={cursor}"
            ))
            .unwrap();
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for item in page["items"].as_array().unwrap() {
            n += 1;
            seqs.insert(item["seq"].as_u64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return (n, seqs),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_intake_loses_nothing_acked() {
    let mut pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .unwrap();
    let relay = Relay::start(StoreKind::Postgres(pg.url()), &[]).unwrap();
    let token = relay.add_gateway("gw-pg", "HCPG").unwrap();
    let base = relay.http_url();
    const BATCHES: u64 = 40;
    const N: u64 = 50;
    let mut acked = 0u64;
    let mut failures = 0;
    let mut stopped_once = false;
    let mut i = 0u64;
    let started = Instant::now();
    while i < BATCHES {
        if i == 10 && !stopped_once {
            pg.stop();
            stopped_once = true;
        }
        if i == 10 && failures >= 3 && !pg.is_running() {
            pg.start_server().unwrap();
        }
        let first = 1 + i * N;
        let f = zframe(&batch(
            "gw-pg",
            "HCPG",
            3,
            records(&punches(first..=first + N - 1), first),
        ));
        let (s, body) = post_frame(&base, Some(&token), f).await;
        if s == 200 {
            let ack = frame::decode_ack(&body).unwrap();
            assert!(ack.acked_through >= acked, "the watermark never goes back");
            acked = ack.acked_through;
            assert_eq!(acked, first + N - 1);
            i += 1;
        } else {
            assert_eq!(s, 503, "{}", String::from_utf8_lossy(&body));
            failures += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "no progress");
    }
    assert!(failures >= 3, "the database was down for some batches");
    let (n, seqs) = count_punches(&relay, "HCPG");
    assert_eq!(n as u64, BATCHES * N, "every acked record stored once");
    assert_eq!(seqs.len() as u64, BATCHES * N);
    let (_, body) = relay.admin_get("/v1/gateways").unwrap();
    let g: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(g["gateways"][0]["acked_through"], BATCHES * N);
    let (_, body) = outpost_tests::proc::http(relay.addr, "GET", "/metrics", &[], b"").unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains("outpost_relay_batches_total{outcome=\"failed\"}")
    );
    drop(relay);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_store_exactly_once() {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .unwrap();
    let shared = tempfile::tempdir().unwrap();
    let gw_file = shared.path().join("gateways");
    let gw_file_s = gw_file.display().to_string();
    // Both start together: migrations are serialised by an advisory lock.
    let url = pg.url();
    let (a, b) = tokio::task::spawn_blocking(move || {
        let env = [("OUTPOST_AUTH__GATEWAYS_FILE", gw_file_s.as_str())];
        std::thread::scope(|s| {
            let a = s.spawn(|| Relay::start(StoreKind::Postgres(url.clone()), &env).unwrap());
            let b = s.spawn(|| Relay::start(StoreKind::Postgres(url.clone()), &env).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        })
    })
    .await
    .unwrap();
    let t1 = a.add_gateway("gw-1", "HC2").unwrap();
    b.wait_token(&t1, true).unwrap();
    let t2 = a.add_gateway("gw-2", "HC2").unwrap();
    b.wait_token(&t2, true).unwrap();
    let relays = [a.http_url(), b.http_url()];

    // gw-1 alternates relays and resends each batch to the other relay at the same time
    // (a lost ack followed by a failover). gw-2 delivers the same punches (another gateway
    // of the site hearing the same devices) over WebSockets to both relays.
    const BATCHES: u64 = 20;
    const N: u64 = 100;
    let gw1 = {
        let relays = relays.clone();
        let t1 = t1.clone();
        tokio::spawn(async move {
            for i in 0..BATCHES {
                let first = 1 + i * N;
                let f = zframe(&batch(
                    "gw-1",
                    "HC2",
                    1,
                    records(&punches(first..=first + N - 1), first),
                ));
                let (x, y) = tokio::join!(
                    post_frame(&relays[(i % 2) as usize], Some(&t1), f.clone()),
                    post_frame(&relays[((i + 1) % 2) as usize], Some(&t1), f),
                );
                assert_eq!((x.0, y.0), (200, 200));
                let (ax, ay) = (
                    frame::decode_ack(&x.1).unwrap(),
                    frame::decode_ack(&y.1).unwrap(),
                );
                assert_eq!(ax.acked_through.max(ay.acked_through), first + N - 1);
            }
        })
    };
    let ws_urls = [a.ws_url(), b.ws_url()];
    let gw2 = tokio::spawn(async move {
        let mut socks = [
            ws_connect(&ws_urls[0], Some(&t2)).await.unwrap(),
            ws_connect(&ws_urls[1], Some(&t2)).await.unwrap(),
        ];
        for i in 0..BATCHES {
            let first = 1 + i * N;
            let f = zframe(&batch(
                "gw-2",
                "HC2",
                8,
                records(&punches(first..=first + N - 1), 1000 + first),
            ));
            let s = &mut socks[(i % 2) as usize];
            ws_send(s, f).await;
            match ws_reply(s).await {
                Reply::Ack(ack) => assert_eq!(ack.acked_through, 1000 + first + N - 1),
                other => panic!("{other:?}"),
            }
        }
    });
    gw1.await.unwrap();
    gw2.await.unwrap();
    let (n, seqs) = count_punches(&a, "HC2");
    assert_eq!(n as u64, BATCHES * N, "each punch stored exactly once");
    assert_eq!(seqs.len() as u64, BATCHES * N);
    let (_, body) = b.admin_get("/v1/gateways").unwrap();
    let g: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let gws = g["gateways"].as_array().unwrap();
    let total_records: u64 = gws.iter().map(|g| g["records"].as_u64().unwrap()).sum();
    let total_dups: u64 = gws.iter().map(|g| g["duplicates"].as_u64().unwrap()).sum();
    assert_eq!(total_records, BATCHES * N);
    // gw-1 sent everything twice, gw-2 once: 3 deliveries per punch, 1 stored.
    assert_eq!(total_dups, 2 * BATCHES * N);
    assert_eq!(gws[0]["acked_through"], BATCHES * N);
    assert_eq!(gws[1]["acked_through"], 1000 + BATCHES * N);
    drop((a, b));
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

/// Starts a relay on PostgreSQL `url` with `env` that is expected to fail at start; returns
/// its exit status and log.
fn relay_start_failure(url: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = std::process::Command::new(Relay::bin());
    cmd.env_remove("RUST_LOG")
        .env(
            "OUTPOST_RELAY__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("OUTPOST_RELAY__DATA_DIR", &data)
        .env("OUTPOST_TLS__DISABLED", "true")
        .env("OUTPOST_STORE__KIND", "postgres")
        .env("OUTPOST_STORE__URL", url)
        .envs(env.iter().copied())
        .arg("run");
    let mut p = ChildProc::spawn("outpost-relay", cmd, &dir.path().join("relay.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return (status, p.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "the relay was expected to fail at start, but it runs:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Sessions of database `postgres` other than the asking one: (with TLS, without).
fn sessions_by_tls(pg: &PgServer) -> (u64, u64) {
    let out = pg
        .psql(
            "postgres",
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = 'postgres' AND a.backend_type = 'client backend' \
             AND a.pid <> pg_backend_pid()",
        )
        .unwrap();
    let (tls, plain) = out.split_once('|').unwrap();
    (tls.parse().unwrap(), plain.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reaches_postgres_over_verified_tls_only() {
    let certs = tempfile::tempdir().unwrap();
    let pki = Pki::new(certs.path(), "pg");
    let wrong = Pki::new(certs.path(), "wrong");
    let (cert, key) = (pki.cert_file.clone(), pki.key_file.clone());
    let pg = tokio::task::spawn_blocking(move || PgServer::start_ssl(false, &cert, &key))
        .await
        .unwrap()
        .unwrap();
    // store.url names 127.0.0.1: the certificate must carry that address.
    let ca = pki.ca_file.display().to_string();
    let relay = Relay::start(
        StoreKind::Postgres(pg.url()),
        &[
            ("OUTPOST_STORE__TLS", "verify-full"),
            ("OUTPOST_STORE__CA_FILE", &ca),
        ],
    )
    .unwrap();
    let token = relay.add_gateway("gw-tls", "HCTLS").unwrap();
    let f = zframe(&batch("gw-tls", "HCTLS", 1, records(&punches(1..=25), 1)));
    let (s, body) = post_frame(&relay.http_url(), Some(&token), f).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(frame::decode_ack(&body).unwrap().acked_through, 25);
    let (n, seqs) = count_punches(&relay, "HCTLS");
    assert_eq!((n, seqs.len()), (25, 25));
    // The server's view: the relay's pooled sessions are all TLS.
    let (tls, plain) = sessions_by_tls(&pg);
    assert!(tls >= 1, "no TLS session from the relay");
    assert_eq!(plain, 0, "a relay session without TLS");

    // sslmode=require in the URL, store.tls unset: TLS without checking the certificate.
    let by_url = Relay::start(
        StoreKind::Postgres(format!("{}?sslmode=require", pg.url())),
        &[],
    )
    .unwrap();
    assert_eq!(count_punches(&by_url, "HCTLS").0, 25);
    let (tls_now, plain) = sessions_by_tls(&pg);
    assert!(tls_now > tls, "the second relay has its own TLS sessions");
    assert_eq!(plain, 0, "a relay session without TLS");
    drop(by_url);

    // verify-full against a CA that did not issue the server's certificate: no start.
    let wrong_ca = wrong.ca_file.display().to_string();
    let (status, log) = relay_start_failure(
        &pg.url(),
        &[
            ("OUTPOST_STORE__TLS", "verify-full"),
            ("OUTPOST_STORE__CA_FILE", &wrong_ca),
        ],
    );
    assert!(!status.success(), "{log}");
    assert!(log.contains("certificate"), "{log}");
    assert!(log.contains("store.ca_file"), "{log}");
    drop(relay);
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_postgres_without_tls_when_tls_is_required() {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .unwrap();
    let (status, log) = relay_start_failure(&pg.url(), &[("OUTPOST_STORE__TLS", "require")]);
    assert!(!status.success(), "{log}");
    assert!(log.contains("does not accept TLS"), "{log}");
    assert!(log.contains("store.tls"), "{log}");
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
