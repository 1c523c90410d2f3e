//! A minimal FastCGI client: one request per connection, as a web server
//! talks to php-fpm. Just enough protocol to test the fpm layer.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const VERSION: u8 = 1;
const BEGIN_REQUEST: u8 = 1;
const END_REQUEST: u8 = 3;
const PARAMS: u8 = 4;
const STDIN: u8 = 5;
const STDOUT: u8 = 6;
const STDERR: u8 = 7;
const RESPONDER_ROLE: u16 = 1;
const REQUEST_ID: u16 = 1;
/// Largest content of one record.
const MAX_CONTENT: usize = 65_535;

/// What php-fpm sent back.
#[derive(Debug)]
pub struct Response {
    /// The CGI response: headers, a blank line, the body.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The application's exit status from FCGI_END_REQUEST.
    pub app_status: u32,
}

impl Response {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Sends one request with `params` and `body` over the unix socket and
/// reads the whole response.
pub fn request(socket: &Path, params: &[(&str, &str)], body: &[u8]) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;

    let mut begin = Vec::with_capacity(8);
    begin.extend_from_slice(&RESPONDER_ROLE.to_be_bytes());
    begin.extend_from_slice(&[0; 6]);
    write_record(&mut stream, BEGIN_REQUEST, &begin)?;

    let mut encoded = Vec::new();
    for (name, value) in params {
        encode_length(&mut encoded, name.len());
        encode_length(&mut encoded, value.len());
        encoded.extend_from_slice(name.as_bytes());
        encoded.extend_from_slice(value.as_bytes());
    }
    write_stream(&mut stream, PARAMS, &encoded)?;
    write_stream(&mut stream, STDIN, body)?;

    read_response(&mut stream)
}

fn read_response(stream: &mut UnixStream) -> io::Result<Response> {
    let mut response = Response {
        stdout: Vec::new(),
        stderr: Vec::new(),
        app_status: 0,
    };
    loop {
        let mut header = [0u8; 8];
        stream.read_exact(&mut header)?;
        let kind = header[1];
        let length = u16::from_be_bytes([header[4], header[5]]) as usize;
        let padding = header[6] as usize;
        let mut content = vec![0; length + padding];
        stream.read_exact(&mut content)?;
        content.truncate(length);
        match kind {
            STDOUT => response.stdout.extend_from_slice(&content),
            STDERR => response.stderr.extend_from_slice(&content),
            END_REQUEST => {
                let status: [u8; 4] = content
                    .get(..4)
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "FCGI_END_REQUEST shorter than 4 bytes")
                    })?;
                response.app_status = u32::from_be_bytes(status);
                return Ok(response);
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected FastCGI record type {other}"),
                ))
            }
        }
    }
}

/// Writes `data` as a stream of records, ended by an empty record.
fn write_stream(stream: &mut UnixStream, kind: u8, data: &[u8]) -> io::Result<()> {
    for chunk in data.chunks(MAX_CONTENT) {
        write_record(stream, kind, chunk)?;
    }
    write_record(stream, kind, &[])
}

fn write_record(stream: &mut UnixStream, kind: u8, content: &[u8]) -> io::Result<()> {
    let length = u16::try_from(content.len()).expect("records are chunked to 65535 bytes");
    let mut header = [VERSION, kind, 0, 0, 0, 0, 0, 0];
    header[2..4].copy_from_slice(&REQUEST_ID.to_be_bytes());
    header[4..6].copy_from_slice(&length.to_be_bytes());
    stream.write_all(&header)?;
    stream.write_all(content)
}

/// Appends a name-value pair length: one byte below 128, else four bytes
/// with the high bit set.
fn encode_length(out: &mut Vec<u8>, length: usize) {
    if length < 128 {
        out.push(length as u8);
    } else {
        let length = u32::try_from(length).expect("FastCGI lengths fit in 31 bits") | 0x8000_0000;
        out.extend_from_slice(&length.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_one_or_four_bytes() {
        let mut out = Vec::new();
        encode_length(&mut out, 5);
        encode_length(&mut out, 300);
        assert_eq!(out, [5, 0x80, 0, 1, 44]);
    }
}
