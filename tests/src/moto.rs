//! moto_server, the AWS emulator that the publish tests and the publish
//! benchmark run on 127.0.0.1.
//!
//! moto does not check signatures, but it reads the region from the
//! credential scope of the Authorization header. The requests sent from
//! here carry such a header with a dummy signature, so a test can read
//! what the task published in each region without an AWS SDK.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Maximum time moto_server may take to listen after its start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A moto_server process on a free port of 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    address: SocketAddr,
}

impl Moto {
    /// Starts `program`, a moto_server, on a free port of 127.0.0.1 and
    /// waits until it accepts connections.
    pub fn start(program: &Path) -> Result<Moto> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("failed to find a free port of 127.0.0.1 for moto_server")?
            .port();
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("failed to start {}", program.display()))?;
        // From here on, dropping `moto` kills the process.
        let mut moto = Moto {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(moto.address).is_err() {
            if let Some(status) = moto.child.try_wait()? {
                bail!(
                    "{} exited with {status} before it listened on {}",
                    program.display(),
                    moto.address
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} within {} s",
                    program.display(),
                    moto.address,
                    START_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
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
    /// region's Lambda backend now. On this machine that took about 13 ms
    /// per region, and 200 ms for moto's first request. AWS regions have no
    /// such cost, so a timed run should not include it.
    pub fn warm_up<'a>(&self, regions: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for region in regions {
            let (status, body) = self.get(region, "/2018-10-31/layers")?;
            if status != 200 {
                bail!("moto returned status {status} for the layer list of {region}: {body}");
            }
        }
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
