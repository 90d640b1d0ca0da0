//! SPIFFE workload identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of every SPIFFE id.
const SCHEME: &str = "spiffe://";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsed identities ([`FromStr`], [`Identity::try_new`]) are always valid, so `Display` followed by
/// `FromStr` gives back the same value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// A string that is not a SPIFFE id of the `ns/<ns>/sa/<sa>` form, or components that cannot form one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE identity {input:?}: {reason}")]
pub struct InvalidIdentity {
    /// The rejected input (the whole id, or the offending component).
    pub input: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

// === impl Identity ===

impl Identity {
    /// An identity from its three components, without validation.
    ///
    /// Meant for components that are valid by construction (Kubernetes namespace and service-account names,
    /// a configured trust domain). Use [`Identity::try_new`] for anything else: an identity built here from
    /// invalid components displays as a string that [`FromStr`] would reject.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// An identity from its three components, rejecting components that cannot appear in a SPIFFE id.
    pub fn try_new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, InvalidIdentity> {
        let id = Self::new(trust_domain, namespace, service_account);
        check_trust_domain(&id.trust_domain)?;
        check_segment(&id.namespace)?;
        check_segment(&id.service_account)?;
        Ok(id)
    }

    /// The trust domain (the URI's host part).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidIdentity {
            input: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("must start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(invalid("path must be /ns/<namespace>/sa/<service-account>"));
        };
        check_trust_domain(td).map_err(|e| invalid(e.reason))?;
        check_segment(ns).map_err(|e| invalid(e.reason))?;
        check_segment(sa).map_err(|e| invalid(e.reason))?;
        Ok(Self::new(td, ns, sa))
    }
}

/// SPIFFE trust domain: 1-255 of lowercase letters, digits, '.', '-', '_'.
fn check_trust_domain(td: &str) -> Result<(), InvalidIdentity> {
    let invalid = |reason| InvalidIdentity {
        input: td.to_owned(),
        reason,
    };
    if td.is_empty() {
        return Err(invalid("empty trust domain"));
    }
    if td.len() > 255 {
        return Err(invalid("trust domain longer than 255 bytes"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid("trust domain may only hold a-z, 0-9, '.', '-', '_'"));
    }
    Ok(())
}

/// SPIFFE path segment: non-empty, letters, digits, '.', '-', '_', and not "." or "..".
fn check_segment(seg: &str) -> Result<(), InvalidIdentity> {
    let invalid = |reason| InvalidIdentity {
        input: seg.to_owned(),
        reason,
    };
    if seg.is_empty() {
        return Err(invalid("empty path segment"));
    }
    if seg == "." || seg == ".." {
        return Err(invalid("path segment may not be '.' or '..'"));
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(invalid("path segment may only hold A-Z, a-z, 0-9, '.', '-', '_'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_displays_a_workload_identity() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/bookinfo");
        assert_eq!(id, Identity::new("cluster.local", "default", "bookinfo"));
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a%20/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x",
            "SPIFFE://cluster.local/ns/a/sa/b",
        ] {
            let err = bad.parse::<Identity>().unwrap_err();
            assert!(!err.reason.is_empty(), "{bad}");
        }
    }

    #[test]
    fn try_new_rejects_invalid_components() {
        assert!(Identity::try_new("td", "ns", "sa").is_ok());
        assert!(Identity::try_new("", "ns", "sa").is_err());
        assert!(Identity::try_new("td", "n/s", "sa").is_err());
        assert!(Identity::try_new("td", "ns", "").is_err());
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,20}".prop_filter("dot segments", |s| s != "." && s != "..")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn display_then_parse_round_trips(td in "[a-z0-9._-]{1,30}", ns in segment(), sa in segment()) {
            let id = Identity::try_new(td, ns, sa).unwrap();
            let back: Identity = id.to_string().parse().unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn parse_never_panics_and_accepted_strings_round_trip(s in "\\PC{0,60}") {
            if let Ok(id) = s.parse::<Identity>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn parse_of_spiffe_like_strings_round_trips(s in "spiffe://[a-z.]{0,5}/(ns|sa|x)/[a-z./]{0,5}/(sa|ns)/[a-z.]{0,4}") {
            if let Ok(id) = s.parse::<Identity>() {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
