//! WireGuard keys: Curve25519, written base64 (as `wg genkey` does) in files and the
//! catalog, hex on the UAPI socket. The private key file is created once, mode 0600,
//! and a file that others can read is refused.

use std::{
    fmt,
    fs::OpenOptions,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A 32-byte WireGuard key (public, private or preshared).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // never print a whole key: the first bytes identify it in logs
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

/// A key that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WireGuard key ({0}): expected 32 bytes, base64 (44 characters) or hex (64)")]
pub struct BadKey(&'static str);

impl Key {
    /// A fresh random private key.
    pub fn generate() -> Key {
        Key(rand::random())
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    /// Base64, as `wg` and the catalog write keys.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Lowercase hex, as the UAPI writes keys.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// From base64.
    pub fn from_base64(s: &str) -> Result<Key, BadKey> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| BadKey("bad base64"))?;
        v.try_into().map(Key).map_err(|_| BadKey("wrong length"))
    }

    /// From hex.
    pub fn from_hex(s: &str) -> Result<Key, BadKey> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(BadKey("wrong length"));
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BadKey("bad hex"))?;
        }
        Ok(Key(k))
    }

    /// True for the all-zero key, which the UAPI uses to mean "none".
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 32]
    }
}

/// Problems with the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Others may read it.
    #[error("key file {path} is readable by others (mode {mode:o}); `chmod 600` it")]
    Exposed {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// It holds no key.
    #[error("key file {path}: {source}")]
    Bad {
        /// The file.
        path: String,
        /// Why.
        source: BadKey,
    },
}

/// Reads the private key at `path`, creating it (mode 0600, parent directories
/// too) with a fresh key if it does not exist yet.
pub fn load_or_create(path: &Path) -> Result<Key, KeyFileError> {
    let p = path.display().to_string();
    let io = |source| KeyFileError::Io {
        path: p.clone(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Exposed { path: p, mode });
            }
            let text = std::fs::read_to_string(path).map_err(io)?;
            Key::from_base64(&text).map_err(|source| KeyFileError::Bad { path: p, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let key = Key::generate();
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(format!("{}\n", key.to_base64()).as_bytes())
                .map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip() {
        let k = Key::generate();
        assert_eq!(Key::from_base64(&k.to_base64()), Ok(k));
        assert_eq!(Key::from_hex(&k.to_hex()), Ok(k));
        assert_eq!(k.to_base64().len(), 44);
        assert!(Key::from_base64("abc").is_err());
        assert!(Key::from_hex(&"zz".repeat(32)).is_err());
        assert_ne!(k.public(), k);
    }

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1: Alice's private and public keys
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        assert_eq!(
            private.public().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg/private.key");
        let a = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), a, "the key is kept");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
