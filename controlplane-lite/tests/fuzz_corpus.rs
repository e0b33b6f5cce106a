//! Issue 14: every file of the control-plane fuzz corpora (`fuzz/corpus/<target>/`), seeds and
//! kept crashers alike, replayed through the same checks the fuzz targets run
//! (`fuzz/checks.rs`), so a fixed crash stays fixed under plain `cargo test`, without nightly.

#[path = "../fuzz/checks.rs"]
#[allow(dead_code)]
mod checks;

use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 7] = [
    ("acl_rules", checks::acl_rules),
    ("config_entry", checks::config_entry),
    ("registration", checks::registration),
    ("intention", checks::intention),
    ("check_definition", checks::check_definition),
    ("csr", checks::csr),
    ("snapshot", checks::snapshot),
];

fn replay(target: &str, check: Check) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        check(&data);
        count += 1;
    }
    count
}

#[test]
fn every_fuzz_corpus_file_passes_its_target_checks() {
    for (target, check) in TARGETS {
        let count = replay(target, check);
        assert!(count >= 2, "corpus {target} has only {count} files");
    }
}

#[test]
fn every_fuzz_target_has_a_corpus_and_a_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    for entry in std::fs::read_dir(&dir).expect("fuzz_targets") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        let target = name.trim_end_matches(".rs");
        assert!(
            TARGETS.iter().any(|(listed, _)| *listed == target),
            "fuzz target {target} is not replayed here"
        );
    }
}

/// The seeds reach the accepting paths: a corpus that only holds rejected inputs would make
/// the round-trip checks vacuous.
#[test]
fn the_seeds_are_accepted_inputs() {
    use controlplane_lite::acl::Rules;
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let read = |path: &str| std::fs::read(corpus.join(path)).expect(path);
    let text = String::from_utf8(read("acl_rules/policy.hcl")).expect("utf-8");
    let rules = Rules::parse(&text).expect("policy.hcl parses");
    assert_eq!(rules.node.len(), 1);
    assert!(checks::rules_to_hcl(&rules).contains(r#"node "n\"1""#));
    let json = checks::rules_to_json(&rules);
    assert_eq!(
        controlplane_lite::acl::json::parse(&json).expect("json"),
        rules
    );
}
