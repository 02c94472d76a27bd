//! Minimal NumPy `.npy` (format 1.0) writer for uint8 arrays, so training code can memory-map
//! the frame dumps.

use std::io::Write;
use std::path::Path;

/// Writes a C-ordered `uint8` array of `shape` from consecutive chunks.
pub fn write_u8<'a>(
    path: &Path,
    shape: &[usize],
    chunks: impl Iterator<Item = &'a [u8]>,
) -> std::io::Result<()> {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let trailing = if shape.len() == 1 { "," } else { "" };
    let mut header =
        format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({dims}{trailing}), }}");
    // magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    let expected: usize = shape.iter().product();
    let mut written = 0;
    for c in chunks {
        f.write_all(c)?;
        written += c.len();
    }
    if written != expected {
        return Err(std::io::Error::other(format!(
            "wrote {written} bytes for shape {shape:?} ({expected})"
        )));
    }
    f.flush()
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_is_aligned_and_parsable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data = [1u8, 2, 3, 4, 5, 6];
        super::write_u8(&p, &[2, 3], std::iter::once(&data[..])).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + hl]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(&bytes[10 + hl..], &data);
    }
}
