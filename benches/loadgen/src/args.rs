//! Command-line arguments, parsed by hand (no extra dependency) and checked: the target must be
//! 127.0.0.1 and every run is bounded.

use std::net::{Ipv4Addr, SocketAddr};

pub const USAGE: &str = "usage: fastserve-loadgen --url http://127.0.0.1:PORT [options]
  --protocol http|binary|grpc   HTTP JSON, HTTP binary tensor extension, or gRPC ModelInfer (http)
  --model NAME                  model to call (mlp)
  --input NAME                  input tensor name (INPUT0); FP32 [rows, --features]
  --features N                  elements per row (64)
  --concurrency N               concurrent connections, one per worker (1)
  --rows N                      rows per request (1)
  --duration-s S                measured seconds (5), at most 600
  --warmup-s S                  unmeasured seconds before (1)
  --max-requests N              stop after this many requests in all (10000000)
  --rate R                      open loop: R requests/s in all (default: closed loop)
  --timeout-s S                 per-request timeout (30)
  --threads N                   client runtime threads (1)
  --idle-connections N          instead of load: open N keep-alive HTTP connections, one request
                                each, print 'holding N' on stderr, keep them --hold-s seconds (<= 20000)
  --hold-s S                    how long to hold idle connections (10), at most 600
  --json                        one JSON object on stdout";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Binary,
    Grpc,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Binary => "binary",
            Protocol::Grpc => "grpc",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Closed,
    Open { rate: f64 },
}

#[derive(Clone, Debug)]
pub struct Args {
    pub url: String,
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub model: String,
    pub input: String,
    pub features: usize,
    pub concurrency: usize,
    pub rows: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub max_requests: u64,
    pub mode: Mode,
    pub timeout_s: f64,
    pub threads: usize,
    pub idle_connections: Option<usize>,
    pub hold_s: f64,
    pub json: bool,
}

/// Parses `http://127.0.0.1:PORT` (or `127.0.0.1:PORT`), refusing any other host.
pub fn loopback_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        return Err(format!("--url {url}: only http:// is supported"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| format!("--url {url}: a port is required"))?;
    if host != "127.0.0.1" {
        return Err(format!("--url {url}: only 127.0.0.1 may be targeted, not {host:?}"));
    }
    let port: u16 = port.parse().map_err(|_| format!("--url {url}: bad port {port:?}"))?;
    if port == 0 {
        return Err(format!("--url {url}: port 0"));
    }
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

fn num<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let v = value.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse().map_err(|_| format!("{flag}: cannot parse {v:?}"))
}

fn seconds(flag: &str, value: Option<String>, max: f64) -> Result<f64, String> {
    let s: f64 = num(flag, value)?;
    if !(0.0..=max).contains(&s) {
        return Err(format!("{flag}: {s} is outside 0..={max}"));
    }
    Ok(s)
}

pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut a = Args {
        url: String::new(),
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)),
        protocol: Protocol::Http,
        model: "mlp".into(),
        input: "INPUT0".into(),
        features: 64,
        concurrency: 1,
        rows: 1,
        duration_s: 5.0,
        warmup_s: 1.0,
        max_requests: 10_000_000,
        mode: Mode::Closed,
        timeout_s: 30.0,
        threads: 1,
        idle_connections: None,
        hold_s: 10.0,
        json: false,
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--url" => url = it.next(),
            "--protocol" => {
                a.protocol = match it.next().as_deref() {
                    Some("http") | Some("json") => Protocol::Http,
                    Some("binary") => Protocol::Binary,
                    Some("grpc") => Protocol::Grpc,
                    other => return Err(format!("--protocol: expected http, binary or grpc, got {other:?}")),
                }
            }
            "--model" => a.model = it.next().ok_or("--model needs a value")?,
            "--input" => a.input = it.next().ok_or("--input needs a value")?,
            "--features" => a.features = num(&flag, it.next())?,
            "--concurrency" => a.concurrency = num(&flag, it.next())?,
            "--rows" => a.rows = num(&flag, it.next())?,
            "--duration-s" => a.duration_s = seconds(&flag, it.next(), 600.0)?,
            "--warmup-s" => a.warmup_s = seconds(&flag, it.next(), 600.0)?,
            "--max-requests" => a.max_requests = num(&flag, it.next())?,
            "--rate" => {
                let rate: f64 = num(&flag, it.next())?;
                if !(rate > 0.0 && rate.is_finite()) {
                    return Err(format!("--rate: must be positive, got {rate}"));
                }
                a.mode = Mode::Open { rate };
            }
            "--timeout-s" => a.timeout_s = seconds(&flag, it.next(), 600.0)?,
            "--threads" => a.threads = num(&flag, it.next())?,
            "--idle-connections" => a.idle_connections = Some(num(&flag, it.next())?),
            "--hold-s" => a.hold_s = seconds(&flag, it.next(), 600.0)?,
            "--json" => a.json = true,
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    a.url = url.ok_or("--url is required")?;
    a.addr = loopback_addr(&a.url)?;
    if a.concurrency == 0 || a.concurrency > 20_000 {
        return Err("--concurrency must be 1..=20000".into());
    }
    if a.rows == 0 || a.features == 0 {
        return Err("--rows and --features must be positive".into());
    }
    if a.threads == 0 || a.threads > 64 {
        return Err("--threads must be 1..=64".into());
    }
    if a.timeout_s <= 0.0 {
        return Err("--timeout-s must be positive".into());
    }
    if let Some(n) = a.idle_connections {
        if n == 0 || n > 20_000 {
            return Err("--idle-connections must be 1..=20000".into());
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn only_loopback() {
        assert!(loopback_addr("http://127.0.0.1:8000").is_ok());
        assert!(loopback_addr("127.0.0.1:8001").is_ok());
        assert!(loopback_addr("http://localhost:8000").is_err());
        assert!(loopback_addr("http://10.0.0.1:8000").is_err());
        assert!(loopback_addr("http://127.0.0.1").is_err());
        assert!(loopback_addr("https://127.0.0.1:8000").is_err());
    }

    #[test]
    fn bounded() {
        assert!(parse_str("--url http://127.0.0.1:1 --duration-s 601").is_err());
        assert!(parse_str("--url http://127.0.0.1:1 --concurrency 0").is_err());
        let a = parse_str("--url http://127.0.0.1:1 --protocol grpc --rate 100 --rows 8 --json").unwrap();
        assert_eq!(a.protocol, Protocol::Grpc);
        assert_eq!(a.mode, Mode::Open { rate: 100.0 });
        assert_eq!(a.rows, 8);
        assert!(a.json);
    }
}
