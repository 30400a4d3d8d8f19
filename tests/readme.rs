//! README.md against the real binary: users copy its commands, so every `ibot ...` command it
//! shows (code blocks and inline code, `target/release/ibot ...` and `cargo run --release --
//! ...` too, `ibot launch ... SUB ...` checked on both sides) must name a real subcommand and
//! only flags that subcommand accepts; every `bench/compare.sh MODE` must be one of the
//! script's modes; every repository path it names (tests/, bench/, scripts/, src/, tools/,
//! fuzz/, csrc/) must exist. A flag counts as accepted when `SUB --help` lists it (aliases
//! included) or, for hidden aliases, when clap does not answer `unexpected argument` to it.
//!
//! Mutations of README.md that fail it (checked by hand, 2026-11-28; each message names the
//! line): `ibot launch --nproc_per_node 2 ibot finetune` (what README said before this test: the
//! launcher refuses a second `ibot`), `--pretrained_weigths` in the eval-knn example, inline
//! `eval-linear --n_last_block n`, `bench train --presets`, `compare.sh recipe-steps`,
//! `src/cli/commons.rs`.
//! A few seconds: one `--help` per subcommand plus one probe per flag not in a help text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ibot");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BENCH_SUBS: [&str; 3] = ["data", "train", "allreduce"];

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(BIN).args(args).output().expect("run ibot");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--flag` names at the start of option lines of a help text, plus `[alias: --x]` lists.
fn help_flags(help: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        let t = if t.len() > 4 && t.starts_with('-') && &t[2..4] == ", " {
            &t[4..]
        } else {
            t
        };
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            flags.insert(format!("--{name}"));
        }
    }
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for key in ["[alias: ", "[aliases: "] {
        for part in flat.split(key).skip(1) {
            let list = part.split(']').next().unwrap_or("");
            for a in list.split(',') {
                let a = a.trim();
                if a.starts_with("--") {
                    flags.insert(a.to_string());
                }
            }
        }
    }
    flags
}

struct Cli {
    help: BTreeMap<Vec<String>, BTreeSet<String>>,
    probed: BTreeMap<(Vec<String>, String), bool>,
}

impl Cli {
    fn new() -> Cli {
        let (top, _) = run(&["--help"]);
        let commands = top
            .split("Commands:")
            .nth(1)
            .and_then(|s| s.split("Options:").next())
            .expect("Commands: in ibot --help");
        let mut help = BTreeMap::new();
        for line in commands.lines() {
            if !line.starts_with("  ") || line.starts_with("   ") {
                continue;
            }
            let sub = line.split_whitespace().next().unwrap().to_string();
            if sub == "help" {
                continue;
            }
            if sub == "bench" {
                for b in BENCH_SUBS {
                    help.insert(
                        vec![sub.clone(), b.to_string()],
                        help_flags(&run(&["bench", b, "--help"]).0),
                    );
                }
            } else {
                help.insert(vec![sub.clone()], help_flags(&run(&[&sub, "--help"]).0));
            }
        }
        assert!(
            help.len() > 20,
            "too few subcommands parsed from ibot --help: {:?}",
            help.keys()
        );
        Cli {
            help,
            probed: BTreeMap::new(),
        }
    }

    fn accepts(&mut self, sub: &[String], flag: &str) -> bool {
        if self.help[sub].contains(flag) {
            return true;
        }
        let key = (sub.to_vec(), flag.to_string());
        if let Some(&ok) = self.probed.get(&key) {
            return ok;
        }
        let refused = format!("unexpected argument '{flag}'");
        let mut ok = false;
        for extra in [&["1", "--help"][..], &["--help"][..]] {
            let mut args: Vec<&str> = sub.iter().map(|s| s.as_str()).collect();
            args.push(flag);
            args.extend_from_slice(extra);
            if !run(&args).1.contains(&refused) {
                ok = true;
                break;
            }
        }
        self.probed.insert(key, ok);
        ok
    }
}

/// Code-block lines (continuations joined, `# comments` dropped) and inline code spans (joined
/// across the lines of a paragraph), each with its README line number.
fn spans(readme: &str) -> Vec<(usize, String, bool)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let (mut buf, mut start) = (String::new(), 0);
    let mut para: Vec<(usize, &str)> = Vec::new();
    let flush = |para: &mut Vec<(usize, &str)>, out: &mut Vec<(usize, String, bool)>| {
        let mut text = String::new();
        let mut offsets = Vec::new();
        for (n, l) in para.iter() {
            offsets.push((text.len(), *n));
            text.push_str(l);
            text.push(' ');
        }
        let mut parts = text.split('`');
        let mut pos = parts.next().map_or(0, |p| p.len() + 1);
        while let (Some(code), Some(after)) = (parts.next(), parts.next()) {
            let line = offsets
                .iter()
                .filter(|(o, _)| *o <= pos)
                .map(|(_, n)| *n)
                .last()
                .unwrap_or(0);
            out.push((line, code.to_string(), false));
            pos += code.len() + 1 + after.len() + 1;
        }
        para.clear();
    };
    for (i, line) in readme.lines().enumerate() {
        let n = i + 1;
        if line.starts_with("```") {
            flush(&mut para, &mut out);
            in_block = !in_block;
            continue;
        }
        if in_block {
            if buf.is_empty() {
                start = n;
            }
            buf.push_str(line.trim());
            buf.push(' ');
            if let Some(b) = buf.trim_end().strip_suffix('\\') {
                buf = b.to_string();
                continue;
            }
            let code = buf.split(" # ").next().unwrap().trim().to_string();
            if !code.starts_with('#') {
                out.push((start, code, true));
            }
            buf.clear();
        } else if line.trim().is_empty() || line.starts_with('#') {
            flush(&mut para, &mut out);
        } else {
            para.push((n, line));
        }
    }
    flush(&mut para, &mut out);
    out
}

fn flag_of(token: &str) -> Option<String> {
    let t = token.trim_start_matches(['[', '(']);
    let rest = t.strip_prefix("--")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    let name = name.trim_end_matches('-');
    (!name.is_empty()).then(|| format!("--{name}"))
}

/// The subcommand at `toks[0..]` (two words for `bench`) and the index after it.
fn subcommand(cli: &Cli, toks: &[&str]) -> Option<(Vec<String>, usize)> {
    let first = *toks.first()?;
    if first == "bench" {
        if let Some(b) = toks.get(1).filter(|b| BENCH_SUBS.contains(b)) {
            return Some((vec!["bench".into(), b.to_string()], 2));
        }
    }
    let sub = vec![first.to_string()];
    cli.help.contains_key(&sub).then_some((sub, 1))
}

#[test]
fn readme_commands_use_real_subcommands_and_flags() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let mut cli = Cli::new();
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut check = |cli: &mut Cli,
                     line: usize,
                     sub: &[String],
                     flags: &[&str],
                     text: &str,
                     problems: &mut Vec<String>| {
        for f in flags.iter().filter_map(|t| flag_of(t)) {
            checked += 1;
            if !cli.accepts(sub, &f) {
                problems.push(format!(
                    "README.md:{line}: `ibot {}` does not accept {f}: {text}",
                    sub.join(" ")
                ));
            }
        }
    };
    for (line, text, _block) in spans(&readme) {
        let toks: Vec<&str> = text.split_whitespace().collect();
        let at = toks
            .iter()
            .position(|t| *t == "ibot" || t.ends_with("/ibot"))
            .map(|p| p + 1)
            .or_else(|| {
                toks.windows(3)
                    .position(|w| w == ["run", "--release", "--"])
                    .map(|p| p + 3)
            });
        let Some(mut at) = at else {
            // inline `eval-linear --n_last_blocks n`: a subcommand, then its flags
            if toks.len() > 1 && toks[1].starts_with("--") {
                if let Some((sub, k)) = subcommand(&cli, &toks) {
                    check(&mut cli, line, &sub, &toks[k..], &text, &mut problems);
                }
            }
            continue;
        };
        while toks.get(at) == Some(&"--threads") {
            at += 2;
        }
        let Some(&word) = toks.get(at) else { continue };
        if word.starts_with('-') || ["CMD", "...", "|", "CMD,"].contains(&word) {
            continue;
        }
        let Some((sub, k)) = subcommand(&cli, &toks[at..]) else {
            problems.push(format!("README.md:{line}: no subcommand `{word}`: {text}"));
            continue;
        };
        let rest = &toks[at + k..];
        if sub[0] != "launch" {
            check(&mut cli, line, &sub, rest, &text, &mut problems);
            continue;
        }
        let mut j = 0;
        while j < rest.len() && rest[j].starts_with("--") {
            j += 2;
        }
        check(
            &mut cli,
            line,
            &sub,
            &rest[..j.min(rest.len())],
            &text,
            &mut problems,
        );
        match rest.get(j) {
            None | Some(&"...") => {}
            Some(w) => match subcommand(&cli, &rest[j..]) {
                Some((inner, k)) => {
                    check(&mut cli, line, &inner, &rest[j + k..], &text, &mut problems)
                }
                None => problems.push(format!(
                    "README.md:{line}: `ibot launch` runs no subcommand `{w}`: {text}"
                )),
            },
        }
    }
    assert!(
        checked > 150,
        "only {checked} flags found in README commands: the parser lost them"
    );
    assert!(
        problems.is_empty(),
        "{} README command(s) the binary refuses:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn readme_compare_modes_and_paths_exist() {
    let root = Path::new(ROOT);
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = std::fs::read_to_string(root.join("bench/compare.sh")).unwrap();
    // case labels: lines like `data)` or `step | step-bf16)`
    let modes: BTreeSet<&str> = script
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#') && l.trim_end().ends_with(')'))
        .flat_map(|l| l.trim_end().trim_end_matches(')').split('|').map(str::trim))
        .collect();
    assert!(
        modes.contains("data") && modes.len() > 8,
        "compare.sh case labels not parsed: {modes:?}"
    );
    let mut problems = Vec::new();
    for (i, line) in readme.lines().enumerate() {
        for part in line.split("compare.sh ").skip(1) {
            let mode: String = part
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-')
                .collect();
            if !mode.is_empty() && !modes.contains(mode.as_str()) {
                problems.push(format!(
                    "README.md:{}: compare.sh has no mode {mode}",
                    i + 1
                ));
            }
        }
        let b = line.as_bytes();
        for dir in [
            "tests/", "bench/", "scripts/", "src/", "tools/", "fuzz/", "csrc/",
        ] {
            for (p, _) in line.match_indices(dir) {
                // skip paths inside others (target/bench/..., ../shared/bench/..., src/cli/...)
                if p > 0 && (b[p - 1].is_ascii_alphanumeric() || b"/._-".contains(&b[p - 1])) {
                    continue;
                }
                let path: String = line[p..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || "_./-*{}<>".contains(*c))
                    .collect();
                let path = path.trim_end_matches(['.', '-']);
                if path.contains(['*', '{', '<'])
                    || path.ends_with('/') && path.matches('/').count() == 1
                {
                    continue;
                }
                if !root.join(path).exists() {
                    problems.push(format!("README.md:{}: {path} does not exist", i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
