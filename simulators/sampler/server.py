"""The at-line sampler / cell analyser: a real SiLA 2 server (``sila2``) over the bioreactor model.

Two features, defined by the FDL files beside this module
(originator ``org.equipmentgateway``, category ``examples``):

* ``Sampler/v1``: observable properties ``State`` (Idle, Sampling,
  Analysing) and ``SampleCount``, unobservable ``SampleInterval`` (s), and the
  observable command ``TakeSample`` (progress 0..1, returns the sample number;
  ``SamplerBusy`` while a sample is running).
* ``CellAnalyser/v1``: observable ``ViableCellDensity`` (10*6/mL),
  ``Viability`` (%), ``Glucose`` (g/L), ``Lactate`` (g/L), ``SampleTimestamp``,
  and unobservable ``InstrumentTemperature`` (Cel), which a client polls.

Values come from its own :class:`simulators.bioreactor_model.BioreactorModel`
(same parameters and seed as the OPC UA bioreactor simulator, so both follow
the same culture), or, with ``bioreactor`` (an ``opc.tcp://`` URL), from a
running bioreactor simulator's Analytics variables at the moment of sampling.
A sample is drawn every ``sample_interval`` wall seconds, or
on ``TakeSample``: ``Sampling`` for half of ``analysis_time``, ``Analysing`` for
the rest, then the results are published.

Faults (:meth:`SamplerSimulator.stall`, :meth:`set_error`, :meth:`restart`):
``stall`` stops answering every call (SiLAService included) and publishes
nothing until cleared; ``error defined`` makes every result and
InstrumentTemperature a ``MeasurementFailed`` defined execution error,
``error undefined`` an undefined execution error; ``restart`` stops the gRPC
server, waits, and starts a new one on the same port with the same UUID.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Queue
from typing import Any, ClassVar, Literal
from uuid import UUID, uuid4

from sila2.features.silaservice import SiLAServiceFeature
from sila2.framework import DefinedExecutionError, Feature
from sila2.server import FeatureImplementationBase, SilaServer
from sila2.server.silaservice_impl import SiLAServiceImpl

from simulators.bioreactor_model import BioreactorModel, BioreactorState
from simulators.sampler.certs import ServerCertificates, ensure_certificates

HERE = Path(__file__).resolve().parent
ORIGINATOR = "org.equipmentgateway/examples"
SAMPLER_FEATURE = Feature((HERE / "Sampler-v1_0.sila.xml").read_text())
ANALYSER_FEATURE = Feature((HERE / "CellAnalyser-v1_0.sila.xml").read_text())
ANALYSER_ID = f"{ORIGINATOR}/CellAnalyser/v1"
SAMPLER_ID = f"{ORIGINATOR}/Sampler/v1"
RESULTS = ("ViableCellDensity", "Viability", "Glucose", "Lactate", "SampleTimestamp")
ErrorMode = Literal["defined", "undefined"]

# sila2 logs every request at INFO and every raised error with a traceback.
logging.getLogger("sila2").setLevel(logging.CRITICAL)
for _name in ("SiLAService", "Sampler", "CellAnalyser", "SubscriptionManagerThread"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


class MeasurementFailed(DefinedExecutionError):
    def __init__(self, message: str = "flow cell clogged: no valid image") -> None:
        super().__init__(ANALYSER_FEATURE.defined_execution_errors["MeasurementFailed"], message)


class SamplerBusy(DefinedExecutionError):
    def __init__(self, message: str = "a sample is being taken already") -> None:
        super().__init__(SAMPLER_FEATURE.defined_execution_errors["SamplerBusy"], message)


class SampleFailed(Exception):
    """No sample could be drawn (the bioreactor to sample from did not answer)."""


class Faults:
    """Fault switches shared by the feature implementations (read from gRPC threads)."""

    def __init__(self) -> None:
        self.stalled = threading.Event()
        self.stopping = threading.Event()
        self.error: ErrorMode | None = None

    def wait_while_stalled(self) -> None:
        # Returns when the stall is cleared or the server stops (so stop() is quick).
        while self.stalled.is_set() and not self.stopping.is_set():
            time.sleep(0.02)

    def raise_error(self) -> None:
        if self.error == "defined":
            raise MeasurementFailed()
        if self.error == "undefined":
            raise RuntimeError("analyser firmware exception 0x2f")


def _stalling(func: Callable[..., Any], faults: Faults) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        faults.wait_while_stalled()
        return func(*args, **kwargs)

    return wrapper


class _SiLAService(SiLAServiceImpl):
    """The standard SiLAService that also stops answering while stalled."""

    def __init__(self, parent_server: SilaServer, faults: Faults) -> None:
        super().__init__(parent_server)
        for name in (
            "get_ServerName",
            "get_ServerType",
            "get_ServerUUID",
            "get_ServerDescription",
            "get_ServerVersion",
            "get_ServerVendorURL",
            "get_ImplementedFeatures",
            "GetFeatureDefinition",
        ):
            setattr(self, name, _stalling(getattr(self, name), faults))


class CellAnalyserImpl(FeatureImplementationBase):
    def __init__(self, parent_server: SilaServer, sim: SamplerSimulator) -> None:
        super().__init__(parent_server)
        self.sim = sim
        for name in RESULTS:
            setattr(self, f"_{name}_producer_queue", Queue())
            setattr(self, f"{name}_on_subscription", _no_custom_queue)

    def publish(self, values: dict[str, Any] | None, why: str | None = None) -> None:
        """New results, or (None) the current error (or MeasurementFailed(why)) for each."""
        for name in RESULTS:
            queue: Queue[Any] = getattr(self, f"_{name}_producer_queue")
            if values is None:
                queue.put(
                    MeasurementFailed(why)
                    if why is not None or self.sim.faults.error == "defined"
                    else RuntimeError("analyser firmware exception 0x2f")
                )
            else:
                queue.put(values[name])

    def get_InstrumentTemperature(self, *, metadata: Any) -> float:
        self.sim.faults.wait_while_stalled()
        self.sim.faults.raise_error()
        # A Peltier-held cell at 37 °C with a small wander.
        return 37.0 + 0.05 * ((time.monotonic() * 7) % 3 - 1.5)


class SamplerImpl(FeatureImplementationBase):
    TakeSample_default_lifetime_of_execution = timedelta(minutes=10)

    def __init__(self, parent_server: SilaServer, sim: SamplerSimulator) -> None:
        super().__init__(parent_server)
        self.sim = sim
        for name in ("State", "SampleCount"):
            setattr(self, f"_{name}_producer_queue", Queue())
            setattr(self, f"{name}_on_subscription", _no_custom_queue)

    def get_SampleInterval(self, *, metadata: Any) -> float:
        self.sim.faults.wait_while_stalled()
        return self.sim.sample_interval

    def TakeSample(self, *, metadata: Any, instance: Any) -> int:
        self.sim.faults.wait_while_stalled()
        number = self.sim.take_sample(lambda p: setattr(instance, "progress", p))
        if number is None:
            raise SamplerBusy()
        return number


def _no_custom_queue(*, metadata: Any) -> None:
    return None  # subscribers share the feature's default producer queue


class BioreactorSource:
    """Samples drawn from a running OPC UA bioreactor simulator (``--bioreactor URL``)."""

    NODES: ClassVar[dict[str, str]] = {
        "ViableCellDensity": "Bioreactor.Analytics.VCD",
        "Viability": "Bioreactor.Analytics.Viability",
        "Glucose": "Bioreactor.Analytics.Glucose",
        "Lactate": "Bioreactor.Analytics.Lactate",
    }

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Any = None
        self._nodes: dict[str, Any] = {}

    def read(self) -> dict[str, float]:
        """The bioreactor's current analytics (blocking; reconnects after a failure)."""
        from asyncua.sync import Client

        from simulators.bioreactor import NAMESPACE_URI

        try:
            if self._client is None:
                client = Client(self.url, timeout=self.timeout)
                client.connect()
                self._client = client
                ns = client.get_namespace_index(NAMESPACE_URI)
                self._nodes = {k: client.get_node(f"ns={ns};s={v}") for k, v in self.NODES.items()}
            return {k: float(n.read_value()) for k, n in self._nodes.items()}
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()


class _Server(SilaServer):
    """SilaServer that reports its bound port and whose SiLAService can stall."""

    def __init__(self, faults: Faults, **kwargs: Any) -> None:
        self._faults = faults  # read by the SiLAService hook during super().__init__
        self.bound_port = 0
        super().__init__(**kwargs)

    # Name-mangled hooks of SilaServer: the base class exposes neither the
    # bound port (needed for port 0) nor its SiLAService implementation.
    def _SilaServer__add_sila_service(self) -> None:
        self.set_feature_implementation(SiLAServiceFeature, _SiLAService(self, self._faults))

    def _SilaServer__add_port_to_grpc_server(
        self,
        address: str,
        ca_for_discovery: bytes | None,
        cert_chain: bytes | None,
        enable_discovery: bool,
        insecure: bool,
        port: int,
        private_key: bytes | None,
    ) -> None:
        import grpc

        target = f"{address}:{port}"
        if insecure:
            self.bound_port = self.grpc_server.add_insecure_port(target)
        else:
            assert private_key is not None and cert_chain is not None
            creds = grpc.ssl_server_credentials([(private_key, cert_chain)])
            self.bound_port = self.grpc_server.add_secure_port(target, creds)
        if not self.bound_port:
            raise OSError(f"cannot listen on {target}")

    def _SilaServer__start_zeroconf_broadcasting(
        self, address: str, port: int, ca_for_discovery: bytes | None
    ) -> None:
        # The base class would announce the requested port (0), not the bound one.
        broadcaster = self._SilaServer__service_broadcaster  # type: ignore[attr-defined]
        broadcaster.register_server(self, address, self.bound_port, ca=ca_for_discovery)


class SamplerSimulator:
    """The sampler + analyser SiLA 2 server; start/stop from any thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 50052,
        insecure: bool = False,
        cert_dir: Path | None = None,
        discovery: bool = False,
        time_scale: float = 60.0,
        sample_interval: float = 10.0,
        analysis_time: float = 1.0,
        seed: int = 1,
        server_uuid: UUID | None = None,
        name: str = "At-line sampler",
        bioreactor: str | None = None,
    ) -> None:
        if not insecure and cert_dir is None:
            raise ValueError("TLS needs cert_dir (where the CA and server certificate are written)")
        self.host = host
        self.port = port
        self.insecure = insecure
        self.cert_dir = cert_dir
        self.discovery = discovery
        self.time_scale = time_scale
        self.sample_interval = sample_interval
        self.analysis_time = analysis_time
        self.server_uuid = server_uuid or uuid4()
        self.name = name
        self.faults = Faults()
        self.model = BioreactorModel(seed=seed)
        self.source = BioreactorSource(bioreactor) if bioreactor else None
        self.certificates: ServerCertificates | None = None
        self.sample_count = 0
        self.state = "Idle"
        self._lock = threading.Lock()  # one sample at a time
        self._server: _Server | None = None
        self._analyser: CellAnalyserImpl | None = None
        self._sampler: SamplerImpl | None = None
        self._last_step = time.monotonic()
        self._next_sample = 0.0
        self._last_results: dict[str, Any] | None = None
        self._ticker: threading.Thread | None = None
        self._halt = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the server (blocking; call from a thread in async code)."""
        if not self.insecure and self.certificates is None:
            assert self.cert_dir is not None
            self.certificates = ensure_certificates(self.cert_dir, self.server_uuid, self.host)
        self._start_server()
        if self._ticker is None:
            self._halt.clear()
            self._next_sample = time.monotonic() + min(self.analysis_time, self.sample_interval)
            self._ticker = threading.Thread(target=self._tick, name="sampler-model", daemon=True)
            self._ticker.start()

    def _start_server(self) -> None:
        self.faults.stopping.clear()
        server = _Server(
            self.faults,
            server_name=self.name,
            server_type="AtLineSampler",
            server_description="At-line autosampler with cell analyser (gateway simulator)",
            server_version="1.0",
            server_vendor_url="https://example.org/equipment-gateway",
            server_uuid=self.server_uuid,
            max_grpc_workers=32,
            max_child_task_workers=32,
        )
        self._analyser = CellAnalyserImpl(server, self)
        self._sampler = SamplerImpl(server, self)
        server.set_feature_implementation(ANALYSER_FEATURE, self._analyser)
        server.set_feature_implementation(SAMPLER_FEATURE, self._sampler)
        if self.insecure:
            server.start_insecure(self.host, self.port, enable_discovery=self.discovery)
        else:
            certs = self.certificates
            assert certs is not None
            server.start(
                self.host,
                self.port,
                private_key=certs.key.read_bytes(),
                cert_chain=certs.cert.read_bytes(),
                ca_for_discovery=certs.ca.read_bytes(),
                enable_discovery=self.discovery,
            )
        self.port = server.bound_port
        self._server = server
        # New subscribers get the current values at once.
        self._sampler._State_producer_queue.put(self.state)  # type: ignore[attr-defined]
        self._sampler._SampleCount_producer_queue.put(self.sample_count)  # type: ignore[attr-defined]
        if self._last_results is not None and self.faults.error is None:
            self._analyser.publish(self._last_results)

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None and server.running:
            self.faults.stopping.set()
            server.stop(grace_period=0)

    def stop(self) -> None:
        self._halt.set()
        self.faults.stopping.set()  # releases a sample waiting out a stall
        if self._ticker is not None:
            self._ticker.join(5)
            self._ticker = None
        self._stop_server()
        if self.source is not None:
            self.source.close()

    def restart(self, downtime: float = 1.0) -> None:
        """Stop the server (connections drop), wait ``downtime`` s, start again on the same port."""
        self._stop_server()
        time.sleep(downtime)
        self._start_server()

    # --- faults ----------------------------------------------------------------

    def stall(self, on: bool = True) -> None:
        """Stop (or resume) answering every call and publishing values."""
        if on:
            self.faults.stalled.set()
        else:
            self.faults.stalled.clear()

    def set_error(self, mode: ErrorMode | None) -> None:
        """Results and InstrumentTemperature become execution errors (None: values again)."""
        if mode not in (None, "defined", "undefined"):
            raise ValueError(f"unknown error mode {mode!r}; defined, undefined or None")
        self.faults.error = mode
        if mode is not None and self._analyser is not None:
            self._analyser.publish(None)

    # --- process ---------------------------------------------------------------

    def _step_model(self) -> BioreactorState:
        now = time.monotonic()
        self.model.step(max(0.0, now - self._last_step) * self.time_scale)
        self._last_step = now
        return self.model.state

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._sampler is not None and self._server is not None:
            self._sampler._State_producer_queue.put(state)  # type: ignore[attr-defined]

    def take_sample(self, progress: Callable[[float], None] | None = None) -> int | None:
        """Draw and analyse one sample (blocking); None if one is running already.

        Raises SampleFailed when ``bioreactor`` is set and cannot be read.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            drawn = datetime.now(UTC)
            state = self._step_model()
            analytics = {
                "ViableCellDensity": state.vcd,
                "Viability": state.viability,
                "Glucose": state.glucose,
                "Lactate": state.lactate,
            }
            if self.source is not None:
                try:
                    analytics = self.source.read()
                except Exception as exc:
                    # No sample could be drawn: every result says so.
                    why = f"no sample from the bioreactor: {type(exc).__name__}: {exc}"
                    if self._analyser is not None and self._server is not None:
                        self._analyser.publish(None, why)
                    raise SampleFailed(why) from exc
            self._set_state("Sampling")
            steps = 10
            for i in range(steps):
                if i == steps // 2:
                    self._set_state("Analysing")
                if progress is not None:
                    progress(i / steps)
                if self._halt.wait(self.analysis_time / steps):
                    return None
            self.faults.wait_while_stalled()
            if self._halt.is_set():
                return None
            self.sample_count += 1
            results: dict[str, Any] = {
                "ViableCellDensity": round(analytics["ViableCellDensity"], 4),
                "Viability": round(analytics["Viability"], 2),
                "Glucose": round(analytics["Glucose"], 3),
                "Lactate": round(analytics["Lactate"], 3),
                "SampleTimestamp": drawn,
            }
            self._last_results = results
            if self._analyser is not None and self._server is not None:
                if self.faults.error is None:
                    self._analyser.publish(results)
                else:
                    self._analyser.publish(None)
            if self._sampler is not None and self._server is not None:
                self._sampler._SampleCount_producer_queue.put(self.sample_count)  # type: ignore[attr-defined]
            self._set_state("Idle")
            if progress is not None:
                progress(1.0)
            return self.sample_count
        finally:
            self._lock.release()

    def _tick(self) -> None:
        while not self._halt.wait(0.02):
            if self.faults.stalled.is_set() or self._server is None:
                continue
            now = time.monotonic()
            if now >= self._next_sample:
                self._next_sample = now + self.sample_interval
                with contextlib.suppress(SampleFailed):  # published as MeasurementFailed
                    self.take_sample()

    def values(self) -> dict[str, Any]:
        """The last results, the state and the count (for the ``values`` command)."""
        out: dict[str, Any] = {"State": self.state, "SampleCount": self.sample_count}
        for k, v in (self._last_results or {}).items():
            out[k] = v.isoformat() if isinstance(v, datetime) else v
        return out
