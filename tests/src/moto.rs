//! moto_server, the AWS emulator that the publish tests and the publish
//! benchmark run on 127.0.0.1.
//!
//! moto does not check signatures, but it reads the region from the
//! credential scope of the Authorization header. The requests sent from
//! here carry such a header with a dummy signature, so a test can read
//! what the task published in each region without an AWS SDK.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Maximum time moto_server may take to listen after its start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A moto_server process on a port of 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    address: SocketAddr,
}

impl Moto {
    /// Starts `program`, a moto_server, on a port of 127.0.0.1 that the
    /// system chooses, and waits until it listens.
    pub fn start(program: &Path) -> Result<Moto> {
        let mut child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", program.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        // From here on, dropping `moto` kills the process.
        let mut moto = Moto {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        // Werkzeug prints " * Running on http://127.0.0.1:PORT" once it
        // listens, then a line per request: the thread reads them all, so
        // that moto never blocks on a full pipe.
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split_once("Running on http://127.0.0.1:")
                    .and_then(|(_, port)| port.trim().parse::<u16>().ok())
                {
                    let _ = sender.send(port);
                }
            }
        });
        match receiver.recv_timeout(START_TIMEOUT) {
            Ok(port) => moto.address.set_port(port),
            Err(RecvTimeoutError::Disconnected) => {
                let status = moto.child.wait()?;
                bail!("{} exited with {status} before it listened", program.display());
            }
            Err(RecvTimeoutError::Timeout) => bail!(
                "{} did not listen within {} s",
                program.display(),
                START_TIMEOUT.as_secs()
            ),
        }
        Ok(moto)
    }

    /// Returns the address that moto listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sends a request of the Lambda API, signed for `region`, and returns
    /// the status and the JSON body (`Value::Null` when the body is not
    /// JSON).
    pub fn request(&self, region: &str, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
        let mut stream = TcpStream::connect(self.address)
            .with_context(|| format!("failed to connect to moto at {}", self.address))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20261205/{region}/lambda/aws4_request, \
             SignedHeaders=host, Signature=0\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .with_context(|| format!("failed to read moto's response to {method} {path}"))?;
        let status = response
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("moto's response to {method} {path} has no status line: {response:?}"))?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
    }

    /// GETs a path of the Lambda API in `region`.
    pub fn get(&self, region: &str, path: &str) -> Result<(u16, Value)> {
        self.request(region, "GET", path, "")
    }

    /// Lists the layers of each region once, so that moto creates each
    /// region's Lambda backend now, and returns the time of each request.
    /// AWS regions have no such set-up, so a timed run should not include
    /// it.
    pub fn warm_up<'a>(&self, regions: impl IntoIterator<Item = &'a str>) -> Result<Vec<Duration>> {
        let mut times = Vec::new();
        for region in regions {
            let started = Instant::now();
            let (status, body) = self.get(region, "/2018-10-31/layers")?;
            if status != 200 {
                bail!("moto returned status {status} for the layer list of {region}: {body}");
            }
            times.push(started.elapsed());
        }
        Ok(times)
    }
}

/// Points `command`, a `cargo xtask publish` command, at the emulator behind
/// `endpoint`, with the zips of `dist` and the table `dist/layers.json`,
/// and without the user's AWS configuration.
pub fn aim_at_emulator(command: &mut Command, endpoint: &str, dist: &Path) {
    without_aws_configuration(command);
    command
        .arg("--endpoint-url")
        .arg(endpoint)
        .arg("--out-dir")
        .arg(dist)
        .arg("--table")
        .arg(dist.join("layers.json"));
}

/// Removes every `AWS_*` variable of this process (credentials, profile,
/// region, endpoints) from `command`'s environment, and points it away from
/// the user's AWS files and the instance metadata service, so that only
/// what the caller sets reaches the program.
pub fn without_aws_configuration(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    command
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
