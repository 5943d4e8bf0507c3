//! Site-scoped read tokens end to end, on the real relay binary with the embedded store
//! and with PostgreSQL: a token issued with `reader add NAME --site HC001` reads HC001 and
//! nothing of HC002 through every read route (punches as JSON with and without `site=`,
//! CSV, conflicts, rejected records, gateways); naming HC002 is 403. Tokens without a
//! scope, the admin token, and a token from a readers file written before scopes existed
//! read both sites.
//!
//! HC002's rows come first and outnumber a page (more than 100 conflicts and rejected
//! records, 150 punches before HC001's), so a filter applied to a page after the store
//! returned it would show up as short or empty pages.

use serde_json::Value;

use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{
    batch, error_code, frame, punch, punches, record, records, Relay, StoreKind,
};

/// Everything one token can read, fetched through every read route.
#[derive(Debug)]
struct View {
    /// `/v1/punches?limit=7`, every page.
    punches: Vec<Value>,
    /// The sizes of those pages.
    page_sizes: Vec<usize>,
    /// `/v1/punches.csv` data lines.
    csv: Vec<String>,
    /// `/v1/conflicts`, every page.
    conflicts: Vec<Value>,
    /// `/v1/rejected`, every page.
    rejected: Vec<Value>,
    /// `/v1/gateways`.
    gateways: Vec<Value>,
}

fn get(relay: &Relay, token: &str, path: &str) -> (u16, Vec<u8>) {
    let auth = format!("Bearer {token}");
    relay
        .request("GET", path, &[("Authorization", &auth)], b"")
        .unwrap()
}

fn get_json(relay: &Relay, token: &str, path: &str) -> Value {
    let (s, body) = get(relay, token, path);
    assert_eq!(s, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Every page of `path` (which has a `?`), following `next_cursor`: items and page sizes.
fn pages(relay: &Relay, token: &str, path: &str) -> (Vec<Value>, Vec<usize>) {
    let (mut items, mut sizes) = (Vec::new(), Vec::new());
    let mut cursor = String::new();
    loop {
        let page = get_json(relay, token, &format!("{path}&cursor={cursor}"));
        let these = page["items"].as_array().unwrap();
        sizes.push(these.len());
        items.extend(these.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return (items, sizes),
        }
    }
}

fn view(relay: &Relay, token: &str) -> View {
    let (punches, page_sizes) = pages(relay, token, "/v1/punches?limit=7");
    let (s, csv) = get(relay, token, "/v1/punches.csv");
    assert_eq!(s, 200);
    let csv = String::from_utf8(csv).unwrap();
    let mut lines = csv.lines().map(str::to_string);
    assert!(lines.next().unwrap().starts_with("site,"), "{csv}");
    View {
        punches,
        page_sizes,
        csv: lines.collect(),
        conflicts: pages(relay, token, "/v1/conflicts?").0,
        rejected: pages(relay, token, "/v1/rejected?").0,
        gateways: get_json(relay, token, "/v1/gateways")["gateways"]
            .as_array()
            .unwrap()
            .clone(),
    }
}

/// How many of `rows` belong to `site`, and whether any belongs to another one.
fn count_site(rows: &[Value], site: &str) -> (usize, bool) {
    let mine = rows.iter().filter(|r| r["site"] == site).count();
    (mine, mine < rows.len())
}

fn post(relay: &Relay, token: &str, b: &outpost_protocol::Batch) {
    let auth = format!("Bearer {token}");
    let (s, body) = relay
        .request(
            "POST",
            "/v1/batches",
            &[("Authorization", &auth)],
            &frame(b),
        )
        .unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
}

/// Records `seq..` of punches with the same keys as `punches(range)` but another subject
/// (conflicts), then as many invalid punches (rejected).
fn conflicts_and_invalid(
    range: std::ops::RangeInclusive<u64>,
    first_seq: u64,
) -> Vec<outpost_protocol::Record> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    for mut p in punches(range.clone()) {
        p.subject_id = outpost_tests::relay::id("EMP-CHANGED");
        out.push(record(p, seq));
        seq += 1;
    }
    for n in range {
        let mut bad = punch("dev-bad", n, "EMP-0001", 0);
        bad.device_time_ms = 5;
        out.push(record(bad, seq));
        seq += 1;
    }
    out
}

fn scoped_readers_see_only_their_sites(store: StoreKind) {
    let relay = Relay::start(store, &[]).unwrap();

    // A readers file from before scopes: three fields, meaning every site.
    let legacy = "opr_legacy-0123456789abcdef";
    std::fs::write(
        relay.data_dir.join("readers"),
        format!(
            "# Outpost relay read tokens: name TAB sha256(token) TAB added_ms\nlegacy\t{}\t1\n",
            outpost_ops::token::token_hash_hex(legacy)
        ),
    )
    .unwrap();
    relay.wait_reader(legacy).unwrap();

    let a = relay.add_gateway("gw-a", "HC001").unwrap();
    let b = relay.add_gateway("gw-b", "HC002").unwrap();
    // HC002 first and in bulk, HC001 in between, HC002 again after.
    post(
        &relay,
        &b,
        &batch("gw-b", "HC002", 1, records(&punches(1..=150), 1)),
    );
    post(
        &relay,
        &a,
        &batch("gw-a", "HC001", 1, records(&punches(1..=20), 1)),
    );
    post(
        &relay,
        &b,
        &batch("gw-b", "HC002", 1, conflicts_and_invalid(1..=101, 151)),
    );
    let mut rs = conflicts_and_invalid(1..=1, 21);
    rs.extend(records(&punches(21..=30), 23));
    post(&relay, &a, &batch("gw-a", "HC001", 1, rs));
    post(
        &relay,
        &b,
        &batch("gw-b", "HC002", 1, records(&punches(151..=160), 353)),
    );

    let hc1 = relay.add_scoped_reader("hc1", &["HC001"]).unwrap();
    let both = relay
        .add_scoped_reader("both", &["HC002", "HC001"])
        .unwrap();
    let all = relay.add_reader("all").unwrap();

    // The scoped reader: HC001 only, through every route, in full pages.
    let v = view(&relay, &hc1);
    assert_eq!(count_site(&v.punches, "HC001"), (30, false), "{v:?}");
    let (last, full) = v.page_sizes.split_last().unwrap();
    assert!(
        full.iter().all(|&n| n == 7) && *last <= 7,
        "scoped pages must be full while more rows follow: {:?}",
        v.page_sizes
    );
    assert_eq!(v.csv.len(), 30);
    assert!(v.csv.iter().all(|l| l.starts_with("HC001,")), "{:?}", v.csv);
    assert_eq!(count_site(&v.conflicts, "HC001"), (1, false), "{v:?}");
    assert_eq!(count_site(&v.rejected, "HC001"), (1, false), "{v:?}");
    assert_eq!(v.gateways.len(), 1, "{:?}", v.gateways);
    assert_eq!(v.gateways[0]["gateway_id"], "gw-a");
    // Its first page of conflicts already holds its conflict, behind 101 of HC002.
    let page = get_json(&relay, &hc1, "/v1/conflicts");
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["next_cursor"], Value::Null);
    // Naming its own site works; naming another is refused, not answered empty.
    let (own, _) = pages(&relay, &hc1, "/v1/punches?site=HC001&limit=1000");
    assert_eq!(count_site(&own, "HC001"), (30, false));
    for path in [
        "/v1/punches?site=HC002",
        "/v1/punches.csv?site=HC002",
        "/v1/punches?site=HC002&device=dev-1",
    ] {
        let (s, body) = get(&relay, &hc1, path);
        assert_eq!((s, error_code(&body).as_str()), (403, "site_not_allowed"));
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("reader hc1") && text.contains("HC001"),
            "{text}"
        );
    }

    // Two sites: both, and each one by name.
    let v = view(&relay, &both);
    assert_eq!(v.punches.len(), 190);
    assert_eq!((v.conflicts.len(), v.rejected.len()), (102, 102));
    let (hc2, _) = pages(&relay, &both, "/v1/punches?site=HC002&limit=1000");
    assert_eq!(count_site(&hc2, "HC002"), (160, false));

    // No scope, the admin token, and the old file's token: everything.
    for token in [&all, &relay.admin_token, &legacy.to_string()] {
        let v = view(&relay, token);
        assert_eq!(count_site(&v.punches, "HC001"), (30, true));
        assert_eq!(count_site(&v.punches, "HC002"), (160, true));
        assert_eq!(v.csv.len(), 190);
        assert_eq!((v.conflicts.len(), v.rejected.len()), (102, 102));
        assert_eq!(v.gateways.len(), 2);
        let (hc2, _) = pages(&relay, token, "/v1/punches?site=HC002&limit=1000");
        assert_eq!(hc2.len(), 160);
    }

    // `reader list` shows each scope; the file keeps the old reader's line as it was.
    let out = relay.cli(&["reader", "list"]).unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    let scope_of = |name: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&format!("{name}\t")))
            .and_then(|l| l.rsplit('\t').next())
            .map(str::to_string)
    };
    assert_eq!(scope_of("legacy").as_deref(), Some("*"), "{listed}");
    assert_eq!(scope_of("all").as_deref(), Some("*"), "{listed}");
    assert_eq!(scope_of("hc1").as_deref(), Some("HC001"), "{listed}");
    assert_eq!(scope_of("both").as_deref(), Some("HC001 HC002"), "{listed}");
    assert!(!listed.contains(&hc1), "{listed}");
    // Site ids are validated like the rest of the relay's.
    let out = relay
        .cli(&["reader", "add", "bad", "--site", "HC/001"])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid site id"), "{err}");
}

#[test]
fn scoped_readers_see_only_their_sites_sled() {
    scoped_readers_see_only_their_sites(StoreKind::Sled);
}

#[test]
fn scoped_readers_see_only_their_sites_postgres() {
    let pg = PgServer::start_with(false).unwrap();
    scoped_readers_see_only_their_sites(StoreKind::Postgres(pg.url()));
}
