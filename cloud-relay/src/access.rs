//! The read API's gate: who is calling, and which sites it may read.
//!
//! Every read route calls [`read_scope`] first (or [`require_reader`], then
//! [`check_site`] for each site the request names). The caller is the admin token (every
//! site), or a read token of `auth.readers_file`, which reads every site or the sites it was
//! issued for ([`Scope`], rules in `auth::scope`). The route then
//! - pushes [`Scope::site_filter`] into its store query (`PunchQuery::sites`,
//!   `HeldQuery::sites`), so pages stay full and cursors stay valid;
//! - or, for what it does not page through the store (the gateway list, a live event), keeps
//!   only what [`Scope::allows`]; for something spanning sites, what [`Scope::covers`].
//!
//! A missing or unknown token is 401 (`unauthorized`); a site named outside the scope is
//! 403 (`site_not_allowed`, `field` = `site`), never an empty answer.
//!
//! This module is apart from `app` (which mounts the routes) so that route modules can use
//! it without importing `app` back.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_ops::bearer::bearer;

use crate::auth::Scope;
use crate::error::error_response;
use crate::state::AppState;

/// Who called the read API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The admin token: every site.
    Admin,
    /// A read token.
    Reader {
        /// Its name in the readers file.
        name: String,
        /// The sites it may read.
        scope: Scope,
    },
}

/// The admin's scope, borrowed by [`Caller::scope`].
static ALL_SITES: Scope = Scope::All;

impl Caller {
    /// The sites this caller may read.
    pub fn scope(&self) -> &Scope {
        match self {
            Caller::Admin => &ALL_SITES,
            Caller::Reader { scope, .. } => scope,
        }
    }

    /// `admin`, or `reader <name>` (for messages and logs).
    pub fn describe(&self) -> String {
        match self {
            Caller::Admin => "admin".to_string(),
            Caller::Reader { name, .. } => format!("reader {name}"),
        }
    }
}

/// Authenticates a read request: the admin token or any read token; 401 otherwise.
pub fn require_reader(state: &AppState, headers: &HeaderMap) -> Result<Caller, Response> {
    let token = bearer(headers.get(header::AUTHORIZATION));
    if let Some(t) = token {
        if state.admin.matches(t) {
            return Ok(Caller::Admin);
        }
        if let Some(r) = state.readers.current().authenticate(t) {
            return Ok(Caller::Reader {
                name: r.name.clone(),
                scope: r.scope.clone(),
            });
        }
    }
    state.metrics.auth_failure("query");
    Err(error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this API needs `Authorization: Bearer <token>` with the admin token (auth.admin_token_file) or a read token (`outpost-relay reader add NAME`)",
    ))
}

/// Authenticates an admin request (replay, enable): the admin token only; 401 otherwise.
pub fn require_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    match bearer(headers.get(header::AUTHORIZATION)) {
        Some(t) if state.admin.matches(t) => Ok(()),
        _ => {
            state.metrics.auth_failure("query");
            Err(error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs `Authorization: Bearer <token>` with the admin token (auth.admin_token_file)",
            ))
        }
    }
}

/// Refuses (403, `site_not_allowed`) a site the request names explicitly (`?site=`) that
/// is outside the caller's scope; `None` (no site named) always passes.
pub fn check_site(state: &AppState, caller: &Caller, site: Option<&str>) -> Result<(), Response> {
    caller.scope().check_site(site).map_err(|allowed| {
        state.metrics.auth_failure("scope");
        let message = format!(
            "{} may read sites {allowed} only; site={} is not one of them",
            caller.describe(),
            site.unwrap_or_default()
        );
        let body = serde_json::json!({"error": {"code": "site_not_allowed", "message": message, "field": "site"}});
        (StatusCode::FORBIDDEN, Json(body)).into_response()
    })
}

/// The gate of a read route in one call: authenticates ([`require_reader`]), checks the
/// site the request names, if any ([`check_site`]), and returns the scope to filter
/// everything else by.
pub fn read_scope(
    state: &AppState,
    headers: &HeaderMap,
    site: Option<&str>,
) -> Result<Scope, Response> {
    let caller = require_reader(state, headers)?;
    check_site(state, &caller, site)?;
    Ok(match caller {
        Caller::Admin => Scope::All,
        Caller::Reader { scope, .. } => scope,
    })
}
