//! Test support: a real mosquitto on an ephemeral loopback port (killed on
//! drop), and a plain rumqttc client standing in for the platform.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Upper bound of every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
pub struct BrokerOpts {
    /// `(user, password)` pairs; none = anonymous access.
    pub users: Vec<(String, String)>,
    /// Keep sessions across a graceful restart (`stop` sends SIGTERM, which
    /// makes mosquitto save its database).
    pub persistence: bool,
    /// A TLS listener with a certificate for 127.0.0.1 signed by a fresh CA
    /// (see [`Mosquitto::ca_file`]), made with `openssl`.
    pub tls: bool,
}

impl Mosquitto {
    pub fn start(opts: BrokerOpts) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut conf = format!("listener {port} 127.0.0.1\nlog_dest stderr\n");
        if opts.tls {
            otagw_testkit::make_certs(dir.path());
            let p = |f: &str| dir.path().join(f).display().to_string();
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                p("ca.pem"),
                p("server.pem"),
                p("server.key")
            ));
        }
        if opts.users.is_empty() {
            conf.push_str("allow_anonymous true\n");
        } else {
            let pw = dir.path().join("passwd");
            for (i, (u, p)) in opts.users.iter().enumerate() {
                let mut cmd = Command::new("mosquitto_passwd");
                if i == 0 {
                    cmd.arg("-c");
                }
                let st = cmd.arg("-b").arg(&pw).arg(u).arg(p).status().unwrap();
                assert!(st.success(), "mosquitto_passwd failed");
            }
            conf.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                pw.display()
            ));
        }
        if opts.persistence {
            // Run as root, mosquitto drops to its own user: let it write here.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                dir.path().display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let mut m = Mosquitto {
            port,
            child: None,
            conf: path,
            _dir: dir,
        };
        m.spawn();
        m
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The CA that signed the TLS listener's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self._dir.path().join("ca.pem")
    }

    /// Start (again) on the same port; returns once mosquitto says it runs.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining so mosquitto never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(" running") => break,
                Ok(line) if line.contains("Error") => panic!("mosquitto: {line}"),
                Ok(_) => {}
                Err(e) => panic!("mosquitto did not start: {e}"),
            }
        }
        self.child = Some(child);
    }

    /// SIGKILL (no goodbye, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: mosquitto saves its database (with persistence) and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let st = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .unwrap();
            assert!(st.success());
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// What the test client saw.
#[derive(Debug)]
pub enum Seen {
    Msg(String, Bytes),
    SubAck,
}

/// A plain MQTT client (the "platform" side) that re-subscribes after every
/// connect and forwards what it sees.
pub struct TestClient {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    /// Connect, subscribe `topics` at QoS 1 and wait for the SUBACK.
    /// `persistent` = clean_session false (the broker queues for it while it
    /// is away).
    pub async fn connect(
        port: u16,
        id: &str,
        creds: Option<(&str, &str)>,
        topics: &[&str],
        persistent: bool,
    ) -> TestClient {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(!persistent)
            .set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (client, mut el) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let wait = !topics.is_empty();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let c2 = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present && !topics.is_empty() {
                            let f = topics.iter().map(|t| {
                                rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)
                            });
                            let _ = c2.subscribe_many(f).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Seen::SubAck);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Msg(p.topic, p.payload));
                    }
                    Ok(_) => {}
                    // Reconnect pacing while the broker is down (not a synchronisation).
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let mut t = TestClient { client, rx, task };
        if wait {
            t.wait_suback().await;
        }
        t
    }

    pub async fn wait_suback(&mut self) {
        loop {
            match self.next_seen().await {
                Seen::SubAck => return,
                Seen::Msg(..) => {}
            }
        }
    }

    async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("timed out waiting at the test client")
            .expect("test client stopped")
    }

    /// The next message (SUBACKs skipped).
    pub async fn next_msg(&mut self) -> (String, Bytes) {
        loop {
            if let Seen::Msg(t, p) = self.next_seen().await {
                return (t, p);
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
