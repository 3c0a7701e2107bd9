//! What the transport refuses before a handler runs still gets the broker's own reasons: a body
//! that does not decode is `INVALID_ARGUMENT` with `MALFORMED`, and a payload above the limit is
//! `PAYLOAD_TOO_LARGE` at every size, whether the broker's policy or the transport's read limit
//! catches it. Each refusal is in the audit log.

use concordat_broker::refusal::reason_of;
use concordat_proto::{audit, ids::MessageId, pb};
use concordat_tests::{TestPki, federation_config, spawn_broker};
use prost::bytes::{Buf, BufMut};
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

const MIB: usize = 1024 * 1024;

/// A codec that sends its bytes as they are and ignores what comes back: for bodies no
/// generated client would send.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// Calls `path` with `body` as the message bytes.
async fn raw_call(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|_| ())
}

/// Streams `body` as one message to `path` and returns how the response stream ends.
async fn raw_stream(channel: Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut results = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter([body])),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    while results.message().await?.is_some() {}
    Ok(())
}

fn envelope(payload_bytes: usize) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::ThreatAssessment as i32,
        tlp: pb::Tlp::Amber as i32,
        content_type: "application/octet-stream".into(),
        payload: vec![0x5a; payload_bytes],
        ..Default::default()
    }
}

fn assert_refused(status: &Status, code: Code, reason: &str, what: &str) {
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert_eq!(
        reason_of(status).as_deref(),
        Some(reason),
        "{what}: {status:?}"
    );
}

/// Every entry of the log as its JSON view, exported by an auditor.
async fn log_entries(pki: &mut TestPki, addr: std::net::SocketAddr) -> Vec<Value> {
    let auditor = pki.connect(addr, "auditor").await.unwrap();
    let mut stream = auditor
        .audit()
        .export(pb::ExportRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(item) = stream.next().await {
        if let Some(pb::export_item::Item::Record(r)) = item.unwrap().item {
            entries.push(audit::to_json(&audit::decode(&r.entry).unwrap()));
        }
    }
    entries
}

/// How many refusals of `agency` with `reason` the log holds (a folded entry counts as many).
fn refusals(entries: &[Value], agency: &str, reason: &str) -> u64 {
    entries
        .iter()
        .map(|e| {
            let d = &e["details"];
            match e["event"].as_str() {
                Some("transfer_refused")
                    if d["reason"] == reason && d["envelope"]["sender"] == agency =>
                {
                    1
                }
                Some("call_refused") if d["reason"] == reason && d["caller"] == agency => {
                    d["count"].as_u64().unwrap_or(0)
                }
                _ => 0,
            }
        })
        .sum()
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_malformed() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = spawn_broker(federation_config(&pki, dir.path(), None).unwrap())
        .await
        .unwrap();
    // Field 1 (message_id) claims 16 bytes and has 3; field 1 of the wrong wire type; a field
    // number of zero; a truncated varint.
    let bodies: [&[u8]; 4] = [
        &[0x0a, 0x10, b'a', b'b', b'c'],
        &[0x0d, 0x01],
        &[0x02, 0x00],
        &[0x18, 0xff, 0xff],
    ];
    for path in [
        "/concordat.v1.Exchange/Send",
        "/concordat.v1.Exchange/Subscribe",
        "/concordat.v1.Consent/Revoke",
    ] {
        for body in bodies {
            let client = pki.connect(broker.addr, "ncsc").await.unwrap();
            let status = raw_call(client.channel(), path, body.to_vec())
                .await
                .expect_err("a malformed body must be refused");
            assert_refused(
                &status,
                Code::InvalidArgument,
                "MALFORMED",
                &format!("{path} {body:02x?}"),
            );
            assert!(
                !status.message().contains("failed to decode Protobuf"),
                "{status:?}"
            );
        }
    }
    // An envelope of a stream that does not decode ends the stream with the same reason.
    let client = pki.connect(broker.addr, "ncsc").await.unwrap();
    let status = raw_stream(
        client.channel(),
        "/concordat.v1.Exchange/SendStream",
        bodies[0].to_vec(),
    )
    .await
    .expect_err("a malformed envelope must end the stream");
    assert_refused(&status, Code::InvalidArgument, "MALFORMED", "SendStream");

    // A certificate that names no agency is refused for that, before its body is read.
    let client = pki.connect(broker.addr, "mi6").await.unwrap();
    let status = raw_call(
        client.channel(),
        "/concordat.v1.Exchange/Send",
        bodies[0].to_vec(),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "UNKNOWN_AGENCY", "mi6");

    // Each of the thirteen came from a fresh certificate, so none was folded into another.
    let entries = log_entries(&mut pki, broker.addr).await;
    assert_eq!(refusals(&entries, "ncsc", "MALFORMED"), 13, "{entries:#?}");
}

#[tokio::test]
async fn payloads_above_the_limit_are_too_large_at_every_size() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federation_config(&pki, dir.path(), None).unwrap();
    config.limits.max_message_bytes = 4 * MIB;
    let broker = spawn_broker(config).await.unwrap();

    // Just above the limit (the broker's policy decides), just above what the transport reads
    // for a 4 MiB limit (the envelope's room on top of the payload is 64 KiB), 5 MiB, 6 MiB,
    // and above the largest limit a broker can be configured with (64 MiB).
    let sizes = [
        4 * MIB + 1,
        4 * MIB + 64 * 1024 + 1,
        5 * MIB,
        6 * MIB,
        70 * MIB,
    ];
    for size in sizes {
        let client = pki.connect(broker.addr, "ncsc").await.unwrap();
        let mut exchange = pb::exchange_client::ExchangeClient::new(client.channel());
        let status = exchange
            .send(envelope(size))
            .await
            .expect_err("an oversized payload must be refused");
        assert_refused(
            &status,
            Code::InvalidArgument,
            "PAYLOAD_TOO_LARGE",
            &format!("{size} bytes"),
        );
        assert!(status.message().contains("4194304"), "{status:?}");
    }

    // A stream gets the same reason for an oversized envelope.
    let client = pki.connect(broker.addr, "ncsc").await.unwrap();
    let mut exchange = pb::exchange_client::ExchangeClient::new(client.channel());
    let outcome = async {
        let mut results = exchange
            .send_stream(tokio_stream::iter([envelope(6 * MIB)]))
            .await?
            .into_inner();
        while results.message().await?.is_some() {}
        Ok::<(), Status>(())
    }
    .await;
    let status = outcome.expect_err("an oversized envelope must end the stream");
    assert_refused(
        &status,
        Code::InvalidArgument,
        "PAYLOAD_TOO_LARGE",
        "streamed 6 MiB",
    );

    // A payload at the limit passes the size check (and is refused for the next rule: this
    // federation has no agreements).
    let client = pki.connect(broker.addr, "ncsc").await.unwrap();
    let status = client.exchange().send(envelope(4 * MIB)).await.unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "NO_AGREEMENT", "4 MiB");

    let entries = log_entries(&mut pki, broker.addr).await;
    assert_eq!(
        refusals(&entries, "ncsc", "PAYLOAD_TOO_LARGE"),
        sizes.len() as u64 + 1,
        "{entries:#?}"
    );
}

#[tokio::test]
async fn a_larger_configured_limit_is_honoured_by_the_transport() {
    let mut pki = TestPki::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federation_config(&pki, dir.path(), None).unwrap();
    config.limits.max_message_bytes = 8 * MIB;
    let broker = spawn_broker(config).await.unwrap();
    let client = pki.connect(broker.addr, "ncsc").await.unwrap();
    // 6 MiB passes the size check (this federation has no agreements).
    let status = client.exchange().send(envelope(6 * MIB)).await.unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "NO_AGREEMENT", "6 MiB");
    let status = client
        .exchange()
        .send(envelope(9 * MIB))
        .await
        .expect_err("9 MiB is above an 8 MiB limit");
    assert_refused(&status, Code::InvalidArgument, "PAYLOAD_TOO_LARGE", "9 MiB");
}
