//! Prints pgwarden's CRDs as one multi-document YAML stream, or with
//! `--write DIR` (repeatable: crds/ and the Helm chart's crds/) writes one
//! file per CRD into each DIR.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

const USAGE: &str = "usage: crdgen [--write DIR]...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.as_slice(), [flag] if flag == "-h" || flag == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let mut out_dirs = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match (arg.as_str(), it.next()) {
            ("--write", Some(dir)) => out_dirs.push(PathBuf::from(dir)),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }

    match run(&out_dirs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(out_dirs: &[PathBuf]) -> Result<(), Box<dyn std::error::Error>> {
    let files = pgwarden_api::crd_yaml()?;
    if out_dirs.is_empty() {
        let docs: Vec<&str> = files.iter().map(|(_, yaml)| yaml.as_str()).collect();
        print!("{}", docs.join("---\n"));
    }
    for dir in out_dirs {
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml).map_err(|e| format!("writing {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
