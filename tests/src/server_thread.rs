//! A test server on its own thread: a free port of 127.0.0.1, a
//! current-thread tokio runtime, and a stop signal sent on drop.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The thread of a running server; dropping it stops the server, closes
/// its connections and joins the thread.
pub struct ServerThread {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A bound port with the runtime that will serve it.
pub struct Bound {
    name: String,
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    address: SocketAddr,
}

impl ServerThread {
    /// Binds a free port of 127.0.0.1 for the server `name`.
    pub fn bind(name: &str) -> Result<Bound> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .with_context(|| format!("failed to bind the {name} to a port of 127.0.0.1"))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .with_context(|| format!("failed to build the tokio runtime of the {name}"))?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)?
        };
        Ok(Bound {
            name: name.to_string(),
            runtime,
            listener,
            address,
        })
    }
}

impl Bound {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Runs `serve` with the listener on a new thread named `name-PORT`,
    /// until the returned value is dropped.
    pub fn spawn<Serve, Served>(self, serve: Serve) -> Result<ServerThread>
    where
        Serve: FnOnce(TcpListener) -> Served + Send + 'static,
        Served: Future<Output = ()>,
    {
        let Bound {
            name,
            runtime,
            listener,
            address,
        } = self;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("{}-{}", name.replace(' ', "-"), address.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = serve(listener) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks, which
                // closes their sockets.
                drop(runtime);
            })
            .with_context(|| format!("failed to spawn the {name} thread"))?;
        Ok(ServerThread {
            name: format!("{name} {address}"),
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The send fails only if the server thread has ended already.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("{}: the server thread panicked", self.name);
            }
        }
    }
}
