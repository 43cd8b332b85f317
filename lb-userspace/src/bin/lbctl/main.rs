//! lbctl: the balancer's command line, a client of lbd's management API.
//!
//! Exit codes: 0 done; 1 lbd refused the request (the message says why); 2 bad usage
//! or input file; 3 lbd is not running; 4 unexpected answer from lbd; 5 a directory
//! change taken but not yet stored by a backup. With `-o json` the error is a JSON
//! object `{"error", "exit"}` on stdout.

mod cli;
mod commands;
mod render;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser};
use lb_userspace::api::client::{Client, ClientError};

use cli::{Cli, Cmd};

pub enum Failure {
    Client(ClientError),
    Input(String),
    /// The directory took the change but has not stored it where a failover keeps it.
    Pending(String),
    /// lbd refused the request with an answer already printed on stdout (an epoch
    /// mismatch carries the map to use; its JSON names the error itself).
    Shown(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn default_socket() -> Result<PathBuf, Failure> {
    if let Ok(s) = std::env::var("LBCTL_SOCKET") {
        return Ok(s.into());
    }
    let found: Vec<PathBuf> = std::fs::read_dir("/run/lb")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [] => Err(Failure::Client(ClientError::NotRunning {
            path: "/run/lb/*.sock".into(),
        })),
        [one] => Ok(one.clone()),
        many => Err(Failure::Input(format!(
            "several lbd sockets in /run/lb ({}); pick one with --socket",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Man = cli.command {
        let man = clap_mangen::Man::new(Cli::command()).section("8");
        return man
            .render(&mut std::io::stdout())
            .map_err(|e| Failure::Input(format!("writing the manual page: {e}")));
    }
    if let Cmd::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
        return Ok(());
    }
    let apply = commands::read_apply(&cli.command)?;
    // A backend registering through a node's registry port has no lbd of its own.
    let remote = matches!(
        &cli.command,
        Cmd::Backend(
            cli::BackendCmd::Register { registry, .. } | cli::BackendCmd::Report { registry, .. }
        ) if registry.registry.is_some()
    ) || matches!(
        &cli.command,
        Cmd::Backend(cli::BackendCmd::Setup { .. } | cli::BackendCmd::Doctor { .. })
    );
    let socket = match cli.socket {
        Some(s) => s,
        None if remote => PathBuf::new(),
        None => default_socket()?,
    };
    commands::run(&Client::new(socket), cli.output, cli.command, apply).await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let json = cli.output == cli::Output::Json;
    let (message, code) = match runtime.block_on(run(cli)) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Shown(m)) => {
            if !json {
                eprintln!("lbctl: {m}");
            }
            return ExitCode::from(1);
        }
        Err(Failure::Input(m)) => (m, 2),
        // The answer (`committed: false`) is already on stdout: no second document.
        Err(Failure::Pending(_)) if json => return ExitCode::from(5),
        Err(Failure::Pending(m)) => (m, 5),
        Err(Failure::Client(e)) => {
            let code = match e {
                ClientError::Daemon { .. } => 1,
                ClientError::NotRunning { .. } => 3,
                ClientError::Protocol { .. } => 4,
            };
            (e.to_string(), code)
        }
    };
    if json {
        // A script reading -o json gets a JSON document either way: the answer, or
        // this (the exit code as for humans).
        println!("{}", serde_json::json!({ "error": message, "exit": code }));
    } else {
        eprintln!("lbctl: {message}");
    }
    ExitCode::from(code)
}
