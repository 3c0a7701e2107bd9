//! Shell completions and man pages for the three binaries (`concordat-broker`,
//! `concordat-agent`, `concordat`), generated from their clap definitions so that they never
//! drift from the commands: `<binary> completions bash|zsh|fish|elvish|powershell` prints a
//! completion script, `<binary> man --out-dir DIR` writes one page per command and subcommand
//! (`concordat.1`, `concordat-consent-issue.1`, ...).

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes a man page for `cmd` and one for each of its subcommands, recursively, into `dir`
/// (created if missing), named after the command path joined by `-`, section 1. Returns the
/// files written, in order.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let page = cmd.clone().name(name.to_owned());
    let path = dir.join(format!("{name}.1"));
    let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
    clap_mangen::Man::new(page).render(&mut file)?;
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cmd() -> clap::Command {
        clap::Command::new("tool")
            .version("1.0")
            .about("A tool")
            .subcommand(
                clap::Command::new("keys")
                    .about("Keys")
                    .subcommand(clap::Command::new("make").about("Makes a key")),
            )
    }

    #[test]
    fn one_page_per_command_and_completions_name_the_subcommands() {
        let dir = tempfile::tempdir().unwrap();
        let pages = man_pages(cmd(), dir.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool.1", "tool-keys.1", "tool-keys-make.1"]);
        let page = std::fs::read_to_string(&pages[2]).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(page.contains("Makes a key"), "{page}");

        let mut out = Vec::new();
        completions(cmd(), Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("keys") && script.contains("make"),
            "{script}"
        );
    }
}
