//! Getting lb without a Rust toolchain (DESIGN §15): the npm packages `scripts/npm-pack.sh`
//! builds, installed the way Node users do, with no registry (offline, fresh cache); the
//! wrapper's answer on a platform without a package; the `.deb` `cargo deb` builds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// How the tests run an installed lb: two workers on the project's `app.js`, no admin sockets.
const SERVE_APP: [&str; 11] = [
    "-w",
    "2",
    "-l",
    "127.0.0.1:0",
    "--metrics",
    "off",
    "--control",
    "off",
    "--",
    "node",
    "app.js",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `scripts/npm-pack.sh` with this build of lb, into `out`: (wrapper, platform) tarballs.
fn npm_pack(out: &Path) -> (PathBuf, PathBuf) {
    let st = Command::new(root().join("scripts/npm-pack.sh"))
        .env("LB_NPM_BINARY", LB)
        .env("LB_NPM_OUT", out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "npm-pack.sh: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    let w = out.join(format!("lb-sticky-{version}.tgz"));
    let p = out.join(format!("lb-sticky-linux-x64-gnu-{version}.tgz"));
    assert!(
        w.exists() && p.exists(),
        "{:?}",
        std::fs::read_dir(out).unwrap().collect::<Vec<_>>()
    );
    (w, p)
}

/// `npm ARGS` offline with a fresh cache in `dir` (no registry can be reached).
fn npm(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("npm")
        .args(args)
        .args(["--offline", "--no-audit", "--no-fund", "--loglevel=error"])
        .arg(format!("--cache={}", dir.join("cache").display()))
        .current_dir(dir)
        .env_remove("npm_config_prefix")
        .output()
        .expect("npm")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lb-npm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `program ARGS` (an lb from a package) as a server until it says where it listens,
/// serves one request through it, and stops it with SIGTERM to `program`'s pid: lb stops (its
/// port is closed); `program` exits 0 when it is lb's own wrapper (npx dies of the signal).
fn serves_a_request(program: &Path, args: &[&str], dir: &Path, clean_exit: bool) {
    use std::io::BufRead;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split(',').next().unwrap().trim().to_owned());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("lb from the package says where it listens")
        .parse()
        .unwrap();
    let body = wait_for("a request served", Duration::from_secs(20), || {
        let (status, body) = http_get(addr, "/", Some(client_ip(1)));
        (status == 200).then_some(body)
    });
    assert!(
        body.starts_with("instance 0 slot 0") || body.starts_with("instance 1 slot 1"),
        "{body}"
    );
    // SIGTERM reaches lb (through the wrapper, or, under npx, the wrapper sees npx gone).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for("the program to end", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    assert!(!clean_exit || status.success(), "{status}");
    wait_for(
        "lb to stop (its port closed)",
        Duration::from_secs(20),
        || std::net::TcpStream::connect(addr).is_err().then_some(()),
    );
}

#[test]
fn the_npm_packages_install_offline_globally_and_in_a_project_and_serve() {
    let dir = scratch("install");
    let (wrapper, platform) = npm_pack(&dir.join("packs"));
    let (w, p) = (wrapper.to_str().unwrap(), platform.to_str().unwrap());
    std::fs::copy(
        root().join("tests/fixtures/instance.js"),
        dir.join("app.js"),
    )
    .unwrap();

    // npm install -g, into a prefix of its own.
    let prefix = dir.join("prefix");
    let out = npm(
        &dir,
        &[
            "install",
            "-g",
            &format!("--prefix={}", prefix.display()),
            w,
            p,
        ],
    );
    assert!(
        out.status.success(),
        "npm install -g: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lb = prefix.join("bin/lb");
    let v = Command::new(&lb).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("lb {}", lb_version()),
        "{}",
        String::from_utf8_lossy(&v.stderr)
    );
    serves_a_request(&lb, &SERVE_APP, &dir, true);

    // npm install --save-dev in a project, scripts off; then `npx lb`.
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("package.json"),
        r#"{"name":"app","version":"1.0.0","private":true}"#,
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/fixtures/instance.js"),
        project.join("app.js"),
    )
    .unwrap();
    let out = npm(
        &project,
        &["install", "--save-dev", "--ignore-scripts", w, p],
    );
    assert!(
        out.status.success(),
        "npm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let npx = which("npx").expect("npx");
    serves_a_request(
        &npx,
        &[&["--offline", "lb"][..], &SERVE_APP].concat(),
        &project,
        false,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_npm_wrapper_names_a_platform_without_a_package_in_one_line() {
    // The wrapper's resolver, asked about other platforms (and about a missing package).
    let resolve = root().join("npm/resolve.js");
    let script = format!(
        "const r = require({resolve:?});\n\
         const none = () => {{ throw new Error('not found'); }};\n\
         for (const p of [{{platform:'linux',arch:'arm64',libc:'gnu'}}, {{platform:'linux',arch:'x64',libc:'musl'}}, {{platform:'darwin',arch:'arm64',libc:''}}])\n\
           console.log(r.findBinary({{}}, none, p).error);\n\
         console.log(r.findBinary({{}}, none, {{platform:'linux',arch:'x64',libc:'gnu'}}).error);\n\
         console.log(r.findBinary({{LB_BINARY:'/opt/lb'}}, none, {{platform:'linux',arch:'arm64',libc:'gnu'}}).path);\n\
         console.log(r.platformKey());",
        resolve = resolve.display().to_string()
    );
    let out = Command::new("node").args(["-e", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    for (line, key) in lines
        .iter()
        .zip(["linux-arm64-gnu", "linux-x64-musl", "darwin-arm64"])
    {
        assert!(
            line.contains(&format!("no prebuilt lb for {key}")),
            "{line}"
        );
        assert!(
            line.contains("build it from source") && line.contains("LB_BINARY"),
            "{line}"
        );
    }
    assert!(
        lines[3].contains("@lb-sticky/linux-x64-gnu") && lines[3].contains("not installed"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[4], "/opt/lb");
    assert_eq!(lines[5], "linux-x64-gnu", "this machine");

    // The same through the real command: an installed wrapper without its platform package.
    let dir = scratch("noplatform");
    let (wrapper, _) = npm_pack(&dir.join("packs"));
    let prefix = dir.join("prefix");
    let out = npm(
        &dir,
        &[
            "install",
            "-g",
            "--omit=optional",
            &format!("--prefix={}", prefix.display()),
            wrapper.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(prefix.join("bin/lb"))
        .arg("--version")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("lb: error: ") && err.contains("@lb-sticky/linux-x64-gnu"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn lb_version() -> String {
    let v = Command::new(LB).arg("--version").output().unwrap();
    String::from_utf8_lossy(&v.stdout)
        .trim()
        .trim_start_matches("lb ")
        .to_owned()
}

#[test]
fn cargo_deb_builds_a_package_that_installs_into_a_scratch_root_and_runs() {
    let release = root().join("target/release/lb");
    let have_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_cargo_deb || !release.exists() {
        return skip(
            "deb",
            "needs cargo-deb and the release binary (scripts/test.sh installs and builds both)",
        );
    }
    let out = Command::new(root().join("scripts/deb.sh"))
        .env("LB_DEB_NO_BUILD", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deb.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = root().join(format!(
        "target/debian/lb_{}-1_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    // What it holds.
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "./usr/bin/lb",
        "./usr/lib/systemd/system/lb.service",
        "./usr/lib/systemd/system/lb.socket",
        "./usr/share/man/man1/lb.1.gz",
        "./usr/share/man/man1/lb-status.1.gz",
        "./usr/share/man/man1/lb-route.1.gz",
        "./usr/share/bash-completion/completions/lb",
        "./usr/share/zsh/vendor-completions/_lb",
        "./usr/share/fish/vendor_completions.d/lb.fish",
        "./etc/lb/lb.toml",
        "./usr/share/doc/lb/copyright",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{list}"
        );
    }
    // dpkg -i into a scratch root (its own status database), then lb from there.
    let scratch = scratch("deb");
    for d in ["var/lib/dpkg/updates", "var/lib/dpkg/info"] {
        std::fs::create_dir_all(scratch.join(d)).unwrap();
    }
    std::fs::write(scratch.join("var/lib/dpkg/status"), "").unwrap();
    let out = Command::new("dpkg")
        .arg(format!("--root={}", scratch.display()))
        .args(["--force-depends", "--force-script-chrootless", "-i"])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = Command::new(scratch.join("usr/bin/lb"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("lb {}", env!("CARGO_PKG_VERSION")).as_str()
    );
    // The unit in the package names the binary where the package put it.
    let unit = std::fs::read_to_string(scratch.join("usr/lib/systemd/system/lb.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/lb "), "{unit}");
    let _ = std::fs::remove_dir_all(&scratch);
}
