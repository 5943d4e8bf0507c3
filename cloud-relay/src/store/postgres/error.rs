//! How PostgreSQL and pool failures become [`StoreError`]s.
//!
//! Every other file of the PostgreSQL store maps its errors through these, so the messages
//! name the same things (the SQLSTATE, `store.url`) wherever a failure happens.

use crate::store::StoreError;

/// A failed statement or a lost connection: the store is unavailable, nothing committed.
pub(super) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Unavailable(format!(
            "PostgreSQL error {}: {}",
            db.code().code(),
            db.message()
        )),
        None => StoreError::Unavailable(format!("PostgreSQL connection: {e}")),
    }
}

/// No connection from the pool.
pub(super) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!(
        "cannot get a PostgreSQL connection (check store.url and that the server is up): {e}"
    ))
}

/// A stored value this relay cannot read back.
pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("PostgreSQL row has an invalid {what}"))
}
