// lodestar's browser client: every call kind, with JSON, and no build step.
//
//   import { createClient, LodestarError } from "/_lodestar/client.js";
//   const client = createClient();              // the service that served this file
//   const feature = await client.unary("routeguide.RouteGuide/GetFeature", { latitude: 1, longitude: 2 });
//
// Unary and server-streaming calls are Connect over fetch (application/json,
// and application/connect+json envelopes read as they arrive). Client-streaming
// and bidi calls, which fetch cannot make, go over a WebSocket with the
// lodestar.v1+json sub-protocol: one call per socket, one envelope per binary
// message (docs/web.md, "WebSocket" and "Browser client").
//
// Served by lodestar at GET /_lodestar/client.js (WebProtocols::client_js).

const DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024;

const FLAG_COMPRESSED = 0x01;
const FLAG_END = 0x02;
const FLAG_METADATA = 0x04;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A call's failure: a Connect code name, a message, details and metadata. */
export class LodestarError extends Error {
  /**
   * @param {string} code a Connect code name: "not_found", "deadline_exceeded", …
   * @param {string} message what went wrong
   * @param {{details?: Array<{type: string, value: string}>, metadata?: Headers, cause?: unknown}} [more]
   */
  constructor(code, message, { details = [], metadata = new Headers(), cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "LodestarError";
    /** The Connect code name. */
    this.code = code;
    /** google.rpc.Status details: `{type, value}` with `value` in base64. */
    this.details = details;
    /** The call's response metadata (headers and trailers). */
    this.metadata = metadata;
  }
}

/**
 * A client for one service's base URL.
 *
 * @param {object} [options]
 * @param {string} [options.baseUrl] where the service is; default: the origin this module came from
 * @param {HeadersInit} [options.headers] metadata sent with every call
 * @param {number} [options.timeoutMs] every call's deadline, unless the call sets its own
 * @param {number} [options.maxMessageBytes] the largest message (or error) read; default 4 MiB
 */
export function createClient(options = {}) {
  return new Client(options);
}

/** See {@link createClient}. Per-call options: `headers`, `timeoutMs`, `signal`, `onHeader`, `onTrailer`. */
export class Client {
  #base;
  #headers;
  #timeoutMs;
  #limit;

  constructor({ baseUrl, headers, timeoutMs, maxMessageBytes } = {}) {
    this.#base = String(baseUrl ?? new URL(import.meta.url).origin).replace(/\/+$/, "");
    this.#headers = new Headers(headers);
    this.#timeoutMs = timeoutMs;
    this.#limit = maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  }

  /** Calls a unary method ("pkg.Service/Method"); resolves to the reply. */
  async unary(method, request, options = {}) {
    const call = this.#start(options);
    try {
      const response = await this.#fetch(method, "application/json", JSON.stringify(request), call);
      const bytes = await readAll(response.body, this.#limit);
      const { headers, trailers } = splitTrailers(response.headers);
      if (response.status !== 200) {
        throw unaryError(response.status, bytes, headers, trailers);
      }
      options.onHeader?.(headers);
      options.onTrailer?.(trailers);
      return bytes.length === 0 ? {} : JSON.parse(decoder.decode(bytes));
    } catch (error) {
      throw failure(error, call.signal);
    } finally {
      call.done();
    }
  }

  /** Calls a server-streaming method: an async iterable of its replies, read as they come. */
  async *serverStream(method, request, options = {}) {
    const call = this.#start(options);
    let reader;
    try {
      const body = envelope(0, encoder.encode(JSON.stringify(request)));
      const response = await this.#fetch(method, "application/connect+json", body, call);
      if (response.status !== 200) {
        const bytes = await readAll(response.body, this.#limit);
        throw unaryError(response.status, bytes, response.headers, new Headers());
      }
      options.onHeader?.(response.headers);
      reader = new EnvelopeReader(response.body.getReader(), this.#limit);
      for (;;) {
        const next = await reader.next();
        if (next === null) {
          throw new LodestarError("internal", "the stream ended without its end-of-stream envelope");
        }
        const [flags, payload] = next;
        if (flags & FLAG_COMPRESSED) {
          throw new LodestarError("internal", "a compressed envelope; none was asked for");
        }
        if (flags & FLAG_END) {
          const trailers = endOfStream(payload, response.headers);
          options.onTrailer?.(trailers);
          return;
        }
        // Nothing more once aborted, even what had already arrived.
        call.signal.throwIfAborted();
        yield JSON.parse(decoder.decode(payload));
      }
    } catch (error) {
      throw failure(error, call.signal);
    } finally {
      reader?.cancel();
      call.done();
    }
  }

  /**
   * Starts a client-streaming call over a WebSocket: `send` the requests,
   * `close()`, then `await call.response` for the one reply.
   */
  clientStream(method, options = {}) {
    return this.#socket(method, options);
  }

  /**
   * Starts a bidi call over a WebSocket: `send` requests and `close()` when
   * done; iterate the call (`for await`) for the replies as they come.
   */
  bidi(method, options = {}) {
    return this.#socket(method, options);
  }

  #socket(method, options) {
    const url = new URL(`${this.#base}/${trimSlash(method)}`);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const headers = mergeHeaders(this.#headers, options.headers);
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return new StreamCall(url, headers, timeoutMs, options, this.#limit);
  }

  /** A call's signal: the caller's, and the deadline's. */
  #start(options) {
    const timeoutMs = options.timeoutMs ?? this.#timeoutMs;
    return deadline(options.signal, timeoutMs, mergeHeaders(this.#headers, options.headers));
  }

  async #fetch(method, contentType, body, call) {
    const headers = new Headers(call.headers);
    headers.set("content-type", contentType);
    headers.set("connect-protocol-version", "1");
    if (call.timeoutMs !== undefined) {
      headers.set("connect-timeout-ms", String(call.timeoutMs));
    }
    return fetch(`${this.#base}/${trimSlash(method)}`, {
      method: "POST",
      headers,
      body,
      signal: call.signal,
    });
  }
}

/**
 * A client-streaming or bidi call on its own WebSocket. Requests sent before
 * the socket opens wait for it. Replies are an async iterable; `response` is
 * the one reply of a client-streaming call.
 */
export class StreamCall {
  #socket;
  #limit;
  #onTrailer;
  #outbox = []; // envelopes waiting for the socket to open
  #replies = []; // replies not yet taken
  #waiting = null; // the reader's wake-up while #replies is empty
  #outcome; // undefined while running; then null (OK) or a LodestarError
  #closed = false; // the requests' end was sent
  #stop;
  #response;

  constructor(url, headers, timeoutMs, options, limit) {
    this.#limit = limit;
    this.#onTrailer = options.onTrailer;
    /** The trailing metadata, once the call has ended. */
    this.trailers = new Headers();
    const leading = { headers: Object.fromEntries(headers) };
    if (timeoutMs !== undefined) leading.timeout_ms = timeoutMs;
    this.#outbox.push(envelope(FLAG_METADATA, encoder.encode(JSON.stringify(leading))));

    const call = deadline(options.signal, timeoutMs, headers);
    this.#stop = call;
    const onAbort = () => this.#finish(failure(call.signal.reason, call.signal), true);
    if (call.signal.aborted) {
      queueMicrotask(onAbort);
    } else {
      call.signal.addEventListener("abort", onAbort, { once: true });
    }

    const socket = new WebSocket(url, ["lodestar.v1+json"]);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      for (const data of this.#outbox) socket.send(data);
      this.#outbox = null;
    };
    socket.onmessage = (event) => this.#receive(event.data);
    socket.onclose = (event) => this.#finish(closeError(event), false);
    this.#socket = socket;
  }

  /** Sends one request message. */
  send(message) {
    if (this.#closed || this.#outcome !== undefined) {
      throw new LodestarError("failed_precondition", "the call's requests are closed or the call has ended");
    }
    this.#write(envelope(0, encoder.encode(JSON.stringify(message))));
  }

  /** Ends the requests (a half-close): the server then sees the end of the stream. */
  close() {
    if (this.#closed || this.#outcome !== undefined) return;
    this.#closed = true;
    this.#write(envelope(FLAG_END, new Uint8Array(0)));
  }

  /** Bytes sent but not yet on the wire (the socket's `bufferedAmount`): wait while it grows. */
  get bufferedAmount() {
    return this.#socket.bufferedAmount;
  }

  /** Cancels the call: the socket is closed, the handler cancelled. */
  cancel(reason = "cancelled by the caller") {
    this.#finish(new LodestarError("canceled", String(reason)), true);
  }

  /** The one reply of a client-streaming call (read from the replies). */
  get response() {
    this.#response ??= (async () => {
      let reply;
      let count = 0;
      for await (const message of this) {
        reply = message;
        count += 1;
      }
      if (count !== 1) {
        throw new LodestarError("unimplemented", `expected one reply, got ${count}`);
      }
      return reply;
    })();
    return this.#response;
  }

  async *[Symbol.asyncIterator]() {
    for (;;) {
      if (this.#replies.length > 0) {
        yield this.#replies.shift();
      } else if (this.#outcome === null) {
        return;
      } else if (this.#outcome !== undefined) {
        throw this.#outcome;
      } else {
        await new Promise((wake) => (this.#waiting = wake));
      }
    }
  }

  #write(data) {
    if (this.#outbox) {
      this.#outbox.push(data);
    } else {
      this.#socket.send(data);
    }
  }

  #receive(data) {
    if (this.#outcome !== undefined) return;
    if (!(data instanceof ArrayBuffer)) {
      this.#finish(new LodestarError("internal", "the server sent a text message"), true);
      return;
    }
    const bytes = new Uint8Array(data);
    const length = bytes.length >= 5 ? new DataView(data).getUint32(1) : -1;
    if (length !== bytes.length - 5) {
      this.#finish(new LodestarError("internal", "a message that is not one envelope"), true);
      return;
    }
    if (length > this.#limit) {
      this.#finish(new LodestarError("resource_exhausted", `a reply of ${length} bytes; the limit is ${this.#limit}`), true);
      return;
    }
    const flags = bytes[0];
    const payload = bytes.subarray(5);
    try {
      if (flags === FLAG_END) {
        this.trailers = endOfStream(payload, new Headers());
        this.#onTrailer?.(this.trailers);
        this.#finish(null, false);
      } else if (flags === 0) {
        this.#replies.push(JSON.parse(decoder.decode(payload)));
        this.#wake();
      } else {
        this.#finish(new LodestarError("internal", `an envelope with flags ${flags}`), true);
      }
    } catch (error) {
      this.#finish(failure(error, null), true);
    }
  }

  /**
   * Ends the call with `outcome` (null: OK); closes the socket when the call
   * ends on this side (a browser may close only with 1000 or 3000–4999: the
   * server sees the call cancelled either way).
   */
  #finish(outcome, closeSocket) {
    if (this.#outcome !== undefined) return;
    this.#outcome = outcome;
    this.#stop.done();
    if (closeSocket) {
      // Ended here (cancelled, aborted, the deadline, a bad message):
      // replies not yet taken are dropped, as the call is over.
      this.#replies.length = 0;
      if (this.#socket.readyState <= WebSocket.OPEN) this.#socket.close(1000);
    }
    this.#wake();
  }

  #wake() {
    const wake = this.#waiting;
    this.#waiting = null;
    wake?.();
  }
}

/** Why a socket closed before its end envelope, as a LodestarError. */
function closeError(event) {
  const reason = event.reason ? `: ${event.reason}` : "";
  switch (event.code) {
    case 1002:
    case 1003:
    case 1007:
      return new LodestarError("internal", `the server closed the socket for a protocol error (${event.code})${reason}`);
    case 1009:
      return new LodestarError("resource_exhausted", `a message over the server's limit (1009)${reason}`);
    case 1011:
      return new LodestarError("internal", `the call failed in the server (1011)${reason}`);
    case 1006:
      return new LodestarError(
        "unavailable",
        "the WebSocket closed without an answer (1006): the server is unreachable, " +
          "or refused the opening (an Origin it does not allow gets 403)",
      );
    default:
      return new LodestarError("unavailable", `the WebSocket closed before the call ended (${event.code})${reason}`);
  }
}

/** A combined signal for a call: the caller's `signal` and the deadline. */
function deadline(signal, timeoutMs, headers) {
  const controller = new AbortController();
  const onAbort = () => controller.abort(signal.reason);
  if (signal?.aborted) {
    controller.abort(signal.reason);
  } else {
    signal?.addEventListener("abort", onAbort, { once: true });
  }
  let timer;
  if (timeoutMs !== undefined) {
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0 || timeoutMs > 9_999_999_999) {
      throw new LodestarError("invalid_argument", `timeoutMs must be a whole number of milliseconds, at most 10 digits: ${timeoutMs}`);
    }
    timer = setTimeout(
      () => controller.abort(new LodestarError("deadline_exceeded", `the deadline of ${timeoutMs} ms passed`)),
      timeoutMs,
    );
  }
  return {
    signal: controller.signal,
    headers,
    timeoutMs,
    done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    },
  };
}

/** Any error as a LodestarError: aborts are "canceled" (or the deadline's), fetch failures "unavailable". */
function failure(error, signal) {
  if (error instanceof LodestarError) return error;
  if (signal?.aborted) {
    const reason = signal.reason;
    if (reason instanceof LodestarError) return reason;
    return new LodestarError("canceled", "the call was aborted", { cause: reason });
  }
  if (error instanceof SyntaxError) {
    return new LodestarError("internal", `a reply that is not JSON: ${error.message}`, { cause: error });
  }
  if (error instanceof TypeError) {
    // What fetch throws for a network error, and for a CORS refusal.
    return new LodestarError(
      "unavailable",
      `the request failed: ${error.message} (the server is unreachable, or CORS refused this page's origin)`,
      { cause: error },
    );
  }
  return new LodestarError("unknown", String(error?.message ?? error), { cause: error });
}

/** Connect's code for an HTTP status that came without one. */
function codeOfHttp(status) {
  return (
    { 400: "internal", 401: "unauthenticated", 403: "permission_denied", 404: "unimplemented",
      429: "unavailable", 502: "unavailable", 503: "unavailable", 504: "unavailable" }[status] ?? "unknown"
  );
}

/** A Connect unary error body (or an HTTP status without one) as a LodestarError. */
function unaryError(status, bytes, headers, trailers) {
  const metadata = new Headers(headers);
  for (const [name, value] of trailers) metadata.append(name, value);
  const text = decoder.decode(bytes);
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (typeof body?.code === "string") {
    return new LodestarError(body.code, body.message ?? "", { details: body.details ?? [], metadata });
  }
  return new LodestarError(codeOfHttp(status), `HTTP ${status}: ${text.slice(0, 512)}`, { metadata });
}

/** Reads Connect's end-of-stream JSON; throws its error, or returns its metadata. */
function endOfStream(payload, headers) {
  const end = payload.length === 0 ? {} : JSON.parse(decoder.decode(payload));
  const trailers = new Headers();
  for (const [name, values] of Object.entries(end.metadata ?? {})) {
    for (const value of [].concat(values)) trailers.append(name, value);
  }
  if (end.error) {
    const metadata = new Headers(headers);
    for (const [name, value] of trailers) metadata.append(name, value);
    throw new LodestarError(end.error.code ?? "unknown", end.error.message ?? "", {
      details: end.error.details ?? [],
      metadata,
    });
  }
  return trailers;
}

/** Connect unary's `trailer-` headers split off the others. */
function splitTrailers(all) {
  const headers = new Headers();
  const trailers = new Headers();
  for (const [name, value] of all) {
    if (name.startsWith("trailer-")) {
      trailers.append(name.slice("trailer-".length), value);
    } else {
      headers.append(name, value);
    }
  }
  return { headers, trailers };
}

/** One envelope: a flags byte, a 4-byte big-endian length, the payload. */
function envelope(flags, payload) {
  const out = new Uint8Array(5 + payload.length);
  out[0] = flags;
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

/** Envelopes read from a byte stream as they arrive, each bounded by `limit`. */
class EnvelopeReader {
  #reader;
  #limit;
  #buffer = new Uint8Array(0);

  constructor(reader, limit) {
    this.#reader = reader;
    this.#limit = limit;
  }

  /** The next envelope as [flags, payload], or null at the end of the body. */
  async next() {
    for (;;) {
      if (this.#buffer.length >= 5) {
        const length = new DataView(this.#buffer.buffer, this.#buffer.byteOffset).getUint32(1);
        if (length > this.#limit) {
          throw new LodestarError("resource_exhausted", `a reply of ${length} bytes; the limit is ${this.#limit}`);
        }
        if (this.#buffer.length >= 5 + length) {
          const flags = this.#buffer[0];
          const payload = this.#buffer.slice(5, 5 + length);
          this.#buffer = this.#buffer.subarray(5 + length);
          return [flags, payload];
        }
      }
      const { done, value } = await this.#reader.read();
      if (done) {
        if (this.#buffer.length > 0) {
          throw new LodestarError("internal", "the stream ended inside an envelope");
        }
        return null;
      }
      this.#buffer = concat(this.#buffer, value);
    }
  }

  cancel() {
    this.#reader.cancel().catch(() => {});
  }
}

/** A whole body, at most `limit` bytes. */
async function readAll(body, limit) {
  if (!body) return new Uint8Array(0);
  const reader = body.getReader();
  let out = new Uint8Array(0);
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return out;
    if (out.length + value.length > limit) {
      reader.cancel().catch(() => {});
      throw new LodestarError("resource_exhausted", `a reply over ${limit} bytes`);
    }
    out = concat(out, value);
  }
}

function concat(a, b) {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}

function mergeHeaders(base, extra) {
  const headers = new Headers(base);
  for (const [name, value] of new Headers(extra)) headers.set(name, value);
  return headers;
}

function trimSlash(method) {
  return String(method).replace(/^\/+/, "");
}
