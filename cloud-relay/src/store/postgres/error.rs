//! How PostgreSQL and pool failures become [`StoreError`]s.
//!
//! Every other file of the PostgreSQL store maps its errors through these, so the messages
//! name the same things (the SQLSTATE, `store.url`) wherever a failure happens.

use crate::store::StoreError;

/// A failed statement or a lost connection: the store is unavailable, nothing committed.
/// The context names the SQLSTATE; the server's message is in the source.
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let context = match e.as_db_error() {
        Some(db) => format!("PostgreSQL error {}", db.code().code()),
        None => "PostgreSQL connection".to_string(),
    };
    StoreError::unavailable(context, e)
}

/// No connection from the pool. A connection that failed is kept as the source itself
/// (deadpool's wrapper would print its text twice).
pub(super) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    let context = "cannot get a PostgreSQL connection (check store.url and that the server is up)";
    match e {
        deadpool_postgres::PoolError::Backend(pg) => StoreError::unavailable(context, pg),
        e => StoreError::unavailable(context, e),
    }
}

/// A stored value this relay cannot read back.
pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("PostgreSQL row has an invalid {what}"))
}
