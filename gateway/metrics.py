"""Prometheus metrics, read from the live gateway at scrape time.

Nothing on the hot path updates a metric: the drivers, streams, outbox and
publisher keep the plain integer counters they need anyway, and this collector
reads them when ``/metrics`` is scraped, on the event loop that owns them (so
no lock and no torn read). The only value that needs the database (the oldest
stored message) is fetched by the HTTP handler just before rendering.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.reload import GATEWAY_STREAM

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from gateway.daemon import Gateway


class GatewayCollector(Collector):
    """Every gateway figure as Prometheus metric families."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        # Set by the scrape handler (it needs a thread hop to SQLite) right
        # before generate_latest(); None: empty outbox or not known.
        self.oldest_ts: int | None = None

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        now = time.time_ns()
        info = InfoMetricFamily("gateway_build", "Gateway version and id")
        info.add_metric([], {"version": __version__, "gateway": gw.cfg.gateway.id})
        yield info

        dev = ["device"]
        cycles = CounterMetricFamily(
            "gateway_device_reads", "Acquisition cycles the driver completed", labels=dev
        )
        readings = CounterMetricFamily(
            "gateway_device_readings", "Tag values read (good and bad)", labels=dev
        )
        errors = CounterMetricFamily(
            "gateway_device_errors", "Readings with q other than good", labels=dev
        )
        records = CounterMetricFamily(
            "gateway_device_records",
            "Records produced (readings after deadband, and events)",
            labels=dev,
        )
        failures = CounterMetricFamily(
            "gateway_device_failures",
            "Connection or acquisition failures (each one a reconnect with backoff)",
            labels=dev,
        )
        up = GaugeMetricFamily("gateway_device_up", "1 while the device is connected", labels=dev)
        age = GaugeMetricFamily(
            "gateway_device_last_good_read_age_seconds",
            "Seconds since the last cycle with a good reading (absent before the first)",
            labels=dev,
        )
        seq = GaugeMetricFamily(
            "gateway_chain_seq", "Last seq sealed in each stream's chain", labels=["stream"]
        )
        outbox = gw.outbox
        for dev_id, stream in list(gw.streams.items()):
            cycles.add_metric([dev_id], stream.cycles)
            readings.add_metric([dev_id], stream.readings)
            errors.add_metric([dev_id], stream.errors)
            records.add_metric([dev_id], stream.records)
            sup = gw.supervisors.get(dev_id)
            if sup is not None:
                failures.add_metric([dev_id], sup.failures)
                up.add_metric([dev_id], 1.0 if sup.online else 0.0)
            if stream.last_good_ns is not None:
                age.add_metric([dev_id], max(0.0, (now - stream.last_good_ns) / 1e9))
            if outbox is not None:
                seq.add_metric([dev_id], outbox.chain.head(dev_id)[0])
        if outbox is not None:  # the gateway's own stream: configuration audit events
            seq.add_metric([GATEWAY_STREAM], outbox.chain.head(GATEWAY_STREAM)[0])
        yield from (cycles, readings, errors, records, failures, up, age, seq)

        if outbox is not None:
            yield GaugeMetricFamily(
                "gateway_outbox_messages", "Messages stored, not yet acknowledged", outbox.messages
            )
            yield GaugeMetricFamily(
                "gateway_outbox_bytes", "Bytes counted against the quota", outbox.bytes
            )
            yield GaugeMetricFamily(
                "gateway_outbox_max_bytes", "The outbox quota (outbox.max_bytes)", outbox.max_bytes
            )
            if self.oldest_ts is not None:
                yield GaugeMetricFamily(
                    "gateway_outbox_oldest_age_seconds",
                    "Age of the oldest stored message (absent when the outbox is empty)",
                    max(0.0, (now - self.oldest_ts) / 1e9),
                )
            yield CounterMetricFamily(
                "gateway_outbox_dropped_records",
                "Records lost to the quota (each loss is also a chained $gap record)",
                outbox.dropped_records,
            )
            yield CounterMetricFamily(
                "gateway_outbox_commits", "SQLite transactions committed", outbox.commits
            )
            yield GaugeMetricFamily(
                "gateway_publisher_inflight",
                "Messages published and awaiting PUBACK",
                len(outbox.inflight()),
            )

        pub = gw.publisher
        if pub is not None:
            yield CounterMetricFamily(
                "gateway_publisher_published",
                "Messages handed to MQTT (re-sends included)",
                pub.published,
            )
            yield CounterMetricFamily(
                "gateway_publisher_acked", "Messages acknowledged by the broker (PUBACK)", pub.acked
            )
            yield CounterMetricFamily(
                "gateway_broker_reconnects",
                "Broker connections after the first one",
                max(0, pub.reconnects - 1),
            )
            yield GaugeMetricFamily(
                "gateway_broker_connected", "1 while connected to the broker", float(pub.connected)
            )
            beat = getattr(pub, "heartbeat", None)
            if beat is not None:
                yield GaugeMetricFamily(
                    "gateway_publisher_heartbeat_age_seconds",
                    "Seconds since the publisher's loop last showed progress (watchdog input)",
                    max(0.0, time.monotonic() - beat),
                )

        ops = gw.ops
        if ops is not None:
            ready, _ = ops.readiness()
            yield GaugeMetricFamily("gateway_ready", "1 when /readyz answers 200", float(ready))
            yield CounterMetricFamily(
                "gateway_watchdog_pings", "WATCHDOG=1 notifications sent to systemd", ops.pings
            )


def registry(gw: Gateway) -> tuple[CollectorRegistry, GatewayCollector]:
    """A registry of its own (no global state): the gateway's figures and process_*."""
    reg = CollectorRegistry()
    col = GatewayCollector(gw)
    reg.register(col)
    ProcessCollector(registry=reg)
    return reg, col


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
