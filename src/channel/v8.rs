//! Node's `advanced` channel serialization: V8 `ValueSerializer` format (version 15), framed by a
//! big-endian `u32` length (`shared/node-ipc.md` §7), for the values lb's messages use.
//!
//! Decoding covers what `process.send()` produces for plain data — objects, dense and sparse
//! arrays, one- and two-byte strings, small integers, doubles, booleans, `null`, `undefined`,
//! back-references, `Buffer`s and typed arrays (Node's host-object form), plus `Date`, `BigInt`,
//! `RegExp`, `Map`, `Set`, `ArrayBuffer` and boxed primitives — into a `serde_json::Value`
//! (binary becomes `{"type":"Buffer","data":[…]}`, what json mode would have carried). Anything
//! else is an error: the message is dropped and counted, never a panic. lb relays socket.io
//! adapter messages as the bytes it received, so nothing is lost by this conversion.
//!
//! Encoding turns lb's own messages (JSON objects, arrays, strings, numbers, booleans, null) into
//! a frame Node's deserializer reads back as the same values.

use serde_json::{Map, Number, Value};

/// A decoding failure (the frame is dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("V8 value: {0}")]
pub struct DecodeError(&'static str);

/// Deepest nesting accepted (a hostile frame cannot exhaust the stack).
const MAX_DEPTH: usize = 128;

/// Decodes one frame's payload (after the length prefix): header, then one value.
pub fn decode(payload: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader {
        b: payload,
        i: 0,
        objects: Vec::new(),
    };
    if r.byte()? != 0xFF {
        return Err(DecodeError("no header"));
    }
    let _version = r.varint()?;
    r.value(0)
}

/// Encodes `v` as one frame: the `u32` length, the header, the value.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0, 0xFF, 0x0F];
    write_value(&mut out, v);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    /// Values that back-references (`^id`) may name, in the order their ids were assigned.
    objects: Vec<Value>,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.b.get(self.i).ok_or(DecodeError("truncated"))?;
        self.i += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .i
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let s = self.b.get(self.i..end).ok_or(DecodeError("truncated"))?;
        self.i = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError("varint too long"))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.b.len())
            .ok_or(DecodeError("length past the frame"))
    }

    fn double(&mut self) -> Result<f64, DecodeError> {
        let b = self.bytes(8)?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A string value (one-byte, two-byte or UTF-8), after optional padding.
    fn string(&mut self) -> Result<String, DecodeError> {
        match self.value_tag()? {
            b'"' => {
                let n = self.len()?;
                Ok(self.bytes(n)?.iter().map(|&c| char::from(c)).collect())
            }
            b'c' => {
                let n = self.len()?;
                let raw = self.bytes(n)?;
                let units: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Ok(String::from_utf16_lossy(&units))
            }
            b'S' => {
                let n = self.len()?;
                Ok(String::from_utf8_lossy(self.bytes(n)?).into_owned())
            }
            _ => Err(DecodeError("expected a string")),
        }
    }

    /// The next tag, skipping padding and the version/verify-count markers.
    fn value_tag(&mut self) -> Result<u8, DecodeError> {
        loop {
            match self.byte()? {
                0x00 => continue, // padding
                b'?' => {
                    self.varint()?; // verify object count
                }
                t => return Ok(t),
            }
        }
    }

    fn number(v: f64) -> Value {
        Number::from_f64(v).map_or(Value::Null, Value::Number)
    }

    fn key(&mut self, depth: usize) -> Result<String, DecodeError> {
        Ok(match self.value(depth)? {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// Properties until `end`, then the property count.
    fn properties(
        &mut self,
        map: &mut Map<String, Value>,
        end: u8,
        depth: usize,
    ) -> Result<(), DecodeError> {
        loop {
            if self.b.get(self.i) == Some(&end) {
                self.i += 1;
                self.varint()?;
                return Ok(());
            }
            let k = self.key(depth)?;
            let v = self.value(depth)?;
            map.insert(k, v);
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError("nested too deep"));
        }
        let depth = depth + 1;
        let tag = self.value_tag()?;
        Ok(match tag {
            b'_' | b'0' | b'-' => Value::Null,
            b'T' => Value::Bool(true),
            b'F' => Value::Bool(false),
            b'I' => {
                let z = self.varint()?;
                let n = ((z >> 1) as i64) ^ -((z & 1) as i64);
                Value::from(n)
            }
            b'U' => Value::from(self.varint()?),
            b'N' => Self::number(self.double()?),
            b'"' | b'c' | b'S' => {
                self.i -= 1;
                Value::String(self.string()?)
            }
            b'Z' => {
                let bits = self.varint()?;
                let n = usize::try_from(bits / 2).map_err(|_| DecodeError("bigint"))?;
                let digits = self.bytes(n)?;
                Value::String(format!("bigint:{}", hex(digits)))
            }
            b'D' => Self::number(self.double()?),
            b'y' => Value::Bool(true),
            b'x' => Value::Bool(false),
            b'n' => Self::number(self.double()?),
            b'z' => {
                let bits = self.varint()?;
                let n = usize::try_from(bits / 2).map_err(|_| DecodeError("bigint"))?;
                Value::String(format!("bigint:{}", hex(self.bytes(n)?)))
            }
            b's' => Value::String(self.string()?),
            b'R' => {
                let src = self.string()?;
                self.varint()?; // flags
                Value::String(src)
            }
            b'^' => {
                let id = usize::try_from(self.varint()?).map_err(|_| DecodeError("ref"))?;
                self.objects
                    .get(id)
                    .cloned()
                    .ok_or(DecodeError("back-reference to an unknown object"))?
            }
            b'o' => {
                let id = self.reserve();
                let mut map = Map::new();
                self.properties(&mut map, b'{', depth)?;
                self.fill(id, Value::Object(map))
            }
            b'A' => {
                let id = self.reserve();
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    // A hole in a dense array is written as `-`.
                    items.push(self.value(depth)?);
                }
                let mut extra = Map::new();
                self.properties(&mut extra, b'$', depth)?;
                self.varint()?; // length again
                self.fill(id, Value::Array(items))
            }
            b'a' => {
                let id = self.reserve();
                let n = self.len()?;
                let mut items = vec![Value::Null; n.min(1 << 20)];
                let mut props = Map::new();
                self.properties(&mut props, b'@', depth)?;
                self.varint()?; // length again
                for (k, v) in props {
                    if let Ok(i) = k.parse::<usize>()
                        && i < items.len()
                    {
                        items[i] = v;
                    }
                }
                self.fill(id, Value::Array(items))
            }
            b';' => {
                let id = self.reserve();
                let mut pairs = Vec::new();
                while self.b.get(self.i) != Some(&b':') {
                    let k = self.value(depth)?;
                    let v = self.value(depth)?;
                    pairs.push(Value::Array(vec![k, v]));
                }
                self.i += 1;
                self.varint()?;
                self.fill(id, Value::Array(pairs))
            }
            b'\'' => {
                let id = self.reserve();
                let mut items = Vec::new();
                while self.b.get(self.i) != Some(&b',') {
                    items.push(self.value(depth)?);
                }
                self.i += 1;
                self.varint()?;
                self.fill(id, Value::Array(items))
            }
            b'B' => {
                let id = self.reserve();
                let n = self.len()?;
                let data = self.bytes(n)?.to_vec();
                self.fill(id, buffer_json(&data))
            }
            b'\\' => {
                // Node's host object: 0 = an ArrayBufferView (type index, byte length, bytes),
                // 1 = another host object written as a plain object.
                let id = self.reserve();
                match self.varint()? {
                    0 => {
                        let _type_index = self.varint()?;
                        let n = self.len()?;
                        let data = self.bytes(n)?.to_vec();
                        self.fill(id, buffer_json(&data))
                    }
                    1 => {
                        let v = self.value(depth)?;
                        self.fill(id, v)
                    }
                    _ => return Err(DecodeError("unknown host object")),
                }
            }
            _ => return Err(DecodeError("unsupported value type")),
        })
    }

    /// Assigns the next object id (before the object's contents, as V8 does).
    fn reserve(&mut self) -> usize {
        self.objects.push(Value::Null);
        self.objects.len() - 1
    }

    fn fill(&mut self, id: usize, v: Value) -> Value {
        self.objects[id] = v.clone();
        v
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What json mode would have carried for binary data.
fn buffer_json(data: &[u8]) -> Value {
    serde_json::json!({"type": "Buffer", "data": data})
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    if s.chars().all(|c| u32::from(c) <= 0xFF) {
        out.push(b'"');
        write_varint(out, s.chars().count() as u64);
        out.extend(s.chars().map(|c| c as u8));
    } else {
        let units: Vec<u16> = s.encode_utf16().collect();
        let n = (units.len() * 2) as u64;
        // V8 aligns two-byte data on an even offset of the payload (the frame's 4-byte length
        // prefix keeps the parity).
        let mut varint = Vec::new();
        write_varint(&mut varint, n);
        if (out.len() + 1 + varint.len()) % 2 == 1 {
            out.push(0x00);
        }
        out.push(b'c');
        out.extend(varint);
        for u in units {
            out.extend(u.to_le_bytes());
        }
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(b'0'),
        Value::Bool(true) => out.push(b'T'),
        Value::Bool(false) => out.push(b'F'),
        Value::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => {
                out.push(b'I');
                write_varint(out, ((i << 1) ^ (i >> 31)) as u32 as u64);
            }
            None => {
                out.push(b'N');
                out.extend(n.as_f64().unwrap_or(0.0).to_le_bytes());
            }
        },
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'A');
            write_varint(out, items.len() as u64);
            for x in items {
                write_value(out, x);
            }
            out.push(b'$');
            write_varint(out, 0);
            write_varint(out, items.len() as u64);
        }
        Value::Object(map) => {
            out.push(b'o');
            for (k, x) in map {
                write_string(out, k);
                write_value(out, x);
            }
            out.push(b'{');
            write_varint(out, map.len() as u64);
        }
    }
}

/// Splits a byte stream into frames (`u32` big-endian length + payload), bounded in memory.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
    /// Bytes still to skip of a frame over the limit.
    skipping: usize,
}

/// One item out of the frame decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole frame: `(length prefix + payload, payload)`.
    Complete(&'a [u8], &'a [u8]),
    /// A frame over the limit was dropped.
    TooLong,
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
            skipping: 0,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, mut bytes: &[u8]) {
        if self.skipping > 0 {
            let n = self.skipping.min(bytes.len());
            self.skipping -= n;
            bytes = &bytes[n..];
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The start of a frame received and not yet complete (`None` while skipping an over-long
    /// one).
    pub fn pending_bytes(&self) -> Option<&[u8]> {
        (self.skipping == 0).then(|| &self.buf[self.start..])
    }

    /// The next frame, if one is complete.
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        let pending = &self.buf[self.start..];
        if pending.len() < 4 {
            self.compact();
            return None;
        }
        let len = u32::from_be_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            // Drop it without buffering it: skip what is here, and the rest as it arrives.
            let have = pending.len() - 4;
            self.skipping = len.saturating_sub(have);
            self.start += 4 + len.min(have);
            return Some(Frame::TooLong);
        }
        if pending.len() < 4 + len {
            self.compact();
            return None;
        }
        let begin = self.start;
        self.start += 4 + len;
        Some(Frame::Complete(
            &self.buf[begin..begin + 4 + len],
            &self.buf[begin + 4..begin + 4 + len],
        ))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Golden vectors: Node v20's v8.DefaultSerializer with ChildProcessSerializer's host-object
    // rule, i.e. what a Node worker writes in advanced mode.
    #[test]
    fn decodes_what_node_writes() {
        let cases = [
            (
                "ff0f6f2203636d64220b4e4f44455f48414e444c45220474797065220a6e65742e536f636b657422036d73672219737469636b792d73657373696f6e3a636f6e6e656374696f6e7b03",
                json!({"cmd":"NODE_HANDLE","type":"net.Socket","msg":"sticky-session:connection"}),
            ),
            (
                "ff0f6f2203636d64220573746174732204646174616f2211616374697665436f6e6e656374696f6e734900220d746f74616c526571756573747349027b027b02",
                json!({"cmd":"stats","data":{"activeConnections":0,"totalRequests":1}}),
            ),
            (
                "ff0f6f220161490122016249feffffff0f2201634e000000000000e0412201644e000000000000f83f2201654e00000000000000802201664e9c7500883ce4377e7b06",
                json!({"a":-1,"b":2147483647,"c":2147483648.0,"d":1.5,"e":-0.0,"f":1e300}),
            ),
            (
                "ff0f41085446305f2201e90063040326780041024902410149042400012400026f7b00240008",
                json!([true, false, null, null, "é", "☃x", [1, [2]], {}]),
            ),
            (
                "ff0f6f2204646174615c000a030102037b01",
                json!({"data": {"type": "Buffer", "data": [1, 2, 3]}}),
            ),
            (
                "ff0f5c0001020908",
                json!({"type": "Buffer", "data": [9, 8]}),
            ),
            (
                "ff0f610649004902490a4904400206",
                json!([1, null, null, null, null, 2]),
            ),
            (
                "ff0f6f2201616f22017849027b012201625e017b02",
                json!({"a": {"x": 1}, "b": {"x": 1}}),
            ),
            (
                "ff0f6f490222036f6e6522022d3122036e656722016b2201767b03",
                json!({"1": "one", "-1": "neg", "k": "v"}),
            ),
        ];
        for (hex, want) in cases {
            assert_eq!(decode(&unhex(hex)), Ok(want.clone()), "{hex}");
        }
    }

    #[test]
    fn a_socket_io_adapter_message_keeps_its_routing_fields() {
        let v = decode(&unhex("ff0f6f22047479706549062204646174616f22067061636b65746f22047479706549042204646174614102220362696e5c000a030102032400027b0222046f7074736f2205726f6f6d734100240000220665786365707441002400002205666c6167736f7b007b037b022203756964220361626322036e737022012f2206736f75726365220c5f73696f5f616461707465727b05")).unwrap();
        assert_eq!(v["source"], "_sio_adapter");
        assert_eq!(v["uid"], "abc");
        assert_eq!(v["type"], 3);
    }

    #[test]
    fn encodes_what_node_reads_back() {
        // lb's envelope encodes to exactly the bytes Node itself writes (node-ipc.md §7).
        let env =
            json!({"cmd":"NODE_HANDLE","type":"net.Socket","msg":"sticky-session:connection"});
        let frame = encode(&env);
        assert_eq!(
            frame,
            unhex(
                "00000049ff0f6f2203636d64220b4e4f44455f48414e444c45220474797065220a6e65742e536f636b657422036d73672219737469636b792d73657373696f6e3a636f6e6e656374696f6e7b03"
            )
        );
        for v in [
            json!({"cmd":"NODE_CLUSTER","ack":4,"seq":2,"errno":null,"key":"null:8000:4:undefined:0"}),
            json!([1, -1, 2147483648.0, 1.5, "é", "☃x", true, false, null, {"a": []}]),
        ] {
            let f = encode(&v);
            assert_eq!(
                u32::from_be_bytes(f[..4].try_into().unwrap()) as usize,
                f.len() - 4
            );
            assert_eq!(decode(&f[4..]).unwrap(), v);
        }
    }

    #[test]
    fn frames_split_anywhere_and_over_long_ones_are_skipped() {
        let a = encode(&json!({"x": 1}));
        let b = encode(&json!("y"));
        let mut stream = a.clone();
        stream.extend(&b);
        let mut d = FrameDecoder::new(64);
        let mut got = Vec::new();
        for byte in &stream {
            d.extend(std::slice::from_ref(byte));
            while let Some(Frame::Complete(_, p)) = d.next_frame() {
                got.push(decode(p).unwrap());
            }
        }
        assert_eq!(got, [json!({"x": 1}), json!("y")]);
        let mut d = FrameDecoder::new(8);
        let big = encode(&json!("a long string that is over the limit"));
        d.extend(&big[..10]);
        assert_eq!(d.next_frame(), Some(Frame::TooLong));
        d.extend(&big[10..]);
        d.extend(&b);
        assert!(matches!(d.next_frame(), Some(Frame::Complete(..))));
        assert_eq!(d.buffered(), 0);
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i32>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[a-z☃é\\x00-\\x7f]{0,12}".prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            /// Whatever lb encodes decodes to the same value.
            #[test]
            fn round_trips(v in json_value()) {
                let f = encode(&v);
                let back = decode(&f[4..]).unwrap();
                // i64 beyond i32 goes as a double: compare as f64.
                prop_assert_eq!(normalize(&back), normalize(&v));
            }

            /// Arbitrary bytes never panic the decoder.
            #[test]
            fn arbitrary_bytes_are_harmless(b in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = decode(&b);
                let mut with_header = vec![0xFF, 0x0F];
                with_header.extend(&b);
                let _ = decode(&with_header);
                let mut d = FrameDecoder::new(100);
                d.extend(&b);
                while let Some(f) = d.next_frame() {
                    if let Frame::Complete(_, p) = f {
                        let _ = decode(p);
                    }
                }
                prop_assert!(d.buffered() <= 104);
            }
        }

        fn normalize(v: &Value) -> Value {
            match v {
                Value::Number(n) => Value::from(n.as_f64().unwrap()),
                Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
                Value::Object(m) => {
                    Value::Object(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
                }
                other => other.clone(),
            }
        }
    }
}
