//! Headless Chromium driven through chromedriver (WebDriver: plain HTTP and JSON),
//! both in a lab namespace and spoken to with curl there, so that a test can keep a
//! page open and read its DOM while the lab changes under it.

use std::{
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::netns::Netns;

const PORT: u16 = 9515;

/// An open page; chromedriver and its browser end when this is dropped.
pub struct Browser<'a> {
    ns: &'a Netns,
    session: String,
    driver: Child,
}

impl<'a> Browser<'a> {
    /// Starts chromedriver in `ns` and opens `url` in a new headless browser whose
    /// profile lives in `profile`.
    pub fn open(ns: &'a Netns, url: &str, profile: &Path) -> Result<Browser<'a>> {
        let driver = ns
            .command("chromedriver")
            .arg(format!("--port={PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: the browsers it starts go with it.
            .process_group(0)
            .spawn()
            .context("starting chromedriver (installed by scripts/install-toolchain.sh)")?;
        let mut b = Browser {
            ns,
            session: String::new(),
            driver,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.call("GET", "/status", &json!({}))?["value"]["ready"] != true {
            if Instant::now() > deadline {
                bail!("chromedriver did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let session = b.call(
            "POST",
            "/session",
            &json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu",
                         format!("--user-data-dir={}", profile.display())]
            }}}}),
        )?;
        b.session = session["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no browser session: {session}"))?
            .to_string();
        b.call(
            "POST",
            &format!("/session/{}/url", b.session),
            &json!({ "url": url }),
        )?;
        Ok(b)
    }

    /// A WebDriver request; `Null` when chromedriver does not answer (yet).
    fn call(&self, method: &str, path: &str, body: &Value) -> Result<Value> {
        let out = self.ns.exec(
            "curl",
            &[
                "-s",
                "-m",
                "20",
                "-X",
                method,
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                &format!("http://127.0.0.1:{PORT}{path}"),
            ],
        );
        Ok(match out {
            Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        })
    }

    /// The visible text of the first element matching `selector` ("" if none).
    pub fn text(&self, selector: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.innerText : '';",
            serde_json::to_string(selector).expect("a string")
        );
        self.eval(&script).as_str().unwrap_or("").to_string()
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            &json!({"script": script, "args": []}),
        )
        .map(|v| v["value"].clone())
        .unwrap_or(Value::Null)
    }

    /// Polls `done` on the page's state every 50 ms until it holds or `limit`
    /// passes; returns how long it took.
    pub fn wait_for(&self, limit: Duration, done: impl Fn(&Self) -> bool) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done(self) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), &json!({}));
        }
        let pgid = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}
