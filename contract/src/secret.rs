use serde::{Deserialize, Serialize};

/// A string that never shows in `Debug` output, so a logged configuration
/// cannot leak a password.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// A connection URL fit for logs and error messages: its password replaced
/// by `***`. A URL that does not parse loses everything between the scheme
/// and its last `@`, where credentials would be.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut parsed) = url::Url::parse(url) {
        if parsed.password().is_none() {
            return url.to_owned();
        }
        if parsed.set_password(Some("***")).is_ok() {
            return parsed.to_string();
        }
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme + 3 => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_and_keep_the_rest() {
        assert_eq!(
            redact_url("mysql://ocr:hunter2@db:3306/ocr"),
            "mysql://ocr:***@db:3306/ocr"
        );
        assert_eq!(
            redact_url("redis://:hunter2@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_url("mysql://root@127.0.0.1:3306/ocr"),
            "mysql://root@127.0.0.1:3306/ocr"
        );
        assert_eq!(
            redact_url("sqlite://ocr.db?mode=rwc"),
            "sqlite://ocr.db?mode=rwc"
        );
        // Not a valid URL (a space in the host): the credentials still go.
        let broken = redact_url("mysql://ocr:hun ter2@db host/ocr");
        assert!(!broken.contains("hun ter2"), "{broken}");
        assert!(broken.ends_with("@db host/ocr"), "{broken}");
    }

    #[test]
    fn debug_output_hides_the_value_but_shows_emptiness() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"***\"");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    }
}
