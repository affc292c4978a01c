//! A real Chromium for the web dashboard's tests, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/setup --tests`): a chromedriver on a free port, a headless
//! session with a fresh profile, screenshots under
//! `target/browser-screenshots/`, and axe-core (`tests/browser/`, npm ci)
//! injected into a page to check its accessibility.
//!
//! [`Setup`] and [`Site`] are the tests' common start: the browser, a
//! controller, and as asked an agent, a fake GitHub and local
//! repositories with a Makefile; `Site` signs in, opens pages and starts
//! the jobs a test's story needs, so that a test reads as that story.
//!
//! A machine that cannot run Chromium makes [`Browser::start`] print
//! "skipped: why" and return `None`, except under `CI`, where the test
//! fails instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::docker::repo_root;
use crate::net::free_addr;
use crate::{
    Agent, Api, Controller, ControllerOpts, FakeGitHub, GitRepo, Job, Permission, RawResponse,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long chromedriver may take to answer after it starts.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// The browser's viewport, width and height in CSS pixels: what a
/// screenshot shows.
pub const VIEWPORT: (u32, u32) = (1280, 800);
/// A phone's viewport (an iPhone 12 to 15 held upright), in CSS pixels.
pub const PHONE_VIEWPORT: (u32, u32) = (390, 844);
/// How long a page may take to load after a click.
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(20);

/// A chromedriver process and one browser session on it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: TempDir,
    /// The window's size less the viewport's: the browser's own frame.
    frame: (u32, u32),
    /// chromedriver's address (`http://127.0.0.1:PORT`).
    driver_url: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// With this set to `1`, [`Browser::doc_screenshot`] also writes the
/// documentation's screenshots (`docs/screenshots/`).
pub const UPDATE_SCREENSHOTS_ENV: &str = "HOBOTNICA_UPDATE_SCREENSHOTS";

/// Whether this run updates the documentation's screenshots.
pub fn updating_doc_screenshots() -> bool {
    std::env::var_os(UPDATE_SCREENSHOTS_ENV).is_some_and(|value| value == "1")
}

/// Where the documentation's screenshots are: `docs/screenshots/`.
pub fn doc_screenshot_dir() -> PathBuf {
    repo_root().join("docs/screenshots")
}

/// Where screenshots go: `target/browser-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    repo_root().join("target/browser-screenshots")
}

fn axe_source_path() -> PathBuf {
    repo_root().join("tests/browser/node_modules/axe-core/axe.min.js")
}

impl Browser {
    /// A headless Chromium, or `None` (after "skipped: why") where this
    /// machine cannot run one; under `CI` that is a failure.
    ///
    /// # Panics
    /// Under `CI` when Chromium cannot be started.
    pub async fn start() -> Option<Browser> {
        match Browser::try_start().await {
            Ok(browser) => Some(browser),
            Err(why) if std::env::var_os("CI").is_some() => {
                panic!("the browser tests must run in CI, but cannot: {why}")
            }
            Err(why) => {
                eprintln!("skipped: browser test: {why}");
                None
            }
        }
    }

    async fn try_start() -> Result<Browser, String> {
        crate::init();
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            if !Path::new(path).is_file() {
                return Err(format!(
                    "{path} is missing (Debian's {package}; ./scripts/setup --tests installs it)"
                ));
            }
        }
        if !axe_source_path().is_file() {
            return Err(format!(
                "{} is missing (./scripts/setup --tests installs it with npm ci)",
                axe_source_path().display()
            ));
        }
        let addr = free_addr();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot start chromedriver: {err}"))?;
        let profile = tempfile::Builder::new()
            .prefix("hobotnica-chromium-")
            .tempdir()
            .map_err(|err| format!("no profile directory: {err}"))?;
        let mut browser_guard = DriverGuard(Some(driver));
        let url = format!("http://{addr}");
        let deadline = tokio::time::Instant::now() + DRIVER_READY_TIMEOUT;
        let http = reqwest::Client::new();
        loop {
            if let Ok(response) = http.get(format!("{url}/status")).send().await
                && response.status().is_success()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "chromedriver did not answer within {DRIVER_READY_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .map_err(|err| format!("chromium did not start: {err}"))?;
        // The viewport (what a screenshot shows) is 1280x800: the window
        // is that plus whatever the browser's own frame takes.
        let frame = client
            .execute(
                "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight];",
                Vec::new(),
            )
            .await
            .map_err(|err| format!("cannot measure the window: {err}"))?;
        let frame = |index: usize| frame[index].as_u64().unwrap_or(0).min(400) as u32;
        let frame = (frame(0), frame(1));
        client
            .set_window_size(VIEWPORT.0 + frame.0, VIEWPORT.1 + frame.1)
            .await
            .map_err(|err| format!("cannot size the window: {err}"))?;
        Ok(Browser {
            client,
            driver: browser_guard.0.take().ok_or("chromedriver is gone")?,
            _profile: profile,
            frame,
            driver_url: url,
        })
    }

    /// Sizes the window so that the viewport is `width` x `height` CSS
    /// pixels (e.g. [`PHONE_VIEWPORT`]).
    pub async fn set_viewport(&self, (width, height): (u32, u32)) {
        self.client
            .set_window_size(width + self.frame.0, height + self.frame.1)
            .await
            .expect("the window resized");
        let inner = self
            .script("return [window.innerWidth, window.innerHeight];")
            .await;
        assert_eq!(inner, json!([width, height]), "the viewport after resizing");
    }

    /// Presses each key in turn through WebDriver key actions (down, then
    /// up), as a keyboard would: characters, or [`fantoccini::key::Key`]
    /// values such as `Key::Tab.into()`.
    pub async fn press(&self, keys: &[char]) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let mut actions = KeyActions::new("keyboard".to_owned());
        for &key in keys {
            actions = actions
                .then(KeyAction::Down { value: key })
                .then(KeyAction::Up { value: key });
        }
        self.client
            .perform_actions(actions)
            .await
            .expect("the key actions performed");
    }

    /// Marks the document now shown, for [`wait_for_next_page`].
    ///
    /// [`wait_for_next_page`]: Browser::wait_for_next_page
    async fn mark_old_page(&self) {
        self.script("window.hobotnicaOldPage = true; return true;")
            .await;
    }

    /// Waits until a document without [`mark_old_page`]'s mark is shown
    /// and has loaded: the page an action led to.
    ///
    /// [`mark_old_page`]: Browser::mark_old_page
    async fn wait_for_next_page(&self) {
        crate::wait_until(PAGE_LOAD_TIMEOUT, "the next page", || async {
            self.client
                .execute(
                    "return !window.hobotnicaOldPage && document.readyState === 'complete';",
                    Vec::new(),
                )
                .await
                .is_ok_and(|loaded| loaded == Value::Bool(true))
        })
        .await;
    }

    /// Presses `keys` (which make the page navigate, e.g. Enter in a
    /// form) and waits for the next page to have loaded, as [`click`]
    /// does.
    ///
    /// [`click`]: Browser::click
    pub async fn press_and_wait(&self, keys: &[char]) {
        self.mark_old_page().await;
        self.press(keys).await;
        self.wait_for_next_page().await;
    }

    /// Types `text` with key actions into whatever has the focus.
    pub async fn type_text(&self, text: &str) {
        self.press(&text.chars().collect::<Vec<_>>()).await;
    }

    /// Presses Tab until `css` matches the focused element, at most
    /// `limit` times; returns how many presses that took, or `None`.
    pub async fn tab_to(&self, css: &str, limit: usize) -> Option<usize> {
        let check = format!(
            "return !!document.activeElement && document.activeElement.matches({});",
            json!(css)
        );
        for presses in 1..=limit {
            self.press(&[fantoccini::key::Key::Tab.into()]).await;
            if self.script(&check).await == Value::Bool(true) {
                return Some(presses);
            }
        }
        None
    }

    /// Opens `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|err| panic!("cannot open {url}: {err}"));
    }

    /// The page's URL now.
    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("the URL")
            .to_string()
    }

    /// The text the page shows (`document.body.innerText`).
    pub async fn text(&self) -> String {
        self.script("return document.body.innerText;")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` in the page and returns its result.
    pub async fn script(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|err| panic!("script failed: {err}: {script}"))
    }

    /// Types `value` into the field `css` finds (after clearing it).
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no field {css}: {err}"));
        field.clear().await.expect("cleared");
        field.send_keys(value).await.expect("typed");
    }

    /// Clicks what `css` finds and waits for the next page to have loaded
    /// (the old document is marked, and the click is done once a document
    /// without the mark is complete).
    pub async fn click(&self, css: &str) {
        self.mark_old_page().await;
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("nothing to click at {css}: {err}"))
            .click()
            .await
            .unwrap_or_else(|err| panic!("cannot click {css}: {err}"));
        self.wait_for_next_page().await;
    }

    /// Runs `script` (which makes the page navigate, e.g. by submitting a
    /// form) and waits for the next page to have loaded, as [`click`] does.
    ///
    /// [`click`]: Browser::click
    pub async fn script_and_wait(&self, script: &str) {
        self.mark_old_page().await;
        self.script(script).await;
        self.wait_for_next_page().await;
    }

    /// The value of cookie `name`, if the browser holds it.
    pub async fn cookie(&self, name: &str) -> Option<String> {
        self.client
            .get_named_cookie(name)
            .await
            .ok()
            .map(|cookie| cookie.value().to_owned())
    }

    /// Whether a JavaScript dialog (an `alert`) is open.
    pub async fn alert_open(&self) -> bool {
        self.client.get_alert_text().await.is_ok()
    }

    /// Saves a screenshot as `target/browser-screenshots/<name>.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("the screenshot directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("the screenshot written");
        path
    }

    /// A screenshot of one of the main pages the README shows: saved as
    /// [`screenshot`] does, and, when [`UPDATE_SCREENSHOTS_ENV`] is `1`,
    /// also as `docs/screenshots/<name>.png` (the 1280x800 viewport).
    ///
    /// [`screenshot`]: Browser::screenshot
    pub async fn doc_screenshot(&self, name: &str) -> PathBuf {
        let path = self.screenshot(name).await;
        if updating_doc_screenshots() {
            let dir = doc_screenshot_dir();
            std::fs::create_dir_all(&dir).expect("the docs' screenshot directory");
            std::fs::copy(&path, dir.join(format!("{name}.png")))
                .expect("the docs' screenshot written");
        }
        path
    }

    /// Runs axe-core on the page and fails on any serious or critical
    /// violation, naming each.
    pub async fn assert_accessible(&self, page: &str) {
        let source = std::fs::read_to_string(axe_source_path()).expect("axe-core's source");
        self.script(&format!("{source}\nreturn true;")).await;
        let violations = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                   .then(results => done(results.violations
                     .filter(v => v.impact === 'serious' || v.impact === 'critical')
                     .map(v => ({ id: v.id, impact: v.impact, help: v.help,
                                  nodes: v.nodes.map(n => n.html) }))))
                   .catch(err => done([{ id: 'axe-error', help: String(err) }]));",
                Vec::new(),
            )
            .await
            .expect("axe-core ran");
        let list = violations.as_array().cloned().unwrap_or_default();
        assert!(
            list.is_empty(),
            "axe-core found serious or critical violations on {page}: {}",
            serde_json::to_string_pretty(&violations).unwrap_or_default()
        );
    }

    /// This browser's processes (found by the profile directory in their
    /// command line, or a parent's): each as `/proc/<pid>` and whether it
    /// is a renderer.
    fn processes(&self) -> Vec<(PathBuf, bool)> {
        let profile = self._profile.path().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            let renderer = cmdline.contains("--type=renderer");
            if !cmdline.contains(profile.as_str()) && !cmdline.contains("--type=") {
                continue;
            }
            // A child's command line does not always name the profile:
            // count it when its parent chain reaches one that does.
            if !cmdline.contains(profile.as_str()) && !descends_from(&dir, &profile) {
                continue;
            }
            found.push((dir, renderer));
        }
        found
    }

    /// The resident memory of this browser's processes: the sum over all
    /// of them (shared pages counted in each) and the largest renderer's.
    pub fn memory(&self) -> BrowserMemory {
        let mut memory = BrowserMemory::default();
        for (dir, renderer) in self.processes() {
            let rss = std::fs::read_to_string(dir.join("status"))
                .ok()
                .and_then(|status| {
                    status
                        .lines()
                        .find(|line| line.starts_with("VmRSS:"))
                        .and_then(|line| line.split_whitespace().nth(1))
                        .and_then(|kib| kib.parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1024;
            memory.total_bytes += rss;
            if renderer {
                memory.largest_renderer_bytes = memory.largest_renderer_bytes.max(rss);
            }
        }
        memory
    }

    /// The CPU time (user + system, from `/proc/<pid>/stat`) this
    /// browser's running processes have used so far, summed. A process
    /// that has exited no longer counts.
    pub fn cpu_time(&self) -> Duration {
        // Linux reports these times in USER_HZ ticks, 100 a second.
        const TICKS_PER_SECOND: u64 = 100;
        let ticks: u64 = self
            .processes()
            .iter()
            .filter_map(|(dir, _)| {
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                let (_, rest) = stat.rsplit_once(')')?;
                // After the command: state is field 3, utime 14, stime 15.
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let user = fields.get(11)?.parse::<u64>().ok()?;
                let system = fields.get(12)?.parse::<u64>().ok()?;
                Some(user + system)
            })
            .sum();
        Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
    }

    /// Chromium's own performance metrics (the DevTools protocol's
    /// `Performance.getMetrics`, through chromedriver) as name and value,
    /// e.g. `JSHeapUsedSize`; `None` where chromedriver does not relay it.
    pub async fn devtools_metrics(&self) -> Option<Vec<(String, f64)>> {
        let session = self.client.session_id().await.ok()??;
        let endpoint = format!("{}/session/{session}/goog/cdp/execute", self.driver_url);
        let http = reqwest::Client::new();
        let call = |cmd: &'static str| {
            http.post(&endpoint)
                .json(&json!({ "cmd": cmd, "params": {} }))
                .send()
        };
        call("Performance.enable")
            .await
            .ok()?
            .error_for_status()
            .ok()?;
        let answer: Value = call("Performance.getMetrics")
            .await
            .ok()?
            .error_for_status()
            .ok()?
            .json()
            .await
            .ok()?;
        let metrics = answer["value"]["metrics"].as_array()?;
        Some(
            metrics
                .iter()
                .filter_map(|metric| {
                    Some((
                        metric["name"].as_str()?.to_owned(),
                        metric["value"].as_f64()?,
                    ))
                })
                .collect(),
        )
    }

    /// Ends the browser session.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// Resident memory of a browser's processes, in bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrowserMemory {
    pub total_bytes: u64,
    pub largest_renderer_bytes: u64,
}

/// Whether a parent of the process at `/proc/<pid>` has `needle` in its
/// command line.
fn descends_from(dir: &Path, needle: &str) -> bool {
    let mut dir = dir.to_path_buf();
    for _ in 0..8 {
        let Some(parent) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
            })
        else {
            return false;
        };
        if parent == "0" || parent == "1" {
            return false;
        }
        dir = Path::new("/proc").join(parent);
        if std::fs::read(dir.join("cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        {
            return true;
        }
    }
    false
}

/// Kills chromedriver if starting the session fails half-way.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long the fixture waits for a job to reach a point it asks for.
const FIXTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "hobotnica_session";

/// A plain HTTP client that does not follow redirects and sends the
/// session `cookie` when there is one: what a page or a download answers,
/// headers included.
pub fn http(cookie: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(cookie) = cookie {
        headers.insert(
            reqwest::header::COOKIE,
            format!("{SESSION_COOKIE}={cookie}")
                .parse()
                .expect("a cookie"),
        );
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .build()
        .expect("a client")
}

impl Browser {
    /// Signs in through the sign-in page with `token` (and `login`, a
    /// GitHub user's name, empty for the admin) and waits for the page the
    /// form leads to.
    pub async fn sign_in(&self, base: &str, token: &str, login: &str) {
        self.goto(&format!("{base}/sign-in")).await;
        self.fill("#token", token).await;
        self.fill("#login", login).await;
        self.click("form[action='/sign-in'] button").await;
    }

    /// Signs out with the header's button.
    pub async fn sign_out(&self) {
        self.click("form[action='/sign-out'] button").await;
    }

    /// Fails unless the page's URL ends with `path` (e.g. `/repos`).
    pub async fn assert_url_ends_with(&self, path: &str) {
        let url = self.url().await;
        assert!(url.ends_with(path), "{url}");
    }

    /// Marks the document now shown, so that [`assert_not_reloaded`] can
    /// tell whether it is still the one shown.
    ///
    /// [`assert_not_reloaded`]: Browser::assert_not_reloaded
    pub async fn mark_page(&self) {
        self.script("window.hobotnicaSamePage = true; return true;")
            .await;
    }

    /// Fails unless the document [`mark_page`] marked is still shown: the
    /// page changed in place, with no reload or navigation.
    ///
    /// [`mark_page`]: Browser::mark_page
    pub async fn assert_not_reloaded(&self) {
        assert_eq!(
            self.script("return window.hobotnicaSamePage === true;")
                .await,
            json!(true),
            "no reload"
        );
    }

    /// A plain HTTP client holding this browser's session cookie, if any.
    pub async fn session_http(&self) -> reqwest::Client {
        http(self.cookie(SESSION_COOKIE).await.as_deref())
    }

    /// The stylesheets and scripts the page links to, as URLs.
    pub async fn asset_urls(&self) -> Vec<String> {
        self.script(
            "return [...document.querySelectorAll('link[rel=stylesheet], script[src]')].map(e => e.href || e.src);",
        )
        .await
        .as_array()
        .expect("asset URLs")
        .iter()
        .map(|url| url.as_str().expect("a URL").to_owned())
        .collect()
    }

    /// The lines a job page's log view shows, each as its line number and
    /// its text.
    pub async fn log_lines(&self) -> Vec<(String, String)> {
        let lines = self
            .script(
                "return [...document.querySelectorAll('#log .line')]
                   .map(l => [l.querySelector('.ln').textContent, l.querySelector('.tx').textContent]);",
            )
            .await;
        serde_json::from_value(lines).expect("the shown lines")
    }

    /// The text of the last line a job page's log view shows (empty when
    /// it shows none).
    pub async fn last_log_line(&self) -> String {
        self.script(
            "const l = document.querySelector('#log .block:last-child .line:last-child .tx');
             return l ? l.textContent : '';",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits until a job page's log view shows a line that is `needle`.
    pub async fn wait_for_log_line(&self, needle: &str) {
        let what = format!("the page to show {needle:?}");
        crate::wait_until(FIXTURE_TIMEOUT, &what, || async {
            self.log_lines()
                .await
                .iter()
                .any(|(_, text)| text == needle)
        })
        .await;
    }

    /// Waits until a job page shows the job's state as `state`.
    pub async fn wait_for_job_state(&self, state: &str) {
        let what = format!("the page to show the state {state}");
        crate::wait_until(FIXTURE_TIMEOUT, &what, || async {
            self.script("return document.querySelector('#job-state').textContent;")
                .await
                == json!(state)
        })
        .await;
    }
}

impl BrowserMemory {
    /// The larger of each figure of `self` and `other`: a running peak.
    pub fn max(self, other: BrowserMemory) -> BrowserMemory {
        BrowserMemory {
            total_bytes: self.total_bytes.max(other.total_bytes),
            largest_renderer_bytes: self
                .largest_renderer_bytes
                .max(other.largest_renderer_bytes),
        }
    }
}

/// What a browser test starts with, before its own story: a controller
/// always; an agent, a fake GitHub, local repositories and their Makefile
/// when asked. [`Setup::start`] starts it all.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    agent: bool,
    github: bool,
    makefile: Option<String>,
    repos: Vec<String>,
}

impl Setup {
    /// A controller alone.
    pub fn new() -> Setup {
        Setup::default()
    }

    /// With an agent connected, to run jobs.
    pub fn agent(mut self) -> Setup {
        self.agent = true;
        self
    }

    /// With a fake GitHub the controller signs GitHub users in with (its
    /// users and repositories are added by the test: [`Site::github`]).
    pub fn github(mut self) -> Setup {
        self.github = true;
        self
    }

    /// With the local git repository registered as `local/NAME` (one
    /// repository may be registered under several names).
    pub fn repo(mut self, name: &str) -> Setup {
        self.repos.push(name.to_owned());
        self
    }

    /// With `makefile` committed as the local repository's Makefile,
    /// instead of the harness's ([`crate::git::MAKEFILE`]).
    pub fn makefile(mut self, makefile: String) -> Setup {
        self.makefile = Some(makefile);
        self
    }

    /// Starts the browser first (`None` where this machine cannot run
    /// one, as [`Browser::start`] says), then the fake GitHub, the
    /// controller and the agent, and registers the repositories.
    pub async fn start(self) -> Option<Site> {
        let browser = Browser::start().await?;
        let github = match self.github {
            true => Some(FakeGitHub::start().await),
            false => None,
        };
        let controller = Controller::start(ControllerOpts {
            extra_args: github
                .as_ref()
                .map(FakeGitHub::controller_args)
                .unwrap_or_default(),
            ..ControllerOpts::default()
        })
        .await;
        let agent = match self.agent {
            true => Some(Agent::start_default(&controller).await),
            false => None,
        };
        let repo = GitRepo::new();
        if let Some(makefile) = &self.makefile {
            repo.commit(&[("Makefile", makefile)], "the test's Makefile");
        }
        let api = controller.api();
        for name in &self.repos {
            api.register_repo(name, &repo.url()).await;
        }
        Some(Site {
            browser,
            _agent: agent,
            controller,
            github,
            repo,
        })
    }
}

/// A browser test's world: the browser and the processes it talks to.
/// Dropping it stops them all.
pub struct Site {
    pub browser: Browser,
    _agent: Option<Agent>,
    pub controller: Controller,
    github: Option<FakeGitHub>,
    /// The local git repository the [`Setup::repo`] names are registered
    /// with.
    pub repo: GitRepo,
}

impl Site {
    /// The dashboard's address (`http://127.0.0.1:PORT`).
    pub fn base(&self) -> String {
        self.controller.url()
    }

    /// The admin's REST client (a new one after a controller restart).
    pub fn api(&self) -> Api {
        self.controller.api()
    }

    /// The fake GitHub.
    ///
    /// # Panics
    /// When the site was set up without one ([`Setup::github`]).
    pub fn github(&self) -> &FakeGitHub {
        self.github
            .as_ref()
            .expect("a site set up with a fake GitHub")
    }

    /// Adds the GitHub user `login` to the fake GitHub with a token of its
    /// own, and returns the token.
    pub fn github_user(&self, login: &str) -> String {
        let token = format!("ghp_{login}0123456789");
        self.github().add_user(login, &token);
        token
    }

    /// Adds `octo-org/NAME` (branch `main`) to the fake GitHub, with each
    /// token's permission on it.
    pub fn github_repo(&self, name: &str, grants: &[(&str, Permission)]) {
        let github = self.github();
        github.add_repo("octo-org", name, "main");
        for (token, permission) in grants {
            github.grant(token, &format!("octo-org/{name}"), *permission);
        }
    }

    /// Opens `path` (e.g. `/jobs/7`) of the dashboard.
    pub async fn open(&self, path: &str) {
        self.browser.goto(&format!("{}{path}", self.base())).await;
    }

    /// A `GET` of the dashboard's `path` with the browser's session cookie
    /// (when it holds one), as a plain client sees the answer: redirects
    /// are not followed.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.browser
            .session_http()
            .await
            .get(format!("{}{path}", self.base()))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// [`Site::get`], once the browser is checked to hold a session.
    pub async fn get_signed_in(&self, path: &str) -> reqwest::Response {
        assert!(
            self.browser.cookie(SESSION_COOKIE).await.is_some(),
            "a session"
        );
        self.get(path).await
    }

    /// Signs in with `token` and `login` (see [`Browser::sign_in`]).
    pub async fn sign_in(&self, token: &str, login: &str) {
        self.browser.sign_in(&self.base(), token, login).await;
    }

    /// Signs in with the admin token.
    pub async fn sign_in_as_admin(&self) {
        self.sign_in(&self.controller.admin_token, "").await;
    }

    /// Starts `make gate` in `repo` with `$E2E_GATE` at `gate` and waits
    /// until it is waiting for that file: a job that runs until the file
    /// exists (or it is cancelled).
    pub async fn job_waiting_at(&self, repo: &str, gate: &Path) -> Job {
        let api = self.api();
        let job = api
            .run_job(
                repo,
                json!({ "target": "gate", "env": { "E2E_GATE": gate.to_string_lossy() } }),
            )
            .await;
        api.wait_for_log(job.id, "waiting for the gate", FIXTURE_TIMEOUT)
            .await;
        job
    }

    /// A job of `local/demo` that runs until cancelled.
    pub async fn job_running_until_cancelled(&self) -> Job {
        self.job_waiting_at("local/demo", Path::new("/nonexistent/gate"))
            .await
    }

    /// Registers the fake GitHub's `octo-org/NAME` as the GitHub user
    /// `login` (whose token is `token`) and returns the answer (201, its
    /// webhook secret in the body).
    pub async fn register_github_repo(&self, login: &str, token: &str, name: &str) -> RawResponse {
        let registered = self
            .as_github_user(
                login,
                token,
                "/api/v1/repos",
                &json!({ "owner": "octo-org", "name": name }),
            )
            .await;
        assert_eq!(registered.status, 201, "{}", registered.text());
        registered
    }

    /// Queues a job of the GitHub repository `repo` (`owner/name`) as the
    /// GitHub user `login` with the REST API's `body`, and returns the
    /// answer (202, the job in the body).
    pub async fn queue_github_job(
        &self,
        login: &str,
        token: &str,
        repo: &str,
        body: &Value,
    ) -> RawResponse {
        let queued = self
            .as_github_user(login, token, &format!("/api/v1/repos/{repo}/jobs"), body)
            .await;
        assert_eq!(queued.status, 202, "{}", queued.text());
        queued
    }

    /// A JSON `POST` to the REST API as the GitHub user `login`.
    async fn as_github_user(
        &self,
        login: &str,
        token: &str,
        path: &str,
        body: &Value,
    ) -> RawResponse {
        Api::new(self.base(), Some(token))
            .raw_with_headers(
                reqwest::Method::POST,
                path,
                Some(body.to_string().as_bytes()),
                &[
                    ("x-github-username", login),
                    ("content-type", "application/json"),
                ],
            )
            .await
    }

    /// Ends the browser session; the processes stop when the site is
    /// dropped.
    pub async fn close(self) {
        self.browser.close().await;
    }
}
