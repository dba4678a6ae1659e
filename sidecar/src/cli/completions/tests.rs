use std::io::Write;
use std::process::{Command, Stdio};

use super::*;

/// What bash completes after `words` (the last one being typed), with the
/// generated script loaded into a real bash.
fn complete(words: &[&str]) -> Vec<String> {
    let mut quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    if quoted.is_empty() {
        quoted.push("''".into());
    }
    let driver = format!(
        "{}\nCOMP_WORDS=({}); COMP_CWORD={}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n\
         _pgwarden pgwarden \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script(Shell::Bash),
        quoted.join(" "),
        words.len() - 1,
    );
    let mut bash = Command::new("bash")
        .args(["--norc", "--noprofile", "-s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash");
    bash.stdin
        .take()
        .unwrap()
        .write_all(driver.as_bytes())
        .unwrap();
    let out = bash.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_the_subcommands_and_their_flags() {
    let top = complete(&["pgwarden", ""]);
    for sub in ["run", "check", "approvals", "sessions", "completions"] {
        assert!(top.iter().any(|w| w == sub), "{sub} not offered: {top:?}");
    }
    assert_eq!(complete(&["pgwarden", "appr"]), ["approvals"]);
    let approvals = complete(&["pgwarden", "approvals", ""]);
    for sub in ["list", "show", "approve", "deny"] {
        assert!(approvals.iter().any(|w| w == sub), "{sub}: {approvals:?}");
    }
    let run = complete(&["pgwarden", "run", "--loopback"]);
    assert_eq!(run, ["--loopback-owner"]);
}

#[test]
fn zsh_and_fish_scripts_name_the_subcommands() {
    for shell in [Shell::Zsh, Shell::Fish] {
        let s = script(shell);
        for sub in ["approvals", "sessions", "completions"] {
            assert!(s.contains(sub), "{shell:?}: no {sub}");
        }
    }
}
