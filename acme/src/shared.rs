//! Challenge answers shared by every edge through etcd.
//!
//! The CA validates a name at whatever address the name resolves to: with
//! anycast, any edge may take the validation connection, not only the host
//! that placed the order. So the ordering host writes its answer under
//! `<prefix>acme/answers/<hostname>` (attached to its claim's lease: a host
//! that dies takes its answers with it), and every edge's etcd follower
//! hands those keys to an [`AnswerMirror`], which serves them from the local
//! proxy like answers of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use skein_catalog::sources::etcd::Subscriber;
use skein_proxy::acme::Challenges;

/// One challenge answer, as stored in etcd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Answer {
    /// HTTP-01: serve `key_authorization` at the token's path for `hostname`.
    #[serde(rename = "http-01")]
    Http {
        /// The name validated.
        hostname: String,
        /// The token (the last path segment).
        token: String,
        /// The body to answer.
        key_authorization: String,
    },
    /// TLS-ALPN-01: a validation certificate carrying `digest`.
    #[serde(rename = "tls-alpn-01")]
    Tls {
        /// The name validated.
        hostname: String,
        /// SHA-256 of the key authorization, hex.
        digest: String,
    },
}

/// The path of a name's answer under `<prefix>acme/`.
pub fn answer_path(hostname: &str) -> String {
    format!("answers/{hostname}")
}

impl Answer {
    /// Starts serving it from `challenges`.
    pub fn serve(&self, challenges: &Challenges) -> Result<(), String> {
        match self {
            Answer::Http {
                hostname,
                token,
                key_authorization,
            } => {
                challenges.put_http(hostname, token, key_authorization);
                Ok(())
            }
            Answer::Tls { hostname, digest } => {
                let bytes = unhex(digest).ok_or("the digest is not hex")?;
                let provider = rustls::crypto::aws_lc_rs::default_provider();
                challenges.put_tls(hostname, &bytes, &provider)
            }
        }
    }

    /// Stops serving it.
    pub fn withdraw(&self, challenges: &Challenges) {
        match self {
            Answer::Http { token, .. } => challenges.remove_http(token),
            Answer::Tls { hostname, .. } => challenges.remove_tls(hostname),
        }
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Serves the answers other hosts publish.
pub struct AnswerMirror {
    challenges: Arc<Challenges>,
    known: Mutex<HashMap<String, Answer>>,
}

impl AnswerMirror {
    /// A mirror into the local proxy's `challenges`.
    pub fn new(challenges: Arc<Challenges>) -> Self {
        AnswerMirror {
            challenges,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, path: &str, value: &[u8]) {
        if !path.starts_with("answers/") {
            return;
        }
        let answer: Answer = match serde_json::from_slice(value) {
            Ok(a) => a,
            Err(e) => {
                metrics::counter!("skein_acme_shared_answers_total", "result" => "malformed")
                    .increment(1);
                return tracing::warn!(path, error = %e, "acme: a shared answer does not parse");
            }
        };
        match answer.serve(&self.challenges) {
            Ok(()) => {
                metrics::counter!("skein_acme_shared_answers_total", "result" => "served")
                    .increment(1);
                if let Some(old) = self.known().insert(path.to_string(), answer.clone())
                    && old != answer
                    && let Answer::Http { .. } = old
                {
                    old.withdraw(&self.challenges);
                }
            }
            Err(e) => tracing::warn!(path, error = %e, "acme: cannot serve a shared answer"),
        }
    }
}

impl Subscriber for AnswerMirror {
    fn reset(&self, keys: Vec<(String, Vec<u8>)>) {
        let old: Vec<Answer> = self.known().drain().map(|(_, a)| a).collect();
        for a in old {
            a.withdraw(&self.challenges);
        }
        for (path, value) in keys {
            self.take(&path, &value);
        }
    }

    fn put(&self, path: &str, value: &[u8]) {
        self.take(path, value);
    }

    fn delete(&self, path: &str) {
        let gone = self.known().remove(path);
        if let Some(a) = gone {
            a.withdraw(&self.challenges);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mirrored_answers_are_served_and_withdrawn() {
        let ch = Arc::new(Challenges::default());
        let m = AnswerMirror::new(ch.clone());
        let http = Answer::Http {
            hostname: "a.example.com".into(),
            token: "tok".into(),
            key_authorization: "tok.thumb".into(),
        };
        let tls = Answer::Tls {
            hostname: "b.example.com".into(),
            digest: hex(&[7u8; 32]),
        };
        m.put("answers/a.example.com", &serde_json::to_vec(&http).unwrap());
        m.put("answers/b.example.com", &serde_json::to_vec(&tls).unwrap());
        m.put("answers/c.example.com", b"not json");
        m.put("claims/a.example.com", b"h1");
        assert_eq!(
            ch.http_answer("a.example.com", "tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(ch.http_answer("other.example.com", "tok"), None);
        assert_eq!(ch.counts(), (1, 1));
        m.delete("answers/a.example.com");
        assert_eq!(ch.counts(), (0, 1));
        m.reset(vec![]);
        assert_eq!(ch.counts(), (0, 0));
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), [0, 255, 16]);
        assert_eq!(unhex("abc"), None);
    }
}
