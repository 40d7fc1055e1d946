//! Tenants and their API keys, without I/O: how a key looks, how it is
//! hashed for storage and which tenant names are valid.
//!
//! A key made by `ocr-runtime keys create` reads `ocr_<id>_<secret>`: the id
//! (16 hex digits) finds its row, the secret (256 random bits, hex) proves
//! possession. Only the SHA-256 of the whole key is stored. Keys from a key
//! folder (a mounted Secret) may be any string of at least
//! [`MIN_KEY_LENGTH`] characters; they are matched by the same hash.

use sha2::{Digest, Sha256};

/// The tenant of requests that bring no key where keys are optional.
pub const ANONYMOUS: &str = "anonymous";

/// Shorter keys are refused: a key is a password that nobody types.
pub const MIN_KEY_LENGTH: usize = 32;

const PREFIX: &str = "ocr_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A tenant's name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or
/// digit, so it is a valid Secret data key (one file per tenant) and a safe
/// label everywhere else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a tenant name: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
pub struct BadTenant(pub String);

impl Tenant {
    pub fn parse(name: &str) -> Result<Tenant, BadTenant> {
        let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ok = (1..=64).contains(&name.len())
            && name.chars().next().is_some_and(valid_char)
            && name
                .chars()
                .all(|c| valid_char(c) || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Tenant(name.to_owned()))
        } else {
            Err(BadTenant(name.to_owned()))
        }
    }

    pub fn anonymous() -> Tenant {
        Tenant(ANONYMOUS.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A freshly made key: shown once, then only its hash is kept.
#[derive(Clone)]
pub struct NewKey {
    pub id: String,
    pub token: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewKey {{ id: {:?}, token: \"***\" }}", self.id)
    }
}

impl NewKey {
    /// A new key from `random` (`ID_BYTES + SECRET_BYTES` bytes from the
    /// operating system's generator).
    pub fn from_random(random: &[u8; ID_BYTES + SECRET_BYTES]) -> NewKey {
        let id = hex::encode(&random[..ID_BYTES]);
        let secret = hex::encode(&random[ID_BYTES..]);
        NewKey {
            token: format!("{PREFIX}{id}_{secret}"),
            id,
        }
    }

    pub fn generate() -> Result<NewKey, getrandom::Error> {
        let mut random = [0u8; ID_BYTES + SECRET_BYTES];
        getrandom::fill(&mut random)?;
        Ok(NewKey::from_random(&random))
    }

    pub fn sha256(&self) -> String {
        key_sha256(&self.token)
    }
}

/// The id of a key made by `keys create`, or `None` for any other string
/// (a key from a key folder, or garbage).
pub fn key_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, bytes: usize| {
        s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(id, ID_BYTES) && hex(secret, SECRET_BYTES)).then_some(id)
}

/// What is stored and compared: the hex SHA-256 of the whole key.
pub fn key_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The key of an `Authorization` value: `Bearer <key>` (scheme in any case).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The keys of one key file: one per line; blank lines and `#` comments
/// skipped; keys shorter than [`MIN_KEY_LENGTH`] are returned apart so the
/// caller can say so (never the key itself).
pub fn keys_in_file(text: &str) -> (Vec<&str>, usize) {
    let mut keys = Vec::new();
    let mut too_short = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() < MIN_KEY_LENGTH {
            too_short += 1;
        } else {
            keys.push(line);
        }
    }
    (keys, too_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_made_key_names_its_id_and_hashes_to_what_is_stored() {
        let key = NewKey::from_random(&[7; ID_BYTES + SECRET_BYTES]);
        assert_eq!(key.id, "0707070707070707");
        assert_eq!(key_id(&key.token), Some("0707070707070707"));
        assert_eq!(key.sha256(), key_sha256(&key.token));
        assert_eq!(key.sha256().len(), 64);
        assert!(!format!("{key:?}").contains(&key.token[20..]));
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = NewKey::generate().expect("OS randomness");
        let b = NewKey::generate().expect("OS randomness");
        assert_ne!(a.token, b.token);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn only_well_formed_keys_have_an_id() {
        let key = NewKey::from_random(&[0xab; ID_BYTES + SECRET_BYTES]).token;
        assert!(key_id(&key).is_some());
        assert_eq!(key_id(&key.to_uppercase()), None);
        assert_eq!(key_id(&key[..key.len() - 1]), None);
        assert_eq!(key_id("ocr__"), None);
        assert_eq!(key_id("a-secret-from-a-kubernetes-secret-file"), None);
    }

    #[test]
    fn bearer_values_are_read_leniently_but_only_as_bearer() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc  "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn tenant_names_are_safe_file_names_and_labels() {
        for good in ["acme", "a", "team-1.prod_eu", &"x".repeat(64)] {
            assert!(Tenant::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Acme",
            "-acme",
            ".hidden",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(65),
        ] {
            assert!(Tenant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files_skip_comments_and_refuse_short_keys() {
        let long = "k".repeat(MIN_KEY_LENGTH);
        let text = format!("# rotated 2026-12\n\n  {long}  \nshort\n{long}x\n");
        let (keys, too_short) = keys_in_file(&text);
        assert_eq!(keys, vec![long.as_str(), &format!("{long}x")]);
        assert_eq!(too_short, 1);
    }

    proptest! {
        #[test]
        fn hostile_authorization_values_never_panic(value in ".*") {
            let _ = bearer_token(&value).map(key_id);
            let _ = Tenant::parse(&value);
        }
    }
}
