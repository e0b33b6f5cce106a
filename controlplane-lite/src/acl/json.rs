//! ACL rules in JSON: one object, or several objects one after another (the guide's
//! `mesh-gateway-policy.json`), read with serde_json's stream deserializer and merged.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::rules::{unsupported, Access, Rules, ServiceRule};
use crate::error::{Error, Result};

/// Parses JSON rules.
pub fn parse(text: &str) -> Result<Rules> {
    let mut rules = Rules::default();
    let mut count = 0;
    for (position, item) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        let value = item.map_err(|e| {
            Error::bad_request(format!("invalid JSON rules (object {}): {e}", position + 1))
        })?;
        let Value::Object(object) = value else {
            return Err(Error::bad_request(
                "invalid JSON rules: each document must be an object",
            ));
        };
        rules.merge(&parse_object(&object)?);
        count += 1;
    }
    if count == 0 {
        return Err(Error::bad_request("invalid JSON rules: empty"));
    }
    Ok(rules)
}

fn parse_object(object: &Map<String, Value>) -> Result<Rules> {
    let mut rules = Rules::default();
    for (key, value) in object {
        match key.as_str() {
            "acl" => rules.acl = Some(Access::parse(string(value, key)?, key)?),
            "operator" => rules.operator = Some(Access::parse(string(value, key)?, key)?),
            "mesh" => rules.mesh = Some(Access::parse(string(value, key)?, key)?),
            "service" => rules.service = service_rules(value, key)?,
            "service_prefix" => rules.service_prefix = service_rules(value, key)?,
            "node" => rules.node = node_rules(value, key)?,
            "node_prefix" => rules.node_prefix = node_rules(value, key)?,
            other => return Err(unsupported(other)),
        }
    }
    Ok(rules)
}

fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str> {
    value
        .as_str()
        .ok_or_else(|| Error::bad_request(format!("invalid ACL rules: {field} must be a string")))
}

fn blocks<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>> {
    value.as_object().ok_or_else(|| {
        Error::bad_request(format!(
            "invalid ACL rules: {field} must be an object of names"
        ))
    })
}

fn service_rules(value: &Value, field: &str) -> Result<BTreeMap<String, ServiceRule>> {
    let mut out = BTreeMap::new();
    for (name, body) in blocks(value, field)? {
        let mut rule = ServiceRule::default();
        for (key, inner) in blocks(body, &format!("{field}.{name:?}"))? {
            let path = format!("{field}.{name:?}.{key}");
            match key.as_str() {
                "policy" => rule.policy = Some(Access::parse(string(inner, &path)?, &path)?),
                "intentions" => {
                    rule.intentions = Some(Access::parse(string(inner, &path)?, &path)?)
                }
                _ => {
                    return Err(Error::bad_request(format!(
                        "invalid ACL rules: unknown field {path}"
                    )))
                }
            }
        }
        out.insert(name.clone(), rule);
    }
    Ok(out)
}

fn node_rules(value: &Value, field: &str) -> Result<BTreeMap<String, Access>> {
    let mut out = BTreeMap::new();
    for (name, body) in blocks(value, field)? {
        let mut policy = None;
        for (key, inner) in blocks(body, &format!("{field}.{name:?}"))? {
            let path = format!("{field}.{name:?}.{key}");
            match key.as_str() {
                "policy" => policy = Some(Access::parse(string(inner, &path)?, &path)?),
                _ => {
                    return Err(Error::bad_request(format!(
                        "invalid ACL rules: unknown field {path}"
                    )))
                }
            }
        }
        let policy = policy.ok_or_else(|| {
            Error::bad_request(format!(
                "invalid ACL rules: {field}.{name:?} needs a policy"
            ))
        })?;
        out.insert(name.clone(), policy);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_objects_merge() {
        let rules = parse(
            r#"{ "node_prefix": { "": { "policy": "read" } } }
               { "service_prefix": { "": { "policy": "read" } } }
               { "service": { "mesh-gateway": { "policy": "write" } } }"#,
        )
        .expect("parse");
        assert_eq!(rules.node_access("any"), Some(Access::Read));
        assert_eq!(rules.service_access("socat"), Some(Access::Read));
        assert_eq!(rules.service_access("mesh-gateway"), Some(Access::Write));
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse(r#"{"service": {"x": {"polcy": "read"}}}"#).expect_err("typo");
        assert!(err.to_string().contains("polcy"), "{err}");
        let err = parse(r#"{"key_prefix": {}}"#).expect_err("unsupported");
        assert!(err.to_string().contains("key_prefix"), "{err}");
        assert!(parse(r#"{"acl": "rule"}"#).is_err());
        assert!(parse(r#"{"acl": "write"} {"#).is_err());
    }
}
