//! The codes a user can see, each with what it means and what to do: every `errorCode` a
//! device (on `/rejected` or its status topic), an operator (a device's `lastError`) or an
//! admin API client can get from fleetgw itself, and every exit code of the commands.
//!
//! Why a table here rather than next to each code: the user guide's reference pages (Error
//! codes, Exit codes) are generated from it (`cargo run --example generate -- docs
//! docs/src/reference`), and `tests/docs_reference.rs` checks it against the source both ways
//! (a code the source uses and the table lacks, or a code the table lists and the source no
//! longer uses, fails the test). The codes themselves stay where they are decided (the
//! `error_code` modules of `downstream::contract` and `provision::request`, the attestation
//! errors of `admission`, the admin API's errors, the CLI's exit codes).

/// Who sees an error code, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// A device, on `{prefix}/{id}/provision/{fmt}/rejected` (and in the device's `lastError`).
    Device,
    /// A device, as a notice on its status topic, when its telemetry is not forwarded.
    Telemetry,
    /// A client of the admin API, and the admin CLI, which prints it.
    Admin,
}

impl Audience {
    /// Where the code shows up, for the reference page.
    pub fn describe(self) -> &'static str {
        match self {
            Audience::Device => "device: `/rejected`, and the device's `lastError`",
            Audience::Telemetry => "device: status topic notice; the message is not forwarded",
            Audience::Admin => "admin API (`{\"error\":{\"code\"}}`) and CLI",
        }
    }
}

/// One `errorCode`.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode {
    /// The code as it is sent.
    pub code: &'static str,
    /// The status that comes with it (HTTP-like, as the cloud APIs use it); 0 when none does
    /// (an operation's `error.code`).
    pub status: u16,
    /// Who sees it.
    pub audience: Audience,
    /// What happened.
    pub meaning: &'static str,
    /// What to do about it.
    pub action: &'static str,
}

const fn e(
    code: &'static str,
    status: u16,
    audience: Audience,
    meaning: &'static str,
    action: &'static str,
) -> ErrorCode {
    ErrorCode {
        code,
        status,
        audience,
        meaning,
        action,
    }
}

use Audience::{Admin, Device, Telemetry};

/// Every `errorCode` fleetgw itself produces, grouped by audience. Codes of the cloud (AWS's
/// `AccessDenied`, `ResourceNotFound`, `InvalidParameters`, `Throttling`, ...) are passed on
/// unchanged and are not listed here.
pub const ERROR_CODES: &[ErrorCode] = &[
    // --- a device's provisioning request
    e("InvalidDeviceId", 400, Device, "The id in the request topic breaks the device id rules (letters, digits and `-._:`, last one a letter, digit or `-`, at most 128).", "Give the device a valid id; it is also its MQTT client id."),
    e("NonCanonicalDeviceId", 400, Device, "The id in the topic is valid but not in lower case; ids are compared case-insensitively and stored lower-case.", "Use the lower-case form of the id in topics."),
    e("InvalidPayload", 400, Device, "The request is not valid JSON or CBOR, or does not have the request's shape.", "Send `{\"csr\"?, \"attestation\": {...}, \"parameters\"?}`; see the device contract."),
    e("PayloadTooLarge", 413, Device, "The request is larger than `downstream.max_request_bytes` (also: a telemetry message over 128 KiB, an admin API body over 1 MiB).", "Send a smaller payload."),
    e("GatewayBusy", 503, Device, "The gateway's queue of provisioning requests is full.", "Retry with back-off; telemetry keeps flowing meanwhile."),
    e("GatewayUnavailable", 503, Device, "The gateway could not record the request (a store failure).", "Retry later; the gateway's journal says what failed."),
    e("TooManyRequests", 429, Device, "The device sent more requests than `downstream.device_rate_per_minute` allows (also the code some clouds use for throttling).", "Wait and retry; a device should not re-send its request in a loop."),
    e("DeviceBlocked", 403, Device, "An operator blocked the device (also the admin API's answer when an action needs an unblocked device).", "`fleetgw devices unblock ID` if it was a mistake."),
    e("PlainKeyDeliveryRefused", 403, Device, "The device asked for a gateway-generated private key on a plain connection from another host, unauthenticated.", "Connect to the TLS listener, or send your own CSR."),
    e("InvalidCsr", 400, Device, "The CSR is not a valid PKCS#10 request or its signature does not verify.", "Send a PEM CSR signed with the device's key."),
    e("CsrSubjectMismatch", 400, Device, "The CSR's common name is not the device id of the request topic.", "Make the CSR with CN = the device id (`fleetgw csr --id ID`)."),
    e("KeyTypeNotAllowed", 400, Device, "The CSR's key type is not in `provision.allowed_csr_key_types`.", "Use ECDSA P-256/P-384 or RSA 2048/3072, or allow the type in the config."),
    e("AttestationRequired", 403, Device, "The request's attestation is not the kind the admission mode needs.", "Send the attestation of `admission.mode` (see Concepts, admission modes)."),
    e("AdmissionMisconfigured", 403, Device, "The admission mode needs a group key or trusted CAs and the gateway has none.", "Set `admission.group_key_file` or `admission.trusted_ca` (or an enrollment group), then `systemctl reload fleetgw`."),
    e("InvalidSasToken", 403, Device, "The SAS token is malformed, is for another device, or lives longer than allowed.", "Sign `sr={scope}/registrations/{id}` with the device key, `se` at most a year ahead."),
    e("SasTokenExpired", 403, Device, "The SAS token's `se` is in the past.", "Make a fresh token; check the device's clock."),
    e("InvalidSignature", 403, Device, "The SAS or x509 attestation signature does not verify with the device's key.", "Check the device key (symmetric key: derived from the right group key) and what is signed."),
    e("InvalidCertificate", 403, Device, "The attestation certificate does not parse, or is a CA certificate (also the admin API's answer to a bad enrollment group certificate).", "Send the device's own leaf certificate in PEM."),
    e("UntrustedCertificate", 403, Device, "The attestation certificate does not chain to `admission.trusted_ca` or an enabled x509 enrollment group.", "Issue the device's certificate from a trusted CA, or add its CA."),
    e("CommonNameMismatch", 403, Device, "The attestation certificate's CN is not the device id.", "Issue the certificate with CN = the device id."),
    e("AttestationExpired", 403, Device, "The x509 attestation timestamp is older than `admission.x509_window_secs`.", "Sign a fresh timestamp; check the device's clock."),
    e("AttestationNotYetValid", 403, Device, "The x509 attestation timestamp is in the future beyond the window.", "Check the device's clock."),
    e("UnsupportedCertificateKey", 403, Device, "The attestation certificate's key type cannot be used.", "Use an ECDSA P-256/P-384 or RSA key."),
    e("KeyGenerationFailed", 500, Device, "The gateway could not generate the device's key.", "See the gateway's journal; retry by reprovisioning the device."),
    e("DeviceKeyRequired", 400, Device, "Azure DPS X.509 attestation authenticates the device by TLS with its own key, and the device brought its own CSR, so the gateway does not hold the key.", "Let the gateway generate the key (send no CSR), or use the symmetric-key enrollment group."),
    e("GatewayError", 500, Device, "The gateway could not build the device's result from its record.", "See the gateway's journal; `fleetgw devices reprovision ID`."),
    e("InvalidCertificateOwnershipToken", 400, Device, "The cloud refused the ownership token (AWS: it expired after an hour); the gateway sends the device back for a new certificate by itself.", "Nothing, unless it repeats: then check the gateway's clock and the cloud link."),
    e("CloudTimeout", 504, Device, "The cloud did not answer in time, after every retry.", "Check the cloud link; `fleetgw devices reprovision ID` once it is back."),
    e("CloudUnavailable", 503, Device, "The cloud could not be reached, after every retry.", "Check the endpoint, network and claim certificate; then reprovision the device."),
    e("CloudProtocolError", 502, Device, "The cloud answered something the gateway cannot read.", "Check that the endpoint is the IoT data endpoint (`iot:Data-ATS`); report it with the journal."),
    e("ThrottlingException", 429, Device, "A cloud throttling answer; the gateway slows down and retries by itself.", "Lower `cloud.aws.tps` if it persists."),
    // --- a device's telemetry
    e("DeviceNotProvisioned", 403, Telemetry, "Telemetry from a device that is not (or not yet) provisioned.", "Provision first; publish after the status says `provisioned`."),
    e("DeviceDisabled", 403, Telemetry, "Telemetry from a device an operator disabled or blocked.", "Enable or unblock the device."),
    e("NoThingName", 500, Telemetry, "The device's record has no thing name to publish under.", "Reprovision the device."),
    e("NoDeviceKeyAtGateway", 403, Telemetry, "With `telemetry.identity = \"device\"` the gateway needs the device's key, and the device sent its own CSR.", "Use `telemetry.identity = \"gateway\"` for such devices."),
    // --- the admin API and CLI
    e("BadRequest", 400, Admin, "The request is malformed.", "Check the request against the Admin API reference."),
    e("InvalidBody", 400, Admin, "The JSON body is invalid or has unknown fields.", "Send the documented fields."),
    e("UnsupportedMediaType", 415, Admin, "The body is not `application/json`.", "Send `Content-Type: application/json`."),
    e("InvalidFilter", 400, Admin, "The `$filter` does not parse; the message names the token and its position.", "Fix the expression (see the Admin API reference)."),
    e("InvalidOrderBy", 400, Admin, "The `$orderby` names an unknown field or direction.", "Use `field [asc|desc]` with a listed field."),
    e("InvalidPageSize", 400, Admin, "`maxpagesize` is not 1..100.", "Use a page size from 1 to 100."),
    e("InvalidSkipToken", 400, Admin, "The `$skiptoken` was not made by this API.", "Follow `nextLink` as given."),
    e("InvalidParameter", 400, Admin, "A query parameter has an invalid value.", "Check the parameter."),
    e("InvalidId", 400, Admin, "A group id breaks the id rules.", "Use letters, digits and `-._:`."),
    e("InvalidDisplayName", 400, Admin, "The display name is too long or has control characters.", "Use a shorter, printable name."),
    e("InvalidKey", 400, Admin, "An enrollment group key is not base64, or shorter than 16 bytes.", "Leave keys out to have them generated, or give valid ones."),
    e("InvalidAttestation", 400, Admin, "The enrollment group's attestation does not have the documented shape.", "Send `symmetricKey` or `x509` as documented."),
    e("NotFound", 404, Admin, "No device, group or operation with that id (or no such path).", "Check the id (`fleetgw devices list`)."),
    e("MethodNotAllowed", 405, Admin, "The path does not take that method.", "See the Admin API reference."),
    e("PreconditionFailed", 412, Admin, "`If-Match`/`If-None-Match` does not hold: someone changed the device meanwhile.", "Read it again and retry with the new ETag."),
    e("Forbidden", 403, Admin, "The caller may not do this (not root, the daemon's user or in `admin.group`; readers only read).", "Run as a member of `admin.group`, or root."),
    e("Unauthorized", 401, Admin, "On `admin.listen`: no or a wrong bearer token.", "Send `Authorization: Bearer` with the token of `admin.token_file`."),
    e("RequestTimeout", 408, Admin, "The request did not arrive within the time limit.", "Send the whole request at once."),
    e("InternalError", 500, Admin, "The gateway failed to serve the request (e.g. a store failure).", "See the gateway's journal."),
    e("StoreFull", 503, Admin, "A write (approve, PATCH, DELETE, groups, reprovision) while the state directory's disk is full; reads are still served.", "Free space on the state directory's file system; the gateway resumes by itself within 5 s (`GET /health` shows `store.state`)."),
    e("Error", 500, Admin, "Any other failure of the HTTP layer.", "See the gateway's journal."),
    e("CannotUnapprove", 409, Admin, "A PATCH tried to set `approved` to false.", "Block the device instead."),
    e("NotWaitingApproval", 409, Admin, "Approve on a device that is not waiting for approval.", "Check its status; only `waitingApproval` devices are approved."),
    e("NotBlocked", 409, Admin, "Unblock on a device that is not blocked.", "Nothing to do."),
    e("NotProvisioned", 409, Admin, "Reprovision on a device that has no certificate yet.", "Wait for it to be provisioned, or approve it."),
    e("DeviceDeleted", 0, Admin, "An operation's `error.code`: the device was deleted while the operation ran.", "Nothing to do; it provisions anew if it asks again."),
    e("NoPrivateKey", 409, Admin, "`includePrivateKey=true` for a device whose key is not in the store (yet).", "Wait until the device is provisioned; a device with its own CSR has its key itself."),
    e("NotSymmetricKey", 409, Admin, "Keys were asked of a group that is not a symmetricKey group.", "Use an x509 group's certificates instead."),
    e("NotX509", 409, Admin, "A certificate action on a group that is not an x509 group.", "Use a symmetricKey group's keys instead."),
    e("NoVerificationCode", 409, Admin, "Verify before `generateVerificationCode`.", "Generate a verification code first."),
    e("VerificationFailed", 400, Admin, "The proof-of-possession certificate is not signed by the group's CA or its CN is not the code.", "Sign a certificate with CN = the code with the CA's key."),
];

/// One exit code of the `fleetgw` commands.
#[derive(Debug, Clone, Copy)]
pub struct ExitCodeDoc {
    /// The status.
    pub code: u8,
    /// Its sysexits name, if it has one.
    pub name: &'static str,
    /// When the commands exit with it.
    pub meaning: &'static str,
}

/// Every exit code of the `fleetgw` commands.
pub const EXIT_CODES: &[ExitCodeDoc] = &[
    ExitCodeDoc { code: 0, name: "", meaning: "Success." },
    ExitCodeDoc { code: 1, name: "", meaning: "`demo`, `simulate`: a device failed, or a telemetry message was lost or reordered." },
    ExitCodeDoc { code: 64, name: "EX_USAGE", meaning: "Wrong arguments: an invalid device id, option or emulator template file; `passwd` without a password on standard input." },
    ExitCodeDoc { code: 69, name: "EX_UNAVAILABLE", meaning: "Admin CLI: the daemon is not running (the socket is missing or nobody answers)." },
    ExitCodeDoc { code: 70, name: "EX_SOFTWARE", meaning: "Anything else; admin CLI: the API refused the request (e.g. an unknown device), with its message." },
    ExitCodeDoc { code: 73, name: "EX_CANTCREAT", meaning: "`csr`, `devices export`: the output file exists (never overwritten; `csr --force` replaces it)." },
    ExitCodeDoc { code: 74, name: "EX_IOERR", meaning: "A file or the state directory cannot be read or written (`run`: the store does not open)." },
    ExitCodeDoc { code: 77, name: "EX_NOPERM", meaning: "Admin CLI: permission denied (socket mode or the API's 403)." },
    ExitCodeDoc { code: 78, name: "EX_CONFIG", meaning: "The configuration does not load or a key or credential file is refused; the line names the file and the key. systemd does not restart the service on it." },
    ExitCodeDoc { code: 130, name: "", meaning: "`demo`, `simulate`: interrupted with Ctrl-C." },
];
