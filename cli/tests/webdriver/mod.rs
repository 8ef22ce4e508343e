//! A real browser for the lab tests: Debian's Chromium, headless, driven through ChromeDriver's
//! W3C WebDriver protocol (JSON over HTTP, spoken with curl), sized as a phone.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium of a phone's size (412 × 915 CSS pixels).
    pub fn phone() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run chromedriver (Debian's chromium-driver; deploy/lab/deps installs it)");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser { driver, base, session: String::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while browser.call("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--hide-scrollbars"],
            "mobileEmulation": {"deviceMetrics": {"width": 412, "height": 915, "pixelRatio": 2.0}},
        }}}});
        let created = browser.call("POST", "/session", Some(caps)).expect("a Chromium session");
        browser.session = created["sessionId"].as_str().expect("a session id").to_string();
        browser
    }

    /// Loads `url` and waits for the page to finish loading.
    pub fn open(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `js` (a function body) in the page and returns what it returns.
    pub fn script(&self, js: &str) -> Value {
        self.session_call("POST", "/execute/sync", json!({ "script": js, "args": [] }))
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self.session_call("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().expect("a base64 PNG"))
            .expect("a base64 PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = (!body.is_null()).then_some(body);
        self.call(method, &path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// One WebDriver command; its `value`, or the error it answered.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "60", "-X", method, &format!("{}{path}", self.base)]);
        if let Some(body) = body {
            curl.args(["-H", "Content-Type: application/json", "--data-binary", &body.to_string()]);
        }
        let out = curl.output().map_err(|e| format!("run curl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let reply: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", out.stdout))?;
        match reply["value"].get("error") {
            Some(error) => Err(format!("{error}: {}", reply["value"]["message"])),
            None => Ok(reply["value"].clone()),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
