//! Several hosts on one machine, and the faults of a real network between them.
//!
//! Postgres, Redis, the broker (Mosquitto, TLS with a CA made for the run), two gateway replicas
//! and two workers each get a network namespace of their own, joined by veth pairs through a
//! bridge in another namespace; the test reaches the gateways the same way, as a client on the
//! network would. Every byte crosses a real network stack and none leaves the machine.
//!
//! Under a steady stream of forecast jobs, one after another:
//! - a worker is partitioned from the broker;
//! - a gateway replica is partitioned from Postgres;
//! - the broker is partitioned from everything for 20 s;
//! - the worker links get 100 ms of latency and 5 % packet loss. The kernel here has no netem,
//!   so a userspace relay in the bridge namespace forwards each worker's frames and delays or
//!   drops them: TCP retransmits for real.
//!
//! After each fault heals: every job ended and succeeded, each was held and released once and
//! charged its quote, nodes were paid each shard once, the ledger balances, and `xpand verify`
//! passes on the sealed chain. The figures per fault (first job failed over, work resumed, jobs
//! finished during it) are printed and recorded in docs/deploy.md.
//!
//! `make test` runs short faults; `make soak` sets `XPAND_NETFAULT_SECS` for long ones.
//! Partitions are iptables drops; everything the test makes (namespaces, links, processes) is
//! removed when it ends or fails, and namespaces left by a run that was killed are removed by the
//! next.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;
use xpand_protocol::NodeKey;

use crate::common::{
    assert_all_succeeded, assert_every_job_settled, assert_ledger_invariants, assert_verifies,
    forecast_job, try_submit, wait_until_ready, Process, Submitted, TestCa,
};

const PREFIX: &str = "xpn";

/// One host on the test network: its namespace and address.
#[derive(Clone)]
struct Host {
    ns: String,
    ip: String,
}

impl Host {
    /// Runs `command` in this host's namespace and waits for it; panics if it fails.
    fn sh(&self, command: &str) {
        sh(&format!("ip netns exec {} sh -c '{command}'", self.ns));
    }

    /// A command run in this host's namespace, its output appended to `{log}.log` in `dir`
    /// (a failed run's message quotes it).
    fn spawn(&self, program: &Path, dir: &Path, log: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{log}.log")))
            .unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        command
    }

    /// Drops every packet between this host and `peer`, both ways, here.
    fn partition_from(&self, peer: &Host) {
        self.sh(&format!(
            "iptables -A OUTPUT -d {ip} -j DROP && iptables -A INPUT -s {ip} -j DROP",
            ip = peer.ip
        ));
    }

    /// Drops every packet on this host's link.
    fn isolate(&self) {
        self.sh("iptables -A OUTPUT -o eth0 -j DROP && iptables -A INPUT -i eth0 -j DROP");
    }

    fn heal(&self) {
        self.sh("iptables -F");
    }
}

fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        out.status.success(),
        "`{command}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, links and bridge of one run, removed when dropped.
struct Network {
    bridge: String,
    hosts: Vec<Host>,
    subnet: String,
}

impl Network {
    fn new() -> Self {
        remove_abandoned_networks();
        let pid = std::process::id();
        let network = Self {
            bridge: format!("{PREFIX}{pid}-bridge"),
            hosts: Vec::new(),
            subnet: format!("10.213.{}", pid % 250),
        };
        sh(&format!(
            "ip netns add {b} && ip -n {b} link set lo up && \
             ip -n {b} link add br0 type bridge && ip -n {b} link set br0 up",
            b = network.bridge
        ));
        // The test itself is a client on the network, through a link from its own namespace.
        let client = format!("{PREFIX}{pid}");
        sh(&format!(
            "ip link add {client} type veth peer name client netns {b} && \
             ip addr add {s}.1/24 dev {client} && ip link set {client} up && \
             ip -n {b} link set client master br0 up",
            b = network.bridge,
            s = network.subnet
        ));
        no_offloads(None, &client);
        no_offloads(Some(&network.bridge), "client");
        network
    }

    /// A host at `.{last}` linked to the bridge; `relayed` puts a [`LossyRelay`] on its link.
    fn host(&mut self, name: &str, last: u8, relayed: bool) -> Host {
        let host = Host {
            ns: format!("{PREFIX}{}-{name}", std::process::id()),
            ip: format!("{}.{last}", self.subnet),
        };
        let b = &self.bridge;
        sh(&format!(
            "ip netns add {ns} && ip -n {ns} link set lo up && \
             ip link add eth0 netns {ns} type veth peer name {name} netns {b} && \
             ip -n {ns} addr add {ip}/24 dev eth0 && ip -n {ns} link set eth0 up && \
             ip -n {b} link set {name} up",
            ns = host.ns,
            ip = host.ip
        ));
        no_offloads(Some(&host.ns), "eth0");
        no_offloads(Some(b), name);
        if relayed {
            // host ⇄ {name} ⇄ relay ⇄ {name}-r ⇄ {name}-b (a bridge port)
            sh(&format!(
                "ip -n {b} link add {name}-r type veth peer name {name}-b && \
                 ip -n {b} link set {name}-r up && ip -n {b} link set {name}-b master br0 up && \
                 ip -n {b} link set {name} promisc on && ip -n {b} link set {name}-r promisc on"
            ));
            no_offloads(Some(b), &format!("{name}-r"));
            no_offloads(Some(b), &format!("{name}-b"));
        } else {
            sh(&format!("ip -n {b} link set {name} master br0"));
        }
        self.hosts.push(host.clone());
        host
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veth pairs, and so their peers.
        for ns in self.hosts.iter().map(|h| &h.ns).chain([&self.bridge]) {
            kill_namespace(ns);
        }
    }
}

/// Frames are relayed and checked as they are: no checksum or segmentation left to a NIC that
/// a veth does not have.
fn no_offloads(ns: Option<&str>, dev: &str) {
    let exec = ns
        .map(|ns| format!("ip netns exec {ns} "))
        .unwrap_or_default();
    sh(&format!(
        "{exec}ethtool -K {dev} tx off rx off tso off gso off gro off >/dev/null 2>&1 || true"
    ));
}

fn kill_namespace(ns: &str) {
    let _ = Command::new("sh")
        .args([
            "-c",
            &format!("ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}"),
        ])
        .output();
}

/// Namespaces of earlier runs whose process is gone (killed before it could clean up).
fn remove_abandoned_networks() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace(&name);
        }
    }
}

/// Forwards Ethernet frames between two interfaces of the bridge namespace, each direction
/// delayed and thinned by the current impairment. A userspace stand-in for netem.
struct LossyRelay {
    impairment: Arc<Mutex<(Duration, f64)>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LossyRelay {
    fn start(ns: &str, a: &str, b: &str) -> Self {
        let (ns, a, b) = (ns.to_string(), a.to_string(), b.to_string());
        // Sockets belong to the namespace they were made in: make them on a thread that moved.
        let (sock_a, sock_b) = std::thread::spawn(move || {
            enter_namespace(&ns);
            (packet_socket(&a), packet_socket(&b))
        })
        .join()
        .unwrap();
        let (sock_a, sock_b) = (Arc::new(sock_a), Arc::new(sock_b));
        let mut relay = Self {
            impairment: Arc::new(Mutex::new((Duration::ZERO, 0.0))),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for (from, to) in [(sock_a.clone(), sock_b.clone()), (sock_b, sock_a)] {
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
            let (impairment, stop) = (relay.impairment.clone(), relay.stop.clone());
            relay.threads.push(std::thread::spawn(move || {
                let mut rng = rand::thread_rng();
                while !stop.load(Ordering::Relaxed) {
                    let Some(frame) = receive_frame(&from) else {
                        continue;
                    };
                    let (delay, loss) = *impairment.lock().unwrap();
                    if loss > 0.0 && rng.gen_bool(loss) {
                        continue;
                    }
                    let _ = tx.send((Instant::now() + delay, frame));
                }
            }));
            let stop = relay.stop.clone();
            relay.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    // SAFETY: a valid socket and a buffer of the given length.
                    unsafe {
                        libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
                    }
                }
            }));
        }
        relay
    }

    fn impair(&self, delay: Duration, loss: f64) {
        *self.impairment.lock().unwrap() = (delay, loss);
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn enter_namespace(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    // SAFETY: setns on this thread with a namespace file it holds open.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// A raw socket bound to one interface, reading every frame it carries (with a timeout, so a
/// stopping relay notices).
fn packet_socket(dev: &str) -> OwnedFd {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor owned right away; sizes are the structs'.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as i32);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let name = std::ffi::CString::new(dev).unwrap();
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(addr.sll_ifindex > 0, "no interface {dev}");
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind to {dev}: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        fd
    }
}

/// The next frame that arrived on the socket's interface; not those it sent itself.
fn receive_frame(socket: &OwnedFd) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; 65_536];
    // SAFETY: the buffer and address outlive the call; their lengths are passed.
    unsafe {
        let mut from: libc::sockaddr_ll = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        let n = libc::recvfrom(
            socket.as_raw_fd(),
            frame.as_mut_ptr().cast(),
            frame.len(),
            0,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut len,
        );
        if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            return None;
        }
        frame.truncate(n as usize);
    }
    Some(frame)
}

/// The services and the xpand processes on the network.
struct Cluster {
    dir: PathBuf,
    subnet: String,
    ca_file: PathBuf,
    postgres: Host,
    redis: Host,
    broker: Host,
    prefix: String,
    gateway_key: NodeKey,
}

impl Cluster {
    fn db_url(&self) -> String {
        format!("postgres://postgres@{}:5432/postgres", self.postgres.ip)
    }

    fn mqtt_url(&self) -> String {
        format!("mqtts://{}:8883", self.broker.ip)
    }

    /// A Postgres of the run's own on its host, its data in the run's directory.
    fn start_postgres(&self) -> Process {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .flatten()
            .map(|e| e.path().join("bin"))
            .max()
            .expect("PostgreSQL is installed (scripts/ensure-services.sh)");
        let data = self.dir.join("pgdata");
        std::fs::create_dir(&data).unwrap();
        sh(&format!("chown postgres: {}", data.display()));
        sh(&format!(
            "runuser -u postgres -- {}/initdb -D {} -U postgres -A trust --no-sync >/dev/null",
            bin.display(),
            data.display()
        ));
        // Every host of the run's private network may connect.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all all {}.0/24 trust\n",
                self.subnet
            ),
        )
        .unwrap();
        let mut command = self
            .postgres
            .spawn(Path::new("runuser"), &self.dir, "postgres");
        command
            .args(["-u", "postgres", "--"])
            .arg(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", &format!("listen_addresses={}", self.postgres.ip)])
            .args(["-c", &format!("unix_socket_directories={}", data.display())])
            .args(["-c", "fsync=off", "-c", "max_connections=200"]);
        Process(command.spawn().expect("postgres runs"))
    }

    fn start_redis(&self) -> Process {
        let mut command = self
            .redis
            .spawn(Path::new("redis-server"), &self.dir, "redis");
        command.args(["--bind", &self.redis.ip, "--port", "6379", "--save", ""]);
        command.args(["--appendonly", "no", "--protected-mode", "no"]);
        Process(command.spawn().expect("redis-server runs"))
    }

    fn start_broker(&self, ca: &TestCa) -> Process {
        let (cert, key) = ca.server_cert(&self.broker.ip);
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener 8883 {}\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 allow_anonymous true\nset_tcp_nodelay true\n",
                self.broker.ip,
                self.ca_file.display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let mut command = self
            .broker
            .spawn(Path::new("mosquitto"), &self.dir, "broker");
        command.arg("-c").arg(&conf);
        Process(command.spawn().expect("mosquitto runs"))
    }

    fn start_gateway(&self, host: &Host) -> Process {
        let mut command = host.spawn(Path::new(env!("CARGO_BIN_EXE_xpand")), &self.dir, &host.ns);
        command
            .arg("serve")
            .env("XPAND_LISTEN", format!("{}:8080", host.ip))
            .env("DATABASE_URL", self.db_url())
            .env("REDIS_URL", format!("redis://{}:6379", self.redis.ip))
            .env("MQTT_URL", self.mqtt_url())
            .env("XPAND_MQTT_CA_FILE", &self.ca_file)
            .env("XPAND_TOPIC_PREFIX", &self.prefix)
            .env("XPAND_REDIS_PREFIX", &self.prefix)
            .env("XPAND_GATEWAY_KEY_FILE", self.dir.join("gateway.key"))
            .env("XPAND_AUDITOR_KEY_FILE", self.dir.join("auditor.key"))
            .env("XPAND_FILES_DIR", self.dir.join("files"))
            .env("XPAND_SCRATCH_DIR", self.dir.join("scratch"))
            .env("XPAND_LEASE_SECS", "2")
            .env("XPAND_NODE_TTL_SECS", "3")
            .env("XPAND_SEAL_INTERVAL_SECS", "1")
            .env("XPAND_JOB_TIMEOUT_SECS", "600")
            .env("XPAND_MAX_SHARD_ATTEMPTS", "50")
            .env("XPAND_VERIFY_NEW_NODE_SHARDS", "0")
            .env("XPAND_DB_POOL", "6")
            .env("RUST_LOG", "warn,xpand::broker=info");
        Process(command.spawn().expect("xpand serve runs"))
    }

    fn start_worker(&self, host: &Host, key_file: &Path) -> Process {
        let exe = Path::new(env!("CARGO_BIN_EXE_xpand")).with_file_name("xpand-worker");
        let mut command = host.spawn(&exe, &self.dir, &host.ns);
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("--key-file")
            .arg(key_file)
            .args(["--gateway-key", self.gateway_key.id()])
            .args(["--max-concurrent-shards", "2", "--inference-threads", "1"])
            .args(["--heartbeat-ms", "500"])
            .env("XPAND_MQTT_URL", self.mqtt_url())
            .env("XPAND_MQTT_CA_FILE", &self.ca_file)
            .env("XPAND_TOPIC_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn");
        Process(command.spawn().expect("xpand-worker runs"))
    }
}

async fn wait_listening(host: &Host, port: u16, what: &str) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while tokio::net::TcpStream::connect((host.ip.as_str(), port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} listens on {}:{port}", host.ip));
}

/// What the clients saw: each accepted job, and when a submit had to go to another gateway.
#[derive(Default)]
struct Submissions {
    jobs: Vec<Uuid>,
    failovers: Vec<(Uuid, DateTime<Utc>)>,
}

/// Whether clients submit, how many submits are under way, and which gateways a load
/// balancer would send them to.
struct Stream {
    flowing: AtomicBool,
    stop: AtomicBool,
    submitting: AtomicUsize,
    healthy: Vec<AtomicBool>,
}

impl Stream {
    fn new(gateways: usize) -> Self {
        Self {
            flowing: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            submitting: AtomicUsize::new(0),
            healthy: (0..gateways).map(|_| AtomicBool::new(true)).collect(),
        }
    }

    /// Stops submitting and waits for the submits under way to be answered (a submitter
    /// that panicked never answers: the test fails here rather than hang).
    async fn pause(&self) {
        self.flowing.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(200);
        while self.submitting.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "a submit never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The load balancer's health check (like deploy/compose/haproxy.cfg's): a gateway is in while
/// its `/readyz` answers 200 within a second, asked every second.
async fn health_checker(gateways: Vec<String>, stream: Arc<Stream>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    while !stream.stop.load(Ordering::SeqCst) {
        for (base, healthy) in gateways.iter().zip(&stream.healthy) {
            let ready = http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            healthy.store(ready, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Submits forecast jobs until stopped, while the stream flows, to the healthy gateways in turn,
/// as a load balancer would: a submit that fails or times out takes its gateway out until the
/// health check puts it back, and goes to the other with the same idempotency key.
async fn submitter(
    gateways: Vec<String>,
    key: String,
    stream: Arc<Stream>,
    seen: Arc<Mutex<Submissions>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut turn = rand::thread_rng().gen_range(0..gateways.len());
    while !stream.stop.load(Ordering::SeqCst) {
        stream.submitting.fetch_add(1, Ordering::SeqCst);
        if !stream.flowing.load(Ordering::SeqCst) {
            stream.submitting.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let idempotency = Uuid::new_v4().to_string();
        let body = forecast_job(16, 4);
        let mut failed_over = false;
        // Long enough for the longest fault; back-pressure while a fault holds work back is
        // waited out like any client would.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            turn += 1;
            if !stream.healthy[turn % gateways.len()].load(Ordering::SeqCst) {
                turn += 1;
            }
            let base = &gateways[turn % gateways.len()];
            match try_submit(&http, base, &key, &idempotency, &body).await {
                Submitted::Accepted(id) => {
                    let mut seen = seen.lock().unwrap();
                    seen.jobs.push(id);
                    if failed_over {
                        seen.failovers.push((id, Utc::now()));
                    }
                    break;
                }
                Submitted::Unavailable => {
                    failed_over = true;
                    stream.healthy[turn % gateways.len()].store(false, Ordering::SeqCst);
                }
                Submitted::Busy => {}
            }
            assert!(
                Instant::now() < deadline,
                "no gateway took the job for 3 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stream.submitting.fetch_sub(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// One fault's figures.
struct Recovery {
    fault: &'static str,
    held_s: f64,
    /// From the fault to the first finished job that had to go around it.
    first_failover_s: Option<f64>,
    /// From healing to the first job finished, and to the first second at 80 % of the
    /// throughput before the fault (`None`: not within a minute).
    first_job_s: f64,
    resumed_s: Option<f64>,
    jobs_during: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_survive_partitions_an_isolated_broker_and_lossy_links() {
    let fault_secs: u64 = std::env::var("XPAND_NETFAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    // The services drop to their own users; they read the run's files through it.
    sh(&format!("chmod 755 {}", dir.path().display()));
    let mut network = Network::new();
    let postgres = network.host("pg", 2, false);
    let redis = network.host("redis", 3, false);
    let broker = network.host("broker", 4, false);
    let gateway_hosts = [
        network.host("gw1", 11, false),
        network.host("gw2", 12, false),
    ];
    let worker_hosts = [network.host("w1", 21, true), network.host("w2", 22, true)];
    let relays: Vec<LossyRelay> = ["w1", "w2"]
        .iter()
        .map(|w| LossyRelay::start(&network.bridge, w, &format!("{w}-r")))
        .collect();

    let ca = TestCa::new(dir.path(), "network");
    let cluster = Cluster {
        dir: dir.path().to_path_buf(),
        subnet: network.subnet.clone(),
        ca_file: ca.ca_file(),
        postgres,
        redis,
        broker: broker.clone(),
        prefix: "xpand".into(),
        gateway_key: NodeKey::create_file(&dir.path().join("gateway.key")).unwrap(),
    };
    // The auditor key is left to the gateways, which start together and race to make it, as
    // replicas on a shared volume do.
    let mut processes = vec![
        cluster.start_postgres(),
        cluster.start_redis(),
        cluster.start_broker(&ca),
    ];
    wait_listening(&cluster.postgres, 5432, "postgres").await;
    wait_listening(&cluster.redis, 6379, "redis").await;
    wait_listening(&broker, 8883, "mosquitto").await;
    for host in &gateway_hosts {
        processes.push(cluster.start_gateway(host));
    }
    let bases: Vec<String> = gateway_hosts
        .iter()
        .map(|h| format!("http://{}:8080", h.ip))
        .collect();
    for (base, host) in bases.iter().zip(&gateway_hosts) {
        let log = dir.path().join(format!("{}.log", host.ns));
        wait_until_ready(base, Duration::from_secs(90), || {
            format!(
                " over mqtts://; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .await;
    }
    let db = PgPool::connect(&cluster.db_url()).await.unwrap();
    let mut worker_ids = Vec::new();
    for (i, host) in worker_hosts.iter().enumerate() {
        let path = dir.path().join(format!("node-{i}.key"));
        let key = NodeKey::create_file(&path).unwrap();
        xpand::nodes::register(&db, key.id(), &format!("net-{i}"))
            .await
            .unwrap();
        processes.push(cluster.start_worker(host, &path));
        worker_ids.push(key.id().to_string());
    }
    let (_, api_key) = xpand::accounts::create_customer(&db, "network", 1_000_000_000)
        .await
        .unwrap();

    let stream = Arc::new(Stream::new(bases.len()));
    let health = tokio::spawn(health_checker(bases.clone(), stream.clone()));
    let seen = Arc::new(Mutex::new(Submissions::default()));
    let submitters: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(submitter(
                bases.clone(),
                api_key.clone(),
                stream.clone(),
                seen.clone(),
            ))
        })
        .collect();

    // Work flows before anything breaks: both workers took shards.
    let mut baseline_from = Utc::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut figures = Vec::new();
    let fault = Duration::from_secs(fault_secs);
    let faults: [(&str, Duration); 4] = [
        ("a worker partitioned from the broker", fault),
        ("a gateway partitioned from Postgres", fault),
        (
            "the broker partitioned from everything",
            Duration::from_secs(20),
        ),
        ("100 ms and 5 % loss on worker links", fault),
    ];
    let mut baseline_to = Utc::now();
    for (n, (name, held)) in faults.into_iter().enumerate() {
        let rate = finished_per_sec(&db, baseline_from, baseline_to).await;
        assert!(rate > 0.0, "no job finished before `{name}`");
        let at = Utc::now();
        match n {
            0 => worker_hosts[0].partition_from(&broker),
            1 => gateway_hosts[0].partition_from(&cluster.postgres),
            2 => broker.isolate(),
            _ => relays
                .iter()
                .for_each(|r| r.impair(Duration::from_millis(100), 0.05)),
        }
        tokio::time::sleep(held).await;
        let healed = Utc::now();
        match n {
            0 => worker_hosts[0].heal(),
            1 => gateway_hosts[0].heal(),
            2 => broker.heal(),
            _ => relays.iter().for_each(|r| r.impair(Duration::ZERO, 0.0)),
        }
        let (first_job_s, resumed_s) = wait_resumed(&db, healed, rate * 0.8).await;
        if n == 1 {
            // The replica that could settle nothing left the shared subscriptions, so results
            // went to the other one, and came back once healed.
            let log =
                std::fs::read_to_string(dir.path().join(format!("{}.log", gateway_hosts[0].ns)))
                    .unwrap();
            let left = log.find("leaving the shared subscriptions");
            let rejoined = log.rfind("joining the shared subscriptions again");
            assert!(
                left.is_some() && rejoined > left,
                "gw1 did not leave and rejoin the shared subscriptions:\n{log}"
            );
        }
        // Stop the stream, let every job end, and check the money and the chain.
        stream.pause().await;
        let (ids, failovers) = {
            let seen = seen.lock().unwrap();
            (seen.jobs.clone(), seen.failovers.clone())
        };
        assert_all_succeeded(&db, &ids, Duration::from_secs(90), &format!("after {name}")).await;
        assert_every_job_settled(&db).await;
        assert_ledger_invariants(&db).await;
        let first_failover_s = first_failover(&db, &failovers, &worker_ids, at).await;
        let jobs_during: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE finished_at BETWEEN $1 AND $2")
                .bind(at)
                .bind(healed)
                .fetch_one(&db)
                .await
                .unwrap();
        // Sealing runs every second: let it take what the fault's jobs wrote.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_verifies(&bases[1]).await;
        figures.push(Recovery {
            fault: name,
            held_s: held.as_secs_f64(),
            first_failover_s,
            first_job_s,
            resumed_s,
            jobs_during,
        });
        baseline_from = Utc::now();
        stream.flowing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(4)).await;
        baseline_to = Utc::now();
    }
    stream.stop.store(true, Ordering::SeqCst);
    for s in submitters {
        s.await.unwrap();
    }
    health.await.unwrap();
    let jobs = seen.lock().unwrap().jobs.len();
    eprintln!("network faults: {jobs} jobs, faults of {fault_secs} s (the broker's 20 s)");
    for f in &figures {
        eprintln!(
            "  {}: held {:.0} s, first job around it {}; after healing: a job finished in \
             {:.1} s, 80 % throughput {}; {} jobs finished during it",
            f.fault,
            f.held_s,
            f.first_failover_s
                .map_or("not needed".into(), |s| format!("{s:.1} s after the fault")),
            f.first_job_s,
            f.resumed_s
                .map_or("not within a minute".into(), |s| format!("in {s:.1} s")),
            f.jobs_during
        );
    }
    db.close().await;
    drop(processes);
    drop(relays);
    drop(network);
}

async fn finished_per_sec(db: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE finished_at BETWEEN $1 AND $2")
            .bind(from)
            .bind(to)
            .fetch_one(db)
            .await
            .unwrap();
    n as f64 / (to - from).num_milliseconds().max(1) as f64 * 1000.0
}

/// Seconds from `healed` to the first job finished, which must come within a minute (work
/// resumes), and to the end of the first second in which at least `rate` jobs finished, if one
/// does within that minute (a figure, not a check: the machine may be busy with other tests).
async fn wait_resumed(db: &PgPool, healed: DateTime<Utc>, rate: f64) -> (f64, Option<f64>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first_job = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if first_job.is_none() {
            let first: Option<DateTime<Utc>> =
                sqlx::query_scalar("SELECT min(finished_at) FROM jobs WHERE finished_at > $1")
                    .bind(healed)
                    .fetch_one(db)
                    .await
                    .unwrap();
            first_job = first.map(|t| (t - healed).num_milliseconds() as f64 / 1000.0);
        }
        let full: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM w.t - $1)::float8 + 1
             FROM generate_series($1, now() - interval '1 second', interval '250 milliseconds') AS w(t)
             WHERE (SELECT count(*) FROM jobs
                    WHERE finished_at >= w.t AND finished_at < w.t + interval '1 second') >= $2
             ORDER BY w.t LIMIT 1",
        )
        .bind(healed)
        .bind(rate.ceil().max(1.0) as i64)
        .fetch_optional(db)
        .await
        .unwrap();
        match (first_job, full) {
            (Some(first), Some(full)) => return (first, Some(full)),
            (Some(first), None) if Instant::now() > deadline => return (first, None),
            (None, _) if Instant::now() > deadline => {
                panic!("no job finished within a minute of healing")
            }
            _ => {}
        }
    }
}

/// Seconds from the fault to the first finished job that went around it: one a client had to
/// submit again to the other gateway, or one whose shard was taken back from a node.
async fn first_failover(
    db: &PgPool,
    failovers: &[(Uuid, DateTime<Utc>)],
    nodes: &[String],
    at: DateTime<Utc>,
) -> Option<f64> {
    let resubmitted: Vec<Uuid> = failovers
        .iter()
        .filter(|(_, when)| *when > at)
        .map(|(id, _)| *id)
        .collect();
    let finished: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT min(j.finished_at) FROM jobs j WHERE j.finished_at > $1 AND (j.id = ANY($2)
            OR EXISTS (SELECT 1 FROM node_failures f JOIN shards s ON s.id = f.shard_id
                       WHERE s.job_id = j.id AND f.node_id = ANY($3) AND f.at > $1))",
    )
    .bind(at)
    .bind(&resubmitted)
    .bind(nodes)
    .fetch_one(db)
    .await
    .unwrap();
    finished.map(|t| (t - at).num_milliseconds() as f64 / 1000.0)
}
