//! A server whose answers never end: the hostile case the API clients' body caps are for (no
//! documented API answers this way). Identity requests (`/identity/…`) get a small token answer
//! so a Marketo client reaches its REST calls; everything else gets a 200 JSON answer that is
//! either announced as 100 MB (`Content-Length`) or streamed in 1 MB chunks until the client
//! hangs up.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the endless answer comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversized {
    /// `Content-Length: 100000000`, then nothing.
    Announced,
    /// `Transfer-Encoding: chunked`, chunks until the client hangs up.
    Streamed,
}

/// Serves on a loopback port; returns its base URL (`http://127.0.0.1:PORT`).
pub async fn serve(how: Oversized) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 16 * 1024];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..n]);
                if head
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("/identity/"))
                {
                    let body = r#"{"access_token":"t","token_type":"bearer","expires_in":3600,"scope":"s"}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                    return;
                }
                match how {
                    Oversized::Announced => {
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\nconnection: close\r\n\r\n{\"value\":[")
                            .await;
                    }
                    Oversized::Streamed => {
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                            .await;
                        let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, " ".repeat(1 << 20));
                        while socket.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                }
            });
        }
    });
    url
}
