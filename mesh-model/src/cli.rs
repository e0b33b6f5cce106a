//! Consul's command-line spelling: long flags with one dash (`-datacenter primary`,
//! `-token=x`). clap wants two, so every Consul-shaped command line (controlplane-lite's, and
//! `gateway mesh` / `gateway sidecar`) is rewritten by this one function before parsing.

use std::ffi::OsStr;

/// Which arguments may be Consul-style flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every argument after the program name (a Consul-shaped program, like controlplane-lite).
    Everywhere,
    /// Only arguments after the first of these subcommands (the gateway, whose other
    /// subcommands keep clap's spelling).
    AfterSubcommand(&'a [&'a str]),
}

/// Rewrites `-long-flag` (and `-long-flag=value`) into `--long-flag` within `scope`, so clap
/// parses Consul's spelling. Left as they are: the program name (the first argument),
/// single-letter flags (`-h`), a bare `-` (stdin), double-dash flags, values that do not start
/// with `-letter`, arguments that are not UTF-8, and everything after `--`. A value that itself
/// starts with `-letter` must be written `-flag=value`.
pub fn rewrite_single_dash<T>(args: impl IntoIterator<Item = T>, scope: Scope<'_>) -> Vec<T>
where
    T: AsRef<OsStr> + From<String>,
{
    let mut in_scope = scope == Scope::Everywhere;
    let mut passthrough = false;
    let mut out = Vec::new();
    for (position, arg) in args.into_iter().enumerate() {
        let text = arg.as_ref().to_str();
        let rewritten = match text {
            _ if position == 0 || passthrough => None,
            Some("--") => {
                passthrough = true;
                None
            }
            Some(word) if !in_scope => {
                if let Scope::AfterSubcommand(subcommands) = scope {
                    in_scope = subcommands.contains(&word);
                }
                None
            }
            Some(word) if is_single_dash_long(word) => Some(format!("-{word}")),
            _ => None,
        };
        out.push(rewritten.map_or(arg, T::from));
    }
    out
}

/// `-x...` with a letter after the dash and at least one more character.
fn is_single_dash_long(word: &str) -> bool {
    let bytes = word.as_bytes();
    bytes.len() > 2 && bytes[0] == b'-' && bytes[1].is_ascii_alphabetic()
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    fn everywhere(line: &str) -> Vec<String> {
        rewrite_single_dash(line.split(' ').map(str::to_owned), Scope::Everywhere)
    }

    fn after_mesh(line: &str) -> Vec<String> {
        rewrite_single_dash(
            line.split(' ').map(str::to_owned),
            Scope::AfterSubcommand(&["mesh", "sidecar"]),
        )
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            everywhere("cp agent -datacenter primary -http-addr=127.0.0.1:1 -h --node n - -- -raw")
                .join(" "),
            "cp agent --datacenter primary --http-addr=127.0.0.1:1 -h --node n - -- -raw"
        );
        // The program name is never a flag, whatever it looks like.
        assert_eq!(everywhere("-program -flag").join(" "), "-program --flag");
    }

    #[test]
    fn after_subcommand_only_that_subcommand_is_consul_style() {
        assert_eq!(
            after_mesh("gateway --log-level debug mesh -register --address 1.2.3.4:1").join(" "),
            "gateway --log-level debug mesh --register --address 1.2.3.4:1"
        );
        assert_eq!(
            after_mesh("gateway run -c file.toml -config x").join(" "),
            "gateway run -c file.toml -config x"
        );
        assert_eq!(
            after_mesh("gateway sidecar -token -1 -sidecar-for=web -- -keep").join(" "),
            "gateway sidecar --token -1 --sidecar-for=web -- -keep"
        );
    }

    #[cfg(unix)]
    #[test]
    fn arguments_that_are_not_utf8_pass_through() {
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(vec![b'-', b'a', 0xff]);
        let out = rewrite_single_dash(
            [OsString::from("cp"), odd.clone(), OsString::from("-flag")],
            Scope::Everywhere,
        );
        assert_eq!(out, [OsString::from("cp"), odd, OsString::from("--flag")]);
    }
}
