//! The token of an `Authorization: Bearer <token>` header, as both daemons read it.
//!
//! The two copies differed on an empty token (`Authorization: Bearer ` followed by nothing
//! or only spaces): the relay treated it as no token, the gateway passed `""` on to its
//! lookups, which then failed. An empty token means "no token" here, so every caller sees
//! one case for "nothing presented", and the answer (401 with the hint on how to send a
//! token) is the same as for a missing header.

use http::HeaderValue;

/// The token of an `Authorization` header value: `Bearer` (any case), one space, the token
/// (surrounding spaces trimmed). `None` without a header, with another scheme, with a value
/// that is not visible ASCII, or with an empty token.
pub fn bearer(value: Option<&HeaderValue>) -> Option<&str> {
    let v = value?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_token_and_treats_empty_as_none() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer(Some(&h("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("bearer  abc "))), Some("abc"));
        assert_eq!(bearer(Some(&h("BEARER abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("Basic abc"))), None);
        assert_eq!(bearer(Some(&h("Bearer"))), None);
        assert_eq!(bearer(Some(&h("Bearer "))), None);
        assert_eq!(bearer(Some(&h("Bearer    "))), None);
        assert_eq!(bearer(None), None);
        let not_ascii = HeaderValue::from_bytes(b"Bearer \xff").unwrap();
        assert_eq!(bearer(Some(&not_ascii)), None);
    }
}
