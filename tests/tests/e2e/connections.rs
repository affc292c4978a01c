//! The REST listener's limits: a client that sends its headers too slowly,
//! or keeps a connection open without using it, is disconnected; no more
//! than `--max-connections` connections are served at once, and the next
//! one is served as soon as one closes; a client guessing tokens is told to
//! wait.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// How long a disconnection may take beyond its timeout on a slow machine.
const SLACK: Duration = Duration::from_secs(10);

fn limited(args: &[&str]) -> ControllerOpts {
    ControllerOpts {
        extra_args: args.iter().map(|arg| (*arg).to_owned()).collect(),
        ..ControllerOpts::default()
    }
}

/// Reads until the controller closes the connection; returns what it sent
/// and how long that took, or `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some((received, started.elapsed())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// One request on an open connection; returns the response head's status
/// line (the response is small and sent at once).
async fn get_health(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: controller\r\n\r\n")
        .await
        .expect("send a request");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(SLACK, stream.read(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_its_headers_slowly_is_disconnected() {
    let controller = Controller::start(limited(&["--header-read-timeout", "1s"])).await;
    let mut stream = TcpStream::connect(controller.http_addr).await.unwrap();
    // The request line and one header, then nothing: the rest of the
    // head never comes.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: controller\r\n")
        .await
        .unwrap();
    let (_, after) = closed_within(&mut stream, SLACK)
        .await
        .expect("a connection whose headers stall is closed by the controller");
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );

    // One byte at a time, each in time for an idle limit but not for the
    // whole head, ends the same way.
    let mut stream = TcpStream::connect(controller.http_addr).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: controller\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let started = Instant::now();
    let mut cut = false;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        // Pacing the attacker, not synchronising: the byte rate is the
        // attack.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > SLACK {
            break;
        }
    }
    if !cut {
        let answer = closed_within(&mut stream, SLACK)
            .await
            .expect("closed once the header timeout passed");
        assert!(
            !String::from_utf8_lossy(&answer.0).starts_with("HTTP/1.1 200"),
            "a head trickled over more than the timeout must not be answered"
        );
    }
    assert!(
        started.elapsed() < SLACK,
        "the trickling client was cut off after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let controller = Controller::start(limited(&["--idle-timeout", "1s"])).await;

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(controller.http_addr).await.unwrap();
    // A keep-alive connection after one answered request.
    let mut kept = TcpStream::connect(controller.http_addr).await.unwrap();
    assert_eq!(get_health(&mut kept).await, "HTTP/1.1 200 OK");

    let (sent, after) = closed_within(&mut silent, SLACK)
        .await
        .expect("a silent connection is closed after the idle timeout");
    assert!(sent.is_empty(), "nothing is sent on a silent connection");
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
    closed_within(&mut kept, SLACK)
        .await
        .expect("an unused keep-alive connection is closed after the idle timeout");

    // Requests made within the timeout keep a connection open past it.
    let mut busy = TcpStream::connect(controller.http_addr).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            get_health(&mut busy).await,
            "HTTP/1.1 200 OK",
            "a connection in use is not cut after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_for_one_to_close() {
    let controller = Controller::start(limited(&["--max-connections", "3"])).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(controller.http_addr).await.unwrap();
        assert_eq!(get_health(&mut stream).await, "HTTP/1.1 200 OK");
        held.push(stream);
    }
    // The kernel completes the fourth connection, but the controller does
    // not serve it while three are open.
    let mut fourth = TcpStream::connect(controller.http_addr).await.unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: controller\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), fourth.read(&mut buf))
            .await
            .is_err(),
        "a connection past --max-connections is not served"
    );
    // The API says nothing different to those already connected.
    assert_eq!(get_health(&mut held[0]).await, "HTTP/1.1 200 OK");

    drop(held.pop());
    let n = tokio::time::timeout(SLACK, fourth.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .expect("read the answer");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// 1000 wrong admin tokens were all checked, at 5000 a second. Now the
/// 21st failure from one address is answered 429 with a `Retry-After`, as
/// a problem document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_tokens_gets_429_with_retry_after() {
    let controller = Controller::start_default().await;
    let mut statuses = Vec::new();
    for attempt in 0..30 {
        let guess = format!("guess-{attempt:04}-0000000000000000");
        let response = controller
            .api()
            .with_token(Some(&guess))
            .raw(Method::GET, "/api/v1/jobs", None)
            .await;
        statuses.push(response.status);
        if response.status == 429 {
            let problem = response.assert_problem(429);
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains("too many failed authentications"),
                "{problem}"
            );
            let retry_after: u64 = response
                .header("retry-after")
                .expect("a Retry-After header")
                .parse()
                .expect("Retry-After in seconds");
            assert!((1..=3).contains(&retry_after), "Retry-After: {retry_after}");
        }
    }
    assert_eq!(statuses[..20], [401; 20], "{statuses:?}");
    assert_eq!(statuses[20..], [429; 10], "{statuses:?}");
    // The admin token still works from that address: whoever shares it (a
    // hostile job on the operators' host) cannot lock the operators out.
    let right = controller
        .api()
        .raw(Method::GET, "/api/v1/jobs", None)
        .await;
    assert_eq!(right.status, 200);
    // After the Retry-After, one more attempt is checked.
    let api = controller
        .api()
        .with_token(Some("guess-after-the-wait-00000000"));
    wait_until(Duration::from_secs(10), "the address may try again", || {
        let api = api.clone();
        async move { api.raw(Method::GET, "/api/v1/jobs", None).await.status == 401 }
    })
    .await;
}
