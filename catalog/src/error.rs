//! Validation errors: every problem names the path of the bad field and why.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One thing wrong with a document, at a path such as
/// `apps[2].services[0].concurrency.hard_limit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Where: fields by name, list items by index (`apps[2]`) in a file, by key
    /// (`apps["web"]`) for records that came from the admin API or etcd.
    pub path: String,
    /// Why.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A document that was rejected whole, with every problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct Invalid {
    /// The problems, in document order.
    pub problems: Vec<Problem>,
}

impl Invalid {
    /// A single problem.
    pub fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems while a document is checked.
#[derive(Default, Debug)]
pub(crate) struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn add(&mut self, path: impl fmt::Display, message: impl fmt::Display) {
        self.0.push(Problem {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    pub fn into_result<T>(self, ok: T) -> Result<T, Invalid> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(Invalid { problems: self.0 })
        }
    }
}

/// Parses a TOML catalog document; a syntax or type error names its path.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Invalid> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| Invalid::one("", toml_message(&e, text)))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Invalid::one(clean_path(&path), toml_message(&inner, text))
    })
}

/// Parses a JSON document; a syntax or type error names its path.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Invalid> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        Invalid::one(clean_path(&path), e.into_inner().to_string())
    })
}

/// serde_path_to_error writes `.` for the root.
fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

fn toml_message(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}
