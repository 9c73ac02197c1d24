"""Prometheus metrics, read from the pool and the forwarder at scrape time.

A custom collector instead of Counter/Gauge objects updated per request: the
hot path only bumps plain ints it keeps anyway (and the answer times go into
``histogram.Histogram``, a bisection and two additions), and the exposition
format is still produced by prometheus-client (correct escaping, content type,
types).
Each service has its own registry so several can coexist (tests).
"""
from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import ProxyState


class PoolCollector(Collector):
    def __init__(self, state: ProxyState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        pool = state.pool
        now = pool.clock()
        labels = ["account", "key"]
        requests = CounterMetricFamily("cst_proxy_key_requests", "Upstream attempts made with a key", labels=labels)
        failures = CounterMetricFamily("cst_proxy_key_failures", "Failed upstream attempts of a key", labels=labels)
        balance = GaugeMetricFamily("cst_proxy_key_balance", "Balance of a key as the platform reported it", labels=labels)
        available = GaugeMetricFamily("cst_proxy_key_available", "1 when the key can be chosen now", labels=labels)
        for key in pool.keys():  # noqa: SIM118 -- the KeyPool's list of keys, not a dict's
            lv = [key.account, key.masked]
            requests.add_metric(lv, key.requests)
            failures.add_metric(lv, key.total_failures)
            if key.balance is not None:
                balance.add_metric(lv, key.balance)
            available.add_metric(lv, 1.0 if key.available(now) else 0.0)
        yield from (requests, failures, balance, available)

        stats = state.forwarder.stats
        responses = CounterMetricFamily("cst_proxy_responses", "Responses sent to clients by status code", labels=["code"])
        for code, count in sorted(stats.responses.items()):
            responses.add_metric([str(code)], count)
        yield responses
        yield CounterMetricFamily("cst_proxy_retries", "Attempts repeated on another key", value=stats.retries)
        yield CounterMetricFamily("cst_proxy_no_key", "Requests answered 503 for want of a key", value=stats.no_key)
        yield CounterMetricFamily("cst_proxy_client_disconnects", "Clients that hung up mid-answer",
                                  value=stats.client_disconnects)
        yield CounterMetricFamily("cst_proxy_upstream_cuts", "Answers the upstream broke off after they began",
                                  value=stats.upstream_cuts)

        by_instance = CounterMetricFamily("cst_proxy_instance_requests", "Requests by caller (an instance id, "
                                          "client or anonymous) this month", labels=["instance"])
        instance_errors = CounterMetricFamily("cst_proxy_instance_errors", "Requests of a caller that got an "
                                              "error or a broken answer", labels=["instance"])
        tokens = CounterMetricFamily("cst_proxy_instance_tokens", "Tokens the upstream reported in answers to a "
                                     "caller", labels=["instance", "kind"])
        for caller, tally in state.usage.this_month().items():
            by_instance.add_metric([caller], tally.requests)
            instance_errors.add_metric([caller], tally.errors)
            tokens.add_metric([caller, "prompt"], tally.prompt_tokens)
            tokens.add_metric([caller, "completion"], tally.completion_tokens)
        yield from (by_instance, instance_errors, tokens)

        limit = GaugeMetricFamily("cst_proxy_budget_limit", "A caller's budget in its window (tokens per day or "
                                  "month, requests per minute)", labels=["instance", "budget"])
        left = GaugeMetricFamily("cst_proxy_budget_left", "What is left of a caller's budget in the current "
                                 "window", labels=["instance", "budget"])
        used = GaugeMetricFamily("cst_proxy_usage_tokens", "Tokens a caller used in the current window "
                                 "(prompt + completion, estimates included)", labels=["instance", "window"])
        for caller in state.usage.callers():
            document = state.usage.caller_document(caller)
            used.add_metric([caller, "day"], document["today"]["tokens"])
            used.add_metric([caller, "month"], document["month"]["tokens"])
            for name, allowed in (document["budget"] or {}).items():
                if allowed is not None:
                    limit.add_metric([caller, name], allowed)
                    left.add_metric([caller, name], document["left"][name])
        yield from (limit, left, used)

        ledger = state.usage.ledger
        if ledger is not None:
            written = ledger.status()
            yield CounterMetricFamily("cst_proxy_ledger_rows_written", "Ledger rows written to the store",
                                      value=written["written"])
            yield CounterMetricFamily("cst_proxy_ledger_rows_set_aside", "Ledger rows the store refused for what "
                                      "they hold, kept in <state_dir>/proxy/ledger-set-aside.jsonl",
                                      value=written["set_aside"])
            yield GaugeMetricFamily("cst_proxy_ledger_rows_waiting", "Ledger rows not yet in the store (queued "
                                    "or spooled while it is away)", value=written["unwritten"] + written["spooled"])

        errors = GaugeMetricFamily("cst_proxy_account_error", "1 when the last refresh of an account failed",
                                   labels=["account", "provider"])
        for name, status in state.accounts.status().items():
            errors.add_metric([name, status["provider"]], 1.0 if status["last_error"] else 0.0)
        yield errors
        yield GaugeMetricFamily("cst_proxy_uptime_seconds", "Seconds since the proxy started",
                                value=time.monotonic() - state.started)
        yield from latency_families(state)


def latency_families(state: ProxyState) -> Iterator[Metric]:
    """How long forwarded requests took to answer (on the proxy's /metrics, and on cst serve's)."""
    yield state.first_byte_seconds.family(
        "cst_proxy_first_byte_seconds", "Forwarded requests: seconds from their arrival to the first piece of "
        "the upstream's answer (to the end of an answer the proxy made itself)")
    yield state.answer_seconds.family(
        "cst_proxy_answer_seconds", "Forwarded requests: seconds from their arrival to the end of the answer "
        "(streams included)")


def registry_for(state: ProxyState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(state))
    return registry
