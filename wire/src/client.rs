//! A blocking JSON-RPC client over the daemon's Unix socket, one JSON object
//! per line: what `modelctl` and the end-to-end tests speak.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::RpcErrorObject;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running.
    #[error("modeld is not running (no daemon at {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("connection to modeld failed: {0}")]
    Io(#[from] io::Error),
    #[error("modeld closed the connection")]
    Closed,
    #[error("unexpected reply from modeld: {0}")]
    Protocol(String),
    #[error("{0}")]
    Rpc(RpcErrorObject),
}

impl ClientError {
    /// The daemon's `data.kind`, for callers that branch on error kinds.
    pub fn kind(&self) -> Option<&str> {
        match self {
            ClientError::Rpc(err) => err.kind(),
            _ => None,
        }
    }
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Notifications that arrived while a call waited for its response.
    pending: VecDeque<Value>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.to_path_buf(),
            },
            _ => ClientError::Connect {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let writer = stream.try_clone()?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            pending: VecDeque::new(),
        })
    }

    /// Bounds every read; `None` waits forever (the default).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.writer.set_read_timeout(timeout)
    }

    /// Calls `method` and decodes its result.
    pub fn call<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: impl Serialize,
    ) -> Result<R, ClientError> {
        let value = self.call_value(method, serde_json::to_value(params).map_err(protocol)?)?;
        serde_json::from_value(value).map_err(protocol)
    }

    /// Calls `method` and returns its result as raw JSON.
    pub fn call_value(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_line(&request.to_string())?;
        self.wait_for(id)
    }

    /// Sends one raw line (a newline is appended) and returns nothing: for
    /// tests that need to send malformed input.
    pub fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        Ok(())
    }

    /// Reads the next message of any sort from the socket.
    pub fn read_message(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        serde_json::from_str(&line).map_err(protocol)
    }

    /// Subscribes with `method`; the returned iterator yields each
    /// notification's `result` until the daemon closes the subscription.
    pub fn subscribe(
        &mut self,
        method: &str,
        params: impl Serialize,
    ) -> Result<Subscription<'_>, ClientError> {
        let id: Value = self.call(method, params)?;
        Ok(Subscription {
            client: self,
            id,
            finished: false,
        })
    }

    fn wait_for(&mut self, id: u64) -> Result<Value, ClientError> {
        loop {
            let message = self.read_message()?;
            if message.get("id").and_then(Value::as_u64) == Some(id) {
                return response_result(message);
            }
            if message.get("method").is_some() {
                self.pending.push_back(message);
                continue;
            }
            return Err(ClientError::Protocol(format!(
                "response for another request: {message}"
            )));
        }
    }

    fn next_notification(&mut self) -> Result<Value, ClientError> {
        match self.pending.pop_front() {
            Some(message) => Ok(message),
            None => self.read_message(),
        }
    }
}

fn protocol(err: serde_json::Error) -> ClientError {
    ClientError::Protocol(err.to_string())
}

fn response_result(mut message: Value) -> Result<Value, ClientError> {
    if let Some(error) = message.get_mut("error") {
        let error: RpcErrorObject = serde_json::from_value(error.take()).map_err(protocol)?;
        return Err(ClientError::Rpc(error));
    }
    match message.get_mut("result") {
        Some(result) => Ok(result.take()),
        None => Err(ClientError::Protocol(format!(
            "response without result: {message}"
        ))),
    }
}

/// The notifications of one subscription, in order.
pub struct Subscription<'a> {
    client: &'a mut Client,
    id: Value,
    /// Set once a result marked `"done": true` has been returned.
    finished: bool,
}

impl Subscription<'_> {
    pub fn id(&self) -> &Value {
        &self.id
    }

    /// The next notification's result; `Ok(None)` once the socket ends or
    /// after the result marked `"done": true` that finishes a stream.
    pub fn next_result(&mut self) -> Result<Option<Value>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            let mut message = match self.client.next_notification() {
                Ok(message) => message,
                Err(ClientError::Closed) => return Ok(None),
                Err(err) => return Err(err),
            };
            let params = message.get_mut("params").map(Value::take);
            let Some(mut params) = params else { continue };
            if params.get("subscription") != Some(&self.id) {
                continue;
            }
            if let Some(error) = params.get_mut("error") {
                let error = serde_json::from_value(error.take()).map_err(protocol)?;
                return Err(ClientError::Rpc(error));
            }
            let result = params.get_mut("result").map(Value::take);
            self.finished = result
                .as_ref()
                .is_some_and(|r| r.get("done") == Some(&Value::Bool(true)));
            return Ok(result);
        }
    }
}

impl Iterator for Subscription<'_> {
    type Item = Result<Value, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_result().transpose()
    }
}
