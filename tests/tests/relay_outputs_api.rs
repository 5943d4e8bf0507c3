//! The outputs' operations API on the real relay: who may list (admin or read token),
//! who may replay and enable (admin only), a clear 404 for an unknown output, and the
//! `outpost-relay outputs` CLI over plain HTTP and over TLS (where it accepts exactly the
//! relay's own certificate).

use std::time::{Duration, Instant};

use outpost_tests::pki::Pki;
use outpost_tests::relay::{error_code, Relay, StoreKind};

fn get(relay: &Relay, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    relay.request("GET", path, &headers, b"").unwrap()
}

fn post(relay: &Relay, path: &str, token: Option<&str>, body: &str) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    relay
        .request("POST", path, &headers, body.as_bytes())
        .unwrap()
}

#[test]
fn outputs_api_auth_and_unknown_names() {
    let relay = Relay::start(StoreKind::Sled, &[]).unwrap();
    let reader = relay.add_reader("payroll").unwrap();
    let admin = relay.admin_token.clone();
    // The relay picks the new read token up within auth.reload_interval_ms.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&relay, "/v1/gateways", Some(&reader)).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the relay did not pick up the read token"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let (s, body) = get(&relay, "/v1/outputs", None);
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&body));
    let (s, _) = get(&relay, "/v1/outputs", Some("opr_not-a-token"));
    assert_eq!(s, 401);
    for token in [&reader, &admin] {
        let (s, body) = get(&relay, "/v1/outputs", Some(token));
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"outputs": []}));
    }

    // Replay and enable: admin only, checked before the name.
    for path in ["/v1/outputs/payroll/replay", "/v1/outputs/payroll/enable"] {
        let (s, _) = post(&relay, path, None, r#"{"from": 0}"#);
        assert_eq!(s, 401, "{path} without a token");
        let (s, _) = post(&relay, path, Some(&reader), r#"{"from": 0}"#);
        assert_eq!(s, 401, "{path} with a read token");
        let (s, body) = post(&relay, path, Some(&admin), r#"{"from": 0}"#);
        assert_eq!(s, 404, "{path}: {}", String::from_utf8_lossy(&body));
        assert_eq!(error_code(&body), "unknown_output");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("no output is named \\\"payroll\\\"")
                && text.contains("none are configured"),
            "{text}"
        );
    }

    let out = relay.cli(&["outputs"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no outputs are configured"));
    let out = relay.cli(&["outputs", "--json"]).unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outputs"], serde_json::json!([]));
}

#[test]
fn the_outputs_cli_talks_tls_to_its_own_relay() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "localhost");
    let relay = Relay::start_tls(StoreKind::Sled, &pki, false, &[]).unwrap();
    let out = relay.cli(&["outputs"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no outputs are configured"));
    // Another certificate configured: the CLI refuses the relay's.
    let other = Pki::new(dir.path(), "other");
    let out = relay
        .cli_command()
        .env("OUTPOST_TLS__CERT_FILE", &other.cert_file)
        .args(["outputs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the one in tls.cert_file"), "{err}");
}
