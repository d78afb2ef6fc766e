//! Idle keep-alive connections, for measuring what each costs the server: N HTTP/1.1 connections,
//! one `GET /v2/health/live` each (so the server has accepted and served them), then held open.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::args::Args;
use crate::target::http_connection;

pub async fn hold(args: &Args, n: usize) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut held = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut first_error = None;
    // Opened in waves of 256 so the server's accept backlog is never the limit.
    let mut remaining = n;
    while remaining > 0 && Instant::now() < deadline {
        let wave = remaining.min(256);
        let tasks: Vec<_> = (0..wave)
            .map(|_| {
                let args = args.clone();
                tokio::spawn(async move {
                    let mut sender = http_connection(&args).await?;
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let req = http::Request::get("/v2/health/live")
                        .header(http::header::HOST, args.addr.to_string())
                        .body(Full::new(Bytes::new()))
                        .map_err(|e| e.to_string())?;
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    resp.into_body().collect().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("HTTP {status}"));
                    }
                    Ok(sender)
                })
            })
            .collect();
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Ok(s) => held.push(s),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        remaining -= wave;
    }
    let open_s = started.elapsed().as_secs_f64();
    eprintln!("holding {}", held.len());
    tokio::time::sleep(Duration::from_secs_f64(args.hold_s)).await;
    let opened = held.len();
    drop(held);
    Ok(serde_json::json!({
        "idle_connections": opened,
        "failed": failed,
        "first_error": first_error,
        "open_s": open_s,
        "hold_s": args.hold_s,
    }))
}
