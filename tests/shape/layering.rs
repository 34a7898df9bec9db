//! The proxy's and the controller's top-level modules, and the modules inside each of
//! their rooms (folders), import each other without a cycle, so each can be read (and
//! changed) standing only on those below it. Test code
//! (`tests.rs` files, and items marked `#[cfg(test)]`) may reach anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`outbound/forward.rs` → `outbound`); None
/// for the crate root.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The code of a file without comments and without the items marked `#[cfg(test)]`
/// (a test module, inline or in its own file, or a test-only function): each is cut
/// from its attribute to its end, the first `;` before any brace or the brace that
/// closes its body.
fn production_code(text: &str) -> String {
    let text: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, c) in item.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first path segment of every `crate::` path in `code`, including each item of a
/// `crate::{a::X, b}` group.
fn crate_paths(code: &str) -> BTreeSet<String> {
    paths_after(code, "crate::")
}

/// The first segment after `prefix` (`crate::`, `super::`, `crate::outbound::`) of every
/// path in `code` that starts with it, including each item of a `prefix{a::X, b}` group.
fn paths_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        // `crate::` inside `remora_crate::`, or `super::` inside `super::super::`'s tail.
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let rest = code[i + prefix.len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut at_item = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_item = true,
                    c if c.is_whitespace() => {}
                    _ if at_item && depth == 1 => {
                        out.insert(ident(&group[j..]));
                        at_item = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// A crate's `src/` folder.
fn src(crate_dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src")
}

/// The modules under `dir` (each file or folder in it, `lib`/`main` aside) and which of
/// the others each imports, as `imports(file, code)` reads them from a file's production
/// code.
fn module_graph(dir: &Path, imports: impl Fn(&Path, &str) -> BTreeSet<String>) -> Graph {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let members: BTreeSet<String> = files.iter().filter_map(|f| top_module(dir, f)).collect();
    let mut g = Graph::new();
    for file in &files {
        let Some(from) = top_module(dir, file) else {
            continue;
        };
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = production_code(&fs::read_to_string(file).unwrap());
        let edges = g.entry(from.clone()).or_default();
        edges.extend(
            imports(file, &code)
                .into_iter()
                .filter(|to| *to != from && members.contains(to)),
        );
    }
    g
}

/// A crate's top-level modules and which of the others each imports (`crate::x`).
fn graph(crate_dir: &str) -> Graph {
    let g = module_graph(&src(crate_dir), |_, code| crate_paths(code));
    assert!(g.len() > 10, "modules found in {crate_dir}: {g:?}");
    g
}

/// The modules inside the room `room` (`src/<room>/<name>.rs` and anything under
/// `src/<room>/<name>/`) and which of their siblings each imports: `super::x` in a file
/// directly in the room, `crate::<room>::x` anywhere in it.
fn room_graph(crate_dir: &str, room: &str) -> Graph {
    let dir = src(crate_dir).join(room);
    module_graph(&dir, |file, code| {
        let mut to = paths_after(code, &format!("crate::{room}::"));
        if file.parent() == Some(dir.as_path()) {
            to.extend(paths_after(code, "super::"));
        }
        to
    })
}

/// The rooms of a crate: its top-level modules that are folders.
fn rooms(crate_dir: &str) -> Vec<String> {
    let mut rooms: Vec<String> = fs::read_dir(src(crate_dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    rooms.sort();
    rooms
}

/// A cycle through the graph, if there is one, as the modules on it.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

#[test]
fn the_parser_sees_groups_and_paths() {
    let code = "use crate::{\n    addr::{A, B},\n    http::{self, X},\n    tcp,\n};\nlet x = crate::rng::random();";
    let got: Vec<_> = crate_paths(code).into_iter().collect();
    assert_eq!(got, ["addr", "http", "rng", "tcp"]);
    // Test-only items are cut, and only them: code after one still counts.
    let code = "use crate::a;\n#[cfg(test)]\nfn helper() { crate::b::x(); }\n\
                fn after() { crate::c::y(); }\n#[cfg(test)]\nmod tests;\n\
                #[cfg(test)]\nmod inline { use crate::d; }\n";
    let got: Vec<_> = crate_paths(&production_code(code)).into_iter().collect();
    assert_eq!(got, ["a", "c"]);
    // Inside a room: siblings by `super::` and by the room's full path.
    let code = "use super::{policy::P, routes};\nuse crate::outbound::balance::B;\n\
                use remora_crate::x; let y = super::super::z;";
    let got: Vec<_> = paths_after(code, "super::").into_iter().collect();
    assert_eq!(got, ["policy", "routes", "super"]);
    let got: Vec<_> = paths_after(code, "crate::outbound::").into_iter().collect();
    assert_eq!(got, ["balance"]);
    let got: Vec<_> = crate_paths(code).into_iter().collect();
    assert_eq!(got, ["outbound"], "remora_crate:: is another crate's path");
    let g: Graph = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn no_import_cycles_between_the_proxys_modules() {
    let g = graph("crates/remora-proxy");
    // The rooms exist and are where the layering says.
    for (from, to) in [("outbound", "http"), ("inbound", "http"), ("app", "accept")] {
        assert!(g[from].contains(to), "{from} no longer uses {to}: {g:?}");
    }
    assert_eq!(find_cycle(&g), None, "{g:#?}");
}

#[test]
fn no_import_cycles_between_the_controllers_modules() {
    let g = graph("crates/remora-controller");
    assert!(g["policy"].contains("core"), "{g:?}");
    assert_eq!(find_cycle(&g), None, "{g:#?}");
}

/// Inside each room too (`outbound/policy.rs` and `outbound/routes.rs` once imported
/// each other): its modules stand on one another without a cycle.
#[test]
fn no_import_cycles_inside_a_room() {
    let outbound = room_graph("crates/remora-proxy", "outbound");
    assert!(
        outbound["forward"].contains("resilience"),
        "the room's graph is read: {outbound:?}"
    );
    for krate in ["crates/remora-proxy", "crates/remora-controller"] {
        let rooms = rooms(krate);
        assert!(!rooms.is_empty(), "{krate} has no rooms");
        for room in rooms {
            let g = room_graph(krate, &room);
            assert_eq!(find_cycle(&g), None, "{krate}: {room}: {g:#?}");
        }
    }
}
