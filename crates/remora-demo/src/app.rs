//! `remora-demo serve`: the demo's api. Every request gets `200` naming the pod that
//! served it (`x-served-by`, and the body); `SIGUSR1` turns the fault on or off, and
//! while it is on every request gets `503`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

pub async fn serve(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let faulty = Arc::new(AtomicBool::new(false));
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let flip = faulty.clone();
    let who = name.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            let now = !flip.fetch_xor(true, Ordering::Relaxed);
            println!(
                "{who}: fault {}",
                if now { "on: answering 503" } else { "off" }
            );
        }
    });
    println!("{name}: serving on {listen}");
    let name: Arc<str> = name.into();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (faulty, name) = (faulty.clone(), name.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let rsp = if faulty.load(Ordering::Relaxed) {
                    reply(StatusCode::SERVICE_UNAVAILABLE, &name, "fault injected\n")
                } else {
                    reply(StatusCode::OK, &name, &format!("served by {name}\n"))
                };
                async move { Ok::<_, std::convert::Infallible>(rsp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, name: &str, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-served-by", name)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}
