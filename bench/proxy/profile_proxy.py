"""Profile: where CST's proxy spends its CPU per relayed request, under bench.py's load.

    .venv/bin/python bench/proxy/profile_proxy.py [--modes anonymous,budget] [--seconds 15] [--name before]

For each mode (bench.py's ``anonymous``, ``budget``, ``large``) the proxy is started, like bench.py's, by a
small wrapper around ``proxy.cli`` that times the garbage collector (``gc.callbacks``) or runs
cProfile, only between SIGUSR1 and SIGUSR2 (start-up is left out). Under 64 keep-alive connections
sending the mode's chat body to the fake upstream, one window after the other:

1. no profiler: CPU per request, user and kernel (utime, stime from /proc; per thread too), and
   the GC's own CPU per request (thread CPU time between the GC's start and stop callbacks);
2. ``perf record -e cpu-clock -g`` (if perf is there): the kernel time split by the system call it
   was spent in (the first user-space frame above the kernel's: libc's ``write``, ``read``, ...);
3. ``py-spy record --native`` (raw stacks): the user time split by what the code is doing, each
   active sample put in the category of its innermost frame that names one;
4. py-spy's flame graph (SVG) of the same;
5. cProfile (deterministic, with its overhead, main thread only): the top functions by own and by
   cumulative time per request.

The table of microseconds per request: user categories = their share of py-spy's user samples x
(utime - GC); GC as measured; kernel rows = their share of perf's kernel samples x stime. py-spy
stops the process for each sample and its samples land in system calls far more often than the
kernel time says (38 % of the samples in ``write`` against 8 % of the CPU in the kernel), so its
samples in system calls are set aside and the kernel's share comes from /proc and perf.

py-spy comes from PyPI (``.venv/bin/pip install py-spy``, for the bench only); without it, or
without perf, their parts are left out. Written to ``bench/proxy/profile-NAME-MODE.txt`` and
``profile-NAME-MODE.svg``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import (  # noqa: E402
    BODY,
    CALLER_KEY,
    MODES,
    ROOT,
    TICKS,
    load,
    machine_busy,
    request_bytes,
    sillytavern_body,
    start_cst,
    start_upstream,
    stop,
)

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
PERF = shutil.which("perf")

# proxy.cli's command, with the GC timed and (kind "cprofile") cProfile on between SIGUSR1 and
# SIGUSR2; SIGUSR2 writes OUT (JSON: the GC's CPU seconds and collections) and OUT.prof.
WRAPPER = r'''
import cProfile, gc, json, os, signal, sys, time
out, kind, args = sys.argv[1], sys.argv[2], sys.argv[3:]
profiler = cProfile.Profile() if kind == "cprofile" else None
stats = {"gc_seconds": 0.0, "collections": [0, 0, 0]}
began = [0.0]

def timed(phase, info):
    if phase == "start":
        began[0] = time.thread_time()
    else:
        stats["gc_seconds"] += time.thread_time() - began[0]
        stats["collections"][info["generation"]] += 1

def begin(*_):
    stats.update(gc_seconds=0.0, collections=[0, 0, 0])
    if profiler is not None:
        profiler.enable()
    else:
        gc.callbacks.append(timed)

def end(*_):
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(out + ".prof")
    if timed in gc.callbacks:
        gc.callbacks.remove(timed)
    with open(out + ".tmp", "w") as f:
        json.dump(stats, f)
    os.replace(out + ".tmp", out)

signal.signal(signal.SIGUSR1, begin)
signal.signal(signal.SIGUSR2, end)
from proxy.cli import proxy_command
proxy_command.main(args=args, prog_name="cst proxy")
'''

# -- py-spy's samples: user time ------------------------------------------------------------------

IDLE = ("clock_nanosleep", "pthread_cond_timedwait", "pthread_cond_wait", "PyThread_acquire_lock_timed",
        "sem_clockwait", "sem_timedwait")
SYSCALL_LEAF = re.compile(r"^(write|writev|send|sendmsg|sendto|read|readv|recv|recvmsg|recvfrom|epoll_p?wait|poll|"
                          r"ppoll|close|accept4?|shutdown|getsockopt|setsockopt|fcntl|ioctl|pthread_cond_signal\S*|"
                          r"__libc_pwrite|__libc_pread|fdatasync|fsync) \(")
KERNEL = "(system call)"
GC = "(GC)"
THREADS = "(another thread)"
# (category, pattern on one frame "function (file:line)"): from the leaf up, the first frame that
# matches a pattern gives the sample its category
FRAME_RULES: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(pattern)) for name, pattern in (
    ("ledger append (queue put)", r"^LedgerWriter\.append "),
    ("budget admit/settle (proxy/budget.py)", r"\(proxy/(budget|calendar)\.py"),
    ("histograms (proxy/histogram.py)", r"\(proxy/histogram\.py"),
    ("inspect() (proxy/request_body.py)", r"\(proxy/request_body\.py"),
    ("caller key lookup (proxy/callers.py, sha256)", r"\(proxy/callers\.py"),
    ("usage meter (proxy/usage.py)", r"\(proxy/usage\.py"),
    ("key pool (proxy/pool.py)", r"\(proxy/pool\.py"),
    # httptools' frames fall to the frame above them: the front's parser, or the upstream client's
    ("upstream client (proxy/upstream.py, httptools)", r"\(proxy/upstream\.py"),
    ("the front (proxy/front.py, httptools)", r"\(proxy/front\.py"),
    ("response writing (aiohttp web_response, http_writer)",
     r"\(aiohttp/(web_response|http_writer)\.py|\(_http_writer\.c|^RequestHandler\.finish_response "),
    ("request parsing (aiohttp's parser, BaseRequest, body read)",
     r"\(aiohttp/(http_parser|streams|web_request|helpers)\.py|\(_http_parser\.c|\(_find_header\.c|"
     r"^RequestHandler\.data_received |\((multidict|yarl)/|\(_multidict\.c|^build_server\.<locals>\.make_request "),
    ("our forward() (proxy/server.py, proxy/forward.py)", r"\(proxy/(server|forward|state)\.py"),
    ("tasks and futures (asyncio; aiohttp's server before proxy/front.py)",
     r"\(aiohttp/|\(_asynciomodule\.c|\(asyncio/"),
    ("event loop (uvloop, libuv)", r"\((loop|core|stream|linux|loop-watcher|timer|heap-inl|queue)\.[ch]:|\(uvloop/"),
)]


def category(frames: list[str]) -> str | None:
    """The category of one py-spy sample's stack (root first): None for a waiting thread, KERNEL
    for a sample in a system call, GC for one in the collector."""
    if any(mark in f for f in frames[-4:] for mark in IDLE):
        return None
    text = ";".join(frames)
    if "Thread._bootstrap" in text:
        return THREADS
    if SYSCALL_LEAF.match(frames[-1]):
        return KERNEL
    if "gc_collect_main" in text or "gc_collect_with_callback" in text:
        return GC
    for frame in reversed(frames):
        for name, pattern in FRAME_RULES:
            if pattern.search(frame):
                return name
    return "other"


def pyspy_samples(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """(samples by category, by innermost frame (active only), all samples) of py-spy's raw output."""
    found: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        name = category(frames)
        if name is not None:
            found[name] += n
            leaves[frames[-1]] += n
    return found, leaves, total


# -- perf's samples: kernel time ------------------------------------------------------------------

SYSCALL_NAMES: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(pattern)) for name, pattern in (
    ("write() on sockets (to the client, to the upstream)", r"^(write|writev|send|sendmsg|sendto)$"),
    ("read() on sockets", r"^(read|readv|recv|recvmsg|recvfrom)$"),
    ("epoll_wait() (the event loop)", r"^epoll_p?wait$"),
    ("poll() (upstream.py: is an idle connection still open?)", r"^poll$"),
    ("futex (GIL hand-offs; waking the ledger's thread)", r"futex|pthread_cond|lll_lock|pthread_mutex|sem_"),
    ("file I/O", r"^(pwrite|pread|fsync|fdatasync|lseek|open|openat|fstat|unlink|ftruncate)(64)?$"),
)]
_LIBC_PREFIX = re.compile(r"^(__GI_)?_*(libc_)?")


def perf_samples(data: Path, tid: int) -> tuple[Counter[str], int, int]:
    """(kernel samples of thread ``tid`` by system call, its kernel samples, its samples) of a
    ``perf record -g``: a kernel sample is put under the first user-space frame above it (libc's
    wrapper of the system call)."""
    out = subprocess.run([PERF or "perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"], capture_output=True,
                         text=True, errors="replace", check=True).stdout
    kernel: Counter[str] = Counter()
    total = 0
    for block in out.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if len(lines) < 2 or lines[0] != str(tid):
            continue
        total += 1
        frames = lines[1:]
        if "[kernel.kallsyms]" not in frames[0]:
            continue
        user = next((f for f in frames if "[kernel.kallsyms]" not in f), "")
        symbol = user.split(None, 1)[1].rsplit(" (", 1)[0] if " " in user else ""
        bare = _LIBC_PREFIX.sub("", symbol).split("@")[0]
        name = next((n for n, pattern in SYSCALL_NAMES if pattern.search(bare)),
                    "other (interrupts, page faults: no system call)")
        kernel[name] += 1
    return kernel, sum(kernel.values()), total


# -- the proxy's threads ---------------------------------------------------------------------


def thread_times(pid: int) -> dict[int, tuple[float, float]]:
    """utime and stime of each thread of ``pid``, seconds."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(task.name)] = (int(fields[11]) / TICKS, int(fields[12]) / TICKS)
    return found


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was not written")
        time.sleep(0.05)


def short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def cprofile_listing(prof: Path, requests: int, top: int) -> list[str]:
    stats = pstats.Stats(str(prof))
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{short(filename)}:{line}({name})" if filename != "~" else name
        rows.append((where, calls / requests, tottime / requests * 1e6, cumtime / requests * 1e6))
    total = sum(r[2] for r in rows)
    out = [f"cProfile's own total: {total:.1f} us per request of the main thread (the profiler's overhead "
           "inflates it: read the shares; a coroutine counts a call each time it is resumed)", ""]
    for title, key in (("own time (tottime)", 2), ("cumulative time (cumtime)", 3)):
        out.append(f"top {top} by {title}, per request:")
        out.append(f"{'calls/req':>10}{'own us':>9}{'cum us':>9}  function")
        for where, calls, own, cum in sorted(rows, key=lambda r: -r[key])[:top]:
            out.append(f"{calls:>10.2f}{own:>9.2f}{cum:>9.2f}  {where}")
        out.append("")
    return out


async def sampled_window(port: int, raw: bytes, args: argparse.Namespace, pid: int, command: list[str]) -> float:
    """Run ``command`` (a recorder for ``args.seconds``) while the load runs; the rate under it."""
    recorders: list[subprocess.Popen[bytes]] = []

    def begin() -> None:
        recorders.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    result = await load(port, raw, args.concurrency, args.seconds + 1.5, lambda: [pid], started=begin)
    _, err = recorders[0].communicate(timeout=120)
    if recorders[0].returncode:
        raise RuntimeError(f"{command[0]} failed: {err.decode(errors='replace')[-2000:]}")
    return result.rate


async def profile_mode(mode_name: str, args: argparse.Namespace, up_port: int, work: Path) -> list[str]:
    mode = MODES[mode_name]
    body = sillytavern_body() if mode.large else BODY
    out: list[str] = [f"# CST proxy profile: mode {mode_name} ({args.name}), {time.strftime('%Y-%m-%d %H:%M')}",
                      f"load: {args.concurrency} keep-alive connections, the {'SillyTavern-sized' if mode.large else 'small'} "
                      f"chat body ({len(body)} bytes), "
                      f"non-streaming, through the proxy to tests/proxy/fakes.py; windows of {args.seconds:g} s; "
                      f"{os.cpu_count()} cores shared with the load generator and the upstream",
                      f"load average at start: {Path('/proc/loadavg').read_text().strip()}", ""]
    stats_path = work / f"{mode_name}-stats.json"

    async def started(kind: str) -> tuple[subprocess.Popen[bytes], int]:
        stats_path.unlink(missing_ok=True)
        launcher = [sys.executable, "-c", WRAPPER, str(stats_path), kind]
        return await start_cst(up_port, work / f"{mode_name}-{kind}", budget=mode.budget, anonymous=mode.anonymous,
                               launcher=launcher)

    proc, port = await started("plain")
    raw = request_bytes(port, body, None if mode.anonymous else CALLER_KEY)
    try:
        await load(port, raw, args.concurrency, 1.0)   # warm
        # 1. no profiler
        before: dict[int, tuple[float, float]] = {}
        busy0 = [0.0]

        def begin() -> None:
            before.update(thread_times(proc.pid))
            busy0[0] = machine_busy()
            os.kill(proc.pid, signal.SIGUSR1)

        t0 = time.monotonic()
        result = await load(port, raw, args.concurrency, args.seconds, lambda: [proc.pid], started=begin)
        os.kill(proc.pid, signal.SIGUSR2)
        wall = time.monotonic() - t0
        after = thread_times(proc.pid)
        busy = (machine_busy() - busy0[0]) / (wall * (os.cpu_count() or 1))
        wait_for(stats_path)
        gc_stats = json.loads(stats_path.read_text())
        n = result.requests
        spent = {tid: (u - before.get(tid, (0.0, 0.0))[0], s - before.get(tid, (0.0, 0.0))[1])
                 for tid, (u, s) in after.items()}
        utime = sum(u for u, _ in spent.values()) / n
        stime = sum(s for _, s in spent.values()) / n
        cpu = utime + stime
        main_u, main_s = (v / n for v in spent.get(proc.pid, (0.0, 0.0)))
        gc_cpu = gc_stats["gc_seconds"] / n
        out += [f"1. without a profiler: {n} requests, {result.rate:.0f} req/s, CPU {cpu * 1e6:.1f} us/request: "
                f"user {utime * 1e6:.1f}, kernel {stime * 1e6:.1f}; main thread {(main_u + main_s) * 1e6:.1f} "
                f"(user {main_u * 1e6:.1f}, kernel {main_s * 1e6:.1f}), other threads {(cpu - main_u - main_s) * 1e6:.1f}; "
                f"the machine was {busy * 100:.0f}% busy in all (this load included)",
                f"   GC: {gc_cpu * 1e6:.1f} us/request; collections per 1000 requests by generation "
                f"{[round(c * 1000 / n, 2) for c in gc_stats['collections']]}", ""]
        print(f"{mode_name}: {result.rate:.0f} req/s, {cpu * 1e6:.1f} us/request (user {utime * 1e6:.1f}, kernel "
              f"{stime * 1e6:.1f}), GC {gc_cpu * 1e6:.1f} us", flush=True)

        kernel: Counter[str] = Counter()
        if PERF:   # 2. the main thread's kernel time, by system call
            data = work / f"{mode_name}.perf"
            rate = await sampled_window(port, raw, args, proc.pid,
                                        [PERF, "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(proc.pid),
                                         "-o", str(data), "--", "sleep", str(int(args.seconds))])
            kernel, kernel_n, perf_n = perf_samples(data, proc.pid)
            out += [f"2. perf record -e cpu-clock -F 999 -g: {perf_n} samples of the main thread, {kernel_n} in the "
                    f"kernel ({kernel_n / max(perf_n, 1) * 100:.1f}%; /proc said {main_s / (main_u + main_s) * 100:.1f}%); "
                    f"{rate:.0f} req/s meanwhile", ""]
            print(f"{mode_name}: perf: {rate:.0f} req/s while sampled", flush=True)

        user: Counter[str] = Counter()
        if PY_SPY:   # 3., 4. the main thread's user time, by what the code does; the flame graph
            raw_out = work / f"{mode_name}.raw"
            svg = HERE / f"profile-{args.name}-{mode_name}.svg"
            rates = []
            for fmt, path in (("raw", raw_out), ("flamegraph", svg)):
                rates.append(await sampled_window(
                    port, raw, args, proc.pid,
                    [PY_SPY, "record", "--pid", str(proc.pid), "--native", "--rate", str(args.rate), "--duration",
                     str(int(args.seconds)), "--format", fmt, "--output", str(path)]))
                print(f"{mode_name}: py-spy {fmt}: {rates[-1]:.0f} req/s while sampled", flush=True)
            found, leaves, total = pyspy_samples(raw_out)
            active = sum(found.values())
            user = Counter({k: v for k, v in found.items() if k not in (KERNEL, GC, THREADS)})
            writes = Counter("to the upstream" if "(proxy/upstream.py" in line else "to the client"
                             for line in raw_out.read_text().splitlines()
                             for _ in range(int(line.rpartition(" ")[2]))
                             if line.rpartition(" ")[0].rsplit(";", 1)[-1].startswith("write ("))
            out += [f"3. py-spy record --native --rate {args.rate}: {total} samples, {active} active: "
                    f"{sum(user.values())} in the main thread's own code, {found[KERNEL]} in a system call, "
                    f"{found[GC]} in the GC, {found[THREADS]} in other threads (all three set aside: measured "
                    f"above and by perf); {rates[0]:.0f} req/s meanwhile (py-spy stops the process at each sample)",
                    f"   its samples in write(): {writes['to the client']} sending the answer to the client, "
                    f"{writes['to the upstream']} sending the request to the upstream",
                    "", "the 25 most sampled innermost frames (active samples):"]
            for frame, count in leaves.most_common(25):
                out.append(f"{count:>8} {count / active * 100:>5.1f}%  {frame}")
            out.append("")

        user_n, kernel_n = sum(user.values()), sum(kernel.values())
        out += ["== where the CPU per request goes ==",
                f"{'':<66}{'us/req':>8}{'share':>8}  from"]
        rows: list[tuple[str, float, str]] = []
        for name, count in user.most_common():
            rows.append((name, count / user_n * (main_u - gc_cpu), f"py-spy {count} x (main thread user - GC)"))
        if not user_n:
            rows.append(("main thread, user time, not split (no py-spy)", main_u - gc_cpu, "/proc"))
        rows.append(("GC", gc_cpu, "gc.callbacks: the collector's thread CPU time"))
        for name, count in kernel.most_common():
            rows.append(("kernel: " + name, count / kernel_n * main_s, f"perf {count} x main thread kernel time"))
        if not kernel_n:
            rows.append(("main thread, kernel time, not split (no perf)", main_s, "/proc"))
        rows.append(("other threads (the ledger's writer: SQLite; the file watch)", cpu - main_u - main_s,
                     "/proc, their threads"))
        for name, us, source in rows:
            out.append(f"{name:<66}{us * 1e6:>8.1f}{us / cpu * 100:>7.1f}%  {source}")
        out += [f"{'total (user ' + format(utime * 1e6, '.1f') + ' + kernel ' + format(stime * 1e6, '.1f') + ')':<66}"
                f"{cpu * 1e6:>8.1f}{100:>7.1f}%", ""]
    finally:
        stop(proc)

    # 5. cProfile
    proc, port = await started("cprofile")
    raw = request_bytes(port, body, None if mode.anonymous else CALLER_KEY)
    try:
        await load(port, raw, args.concurrency, 1.0)
        result = await load(port, raw, args.concurrency, args.seconds, lambda: [proc.pid],
                            started=lambda: os.kill(proc.pid, signal.SIGUSR1))
        os.kill(proc.pid, signal.SIGUSR2)
        wait_for(stats_path)
        wait_for(Path(str(stats_path) + ".prof"))
        out.append(f"5. under cProfile: {result.requests} requests, {result.rate:.0f} req/s, "
                   f"CPU {(result.cpu or 0) * 1e6:.1f} us/request with the profiler")
        out += cprofile_listing(Path(str(stats_path) + ".prof"), result.requests, args.top)
    finally:
        stop(proc)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="anonymous",
                        help="anonymous, budget and/or large (bench.py's modes), comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each window")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="py-spy's samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--name", default="before", help="the files' name: profile-NAME-MODE.txt/.svg")
    args = parser.parse_args()
    for tool, found in (("py-spy", PY_SPY), ("perf", PERF)):
        if not found:
            print(f"{tool} not found: its part is left out", file=sys.stderr)
    upstream, up_port = start_upstream(20, 1.0)
    work = Path(tempfile.mkdtemp(prefix="cst-profile-"))
    try:
        for mode_name in args.modes.split(","):
            if mode_name not in ("anonymous", "budget", "large"):
                raise SystemExit(f"--modes: {mode_name} is not anonymous, budget or large")
            text = await profile_mode(mode_name, args, up_port, work)
            path = HERE / f"profile-{args.name}-{mode_name}.txt"
            path.write_text("\n".join(text) + "\n")
            print(f"wrote {path.relative_to(ROOT)}", flush=True)
    finally:
        stop(upstream)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
