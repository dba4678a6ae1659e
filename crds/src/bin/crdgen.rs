//! Prints pgwarden's CRDs as one multi-document YAML stream, or with
//! `--write DIR` writes one file per CRD into DIR.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

const USAGE: &str = "usage: crdgen [--write DIR]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_dir = match args.as_slice() {
        [] => None,
        [flag, dir] if flag == "--write" => Some(PathBuf::from(dir)),
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };

    match run(out_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(out_dir: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let files = pgwarden_api::crd_yaml()?;
    match out_dir {
        None => {
            let docs: Vec<String> = files.into_iter().map(|(_, yaml)| yaml).collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            for (name, yaml) in files {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}
