//! The subset of HCL that ACL rules use, parsed by hand:
//!
//! ```hcl
//! acl = "write"
//! operator = "read"
//! mesh = "write"
//! service "web" { policy = "write" intentions = "read" }
//! service_prefix "" { policy = "read" }
//! node_prefix "" { policy = "read" }
//! ```
//!
//! Comments (`#`, `//`, `/* */`), newlines and commas separate items. Anything else is an error
//! that names the line.

use super::rules::{unsupported, Access, Rules, ServiceRule};

/// One `key = "value"` inside a block: (line, key, value).
type Field = (usize, String, String);
use crate::error::{Error, Result};

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    Str(String),
    Equals,
    Open,
    Close,
}

/// Parses HCL rules.
pub fn parse(text: &str) -> Result<Rules> {
    let tokens = tokenize(text)?;
    let mut rules = Rules::default();
    let mut position = 0;
    while position < tokens.len() {
        let (line, token) = &tokens[position];
        let Token::Ident(keyword) = token else {
            return Err(syntax(*line, "expected a rule name"));
        };
        match (keyword.as_str(), tokens.get(position + 1)) {
            ("acl" | "operator" | "mesh", Some((_, Token::Equals))) => {
                let value = expect_string(&tokens, position + 2, *line)?;
                let access = Some(Access::parse(value, keyword)?);
                match keyword.as_str() {
                    "acl" => rules.acl = access,
                    "operator" => rules.operator = access,
                    _ => rules.mesh = access,
                }
                position += 3;
            }
            (
                "service" | "service_prefix" | "node" | "node_prefix",
                Some((_, Token::Str(name))),
            ) => {
                let (fields, next) = block(&tokens, position + 2, *line)?;
                let mut rule = ServiceRule::default();
                for (field_line, field, value) in fields {
                    let path = format!("{keyword} {name:?} {field}");
                    match field.as_str() {
                        "policy" => rule.policy = Some(Access::parse(&value, &path)?),
                        "intentions" if keyword.starts_with("service") => {
                            rule.intentions = Some(Access::parse(&value, &path)?)
                        }
                        _ => return Err(syntax(field_line, &format!("unknown field {path}"))),
                    }
                }
                match keyword.as_str() {
                    "service" => merge_into(&mut rules.service, name, rule),
                    "service_prefix" => merge_into(&mut rules.service_prefix, name, rule),
                    _ => {
                        let policy = rule.policy.ok_or_else(|| {
                            syntax(*line, &format!("{keyword} {name:?} needs a policy"))
                        })?;
                        let map = if keyword == "node" {
                            &mut rules.node
                        } else {
                            &mut rules.node_prefix
                        };
                        map.insert(name.clone(), policy);
                    }
                }
                position = next;
            }
            (
                "acl" | "operator" | "mesh" | "service" | "service_prefix" | "node" | "node_prefix",
                _,
            ) => {
                return Err(syntax(*line, &format!("malformed {keyword} rule")));
            }
            (other, _) => return Err(unsupported(other)),
        }
    }
    Ok(rules)
}

fn merge_into(
    map: &mut std::collections::BTreeMap<String, ServiceRule>,
    name: &str,
    rule: ServiceRule,
) {
    let entry = map.entry(name.to_owned()).or_default();
    *entry = entry.merge(rule);
}

fn syntax(line: usize, message: &str) -> Error {
    Error::bad_request(format!("invalid HCL rules (line {line}): {message}"))
}

fn expect_string(tokens: &[(usize, Token)], position: usize, line: usize) -> Result<&str> {
    match tokens.get(position) {
        Some((_, Token::Str(value))) => Ok(value),
        _ => Err(syntax(line, "expected a quoted string")),
    }
}

/// Parses `{ key = "value" ... }` starting at the `{`; returns the fields and the next position.
fn block(
    tokens: &[(usize, Token)],
    mut position: usize,
    line: usize,
) -> Result<(Vec<Field>, usize)> {
    if !matches!(tokens.get(position), Some((_, Token::Open))) {
        return Err(syntax(line, "expected '{'"));
    }
    position += 1;
    let mut fields = Vec::new();
    loop {
        match tokens.get(position) {
            Some((_, Token::Close)) => return Ok((fields, position + 1)),
            Some((field_line, Token::Ident(field))) => {
                if !matches!(tokens.get(position + 1), Some((_, Token::Equals))) {
                    return Err(syntax(*field_line, &format!("expected '=' after {field}")));
                }
                let value = expect_string(tokens, position + 2, *field_line)?;
                fields.push((*field_line, field.clone(), value.to_owned()));
                position += 3;
            }
            Some((other_line, _)) => {
                return Err(syntax(*other_line, "expected a field name or '}'"))
            }
            None => return Err(syntax(line, "unclosed '{'")),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() || c == ',' => {}
            '#' => skip_line(&mut chars, &mut line),
            '/' if chars.peek() == Some(&'/') => skip_line(&mut chars, &mut line),
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                loop {
                    match chars.next() {
                        Some('/') if previous == '*' => break,
                        Some(next) => {
                            if next == '\n' {
                                line += 1;
                            }
                            previous = next;
                        }
                        None => return Err(syntax(line, "unclosed comment")),
                    }
                }
            }
            '=' => tokens.push((line, Token::Equals)),
            '{' => tokens.push((line, Token::Open)),
            '}' => tokens.push((line, Token::Close)),
            '"' => {
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some(escaped @ ('"' | '\\')) => value.push(escaped),
                            _ => return Err(syntax(line, "bad escape in string")),
                        },
                        Some('\n') | None => return Err(syntax(line, "unterminated string")),
                        Some(other) => value.push(other),
                    }
                }
                tokens.push((line, Token::Str(value)));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut ident = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '_' || next == '-' {
                        ident.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push((line, Token::Ident(ident)));
            }
            other => return Err(syntax(line, &format!("unexpected character {other:?}"))),
        }
    }
    Ok(tokens)
}

fn skip_line(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, line: &mut usize) {
    for c in chars.by_ref() {
        if c == '\n' {
            *line += 1;
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_gateway_policy() {
        let rules = parse(
            "# gateway\nservice \"mesh-gateway\" { policy = \"write\" }\nservice_prefix \"\" { policy = \"read\" }\n// nodes\nnode_prefix \"\" { policy = \"read\" }\n/* top */ acl = \"read\", operator = \"write\"",
        )
        .expect("parse");
        assert_eq!(rules.service_access("mesh-gateway"), Some(Access::Write));
        assert_eq!(rules.service_access("x"), Some(Access::Read));
        assert_eq!(rules.node_access("x"), Some(Access::Read));
        assert_eq!(rules.acl, Some(Access::Read));
        assert_eq!(rules.operator, Some(Access::Write));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let err = parse("service \"x\" {\n  polcy = \"read\"\n}").expect_err("typo");
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("polcy"),
            "{err}"
        );
        assert!(parse("service \"x\" { policy = \"read\"").is_err());
        assert!(parse("service \"x\" { policy = \"admin\" }").is_err());
        assert!(parse("key_prefix \"\" { policy = \"read\" }").is_err());
        assert!(parse("acl = write").is_err());
        assert!(parse("node \"n\" { }").is_err());
        assert!(parse("\"oops").is_err());
    }
}
