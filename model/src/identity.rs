//! SPIFFE workload identities: the one type and validator every crate uses.
//!
//! Weft's workload identities have Istio's form, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! checked by the rules of the SPIFFE ID standard (SPIFFE-ID.md, section 2):
//! - the scheme is `spiffe://`, lowercase;
//! - the trust domain is 1 to 255 bytes of `a-z`, `0-9`, `.`, `-`, `_` (no port, no userinfo);
//! - every path segment is non-empty, of `A-Z`, `a-z`, `0-9`, `.`, `-`, `_`, and neither `.` nor `..`
//!   (no percent-encoding, query or fragment).
//!
//! An [`Identity`] is valid by construction, so `Display` followed by `FromStr` gives back the same
//! value, and its parts are borrowed without parsing again ([`Identity::namespace`], ...).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of every SPIFFE id.
pub const SCHEME: &str = "spiffe://";
/// The longest trust domain the SPIFFE standard allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const NS: &str = "/ns/";
const SA: &str = "/sa/";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Built only by [`FromStr`] and [`Identity::try_new`], which validate: every `Identity` is a valid
/// SPIFFE id. Ordered by (trust domain, namespace, service account).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The whole id, `spiffe://...`.
    uri: Box<str>,
    /// Where the trust domain ends in `uri` (`/ns/` follows).
    td_end: usize,
    /// Where the namespace ends in `uri` (`/sa/` follows, then the service account to the end).
    ns_end: usize,
}

/// The part of a SPIFFE id that is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// The `spiffe://` scheme.
    Scheme,
    /// The path's shape (`/ns/<namespace>/sa/<service-account>`, nothing more).
    Path,
    TrustDomain,
    Namespace,
    ServiceAccount,
}

/// A string that is not a SPIFFE id of the `ns/<ns>/sa/<sa>` form, or components that cannot form one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE identity {input:?}: {part}: {reason}")]
pub struct InvalidIdentity {
    /// The rejected input: the whole id ([`FromStr`]), or the offending component ([`Identity::try_new`],
    /// [`check_trust_domain`]).
    pub input: String,
    /// Which part is wrong.
    pub part: Part,
    /// What is wrong with it.
    pub reason: &'static str,
}

// === impl Identity ===

impl Identity {
    /// An identity from its three components, rejecting components that cannot appear in a SPIFFE id
    /// (the error's `input` is the offending component).
    pub fn try_new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, InvalidIdentity> {
        let invalid = |input: &str, (part, reason)| InvalidIdentity {
            input: input.to_owned(),
            part,
            reason,
        };
        trust_domain_problem(trust_domain).map_err(|p| invalid(trust_domain, p))?;
        segment_problem(namespace, Part::Namespace).map_err(|p| invalid(namespace, p))?;
        segment_problem(service_account, Part::ServiceAccount).map_err(|p| invalid(service_account, p))?;
        let td_end = SCHEME.len() + trust_domain.len();
        let ns_end = td_end + NS.len() + namespace.len();
        Ok(Self {
            uri: format!("{SCHEME}{trust_domain}{NS}{namespace}{SA}{service_account}").into(),
            td_end,
            ns_end,
        })
    }

    /// The trust domain (the URI's host part).
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.td_end + NS.len()..self.ns_end]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[self.ns_end + SA.len()..]
    }

    /// The id as Istio's `AuthorizationPolicy` writes principals: `<td>/ns/<ns>/sa/<sa>`, without the scheme.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The whole id, `spiffe://<td>/ns/<ns>/sa/<sa>` (as `Display` writes it).
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Identity").field(&&*self.uri).finish()
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.trust_domain(), self.namespace(), self.service_account()).cmp(&(
            other.trust_domain(),
            other.namespace(),
            other.service_account(),
        ))
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for Identity {
    type Err = InvalidIdentity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts = split(s).map_err(|(part, reason)| InvalidIdentity {
            input: s.to_owned(),
            part,
            reason,
        })?;
        let td_end = SCHEME.len() + parts.trust_domain.len();
        Ok(Self {
            uri: s.into(),
            td_end,
            ns_end: td_end + NS.len() + parts.namespace.len(),
        })
    }
}

// === validation ===

/// The parts of a valid SPIFFE id, borrowed from the string: what [`FromStr`] checks, without
/// allocating (the policy matcher reads a client's id with it for every connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parts<'a> {
    /// `<td>/ns/<ns>/sa/<sa>`, as [`Identity::principal`].
    pub principal: &'a str,
    pub trust_domain: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// Checks `s` as [`FromStr`] does: the scheme, then the path's shape, then each component.
pub(crate) fn split(s: &str) -> Result<Parts<'_>, Problem> {
    let principal = s
        .strip_prefix(SCHEME)
        .ok_or((Part::Scheme, "must start with spiffe://"))?;
    let mut segments = principal.split('/');
    let (Some(trust_domain), Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err((Part::Path, "must be /ns/<namespace>/sa/<service-account>"));
    };
    trust_domain_problem(trust_domain)?;
    segment_problem(namespace, Part::Namespace)?;
    segment_problem(service_account, Part::ServiceAccount)?;
    Ok(Parts {
        principal,
        trust_domain,
        namespace,
        service_account,
    })
}

/// Checks a SPIFFE trust domain: 1-255 bytes of `a-z`, `0-9`, `.`, `-`, `_`.
pub fn check_trust_domain(td: &str) -> Result<(), InvalidIdentity> {
    trust_domain_problem(td).map_err(|(part, reason)| InvalidIdentity {
        input: td.to_owned(),
        part,
        reason,
    })
}

/// Whether `td` is a SPIFFE trust domain ([`check_trust_domain`]).
pub fn is_trust_domain(td: &str) -> bool {
    trust_domain_problem(td).is_ok()
}

/// The part that is wrong, and why.
pub(crate) type Problem = (Part, &'static str);

fn trust_domain_problem(td: &str) -> Result<(), Problem> {
    let problem = |reason| Err((Part::TrustDomain, reason));
    if td.is_empty() {
        return problem("must not be empty");
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return problem("must not be longer than 255 bytes");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return problem("may only hold a-z, 0-9, '.', '-', '_'");
    }
    Ok(())
}

/// A SPIFFE path segment: non-empty, letters, digits, '.', '-', '_', and not "." or "..".
fn segment_problem(seg: &str, part: Part) -> Result<(), Problem> {
    let problem = |reason| Err((part, reason));
    if seg.is_empty() {
        return problem("must not be empty");
    }
    if seg == "." || seg == ".." {
        return problem("may not be '.' or '..'");
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return problem("may only hold A-Z, a-z, 0-9, '.', '-', '_'");
    }
    Ok(())
}

// === impl Part ===

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Scheme => "scheme",
            Part::Path => "path",
            Part::TrustDomain => "trust domain",
            Part::Namespace => "namespace",
            Part::ServiceAccount => "service account",
        })
    }
}

#[cfg(test)]
mod tests;
