//! HTTP content codings for infer bodies: gzip and deflate (the zlib format, as HTTP defines
//! it), which tritonclient's `request_compression_algorithm` and `response_compression_algorithm`
//! use.

use std::fmt;
use std::io::{Read, Write};

use bytes::Bytes;
use flate2::read::{GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;

use crate::error::{Result, ServeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    /// A setting's spelling: `none` (None), `gzip` or `deflate`.
    pub fn parse_setting(value: &str) -> std::result::Result<Option<Self>, String> {
        match value {
            "none" => Ok(None),
            "gzip" => Ok(Some(Self::Gzip)),
            "deflate" => Ok(Some(Self::Deflate)),
            other => Err(format!("must be none, gzip or deflate, got '{other}'")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
        }
    }

    /// A request's `Content-Encoding`: `None` for identity, an error for codings we do not speak.
    pub fn from_content_encoding(value: Option<&str>) -> Result<Option<Self>> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "identity") => Ok(None),
            Some("gzip" | "x-gzip") => Ok(Some(Self::Gzip)),
            Some("deflate") => Ok(Some(Self::Deflate)),
            Some(other) => Err(ServeError::bad_request(format!(
                "unsupported Content-Encoding '{other}' (supported: gzip, deflate)"
            ))),
        }
    }

    /// The coding to answer with given `Accept-Encoding`: the highest-weighted of gzip and deflate
    /// (gzip on a tie), or `None` when the client accepts neither.
    pub fn negotiate(accept: Option<&str>) -> Option<Self> {
        let mut best: Option<(Self, f32)> = None;
        for item in accept?.split(',') {
            let mut parts = item.split(';');
            let coding = match parts.next().map(|c| c.trim().to_ascii_lowercase()).as_deref() {
                Some("gzip" | "x-gzip") => Self::Gzip,
                Some("deflate") => Self::Deflate,
                _ => continue,
            };
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if q > 0.0 && best.is_none_or(|(c, bq)| q > bq || (q == bq && coding == Self::Gzip && c != Self::Gzip)) {
                best = Some((coding, q));
            }
        }
        best.map(|(c, _)| c)
    }

    /// Inflates a request body, stopping as soon as the output passes `limit` bytes, so a
    /// compression bomb costs at most `limit` bytes of memory.
    pub fn decompress(self, body: &[u8], limit: usize) -> Result<Bytes> {
        let reader: Box<dyn Read + '_> = match self {
            Self::Gzip => Box::new(GzDecoder::new(body)),
            Self::Deflate => Box::new(ZlibDecoder::new(body)),
        };
        let mut out = Vec::new();
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| ServeError::bad_request(format!("could not decompress the {self} request body: {e}")))?;
        if out.len() > limit {
            return Err(ServeError::PayloadTooLarge(format!(
                "decompressed request body exceeds the limit of {limit} bytes"
            )));
        }
        Ok(out.into())
    }

    pub fn compress(self, body: &[u8]) -> Vec<u8> {
        let out = Vec::with_capacity(body.len() / 2 + 64);
        // Writing into a Vec cannot fail.
        match self {
            Self::Gzip => {
                let mut e = GzEncoder::new(out, Compression::fast());
                let _ = e.write_all(body);
                e.finish().unwrap_or_default()
            }
            Self::Deflate => {
                let mut e = ZlibEncoder::new(out, Compression::fast());
                let _ = e.write_all(body);
                e.finish().unwrap_or_default()
            }
        }
    }
}

impl fmt::Display for Coding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_codings() {
        let body = b"{\"inputs\": []}".repeat(100);
        for c in [Coding::Gzip, Coding::Deflate] {
            let packed = c.compress(&body);
            assert!(packed.len() < body.len());
            assert_eq!(&c.decompress(&packed, body.len()).unwrap()[..], &body[..]);
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = Coding::Gzip.compress(&vec![0u8; 10_000_000]);
        let err = Coding::Gzip.decompress(&bomb, 1000).unwrap_err();
        assert!(matches!(err, ServeError::PayloadTooLarge(_)), "{err}");
        let err = Coding::Deflate.decompress(b"not zlib", 1000).unwrap_err();
        assert!(err.to_string().contains("could not decompress the deflate request body"), "{err}");
    }

    #[test]
    fn parses_headers() {
        assert_eq!(Coding::from_content_encoding(None).unwrap(), None);
        assert_eq!(Coding::from_content_encoding(Some("GZIP")).unwrap(), Some(Coding::Gzip));
        assert!(Coding::from_content_encoding(Some("br")).unwrap_err().to_string().contains("'br'"));
        assert_eq!(Coding::negotiate(Some("gzip")), Some(Coding::Gzip));
        assert_eq!(Coding::negotiate(Some("deflate")), Some(Coding::Deflate));
        assert_eq!(Coding::negotiate(Some("deflate, gzip")), Some(Coding::Gzip));
        assert_eq!(Coding::negotiate(Some("gzip;q=0.5, deflate")), Some(Coding::Deflate));
        assert_eq!(Coding::negotiate(Some("gzip;q=0, br")), None);
        assert_eq!(Coding::negotiate(Some("identity")), None);
        assert_eq!(Coding::negotiate(None), None);
    }
}
