//! The ACME account: created once per CA directory, its credentials (which
//! hold the account's private key) kept in the state directory with mode 0600.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use instant_acme::{Account, AccountCredentials, NewAccount};

use crate::AcmeConfig;

/// The file holding the account for `directory`: one per CA, so that pointing
/// a host at another CA does not reuse a key the other CA never saw.
pub fn credentials_path(state_dir: &Path, directory: &str) -> PathBuf {
    // FNV-1a: stable across builds (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in directory.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    state_dir
        .join("acme")
        .join(format!("account-{h:016x}.json"))
}

fn builder(cfg: &AcmeConfig) -> Result<instant_acme::AccountBuilder, String> {
    match &cfg.ca_file {
        Some(f) => {
            Account::builder_with_root(f).map_err(|e| format!("acme.ca_file {}: {e}", f.display()))
        }
        None => Account::builder().map_err(|e| format!("HTTP client: {e}")),
    }
}

/// The account: read from its file, or created with the CA and written there.
pub async fn load_or_create(cfg: &AcmeConfig, state_dir: &Path) -> Result<Account, String> {
    let path = credentials_path(state_dir, &cfg.directory);
    if let Ok(text) = std::fs::read(&path) {
        let creds: AccountCredentials = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not account credentials: {e}", path.display()))?;
        return builder(cfg)?
            .from_credentials(creds)
            .await
            .map_err(|e| format!("account from {}: {e}", path.display()));
    }
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder(cfg)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating an account with {}: {e}", cfg.directory))?;
    let json = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
    write_private(&path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(directory = %cfg.directory, file = %path.display(), "ACME account created");
    Ok(account)
}

/// Forgets the stored account (the CA no longer knows it).
pub fn forget(cfg: &AcmeConfig, state_dir: &Path) {
    let _ = std::fs::remove_file(credentials_path(state_dir, &cfg.directory));
}

/// Writes a file only its owner can read, atomically (a crash leaves the old
/// file or the new one, never half of one).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn private_files_are_0600_and_one_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = credentials_path(dir.path(), "https://a/dir");
        assert_ne!(a, credentials_path(dir.path(), "https://b/dir"));
        write_private(&a, b"{}").unwrap();
        write_private(&a, b"{\"x\":1}").unwrap();
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&a).unwrap(), b"{\"x\":1}");
    }
}
