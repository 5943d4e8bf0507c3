//! Relay authentication end to end: gateways with client certificates (mTLS) instead of
//! tokens, over the real gateway binary and over a bare HTTPS client; and read tokens that
//! may query punches but never send them.

mod uplink_support;

use std::collections::BTreeSet;
use std::time::Duration;

use outpost_protocol::frame::decode_ack;
use outpost_tests::pki::{https, ClientCert, Pki};
use outpost_tests::relay::{batch, error_code, frame, punches, records, Relay, StoreKind};
use uplink_support::*;

/// `gateway add ID --site SITE --cert FILE` through the real CLI.
fn add_cert_gateway(relay: &Relay, id: &str, site: &str, cert: &ClientCert) {
    let path = cert.cert_file.display().to_string();
    let out = relay
        .cli(&["gateway", "add", id, "--site", site, "--cert", &path])
        .unwrap();
    assert!(
        out.status.success(),
        "gateway add --cert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let fp = outpost_relay::auth::cert_fingerprint(&cert.der);
    assert!(text.contains(&hex(&fp)), "prints the fingerprint: {text}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// POST `body` to /v1/batches over TLS presenting `cert` (and `token` if given).
fn post_tls(
    relay: &Relay,
    pki: &Pki,
    cert: Option<&ClientCert>,
    token: Option<&str>,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    https(
        relay.addr,
        pki.client_config(cert),
        "POST",
        "/v1/batches",
        &headers,
        body,
    )
}

/// Waits until the relay has reloaded its gateways file: an empty body from `cert` gets
/// 400 (authenticated, bad frame) when `known`, 401 when not.
fn wait_cert(relay: &Relay, pki: &Pki, cert: &ClientCert, known: bool) {
    let ok = wait_until(
        Duration::from_secs(20),
        || matches!(post_tls(relay, pki, Some(cert), None, b""), Ok((s, _)) if (s != 401) == known),
    );
    assert!(ok, "the relay did not pick up the gateways file change");
}

#[test]
fn a_gateway_with_a_client_certificate_and_no_token_delivers_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let relay = Relay::start_tls(
        StoreKind::Sled,
        &pki,
        true,
        &[("OUTPOST_LIMITS__MAX_QUERY_LIMIT", "10000")],
    )
    .unwrap();
    let cert = pki.client("gw-cert");
    add_cert_gateway(&relay, "gw-cert", "HC001", &cert);
    wait_cert(&relay, &pki, &cert, true);

    let url = format!("wss://localhost:{}", relay.addr.port());
    let (ca, c, k) = (
        pki.ca_file.display().to_string(),
        cert.cert_file.display().to_string(),
        cert.key_file.display().to_string(),
    );
    let no_token = dir.path().join("no-such.token").display().to_string();
    let mut gw = gateway(
        &dir.path().join("gw"),
        &url,
        "unused",
        &[
            ("OUTPOST_GATEWAY__ID", "gw-cert"),
            ("OUTPOST_UPLINK__CA_FILE", &ca),
            ("OUTPOST_UPLINK__CLIENT_CERT_FILE", &c),
            ("OUTPOST_UPLINK__CLIENT_KEY_FILE", &k),
            ("OUTPOST_UPLINK__TOKEN_FILE", &no_token),
        ],
    );
    gw.start();
    let sent: BTreeSet<_> = post(&gw, "door-1", 1..401);
    assert_eq!(sent.len(), 400);
    assert!(
        wait_drained(&gw, Duration::from_secs(60)),
        "{}",
        status(&gw)["uplink"]
    );
    assert_exactly_once(&relay, "gw-cert", &sent);
    assert_eq!(relay_count(&relay, "gw-cert"), 400);
}

#[test]
fn client_certificates_are_verified_registered_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let stranger_ca = Pki::new(dir.path(), "stranger");
    let relay = Relay::start_tls(StoreKind::Sled, &pki, true, &[]).unwrap();
    let cert = pki.client("gw-cert");
    add_cert_gateway(&relay, "gw-cert", "HC001", &cert);
    wait_cert(&relay, &pki, &cert, true);
    let good = frame(&batch("gw-cert", "HC001", 5, records(&punches(1..=20), 1)));

    // The registered certificate, no token: stored and acked.
    let (s, body) = post_tls(&relay, &pki, Some(&cert), None, &good).unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(decode_ack(&body).unwrap().acked_through, 20);

    // The certificate speaks for its gateway and site only.
    let other_site = frame(&batch(
        "gw-cert",
        "HC002",
        5,
        records(&punches(21..=30), 21),
    ));
    let (s, body) = post_tls(&relay, &pki, Some(&cert), None, &other_site).unwrap();
    assert_eq!((s, error_code(&body).as_str()), (403, "site_mismatch"));

    // Same CA, not registered: authenticated by TLS, refused by the relay.
    let unknown = pki.client("gw-unknown");
    let (s, body) = post_tls(&relay, &pki, Some(&unknown), None, &good).unwrap();
    assert_eq!(s, 401);
    assert!(
        String::from_utf8_lossy(&body).contains("not registered"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // A certificate from another CA never gets through the handshake (or gets no answer).
    let forged = stranger_ca.client("gw-cert");
    let r = post_tls(&relay, &pki, Some(&forged), None, &good);
    assert!(r.is_err(), "a foreign certificate was answered: {r:?}");

    // Neither certificate nor token: 401.
    let (s, _) = post_tls(&relay, &pki, None, None, &good).unwrap();
    assert_eq!(s, 401);

    // Token gateways keep working on the same listener; a token is judged by itself.
    let token = relay.add_gateway("gw-tok", "HC009").unwrap();
    let tok_batch = frame(&batch("gw-tok", "HC009", 6, records(&punches(1..=5), 1)));
    let (s, _) = post_tls(&relay, &pki, None, Some(&token), &tok_batch).unwrap();
    assert_eq!(s, 200);
    let (s, _) = post_tls(&relay, &pki, Some(&cert), Some(&token), &good).unwrap();
    assert_eq!(
        s, 403,
        "the token's gateway is gw-tok, not the batch's gw-cert"
    );

    // Revoking the gateway revokes its certificate.
    relay.revoke_gateway("gw-cert").unwrap();
    wait_cert(&relay, &pki, &cert, false);
    let (s, _) = post_tls(&relay, &pki, Some(&cert), None, &good).unwrap();
    assert_eq!(s, 401);

    // Everything stored exactly once: 20 from the certificate, 5 from the token.
    let (s, body) = relay.admin_get("/v1/punches?limit=1000").unwrap();
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 25);
}

#[test]
fn read_tokens_query_but_never_send() {
    let relay = Relay::start(StoreKind::Sled, &[]).unwrap();
    let token = relay.add_gateway("gw-1", "HC001").unwrap();
    let gw_auth = format!("Bearer {token}");
    let f = frame(&batch("gw-1", "HC001", 1, records(&punches(1..=30), 1)));
    let (s, _) = relay
        .request("POST", "/v1/batches", &[("Authorization", &gw_auth)], &f)
        .unwrap();
    assert_eq!(s, 200);

    let reader = relay.add_reader("payroll").unwrap();
    assert!(reader.starts_with("opr_"), "{reader}");
    let auth = format!("Bearer {reader}");
    let get = |path: &str, auth: &str| {
        relay
            .request("GET", path, &[("Authorization", auth)], b"")
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(20), || get("/v1/punches", &auth).0
            == 200),
        "the relay did not pick up the new read token"
    );
    let (_, body) = get("/v1/punches?site=HC001", &auth);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 30);
    let (s, csv) = get("/v1/punches.csv", &auth);
    assert_eq!(s, 200);
    assert_eq!(
        String::from_utf8_lossy(&csv).lines().count(),
        31,
        "header + 30"
    );
    assert_eq!(get("/v1/gateways", &auth).0, 200);
    assert_eq!(get("/v1/conflicts", &auth).0, 200);

    // A read token is not a gateway credential.
    let more = frame(&batch("gw-1", "HC001", 1, records(&punches(31..=40), 31)));
    let (s, body) = relay
        .request("POST", "/v1/batches", &[("Authorization", &auth)], &more)
        .unwrap();
    assert_eq!((s, error_code(&body).as_str()), (401, "unauthorized"));
    // And a gateway token is not a read token.
    assert_eq!(get("/v1/punches", &gw_auth).0, 401);
    assert_eq!(get("/v1/punches", "Bearer opr_wrong").0, 401);

    // Listing shows the name, never the token; revoking takes effect live.
    let out = relay.cli(&["reader", "list"]).unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("payroll") && !listed.contains(&reader),
        "{listed}"
    );
    let out = relay.cli(&["reader", "revoke", "payroll"]).unwrap();
    assert!(out.status.success());
    assert!(
        wait_until(Duration::from_secs(20), || get("/v1/punches", &auth).0
            == 401),
        "the revoked read token still works"
    );
    // The admin token is unaffected.
    assert_eq!(relay.admin_get("/v1/punches").unwrap().0, 200);
}
