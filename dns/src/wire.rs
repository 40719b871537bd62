//! The wire side: decoding a query, building answers, UDP truncation.
//!
//! A datagram too short for a header, or one that is a response, is dropped (answering a
//! response could make two servers talk to each other forever). A header followed by garbage,
//! or a query without exactly one question, gets FORMERR; an opcode other than QUERY gets
//! NOTIMP; EDNS versions above 0 get BADVERS.

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;

use crate::EDNS_PAYLOAD;

/// The classic UDP limit without EDNS.
pub(crate) const CLASSIC_UDP: usize = 512;
/// The DNS-over-TCP limit (2-byte length).
pub(crate) const TCP_MAX: usize = 65535;

/// What a received datagram is.
pub(crate) enum Incoming {
    /// Not worth an answer.
    Drop,
    /// Answered right away without looking anything up (FORMERR, NOTIMP, BADVERS).
    Refuse(Vec<u8>, ResponseCode),
    /// A query with one question.
    Query(Box<Message>),
}

/// A bare answer header (no sections) for `query`'s header: ID, opcode and RD copied.
fn bare_answer(query: &[u8], rcode: u8) -> Vec<u8> {
    let opcode_rd = query[2] & 0x79; // opcode (bits 3-6) and RD (bit 0)
    let mut out = vec![0u8; 12];
    out[0] = query[0];
    out[1] = query[1];
    out[2] = 0x80 | opcode_rd;
    out[3] = 0x80 | (rcode & 0x0F); // RA
    out
}

pub(crate) fn classify(query: &[u8]) -> Incoming {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return Incoming::Drop;
    }
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return Incoming::Refuse(bare_answer(query, 1), ResponseCode::FormErr),
    };
    if msg.metadata.op_code != OpCode::Query {
        let mut resp = response_to(&msg, ResponseCode::NotImp);
        resp.queries.clear();
        resp.edns = None;
        return Incoming::Refuse(
            resp.to_vec().unwrap_or_else(|_| bare_answer(query, 4)),
            ResponseCode::NotImp,
        );
    }
    if msg.queries.len() != 1 {
        return Incoming::Refuse(bare_answer(query, 1), ResponseCode::FormErr);
    }
    if let Some(e) = &msg.edns {
        if e.version() > 0 {
            let resp = response_to(&msg, ResponseCode::BADVERS);
            if let Ok(b) = resp.to_vec() {
                return Incoming::Refuse(b, ResponseCode::BADVERS);
            }
        }
    }
    Incoming::Query(Box::new(msg))
}

/// An answer to `req`: its ID, opcode, RD and CD, RA set, its question, an OPT record if it
/// had one.
pub(crate) fn response_to(req: &Message, rcode: ResponseCode) -> Message {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    resp.metadata = Metadata::response_from_request(&req.metadata);
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = rcode;
    resp.add_queries(req.queries.iter().cloned());
    if let Some(q) = &req.edns {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        e.set_dnssec_ok(q.flags().dnssec_ok);
        resp.set_edns(e);
    }
    resp
}

/// An answer with these sections.
pub(crate) fn answer(
    req: &Message,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
) -> Message {
    let mut resp = response_to(req, rcode);
    resp.answers = answers;
    resp.authorities = authorities;
    resp
}

/// The size a UDP answer to `req` may have: 512, or the query's EDNS size (at least 512),
/// and never more than the transport carries.
pub(crate) fn udp_limit(req: &Message, max_udp: usize) -> usize {
    let asked = req
        .edns
        .as_ref()
        .map(|e| usize::from(e.max_payload()).max(CLASSIC_UDP))
        .unwrap_or(CLASSIC_UDP);
    asked.min(max_udp).max(12)
}

/// Encodes `msg`; if it exceeds `limit`, the answer sections are dropped and TC set (the
/// question and the OPT record stay). Returns the bytes and whether it was truncated.
pub(crate) fn encode(msg: &Message, limit: usize) -> Option<(Vec<u8>, bool)> {
    let full = msg.to_vec().ok()?;
    if full.len() <= limit {
        return Some((full, false));
    }
    let short = msg.truncate().to_vec().ok()?;
    if short.len() <= limit {
        return Some((short, true));
    }
    // Not even the question fits (a tiny transport): the header alone.
    let mut bare = short[..12].to_vec();
    bare[2] |= 0x02;
    bare[4..12].fill(0);
    Some((bare, true))
}

/// Makes forwarded answer bytes fit `limit` (same rules as `encode`); bytes that fit are
/// returned unchanged.
pub(crate) fn fit(resp: Vec<u8>, limit: usize) -> (Vec<u8>, bool) {
    if resp.len() <= limit {
        return (resp, false);
    }
    match Message::from_vec(&resp) {
        Ok(m) => encode(&m, limit).unwrap_or_else(|| (header_only_tc(&resp), true)),
        Err(_) => (header_only_tc(&resp), true),
    }
}

fn header_only_tc(resp: &[u8]) -> Vec<u8> {
    let mut bare = resp[..12].to_vec();
    bare[2] |= 0x02;
    bare[4..12].fill(0);
    bare
}

/// A SERVFAIL answer to `req` (the question and OPT echoed).
pub(crate) fn servfail(req: &Message) -> Message {
    response_to(req, ResponseCode::ServFail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    fn query(name: &str, edns: Option<u16>) -> Message {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        if let Some(sz) = edns {
            let mut e = Edns::new();
            e.set_max_payload(sz);
            m.set_edns(e);
        }
        m
    }

    #[test]
    fn drops_short_and_responses() {
        assert!(matches!(classify(&[0u8; 11]), Incoming::Drop));
        let mut q = query("a.test.", None).to_vec().unwrap();
        q[2] |= 0x80;
        assert!(matches!(classify(&q), Incoming::Drop));
    }

    #[test]
    fn formerr_for_garbage_and_no_question() {
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend_from_slice(&[0x3f, 1, 2, 3]);
        match classify(&junk) {
            Incoming::Refuse(b, ResponseCode::FormErr) => {
                assert_eq!(&b[0..2], &[0xab, 0xcd]);
                assert_eq!(b[2] & 0x80, 0x80);
                assert_eq!(b[3] & 0x0f, 1);
            }
            _ => panic!("expected FORMERR"),
        }
        let none = vec![0, 1, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            classify(&none),
            Incoming::Refuse(_, ResponseCode::FormErr)
        ));
    }

    #[test]
    fn notimp_for_other_opcodes() {
        let mut m = query("a.test.", None);
        m.metadata.op_code = OpCode::Notify;
        let b = m.to_vec().unwrap();
        assert!(matches!(
            classify(&b),
            Incoming::Refuse(_, ResponseCode::NotImp)
        ));
    }

    #[test]
    fn answer_copies_id_rd_question_and_edns() {
        let q = query("A.Test.", Some(4096));
        let r = answer(
            &q,
            ResponseCode::NoError,
            vec![Record::from_rdata(
                Name::from_str("A.Test.").unwrap(),
                30,
                RData::A(A(Ipv4Addr::new(10, 0, 0, 1))),
            )],
            vec![],
        );
        let b = r.to_vec().unwrap();
        let back = Message::from_vec(&b).unwrap();
        assert_eq!(back.metadata.id, 0x4242);
        assert!(back.metadata.recursion_desired);
        assert!(back.metadata.recursion_available);
        assert_eq!(back.queries, q.queries);
        assert_eq!(back.edns.unwrap().max_payload(), EDNS_PAYLOAD);
        let plain = answer(
            &query("a.test.", None),
            ResponseCode::NoError,
            vec![],
            vec![],
        );
        assert!(plain.edns.is_none());
    }

    #[test]
    fn limits_and_truncation() {
        assert_eq!(udp_limit(&query("a.", None), 65507), 512);
        assert_eq!(udp_limit(&query("a.", Some(100)), 65507), 512);
        assert_eq!(udp_limit(&query("a.", Some(4096)), 65507), 4096);
        assert_eq!(udp_limit(&query("a.", Some(4096)), 1400), 1400);
        let q = query("many.test.", Some(1232));
        let recs = (0..100)
            .map(|i| {
                Record::from_rdata(
                    Name::from_str("many.test.").unwrap(),
                    30,
                    RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
                )
            })
            .collect();
        let r = answer(&q, ResponseCode::NoError, recs, vec![]);
        let (b, tc) = encode(&r, 512).unwrap();
        assert!(tc && b.len() <= 512);
        let back = Message::from_vec(&b).unwrap();
        assert!(back.metadata.truncation);
        assert!(back.answers.is_empty());
        assert_eq!(back.queries.len(), 1);
        assert!(back.edns.is_some());
        let (b, tc) = encode(&r, 65535).unwrap();
        assert!(!tc);
        assert_eq!(Message::from_vec(&b).unwrap().answers.len(), 100);
        let (raw, tc) = fit(b.clone(), 512);
        assert!(tc && raw.len() <= 512);
        let (same, tc) = fit(b.clone(), 4096);
        assert!(!tc && same == b);
    }
}
