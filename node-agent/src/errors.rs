//! Errors as one line for logs: each cause after the one it caused.

/// `e` and its chain of sources, joined by `: ` (`enrolling pod: binding ...: Address already in use`).
pub fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_cause_follows_the_error_it_caused() {
        let inner = std::io::Error::other("Address already in use");
        let outer = std::io::Error::new(std::io::ErrorKind::AddrInUse, Wrapped(inner));
        assert_eq!(
            super::display_chain(&outer),
            "binding 0.0.0.0:15008: Address already in use"
        );
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("binding 0.0.0.0:15008")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
