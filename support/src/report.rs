//! How the binaries print an error: the message and each cause in its chain, joined by `: `, each
//! said once.
//!
//! Many errors say their cause in their own message ("tls.cert: cannot read /x.pem: No such file
//! or directory") and also return it as their `source()`, so printing the chain as it is (as
//! anyhow's `{:#}` does) says the operating system's error twice. [`report`] leaves out a cause
//! whose text the message already holds.

use std::error::Error;

/// The error and its causes on one line, each cause said once.
pub fn report(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let part = e.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// An error that says its cause in its message and returns it as its source too.
    #[derive(Debug)]
    struct Reading(io::Error);

    impl std::fmt::Display for Reading {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "agent.toml: ca: cannot read /x/ca.pem: {}", self.0)
        }
    }

    impl Error for Reading {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    /// An error that leaves its cause to the chain.
    #[derive(Debug)]
    struct Loading(Reading);

    impl std::fmt::Display for Loading {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("loading the configuration")
        }
    }

    impl Error for Loading {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let os = || io::Error::from(io::ErrorKind::NotFound);
        let os_text = os().to_string();
        let cases: [(Box<dyn Error>, String); 3] = [
            (Box::new(os()), os_text.clone()),
            (
                Box::new(Reading(os())),
                format!("agent.toml: ca: cannot read /x/ca.pem: {os_text}"),
            ),
            (
                Box::new(Loading(Reading(os()))),
                format!(
                    "loading the configuration: agent.toml: ca: cannot read /x/ca.pem: {os_text}"
                ),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(report(error.as_ref()), expected);
            assert_eq!(report(error.as_ref()).matches(&os_text).count(), 1);
        }
    }
}
