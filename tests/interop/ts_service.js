// A platform service written the way the platform's TypeScript services are (plain JS with
// amqplib, no banyan_bus): it speaks the platform envelope and topology (DESIGN.md §2-§3).
//
//   AMQP_URL=amqp://... SERVICE_NAME=ts-billing PEER_SERVICE=py-ledger COUNT=100 \
//     node ts_service.js
//
// 1. Declares its subscription groups the way banyan_bus does (topology.py group_plan, quorum
//    queue; {event} is the routing key, the lowercase type):
//    dlq.exchange.platform.events.{group}.{event} (quorum, x-delivery-limit 1000000),
//    the group's fanout exchange exchange.platform.events.{group}.{event} bound to
//    exchange.platform.events with the lowercase type (and banyan's delayed-publish key), and
//    a queue of the same name with banyan's arguments, for PaymentReceived and
//    BillAccepted. Then prints {"type": "ready"}.
// 2. Publishes COUNT BillIssued envelopes to exchange.platform.events (routing key
//    "billissued") with the AMQP properties, each with its own W3C traceContext, and
//    prints {"type": "sent", "envelopes": [...]}.
// 3. Consumes COUNT PaymentReceived (published by banyan_bus) and COUNT BillAccepted (the
//    follow-ups banyan_bus publishes while handling each BillIssued) and checks every
//    envelope field and AMQP property; a follow-up must carry the trace id, correlation id
//    and (as causation id) the id of the BillIssued it answers.
// 4. Prints {"type": "done", "received": {...}, "problems": [...], "samples": {...}} and
//    exits 0 (1 if it timed out before receiving everything; problems are for the caller).
//
// The expected payload values follow formulas the Python test shares (see
// tests/interop/test_ts_interop.py): both sides compute them from `seq`.
"use strict";

const crypto = require("node:crypto");
const amqp = require("amqplib");

const ROOT = "exchange.platform.events";
const URL = process.env.AMQP_URL;
const SERVICE = process.env.SERVICE_NAME || "ts-billing";
const PEER = process.env.PEER_SERVICE || "py-ledger";
const COUNT = Number(process.env.COUNT || 100);
const TIMEOUT_MS = Number(process.env.TIMEOUT_MS || 40000);
// banyan_bus: 28 delay levels, each a word of the delayed-publish routing key (delay.py).
const DELAY_BITS_PATTERN = "*.".repeat(28);

const ENVELOPE_KEYS = [
  "id",
  "correlationId",
  "causationId",
  "traceContext",
  "timestamp",
  "serviceName",
  "messageType",
  "version",
  "payload",
  "metadata",
].sort();
const ISO_MS_Z = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const HEX32 = /^[0-9a-f]{32}$/;
const HEX16 = /^[0-9a-f]{16}$/;
const HEX2 = /^[0-9a-f]{2}$/;
const NUMBER = /^-?\d+(\.\d+)?([eE][-+]?\d+)?$/;

const routingKey = (type) => type.toLowerCase().replace(/[-_]/g, "");
const hex = (bytes) => crypto.randomBytes(bytes).toString("hex");
const pad = (n, width) => String(n).padStart(width, "0");
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// ---- the shared formulas (test_ts_interop.py computes the same) -------------------------
function expectedPayment(seq) {
  return {
    paymentId: `pay_${seq}`,
    invoiceId: `inv_${seq % 10}`,
    amountPaid: `${seq}.${pad(seq % 100, 2)}`, // exact digits, as written
    exchangeRate: `1.${pad(seq, 4)}000000000000001`, // more digits than a double holds
    receivedAt: new Date(Date.UTC(2025, 10, 15, 10, 30, 0, 123) + seq * 1000).toISOString(),
    payerName: `Zoë Ñandú ${seq}`,
    seq,
  };
}

function invoicePayload(seq) {
  return {
    invoiceId: `inv_ts_${seq}`,
    customerId: `cus_${seq % 7}`,
    amountDue: Number(`${seq}.${pad((seq * 37) % 100, 2)}`),
    issuedAt: new Date(Date.UTC(2025, 10, 15, 9, 0, 0, 456) + seq * 60000).toISOString(),
    lineCount: (seq % 5) + 1,
    seq,
  };
}

// ---- topology, as banyan_bus declares a quorum subscription group ------------------------
async function declareGroup(ch, group, type) {
  const name = `${ROOT}.${group}.${routingKey(type)}`; // {event}: the routing key
  const dlq = `dlq.${name}`;
  await ch.assertQueue(dlq, {
    durable: true,
    arguments: { "x-queue-type": "quorum", "x-delivery-limit": 1000000 },
  });
  await ch.assertExchange(name, "fanout", { durable: true, autoDelete: false });
  await ch.assertQueue(name, {
    durable: true,
    arguments: {
      "x-queue-type": "quorum",
      "x-dead-letter-exchange": "",
      "x-dead-letter-routing-key": dlq,
      "x-delivery-limit": 20,
      "x-dead-letter-strategy": "at-least-once",
      "x-overflow": "reject-publish",
    },
  });
  await ch.bindQueue(name, name, "");
  await ch.bindExchange(name, ROOT, routingKey(type));
  await ch.bindExchange(name, ROOT, `${DELAY_BITS_PATTERN}${ROOT}.${routingKey(type)}`);
  return name;
}

// ---- checks of what banyan_bus publishes -------------------------------------------------
function rawNumber(text, key) {
  const m = new RegExp(`"${key}":\\s*([^,}\\s]+)`).exec(text);
  return m ? m[1] : undefined;
}

function checkEnvelope(msg, type, problems) {
  const where = `${type} ${msg.properties.messageId}`;
  const fail = (what) => problems.push(`${where}: ${what}`);
  const text = msg.content.toString("utf8");
  let env;
  try {
    env = JSON.parse(text);
  } catch (err) {
    fail(`body is not JSON: ${err.message}`);
    return null;
  }
  const keys = Object.keys(env).sort();
  if (JSON.stringify(keys) !== JSON.stringify(ENVELOPE_KEYS)) {
    fail(`envelope keys ${keys} != ${ENVELOPE_KEYS}`);
  }
  if (!/^evt_[0-9a-f]{32}$/.test(env.id)) fail(`id ${env.id}`);
  if (typeof env.correlationId !== "string" || !env.correlationId) {
    fail(`correlationId ${env.correlationId}`);
  }
  const tc = env.traceContext; // read unguarded, as platform code does
  if (!tc || !HEX32.test(tc.traceId) || /^0+$/.test(tc.traceId)) {
    fail(`traceContext.traceId ${tc && tc.traceId}`);
  }
  if (!tc || !HEX16.test(tc.spanId) || /^0+$/.test(tc.spanId)) {
    fail(`traceContext.spanId ${tc && tc.spanId}`);
  }
  if (!tc || !HEX2.test(tc.traceFlags)) fail(`traceContext.traceFlags ${tc && tc.traceFlags}`);
  if (!ISO_MS_Z.test(env.timestamp) || Number.isNaN(Date.parse(env.timestamp))) {
    fail(`timestamp ${env.timestamp}`);
  } else if (Math.abs(Date.now() - Date.parse(env.timestamp)) > 120000) {
    fail(`timestamp ${env.timestamp} is not now`);
  }
  if (env.serviceName !== PEER) fail(`serviceName ${env.serviceName}`);
  if (env.messageType !== type) fail(`messageType ${env.messageType}`);
  if (env.version !== 1) fail(`version ${JSON.stringify(env.version)}`);
  const priority = env.metadata && env.metadata.routing && env.metadata.routing.priority;
  if (priority !== "normal") fail(`metadata ${JSON.stringify(env.metadata)}`);
  if (typeof env.payload !== "object" || env.payload === null) fail("payload is not an object");

  // AMQP properties mirror the envelope.
  const p = msg.properties;
  const h = p.headers || {};
  if (p.messageId !== env.id) fail(`message_id ${p.messageId}`);
  if (p.correlationId !== env.correlationId) fail(`correlation_id ${p.correlationId}`);
  if (p.type !== type) fail(`type ${p.type}`);
  if (p.contentType !== "application/json") fail(`content_type ${p.contentType}`);
  if (p.deliveryMode !== 2) fail(`delivery_mode ${p.deliveryMode}`);
  if (p.priority !== 2) fail(`priority ${p.priority}`);
  if (typeof p.timestamp !== "number" || Math.abs(p.timestamp * 1000 - Date.parse(env.timestamp)) > 2000) {
    fail(`timestamp property ${p.timestamp}`);
  }
  if (h["x-version"] !== 1) fail(`x-version ${h["x-version"]}`);
  if (tc && String(h.traceparent) !== `00-${tc.traceId}-${tc.spanId}-${tc.traceFlags}`) {
    fail(`traceparent ${h.traceparent}`);
  }
  if (msg.fields.exchange !== ROOT) fail(`exchange ${msg.fields.exchange}`);
  if (msg.fields.routingKey !== routingKey(type)) fail(`routing key ${msg.fields.routingKey}`);
  return { env, text };
}

function checkPayment(msg, problems, seen) {
  const checked = checkEnvelope(msg, "PaymentReceived", problems);
  if (!checked) return;
  const { env, text } = checked;
  const fail = (what) => problems.push(`PaymentReceived ${env.id}: ${what}`);
  const got = env.payload;
  const want = expectedPayment(got.seq);
  if (JSON.stringify(Object.keys(got).sort()) !== JSON.stringify(Object.keys(want).sort())) {
    fail(`payload keys ${Object.keys(got)} (camelCase expected)`);
  }
  for (const key of ["paymentId", "invoiceId", "receivedAt", "payerName"]) {
    if (got[key] !== want[key]) fail(`${key} ${JSON.stringify(got[key])} != ${want[key]}`);
  }
  for (const key of ["amountPaid", "exchangeRate"]) {
    if (typeof got[key] !== "number") fail(`${key} is a ${typeof got[key]}, not a number`);
    const raw = rawNumber(text, key);
    if (!NUMBER.test(raw || "") || raw !== want[key]) fail(`${key} written as ${raw} != ${want[key]}`);
  }
  if (!ISO_MS_Z.test(got.receivedAt)) fail(`receivedAt ${got.receivedAt}`);
  if (env.causationId !== null) fail(`causationId ${env.causationId}`);
  if (msg.properties.headers["x-partition-key"] !== want.invoiceId) {
    fail(`x-partition-key ${msg.properties.headers["x-partition-key"]}`);
  }
  if (seen.has(got.seq)) fail(`seq ${got.seq} twice`);
  seen.add(got.seq);
}

function checkAccepted(msg, problems, seen, sentBySeq) {
  const checked = checkEnvelope(msg, "BillAccepted", problems);
  if (!checked) return;
  const { env, text } = checked;
  const fail = (what) => problems.push(`BillAccepted ${env.id}: ${what}`);
  const got = env.payload;
  const original = sentBySeq.get(got.seq);
  if (!original) {
    fail(`answers unknown seq ${got.seq}`);
    return;
  }
  const keys = JSON.stringify(Object.keys(got).sort());
  if (keys !== JSON.stringify(["acceptedAt", "amountDue", "invoiceId", "seq"])) {
    fail(`payload keys ${keys}`);
  }
  if (got.invoiceId !== original.payload.invoiceId) fail(`invoiceId ${got.invoiceId}`);
  if (typeof got.amountDue !== "number") fail(`amountDue is a ${typeof got.amountDue}`);
  const raw = rawNumber(text, "amountDue");
  if (raw !== JSON.stringify(original.payload.amountDue)) {
    fail(`amountDue written as ${raw}, sent ${JSON.stringify(original.payload.amountDue)}`);
  }
  const acceptedAt = new Date(Date.parse(original.payload.issuedAt) + 3600000).toISOString();
  if (got.acceptedAt !== acceptedAt) fail(`acceptedAt ${got.acceptedAt} != ${acceptedAt}`);
  // TS -> Python -> TS: the follow-up continues the trace and the conversation.
  const tc = env.traceContext || {};
  if (tc.traceId !== original.traceContext.traceId) {
    fail(`traceId ${tc.traceId} != ${original.traceContext.traceId}`);
  }
  if (tc.spanId === original.traceContext.spanId) fail("span id reused");
  if (tc.traceFlags !== original.traceContext.traceFlags) fail(`traceFlags ${tc.traceFlags}`);
  if (env.correlationId !== original.correlationId) fail(`correlationId ${env.correlationId}`);
  if (env.causationId !== original.id) fail(`causationId ${env.causationId}`);
  if (seen.has(got.seq)) fail(`seq ${got.seq} twice`);
  seen.add(got.seq);
}

// ---- the service -------------------------------------------------------------------------
async function main() {
  if (!URL) throw new Error("AMQP_URL is not set");
  const conn = await amqp.connect(URL, { clientProperties: { connection_name: SERVICE } });
  const ch = await conn.createConfirmChannel();
  await ch.assertExchange(ROOT, "topic", { durable: true, autoDelete: false });
  const paymentsQueue = await declareGroup(ch, SERVICE, "PaymentReceived");
  const acceptedQueue = await declareGroup(ch, SERVICE, "BillAccepted");
  await ch.prefetch(50);

  const problems = [];
  const payments = new Set();
  const accepted = new Set();
  const sentBySeq = new Map();
  const samples = {};
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  const maybeDone = () => {
    if (payments.size >= COUNT && accepted.size >= COUNT) finish(true);
  };
  const guard = (fn) => (msg) => {
    if (msg === null) {
      problems.push("consumer cancelled by the broker");
      return;
    }
    try {
      fn(msg);
    } catch (err) {
      problems.push(`handler error: ${err.stack}`);
    }
    ch.ack(msg);
    maybeDone();
  };
  await ch.consume(
    paymentsQueue,
    guard((msg) => {
      samples.PaymentReceived ??= msg.content.toString("utf8");
      checkPayment(msg, problems, payments);
    }),
  );
  await ch.consume(
    acceptedQueue,
    guard((msg) => {
      samples.BillAccepted ??= msg.content.toString("utf8");
      checkAccepted(msg, problems, accepted, sentBySeq);
    }),
  );
  emit({ type: "ready" });

  const sent = [];
  for (let seq = 0; seq < COUNT; seq++) {
    const payload = invoicePayload(seq);
    const traceContext = { traceId: hex(16), spanId: hex(8), traceFlags: "01" };
    const envelope = {
      id: `evt_${hex(16)}`,
      correlationId: `cor_${hex(16)}`,
      causationId: null,
      traceContext,
      timestamp: new Date().toISOString(),
      serviceName: SERVICE,
      messageType: "BillIssued",
      version: 1,
      payload,
      metadata: { routing: { priority: "normal" } },
    };
    sentBySeq.set(seq, envelope);
    sent.push(envelope);
    ch.publish(ROOT, routingKey("BillIssued"), Buffer.from(JSON.stringify(envelope)), {
      persistent: true,
      contentType: "application/json",
      messageId: envelope.id,
      correlationId: envelope.correlationId,
      type: envelope.messageType,
      timestamp: Math.floor(Date.parse(envelope.timestamp) / 1000),
      priority: 2,
      headers: {
        "x-version": 1,
        traceparent: `00-${traceContext.traceId}-${traceContext.spanId}-${traceContext.traceFlags}`,
        "x-attempt": 1,
        "x-partition-key": payload.invoiceId,
      },
    });
  }
  await ch.waitForConfirms();
  emit({ type: "sent", envelopes: sent });

  const timer = setTimeout(() => finish(false), TIMEOUT_MS);
  const complete = await finished;
  clearTimeout(timer);
  emit({
    type: "done",
    complete,
    received: { PaymentReceived: payments.size, BillAccepted: accepted.size },
    problems: problems.slice(0, 100),
    problemCount: problems.length,
    samples,
  });
  await ch.close();
  await conn.close();
  return complete ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(err && err.stack ? err.stack : String(err));
    process.exit(2);
  },
);
