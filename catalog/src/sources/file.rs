//! The catalog file (TOML): loaded at start, reloaded when its contents change
//! (polled) and on demand (SIGHUP). An invalid file is logged with every problem
//! and the catalog in force stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Invalid, parse_toml};
use crate::index::Source;
use crate::model::Document;
use crate::store::{Store, Written, source_label};

/// Reads and parses a catalog file. Parse errors carry field paths; nothing
/// across records is checked here (that takes [`Store::replace`]).
pub fn read(path: &Path) -> Result<(Document, u64), Invalid> {
    let text = read_text(path)?;
    Ok((parse_toml(&text)?, fingerprint(text.as_bytes())))
}

fn read_text(path: &Path) -> Result<String, Invalid> {
    std::fs::read_to_string(path)
        .map_err(|e| Invalid::one("", format!("cannot read {}: {e}", path.display())))
}

/// FNV-1a of the file's bytes: enough to tell whether it changed.
fn fingerprint(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Watches one catalog file and feeds it to the store.
pub struct FileSource {
    path: PathBuf,
    store: Arc<Store>,
    last: std::sync::Mutex<Option<u64>>,
}

impl FileSource {
    /// A source for `path`; nothing is read until [`FileSource::reload`].
    pub fn new(path: PathBuf, store: Arc<Store>) -> Self {
        FileSource {
            path,
            store,
            last: std::sync::Mutex::new(None),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file and, if it changed since the last attempt (or `force`),
    /// publishes it. Returns `Ok(None)` when the contents are unchanged.
    pub fn reload(&self, force: bool) -> Result<Option<Written>, Invalid> {
        // The bytes are compared before they are parsed: a poll of an
        // unchanged file (every second, by default) costs a read, not a parse
        // of what may be thousands of records.
        let result = read_text(&self.path).and_then(|text| {
            let fp = fingerprint(text.as_bytes());
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if !force && *last == Some(fp) {
                return Ok(None);
            }
            // Remember what was tried, good or bad, so a bad file is reported once
            // per change rather than at every poll.
            *last = Some(fp);
            Ok(Some(self.store.replace(Source::File, parse_toml(&text)?)?))
        });
        let label = match &result {
            Ok(None) => return result,
            Ok(Some(_)) => "ok",
            Err(_) => "invalid",
        };
        metrics::counter!("skein_catalog_file_reloads_total", "result" => label).increment(1);
        match &result {
            Ok(Some(w)) => {
                tracing::info!(path = %self.path.display(), version = w.snapshot.version, changed = w.changed, "catalog file loaded")
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), source = source_label(Source::File), "catalog file rejected, the catalog in force stays:\n{e}")
            }
            Ok(None) => {}
        }
        result
    }

    /// Polls the file every `interval` and reloads when `hup` is notified, until
    /// `stop` resolves.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        hup: Arc<Notify>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            let force = tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => false,
                _ = hup.notified() => true,
            };
            let me = self.clone();
            // Reading and validating a large file is blocking work.
            let _ = tokio::task::spawn_blocking(move || me.reload(force)).await;
        }
    }
}
