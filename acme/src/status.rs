//! What each hostname's certificate is doing, for operators (`/v1/acme`,
//! `skein catalog get acme`) and for the manager's own retry schedule.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

/// Where a hostname stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its turn (in-flight bound, rate limit).
    Due,
    /// An order is in flight.
    Ordering,
    /// It has a certificate that is good for now.
    Issued,
    /// The last order failed; the next is scheduled.
    Failed,
    /// The ownership check refused it; checked again on schedule.
    Refused,
}

/// One hostname.
#[derive(Clone, Debug, Serialize)]
pub struct NameStatus {
    /// The app that has it.
    pub app: String,
    /// Where it stands.
    pub state: State,
    /// Failures since the last success.
    pub failures: u32,
    /// Why the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The challenge type of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub challenge: Option<&'static str>,
    /// No attempt before this.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<SystemTime>,
    /// When its certificate ends.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    pub not_after: Option<SystemTime>,
}

fn time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

impl NameStatus {
    /// A name seen for the first time.
    pub fn new(app: &str, state: State) -> Self {
        NameStatus {
            app: app.to_string(),
            state,
            failures: 0,
            last_error: None,
            challenge: None,
            next_attempt: None,
            not_after: None,
        }
    }
}

/// Every hostname's status, and the account's.
#[derive(Debug, Default)]
pub struct AcmeStatus {
    names: Mutex<BTreeMap<String, NameStatus>>,
    account: Mutex<Option<String>>,
}

/// The whole status as the admin API answers it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Why the account cannot be used, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_error: Option<String>,
    /// Names by state.
    pub counts: BTreeMap<&'static str, usize>,
    /// Every name.
    pub names: BTreeMap<String, NameStatus>,
}

impl AcmeStatus {
    fn names(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NameStatus>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of one name's status.
    pub fn get(&self, hostname: &str) -> Option<NameStatus> {
        self.names().get(hostname).cloned()
    }

    /// Changes one name's status (creating it for `app`).
    pub fn update(&self, hostname: &str, app: &str, f: impl FnOnce(&mut NameStatus)) {
        let mut names = self.names();
        let s = names
            .entry(hostname.to_string())
            .or_insert_with(|| NameStatus::new(app, State::Due));
        s.app = app.to_string();
        f(s);
    }

    /// Keeps only the names `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.names().retain(|h, _| keep(h));
    }

    /// Sets or clears the account's error.
    pub fn set_account_error(&self, e: Option<String>) {
        *self.account.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    /// Everything, for the admin API; also refreshes the state gauges.
    pub fn report(&self) -> Report {
        let names = self.names().clone();
        let mut counts = BTreeMap::new();
        for s in names.values() {
            *counts.entry(state_name(s.state)).or_insert(0) += 1;
        }
        Report {
            account_error: self
                .account
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            counts,
            names,
        }
    }

    /// Publishes the count of names per state as gauges.
    pub fn export_gauges(&self) {
        let names = self.names();
        let mut counts: BTreeMap<&'static str, usize> = [
            State::Due,
            State::Ordering,
            State::Issued,
            State::Failed,
            State::Refused,
        ]
        .into_iter()
        .map(|s| (state_name(s), 0))
        .collect();
        for s in names.values() {
            *counts.entry(state_name(s.state)).or_insert(0) += 1;
        }
        for (state, n) in counts {
            metrics::gauge!("skein_acme_names", "state" => state).set(n as f64);
        }
    }
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Due => "due",
        State::Ordering => "ordering",
        State::Issued => "issued",
        State::Failed => "failed",
        State::Refused => "refused",
    }
}
