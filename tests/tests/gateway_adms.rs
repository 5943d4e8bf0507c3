//! End to end: a ZKTeco terminal's requests, sent with `curl` exactly as the terminal sends
//! them (same query strings, `User-Agent: iClock Proxy/1.09`, text body), reach the
//! journal of a real gateway process.

use std::process::Command;

use outpost_tests::gateway::Gateway;

const SN: &str = "CQUJ230160001";
const UA: &str = "iClock Proxy/1.09";

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "-A", UA])
        .args(args)
        .output()
        .expect("curl is installed (tests/run installs it)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

#[test]
fn terminal_pushes_with_curl_and_punches_reach_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::new(
        dir.path(),
        &[
            ("OUTPOST_ADMS__ENABLED", "true"),
            ("OUTPOST_ADMS__DEFAULT_UTC_OFFSET", "+02:00"),
            (&format!("OUTPOST_ADMS__DEVICES__{SN}__NAME"), "Main gate"),
        ],
    );
    gw.start();
    let base = format!("http://{}", gw.addr);

    // Handshake (push firmware): the option text names the terminal, and a Date header is sent.
    let (head, body) = curl(&[&format!(
        "{base}/iclock/cdata?SN={SN}&options=all&pushver=2.4.1&language=69"
    )]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("\ndate: "), "{head}");
    assert!(
        body.starts_with(&format!("GET OPTION FROM: {SN}")),
        "{body}"
    );
    assert!(body.contains("ATTLOGStamp="), "{body}");

    // Two punches, CRLF, 7 fields; then the same body again (a resend).
    let attlog =
        "1001\t2026-11-22 07:58:03\t0\t1\t0\t0\t0\r\n1002\t2026-11-22 08:01:00\t1\t15\t0\t0\t0\r\n";
    let url = format!("{base}/iclock/cdata?SN={SN}&table=ATTLOG&Stamp=9999");
    for _ in 0..2 {
        let (head, body) = curl(&[
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            attlog,
            &url,
        ]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.trim(), "OK: 2");
    }
    // Operation log: accepted, nothing stored.
    let (_, body) = curl(&[
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        "OPLOG 4\t0\t2026-11-22 07:00:00\t0\t0\t0\t0\n",
        &format!("{base}/iclock/cdata?SN={SN}&table=OPERLOG&OpStamp=9999"),
    ]);
    assert!(body.trim().starts_with("OK"), "{body}");
    assert_eq!(
        curl(&[&format!("{base}/iclock/getrequest?SN={SN}")])
            .1
            .trim(),
        "OK"
    );
    // An unlisted terminal is refused.
    let (head, _) = curl(&[&format!("{base}/iclock/getrequest?SN=NOTLISTED1")]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let records = gw.export();
    assert_eq!(
        records.len(),
        2,
        "resend stored once, OPERLOG ignored: {records:?}"
    );
    let first = &records[0];
    assert_eq!(first["device_id"], format!("zk:{SN}"));
    assert_eq!(first["subject"], "1001");
    assert_eq!(first["kind"], "in");
    assert_eq!(first["time"], "2026-11-22T07:58:03+02:00");
    assert_eq!(records[1]["kind"], "out");
    assert_eq!(records[1]["verify"], "face");
    assert_eq!(first["source"], "adms");
}
