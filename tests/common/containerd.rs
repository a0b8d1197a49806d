//! A private containerd daemon for tests (Debian's `containerd` package): its root, state and sockets live in a
//! temporary directory, the CRI plugin is off, and it is killed on drop. Drive it with [`Containerd::ctr`].
//!
//! containerd needs root. It is required, not optional: a missing binary fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::require;

pub struct Containerd {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The gRPC socket, for `ctr -a`.
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start() -> Containerd {
        require("containerd");
        require("ctr");
        let dir = tempfile::Builder::new().prefix("bw-ctrd-").tempdir().expect("tempdir");
        let d = dir.path();
        let socket = d.join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = \"{sock}\"\n\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\n[debug]\n  address = \"\"\n\n\
             [metrics]\n  address = \"\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn containerd (apt-get install containerd; needs root)");
        let c = Containerd { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = c.ctr().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "containerd did not come up; its log:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// `ctr` against this daemon, in the namespace `breakwater-test`.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(&self.socket).args(["-n", "breakwater-test"]);
        cmd
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A `--hosts-dir` directory that sends pulls of `registry` (e.g. `docker.io`) to `mirror` (`http://ADDR`)
    /// first, with `server` as the fallback containerd would use if the mirror failed.
    pub fn hosts_dir(&self, registry: &str, server: &str, mirror: &str) -> PathBuf {
        let hosts = self.dir.path().join("hosts");
        let d = hosts.join(registry);
        std::fs::create_dir_all(&d).expect("mkdir hosts dir");
        let toml = format!(
            "server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(d.join("hosts.toml"), toml).expect("write hosts.toml");
        hosts
    }

    /// The target digest `ctr images ls` shows for `reference`.
    pub fn image_digest(&self, reference: &str) -> Option<String> {
        let out = self.ctr().args(["images", "ls"]).output().expect("ctr images ls");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&reference)).then(|| cols.get(2).map(|s| s.to_string())).flatten()
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots of the native snapshotter are plain directories; nothing stays mounted after a pull.
        let _ = unmount_below(self.dir.path());
    }
}

/// Unmounts anything still mounted below `dir` (defensive: a crashed unpack could leave a mount behind).
fn unmount_below(dir: &Path) -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let prefix = dir.display().to_string();
    let mut targets: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|t| t.starts_with(&prefix)).collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = Command::new("umount").arg(t).status();
    }
    Ok(())
}
