//! TensorBoard event files (`<output_dir>/tf_logs/events.out.tfevents.*`): scalars only, in
//! the format TensorBoard's own reader expects, written without TensorFlow.
//!
//! A file is a sequence of TFRecords (`u64` length, masked CRC-32C of the length, the data,
//! masked CRC-32C of the data), each holding a serialized `tensorflow.Event` protobuf: the
//! first one carries `file_version = "brain.Event:2"`, the others `wall_time`, `step` and a
//! `Summary` with one `Value { tag, simple_value }`. The protobuf is encoded by hand (a few
//! fields of fixed numbers), so no protobuf crate is needed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// CRC-32C (Castagnoli), bitwise-reflected polynomial 0x82F63B78, with a 256-entry table.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf field key: number and wire type.
fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalar: Option<(&str, f32)>,
) -> Vec<u8> {
    let mut ev = Vec::new();
    key(1, 1, &mut ev);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        key(2, 0, &mut ev);
        varint(step as u64, &mut ev);
    }
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut ev);
    }
    if let Some((tag, value)) = scalar {
        // Summary.Value { tag = 1 (string), simple_value = 2 (float) }
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val);
        key(2, 5, &mut val);
        val.extend_from_slice(&value.to_le_bytes());
        // Summary { repeated Value value = 1 }
        let mut summary = Vec::new();
        bytes_field(1, &val, &mut summary);
        bytes_field(5, &summary, &mut ev);
    }
    ev
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed), named as TensorFlow names them.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let secs = now() as u64;
        let path = dir.join(format!(
            "events.out.tfevents.{secs}.{host}.{}.0",
            std::process::id()
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        w.record(&event(now(), 0, Some("brain.Event:2"), None))?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&rec)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// One scalar point (non-finite values are written as they are; TensorBoard shows them).
    pub fn scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        self.record(&event(now(), step, None, Some((tag, value as f32))))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
