//! The gateway's modules must not import each other in a cycle (issue 9: "`Worker`,
//! `connection` and `relay` import each other today ... give each of these one owner and break
//! the cycle"). This test reads the crate's own `src/` at test time, collects every
//! `crate::module` reference of every module (in `use` lines and in paths), and fails naming
//! the cycle when the graph has one. A cycle kept on purpose goes into `ALLOWED`, with why.
//! Only `crate::` paths are followed: a `super::` path that climbs out of a top-level module
//! would be missed (there is none; the crate's style is `crate::` paths between modules).
//!
//! `scripts/check-module-cycles` runs this test on its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Edges (`from`, `to`) left out of the check on purpose, each with the reason. None is on
/// the data path (`worker` and everything below it).
const ALLOWED: &[(&str, &str)] = &[
    // The control plane's seams, kept two-way for now: `control` holds the types of the
    // modules that drive it (the admin token, the hand-over offer, the route origin) while
    // those modules take a `Control` to act on. Moving those types below `control` would
    // break these three; no data-path module takes part.
    ("control", "admin"),
    ("control", "handover"),
    ("control", "route_source"),
];

/// Module name -> the crate modules it refers to (other modules of this crate only).
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The code of a source file without its comments, so that a doc link such as
/// `[crate::relay::sweep_idle]` is not taken for an import. String literals are kept as they
/// are (a `//` inside one only cuts a line short, which can only hide an edge inside that
/// literal's line, never invent one).
fn strip_comments(source: &str) -> String {
    let mut code = String::with_capacity(source.len());
    let mut rest = source;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            // Block comments, nested as Rust nests them.
            let mut depth = 1;
            let mut inner = after;
            while depth > 0 && !inner.is_empty() {
                if let Some(next) = inner.strip_prefix("/*") {
                    depth += 1;
                    inner = next;
                } else if let Some(next) = inner.strip_prefix("*/") {
                    depth -= 1;
                    inner = next;
                } else {
                    let width = inner.chars().next().map_or(1, char::len_utf8);
                    inner = &inner[width..];
                }
            }
            rest = inner;
        } else if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else {
            let character = rest.chars().next().unwrap_or(' ');
            code.push(character);
            rest = &rest[character.len_utf8()..];
        }
    }
    code
}

fn is_ident(character: char) -> bool {
    character.is_ascii_alphanumeric() || character == '_'
}

/// The first path segment after each `crate::` in `code`; for a group (`crate::{a, b::c}`)
/// the first segment of each path in the group.
fn referenced_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (position, _) in code.match_indices("crate::") {
        // `crate::` must start a path, not end an identifier such as `my_crate::`.
        if code[..position].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let after = code[position + "crate::".len()..].trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // Each top-level item of the group, e.g. `a` and `b::c` in `crate::{a, b::c}`.
            for item in split_top_level(group) {
                let name: String = item
                    .trim_start()
                    .chars()
                    .take_while(|c| is_ident(*c))
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The comma-separated items at the top level of a `{ ... }` group (given without its `{`).
fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in group.char_indices() {
        match character {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..index]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

/// The module graph of the crate whose sources are in `src`: one node per top-level module,
/// `src/name.rs` together with everything under `src/name/` (its submodules' references are
/// the module's). The crate root (`lib.rs`, `main.rs`) is not a module of its own.
fn module_graph(src: &Path) -> Graph {
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    let mut pending = vec![(src.to_path_buf(), None::<String>)];
    while let Some((directory, owner)) = pending.pop() {
        let entries = std::fs::read_dir(&directory)
            .unwrap_or_else(|error| panic!("{}: {error}", directory.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
                .path();
            let stem = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .unwrap_or_else(|| panic!("{}: not a UTF-8 name", path.display()))
                .to_owned();
            let module = owner.clone().unwrap_or_else(|| stem.clone());
            if path.is_dir() {
                pending.push((path, Some(module)));
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                if owner.is_none() && (stem == "lib" || stem == "main") {
                    continue;
                }
                let source = std::fs::read_to_string(&path)
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
                let text = sources.entry(module).or_default();
                text.push_str(&source);
                text.push('\n');
            }
        }
    }
    assert!(
        sources.len() > 5,
        "found only {} modules in {}",
        sources.len(),
        src.display()
    );
    sources
        .iter()
        .map(|(name, source)| {
            let targets = referenced_modules(&strip_comments(source))
                .into_iter()
                .filter(|target| target != name && sources.contains_key(target))
                .filter(|target| !ALLOWED.contains(&(name.as_str(), target.as_str())))
                .collect();
            (name.clone(), targets)
        })
        .collect()
}

/// One line per strongly connected component of more than one module: a shortest cycle
/// through it (`a -> b -> a`) and, when the component is larger than that cycle, all its
/// modules. Empty when the graph is acyclic.
fn describe_cycles(graph: &Graph) -> Vec<String> {
    cycles(graph)
        .into_iter()
        .map(|(members, cycle)| {
            let line = cycle.join(" -> ");
            if members.len() + 1 > cycle.len() {
                format!("{line} (all of {} import each other)", members.join(", "))
            } else {
                line
            }
        })
        .collect()
}

/// Every strongly connected component of more than one module (its modules, sorted) with one
/// shortest cycle through it. Empty when the graph is acyclic.
fn cycles(graph: &Graph) -> Vec<(Vec<String>, Vec<String>)> {
    // Tarjan's algorithm, recursive: the graph has a few dozen nodes.
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let number = state.index.len();
        state.index.insert(node, number);
        state.low.insert(node, number);
        state.stack.push(node);
        state.on_stack.insert(node);
        for next in state.graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member);
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                state.components.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state
        .components
        .iter()
        .map(|component| {
            let mut members: Vec<String> = component.iter().map(|m| (*m).to_owned()).collect();
            members.sort();
            (members, cycle_through(graph, component))
        })
        .collect()
}

/// One concrete cycle inside a strongly connected component, found by a breadth-first search
/// from its smallest module back to itself (shortest first, so the message is readable).
fn cycle_through(graph: &Graph, component: &[&str]) -> Vec<String> {
    let members: BTreeSet<&str> = component.iter().copied().collect();
    let start = *members.iter().next().expect("a component has members");
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for next in graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !members.contains(next) {
                continue;
            }
            if next == start {
                let mut path = vec![start.to_owned()];
                let mut at = node;
                while at != start {
                    path.push(at.to_owned());
                    at = previous[at];
                }
                path.push(start.to_owned());
                path.reverse();
                return path;
            }
            if !previous.contains_key(next) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    component
        .iter()
        .map(|member| (*member).to_owned())
        .collect()
}

#[test]
fn the_gateway_module_graph_has_no_cycle() {
    // `MODULE_CYCLES_SRC` points the check at another copy of the sources (e.g. an older
    // tree, to see it fail there); by default it reads this crate's own.
    let src = std::env::var_os("MODULE_CYCLES_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let graph = module_graph(&src);
    let described = describe_cycles(&graph);
    assert!(
        described.is_empty(),
        "the gateway's modules import each other in a cycle (break it, or allowlist an edge \
         in ALLOWED with the reason):\n  {}",
        described.join("\n  ")
    );
}

#[test]
fn references_are_found_in_uses_paths_and_groups_but_not_comments() {
    let code = strip_comments(
        "use crate::worker::{Worker, TICK};\n\
         use crate::{balance, context::{WorkerContext, Shared}};\n\
         // use crate::commented_out;\n\
         /* crate::block /* nested crate::deeper */ crate::still_comment */\n\
         fn f() { crate::sys::accept(0); let x = my_crate::not_this; }\n",
    );
    let found: Vec<String> = referenced_modules(&code).into_iter().collect();
    assert_eq!(found, ["balance", "context", "sys", "worker"]);
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: Graph = [
        ("worker", vec!["connection", "balance"]),
        ("connection", vec!["relay", "balance"]),
        ("relay", vec!["worker"]),
        ("balance", vec![]),
    ]
    .into_iter()
    .map(|(name, targets)| {
        (
            name.to_owned(),
            targets.into_iter().map(str::to_owned).collect(),
        )
    })
    .collect();
    assert_eq!(
        describe_cycles(&graph),
        ["connection -> relay -> worker -> connection"]
    );
    let mut acyclic = graph.clone();
    acyclic.get_mut("relay").map(BTreeSet::clear);
    assert!(describe_cycles(&acyclic).is_empty());
}
