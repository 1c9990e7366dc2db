//! Durable storage of the admin API's records in SQLite (WAL, `synchronous=FULL`):
//! a write returns only once it is on disk, so a restart, even after `kill -9` or a
//! power cut, finds every record the API acknowledged.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::parse_json;
use crate::model::Document;
use crate::record::{Kind, Record};

/// Storage failure.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// SQLite refused.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record no longer parses (written by another version?).
    #[error("stored record {kind}/{key} is unreadable: {reason}")]
    Corrupt {
        /// Kind.
        kind: String,
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Serialization failed.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The admin API's records on disk.
pub struct Persist {
    conn: Mutex<Connection>,
}

impl Persist {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, PersistError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                kind TEXT NOT NULL,
                key TEXT NOT NULL,
                body TEXT NOT NULL,
                updated_at INTEGER NOT NULL DEFAULT (unixepoch()),
                PRIMARY KEY (kind, key)
            ) WITHOUT ROWID;",
        )?;
        Ok(Persist {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every stored record, as one document.
    pub fn load(&self) -> Result<Document, PersistError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT kind, key, body FROM records ORDER BY kind, key")?;
        let mut rows = stmt.query([])?;
        let mut doc = Document::default();
        while let Some(row) = rows.next()? {
            let (kind, key, body): (String, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let corrupt = |reason: String| PersistError::Corrupt {
                kind: kind.clone(),
                key: key.clone(),
                reason,
            };
            let k = Kind::parse(&kind).ok_or_else(|| corrupt("unknown kind".into()))?;
            fn push<T: Record>(doc: &mut Document, body: &str) -> Result<(), String> {
                let rec: T = parse_json(body.as_bytes()).map_err(|e| e.to_string())?;
                T::list_mut(doc).push(rec);
                Ok(())
            }
            use crate::model::*;
            match k {
                Kind::Regions => push::<Region>(&mut doc, &body),
                Kind::Hosts => push::<Host>(&mut doc, &body),
                Kind::Networks => push::<Network>(&mut doc, &body),
                Kind::Apps => push::<App>(&mut doc, &body),
                Kind::Machines => push::<Machine>(&mut doc, &body),
                Kind::Certificates => push::<Certificate>(&mut doc, &body),
                Kind::K8sServices => push::<K8sService>(&mut doc, &body),
            }
            .map_err(corrupt)?;
        }
        Ok(doc)
    }

    /// Stores a record (insert or replace), durably.
    pub fn put<T: Record>(&self, rec: &T) -> Result<(), PersistError> {
        let body = serde_json::to_string(rec)?;
        self.conn().execute(
            "INSERT INTO records (kind, key, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body, updated_at = unixepoch()",
            params![T::KIND.as_str(), rec.key().to_string(), body],
        )?;
        Ok(())
    }

    /// Removes a record, durably. Returns whether it existed.
    pub fn delete<T: Record>(&self, key: &T::Key) -> Result<bool, PersistError> {
        let n = self.conn().execute(
            "DELETE FROM records WHERE kind = ?1 AND key = ?2",
            params![T::KIND.as_str(), key.to_string()],
        )?;
        Ok(n > 0)
    }

    /// The stored body of one record, if any.
    pub fn get_raw(&self, kind: Kind, key: &str) -> Result<Option<String>, PersistError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT body FROM records WHERE kind = ?1 AND key = ?2",
                params![kind.as_str(), key],
                |r| r.get(0),
            )
            .optional()?)
    }
}
