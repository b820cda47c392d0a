//! A mosquitto broker as a child process on a loopback port.

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
}

impl Mosquitto {
    /// Start an anonymous broker on a free port.
    pub async fn start() -> Mosquitto {
        Self::start_with_users(&[]).await
    }

    /// Start a broker that requires one of these username/password pairs.
    pub async fn start_with_users(users: &[(&str, &str)]) -> Mosquitto {
        let mut m = Mosquitto {
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temporary directory"),
            child: None,
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
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
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
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
