//! A flaky network in a box, for trying `roam get` (or curl) by hand: a TCP proxy that breaks
//! every connection after a random number of server-to-client bytes.
//!
//! ```sh
//! cargo run --example flaky_proxy -- --listen 127.0.0.1:0 --upstream 127.0.0.1:8080 \
//!     --reset-every 3000000 [--blackhole] [--seed N]
//! ```
//!
//! Each connection is reset (or, with `--blackhole`, silently stops delivering in both
//! directions, like a network that vanished) after a pseudo-random number of downstream bytes
//! between 1 and `--reset-every`, chosen from `--seed` and the connection's index, so a run can
//! be replayed. Prints `flaky_proxy listening on http://ADDR` and runs until killed.
//!
//! It is the disruptive proxy of the integration tests (`tests/support/proxy.rs`), unchanged.

#[path = "../tests/support/proxy.rs"]
mod proxy;

use proxy::{Disruption, DisruptiveProxy};
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

const USAGE: &str = "usage: flaky_proxy --upstream HOST:PORT --reset-every BYTES \
                     [--listen ADDR] [--blackhole] [--seed N]";

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    reset_every: u64,
    blackhole: bool,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut upstream = None;
    let mut reset_every = None;
    let mut blackhole = false;
    let mut seed = 1u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = value("--listen")?,
            "--upstream" => upstream = Some(value("--upstream")?),
            "--reset-every" => {
                let v = value("--reset-every")?;
                reset_every = Some(
                    v.parse::<u64>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| format!("--reset-every {v:?}: expected bytes > 0"))?,
                );
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?}: expected a number"))?;
            }
            "--blackhole" => blackhole = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let resolve = |name: &str, s: &str| {
        s.to_socket_addrs()
            .map_err(|e| format!("{name} {s:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{name} {s:?} resolves to no address"))
    };
    Ok(Args {
        listen: resolve("--listen", &listen)?,
        upstream: resolve(
            "--upstream",
            &upstream.ok_or("--upstream HOST:PORT is required")?,
        )?,
        reset_every: reset_every.ok_or("--reset-every BYTES is required")?,
        blackhole,
        seed,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        // An empty message means --help.
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("flaky_proxy: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let plan = proxy::random_plan(args.reset_every, args.seed, args.blackhole);
    let logged = move |index: u64| {
        let d = plan(index);
        match d {
            Disruption::ResetAfter(n) => {
                eprintln!("flaky_proxy: connection {index}: reset after {n} bytes")
            }
            Disruption::BlackholeAfter(n) => {
                eprintln!("flaky_proxy: connection {index}: blackhole after {n} bytes")
            }
            _ => {}
        }
        d
    };
    let proxy = match DisruptiveProxy::try_start_on(args.listen, args.upstream, logged) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("flaky_proxy: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    println!("flaky_proxy listening on http://{}", proxy.addr());
    let _ = std::io::stdout().flush();
    let _ = tokio::signal::ctrl_c().await;
    proxy.shutdown();
    ExitCode::SUCCESS
}
