//! Newline framing with a length limit. A line over the limit is reported
//! once and skipped up to its newline, so the connection stays usable.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Line(BytesMut),
    /// A line longer than the limit was dropped.
    TooLong,
}

pub struct LineCodec {
    max_len: usize,
    /// Skipping the rest of an oversized line.
    discarding: bool,
    /// Bytes already searched for a newline, so a slow line is not rescanned.
    scanned: usize,
}

impl LineCodec {
    pub fn new(max_len: usize) -> Self {
        LineCodec {
            max_len,
            discarding: false,
            scanned: 0,
        }
    }
}

impl Decoder for LineCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        loop {
            let newline = buf[self.scanned..].iter().position(|&b| b == b'\n');
            match (newline, self.discarding) {
                (Some(offset), true) => {
                    buf.advance(self.scanned + offset + 1);
                    self.scanned = 0;
                    self.discarding = false;
                }
                (Some(offset), false) => {
                    let end = self.scanned + offset;
                    self.scanned = 0;
                    if end > self.max_len {
                        buf.advance(end + 1);
                        return Ok(Some(Frame::TooLong));
                    }
                    let mut line = buf.split_to(end + 1);
                    line.truncate(end);
                    return Ok(Some(Frame::Line(line)));
                }
                (None, true) => {
                    buf.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                (None, false) if buf.len() > self.max_len => {
                    buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    return Ok(Some(Frame::TooLong));
                }
                (None, false) => {
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        // A last request without its newline is still a request.
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if !buf.is_empty() && !self.discarding => {
                self.scanned = 0;
                Ok(Some(Frame::Line(buf.split())))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(codec: &mut LineCodec, buf: &mut BytesMut) -> Vec<Frame> {
        std::iter::from_fn(|| codec.decode(buf).unwrap()).collect()
    }

    #[test]
    fn splits_lines_and_keeps_partial_ones() {
        let mut codec = LineCodec::new(16);
        let mut buf = BytesMut::from(&b"one\ntwo\nthr"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            [Frame::Line("one".into()), Frame::Line("two".into())]
        );
        buf.extend_from_slice(b"ee\n");
        assert_eq!(frames(&mut codec, &mut buf), [Frame::Line("three".into())]);
    }

    #[test]
    fn oversized_line_is_reported_once_then_skipped() {
        let mut codec = LineCodec::new(4);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert_eq!(frames(&mut codec, &mut buf), [Frame::TooLong]);
        buf.extend_from_slice(b"still the same line\nok\n");
        assert_eq!(frames(&mut codec, &mut buf), [Frame::Line("ok".into())]);
        let mut buf = BytesMut::from(&b"toolong\nok\n"[..]);
        assert_eq!(
            frames(&mut codec, &mut buf),
            [Frame::TooLong, Frame::Line("ok".into())]
        );
    }

    #[test]
    fn last_line_without_newline_is_delivered_at_eof() {
        let mut codec = LineCodec::new(16);
        let mut buf = BytesMut::from(&b"tail"[..]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert_eq!(
            codec.decode_eof(&mut buf).unwrap(),
            Some(Frame::Line("tail".into()))
        );
    }
}
