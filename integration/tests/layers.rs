//! The workspace's module structure: dependencies between modules go one way, and no
//! source file outgrows a reader.
//!
//! Every crate's `src/` is read as text. A module's dependencies are the paths its code
//! names (`crate::…`, `super::…`, `self::…`, and `use` of a child module), outside
//! comments and `#[cfg(test)]` modules, each resolved to the deepest module it names.
//! The rule checked, at every level of every crate: among the submodules of one module
//! (each standing for its whole subtree), dependencies form no cycle. A module's own
//! file and its submodules are one unit (Rust lets a child see its parent's private
//! items for exactly that), and `pub use` lines are a façade, not a dependency.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest module file, in lines of code outside `#[cfg(test)]` modules.
const MAX_LINES: usize = 800;

type ModPath = Vec<String>;

struct Module {
    file: PathBuf,
    /// Lines outside comments and test modules.
    code: Vec<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every library crate's `src/` in the workspace.
fn crates() -> Vec<PathBuf> {
    let root = workspace();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root.join(m).join("src"))
        .filter(|src| src.join("lib.rs").exists())
        .collect()
}

/// Whether `line` (trimmed) is a `use` declaration, of any visibility.
fn is_use(line: &str) -> bool {
    let rest = match line.strip_prefix("pub") {
        Some(r) if r.starts_with('(') => r.find(')').map_or("", |i| &r[i + 1..]),
        Some(r) => r,
        None => line,
    };
    rest.trim_start().starts_with("use ")
}

/// The lines of `text` outside comments and `#[cfg(test)]` modules.
fn code_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim();
        if t == "#[cfg(test)]" {
            // Past further attributes: is it a test module?
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim_start().starts_with("#[") {
                j += 1;
            }
            let m = lines.get(j).map_or("", |l| l.trim());
            if (m.starts_with("mod ") || m.starts_with("pub(crate) mod ")) && m.ends_with('{') {
                // Skip it: count braces until its own closes.
                let mut depth = 0i64;
                i = j;
                while i < lines.len() {
                    let l = lines[i];
                    depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
                    i += 1;
                    if depth <= 0 {
                        break;
                    }
                }
                continue;
            }
        }
        i += 1;
        if t.starts_with("//") || t.is_empty() {
            continue;
        }
        // A `use` spread over lines is read as one.
        let mut line = lines[i - 1].to_owned();
        if is_use(t) && !t.contains(';') {
            while i < lines.len() {
                line.push(' ');
                line.push_str(lines[i].trim());
                i += 1;
                if lines[i - 1].contains(';') {
                    break;
                }
            }
        }
        out.push(line);
    }
    out
}

/// The modules of the crate at `src`, by path (the crate root is `[]`). Test-only
/// modules (`tests.rs`, `tests/`) are left out.
fn modules(src: &Path) -> BTreeMap<ModPath, Module> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(src).unwrap();
            if rel.starts_with("bin") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let mut parts: ModPath = rel
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            if parts.iter().any(|p| p == "tests") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(
                parts,
                Module {
                    file: path.clone(),
                    code: code_lines(&text),
                },
            );
        }
    }
    out
}

/// The paths named in `line` that start at `crate`, `super` or `self`, or (in a `use`)
/// at a child of `here`; groups (`a::{b, c::d}`) are expanded.
fn paths(line: &str, here: &ModPath, mods: &BTreeMap<ModPath, Module>) -> Vec<ModPath> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let is_use = is_use(line.trim_start());
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let start = i;
        // A path: identifiers joined by `::`, possibly ending in a `{…}` group.
        let mut end = i;
        while end < bytes.len() && (ident(bytes[end]) || line[end..].starts_with("::")) {
            end += if line[end..].starts_with("::") { 2 } else { 1 };
        }
        let mut path = line[start..end].trim_end_matches("::").to_owned();
        let first = path.split("::").next().unwrap_or("").to_owned();
        let relative = ["crate", "super", "self"].contains(&first.as_str())
            || (is_use && start == line.find("use ").unwrap() + 4 && {
                let mut child = here.clone();
                child.push(first.clone());
                mods.contains_key(&child)
            });
        if relative && (path.contains("::") || line[end..].starts_with('{')) {
            let group = if line[end..].starts_with('{') {
                let close = matching(&line[end..]).map(|c| end + c);
                close.map(|c| &line[end + 1..c])
            } else {
                None
            };
            match group {
                Some(g) => {
                    for part in split_top(g) {
                        let full = format!("{path}::{}", part.trim());
                        out.extend(paths(&format!("use {full}"), here, mods).into_iter().chain(
                            // A part naming only an item of `path` itself.
                            std::iter::once(resolve_str(&path, here)),
                        ));
                    }
                }
                None => {
                    path = path.trim_end_matches("::").to_owned();
                    out.push(resolve_str(&path, here));
                }
            }
        }
        i = end.max(i + 1);
    }
    out
}

fn matching(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut from) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[from..]);
    out.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

/// `path` as absolute segments (still naming items, not only modules).
fn resolve_str(path: &str, here: &ModPath) -> ModPath {
    let mut segs = path.split("::").map(str::to_owned);
    let first = segs.next().unwrap();
    let mut base: ModPath = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.clone(),
        "super" => here[..here.len().saturating_sub(1)].to_vec(),
        child => {
            let mut b = here.clone();
            b.push(child.to_owned());
            b
        }
    };
    for s in segs {
        if s == "super" {
            base.pop();
        } else if s != "self" && s != "*" {
            base.push(s);
        }
    }
    base
}

/// Items a module re-exports (`pub use`): `(module, name)` → the item's own path.
type Reexports = BTreeMap<(ModPath, String), ModPath>;

fn reexports(mods: &BTreeMap<ModPath, Module>) -> Reexports {
    let mut out = Reexports::new();
    for (here, m) in mods {
        for line in &m.code {
            let t = line.trim_start();
            if !is_use(t) || !t.starts_with("pub") {
                continue;
            }
            let Some(rest) = t.split_once("use ").map(|(_, r)| r) else {
                continue;
            };
            for p in paths(&format!("use {rest}"), here, mods) {
                if let Some(name) = p.last() {
                    let name = line_alias(rest, name).unwrap_or(name.clone());
                    out.insert((here.clone(), name), p.clone());
                }
            }
        }
    }
    out
}

/// The name `item` is re-exported as, if `use` renames it (`item as name`).
fn line_alias(line: &str, item: &str) -> Option<String> {
    let at = line.find(&format!("{item} as "))?;
    let name: String = line[at + item.len() + 4..]
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    Some(name)
}

/// The deepest module `path` names, following re-exports to where an item is defined.
fn module_of(path: &ModPath, mods: &BTreeMap<ModPath, Module>, re: &Reexports) -> ModPath {
    let mut path = path.clone();
    for _ in 0..8 {
        let mut p = path.clone();
        while !p.is_empty() && !mods.contains_key(&p) {
            p.pop();
        }
        match path
            .get(p.len())
            .and_then(|item| re.get(&(p.clone(), item.clone())))
        {
            Some(target) if target != &path => path = target.clone(),
            _ => return p,
        }
    }
    path
}

/// `(from, to)` module dependencies of a crate.
fn dependencies(mods: &BTreeMap<ModPath, Module>) -> BTreeSet<(ModPath, ModPath)> {
    let re = reexports(mods);
    let mut deps = BTreeSet::new();
    for (here, m) in mods {
        for line in &m.code {
            for p in paths(line, here, mods) {
                let to = module_of(&p, mods, &re);
                if &to != here {
                    deps.insert((here.clone(), to));
                }
            }
        }
    }
    deps
}

/// Cycles among the children of every module: each child stands for its subtree; a
/// module's own file and its descendants are one unit.
fn sibling_cycles(
    mods: &BTreeMap<ModPath, Module>,
    deps: &BTreeSet<(ModPath, ModPath)>,
) -> Vec<String> {
    let mut found = Vec::new();
    for parent in mods.keys() {
        let children: Vec<&ModPath> = mods
            .keys()
            .filter(|k| k.len() == parent.len() + 1 && k.starts_with(parent))
            .collect();
        if children.len() < 2 {
            continue;
        }
        let child_of = |m: &ModPath| {
            children
                .iter()
                .position(|c| m.len() >= c.len() && m.starts_with(c))
        };
        let mut edges: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut why: BTreeMap<(usize, usize), (ModPath, ModPath)> = BTreeMap::new();
        for (from, to) in deps {
            if let (Some(a), Some(b)) = (child_of(from), child_of(to))
                && a != b
            {
                edges.entry(a).or_default().insert(b);
                why.entry((a, b)).or_insert((from.clone(), to.clone()));
            }
        }
        for scc in strongly_connected(children.len(), &edges) {
            if scc.len() < 2 {
                continue;
            }
            let names: Vec<String> = scc.iter().map(|&i| children[i].join("::")).collect();
            let mut detail = Vec::new();
            for &a in &scc {
                for &b in &scc {
                    if let Some((f, t)) = why.get(&(a, b)) {
                        detail.push(format!("{} -> {}", f.join("::"), t.join("::")));
                    }
                }
            }
            found.push(format!(
                "{{{}}} via {}",
                names.join(", "),
                detail.join("; ")
            ));
        }
    }
    found
}

/// Tarjan's strongly connected components.
fn strongly_connected(n: usize, edges: &BTreeMap<usize, BTreeSet<usize>>) -> Vec<Vec<usize>> {
    struct T<'a> {
        edges: &'a BTreeMap<usize, BTreeSet<usize>>,
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(t: &mut T<'_>, v: usize) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        let succ: Vec<usize> = t.edges.get(&v).into_iter().flatten().copied().collect();
        for w in succ {
            match t.index[w] {
                None => {
                    visit(t, w);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(i) if t.on[w] => t.low[v] = t.low[v].min(i),
                Some(_) => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            t.out.push(scc);
        }
    }
    let mut t = T {
        edges,
        index: vec![None; n],
        low: vec![0; n],
        on: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Every library crate of the workspace is read (a members list the parser misreads
/// would otherwise check nothing).
#[test]
fn every_library_crate_is_read() {
    let read: Vec<String> = crates()
        .iter()
        .map(|src| src.parent().unwrap().display().to_string())
        .collect();
    for expected in [
        "datasync",
        "transports/raft",
        "transports/etcd",
        "transports/nats",
        "plugins/agent",
        "plugins/file-mirror",
        "plugins/netconfig",
        "integration",
        "examples",
    ] {
        assert!(
            read.iter().any(|r| r.ends_with(expected)),
            "{expected} not read: {read:?}"
        );
    }
    let raft = crates()
        .into_iter()
        .find(|s| s.ends_with("transports/raft/src"))
        .unwrap();
    assert!(
        modules(&raft).len() > 20,
        "the raft crate's modules are found"
    );
}

#[test]
fn no_module_depends_on_a_sibling_that_depends_back() {
    let mut found = Vec::new();
    for src in crates() {
        let mods = modules(&src);
        let deps = dependencies(&mods);
        // `LAYERS_DUMP=<crate dir>`: print that crate's dependencies (for the docs).
        if let Ok(dump) = std::env::var("LAYERS_DUMP")
            && src.parent().is_some_and(|c| c.ends_with(&dump))
        {
            for (from, to) in &deps {
                println!("{} -> {}", from.join("::"), to.join("::"));
            }
        }
        for cycle in sibling_cycles(&mods, &deps) {
            found.push(format!("{}: {cycle}", src.display()));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn no_module_file_outgrows_a_reader() {
    let mut long = Vec::new();
    for src in crates() {
        for m in modules(&src).values() {
            if m.code.len() > MAX_LINES {
                long.push(format!("{} ({} lines)", m.file.display(), m.code.len()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines of code (tests and comments left out): {long:?}"
    );
}

/// The checker itself, on a made-up crate: a cycle between siblings is found, one
/// between a parent's file and its child is not, and a test module is not read.
#[test]
fn the_checker_finds_a_sibling_cycle_and_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |p: &str, s: &str| {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, s).unwrap();
    };
    write("lib.rs", "mod a;\nmod b;\nmod c;\npub use c::g as gee;\n");
    write("a.rs", "use crate::b::{\n    X,\n    y::Z,\n};\n");
    write("b/mod.rs", "mod y;\nuse y::Z;\npub(crate) struct X;\n");
    write(
        "b/y.rs",
        "use super::X;\npub(crate) struct Z;\nfn f() { crate::c::g(); }\n",
    );
    write(
        "c.rs",
        "pub fn g() {}\n// crate::a::nothing\n#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::a::T;\n}\n",
    );
    let mods = modules(src);
    let deps = dependencies(&mods);
    let v = |s: &str| -> ModPath {
        s.split("::")
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert!(deps.contains(&(v("a"), v("b"))), "{deps:?}");
    assert!(deps.contains(&(v("a"), v("b::y"))), "{deps:?}");
    assert!(deps.contains(&(v("b::y"), v("c"))), "{deps:?}");
    assert!(!deps.iter().any(|(f, _)| f == &v("c")), "{deps:?}");
    assert!(sibling_cycles(&mods, &deps).is_empty());
    // Now c depends back on a (outside a test module): a → b → c → a.
    write("c.rs", "pub fn g() {}\n");
    write(
        "a.rs",
        "use crate::b::{X, y::Z};\npub fn h() { crate::gee() }\n",
    );
    let mods = modules(src);
    let deps = dependencies(&mods);
    assert!(
        deps.contains(&(v("a"), v("c"))),
        "a re-export is followed: {deps:?}"
    );
    assert!(sibling_cycles(&mods, &deps).is_empty());
    // A re-export is a dependency too: c re-exporting a's item closes a → b → c → a.
    write(
        "c.rs",
        "pub fn g() {}\npub(crate) use crate::a::{\n    h,\n};\n",
    );
    let mods = modules(src);
    assert_eq!(sibling_cycles(&mods, &dependencies(&mods)).len(), 1);
    write("c.rs", "pub fn g() { crate::a::h() }\n");
    let mods = modules(src);
    let cycles = sibling_cycles(&mods, &dependencies(&mods));
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("{a, b, c}") || cycles[0].contains("c -> a"),
        "{cycles:?}"
    );
}
