//! The one place that turns a stored token into what an API answer shows.
//!
//! Every response that carries a token (read, self, list, create, bootstrap and the replication
//! stream) goes through [`render_token`], so a secret cannot leak through an endpoint that
//! forgot to redact it. Consul's rule: the `SecretID` is shown only to callers holding
//! `acl:write`; everyone else sees [`REDACTED_SECRET`].

use super::{Authorizer, Token};

/// What a caller without `acl:write` sees in place of a secret (Consul's value).
pub const REDACTED_SECRET: &str = "<hidden>";

/// Whether a caller with `authorizer` may see token secrets.
pub fn may_see_secrets(authorizer: &Authorizer) -> bool {
    authorizer.acl_write()
}

/// The token as `authorizer`'s holder may see it.
pub fn render_token(mut token: Token, authorizer: &Authorizer) -> Token {
    if !may_see_secrets(authorizer) {
        token.secret_id = REDACTED_SECRET.to_owned();
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{DefaultPolicy, Policy, PolicyLink};

    fn token() -> Token {
        Token {
            accessor_id: "a".into(),
            secret_id: "s3cret".into(),
            description: String::new(),
            policies: vec![PolicyLink {
                id: "p".into(),
                name: String::new(),
            }],
            service_identities: Vec::new(),
            local: false,
            create_time: String::new(),
            create_index: 1,
            modify_index: 1,
        }
    }

    fn with_rules(rules: &str) -> Authorizer {
        let policy = Policy {
            id: "p".into(),
            name: "p".into(),
            description: String::new(),
            rules: rules.into(),
            datacenters: Vec::new(),
            create_index: 1,
            modify_index: 1,
        };
        Authorizer::for_token(&token(), &[policy], "dc1", DefaultPolicy::Allow).expect("rules")
    }

    #[test]
    fn only_acl_write_sees_the_secret() {
        assert_eq!(
            render_token(token(), &with_rules(r#"acl = "read""#)).secret_id,
            REDACTED_SECRET
        );
        // The default policy "allow" does not grant ACL access either.
        assert_eq!(
            render_token(token(), &with_rules(r#"operator = "write""#)).secret_id,
            REDACTED_SECRET
        );
        assert_eq!(
            render_token(token(), &with_rules(r#"acl = "write""#)).secret_id,
            "s3cret"
        );
        assert_eq!(
            render_token(token(), &Authorizer::management()).secret_id,
            "s3cret"
        );
    }
}
