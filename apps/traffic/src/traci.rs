//! A minimal TraCI client (SUMO's Traffic Control Interface) over TCP, written from the
//! protocol description: big-endian; a message is an `int32` total length followed by
//! commands; a command is `ubyte length` (or `0` + `int32 length` when longer than 255),
//! `ubyte id`, content. SUMO answers every command with a status command
//! (`ubyte result`, `string description`), then, for "get" commands, a response command
//! (`id | 0x10`, variable, object id, type, value).
//!
//! Only what the traffic loop needs: [`Client::step`], vehicle id list / position /
//! class / speed / lane, traffic light state get and set, simulation time and expected
//! vehicles, [`Client::close`]. Gets can be batched into one round trip
//! ([`Client::get_many`]). Encoding and decoding are plain functions over byte buffers
//! ([`encode_message`], [`Reader`]), unit-tested without SUMO.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::{Error, Result};

pub const CMD_GETVERSION: u8 = 0x00;
pub const CMD_SIMSTEP: u8 = 0x02;
pub const CMD_CLOSE: u8 = 0x7F;
pub const CMD_GET_TL_VARIABLE: u8 = 0xa2;
pub const CMD_GET_VEHICLE_VARIABLE: u8 = 0xa4;
pub const CMD_GET_SIM_VARIABLE: u8 = 0xab;
pub const CMD_SET_TL_VARIABLE: u8 = 0xc2;

pub const ID_LIST: u8 = 0x00;
pub const VAR_SPEED: u8 = 0x40;
pub const VAR_POSITION: u8 = 0x42;
pub const VAR_ANGLE: u8 = 0x43;
pub const VAR_VEHICLECLASS: u8 = 0x49;
pub const VAR_LANE_ID: u8 = 0x51;
pub const TL_RED_YELLOW_GREEN_STATE: u8 = 0x20;
pub const TL_CURRENT_PHASE: u8 = 0x28;
pub const VAR_TIME: u8 = 0x66;
pub const VAR_MIN_EXPECTED_VEHICLES: u8 = 0x7d;

pub const TYPE_POSITION2D: u8 = 0x01;
pub const TYPE_UBYTE: u8 = 0x08;
pub const TYPE_INTEGER: u8 = 0x09;
pub const TYPE_DOUBLE: u8 = 0x0B;
pub const TYPE_STRING: u8 = 0x0C;
pub const TYPE_STRINGLIST: u8 = 0x0E;

/// Largest message we accept from SUMO (a sanity bound, not a protocol limit).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A value in a TraCI response.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i32),
    Double(f64),
    Str(String),
    StrList(Vec<String>),
    Pos(f64, f64),
    UByte(u8),
}

impl Value {
    pub fn as_f64(&self) -> Result<f64> {
        match self {
            Value::Double(d) => Ok(*d),
            Value::Int(i) => Ok(*i as f64),
            o => Err(proto(format!("expected a number, got {o:?}"))),
        }
    }

    pub fn as_i32(&self) -> Result<i32> {
        match self {
            Value::Int(i) => Ok(*i),
            o => Err(proto(format!("expected an integer, got {o:?}"))),
        }
    }

    pub fn into_string(self) -> Result<String> {
        match self {
            Value::Str(s) => Ok(s),
            o => Err(proto(format!("expected a string, got {o:?}"))),
        }
    }

    pub fn into_list(self) -> Result<Vec<String>> {
        match self {
            Value::StrList(l) => Ok(l),
            o => Err(proto(format!("expected a string list, got {o:?}"))),
        }
    }

    pub fn as_pos(&self) -> Result<(f64, f64)> {
        match self {
            Value::Pos(x, y) => Ok((*x, *y)),
            o => Err(proto(format!("expected a 2D position, got {o:?}"))),
        }
    }
}

fn proto(msg: String) -> Error {
    Error::Traci(msg)
}

/// One command: id and content bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: u8,
    pub content: Vec<u8>,
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl Command {
    /// `get` of `var` on object `object` (domain command id `cmd`).
    pub fn get(cmd: u8, var: u8, object: &str) -> Command {
        let mut content = vec![var];
        put_string(&mut content, object);
        Command { id: cmd, content }
    }

    pub fn set_string(cmd: u8, var: u8, object: &str, value: &str) -> Command {
        let mut content = vec![var];
        put_string(&mut content, object);
        content.push(TYPE_STRING);
        put_string(&mut content, value);
        Command { id: cmd, content }
    }

    pub fn step(target_time: f64) -> Command {
        Command {
            id: CMD_SIMSTEP,
            content: target_time.to_be_bytes().to_vec(),
        }
    }
}

/// Encode commands into one message.
pub fn encode_message(cmds: &[Command]) -> Vec<u8> {
    let mut body = Vec::new();
    for c in cmds {
        let short = c.content.len() + 2;
        if short <= 255 {
            body.push(short as u8);
        } else {
            body.push(0);
            body.extend_from_slice(&((c.content.len() + 6) as u32).to_be_bytes());
        }
        body.push(c.id);
        body.extend_from_slice(&c.content);
    }
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// Cursor over a response message body.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(proto(format!(
                "response truncated: need {n} bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn i32(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn f64(&mut self) -> Result<f64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_be_bytes(a))
    }

    pub fn string(&mut self) -> Result<String> {
        let n = self.i32()?;
        if n < 0 || n as usize > self.remaining() {
            return Err(proto(format!("bad string length {n}")));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| proto("string is not UTF-8".into()))
    }

    pub fn value(&mut self) -> Result<Value> {
        let t = self.u8()?;
        Ok(match t {
            TYPE_INTEGER => Value::Int(self.i32()?),
            TYPE_DOUBLE => Value::Double(self.f64()?),
            TYPE_STRING => Value::Str(self.string()?),
            TYPE_UBYTE => Value::UByte(self.u8()?),
            TYPE_POSITION2D => Value::Pos(self.f64()?, self.f64()?),
            TYPE_STRINGLIST => {
                let n = self.i32()?;
                if n < 0 || n as usize > self.remaining() / 4 {
                    return Err(proto(format!("bad string list length {n}")));
                }
                (0..n)
                    .map(|_| self.string())
                    .collect::<Result<Vec<_>>>()
                    .map(Value::StrList)?
            }
            other => return Err(proto(format!("unsupported value type 0x{other:02x}"))),
        })
    }

    /// Command header: returns (id, content length).
    pub fn command_header(&mut self) -> Result<(u8, usize)> {
        let l = self.u8()? as usize;
        let (len, header) = if l == 0 {
            (self.i32()? as usize, 6)
        } else {
            (l, 2)
        };
        if len < header || len - header + 1 > self.remaining() {
            return Err(proto(format!("bad command length {len}")));
        }
        let id = self.u8()?;
        Ok((id, len - header))
    }

    /// Status response to command `expect`.
    pub fn status(&mut self, expect: u8) -> Result<()> {
        let (id, _) = self.command_header()?;
        let result = self.u8()?;
        let desc = self.string()?;
        if id != expect {
            return Err(proto(format!(
                "status for command 0x{id:02x}, expected 0x{expect:02x}"
            )));
        }
        if result != 0 {
            return Err(Error::Traci(format!(
                "SUMO refused command 0x{expect:02x}: {desc}"
            )));
        }
        Ok(())
    }

    /// Response to a get command: checks ids, returns the value.
    pub fn get_response(&mut self, cmd: u8, var: u8) -> Result<Value> {
        let (id, _) = self.command_header()?;
        let v = self.u8()?;
        let _object = self.string()?;
        if id != cmd | 0x10 || v != var {
            return Err(proto(format!(
                "response 0x{id:02x}/0x{v:02x} to get 0x{cmd:02x}/0x{var:02x}"
            )));
        }
        self.value()
    }
}

/// A connected TraCI client.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
}

impl Client {
    /// Connect to SUMO on `127.0.0.1:port`, retrying while SUMO starts (up to `wait`).
    pub fn connect(port: u16, wait: Duration) -> Result<Client> {
        let start = std::time::Instant::now();
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => {
                    stream
                        .set_nodelay(true)
                        .map_err(|e| Error::Traci(e.to_string()))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .map_err(|e| Error::Traci(e.to_string()))?;
                    return Ok(Client { stream });
                }
                Err(e) if start.elapsed() < wait => {
                    tracing::debug!("waiting for SUMO on port {port}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(Error::Traci(format!(
                        "could not connect to SUMO on 127.0.0.1:{port} within {wait:?}: {e}"
                    )))
                }
            }
        }
    }

    /// Send commands, read the whole answer message.
    fn exchange(&mut self, cmds: &[Command]) -> Result<Vec<u8>> {
        let io = |e: std::io::Error| Error::Traci(format!("connection to SUMO: {e}"));
        self.stream.write_all(&encode_message(cmds)).map_err(io)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(io)?;
        let len = u32::from_be_bytes(len) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(proto(format!("answer length {len} out of range")));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).map_err(io)?;
        Ok(body)
    }

    /// TraCI API version and SUMO's version string.
    pub fn version(&mut self) -> Result<(i32, String)> {
        let body = self.exchange(&[Command {
            id: CMD_GETVERSION,
            content: vec![],
        }])?;
        let mut r = Reader::new(&body);
        r.status(CMD_GETVERSION)?;
        let (id, _) = r.command_header()?;
        if id != CMD_GETVERSION {
            return Err(proto(format!("version answer has id 0x{id:02x}")));
        }
        Ok((r.i32()?, r.string()?))
    }

    /// Advance the simulation one step.
    pub fn step(&mut self) -> Result<()> {
        let body = self.exchange(&[Command::step(0.0)])?;
        let mut r = Reader::new(&body);
        r.status(CMD_SIMSTEP)?;
        let subscriptions = r.i32()?;
        if subscriptions != 0 {
            return Err(proto(format!(
                "{subscriptions} subscription results, none subscribed"
            )));
        }
        Ok(())
    }

    /// Several gets `(domain, variable, object)` in one round trip.
    pub fn get_many(&mut self, gets: &[(u8, u8, &str)]) -> Result<Vec<Value>> {
        if gets.is_empty() {
            return Ok(vec![]);
        }
        let cmds: Vec<Command> = gets
            .iter()
            .map(|(c, v, o)| Command::get(*c, *v, o))
            .collect();
        let body = self.exchange(&cmds)?;
        let mut r = Reader::new(&body);
        gets.iter()
            .map(|(c, v, _)| {
                r.status(*c)?;
                r.get_response(*c, *v)
            })
            .collect()
    }

    pub fn get(&mut self, cmd: u8, var: u8, object: &str) -> Result<Value> {
        let mut v = self.get_many(&[(cmd, var, object)])?;
        v.pop().ok_or_else(|| proto("empty answer".into()))
    }

    pub fn time(&mut self) -> Result<f64> {
        self.get(CMD_GET_SIM_VARIABLE, VAR_TIME, "")?.as_f64()
    }

    /// Vehicles still running or waiting to depart.
    pub fn min_expected(&mut self) -> Result<i32> {
        self.get(CMD_GET_SIM_VARIABLE, VAR_MIN_EXPECTED_VEHICLES, "")?
            .as_i32()
    }

    pub fn vehicle_ids(&mut self) -> Result<Vec<String>> {
        self.get(CMD_GET_VEHICLE_VARIABLE, ID_LIST, "")?.into_list()
    }

    pub fn tl_state(&mut self, tls: &str) -> Result<String> {
        self.get(CMD_GET_TL_VARIABLE, TL_RED_YELLOW_GREEN_STATE, tls)?
            .into_string()
    }

    pub fn tl_phase(&mut self, tls: &str) -> Result<i32> {
        self.get(CMD_GET_TL_VARIABLE, TL_CURRENT_PHASE, tls)?
            .as_i32()
    }

    /// Set the full signal state string of a traffic light (one char per link).
    pub fn set_tl_state(&mut self, tls: &str, state: &str) -> Result<()> {
        let cmd = Command::set_string(CMD_SET_TL_VARIABLE, TL_RED_YELLOW_GREEN_STATE, tls, state);
        let body = self.exchange(&[cmd])?;
        Reader::new(&body).status(CMD_SET_TL_VARIABLE)
    }

    /// Set the phase index of the traffic light's current program.
    pub fn set_tl_phase(&mut self, tls: &str, phase: i32) -> Result<()> {
        let mut content = vec![0x22];
        put_string(&mut content, tls);
        content.push(TYPE_INTEGER);
        content.extend_from_slice(&phase.to_be_bytes());
        let body = self.exchange(&[Command {
            id: CMD_SET_TL_VARIABLE,
            content,
        }])?;
        Reader::new(&body).status(CMD_SET_TL_VARIABLE)
    }

    /// End the simulation (SUMO writes its outputs and exits).
    pub fn close(mut self) -> Result<()> {
        let body = self.exchange(&[Command {
            id: CMD_CLOSE,
            content: vec![],
        }])?;
        Reader::new(&body).status(CMD_CLOSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_short_and_long_commands() {
        let m = encode_message(&[Command::get(CMD_GET_VEHICLE_VARIABLE, VAR_SPEED, "v1")]);
        assert_eq!(m, vec![0, 0, 0, 13, 9, 0xa4, 0x40, 0, 0, 0, 2, b'v', b'1']);
        let long = "x".repeat(300);
        let m = encode_message(&[Command::get(CMD_GET_VEHICLE_VARIABLE, VAR_SPEED, &long)]);
        // 4 total + 1 zero + 4 len + 1 id + 1 var + 4 strlen + 300
        assert_eq!(m.len(), 315);
        assert_eq!(&m[4..10], &[0, 0, 0, 1, 55, 0xa4]);
    }

    fn status_bytes(id: u8, result: u8, desc: &str) -> Vec<u8> {
        let mut b = vec![(2 + 1 + 4 + desc.len()) as u8, id, result];
        put_string(&mut b, desc);
        b
    }

    #[test]
    fn decodes_status_and_get_responses() {
        let mut body = status_bytes(CMD_GET_VEHICLE_VARIABLE, 0, "");
        let mut resp = vec![0xb4, VAR_POSITION];
        put_string(&mut resp, "v1");
        resp.push(TYPE_POSITION2D);
        resp.extend_from_slice(&1.5f64.to_be_bytes());
        resp.extend_from_slice(&(-2.0f64).to_be_bytes());
        body.push((resp.len() + 1) as u8);
        body.extend_from_slice(&resp);
        let mut r = Reader::new(&body);
        r.status(CMD_GET_VEHICLE_VARIABLE).unwrap();
        let v = r
            .get_response(CMD_GET_VEHICLE_VARIABLE, VAR_POSITION)
            .unwrap();
        assert_eq!(v, Value::Pos(1.5, -2.0));
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn errors_are_reported_not_panics() {
        let body = status_bytes(CMD_SET_TL_VARIABLE, 0xff, "no such light");
        let e = Reader::new(&body).status(CMD_SET_TL_VARIABLE).unwrap_err();
        assert!(e.to_string().contains("no such light"), "{e}");
        // Truncated and lying lengths.
        for bad in [
            vec![],
            vec![9, 0xb4],
            vec![0, 0xff, 0xff, 0xff, 0xff, 1],
            vec![7, 0xa4, 0, 0x7f, 0xff, 0xff, 0xff],
        ] {
            let mut r = Reader::new(&bad);
            assert!(r.status(0xa4).is_err());
        }
        let mut list = vec![TYPE_STRINGLIST];
        list.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(Reader::new(&list).value().is_err());
    }
}
