//! The workspace's module structure: dependencies between modules go one way, and no
//! source file outgrows a reader.
//!
//! Every crate's `src/` is parsed with `syn`. A module's dependencies are the paths its
//! code names that start at `crate`, `super`, `self` or a child module (in `use` trees,
//! in code, and in macro bodies), outside `#[cfg(test)]` items. Each is resolved to the
//! module that defines the item, following `pub use` re-exports (globs included). The
//! rule checked, at every level of every crate: among the submodules of one module
//! (each standing for its whole subtree), dependencies form no cycle. A module's own
//! file and its submodules are one unit: Rust lets a child see its parent's private
//! items for exactly that.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Longest module file, in lines of code outside `#[cfg(test)]` modules.
const MAX_LINES: usize = 800;

type ModPath = Vec<String>;
type Mods = BTreeMap<ModPath, Module>;

struct Module {
    file: PathBuf,
    /// Lines of code outside comments and test modules.
    code_lines: usize,
    ast: syn::File,
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

/// Lines of code in `text`: not blank, not a comment, not in a `#[cfg(test)]` module.
/// (The size rule is about what a reader reads; counted on the text, as written.)
fn count_code_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let (mut count, mut i) = (0, 0);
    while i < lines.len() {
        let t = lines[i].trim();
        if t == "#[cfg(test)]" {
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim_start().starts_with("#[") {
                j += 1;
            }
            let m = lines.get(j).map_or("", |l| l.trim());
            if m.contains("mod ") && m.ends_with('{') {
                // Skip the module: count braces until its own closes.
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
        if !t.is_empty() && !t.starts_with("//") {
            count += 1;
        }
        i += 1;
    }
    count
}

/// The modules of the crate at `src`, by path (the crate root is `[]`). Test-only
/// modules (`tests.rs`, `tests/`) and binaries are left out.
fn modules(src: &Path) -> Mods {
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
            let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let code_lines = count_code_lines(&text);
            out.insert(
                parts,
                Module {
                    file: path.clone(),
                    code_lines,
                    ast,
                },
            );
        }
    }
    out
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|i| i == "test")
    })
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    use syn::Item as I;
    match item {
        I::Const(i) => &i.attrs,
        I::Enum(i) => &i.attrs,
        I::ExternCrate(i) => &i.attrs,
        I::Fn(i) => &i.attrs,
        I::ForeignMod(i) => &i.attrs,
        I::Impl(i) => &i.attrs,
        I::Macro(i) => &i.attrs,
        I::Mod(i) => &i.attrs,
        I::Static(i) => &i.attrs,
        I::Struct(i) => &i.attrs,
        I::Trait(i) => &i.attrs,
        I::TraitAlias(i) => &i.attrs,
        I::Type(i) => &i.attrs,
        I::Union(i) => &i.attrs,
        I::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Every path a `use` tree names, with the name it binds (`*` for a glob).
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
    use syn::UseTree as U;
    let with = |prefix: &Vec<String>, last: String| {
        let mut p = prefix.clone();
        p.push(last);
        p
    };
    match tree {
        U::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        U::Name(n) if n.ident == "self" => {
            out.push((prefix.clone(), prefix.last().cloned().unwrap_or_default()))
        }
        U::Name(n) => out.push((with(prefix, n.ident.to_string()), n.ident.to_string())),
        U::Rename(r) => out.push((with(prefix, r.ident.to_string()), r.rename.to_string())),
        U::Glob(_) => out.push((with(prefix, "*".into()), "*".into())),
        U::Group(g) => g.items.iter().for_each(|t| use_paths(t, prefix, out)),
    }
}

/// The paths in a macro's tokens that start at `crate`, `super` or `self`.
fn macro_paths(tokens: TokenStream, out: &mut Vec<Vec<String>>) {
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    let colons = |i: usize| {
        matches!((toks.get(i), toks.get(i + 1)),
            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':')
    };
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            TokenTree::Group(g) => macro_paths(g.stream(), out),
            TokenTree::Ident(id)
                if ["crate", "super", "self"].contains(&id.to_string().as_str())
                    && (i < 2 || !colons(i - 2)) =>
            {
                let mut segs = vec![id.to_string()];
                while colons(i + 1) {
                    match toks.get(i + 3) {
                        Some(TokenTree::Ident(next)) => segs.push(next.to_string()),
                        _ => break,
                    }
                    i += 3;
                }
                if segs.len() > 1 {
                    out.push(segs);
                }
            }
            _ => {}
        }
        i += 1;
    }
}

/// `segs` (relative to `here`) as an absolute path, if it starts inside the crate.
fn absolute(segs: &[String], here: &ModPath, mods: &Mods) -> Option<ModPath> {
    let (first, rest) = segs.split_first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.clone(),
        "super" => here[..here.len().saturating_sub(1)].to_vec(),
        child => {
            let mut b = here.clone();
            b.push(child.to_owned());
            if !mods.contains_key(&b) {
                return None;
            }
            b
        }
    };
    for s in rest {
        match s.as_str() {
            "super" => {
                base.pop();
            }
            "self" => {}
            s => base.push(s.to_owned()),
        }
    }
    Some(base)
}

/// What one module's code names: paths (absolute) and its `pub use` bindings.
#[derive(Default)]
struct Names {
    paths: Vec<ModPath>,
    /// `pub use`: (name bound here, absolute path; ending in `*` for a glob).
    reexports: Vec<(String, ModPath)>,
    /// Items defined here.
    defined: BTreeSet<String>,
}

struct Collect<'a> {
    here: &'a ModPath,
    mods: &'a Mods,
    names: Names,
    depth: usize,
}

impl<'ast> Visit<'ast> for Collect<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if is_cfg_test(item_attrs(item)) {
            return;
        }
        if self.depth == 0 {
            use syn::Item as I;
            let name = match item {
                I::Const(i) => Some(&i.ident),
                I::Enum(i) => Some(&i.ident),
                I::Fn(i) => Some(&i.sig.ident),
                I::Mod(i) => Some(&i.ident),
                I::Static(i) => Some(&i.ident),
                I::Struct(i) => Some(&i.ident),
                I::Trait(i) => Some(&i.ident),
                I::Type(i) => Some(&i.ident),
                I::Union(i) => Some(&i.ident),
                I::Macro(i) => i.ident.as_ref(),
                _ => None,
            };
            if let Some(n) = name {
                self.names.defined.insert(n.to_string());
            }
        }
        self.depth += 1;
        syn::visit::visit_item(self, item);
        self.depth -= 1;
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut found = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut found);
        let public = !matches!(u.vis, syn::Visibility::Inherited);
        for (segs, name) in found {
            if let Some(abs) = absolute(&segs, self.here, self.mods) {
                if public && self.depth == 1 {
                    self.names.reexports.push((name, abs.clone()));
                }
                self.names.paths.push(abs);
            }
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1
            && let Some(abs) = absolute(&segs, self.here, self.mods)
        {
            self.names.paths.push(abs);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let mut found = Vec::new();
        macro_paths(m.tokens.clone(), &mut found);
        for segs in found {
            if let Some(abs) = absolute(&segs, self.here, self.mods) {
                self.names.paths.push(abs);
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

fn names(mods: &Mods) -> BTreeMap<ModPath, Names> {
    mods.iter()
        .map(|(here, m)| {
            let mut c = Collect {
                here,
                mods,
                names: Names::default(),
                depth: 0,
            };
            c.visit_file(&m.ast);
            (here.clone(), c.names)
        })
        .collect()
}

/// The module that defines what `path` names: the deepest module it names, then
/// through `pub use` re-exports (named or glob) to where the item is defined.
fn module_of(path: &ModPath, mods: &Mods, all: &BTreeMap<ModPath, Names>) -> ModPath {
    let mut path = path.clone();
    for _ in 0..8 {
        let mut m = path.clone();
        while !m.is_empty() && !mods.contains_key(&m) {
            m.pop();
        }
        let (Some(item), Some(names)) = (path.get(m.len()), all.get(&m)) else {
            return m;
        };
        if item == "*" || names.defined.contains(item) {
            return m;
        }
        let named = names.reexports.iter().find(|(n, _)| n == item);
        // A glob re-export (`pub use x::*`) stands for the items `x` has.
        let has = |g: &ModPath| {
            let mut child = g.clone();
            child.push(item.clone());
            mods.contains_key(&child)
                || all.get(g).is_some_and(|n| {
                    n.defined.contains(item) || n.reexports.iter().any(|(r, _)| r == item)
                })
        };
        let glob = || {
            names
                .reexports
                .iter()
                .filter(|(n, _)| n == "*")
                .map(|(_, t)| t[..t.len() - 1].to_vec())
                .find(|g| has(g))
                .map(|mut g| {
                    g.push(item.clone());
                    g
                })
        };
        match named.map(|(_, t)| t.clone()).or_else(glob) {
            Some(target) if target != path => path = target,
            _ => return m,
        }
    }
    path
}

/// `(from, to)` module dependencies of a crate.
fn dependencies(mods: &Mods) -> BTreeSet<(ModPath, ModPath)> {
    let all = names(mods);
    let mut deps = BTreeSet::new();
    for (here, n) in &all {
        for p in &n.paths {
            let to = module_of(p, mods, &all);
            if &to != here {
                deps.insert((here.clone(), to));
            }
        }
    }
    deps
}

/// Cycles among the children of every module: each child stands for its subtree; a
/// module's own file and its descendants are one unit.
fn sibling_cycles(mods: &Mods, deps: &BTreeSet<(ModPath, ModPath)>) -> Vec<String> {
    let mut found = Vec::new();
    for parent in mods.keys() {
        let children: Vec<&ModPath> = mods
            .keys()
            .filter(|k| k.len() == parent.len() + 1 && k.starts_with(parent))
            .collect();
        if children.len() < 2 {
            continue;
        }
        let child_of = |m: &ModPath| children.iter().position(|c| m.starts_with(c));
        let mut graph = DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..children.len()).map(|i| graph.add_node(i)).collect();
        let mut why: BTreeMap<(usize, usize), (&ModPath, &ModPath)> = BTreeMap::new();
        for (from, to) in deps {
            if let (Some(a), Some(b)) = (child_of(from), child_of(to))
                && a != b
            {
                graph.update_edge(nodes[a], nodes[b], ());
                why.entry((a, b)).or_insert((from, to));
            }
        }
        for scc in petgraph::algo::tarjan_scc(&graph) {
            if scc.len() < 2 {
                continue;
            }
            let scc: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
            let names: Vec<String> = scc.iter().map(|&i| children[i].join("::")).collect();
            let detail: Vec<String> = scc
                .iter()
                .flat_map(|&a| scc.iter().map(move |&b| (a, b)))
                .filter_map(|k| why.get(&k))
                .map(|(f, t)| format!("{} -> {}", f.join("::"), t.join("::")))
                .collect();
            found.push(format!(
                "{{{}}} via {}",
                names.join(", "),
                detail.join("; ")
            ));
        }
    }
    found
}

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
            if m.code_lines > MAX_LINES {
                long.push(format!("{} ({} lines)", m.file.display(), m.code_lines));
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
