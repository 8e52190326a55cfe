"""Slack ack latency: 100 concurrent signed slash commands through the real slack-bolt app.

What is measured is the ack path only: from Slack's signed request reaching the app until
the ack (the HTTP 200 answer) exists: signature check, bolt's middleware (with the retry
guard), listener match and `ack()`. The command's work (the handler, then a reply POSTed to
the response_url) runs after the ack on the app's worker threads; it competes for the CPU
while acks are measured, as in production, but is not part of the figure.

Each round releases 100 threads at once. Two clocks per request:
- from burst start: when all 100 were released together; includes waiting behind the
  others for the CPU (2 cores, one GIL), i.e. what the 100th command of a burst sees;
- own: from that request's own send to its ack.

Two transports:
- dispatch: `App.dispatch(BoltRequest)` in process, the call Socket Mode makes per envelope;
- http: the bot's HTTP request mode server (aiohttp) on 127.0.0.1, driven by a separate
  client process that opens and sends all 100 requests at once from one thread (raw
  sockets, so client-side thread scheduling does not pollute the figure).
The fake Slack Web API (auth.test, response_url) runs in its own process too.

    .venv/bin/python bench/ack.py [--concurrency 100] [--rounds 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds a queue.py that would shadow the stdlib `queue`: keep this folder off the path.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import argparse
import multiprocessing as mp
import selectors
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from fake_slack_api import FakeSlackApi, RecordingHandler, signed_headers, slash_command_form
from slack_bolt import BoltRequest
from slack_sdk import WebClient

from bot.commands import Command, ParsedText, Reply
from bot.slack.app import build_slack_app
from bot.slack.run import SlackBot
from storage.settings import load_settings

SECRET = "bench-signing-secret-0123456789ab"
BOT_TOKEN = "xoxb-bench"
FORM = "application/x-www-form-urlencoded"
TARGET_P99_MS = 100.0

Timing = tuple[float, float]  # (ms from burst start, ms from own send)
Request = tuple[str, dict[str, str]]


def parse(slash: str, text: str) -> ParsedText:
    return ParsedText(name=slash.lstrip("/"), args={"prompt": text})


class WorkingHandler(RecordingHandler):
    """Does a little work per command (after the ack), like the core's validation."""

    def handle(self, command: Command) -> list[Reply]:
        sum(i * i for i in range(20_000))
        return super().handle(command)


# -- the fake Slack Web API, in its own process ----------------------------------------------


def _serve_fake(conn: Connection) -> None:
    with FakeSlackApi(bot_token=BOT_TOKEN).running() as fake:
        conn.send(fake.url)
        conn.recv()  # stop
        conn.send(len(fake.calls_to("respond")))


# -- requests -------------------------------------------------------------------------------


def make_requests(fake_url: str, n: int, round_no: int) -> list[Request]:
    requests = []
    for i in range(n):
        body = slash_command_form(
            "/imagine",
            f"a fox number {i} seed={i}",
            response_url=f"{fake_url}/commands/T0TEAM001/r{round_no}-{i}",
            trigger_id=f"{round_no}.{i}.bench",
            user_id=f"U{i:08d}",
        )
        requests.append((body, signed_headers(SECRET, body, content_type=FORM)))
    return requests


def burst(send: Callable[[str, dict[str, str]], int], requests: list[Request]) -> list[Timing]:
    """Release one thread per request at once; time each to its ack."""
    n = len(requests)
    start = [0.0]
    barrier = threading.Barrier(n, action=lambda: start.__setitem__(0, time.perf_counter()))
    out: list[Timing] = [(0.0, 0.0)] * n
    status = [0] * n

    def one(i: int) -> None:
        body, headers = requests[i]
        barrier.wait()
        sent = time.perf_counter()
        status[i] = send(body, headers)
        done = time.perf_counter()
        out[i] = ((done - start[0]) * 1000, (done - sent) * 1000)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = sorted({s for s in status if s != 200})
    if bad:
        raise SystemExit(f"Some requests were not acked with 200 (got {bad}).")
    return out


# -- transport 1: App.dispatch in process -----------------------------------------------------


def bench_dispatch(fake_url: str, n: int, rounds: int) -> tuple[list[Timing], int]:
    handler = WorkingHandler([Reply("Queued as job 1.")])
    client = WebClient(token=BOT_TOKEN, base_url=f"{fake_url}/api/")
    workers = ThreadPoolExecutor(8, thread_name_prefix="slack-work")
    app = build_slack_app(handler, parse, client=client, signing_secret=SECRET, executor=workers)

    def send(body: str, headers: dict[str, str]) -> int:
        return app.dispatch(BoltRequest(body=body, headers=headers)).status

    burst(send, make_requests(fake_url, n, -1))  # warm-up
    timings: list[Timing] = []
    for r in range(rounds):
        timings += burst(send, make_requests(fake_url, n, r))
    workers.shutdown(wait=True)
    return timings, len(handler.commands)


# -- transport 2: HTTP request mode, client in another process --------------------------------


def _raw_request(port: int, body: str, headers: dict[str, str]) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}"
        f"Content-Length: {len(body.encode())}\r\nConnection: close\r\n\r\n{body}"
    ).encode()


def _http_burst(port: int, requests: list[Request]) -> list[Timing]:
    """Open and send all requests at once from one thread (no client-side GIL queue), then
    collect each status line as it arrives."""
    selector = selectors.DefaultSelector()
    sent: dict[int, float] = {}
    out: dict[int, Timing] = {}
    statuses: list[int] = []
    start = time.perf_counter()
    for i, (body, headers) in enumerate(requests):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sent[i] = time.perf_counter()
        sock.sendall(_raw_request(port, body, headers))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (i, bytearray()))
    while len(out) < len(requests):
        for key, _ in selector.select(timeout=30):
            i, buffer = key.data
            chunk = key.fileobj.recv(4096)  # type: ignore[union-attr]
            buffer += chunk
            if b"\r\n" in buffer or not chunk:
                done = time.perf_counter()
                out[i] = ((done - start) * 1000, (done - sent[i]) * 1000)
                statuses.append(int(buffer.split(b" ", 2)[1]) if buffer else 0)
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    bad = sorted({s for s in statuses if s != 200})
    if bad:
        raise SystemExit(f"Some requests were not acked with 200 (got {bad}).")
    return [out[i] for i in range(len(requests))]


def _http_client(port: int, rounds: list[list[Request]], conn: Connection) -> None:
    conn.send([_http_burst(port, requests) for requests in rounds])


def bench_http(fake_url: str, n: int, rounds: int) -> tuple[list[Timing], int]:
    handler = WorkingHandler([Reply("Queued as job 1.")])
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            data_dir=Path(tmp),
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SECRET,
            slack_app_token=None,
        )
        bot = SlackBot(
            settings,
            handler,
            _NoDeliverer,
            text_parser=parse,
            http_host="127.0.0.1",
            http_port=0,
            base_url=f"{fake_url}/api/",
        )
        bot.start()
        try:
            port = bot.http_address[1]
            plan = [make_requests(fake_url, n, r) for r in range(-1, rounds)]
            ours, theirs = mp.Pipe()
            client = mp.Process(target=_http_client, args=(port, plan, theirs))
            client.start()
            results = ours.recv()
            client.join()
        finally:
            bot.stop()
    timings = [t for round_ in results[1:] for t in round_]  # drop the warm-up round
    return timings, len(handler.commands)


class _NoDeliverer:
    def __init__(self, _sender: object) -> None:
        pass

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


# -- report ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = min(max(1, round(q / 100 * len(ordered))), len(ordered))
    return ordered[rank - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = args.concurrency, args.rounds

    ours, theirs = mp.Pipe()
    fake = mp.Process(target=_serve_fake, args=(theirs,), daemon=True)
    fake.start()
    fake_url = ours.recv()
    try:
        dispatch, handled_d = bench_dispatch(fake_url, n, rounds)
        http, handled_h = bench_http(fake_url, n, rounds)
    finally:
        ours.send("stop")
        replies = ours.recv()
        fake.join()

    print(f"Slack ack latency: {n} concurrent signed slash commands x {rounds} rounds")
    print("Measured: request in -> ack out. The command's work runs after the ack (not timed).")
    print()
    header = (
        f"{'transport':<10} {'clock':<12} {'acks':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    print(header)
    print("-" * len(header))
    p99: dict[tuple[str, int], float] = {}
    for name, timings in (("dispatch", dispatch), ("http", http)):
        for label, index in (("burst start", 0), ("own send", 1)):
            values = [t[index] for t in timings]
            p99[name, index] = pct(values, 99)
            print(
                f"{name:<10} {label:<12} {len(values):>5} {pct(values, 50):>8.1f} "
                f"{p99[name, index]:>8.1f} {max(values):>8.1f}"
            )
    print()
    expected = n * (rounds + 1)
    print(
        f"Work done after the acks: the handler got {handled_d} (dispatch) and {handled_h} "
        f"(http) of {expected} commands each; {replies} replies reached the response_url."
    )
    # The target is for the app in process (dispatch), timed from the burst's start: what
    # the last of 100 simultaneous commands waits. HTTP mode adds the web server's work
    # on the same cores and GIL; it is shown against Slack's own 3 s limit.
    main_p99 = p99["dispatch", 0]
    verdict = "meets" if main_p99 <= TARGET_P99_MS else "MISSES"
    print(
        f"Target p99 <= {TARGET_P99_MS:.0f} ms (dispatch, from burst start): {verdict} "
        f"({main_p99:.1f} ms)."
    )
    print(
        f"HTTP request mode p99 from burst start: {p99['http', 0]:.1f} ms "
        f"({'within' if p99['http', 0] <= 3000 else 'OVER'} Slack's 3000 ms; "
        f"{'within' if p99['http', 0] <= TARGET_P99_MS else 'over'} the 100 ms target)."
    )
    return 0 if main_p99 <= TARGET_P99_MS else 1


if __name__ == "__main__":
    sys.exit(main())
