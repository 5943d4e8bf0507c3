//! `outpost-relay outputs`: the JSON of `GET /v1/outputs` as a table for people.
//!
//! One line per output (name, kind, state, cursor, lag, age of the oldest undelivered
//! punch, last success, next attempt, holder), then, for each output that has one, its
//! last error or why it is disabled.

use serde_json::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn age(v: &Value) -> String {
    match v.as_f64() {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) if s < 172_800.0 => format!("{:.1}h", s / 3600.0),
        Some(s) => format!("{:.1}d", s / 86_400.0),
    }
}

/// The table for the body of `GET /v1/outputs`.
pub fn render(body: &Value) -> String {
    let outputs = body["outputs"].as_array().cloned().unwrap_or_default();
    if outputs.is_empty() {
        return "no outputs are configured ([[outputs.webhook]], [[outputs.nats]])\n".into();
    }
    let header = [
        "NAME",
        "KIND",
        "STATE",
        "CURSOR",
        "LAG",
        "OLDEST",
        "LAST SUCCESS",
        "NEXT ATTEMPT",
        "HOLDER",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for o in &outputs {
        rows.push(vec![
            text(&o["name"]),
            text(&o["kind"]),
            text(&o["state"]),
            text(&o["cursor"]),
            text(&o["lag"]),
            age(&o["oldest_undelivered_age_s"]),
            text(&o["last_success"]),
            text(&o["next_attempt"]),
            text(&o["holder"]),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for o in &outputs {
        if let Some(reason) = o["disabled"]["reason"].as_str() {
            out.push_str(&format!(
                "{}: disabled since {}: {reason}\n",
                text(&o["name"]),
                text(&o["disabled"]["at"])
            ));
        } else if let Some(e) = o["last_error"].as_str() {
            out.push_str(&format!("{}: last error: {e}\n", text(&o["name"])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_output_then_errors() {
        let body = serde_json::json!({"outputs": [
            {"name": "payroll", "kind": "webhook", "state": "retrying", "cursor": "41",
             "lag": 3, "oldest_undelivered_age_s": 400.0, "last_success": null,
             "next_attempt": "2026-11-22T06:00:05Z", "holder": "relay-1:7000/42-abcd",
             "last_error": "HTTP 503", "disabled": null},
            {"name": "bus", "kind": "nats", "state": "disabled", "cursor": null, "lag": 0,
             "oldest_undelivered_age_s": null, "disabled": {"reason": "gone", "at": "t"}},
        ]});
        let t = render(&body);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(
            lines[1].starts_with("payroll  webhook  retrying  41"),
            "{t}"
        );
        assert!(lines[1].contains(" 7m "), "{t}");
        assert!(lines[2].starts_with("bus"), "{t}");
        assert_eq!(lines[3], "payroll: last error: HTTP 503");
        assert_eq!(lines[4], "bus: disabled since t: gone");
        assert!(render(&serde_json::json!({"outputs": []})).contains("no outputs"));
    }
}
