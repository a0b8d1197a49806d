//! `Secret`: a value that must not reach logs, panic messages or `{:?}` dumps of the configuration (passwords,
//! and metadata URLs, which may carry one).
//!
//! Its `Debug` prints `***` and it has no `Display`, so a struct holding one can derive `Debug` safely. It derefs
//! to `str` for the code that needs the value (an `Authorization` header, a database connection): it guards
//! against printing a secret by accident, not against using it.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_value_and_deref_gives_it() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(&*s, "hunter2");
    }
}
