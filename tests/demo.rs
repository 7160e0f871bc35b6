//! Runs docs/demo.md: every ```sh block, in order, in one bash (`set -euo pipefail`), against a
//! `roam serve` started here on a free port (serving a temporary copy of serve_root) and the
//! disruptive proxy `flaky_proxy` is made of. Blocks preceded by a `<!-- demo-test: skip …-->`
//! comment start or stop servers; this test provides them instead, through the variables the
//! doc uses: ROAM, ROOT and PROXY. The demo cannot rot.

mod support;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use support::netns::KillOnDrop;
use support::proxy::{random_plan, DisruptiveProxy};

const SKIP_MARK: &str = "<!-- demo-test: skip";

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    code: String,
    skip: bool,
}

/// The ```sh blocks of a Markdown text, each marked as skipped when the last non-blank line
/// before it is a skip comment.
fn sh_blocks(md: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut skip_next = false;
    let mut open: Option<Block> = None;
    for (i, line) in md.lines().enumerate() {
        if let Some(block) = open.as_mut() {
            if line.trim_end() == "```" {
                blocks.push(open.take().unwrap());
            } else {
                block.code.push_str(line);
                block.code.push('\n');
            }
        } else if line.trim_end() == "```sh" {
            open = Some(Block {
                line: i + 1,
                code: String::new(),
                skip: std::mem::take(&mut skip_next),
            });
        } else if line.trim_start().starts_with(SKIP_MARK) {
            skip_next = true;
        } else if !line.trim().is_empty() {
            skip_next = false;
        }
    }
    assert!(open.is_none(), "docs/demo.md: unterminated ```sh block");
    blocks
}

/// `roam serve` on 127.0.0.1:0, killed on drop.
struct Server {
    _child: KillOnDrop,
    _stdout: BufReader<ChildStdout>,
    /// The server's state directory (sessions on disk, the ID secret).
    _state: tempfile::TempDir,
    addr: SocketAddr,
}

fn start_server(root: &Path) -> Server {
    let state = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_roam"))
            .args(["serve", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn roam serve"),
    );
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("roam listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Server {
        _child: child,
        _stdout: stdout,
        _state: state,
        addr,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// `N` in the doc's `flaky_proxy … --reset-every N`, so the test's proxy is the doc's.
fn reset_every(blocks: &[Block]) -> u64 {
    blocks
        .iter()
        .filter(|b| b.skip)
        .flat_map(|b| b.code.lines())
        .filter(|l| l.contains("flaky_proxy"))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "--reset-every")?;
            words.next()?.parse().ok()
        })
        .expect("docs/demo.md starts flaky_proxy with --reset-every N")
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()))
        == std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()))
}

#[test]
fn demo_md_runs() {
    if Command::new("curl").arg("--version").output().is_err() {
        if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
            panic!("CI=true but curl is not installed: the demo needs it");
        }
        println!("skipping: curl not found");
        return;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = manifest.join("docs/demo.md");
    let md = std::fs::read_to_string(&doc).unwrap();
    let blocks = sh_blocks(&md);
    let run: Vec<&Block> = blocks.iter().filter(|b| !b.skip).collect();
    assert!(
        blocks.iter().any(|b| b.skip) && run.len() >= 5,
        "docs/demo.md should have skipped server blocks and runnable steps: {blocks:#?}"
    );
    for b in &run {
        assert!(
            !b.code.contains("serve --") && !b.code.contains("flaky_proxy --"),
            "docs/demo.md line {}: a block that starts a server must be marked `{SKIP_MARK} …-->`",
            b.line
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("serve_root");
    copy_dir(&manifest.join("serve_root"), &root);
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let server = start_server(&root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = {
        let _guard = rt.enter();
        // flaky_proxy's default seed is 1.
        DisruptiveProxy::start(server.addr, random_plan(reset_every(&blocks), 1, false))
    };

    let mut script = String::from("set -euo pipefail\n");
    for b in &run {
        script.push_str(&format!(
            "echo '>>> docs/demo.md, block at line {}' >&2\n{}",
            b.line, b.code
        ));
    }
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_roam"))
        .parent()
        .unwrap()
        .to_owned();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let (out_path, err_path) = (tmp.path().join("stdout"), tmp.path().join("stderr"));
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("ROAM", format!("http://{}", server.addr))
        .env("ROOT", &root)
        .env("PROXY", format!("http://{}", proxy.addr()))
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("ROAM_") {
            cmd.env_remove(k);
        }
    }
    let mut child = KillOnDrop(cmd.spawn().expect("spawn bash"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(300) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    println!(
        "--- demo stdout ---\n{stdout}\n--- demo stderr ---\n{stderr}\n--- {:?}, {} proxied connections ---",
        started.elapsed(),
        proxy.connections()
    );
    let status = status.expect("the demo did not finish within 300 s");
    assert!(status.success(), "the demo failed ({status}); see above");

    // curl really ran, and every download ended exact.
    let big = root.join("big.bin");
    assert!(same(&work.join("part1"), &big), "part1 completed by -C -");
    // The interrupted curl went away with bytes unread: asked again without Range, the whole
    // file (issue 12).
    let headers = std::fs::read_to_string(work.join("headers")).unwrap();
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(same(&work.join("part2"), &big), "part2 is the whole file");
    // The hung connection taken over: the two parts meet with no gap and no repeat.
    let mut ab = std::fs::read(work.join("a.bin")).unwrap();
    ab.extend(std::fs::read(work.join("b.bin")).unwrap());
    assert!(
        ab == std::fs::read(&big).unwrap(),
        "a.bin + b.bin is the file"
    );
    assert!(
        same(&work.join("big.bin"), &big),
        "roam get through the proxy"
    );
    assert!(
        same(&work.join("again.bin"), &big),
        "roam get after SIGKILL"
    );
    assert!(
        stdout.contains("client id: "),
        "the mint step printed the ID"
    );
    assert!(
        proxy.connections() > 2,
        "the flaky proxy was used and broke connections"
    );
}
