//! Annotation keys and values Weft reads and writes.

/// On a namespace: `ambient` enrolls its pods. On a pod: `none` opts the pod out, `ambient` opts it in
/// even when its namespace is not enrolled.
pub const DATAPLANE_MODE: &str = "weft.dev/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Every value [`DATAPLANE_MODE`] may have.
pub const DATAPLANE_MODES: [&str; 2] = [DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_NONE];

/// Validates the value of an annotation Weft reads: [`DATAPLANE_MODE`] must be one of
/// [`DATAPLANE_MODES`]; other keys are not Weft's and take any value. The error is the problem
/// alone, for the caller to prefix with the object and the annotation.
pub fn validate_value(key: &str, value: &str) -> Result<(), String> {
    if key == DATAPLANE_MODE && !DATAPLANE_MODES.contains(&value) {
        let allowed: Vec<String> = DATAPLANE_MODES.iter().map(|m| format!("{m:?}")).collect();
        return Err(format!(
            "{value:?} is not a dataplane mode (allowed: {})",
            allowed.join(", ")
        ));
    }
    Ok(())
}

/// Validates an annotation key the way Kubernetes does: optional DNS-subdomain prefix and `/`, then a
/// name of at most 63 characters of alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(crate::is_dns_label);
        if !ok {
            return Err(format!(
                "annotation key {key:?}: prefix {prefix:?} is not a DNS subdomain"
            ));
        }
    }
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !name_ok {
        return Err(format!(
            "annotation key {key:?}: name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_style_keys() {
        assert!(validate_key(DATAPLANE_MODE).is_ok());
        assert!(validate_key("app").is_ok());
        assert!(validate_key("example.com/my_key.v1").is_ok());
    }

    #[test]
    fn dataplane_mode_value_must_be_ambient_or_none() {
        assert!(validate_value(DATAPLANE_MODE, "ambient").is_ok());
        assert!(validate_value(DATAPLANE_MODE, "none").is_ok());
        for bad in ["bogus", "", "Ambient", " none", "sidecar"] {
            assert_eq!(
                validate_value(DATAPLANE_MODE, bad).expect_err(bad),
                format!("{bad:?} is not a dataplane mode (allowed: \"ambient\", \"none\")")
            );
        }
        assert!(validate_value("example.com/mode", "bogus").is_ok(), "not Weft's key");
    }

    #[test]
    fn rejects_malformed_keys_with_a_reason() {
        for bad in ["", "/x", "Weft.dev/x", "weft.dev/", "weft.dev/-x", "a/b/c", "x y"] {
            let err = validate_key(bad).expect_err(bad);
            assert!(err.contains("annotation key"), "{err}");
        }
    }
}
