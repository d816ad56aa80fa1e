//! A wrapper that keeps secrets out of `Debug`, `Display` and logs.

use std::fmt;

/// Holds a secret value. `Debug` prints `Secret([REDACTED])`; there is no `Display` and no
/// `Serialize`, so a secret reaches a response or a log line only through an explicit
/// [`Secret::expose`] at the one place that needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("sk_live_very_secret".to_string());
        let shown = format!("{s:?} {:?}", Some(&s));
        assert!(!shown.contains("very_secret"), "{shown}");
        assert_eq!(s.expose(), "sk_live_very_secret");
    }
}
