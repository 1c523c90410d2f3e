//! Running external commands: echoed before they start, their output kept
//! in a log file, and the end of that log shown when they fail.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Lines of a failed command's log shown in the error.
const LOG_TAIL_LINES: usize = 40;

/// Interval between the "still running" lines of a long command.
const HEARTBEAT: Duration = Duration::from_secs(60);

/// Runs `command` with stdout and stderr appended to `log`.
///
/// The command line is printed first and written to the log. A failure
/// reports the exit status, the last lines of the log and the log's path.
pub fn run_logged(command: impl Into<Command>, log: &Path) -> Result<()> {
    let command = command.into();
    let line = display(&command);
    run_logged_as(command, &line, log)
}

/// Runs `command` like [`run_logged`], but prints `summary` instead of the
/// whole command line, which still goes to the log.
pub fn run_logged_as(mut command: Command, summary: &str, log: &Path) -> Result<()> {
    let line = display(&command);
    eprintln!("$ {summary}");

    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open the log {}", log.display()))?;
    writeln!(file, "$ {line}")?;
    let stderr = file.try_clone()?;

    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let status = if live_view() {
        wait_with_spinner(&mut child, summary, log)?
    } else {
        wait_with_heartbeat(&mut child, summary, started)?
    };
    let mut file = OpenOptions::new().append(true).open(log)?;
    writeln!(file, "# {status} after {:.1} s", started.elapsed().as_secs_f64())?;

    if !status.success() {
        let tail = log_tail(log, LOG_TAIL_LINES).unwrap_or_default();
        bail!(
            "`{line}` failed ({status})\n--- last {LOG_TAIL_LINES} lines of {} ---\n{tail}--- end of log ---",
            log.display()
        );
    }
    Ok(())
}

/// Waits for `child`, printing a line with the elapsed time every
/// [`HEARTBEAT`] so that a long compile does not look stuck.
fn wait_with_heartbeat(child: &mut Child, summary: &str, started: Instant) -> Result<ExitStatus> {
    let mut next_heartbeat = HEARTBEAT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let elapsed = started.elapsed();
        if elapsed >= next_heartbeat {
            let program = summary.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
            eprintln!("  ... {program} still running after {} s", elapsed.as_secs());
            next_heartbeat += HEARTBEAT;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Returns whether stderr is a terminal outside CI, where a live line can
/// replace the periodic heartbeat.
fn live_view() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// Waits for `child`, showing a spinner with the elapsed time and the last
/// line of its log, such as the file the compiler is on.
/// Spinners of the commands running at once (one per PHP version that
/// compiles), drawn one under the other.
fn spinners() -> &'static indicatif::MultiProgress {
    static SPINNERS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    SPINNERS.get_or_init(indicatif::MultiProgress::new)
}

fn wait_with_spinner(child: &mut Child, summary: &str, log: &Path) -> Result<ExitStatus> {
    let spinner = spinners().add(indicatif::ProgressBar::new_spinner());
    spinner.set_style(
        indicatif::ProgressStyle::with_template("  {spinner} {elapsed:>4} {wide_msg}")
            .expect("the spinner template is valid"),
    );
    let program = summary.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    loop {
        let exited = child.try_wait();
        if !matches!(exited, Ok(None)) {
            spinner.finish_and_clear();
            spinners().remove(&spinner);
            return Ok(exited?.expect("the child has exited"));
        }
        let last = last_line(log).unwrap_or_default();
        spinner.set_message(format!("{program} | {last}"));
        spinner.tick();
        thread::sleep(Duration::from_millis(200));
    }
}

/// Returns the last non-empty line of `log`, read from its end.
fn last_line(log: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(log)?;
    let length = file.metadata()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(4096)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    // Progress output redraws its line with carriage returns: the last
    // segment is what a terminal would show.
    let line = text
        .lines()
        .rev()
        .map(|line| line.rsplit('\r').next().unwrap_or_default().trim())
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    Ok(line.chars().filter(|c| !c.is_control()).collect())
}

/// Runs `command`, echoed, with its output passed through to the terminal.
pub fn run_visible(command: impl Into<Command>) -> Result<()> {
    let mut command = command.into();
    let line = display(&command);
    eprintln!("$ {line}");
    let status = command.status().with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Returns the command line as a shell would show it, for messages only.
pub fn display(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
        if plain {
            words.push(arg.into_owned());
        } else {
            words.push(format!("'{}'", arg.replace('\'', r"'\''")));
        }
    }
    words.join(" ")
}

/// Returns the path a stage writes to before it is renamed to `path`:
/// `path` with `.partial` appended to its file name.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

fn log_tail(log: &Path, count: usize) -> Result<String> {
    let reader = BufReader::new(File::open(log)?);
    let mut lines = VecDeque::with_capacity(count);
    for line in reader.split(b'\n') {
        if lines.len() == count {
            lines.pop_front();
        }
        lines.push_back(String::from_utf8_lossy(&line?).into_owned());
    }
    Ok(lines.into_iter().map(|line| line + "\n").collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_shows_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stage.log");
        let mut command = Command::new("sh");
        command.args(["-c", "for i in $(seq 1 100); do echo line $i; done; exit 3"]);

        let error = run_logged(command, &log).unwrap_err().to_string();

        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.contains("line 100"), "{error}");
        // 39 lines of output and the exit status line make the tail.
        assert!(error.contains("line 62\n"), "{error}");
        assert!(!error.contains("line 61\n"), "{error}");
        assert!(error.contains(&log.display().to_string()), "{error}");
    }

    #[test]
    fn last_line_skips_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stage.log");
        let long: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        fs::write(
            &log,
            format!("{long}/bin/bash ./libtool --mode=compile cc ext/standard/array.c\n\n"),
        )
        .unwrap();
        assert_eq!(
            last_line(&log).unwrap(),
            "/bin/bash ./libtool --mode=compile cc ext/standard/array.c"
        );
        fs::write(&log, "Get: 10%\rGet: 55% \u{1b}[K\n").unwrap();
        assert_eq!(last_line(&log).unwrap(), "Get: 55% [K");
    }

    #[test]
    fn partial_path_keeps_dotted_names() {
        let path = Path::new("/cache/builds/php-8.2.32-x86_64-5a40f5");
        assert_eq!(
            partial_path(path),
            Path::new("/cache/builds/php-8.2.32-x86_64-5a40f5.partial")
        );
    }

    #[test]
    fn success_appends_to_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stage.log");
        let mut command = Command::new("echo");
        command.arg("hello world");

        run_logged(command, &log).unwrap();

        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("$ echo 'hello world'\n"), "{text}");
        assert!(text.contains("hello world\n"), "{text}");
    }
}
