//! The fleet's sampled answer checks (`FleetOptions::full_check_every`, which `fleetgw bench
//! provision` sets): the sampled devices get the full check (returned key parsed and matched
//! to the certificate, chain verified), the others the checks of form, and the default checks
//! every device in full.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fleetgw::identity::CertificateAuthority;
use fleetgw::sim::{run_fleet, FailureReason};

mod fleet_support;

use fleet_support::{embedded_broker, options, start_responder, Script};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_devices_get_the_full_check_and_the_others_its_form() {
    let broker = embedded_broker().await;
    let ca = Arc::new(CertificateAuthority::generate("test cloud CA").unwrap());
    // Every device lets the gateway make its key; 3 and 4 get a key that is not the
    // certificate's, 5 and 6 a certificate from a CA they do not trust.
    let script = Script {
        wrong_key: BTreeSet::from([3, 4]),
        foreign_ca: BTreeSet::from([5, 6]),
        ..Script::default()
    };
    start_responder(broker.listen_addr(), ca.clone(), script).await;
    let failures = |every: u32, run: &'static str| {
        let mut opts = options(broker.listen_addr(), 8, run);
        opts.cloud_ca_pem = Some(ca.cert_pem().to_string());
        opts.full_check_every = every;
        async move {
            let report = run_fleet(opts, |_| {}).await.unwrap();
            report
                .failures
                .iter()
                .map(|f| (f.n, f.reason.clone()))
                .collect::<BTreeMap<u32, FailureReason>>()
        }
    };

    // Devices 1, 3, 5, 7 are checked in full: 3 and 5 fail, 4 and 6 pass on their form.
    let sampled = failures(2, "sample").await;
    assert_eq!(sampled.keys().copied().collect::<Vec<_>>(), [3, 5]);
    assert_eq!(
        sampled[&3],
        FailureReason::KeyMismatch("the returned private key")
    );
    assert!(
        matches!(&sampled[&5], FailureReason::Chain(_)),
        "{sampled:?}"
    );

    // By default every answer is checked in full.
    let all = failures(1, "all").await;
    assert_eq!(all.keys().copied().collect::<Vec<_>>(), [3, 4, 5, 6]);
}
