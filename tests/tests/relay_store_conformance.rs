//! The relay store conformance suite: one generic function over `dyn Store`, run against
//! the sled store and against PostgreSQL (a private server started by the test).

use outpost_relay::store::postgres::PgStore;
use outpost_relay::store::sled::SledStore;
use outpost_relay::store::{
    HeldQuery, Notice, PunchQuery, Store, StreamItem, StreamQuery, StreamRow,
};
use outpost_tests::postgres::PgServer;
use outpost_tests::relay::{anchor, batch, punch, punches, record, records, unsynced_record, T0};

const NOW: i64 = 1_795_400_000_000;

async fn all_punches(store: &dyn Store, q: PunchQuery) -> Vec<outpost_relay::store::PunchRow> {
    let mut out = Vec::new();
    let mut q = q;
    loop {
        let page = store.punches(q.clone()).await.unwrap();
        assert!(page.items.len() <= q.limit);
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => q.after = Some(c),
            None => return out,
        }
    }
}

fn q(limit: usize) -> PunchQuery {
    PunchQuery {
        limit,
        ..PunchQuery::default()
    }
}

/// Held rows (conflicts, rejected) after `after`, at most `limit`, of every site.
fn held(after: Option<u64>, limit: usize) -> HeldQuery {
    HeldQuery {
        after,
        limit,
        sites: None,
    }
}

/// Every rule of docs/design.md's "Deduplication and conflicts" and "Time without a
/// real-time clock" sections (stated in full in `outpost_relay::store`), in one pass.
async fn conformance(store: &dyn Store) {
    store.ready().await.unwrap();

    // A first batch, then its resend: a counted no-op.
    let first = punches(1..=10);
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&first, 1)), NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.duplicates, out.conflicts, out.acked_through),
        (10, 0, 0, 10)
    );
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&first, 1)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates, out.acked_through), (0, 10, 10));

    // Out of order: 21..30 before 11..20; the watermark waits for the gap.
    let later = punches(21..=30);
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&later, 21)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.acked_through), (10, 10));
    let mid = punches(11..=20);
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&mid, 11)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.acked_through), (10, 30));

    // A partially overlapping resend (15..=25): all duplicates.
    let overlap = punches(15..=25);
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&overlap, 15)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates, out.acked_through), (0, 11, 30));

    // A reinstalled box (new epoch, seqs restart at 1) resending the same punches.
    let out = store
        .commit(batch("gw-a", "HC001", 2, records(&first, 1)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates, out.acked_through), (0, 10, 10));

    // Another gateway of the same site delivering some of the same punches plus new ones.
    let mut mixed = punches(26..=30);
    mixed.extend(punches(31..=35));
    let out = store
        .commit(batch("gw-b", "HC001", 9, records(&mixed, 100)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates, out.acked_through), (5, 5, 109));

    // Same punch key, different content: the first stays, the newcomer is a conflict.
    let mut changed = punch("dev-1", 1, "EMP-9999", 1);
    changed.kind = first[0].kind;
    let out = store
        .commit(batch("gw-b", "HC001", 9, vec![record(changed, 110)]), NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.duplicates, out.conflicts, out.acked_through),
        (0, 0, 1, 110)
    );
    // Its resend is a duplicate of the stream, not a second conflict.
    let out = store
        .commit(batch("gw-b", "HC001", 9, vec![record(changed, 110)]), NOW)
        .await
        .unwrap();
    assert_eq!((out.duplicates, out.conflicts), (1, 0));
    let conflicts = store.conflicts(held(None, 100)).await.unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].record.punch, changed);
    assert_eq!(conflicts[0].gateway_id.as_str(), "gw-b");
    let kept = all_punches(store, q(100))
        .await
        .into_iter()
        .find(|r| r.cursor == conflicts[0].kept_cursor)
        .expect("kept punch is listed");
    assert_eq!(kept.record.punch, first[0]);
    assert!(store
        .conflicts(held(Some(conflicts[0].id), 100))
        .await
        .unwrap()
        .is_empty());

    // Inside one batch: the same punch twice (duplicate), and a changed copy (conflict).
    let p = punch("dev-x", 500, "EMP-0500", 5);
    let mut p2 = p;
    p2.subject_id = outpost_tests::relay::id("EMP-0501");
    let out = store
        .commit(
            batch(
                "gw-c",
                "HC001",
                1,
                vec![record(p, 1), record(p, 2), record(p2, 3)],
            ),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.duplicates, out.conflicts, out.acked_through),
        (1, 1, 1, 3)
    );

    // The same device and counter at another site is another punch.
    let out = store
        .commit(batch("gw-z", "HC002", 1, records(&first[..3], 1)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.duplicates), (3, 0));

    // Derived device_seq values (top bit set) round-trip.
    let derived = punch("dev-h", (1 << 63) | 12345, "EMP-0001", 7);
    let out = store
        .commit(batch("gw-z", "HC002", 1, vec![record(derived, 4)]), NOW)
        .await
        .unwrap();
    assert_eq!(out.stored, 1);

    // Time: unsynced records wait for an anchor of their boot.
    let boot = [42u8; 16];
    let t1 = punch("dev-t", 1, "EMP-0001", 60);
    let t2 = punch("dev-t", 2, "EMP-0001", 61);
    let out = store
        .commit(
            batch(
                "gw-t",
                "HC003",
                5,
                vec![
                    unsynced_record(t1, 1, boot, 10_000),
                    unsynced_record(t2, 2, boot, 70_000),
                ],
            ),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out.stored, 2);
    let site_t = |limit| PunchQuery {
        site: Some("HC003".into()),
        ..q(limit)
    };
    let rows = all_punches(store, site_t(10)).await;
    assert!(rows.iter().all(|r| r.corrected_ms.is_none()), "{rows:?}");
    // The anchor arrives with the next batch, which also has a record of the same boot.
    let truth = T0 + 3_600_000;
    let t3 = punch("dev-t", 3, "EMP-0001", 62);
    let mut b = batch(
        "gw-t",
        "HC003",
        5,
        vec![unsynced_record(t3, 3, boot, 100_000)],
    );
    b.anchors = vec![
        anchor(boot, 50_000, truth, 300),
        anchor(boot, 50_000, truth + 7, 900),
    ];
    let out = store.commit(b, NOW).await.unwrap();
    assert_eq!(
        (out.stored, out.corrected_later, out.acked_through),
        (1, 2, 3)
    );
    let rows = all_punches(store, site_t(10)).await;
    let corrected: Vec<Option<i64>> = rows.iter().map(|r| r.corrected_ms).collect();
    assert_eq!(
        corrected,
        vec![
            Some(truth - 40_000),
            Some(truth + 20_000),
            Some(truth + 50_000)
        ]
    );
    // Synced records are corrected to their wall clock.
    let rows = all_punches(
        store,
        PunchQuery {
            device: Some("dev-1".into()),
            site: Some("HC001".into()),
            ..q(3)
        },
    )
    .await;
    assert!(!rows.is_empty());
    assert!(rows
        .iter()
        .all(|r| r.corrected_ms == Some(r.record.received.wall_ms)));

    // Queries: filters and pagination without gaps or overlaps.
    let all = all_punches(store, q(7)).await;
    assert_eq!(all.len(), 35 + 1 + 3 + 1 + 3, "every stored punch once");
    let mut cursors: Vec<u64> = all.iter().map(|r| r.cursor).collect();
    let sorted = cursors.clone();
    cursors.dedup();
    assert_eq!(cursors, sorted, "cursors strictly increase");
    assert!(cursors.windows(2).all(|w| w[0] < w[1]));
    let one_page = store.punches(q(1000)).await.unwrap();
    assert_eq!(one_page.items, all);
    assert_eq!(one_page.next_cursor, None);
    let hc1 = all_punches(
        store,
        PunchQuery {
            site: Some("HC001".into()),
            ..q(4)
        },
    )
    .await;
    assert_eq!(hc1.len(), 36);
    let emp3 = all_punches(
        store,
        PunchQuery {
            site: Some("HC001".into()),
            subject: Some("EMP-0003".into()),
            ..q(100)
        },
    )
    .await;
    let expect: Vec<u64> = (1..=35).filter(|n| n % 20 == 3).collect();
    assert_eq!(
        emp3.iter()
            .map(|r| r.record.punch.device_seq)
            .collect::<Vec<_>>(),
        expect
    );
    let window = all_punches(
        store,
        PunchQuery {
            site: Some("HC001".into()),
            device: Some("dev-2".into()),
            from_ms: Some(T0 + 10 * 60_000),
            to_ms: Some(T0 + 30 * 60_000),
            ..q(2)
        },
    )
    .await;
    assert_eq!(
        window
            .iter()
            .map(|r| r.record.punch.device_seq)
            .collect::<Vec<_>>(),
        vec![10, 22, 26, 14, 18]
    );
    let row = &hc1[0];
    assert_eq!(row.gateway_id.as_str(), "gw-a");
    assert_eq!(row.journal_epoch, 1);
    assert_eq!(row.stored_at_ms, NOW);
    assert_eq!(row.record, record(first[0], 1));
    let json = serde_json::Value::Object(row.to_json());
    assert_eq!(json["device_id"], "dev-1");
    assert_eq!(json["site"], "HC001");
    assert_eq!(json["gateway_seq"], 1);
    assert_eq!(json["time"], "2026-11-22T08:01:00+02:00");
    assert!(json["corrected_time"].is_string());
    assert_eq!(json["device_skew_ms"], -250);
    assert_eq!(json["device_clock_suspect"], false);
    let derived_row = all_punches(
        store,
        PunchQuery {
            device: Some("dev-h".into()),
            ..q(5)
        },
    )
    .await;
    assert_eq!(derived_row[0].record.punch, derived);

    // Gateway list.
    let gws = store.gateways().await.unwrap();
    let ids: Vec<&str> = gws.iter().map(|g| g.gateway_id.as_str()).collect();
    assert_eq!(ids, vec!["gw-a", "gw-b", "gw-c", "gw-t", "gw-z"]);
    let a = &gws[0];
    assert_eq!(
        (
            a.site_id.as_str(),
            a.journal_epoch,
            a.acked_through,
            a.records,
            a.duplicates,
            a.conflicts
        ),
        ("HC001", 2, 10, 30, 31, 0)
    );
    let b = &gws[1];
    assert_eq!(
        (b.records, b.duplicates, b.conflicts, b.acked_through),
        (5, 6, 1, 110)
    );
    assert_eq!(b.last_seen_ms, NOW);
    assert!(
        gws.iter().all(|g| g.seq_reuse == 0),
        "resends are not seq reuse"
    );

    // An empty batch (anchors only) of a new stream acks 0.
    let mut empty = batch("gw-e", "HC001", 1, vec![]);
    empty.anchors = vec![anchor([1; 16], 1, T0, 1)];
    assert_eq!(store.commit(empty, NOW).await.unwrap().acked_through, 0);

    // Invalid records: acked (the stream moves on), kept in the rejected table with the
    // reason, never stored as punches; a resend is a duplicate.
    let mut rs = records(&punches(1..=4), 1);
    rs[1].punch.device_time_ms = 5;
    rs[2].punch.utc_offset_min = Some(2000);
    let out = store
        .commit(batch("gw-r", "HCR", 3, rs.clone()), NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.rejected, out.duplicates, out.acked_through),
        (2, 2, 0, 4)
    );
    let out = store
        .commit(batch("gw-r", "HCR", 3, rs), NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.rejected, out.duplicates, out.acked_through),
        (0, 0, 4, 4)
    );
    let held_rows = store.rejected(held(None, 10)).await.unwrap();
    assert_eq!(held_rows.len(), 2);
    assert_eq!(
        held_rows
            .iter()
            .map(|x| (
                x.gateway_id.as_str(),
                x.site_id.as_str(),
                x.record.gateway_seq
            ))
            .collect::<Vec<_>>(),
        vec![("gw-r", "HCR", 2), ("gw-r", "HCR", 3)]
    );
    assert!(
        held_rows[0].reason.contains("time"),
        "{}",
        held_rows[0].reason
    );
    assert!(
        held_rows[1].reason.contains("offset"),
        "{}",
        held_rows[1].reason
    );
    assert_eq!(held_rows[0].record.punch.device_time_ms, 5);
    assert_eq!(held_rows[0].stored_at_ms, NOW);
    let rest = store
        .rejected(held(Some(held_rows[0].id), 10))
        .await
        .unwrap();
    assert_eq!(rest, held_rows[1..].to_vec());
    let site_r = all_punches(
        store,
        PunchQuery {
            site: Some("HCR".into()),
            ..q(10)
        },
    )
    .await;
    assert_eq!(
        site_r
            .iter()
            .map(|r| r.record.gateway_seq)
            .collect::<Vec<_>>(),
        vec![1, 4]
    );
    let gws = store.gateways().await.unwrap();
    let r = gws.iter().find(|g| g.gateway_id == "gw-r").unwrap();
    assert_eq!((r.records, r.rejected, r.duplicates), (2, 2, 4));
    assert_eq!(gws.iter().map(|g| g.rejected).sum::<u64>(), 2);

    seq_reuse(store).await;
    site_scope(store).await;
}

/// A read token's scope (`sites`) is applied inside the store query: pages of a scoped
/// query are full while more matching rows follow, however many rows of other sites lie
/// between them; conflicts and rejected records are filtered the same way.
async fn site_scope(store: &dyn Store) {
    // Interleave: SB, SA, SB, SA, ... in batches of 7, so most rows in cursor order
    // belong to the other site.
    for i in 0..6u64 {
        let (sa, sb) = (
            punches(i * 3 + 1..=i * 3 + 3),
            punches(i * 7 + 1..=i * 7 + 7),
        );
        store
            .commit(batch("gw-sb", "SB", 1, records(&sb, i * 7 + 1)), NOW)
            .await
            .unwrap();
        store
            .commit(batch("gw-sa", "SA", 1, records(&sa, i * 3 + 1)), NOW)
            .await
            .unwrap();
    }
    let scoped = |sites: &[&str], limit| PunchQuery {
        sites: Some(sites.iter().map(|s| s.to_string()).collect()),
        ..q(limit)
    };
    let mut query = scoped(&["SA"], 4);
    let mut seen = Vec::new();
    loop {
        let page = store.punches(query.clone()).await.unwrap();
        match page.next_cursor {
            Some(c) => {
                assert_eq!(page.items.len(), 4, "a page is full while more rows follow");
                query.after = Some(c);
            }
            None => {
                seen.extend(page.items);
                break;
            }
        }
        seen.extend(page.items);
    }
    assert_eq!(seen.len(), 18);
    assert!(seen.iter().all(|r| r.site_id.as_str() == "SA"));
    assert_eq!(all_punches(store, scoped(&["SA", "SB"], 5)).await.len(), 60);
    assert!(all_punches(store, scoped(&[], 5)).await.is_empty());
    // `site` narrows within the scope; outside it there is nothing.
    let both = PunchQuery {
        site: Some("SB".into()),
        ..scoped(&["SA", "SB"], 7)
    };
    assert_eq!(all_punches(store, both).await.len(), 42);
    let outside = PunchQuery {
        site: Some("SB".into()),
        ..scoped(&["SA"], 7)
    };
    assert!(all_punches(store, outside).await.is_empty());

    // A conflict and a rejected record at SB, behind the earlier ones of other sites.
    let mut changed = punches(1..=1)[0];
    changed.subject_id = outpost_tests::relay::id("EMP-9998");
    let mut bad = record(punch("dev-sb", 1, "EMP-0001", 1), 44);
    bad.punch.device_time_ms = 5;
    let out = store
        .commit(batch("gw-sb", "SB", 1, vec![record(changed, 43), bad]), NOW)
        .await
        .unwrap();
    assert_eq!((out.conflicts, out.rejected), (1, 1));
    let only = |sites: &[&str], limit| HeldQuery {
        sites: Some(sites.iter().map(|s| s.to_string()).collect()),
        ..held(None, limit)
    };
    let c = store.conflicts(only(&["SB"], 1)).await.unwrap();
    assert_eq!(c.len(), 1, "found past the other sites' conflicts");
    assert_eq!((c[0].site_id.as_str(), c[0].record.punch), ("SB", changed));
    assert!(store.conflicts(only(&["SA"], 10)).await.unwrap().is_empty());
    let r = store.rejected(only(&["SB"], 1)).await.unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].site_id.as_str(), "SB");
    let hcr = store.rejected(only(&["HCR", "SB"], 2)).await.unwrap();
    assert_eq!(hcr.len(), 2);
    assert!(hcr.iter().all(|x| x.site_id.as_str() == "HCR"));
    let rest = store
        .rejected(HeldQuery {
            after: Some(hcr[1].id),
            ..only(&["HCR", "SB"], 2)
        })
        .await
        .unwrap();
    assert_eq!(rest, r);
    assert!(store.rejected(only(&[], 10)).await.unwrap().is_empty());
    assert_eq!(store.rejected(held(None, 10)).await.unwrap().len(), 3);
}

/// A gateway whose journal went back in time sends new punches under gateway_seq values
/// the relay already stores: they are stored (not dropped as resends) and counted.
async fn seq_reuse(store: &dyn Store) {
    let original = records(&punches(1..=10), 1);
    let out = store
        .commit(batch("gw-s", "HCS", 1, original.clone()), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.seq_reuse, out.acked_through), (10, 0, 10));
    // Seqs 5..=12 again: new punches under 5..=9, the exact original record 10, and new
    // seqs 11 and 12.
    let fresh = |i: u64| punch("dev-new", i, "EMP-0777", 300 + i as i64);
    let mut reuse: Vec<_> = (5..=9).map(|seq| record(fresh(seq), seq)).collect();
    reuse.push(original[9]);
    reuse.extend((11..=12).map(|seq| record(fresh(seq), seq)));
    let out = store
        .commit(batch("gw-s", "HCS", 1, reuse.clone()), NOW)
        .await
        .unwrap();
    assert_eq!(
        (
            out.stored,
            out.seq_reuse,
            out.duplicates,
            out.conflicts,
            out.acked_through
        ),
        (7, 5, 1, 0, 12)
    );
    let rows = all_punches(
        store,
        PunchQuery {
            site: Some("HCS".into()),
            device: Some("dev-new".into()),
            ..q(3)
        },
    )
    .await;
    assert_eq!(
        rows.iter()
            .map(|r| (r.record.gateway_seq, r.record.punch))
            .collect::<Vec<_>>(),
        [5, 6, 7, 8, 9, 11, 12]
            .map(|seq| (seq, fresh(seq)))
            .to_vec()
    );
    let site = PunchQuery {
        site: Some("HCS".into()),
        ..q(50)
    };
    assert_eq!(all_punches(store, site.clone()).await.len(), 17);
    // Resends of either batch are duplicates now, whole.
    for (b, n) in [(reuse, 8), (original, 10)] {
        let out = store.commit(batch("gw-s", "HCS", 1, b), NOW).await.unwrap();
        assert_eq!(
            (
                out.stored,
                out.seq_reuse,
                out.duplicates,
                out.conflicts,
                out.acked_through
            ),
            (0, 0, n, 0, 12)
        );
    }
    assert_eq!(all_punches(store, site).await.len(), 17);
    let gws = store.gateways().await.unwrap();
    let s = gws.iter().find(|g| g.gateway_id == "gw-s").unwrap();
    assert_eq!(
        (s.records, s.seq_reuse, s.duplicates, s.acked_through),
        (17, 5, 19, 12)
    );
    let json = s.to_json();
    assert_eq!(json["seq_reuse"], 5, "{json}");
    assert_eq!(json["records"], 17, "{json}");
}

/// Concurrent commits of the same punches from many gateways: stored exactly once.
async fn concurrent_exactly_once(store: std::sync::Arc<dyn Store>) {
    let shared = punches(1000..=1199);
    let mut tasks = Vec::new();
    for g in 0..6u64 {
        let store = store.clone();
        let mut mine = shared.clone();
        if g % 2 == 1 {
            mine.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let mut total = (0u32, 0u32);
            for (i, chunk) in mine.chunks(50).enumerate() {
                let b = batch(
                    &format!("cc-{g}"),
                    "CC",
                    1,
                    records(chunk, 1 + 50 * i as u64),
                );
                let out = store.commit(b, NOW).await.unwrap();
                total.0 += out.stored;
                total.1 += out.duplicates;
            }
            total
        }));
    }
    let mut stored = 0;
    for t in tasks {
        let (s, d) = t.await.unwrap();
        assert_eq!(s + d, 200);
        stored += s;
    }
    assert_eq!(stored, 200, "each punch stored by exactly one gateway");
    let rows = all_punches(
        store.as_ref(),
        PunchQuery {
            site: Some("CC".into()),
            ..q(64)
        },
    )
    .await;
    assert_eq!(rows.len(), 200);
}

/// The whole event stream after `after`, read in pages of `page`.
async fn whole_stream(store: &dyn Store, after: Option<u64>, page: usize) -> Vec<StreamRow> {
    let mut out: Vec<StreamRow> = Vec::new();
    let mut q = StreamQuery {
        after,
        through: None,
        limit: page,
    };
    loop {
        let got = store.stream(q).await.unwrap();
        assert!(got.len() <= page);
        let Some(last) = got.last().map(|r| r.cursor) else {
            return out;
        };
        out.extend(got);
        q.after = Some(last);
    }
}

/// The event stream (store module docs, "One position space"): conflicts, rejected
/// records and notices take positions from the punches' counter, in commit order, and
/// a notice is appended once per key. Uses its own gateways and site (`EV`), after
/// whatever the store holds.
async fn event_stream(store: &dyn Store) {
    // An empty sled store has head 0 and its first position is 0: read from the start.
    let h0 = Some(store.head().await.unwrap()).filter(|&h| h > 0);
    let notice = |key: &str| Notice {
        key: key.into(),
        kind: "output.disabled".into(),
        output: Some("payroll".into()),
        fields: serde_json::json!({"reason": "410"})
            .as_object()
            .unwrap()
            .clone(),
        at_ms: NOW,
    };
    // 1: three punches.
    let first = vec![
        punch("ev-dev", 1, "EMP-1", 1),
        punch("ev-dev", 2, "EMP-1", 2),
        punch("ev-dev", 3, "EMP-1", 3),
    ];
    store
        .commit(batch("ev-a", "EV", 1, records(&first, 1)), NOW)
        .await
        .unwrap();
    // 2: a conflict (same punch key, other content), a rejected record, a new punch.
    let mut bad = punch("ev-bad", 1, "EMP-1", 1);
    bad.utc_offset_min = Some(i16::MAX);
    let second = vec![
        punch("ev-dev", 1, "EMP-OTHER", 1),
        bad,
        punch("ev-dev", 4, "EMP-1", 4),
    ];
    let out = store
        .commit(batch("ev-b", "EV", 1, records(&second, 1)), NOW)
        .await
        .unwrap();
    assert_eq!((out.stored, out.conflicts, out.rejected), (1, 1, 1));
    // 3: a notice, then two punches.
    let n1 = store
        .append_notice(notice("output.disabled/payroll/1"))
        .await
        .unwrap();
    assert!(h0.is_none_or(|h| n1 > h));
    store
        .commit(
            batch(
                "ev-a",
                "EV",
                1,
                records(
                    &[
                        punch("ev-dev", 5, "EMP-1", 5),
                        punch("ev-dev", 6, "EMP-1", 6),
                    ],
                    4,
                ),
            ),
            NOW,
        )
        .await
        .unwrap();
    // The same notice again: nothing new, the same position.
    assert_eq!(
        store
            .append_notice(notice("output.disabled/payroll/1"))
            .await
            .unwrap(),
        n1
    );
    let head = store.head().await.unwrap();
    for page in [1, 2, 100] {
        let rows = whole_stream(store, h0, page).await;
        let kinds: Vec<&str> = rows
            .iter()
            .map(|r| match &r.item {
                StreamItem::Punch(_) => "punch",
                StreamItem::Conflict(_) => "conflict",
                StreamItem::Rejected(_) => "rejected",
                StreamItem::Notice(_) => "notice",
            })
            .collect();
        assert_eq!(rows.len(), 9, "page {page}: {kinds:?}");
        assert!(
            rows.windows(2).all(|w| w[0].cursor < w[1].cursor),
            "in position order"
        );
        assert_eq!(
            rows.last().map(|r| r.cursor),
            Some(head),
            "head covers every kind"
        );
        // Commit order across commits; inside one commit the kinds' order is the store's.
        assert_eq!(kinds[..3], ["punch"; 3]);
        let mut mid = kinds[3..6].to_vec();
        mid.sort_unstable();
        assert_eq!(mid, ["conflict", "punch", "rejected"]);
        assert_eq!(kinds[6..], ["notice", "punch", "punch"]);
        assert_eq!(rows[6].cursor, n1);
        for r in &rows {
            match &r.item {
                StreamItem::Punch(p) => assert_eq!(p.cursor, r.cursor),
                StreamItem::Conflict(c) => {
                    assert_eq!(c.record.punch.subject_id.as_str(), "EMP-OTHER");
                    // The kept punch is the first of batch 1.
                    assert_eq!(c.kept_cursor, rows[0].cursor);
                }
                StreamItem::Rejected(x) => assert!(!x.reason.is_empty()),
                StreamItem::Notice(n) => assert_eq!(n, &notice("output.disabled/payroll/1")),
            }
        }
        // A bounded read returns exactly the range.
        let part = store
            .stream(StreamQuery {
                after: h0,
                through: Some(rows[4].cursor),
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(part, rows[..5].to_vec());
    }
    // Punch pages still hold punches only.
    let ev = all_punches(
        store,
        PunchQuery {
            site: Some("EV".into()),
            ..q(100)
        },
    )
    .await;
    assert_eq!(ev.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_event_stream_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let head = {
        let store = SledStore::open(&path, 16 << 20).unwrap();
        event_stream(&store).await;
        let head = store.head().await.unwrap();
        store.close().await.unwrap();
        head
    };
    // At open the head covers every kind (the last entry is a punch, but the notice's
    // position must not be reused).
    let store = SledStore::open(&path, 16 << 20).unwrap();
    assert_eq!(store.head().await.unwrap(), head);
    let n = store
        .append_notice(Notice {
            key: "after-reopen".into(),
            kind: "output.enabled".into(),
            output: None,
            fields: Default::default(),
            at_ms: NOW,
        })
        .await
        .unwrap();
    assert!(n > head);
    assert_eq!(whole_stream(&store, None, 3).await.len(), 10);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store"), 16 << 20).unwrap();
    conformance(&store).await;
    concurrent_exactly_once(std::sync::Arc::new(store.clone())).await;
    event_stream(&store).await;
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = SledStore::open(&path, 16 << 20).unwrap();
        let out = store
            .commit(batch("gw-a", "HC001", 1, records(&punches(1..=50), 1)), NOW)
            .await
            .unwrap();
        assert_eq!(out.acked_through, 50);
        store.close().await.unwrap();
    }
    let store = SledStore::open(&path, 16 << 20).unwrap();
    let out = store
        .commit(batch("gw-a", "HC001", 1, records(&punches(1..=60), 1)), NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.stored, out.duplicates, out.acked_through),
        (10, 50, 60)
    );
    assert_eq!(all_punches(&store, q(17)).await.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conformance() {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .expect("start a private PostgreSQL");
    let store = PgStore::connect(&pg.url(), 8).await.unwrap();
    conformance(&store).await;
    concurrent_exactly_once(std::sync::Arc::new(store.clone())).await;
    // Migrations are idempotent: a second relay connecting to the same database.
    let again = PgStore::connect(&pg.url(), 2).await.unwrap();
    // The conformance pass names 10 gateways (gw-e, gw-r, gw-s, gw-sa and gw-sb after its
    // list check), the concurrent pass 6.
    assert_eq!(again.gateways().await.unwrap().len(), 10 + 6);
    event_stream(&store).await;
    store.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

/// A punch key as a reader sees it: (device, device_seq).
type Key = (String, u64);

/// The cursor never skips, in one process: `gateways` gateways commit concurrently, two
/// batches in flight each, for `run_for`, while a reader pages site `NS` from the cursor
/// it reached. The reader sees every punch exactly once, with increasing cursors, and
/// `head()` is never behind what it saw.
async fn cursor_never_skips(store: std::sync::Arc<dyn Store>, run_for: std::time::Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const N: u64 = 25;
    let deadline = std::time::Instant::now() + run_for;
    let mut writers = Vec::new();
    for g in 0..4u64 {
        // Two tasks per gateway, taking alternate batches of its one stream.
        for lane in 0..2u64 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let mut sent: Vec<Key> = Vec::new();
                let mut i = lane;
                while std::time::Instant::now() < deadline {
                    let first = 1 + i * N;
                    let ps: Vec<_> = (first..first + N)
                        .map(|n| punch(&format!("ns-dev-{g}"), n, "EMP-1", n as i64))
                        .collect();
                    sent.extend(ps.iter().map(|p| (p.device_id.to_string(), p.device_seq)));
                    let out = store
                        .commit(batch(&format!("ns-{g}"), "NS", 1, records(&ps, first)), NOW)
                        .await
                        .unwrap();
                    assert_eq!(out.stored as u64, N);
                    i += 2;
                }
                sent
            }));
        }
    }
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen: Vec<Key> = Vec::new();
            let mut cursor = 0u64;
            let mut pages = 0u64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store
                    .punches(PunchQuery {
                        site: Some("NS".into()),
                        after: Some(cursor),
                        ..q(37)
                    })
                    .await
                    .unwrap();
                pages += 1;
                let empty = page.items.is_empty();
                for row in page.items {
                    assert!(row.cursor > cursor, "{} after {cursor}", row.cursor);
                    cursor = row.cursor;
                    let p = row.record.punch;
                    seen.push((p.device_id.to_string(), p.device_seq));
                }
                assert!(store.head().await.unwrap() >= cursor, "head behind a read");
                if empty && finished {
                    return (seen, pages);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut sent: Vec<Key> = Vec::new();
    for w in writers {
        sent.extend(w.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let (seen, pages) = reader.await.unwrap();
    let sent_set: std::collections::BTreeSet<Key> = sent.iter().cloned().collect();
    let seen_set: std::collections::BTreeSet<Key> = seen.iter().cloned().collect();
    assert_eq!(seen_set.len(), seen.len(), "no punch seen twice");
    let missed = sent_set.difference(&seen_set).count();
    assert_eq!(missed, 0, "missed {missed} of {} punches", sent.len());
    assert_eq!(seen_set, sent_set);
    assert!(
        pages > 10,
        "the reader paged during the commits ({pages} pages)"
    );
    eprintln!(
        "{}: {} punches, {pages} pages, none skipped",
        store.kind(),
        sent.len()
    );
}

/// `head()` and `subscribe()` on one store object: a commit raises both, to the highest
/// cursor a reader sees.
async fn head_follows_commits(store: &dyn Store) {
    let mut rx = store.subscribe();
    let before = store.head().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), before);
    let out = store
        .commit(
            batch("hd-1", "HD", 1, records(&punches(70_001..=70_020), 1)),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out.stored, 20);
    tokio::time::timeout(
        std::time::Duration::from_secs(1),
        rx.wait_for(|h| *h > before),
    )
    .await
    .expect("woken within a second")
    .unwrap();
    let head = store.head().await.unwrap();
    let last = all_punches(store, q(1000)).await.last().unwrap().cursor;
    assert_eq!((head, *rx.borrow()), (last, last));
    // A resend stores nothing: the head stays.
    store
        .commit(
            batch("hd-1", "HD", 1, records(&punches(70_001..=70_020), 1)),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(store.head().await.unwrap(), head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_cursor_never_skips_and_head_follows() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("store"), 16 << 20).unwrap();
    assert_eq!(store.head().await.unwrap(), 0);
    head_follows_commits(&store).await;
    cursor_never_skips(
        std::sync::Arc::new(store.clone()),
        std::time::Duration::from_secs(5),
    )
    .await;
    let head = store.head().await.unwrap();
    store.close().await.unwrap();
    drop(store);
    // Reopened: everything on disk is visible at once.
    let store = SledStore::open(&dir.path().join("store"), 16 << 20).unwrap();
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(*store.subscribe().borrow(), head);
}

/// Listener sessions of the store's `LISTEN` task, as PostgreSQL sees them.
fn listeners(pg: &PgServer) -> usize {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{}'",
        outpost_relay::store::postgres::LISTENER_APPLICATION_NAME
    );
    pg.psql("postgres", &sql).unwrap().parse().unwrap()
}

/// Waits up to `within` for `rx` to exceed `above`.
async fn woken(
    rx: &mut tokio::sync::watch::Receiver<u64>,
    above: u64,
    within: std::time::Duration,
) {
    let ok = matches!(
        tokio::time::timeout(within, rx.wait_for(|h| *h > above)).await,
        Ok(Ok(_))
    );
    assert!(ok, "not woken within {within:?} (value {})", *rx.borrow());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cursor_never_skips_and_commits_wake_other_relays() {
    let pg = tokio::task::spawn_blocking(|| PgServer::start_with(false))
        .await
        .unwrap()
        .expect("start a private PostgreSQL");
    // Relay A's and relay B's stores on one database.
    let a = PgStore::connect(&pg.url(), 8).await.unwrap();
    let b = PgStore::connect(&pg.url(), 4).await.unwrap();
    assert_eq!(a.head().await.unwrap(), 0);
    head_follows_commits(&a).await;

    // A commit through A wakes B's subscriber, by NOTIFY, within a second.
    let mut rx = b.subscribe();
    let before = *rx.borrow_and_update();
    a.commit(
        batch("hd-2", "HD", 1, records(&punches(80_001..=80_010), 1)),
        NOW,
    )
    .await
    .unwrap();
    let head = a.head().await.unwrap();
    assert!(head > before);
    woken(&mut rx, before, std::time::Duration::from_secs(1)).await;
    assert_eq!(*rx.borrow(), head);
    assert_eq!(b.head().await.unwrap(), head);

    // The listeners' connections are killed: they reconnect by themselves, and B still
    // learns of A's next commit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while listeners(&pg) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "two listeners connect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let killed = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{}'",
                outpost_relay::store::postgres::LISTENER_APPLICATION_NAME
            ),
        )
        .unwrap();
    assert_eq!(killed, "2");
    a.commit(
        batch("hd-2", "HD", 1, records(&punches(80_011..=80_020), 11)),
        NOW,
    )
    .await
    .unwrap();
    let head = a.head().await.unwrap();
    let seen = *rx.borrow();
    woken(&mut rx, seen, std::time::Duration::from_secs(3)).await;
    assert_eq!(*rx.borrow(), head);
    while listeners(&pg) != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both listeners reconnect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The cursor never skips with many concurrent commits on the pool.
    cursor_never_skips(
        std::sync::Arc::new(a.clone()),
        std::time::Duration::from_secs(5),
    )
    .await;
    assert_eq!(b.head().await.unwrap(), a.head().await.unwrap());

    // close() stops the listener.
    b.close().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while listeners(&pg) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "B's listener stops on close"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
