//! A minimal pickle reader for data files (the CIFAR "python version" batches: a dict of bytes,
//! lists of ints and a numpy uint8 array), that never imports or calls anything.
//!
//! Hand-written because the pickle crates do not fit: `serde-pickle` refuses numpy's
//! `_reconstruct` calls, and `pytorch-reader` (used for checkpoints) keeps numpy arrays as opaque
//! names without their bytes. Here a stack machine interprets the binary opcodes of protocols
//! 2–5; `GLOBAL` only names a callable, and `REDUCE` / `BUILD` are interpreted for the few
//! callables numpy arrays need (`numpy[._]core.multiarray._reconstruct`, `numpy.ndarray`,
//! `numpy.dtype`, `_codecs.encode`); any other call stays an inert [`Value::Opaque`]. Lengths
//! are checked against the input before anything is allocated.

use std::collections::HashMap;

use anyhow::{anyhow, bail, ensure, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A `module.name` reference (never imported).
    Global(String),
    /// A numpy dtype: its type string (`u1`, `i8`, …) and byte order (`|`, `<`, `>`).
    Dtype(String, char),
    /// A numpy array (C order unless `fortran`).
    Array {
        dtype: String,
        shape: Vec<usize>,
        fortran: bool,
        data: Vec<u8>,
    },
    /// The result of calling something this reader does not interpret (its name).
    Opaque(String),
}

impl Value {
    /// The entry of a dict under a str or bytes key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                Value::Bytes(b) if b == key.as_bytes() => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A str, or bytes decoded as Latin-1 (Python 2 `str`).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(
            n <= self.b.len() - self.pos,
            "truncated pickle: {n} bytes needed at offset {}, {} left",
            self.pos,
            self.b.len() - self.pos
        );
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("truncated pickle: unterminated line at offset {}", self.pos))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|e| anyhow!("bad UTF-8 string in pickle: {e}"))
    }
}

enum Slot {
    Mark,
    V(Value),
}

fn shape_of(v: &Value) -> Result<Vec<usize>> {
    let items = v
        .as_list()
        .ok_or_else(|| anyhow!("numpy shape is not a tuple"))?;
    items
        .iter()
        .map(|x| {
            x.as_int()
                .filter(|&i| i >= 0)
                .map(|i| i as usize)
                .ok_or_else(|| anyhow!("numpy shape holds a non-integer"))
        })
        .collect()
}

fn dtype_size(dtype: &str) -> Option<usize> {
    let digits: String = dtype.chars().filter(|c| c.is_ascii_digit()).collect();
    match dtype.chars().next()? {
        'u' | 'i' | 'f' | 'b' => digits.parse().ok(),
        '?' => Some(1),
        _ => None,
    }
}

/// `callable(*args)` for the callables numpy arrays pickle with; others become opaque.
fn reduce(callable: Value, args: Value) -> Result<Value> {
    let name = match &callable {
        Value::Global(n) => n.clone(),
        other => return Ok(Value::Opaque(format!("call of {other:?}"))),
    };
    let args = args.as_list().map(|a| a.to_vec()).unwrap_or_default();
    Ok(match name.as_str() {
        "numpy.core.multiarray._reconstruct" | "numpy._core.multiarray._reconstruct" => {
            Value::Array {
                dtype: String::new(),
                shape: Vec::new(),
                fortran: false,
                data: Vec::new(),
            }
        }
        "numpy.dtype" => match args.first().and_then(Value::as_text) {
            Some(t) => Value::Dtype(t, '|'),
            None => bail!("numpy.dtype without a type string"),
        },
        "_codecs.encode" => match (args.first(), args.get(1).and_then(Value::as_text)) {
            (Some(Value::Str(s)), Some(enc)) if enc == "latin1" || enc == "latin-1" => {
                let mut out = Vec::with_capacity(s.len());
                for c in s.chars() {
                    ensure!((c as u32) < 256, "non-Latin-1 character in a latin1 string");
                    out.push(c as u32 as u8);
                }
                Value::Bytes(out)
            }
            _ => Value::Opaque(name),
        },
        _ => Value::Opaque(name),
    })
}

/// `obj.__setstate__(state)` for numpy arrays and dtypes; other objects keep no state.
fn build(obj: Value, state: Value) -> Result<Value> {
    Ok(match obj {
        Value::Array { .. } => {
            let s = state
                .as_list()
                .ok_or_else(|| anyhow!("numpy array state is not a tuple"))?;
            ensure!(
                s.len() == 5,
                "numpy array state has {} fields, not 5",
                s.len()
            );
            let shape = shape_of(&s[1])?;
            let (dtype, order) = match &s[2] {
                Value::Dtype(t, o) => (t.clone(), *o),
                _ => bail!("numpy array without a dtype"),
            };
            let fortran = matches!(s[3], Value::Bool(true) | Value::Int(1));
            let data = match &s[4] {
                Value::Bytes(b) => b.clone(),
                Value::Str(t) => t.chars().map(|c| c as u32 as u8).collect(),
                _ => bail!("numpy array of objects (not raw data) is not supported"),
            };
            let size =
                dtype_size(&dtype).ok_or_else(|| anyhow!("unsupported numpy dtype '{dtype}'"))?;
            ensure!(
                order != '>' || size == 1,
                "big-endian numpy arrays are not supported"
            );
            let n = shape
                .iter()
                .try_fold(size, |a, &d| a.checked_mul(d))
                .ok_or_else(|| anyhow!("numpy array shape {shape:?} overflows"))?;
            ensure!(
                n == data.len(),
                "numpy array of shape {shape:?} and dtype {dtype} needs {n} bytes, the file holds {}",
                data.len()
            );
            Value::Array {
                dtype,
                shape,
                fortran,
                data,
            }
        }
        Value::Dtype(t, _) => {
            let order = state
                .as_list()
                .and_then(|s| s.get(1))
                .and_then(Value::as_text)
                .and_then(|o| o.chars().next())
                .unwrap_or('|');
            Value::Dtype(t, order)
        }
        other => other,
    })
}

/// Parses a pickle (protocol 2 to 5 binary opcodes) into a [`Value`] without running anything.
pub fn parse(bytes: &[u8]) -> Result<Value> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    macro_rules! pop {
        () => {
            match stack.pop() {
                Some(Slot::V(v)) => v,
                Some(Slot::Mark) => bail!("malformed pickle: mark where a value was expected"),
                None => bail!("malformed pickle: stack underflow at offset {}", r.pos),
            }
        };
    }
    let pop_mark = |stack: &mut Vec<Slot>| -> Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| anyhow!("malformed pickle: no mark"))?;
        let items = stack
            .drain(at + 1..)
            .map(|s| match s {
                Slot::V(v) => v,
                Slot::Mark => Value::None,
            })
            .collect();
        stack.pop();
        Ok(items)
    };
    let top = |stack: &Vec<Slot>| -> Result<Value> {
        match stack.last() {
            Some(Slot::V(v)) => Ok(v.clone()),
            _ => bail!("malformed pickle: nothing to memoize"),
        }
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                let p = r.u8()?;
                ensure!(p <= 5, "unsupported pickle protocol {p}");
            }
            0x95 => {
                r.u64()?;
            }
            b'.' => {
                return Ok(pop!());
            }
            b'(' => stack.push(Slot::Mark),
            b'}' => stack.push(Slot::V(Value::Dict(Vec::new()))),
            b']' => stack.push(Slot::V(Value::List(Vec::new()))),
            b')' => stack.push(Slot::V(Value::Tuple(Vec::new()))),
            b'N' => stack.push(Slot::V(Value::None)),
            0x88 => stack.push(Slot::V(Value::Bool(true))),
            0x89 => stack.push(Slot::V(Value::Bool(false))),
            b'K' => {
                let v = r.u8()? as i64;
                stack.push(Slot::V(Value::Int(v)))
            }
            b'M' => {
                let v = r.u16()? as i64;
                stack.push(Slot::V(Value::Int(v)))
            }
            b'J' => {
                let v = r.u32()? as i32 as i64;
                stack.push(Slot::V(Value::Int(v)))
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8()? as usize
                } else {
                    r.u32()? as usize
                };
                let s = r.take(n)?;
                ensure!(n <= 8, "integer of {n} bytes is too large");
                let mut buf = [0u8; 8];
                buf[..n].copy_from_slice(s);
                if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                    buf[n..].fill(0xff);
                }
                stack.push(Slot::V(Value::Int(i64::from_le_bytes(buf))));
            }
            b'G' => {
                let s = r.take(8)?;
                let v = f64::from_be_bytes(s.try_into().expect("8 bytes"));
                stack.push(Slot::V(Value::Float(v)));
            }
            b'U' | b'T' | b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'U' | b'C' => r.u8()? as usize,
                    b'T' | b'B' => r.u32()? as usize,
                    _ => usize::try_from(r.u64()?)?,
                };
                let s = r.take(n)?;
                stack.push(Slot::V(Value::Bytes(s.to_vec())));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.u32()? as usize,
                    0x8c => r.u8()? as usize,
                    _ => usize::try_from(r.u64()?)?,
                };
                let s = r.utf8(n)?;
                stack.push(Slot::V(Value::Str(s)));
            }
            b'q' => {
                let k = r.u8()? as u64;
                memo.insert(k, top(&stack)?);
            }
            b'r' => {
                let k = r.u32()? as u64;
                memo.insert(k, top(&stack)?);
            }
            0x94 => {
                let k = memo.len() as u64;
                memo.insert(k, top(&stack)?);
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    r.u8()? as u64
                } else {
                    r.u32()? as u64
                };
                let v = memo
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| anyhow!("malformed pickle: memo {k} is not set"))?;
                stack.push(Slot::V(v));
            }
            b'a' => {
                let v = pop!();
                match stack.last_mut() {
                    Some(Slot::V(Value::List(l))) => l.push(v),
                    _ => bail!("malformed pickle: APPEND to a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Slot::V(Value::List(l))) => l.extend(items),
                    _ => bail!("malformed pickle: APPENDS to a non-list"),
                }
            }
            b's' => {
                let v = pop!();
                let k = pop!();
                match stack.last_mut() {
                    Some(Slot::V(Value::Dict(d))) => d.push((k, v)),
                    _ => bail!("malformed pickle: SETITEM on a non-dict"),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                ensure!(items.len() % 2 == 0, "malformed pickle: odd SETITEMS");
                match stack.last_mut() {
                    Some(Slot::V(Value::Dict(d))) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => bail!("malformed pickle: SETITEMS on a non-dict"),
                }
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::V(Value::Tuple(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items: Vec<Value> = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop!());
                }
                items.reverse();
                stack.push(Slot::V(Value::Tuple(items)));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Slot::V(Value::Global(format!("{module}.{name}"))));
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                match (module.as_text(), name.as_text()) {
                    (Some(m), Some(n)) => stack.push(Slot::V(Value::Global(format!("{m}.{n}")))),
                    _ => bail!("malformed pickle: STACK_GLOBAL of non-strings"),
                }
            }
            b'R' => {
                let args = pop!();
                let callable = pop!();
                stack.push(Slot::V(reduce(callable, args)?));
            }
            0x81 => {
                let _args = pop!();
                let cls = pop!();
                let name = match cls {
                    Value::Global(n) => n,
                    _ => "object".into(),
                };
                stack.push(Slot::V(Value::Opaque(name)));
            }
            b'b' => {
                let state = pop!();
                let obj = pop!();
                stack.push(Slot::V(build(obj, state)?));
            }
            b'0' => {
                pop!();
            }
            other => bail!(
                "unsupported pickle opcode 0x{other:02x} at offset {} (only binary protocols 2-5 \
                 are read)",
                r.pos - 1
            ),
        }
    }
}
