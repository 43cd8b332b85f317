//! The API's handlers over a daemon whose data plane is the in-memory fake: real
//! HTTP on a real Unix socket, through lbctl's own client.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use crate::{
    api::{
        self,
        client::{Client, ClientError},
    },
    config::Config,
    dataplane::{fake::FakeDataplane, Limits},
    desired::BackendSpec,
    model::{LocalInterface, ServiceKey},
    reconcile::Known,
    shell::{availd, daemon::Daemon, dird, handle::DaemonHandle, neighbor::NeighborTable},
};

const SVC: &str = "tcp/198.18.0.100:80";

struct Api {
    client: Client,
    daemon: DaemonHandle,
    dir: PathBuf,
    /// Where the metrics router listens (a loopback port of the test's own).
    metrics: std::net::SocketAddr,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn limits() -> Limits {
    Limits {
        services: 4,
        backends: 8,
        tables: crate::dataplane::layout::TableBounds {
            min: 251,
            max: 4093,
        },
        ring_cells: 1 << 20,
        sphere_rules: 16,
        tx_ports: 4,
    }
}

async fn api(test: &str) -> Api {
    api_over(test, FakeDataplane::new(limits())).await
}

/// As `api`, over `fake` (`max_services` set to its limit).
async fn api_over(test: &str, fake: FakeDataplane) -> Api {
    let dir = std::env::temp_dir().join(format!("lb-api-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "[node]\nname = \"t\"\nstate_dir = \"{d}/state\"\napi_socket = \"{d}/api.sock\"\n\n\
         [dataplane]\ninterfaces = [{{ name = \"eth0\" }}]\nmax_services = {max}\nmaglev_max_size = 4093\n\n\
         [[service]]\nvip = \"198.18.0.100\"\nport = 80\nprotocol = \"tcp\"\nmaglev_size = 4093\n\n\
         [[service.backend]]\naddress = \"198.18.0.11\"\nmac = \"02:00:00:00:00:0b\"\n",
        d = dir.display(),
        max = fake.limits.services,
    );
    // Written, for the tests that reload it.
    std::fs::write(dir.join("lbd.toml"), &text).unwrap();
    let config = Config::parse(&dir.join("lbd.toml"), &text).unwrap();
    std::fs::create_dir_all(&config.node.state_dir).unwrap();
    let known = Known {
        desired: config.desired.clone(),
        interfaces: vec![LocalInterface {
            name: "eth0".into(),
            ifindex: 2,
            mac: [2, 0, 0, 0, 0, 2],
            mtu: 1500,
        }],
        directory_fed: true,
        ..Known::default()
    };
    let socket = config.node.api_socket.clone();
    let state_dir = config.node.state_dir.clone();
    let daemon = Daemon::with_dataplane(config, fake, known).unwrap();
    let daemon = DaemonHandle::spawn(daemon, Duration::from_secs(1));
    let neighbors = std::sync::Arc::new(NeighborTable::new().unwrap());
    let directory = dird::start(daemon.clone(), neighbors.clone(), None);
    let availability = availd::start(Default::default(), &state_dir, daemon.clone(), None);
    let (shutdown, _) = tokio::sync::mpsc::channel(1);
    let state = super::AppState {
        daemon: daemon.clone(),
        registry_key: None,
        rejects: Default::default(),
        shutdown,
        neighbors,
        cluster: None,
        directory,
        availability,
        config_path: Some(dir.join("lbd.toml")),
    };
    let listener = super::bind_api(&socket).unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    let metrics_state = state.clone();
    tokio::spawn(async move { axum::serve(metrics, super::metrics_router(metrics_state)).await });
    tokio::spawn(async move { axum::serve(listener, super::api_router(state)).await });
    Api {
        client: Client::new(socket),
        daemon,
        dir,
        metrics: metrics_addr,
    }
}

fn key() -> ServiceKey {
    SVC.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn with_mac(last: u8) -> Option<BackendSpec> {
    Some(BackendSpec {
        mac: Some([2, 0, 0, 0, 0, last]),
        ..BackendSpec::default()
    })
}

/// What the fake data plane holds for the service: the backends' addresses.
async fn held(a: &Api) -> Vec<IpAddr> {
    let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    views
        .iter()
        .find(|v| v.key == key())
        .map(|v| v.backends.iter().map(|b| b.address).collect())
        .unwrap_or_default()
}

/// Adds 198.18.0.12 (MAC ending in 0c) to the service through the API.
async fn add_backend_12(a: &Api) -> api::Applied {
    let add = api::AddBackend {
        service: key(),
        backend: ip("198.18.0.12"),
        spec: with_mac(12),
    };
    a.client.post("/v1/backends/add", &add).await.unwrap()
}

#[tokio::test]
async fn an_added_backend_is_answered_as_a_change_and_reaches_the_data_plane() {
    let a = api("add").await;
    let r = add_backend_12(&a).await;
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert_eq!(held(&a).await, [ip("198.18.0.11"), ip("198.18.0.12")]);
    // The same again is no change.
    let r = add_backend_12(&a).await;
    assert!(r.changes.is_empty());
}

#[tokio::test]
async fn a_change_beyond_the_backend_slots_is_refused_with_its_reason_and_changes_nothing() {
    let a = api("refused").await;
    let before = (*a.daemon.now().desired).clone();
    let mut too_big = before.clone();
    let svc = too_big.services.get_mut(&key()).unwrap();
    for i in 20..40u8 {
        svc.backends
            .insert(ip(&format!("198.18.0.{i}")), with_mac(i).unwrap());
    }
    let e = a
        .client
        .post::<_, api::Applied>(
            "/v1/apply",
            &api::Apply {
                desired: too_big,
                dry_run: false,
            },
        )
        .await
        .unwrap_err();
    let ClientError::Daemon {
        message, status, ..
    } = e
    else {
        panic!("{e}")
    };
    assert_eq!(status, 400);
    assert!(message.contains("backend slots"), "{message}");
    assert_eq!(*a.daemon.now().desired, before);
    assert_eq!(held(&a).await, [ip("198.18.0.11")]);
}

#[tokio::test]
async fn a_dry_run_lists_the_changes_and_makes_none() {
    let a = api("dry").await;
    let mut new = (*a.daemon.now().desired).clone();
    new.services.get_mut(&key()).unwrap().backends.clear();
    let r: api::Applied = a
        .client
        .post(
            "/v1/apply",
            &api::Apply {
                desired: new,
                dry_run: true,
            },
        )
        .await
        .unwrap();
    assert!(r.dry_run);
    assert_eq!(r.changes.len(), 1);
    assert_eq!(held(&a).await, [ip("198.18.0.11")]);
}

#[tokio::test]
async fn unknown_services_and_backends_are_404_with_a_way_out() {
    let a = api("unknown").await;
    let e = a
        .client
        .post::<_, api::Applied>(
            "/v1/backends/drain",
            &api::DrainBackend {
                service: "tcp/198.18.0.100:81".parse().unwrap(),
                backend: ip("198.18.0.11"),
                drain: true,
            },
        )
        .await
        .unwrap_err();
    let ClientError::Daemon {
        message, status, ..
    } = e
    else {
        panic!("{e}")
    };
    assert_eq!(status, 404);
    assert!(message.contains("lbctl service list"), "{message}");
}

/// A scrape of the metrics port, as Prometheus does it (plain HTTP/1.1).
async fn scrape(a: &Api) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(a.metrics).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

#[tokio::test]
async fn metrics_separate_verdicts_from_lookups_name_the_node_and_build_and_always_set_reasons() {
    let a = api("metrics").await;
    let m = scrape(&a).await;
    assert!(m.contains("lb_node_info{node=\"t\"} 1"), "{m}");
    assert!(
        m.contains(&format!(
            "lb_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            crate::COMMIT
        )),
        "{m}"
    );
    // A packet is one verdict: lookups and epoch decisions are series of their own.
    let outcomes: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("lb_dataplane_packets_total{"))
        .collect();
    assert!(!outcomes.is_empty(), "{m}");
    assert!(
        outcomes
            .iter()
            .all(|l| !l.contains("\"lru_") && !l.contains("\"epoch_")),
        "{outcomes:?}"
    );
    // Nor are the forwarding modes (a forwarded packet is also a tx or a redirect)
    // or the flows a full connection table did not enter.
    assert!(
        outcomes
            .iter()
            .all(|l| !l.contains("\"fwd_") && !l.contains("\"conn_")),
        "{outcomes:?}"
    );
    for mode in ["l2", "ipip", "gue"] {
        assert!(
            m.contains(&format!("lb_dataplane_forwarded_total{{mode=\"{mode}\"}}")),
            "{m}"
        );
    }
    assert!(m.contains("\nlb_dataplane_conn_table_full_total "), "{m}");
    for result in ["hit", "miss", "stale"] {
        assert!(
            m.contains(&format!(
                "lb_dataplane_conn_lookups_total{{result=\"{result}\"}}"
            )),
            "{m}"
        );
    }
    assert!(!m.contains("=\"\""), "a label without a value: {m}");
    assert!(
        m.contains(&format!(
            "lb_service_unavailable{{service=\"{SVC}\",reason=\"none\"}} 0"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "lb_backend_healthy{{service=\"{SVC}\",backend=\"198.18.0.11\"}} 1"
        )),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_answered_once_the_snapshot_that_holds_it_is_published() {
    let a = api("read-own").await;
    // A reader right after its own change must find it published: the patient reads
    // compare the published generation with their last read's.
    for i in 0..200u32 {
        let before = a.daemon.now().generation;
        let changes = a
            .daemon
            .call(move |d| {
                let mut new = d.desired().clone();
                let backends = &mut new.services.get_mut(&key()).unwrap().backends;
                if i % 2 == 0 {
                    backends.insert(ip("198.18.0.12"), with_mac(12).unwrap());
                } else {
                    backends.remove(&ip("198.18.0.12"));
                }
                d.apply_edit(new, key())
            })
            .await
            .unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            a.daemon.now().generation > before,
            "change {i} was answered before it was published"
        );
    }
}

/// A job that holds the daemon (as the apply of 10,000 services does) until
/// `release` is sent; returned once it runs.
async fn hold_daemon(a: &Api) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (started, running) = tokio::sync::oneshot::channel::<()>();
    let busy = a.daemon.clone();
    let job = tokio::spawn(async move {
        busy.call(move |_| {
            let _ = started.send(());
            let _ = held.recv_timeout(Duration::from_secs(10));
        })
        .await
    });
    running.await.unwrap();
    (release, job)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_long_job_after_a_change_is_answered_with_the_last_counters() {
    let a = api("busy-after").await;
    let first = scrape(&a).await;
    // A change publishes a new generation after the counters were read: the jobs
    // that follow a large apply (the SPM manager's, the feed's) hold the daemon then.
    let before = a.daemon.now().generation;
    let r = add_backend_12(&a).await;
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert!(a.daemon.now().generation > before);
    let (release, job) = hold_daemon(&a).await;
    let during = tokio::time::timeout(Duration::from_secs(5), scrape(&a))
        .await
        .expect("the scrape waited for the daemon's job");
    assert!(during.contains("lb_node_info{node=\"t\"} 1"), "{during}");
    assert_eq!(
        first
            .lines()
            .filter(|l| l.starts_with("lb_backend_"))
            .count(),
        during
            .lines()
            .filter(|l| l.starts_with("lb_backend_"))
            .count(),
        "the last counters read: before the change"
    );
    assert!(!job.is_finished(), "the job was still running");
    release.send(()).unwrap();
    job.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_given_up_during_a_long_job_are_not_run_after_it() {
    let a = api("given-up").await;
    let (release, job) = hold_daemon(&a).await;
    // Five readers that stop waiting while the job holds the daemon (a scrape does,
    // after READ_PATIENCE).
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..5 {
        let ran = ran.clone();
        let read = a.daemon.read(move |_| {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        assert!(tokio::time::timeout(Duration::from_millis(20), read)
            .await
            .is_err());
    }
    release.send(()).unwrap();
    job.await.unwrap();
    // Jobs run in order: once this one has, every read before it has been taken.
    let answered = a.daemon.read(|_| 1).await;
    assert_eq!(answered, 1, "a read still waited for is run");
    assert_eq!(
        ran.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "reads nobody waits for were run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_during_a_long_job_is_answered_with_the_last_counters() {
    let a = api("busy").await;
    let first = scrape(&a).await;
    let (release, job) = hold_daemon(&a).await;
    // Answered while the job still holds the daemon: from the last counters read.
    let during = tokio::time::timeout(Duration::from_secs(5), scrape(&a))
        .await
        .expect("the scrape waited for the daemon's job");
    assert!(during.contains("lb_node_info{node=\"t\"} 1"), "{during}");
    assert_eq!(
        first
            .lines()
            .filter(|l| l.starts_with("lb_service_"))
            .count(),
        during
            .lines()
            .filter(|l| l.starts_with("lb_service_"))
            .count()
    );
    assert!(!job.is_finished(), "the job was still running");
    release.send(()).unwrap();
    job.await.unwrap();
}

/// Room for 64 services, at 25 ms a write: 40 services hold the maps for a second,
/// as 10,000 real ones do; and the count of writes, seen from the test.
fn paced() -> (FakeDataplane, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let mut fake = FakeDataplane::new(Limits {
        services: 64,
        backends: 128,
        ..limits()
    });
    fake.pause = Duration::from_millis(25);
    let seen = fake.seen.clone();
    (fake, seen)
}

/// Waits (2 s at most) until the data plane has been written past `before`.
async fn began_writing(calls: &impl Fn() -> u64, before: u64) {
    for _ in 0..400 {
        if calls() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(calls() > before, "the write began");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_a_large_apply_are_answered_between_its_batches_and_changes_after_it() {
    let (fake, seen) = paced();
    let a = api_over("batches", fake).await;
    let calls = || seen.load(std::sync::atomic::Ordering::SeqCst);
    let service = |port: u16| -> ServiceKey { format!("tcp/198.18.0.100:{port}").parse().unwrap() };
    // A list read before: what a reader that stops waiting would be answered with.
    let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    assert_eq!(views.len(), 1);
    let mut big = (*a.daemon.now().desired).clone();
    let one = big.services[&key()].clone();
    for port in 1000..1040u16 {
        big.services.insert(service(port), one.clone());
    }
    let before = calls();
    let client = a.client.clone();
    let apply = tokio::spawn(async move {
        client
            .post::<_, api::Applied>(
                "/v1/apply",
                &api::Apply {
                    desired: big,
                    dry_run: false,
                },
            )
            .await
    });
    began_writing(&calls, before).await;

    // A read: answered between two batches, fresh (the services being applied).
    let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    let written = calls() - before;
    assert!(
        written < 40 && !apply.is_finished(),
        "the list waited for the apply ({written} of 40 services written)"
    );
    assert_eq!(views.len(), 41, "the list shows the services being applied");
    let generation = a.daemon.now().generation;

    // A change: answered after the apply, and both hold.
    let add = api::AddBackend {
        service: service(1039),
        backend: ip("198.18.0.12"),
        spec: with_mac(12),
    };
    let r: api::Applied = a.client.post("/v1/backends/add", &add).await.unwrap();
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert!(
        apply.is_finished(),
        "the change was answered before the apply"
    );
    let applied = apply.await.unwrap().unwrap();
    let named: std::collections::BTreeSet<ServiceKey> =
        applied.changes.iter().map(|c| c.service()).collect();
    assert_eq!(named.len(), 40, "{:?}", applied.changes);
    assert!(a.daemon.now().generation > generation);
    let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    assert_eq!(views.len(), 41);
    let last = views.iter().find(|v| v.key == service(1039)).unwrap();
    assert_eq!(last.backends.len(), 2, "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_reload_is_written_in_batches_and_becomes_the_files_services() {
    let (fake, seen) = paced();
    let a = api_over("reload-batches", fake).await;
    let calls = || seen.load(std::sync::atomic::Ordering::SeqCst);
    let file = a.dir.join("lbd.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    for port in 1000..1040u16 {
        text.push_str(&format!(
            "\n[[service]]\nvip = \"198.18.0.100\"\nport = {port}\nprotocol = \"tcp\"\nmaglev_size = 4093\n\n\
             [[service.backend]]\naddress = \"198.18.0.11\"\nmac = \"02:00:00:00:00:0b\"\n"
        ));
    }
    std::fs::write(&file, text).unwrap();
    let before = calls();
    let client = a.client.clone();
    let reload = tokio::spawn(async move {
        client
            .post::<_, api::Reloaded>("/v1/reload", &serde_json::json!({}))
            .await
    });
    began_writing(&calls, before).await;
    let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    let written = calls() - before;
    assert!(
        written < 40 && !reload.is_finished(),
        "the list waited for the reload ({written} of 40 services written)"
    );
    assert_eq!(views.len(), 41);
    let r = reload.await.unwrap().unwrap();
    assert!(r.services_applied);
    let named: std::collections::BTreeSet<ServiceKey> =
        r.changes.iter().map(|c| c.service()).collect();
    assert_eq!(named.len(), 40, "{:?}", r.changes);
    // The file's services are now the config's: the same file again changes nothing.
    let again: api::Reloaded = a
        .client
        .post("/v1/reload", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(again.changes.is_empty(), "{:?}", again.changes);
}

/// The tests of a large table take both cores of a small machine, and a read's
/// timing is what they judge: one at a time.
static LARGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The backends of `with_a_large_service`'s service.
const LARGE_BACKENDS: u32 = 200;

/// An API whose service has a table of 2,097,169 cells (pinned), laid out apart
/// (`LAID_APART`), and 200 backends: its writes take long, its views little (with
/// 20,000 backends, a read of the views took 350-500 ms in a debug build, so that
/// under load a read waited past `READ_PATIENCE` and was answered from before the
/// change, which is what the tests must tell apart).
async fn with_a_large_service(test: &str) -> Api {
    let mut fake = FakeDataplane::new(Limits {
        services: 4,
        backends: 1_000,
        tables: crate::dataplane::layout::TableBounds {
            min: 251,
            max: 4_194_319,
        },
        ring_cells: 1 << 24,
        ..limits()
    });
    fake.pause = Duration::ZERO;
    let a = api_over(test, fake).await;
    let mut big = (*a.daemon.now().desired).clone();
    let svc = big.services.get_mut(&key()).unwrap();
    svc.config.maglev_size = 2_097_169;
    for i in 0..LARGE_BACKENDS {
        let addr = IpAddr::from([198, 19, (i >> 8) as u8, i as u8]);
        svc.backends.insert(addr, with_mac(11).unwrap());
    }
    a.daemon.apply(big).await.unwrap();
    a
}

/// Reads the services until `change` is answered: how many reads, and how many of
/// them were answered before it and already `show` it (fresh, not the views kept
/// from before it); then `change`'s answer.
async fn reads_while<T>(
    a: &Api,
    change: tokio::task::JoinHandle<T>,
    show: impl Fn(&api::ServiceView) -> bool,
) -> (usize, usize, T) {
    let (mut reads, mut during) = (0, 0);
    while !change.is_finished() && reads < 2_000 {
        reads += 1;
        let views: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
        if show(&views[0]) && !change.is_finished() {
            during += 1;
        }
    }
    (reads, during, change.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_a_change_to_a_service_of_a_large_table_are_answered_while_it_is_laid_out() {
    let _one = LARGE.lock().await;
    let a = with_a_large_service("laid-apart").await;
    // One backend more: its table is laid out again while the reads go on.
    let client = a.client.clone();
    let add = tokio::spawn(async move {
        let add = api::AddBackend {
            service: key(),
            backend: ip("198.18.0.12"),
            spec: with_mac(12),
        };
        client
            .post::<_, api::Applied>("/v1/backends/add", &add)
            .await
    });
    let (reads, during, r) = reads_while(&a, add, |v| {
        v.backends.iter().any(|b| b.address == ip("198.18.0.12"))
    })
    .await;
    let r = r.unwrap();
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert!(
        during > 0,
        "no read was answered while the change was written ({reads} reads)"
    );
    assert_eq!(
        held(&a).await.len() as u32,
        LARGE_BACKENDS + 2,
        "198.18.0.11, the service's 200 and the one added"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_a_health_verdict_on_a_large_service_are_answered_while_its_table_is_laid_out()
{
    let _one = LARGE.lock().await;
    // As the health checker sends a verdict: a backend of the service fails its
    // check, and its table is made again without it.
    let a = with_a_large_service("verdict-laid-apart").await;
    let sick = ip("198.19.0.7");
    let vip = key().addr;
    let before = a.daemon.now().digests[&vip];
    let daemon = a.daemon.clone();
    let verdict = tokio::spawn(async move {
        daemon
            .change(move |d| d.set_health(key(), sick, false))
            .await
    });
    let (reads, during, r) = reads_while(&a, verdict, |v| {
        v.backends.iter().any(|b| b.address == sick && !b.healthy)
    })
    .await;
    r.unwrap();
    assert!(
        during > 0,
        "no read was answered while the verdict was written ({reads} reads)"
    );
    // The table written is another one (without the failed backend).
    assert_ne!(a.daemon.now().digests[&vip], before);
}

#[tokio::test]
async fn a_summary_of_the_services_counts_their_backends_without_listing_them() {
    let a = api("summary").await;
    add_backend_12(&a).await;
    let full: Vec<api::ServiceView> = a.client.get("/v1/services").await.unwrap();
    assert_eq!(full[0].backends.len(), 2);
    assert_eq!(full[0].backend_count, 2);
    let summary: Vec<api::ServiceView> = a.client.get("/v1/services?summary=true").await.unwrap();
    assert_eq!(summary.len(), full.len());
    assert!(summary[0].backends.is_empty());
    assert_eq!(summary[0].backend_count, 2);
    assert_eq!(summary[0].service, full[0].service);
    let stats: api::Stats = a.client.get("/v1/stats?summary=true").await.unwrap();
    assert!(stats.services[0].backends.is_empty());
    assert_eq!(stats.services[0].backend_count, 2);
    let stats: api::Stats = a.client.get("/v1/stats").await.unwrap();
    assert_eq!(stats.services[0].backends.len(), 2);
    // A bad query is refused with the API's JSON error.
    let bad = a
        .client
        .get::<Vec<api::ServiceView>>("/v1/services?summary=maybe")
        .await;
    assert!(bad.is_err(), "{bad:?}");
}
