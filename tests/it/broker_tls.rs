//! The broker link over TLS, as an operator sets it up: Mosquitto with a certificate from a CA
//! made for the test, a gateway and a worker told to trust that CA, and a job run through it. A
//! client trusting another CA is stopped by its own TLS check, and both binaries refuse plaintext
//! to another machine unless the operator names the host.

use std::process::Command;

use rumqttc::v5::{AsyncClient, ConnectionError};
use xpand::jobs::JobStatus;
use xpand_worker::{BrokerAddress, BrokerLink};

use crate::common::{forecast_job, free_port, PrivateBroker, TestApp, TestCa};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_mqtts_and_a_broker_signed_by_a_stranger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ca = TestCa::new(dir.path(), "operator");
    let _broker = PrivateBroker::start_tls(dir.path(), port, &ca, "127.0.0.1").await;
    let address: BrokerAddress = format!("mqtts://127.0.0.1:{port}").parse().unwrap();
    let link = BrokerLink::new(address.clone(), Some(&ca.ca_file()), &[]).unwrap();

    // The test's workers take the gateway's link, so both ends speak TLS.
    let mut app = TestApp::spawn_with(|c| c.mqtt = link).await;
    app.start_worker().await;
    let (_, key) = app.customer(50_000_000).await;
    let (status, job) = app.submit(&key, &forecast_job(12, 4)).await;
    assert!(status.is_success(), "{status}");
    let job = app.wait_for(&key, job.id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(crate::common::forecasts(&job).len(), 12);

    // A client that trusts only another CA fails its own certificate check; nothing is sent.
    let stranger = TestCa::new(dir.path(), "stranger");
    let link = BrokerLink::new(address, Some(&stranger.ca_file()), &[]).unwrap();
    let (_client, mut eventloop) = AsyncClient::new(link.mqtt_options("stranger".into()), 8);
    let refused = eventloop
        .poll()
        .await
        .expect_err("an unknown issuer is refused");
    assert!(
        matches!(&refused, ConnectionError::Tls(e) if e.to_string().contains("UnknownIssuer")),
        "{refused:?}"
    );

    app.assert_ledger_invariants().await;
    app.teardown().await;
}

/// Plaintext to a broker on another machine is a startup error naming the setting that allows
/// it, for the gateway and the worker alike; nothing is connected.
#[test]
fn plaintext_to_another_machine_needs_the_operator_to_name_the_host() {
    let xpand = env!("CARGO_BIN_EXE_xpand");
    let worker = std::path::Path::new(xpand).with_file_name("xpand-worker");
    let dir = tempfile::tempdir().unwrap();
    let node_key = dir.path().join("node.key");
    let gateway_key = "ab".repeat(32);
    let runs = [
        Command::new(xpand)
            .arg("serve")
            .env("MQTT_URL", "mqtt://192.0.2.10:1883")
            .env("XPAND_GATEWAY_KEY_FILE", dir.path().join("gateway.key"))
            .env("XPAND_AUDITOR_KEY_FILE", dir.path().join("auditor.key"))
            .output()
            .unwrap(),
        Command::new(&worker)
            .args([
                "--mqtt-url",
                "mqtt://broker.example.net:1883",
                "--generate-key",
            ])
            .arg("--key-file")
            .arg(&node_key)
            .args(["--gateway-key", &gateway_key])
            .output()
            .expect("xpand-worker runs (cargo builds it with the workspace)"),
    ];
    for out in runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("refusing plaintext") && stderr.contains("XPAND_MQTT_PLAINTEXT_HOSTS"),
            "{stderr}"
        );
    }
}
