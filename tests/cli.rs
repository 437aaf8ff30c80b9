//! The binary's command line, as users and scripts see it.

use std::process::Command;

use assert_cmd::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_infinitetalk-batch");

fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("APIXO_API_KEY")
        .env_remove("APIXO_API_BASE")
        .env_remove("CREDENTIALS_DIRECTORY");
    cmd
}

#[test]
fn validate_accepts_the_sample_manifest() {
    let out = bin()
        .args(["validate", "batch.sample.csv"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rows: 3"), "{text}");
    assert!(text.contains("minimum cost: $0.60"), "{text}");
}

#[test]
fn validate_lists_every_problem_and_exits_1() {
    let out = bin()
        .args(["validate", "tests/fixtures/manifests/broken.csv"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let expected =
        std::fs::read_to_string("tests/fixtures/manifests/broken.errors.txt").expect("fixture");
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn validate_accepts_every_column_and_quirk() {
    bin()
        .args(["validate", "tests/fixtures/manifests/valid_all_columns.csv"])
        .assert()
        .success();
}

#[test]
fn run_without_key_or_simulate_refuses_and_names_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .current_dir(dir.path())
        .args(["run"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("--api-key-file") && text.contains("--simulate"),
        "{text}"
    );
    assert!(!dir.path().join("state").exists(), "nothing started");
}

#[test]
fn a_bad_config_key_is_refused_with_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "simulate = true\nmax-concurent = 5\n").expect("write");
    let out = bin()
        .current_dir(dir.path())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("max-concurent"), "{text}");
}

#[test]
fn readme_documents_every_flag_of_run() {
    let readme = std::fs::read_to_string("README.md").expect("README");
    let out = bin().args(["run", "--help"]).output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ']', ')']))
        .filter(|w| *w != "--help" && *w != "--version")
        .collect();
    assert!(flags.len() > 15, "{help}");
    for flag in flags {
        assert!(
            readme.contains(&format!("`{flag}")),
            "README does not document {flag}"
        );
    }
}

#[test]
fn readme_commands_exist() {
    let readme = std::fs::read_to_string("README.md").expect("README");
    assert!(readme.contains("cargo run --release -- run --simulate"));
    assert!(readme.contains("cargo test"));
    let ci = std::fs::read_to_string(".ci/run").expect(".ci/run");
    assert!(
        ci.contains("cargo test"),
        "CI runs the README's test command"
    );
}

/// Runs `run --simulate` with `flags` in an empty folder; the daemon must
/// refuse before starting anything (a 10 s limit catches one that starts).
fn run_refused(flags: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = assert_cmd::Command::new(BIN)
        .env_remove("APIXO_API_KEY")
        .env_remove("APIXO_API_BASE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .current_dir(dir.path())
        .args(["run", "--simulate", "--listen", "127.0.0.1:0"])
        .args(flags)
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .expect("runs");
    assert!(!dir.path().join("state").exists(), "nothing started");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_stop_timeout_not_above_the_api_timeout_is_refused() {
    let (code, text) = run_refused(&["--api-timeout", "20s", "--stop-timeout", "20s"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("--stop-timeout") && text.contains("--api-timeout"),
        "{text}"
    );
    // The defaults agree with each other.
    let (code, text) = run_refused(&["--stop-timeout", "15s"]);
    assert_eq!(code, Some(2), "api-timeout defaults to 15s: {text}");
}

#[test]
fn absurd_durations_and_insecure_api_bases_are_refused_at_start() {
    let (code, text) = run_refused(&["--poll-max", "100000000d"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("poll-max"), "{text}");
    let (code, text) = run_refused(&["--api-base", "http://api.example.com"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--allow-insecure-api"), "{text}");
}
