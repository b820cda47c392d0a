//! A mosquitto broker as a child process on a loopback port.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running (or stopped, restartable) mosquitto.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    users: Vec<(String, String)>,
    log_topic: bool,
}

impl Mosquitto {
    /// Start an anonymous broker on a free port.
    pub async fn start() -> Mosquitto {
        Self::start_with_users(&[]).await
    }

    /// Start a broker that requires one of these username/password pairs.
    pub async fn start_with_users(users: &[(&str, &str)]) -> Mosquitto {
        Self::start_configured(users, false).await
    }

    /// Start an anonymous broker that also publishes its log on
    /// `$SYS/broker/log/{E,W,N}` (`log_dest topic`, `log_type notice`), so a
    /// subscriber sees clients connect and disconnect (mosquitto 2.0.11:
    /// `New client connected from 127.0.0.1:40000 as <id> (p2, c1, k60, u'<user>').`,
    /// `Client <id> disconnected.`, `Client <id> closed its connection.`, …).
    /// [`crate::AliyunPlatform`] needs this.
    ///
    /// One more setting keeps what a subscriber sees in the order the broker
    /// handled it: `max_inflight_messages 0` (no inflight window, so a QoS 0
    /// message never overtakes QoS 1/2 messages queued behind a full window,
    /// and none is dropped or held back for a slow subscriber). The
    /// routine connect/disconnect notices are kept off stderr, which still
    /// shows errors and warnings as with [`Mosquitto::start`]. Sessions
    /// survive [`Mosquitto::restart`] also when the tests run as root (the
    /// data directory is made writable for the `mosquitto` user).
    pub async fn start_with_log_topic() -> Mosquitto {
        Self::start_configured(&[], true).await
    }

    async fn start_configured(users: &[(&str, &str)], log_topic: bool) -> Mosquitto {
        let mut m = Mosquitto {
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
            child: None,
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            log_topic,
        };
        m.write_config();
        m.restart().await;
        m
    }

    fn write_config(&self) {
        let mut conf = format!(
            "listener {} 127.0.0.1\npersistence true\npersistence_location {}/\n\
             log_dest stderr\nlog_type error\nlog_type warning\n",
            self.port,
            self.dir.path().display()
        );
        if self.log_topic {
            conf.push_str("log_dest topic\nlog_type notice\nmax_inflight_messages 0\n");
            // Run as root, mosquitto drops to its own user, which cannot
            // write the private temporary directory: sessions would not
            // survive `restart` ("Error: Permission denied." at exit).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777))
                .expect("make the persistence directory writable");
        }
        if self.users.is_empty() {
            conf.push_str("allow_anonymous true\n");
        } else {
            let pw = self.dir.path().join("passwd");
            std::fs::write(&pw, "").expect("password file");
            for (u, p) in &self.users {
                let st = Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg(&pw)
                    .args([u, p])
                    .status()
                    .expect("run mosquitto_passwd (apt-get install mosquitto)");
                assert!(st.success(), "mosquitto_passwd failed");
            }
            conf.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                pw.display()
            ));
        }
        std::fs::write(self.config_path(), conf).expect("mosquitto config");
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stop the broker the way a service manager does (SIGTERM): clients see
    /// the connection drop; persistent sessions and their queued messages are
    /// saved and come back with [`Mosquitto::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Kill the broker (SIGKILL): nothing is saved.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)start the broker on the same port and wait until it accepts connections.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if self.log_topic {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        if let Some(err) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            // `log_type notice` is global in mosquitto: it reaches stderr too.
            // Forward all but the routine connection notices (the thread ends
            // when mosquitto does).
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { return };
                    if !is_routine_notice(&line) {
                        let _ = writeln!(std::io::stderr(), "{line}");
                    }
                }
            });
        }
        // mosquitto tells nobody when it listens: connect until it does (bounded).
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("mosquitto exited at start: {st}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("mosquitto did not listen on port {}", self.port);
    }
}

/// A connection notice mosquitto logs for every client: `[<time>: ]New
/// connection from …`, `New client connected from …`, `Client <id>
/// disconnected.`, `Client <id> closed its connection.`.
fn is_routine_notice(line: &str) -> bool {
    let msg = match line.split_once(": ") {
        Some((time, msg)) if time.bytes().all(|b| b.is_ascii_digit()) => msg,
        _ => line,
    };
    msg.starts_with("New connection from ")
        || msg.starts_with("New client connected from ")
        || (msg.starts_with("Client ")
            && (msg.ends_with(" disconnected.") || msg.ends_with(" closed its connection.")))
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
