//! Real protocol peers for the tests, installed by `scripts/test`: mosquitto (Debian), and a
//! Python virtualenv with pymodbus. A peer that is missing fails the test with the command that
//! installs it; nothing is skipped silently.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use super::wait_for;

/// The path of `program`, or a panic saying how to install it.
pub fn require(program: &str, install: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let path = Path::new(dir).join(program);
        if path.is_file() {
            return path;
        }
    }
    panic!("this test needs `{program}`: {install} (scripts/test installs it when run as root)");
}

/// The Python of the test virtualenv that `scripts/test` makes (target/test-venv).
pub fn test_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(
        python.is_file(),
        "this test needs the test virtualenv: run scripts/test, or \
         python3 -m venv target/test-venv && target/test-venv/bin/pip install -r tests/peers/requirements.txt"
    );
    python
}

/// A mosquitto broker on loopback with its own persistence directory, so a restart keeps the
/// sessions and queued messages it had.
pub struct Mosquitto {
    pub port: u16,
    /// Extra arguments for mosquitto_pub and mosquitto_sub (TLS files, credentials).
    pub client_args: Vec<String>,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path, port: u16) -> Mosquitto {
        Self::start_with(dir, port, "allow_anonymous true\n", Vec::new())
    }

    /// A broker that takes TLS with client certificates and passwords only: `user`/`password`.
    pub fn start_secure(dir: &Path, port: u16, pki: &Pki, user: &str, password: &str) -> Mosquitto {
        let passwd = dir.join(format!("mosquitto-{port}.passwd"));
        let status = Command::new(require("mosquitto_passwd", "apt-get install mosquitto"))
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .args([user, password])
            .status()
            .unwrap();
        assert!(status.success());
        let conf = format!(
            "allow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            passwd.display(),
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        );
        let args = [
            "--cafile",
            &pki.ca.display().to_string(),
            "--cert",
            &pki.client_cert.display().to_string(),
            "--key",
            &pki.client_key.display().to_string(),
            "-u",
            user,
            "-P",
            password,
        ]
        .map(str::to_owned)
        .to_vec();
        Self::start_with(dir, port, &conf, args)
    }

    fn start_with(
        dir: &Path,
        port: u16,
        listener_conf: &str,
        client_args: Vec<String>,
    ) -> Mosquitto {
        let binary = require("mosquitto", "apt-get install mosquitto mosquitto-clients");
        let data = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&data).unwrap();
        let conf = data.join("mosquitto.conf");
        // As root, mosquitto would switch to its own user, which cannot write the test's files.
        let user = if running_as_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{listener_conf}persistence true\n\
                 persistence_location {}/\nmax_queued_messages 0\nlog_dest stderr\n\
                 log_type error\nlog_type warning\nlog_type notice\n{user}",
                data.display()
            ),
        )
        .unwrap();
        let mut broker = Mosquitto {
            port,
            client_args,
            conf,
            log: data.join("mosquitto.log"),
            child: None,
        };
        broker.child = Some(broker.spawn(&binary));
        broker
    }

    fn spawn(&self, binary: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting mosquitto");
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "mosquitto did not listen on {port}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        child
    }

    /// Stops the broker cleanly (it saves its state) and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        let binary = require("mosquitto", "apt-get install mosquitto");
        self.child = Some(self.spawn(&binary));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::terminate(&mut child, Duration::from_secs(10));
        }
    }

    /// Publishes each line as one message on `topic`, with mosquitto_pub, and waits until the
    /// broker has acknowledged them all.
    pub fn publish_lines(&self, topic: &str, qos: u8, lines: &[String]) {
        let binary = require("mosquitto_pub", "apt-get install mosquitto-clients");
        let mut child = Command::new(binary)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.client_args)
            .args(["-q", &qos.to_string(), "-t", topic, "-l"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Starts tests/peers/`script` on `port` and waits for its "ready"; it takes commands on stdin.
fn start_python_peer(
    script: &str,
    port: u16,
    options: &[&str],
) -> (Child, ChildStdin, BufReader<ChildStdout>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(script);
    let mut child = Command::new(test_python())
        .arg(path)
        .arg(port.to_string())
        .args(options)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "{script} did not start");
    (child, stdin, stdout)
}

/// The pymodbus PLC of tests/peers/modbus_plc.py, driven through its stdin.
pub struct Plc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Plc {
    pub fn start(port: u16) -> Plc {
        let (child, stdin, stdout) = start_python_peer("modbus_plc.py", port, &[]);
        Plc {
            child,
            stdin,
            stdout,
        }
    }

    fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line
    }

    /// Sets 16-bit words (or bits) of a table from `address` on.
    pub fn set(&mut self, table: &str, address: u16, words: &[u16]) {
        let words: Vec<String> = words.iter().map(u16::to_string).collect();
        let reply = self.command(&format!("set {table} {address} {}", words.join(" ")));
        assert_eq!(reply.trim(), "ok");
    }

    /// Every function code the PLC was asked for.
    pub fn function_codes(&mut self) -> Vec<u8> {
        let reply: serde_json::Value = serde_json::from_str(&self.command("codes")).unwrap();
        serde_json::from_value(reply["codes"].clone()).unwrap()
    }

    pub fn stop(mut self) {
        super::terminate(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Plc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `scripts/test` installs tools built from crates.io (tansu).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("DIODE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/diode-tools")
        })
}

/// tansu, a Kafka-compatible broker, with in-memory storage.
pub struct Tansu {
    pub port: u16,
    child: Child,
}

impl Tansu {
    pub fn start(port: u16) -> Tansu {
        let installed = tools_dir().join("bin/tansu");
        let binary = if installed.is_file() {
            installed
        } else {
            require(
                "tansu",
                "cargo install tansu --version 0.6.0 --features dynostore --locked --root ~/.cache/diode-tools",
            )
        };
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tansu");
        assert!(
            wait_for(Duration::from_secs(20), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "tansu did not listen on {port}"
        );
        Tansu { port, child }
    }

    /// Reads `count` messages of `topic` from the start with kafka-python.
    pub fn consume(&self, topic: &str, count: usize) -> Vec<serde_json::Value> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/kafka_consume.py");
        let out = Command::new(test_python())
            .arg(script)
            .arg(format!("127.0.0.1:{}", self.port))
            .arg(topic)
            .arg(count.to_string())
            .arg("30")
            .output()
            .expect("running the Kafka consumer");
        assert!(
            out.status.success(),
            "kafka consumer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        super::terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "diode test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            (
                params.signed_by(&key, &ca).unwrap().pem(),
                key.serialize_pem(),
            )
        };
        let (server_cert, server_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], "broker");
        let (client_cert, client_key) = leaf(vec!["diode".into()], "diode");
        Pki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
        }
    }
}

/// The asyncua plant server of tests/peers/opcua_plant.py, driven through its stdin.
pub struct PlantServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub endpoint: String,
}

impl PlantServer {
    pub fn start(port: u16) -> PlantServer {
        Self::start_with(port, &[])
    }

    /// With the script's options (`--secure PKI_DIR`, `--user NAME:PASSWORD`).
    pub fn start_with(port: u16, options: &[&str]) -> PlantServer {
        let (child, stdin, stdout) = start_python_peer("opcua_plant.py", port, options);
        PlantServer {
            child,
            stdin,
            stdout,
            endpoint: format!("opc.tcp://127.0.0.1:{port}/"),
        }
    }

    /// One command, its JSON reply.
    pub fn command(&mut self, command: &str) -> serde_json::Value {
        writeln!(self.stdin, "{command}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{command}: {e}: {line:?}"))
    }

    pub fn stop(mut self) {
        super::terminate(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for PlantServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// tests/peers/opcua_client.py (asyncua's client) against `endpoint`: its one JSON line.
pub fn opcua_client(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![endpoint];
    all.extend_from_slice(args);
    opcua_client_with(&all)
}

/// tests/peers/opcua_client.py with these arguments (options first): its one JSON line.
pub fn opcua_client_with(args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/opcua_client.py");
    let output = Command::new(test_python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|_| {
        serde_json::json!({"error": format!("{stdout} {}", String::from_utf8_lossy(&output.stderr))})
    })
}
