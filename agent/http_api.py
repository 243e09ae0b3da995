"""The local inference API: HTTP/1.1 and JSON on a loopback port or a Unix socket.

Routes::

    POST /v1/predict   {"instances": [[...], ...]} or {"instance": [...]}
                       -> {"model", "version", "predictions": [{"label", "class",
                           "confidence", "probabilities"}] or [{"value"}],
                           "prediction_ids": ["<id>", ...]}
    POST /v1/feedback  {"prediction_id", "true_label"} or {"feedback": [{...}, ...]}
                       -> 202 {"forwarded", "already_forwarded", "outcomes": [...]}
    GET  /v1/status    what runs, versions, connection state, outbox depth, this window
    GET  /v1/health    200 while a model is active, 503 otherwise

What always holds:

- Every answer is a JSON object; an error is ``{"error": code, "message": text}`` with
  a 4xx or 5xx status, never a traceback. A failure inside a handler is logged,
  answered 500, and the server keeps serving.
- A body is refused before it is read when its Content-Length is over
  ``limits.max_request_bytes`` (413, and the connection is closed), and is never
  read past that length. Batches are capped at ``limits.max_batch_rows``.
- The predictor sees only a finite float64 ``(rows, features)`` array: malformed JSON,
  a wrong shape, a value that is not a number (booleans and strings included), NaN
  and infinities are answered 400 with a message naming the problem and where.
- Each predict request is counted in the monitor: a prediction by
  :meth:`~agent.monitoring.WindowMonitor.record`, a failure by
  :meth:`~agent.monitoring.WindowMonitor.record_error`. Each call that reached the
  model is also handed to ``on_inference`` (the agent's health check of a new model):
  its latency, or None when the model failed -- not when the caller sent bad input.
- Every prediction gets an id (``prediction_ids``, one per row, in row order) from an
  :class:`~agent.feedback.PredictionLog` of the last ``limits.prediction_log_size``
  predictions. A label posted to ``/v1/feedback`` for one of them is checked against
  the model that made that prediction (its label set; classification only) and handed
  to ``on_feedback`` -- the agent puts it in its durable outbox -- before the answer
  is 202; a request with any bad item forwards nothing and names the first problem
  (404 an unknown or forgotten id, 422 a label the model does not know, 409 a
  prediction already labelled otherwise). The same label again is answered 202 and
  not forwarded twice.
- The TCP listener binds loopback addresses only; at most
  :data:`MAX_CONNECTIONS` connections are served at once, the rest are answered 503.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.config import HttpConfig, Limits
from agent.errors import AgentError, ConfigError
from agent.feedback import (
    FeedbackError,
    LabelConflictError,
    LoggedPrediction,
    PredictionLog,
    UnknownPredictionError,
)
from agent.monitoring import WindowMonitor
from agent.runtime import InputError, Prediction
from shared.bundle import BundleManifest
from shared.messages import MAX_OUTCOMES_PER_REPORT, LabelledOutcome
from shared.model import strict_json_loads

__all__ = ["MAX_CONNECTIONS", "SOCKET_TIMEOUT_SECONDS", "LocalApi", "Predictor"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
"""Connections served at once; more are answered 503 and closed."""

SOCKET_TIMEOUT_SECONDS = 15.0
"""How long a connection may sit idle, or a body take to arrive, before it is closed."""

_PREDICT, _STATUS, _HEALTH = "/v1/predict", "/v1/status", "/v1/health"
_FEEDBACK = "/v1/feedback"
_ALLOWED = {_PREDICT: ("POST",), _FEEDBACK: ("POST",), _STATUS: ("GET",), _HEALTH: ("GET",)}
_BUSY_BODY = b'{"error":"busy","message":"too many connections; try again shortly"}'


class Predictor(Protocol):
    """The active model as the API uses it (``agent.runtime.LoadedModel`` fits)."""

    @property
    def manifest(self) -> BundleManifest: ...

    @property
    def n_features(self) -> int:
        """Values per raw row."""

    def predict(self, rows: npt.NDArray[np.float64]) -> Prediction: ...


@dataclass
class _Reply:
    status: int
    payload: Mapping[str, Any]
    close: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class _HttpError(Exception):
    """An answer other than 200, raised anywhere below a route."""

    def __init__(
        self, status: HTTPStatus, code: str, message: str, *, close: bool = False, **headers: str
    ) -> None:
        super().__init__(message)
        self.reply = _Reply(int(status), {"error": code, "message": message}, close, headers)


# ----------------------------------------------------------------------------- request body


def _describe(value: Any) -> str:
    if type(value) in (int, float):
        return f"the number {value!r}"
    kinds = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object"}
    return kinds.get(type(value), "a list" if isinstance(value, list) else type(value).__name__)


def _bad(message: str) -> _HttpError:
    return _HttpError(HTTPStatus.BAD_REQUEST, "invalid_input", message)


def _parse_instances(body: bytes, *, n_features: int, max_rows: int) -> npt.NDArray[np.float64]:
    """The rows of a predict body as a finite float64 ``(rows, features)`` array."""
    try:
        data = strict_json_loads(body)
    except ValueError as e:
        raise _HttpError(
            HTTPStatus.BAD_REQUEST, "malformed_json", f"malformed JSON body ({e})"
        ) from e
    if not isinstance(data, dict):
        raise _bad(
            f'the body must be a JSON object with "instances" or "instance", not {_describe(data)}'
        )
    unknown = sorted(set(data) - {"instances", "instance"})
    if unknown:
        raise _bad(f'unknown field "{unknown[0]}"; the body takes "instances" or "instance"')
    if len(data) != 1:
        raise _bad('give either "instances" (a list of rows) or "instance" (one row), not both')
    if "instance" in data:
        rows, where = [data["instance"]], "instance"
        if not isinstance(rows[0], list):
            raise _bad(f"instance must be a list of numbers, not {_describe(rows[0])}")
    else:
        rows, where = data["instances"], "instances[{}]"
        if not isinstance(rows, list) or not rows:
            raise _bad("instances must be a non-empty list of rows (lists of numbers)")
        if len(rows) > max_rows:
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_many_rows",
                f"{len(rows)} instances is over the limit of {max_rows} per request",
            )
    for i, row in enumerate(rows):
        name = where.format(i)
        if not isinstance(row, list):
            raise _bad(f"{name} must be a list of numbers, not {_describe(row)}")
        if not {type(v) for v in row} <= {int, float}:  # bool is not a number here
            j, value = next((j, v) for j, v in enumerate(row) if type(v) not in (int, float))
            raise _bad(f"{name}[{j}] is {_describe(value)}, expected a number")
        if len(row) != n_features:
            raise _bad(f"{name} has {len(row)} values; the model takes {n_features}")
    try:
        x = np.array(rows, dtype=np.float64)
    except OverflowError as e:  # an integer beyond float64
        raise _bad(f"a value is too large for a 64-bit float: {e}") from e
    finite = np.isfinite(x)
    if not finite.all():
        i, j = (int(k) for k in np.argwhere(~finite)[0])
        raise _bad(f"{where.format(i)}[{j}] is not a finite number")
    return x


def _parse_feedback(body: bytes) -> list[tuple[str, str, Any]]:
    """The items of a feedback body as ``(where, prediction_id, true_label)``; ``where``
    prefixes a message about the item (``feedback[2]: ``, or nothing for one item)."""
    try:
        data = strict_json_loads(body)
    except ValueError as e:
        raise _HttpError(
            HTTPStatus.BAD_REQUEST, "malformed_json", f"malformed JSON body ({e})"
        ) from e
    if not isinstance(data, dict):
        raise _bad(f"the body must be a JSON object, not {_describe(data)}")
    if "feedback" in data:
        if set(data) != {"feedback"}:
            raise _bad('give either "feedback" (a list) or one prediction_id and true_label')
        raw = data["feedback"]
        if not isinstance(raw, list) or not raw:
            raise _bad('"feedback" must be a non-empty list of objects')
        if len(raw) > MAX_OUTCOMES_PER_REPORT:
            raise _HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_many_items",
                f"{len(raw)} feedback items is over the limit of {MAX_OUTCOMES_PER_REPORT} "
                "per request",
            )
        entries = [(f"feedback[{i}]: ", item) for i, item in enumerate(raw)]
    else:
        entries = [("", data)]
    items: list[tuple[str, str, Any]] = []
    seen: set[str] = set()
    for where, item in entries:
        if not isinstance(item, dict):
            raise _bad(f"{where}an item must be an object, not {_describe(item)}")
        unknown = sorted(set(item) - {"prediction_id", "true_label"})
        if unknown:
            raise _bad(f'{where}unknown field "{unknown[0]}"; give prediction_id and true_label')
        prediction_id, label = item.get("prediction_id"), item.get("true_label")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise _bad(f"{where}prediction_id must be the id /v1/predict answered with")
        if isinstance(label, bool) or not isinstance(label, str | int) or label == "":
            raise _bad(f"{where}true_label must be a label name or a class index")
        if prediction_id in seen:
            raise _bad(f"{where}prediction {prediction_id} appears twice")
        seen.add(prediction_id)
        items.append((where, prediction_id, label))
    return items


def _predictions(manifest: BundleManifest, prediction: Prediction) -> list[dict[str, Any]]:
    if manifest.task == "classification" and prediction.classes is not None:
        classes = np.asarray(prediction.classes).tolist()
        probabilities = (
            prediction.probabilities if prediction.probabilities is not None else prediction.outputs
        )
        confidence = (
            prediction.confidence
            if prediction.confidence is not None
            else np.max(probabilities, axis=1)
        )
        labels = list(prediction.labels) if prediction.labels is not None else [None] * len(classes)
        return [
            {"label": label, "class": c, "confidence": conf, "probabilities": p}
            for label, c, conf, p in zip(
                labels,
                classes,
                np.asarray(confidence, dtype=np.float64).tolist(),
                np.asarray(probabilities, dtype=np.float64).tolist(),
                strict=True,
            )
        ]
    outputs = np.asarray(prediction.outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return [{"value": v} for v in outputs[:, 0].tolist()]
    return [{"value": v} for v in outputs.reshape(outputs.shape[0], -1).tolist()]


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None, so that it encodes as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------- the API


class LocalApi:
    """Serves the active model to applications on the device, in background threads.

    ``predictor_provider`` returns the active model or None; ``status_provider`` the
    agent's status as JSON-able data. An :class:`~agent.runtime.InputError` from
    ``predict`` is the client's fault, answered 400 with its message; any other
    exception is logged and answered 500. ``on_inference(predictor, latency_ms)`` is
    called on the request's thread after each call of ``predict`` that was not an
    input error (``latency_ms`` None: the model failed); it must be cheap and not raise.
    ``on_feedback(outcomes)`` stores labelled outcomes durably (raising
    :class:`~agent.errors.AgentError` when it cannot); without it ``/v1/feedback``
    answers 503.
    """

    def __init__(
        self,
        predictor_provider: Callable[[], Predictor | None],
        monitor: WindowMonitor,
        *,
        config: HttpConfig,
        limits: Limits,
        status_provider: Callable[[], Mapping[str, Any]],
        on_inference: Callable[[Predictor, float | None], None] | None = None,
        on_feedback: Callable[[list[LabelledOutcome]], None] | None = None,
    ) -> None:
        if config.unix_socket is None and not _is_loopback(config.host):
            raise ConfigError(
                f"http.host {config.host!r} is not a loopback address; the local API has no "
                "authentication, so it listens on 127.0.0.1, ::1 or a Unix socket only"
            )
        self._predictor_provider = predictor_provider
        self._monitor = monitor
        self._config = config
        self._limits = limits
        self._status_provider = status_provider
        self._on_inference = on_inference
        self._on_feedback = on_feedback
        self.predictions = PredictionLog(limits.prediction_log_size)
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> tuple[str, int] | str:
        """Listen and serve in a background thread; the bound address (host, port) or path."""
        if self._server is not None:
            raise AgentError("the local API is already running")
        server: _TcpServer | _UnixServer
        if self._config.unix_socket is not None:
            path = self._config.unix_socket
            _clear_stale_socket(path)
            server = _UnixServer(str(path), _Handler)
            os.chmod(path, 0o660)  # the agent's user and group only
            address: tuple[str, int] | str = str(path)
        else:
            family = socket.AF_INET6 if ":" in self._config.host else socket.AF_INET
            server = _TcpServer((self._config.host, self._config.port), _Handler, family=family)
            host, port = server.server_address[:2]
            address = (str(host), int(port))
        server.api = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="edgefleet-local-api", daemon=True
        )
        self._thread.start()
        log.info("local API listening on %s", address)
        return address

    def stop(self) -> None:
        """Stop listening; requests in flight finish in their own threads."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        if self._config.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self._config.unix_socket.unlink()
        self._server = self._thread = None

    # -- routes

    def _handle(self, method: str, path: str, request: _Handler) -> _Reply:
        """Route one request; every failure comes back as a :class:`_Reply`."""
        try:
            allowed = _ALLOWED.get(path)
            if allowed is None:
                raise _HttpError(HTTPStatus.NOT_FOUND, "not_found", f"no route {path}")
            if method not in allowed:
                raise _HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    f"{path} takes {', '.join(allowed)}, not {method}",
                    Allow=", ".join(allowed),
                )
            if path == _PREDICT:
                return self._predict(request)
            if path == _FEEDBACK:
                return self._feedback(request)
            if path == _STATUS:
                return self._status()
            return self._health()
        except _HttpError as e:
            return e.reply
        except Exception:
            log.exception("local API: %s %s failed", method, path)
            return _HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error; see the agent log"
            ).reply

    def _predict(self, request: _Handler) -> _Reply:
        manifest: BundleManifest | None = None
        try:
            _check_content_type(request.headers.get("Content-Type"))
            length = _content_length(request, self._limits.max_request_bytes)
            predictor = self._predictor_provider()
            if predictor is None:
                request.discard_body(length)
                raise _HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no_model", "no model is active")
            manifest = predictor.manifest
            body = request.read_body(length)
            rows = _parse_instances(
                body,
                n_features=predictor.n_features,
                max_rows=self._limits.max_batch_rows,
            )
            started = time.perf_counter()
            try:
                prediction = predictor.predict(rows)
                latency_ms = (time.perf_counter() - started) * 1000.0
                if not np.isfinite(prediction.outputs).all():
                    raise RuntimeError("the model produced a non-finite output")
            except InputError as e:
                raise _bad(str(e)) from e
            except Exception:
                if self._on_inference is not None:
                    self._on_inference(predictor, None)
                raise
            if self._on_inference is not None:
                self._on_inference(predictor, latency_ms)
            predictions = _predictions(manifest, prediction)
            prediction_ids = self.predictions.record(
                manifest,
                prediction.classes,
                rows=len(prediction.outputs),
                n_classes=None
                if prediction.probabilities is None
                else int(prediction.probabilities.shape[1]),
            )
        except _HttpError as e:
            kind = "unavailable" if e.reply.status == 503 else "input"
            self._monitor.record_error(kind, manifest=manifest)
            raise
        except Exception:
            self._monitor.record_error("runtime", manifest=manifest)
            raise
        try:
            self._monitor.record(
                rows, prediction, latency_ms, manifest=manifest, prediction_ids=prediction_ids
            )
        except Exception:  # a monitoring fault must not cost the client its answer
            log.exception("local API: monitoring failed to record a prediction")
        return _Reply(
            200,
            {
                "model": manifest.model_name,
                "version": manifest.model_version,
                "predictions": predictions,
                "prediction_ids": prediction_ids,
            },
        )

    def _feedback(self, request: _Handler) -> _Reply:
        _check_content_type(request.headers.get("Content-Type"))
        length = _content_length(request, self._limits.max_request_bytes)
        body = request.read_body(length)
        if self._on_feedback is None:
            raise _HttpError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "feedback_unavailable",
                "this agent does not forward feedback",
            )
        items = _parse_feedback(body)
        now = datetime.now(UTC)
        checked: list[tuple[LoggedPrediction, int, bool]] = []
        for where, prediction_id, label in items:
            try:
                logged = self.predictions.lookup(prediction_id)
                true_class = logged.class_of(label)
                earlier = self.predictions.labelled_as(prediction_id)
                if earlier is not None and earlier != true_class:
                    raise LabelConflictError(
                        f"prediction {prediction_id} was already labelled "
                        f"{logged.label_of(earlier)!r}; the first label stays"
                    )
            except UnknownPredictionError as e:
                raise _HttpError(
                    HTTPStatus.NOT_FOUND, "unknown_prediction", f"{where}{e}"
                ) from None
            except LabelConflictError as e:
                raise _HttpError(HTTPStatus.CONFLICT, "label_conflict", f"{where}{e}") from None
            except FeedbackError as e:
                raise _HttpError(
                    HTTPStatus.UNPROCESSABLE_ENTITY, "unknown_label", f"{where}{e}"
                ) from None
            checked.append((logged, true_class, earlier is not None))
        outcomes = [
            LabelledOutcome(
                prediction_id=logged.prediction_id,
                model_name=logged.model_name,
                model_version=logged.model_version,
                # class_of() refused anything but a classification, so a class is there
                predicted_label=logged.label_of(int(logged.predicted_class or 0)),
                true_label=logged.label_of(true_class),
                predicted_at=logged.predicted_at,
                labelled_at=now,
            )
            for logged, true_class, already in checked
            if not already
        ]
        if outcomes:
            try:
                self._on_feedback(outcomes)
            except AgentError as e:
                raise _HttpError(
                    HTTPStatus.SERVICE_UNAVAILABLE, "feedback_not_stored", str(e)
                ) from e
            for logged, true_class, already in checked:
                if not already:
                    self.predictions.mark_labelled(logged.prediction_id, true_class)
        return _Reply(
            202,
            {
                "forwarded": len(outcomes),
                "already_forwarded": len(checked) - len(outcomes),
                "outcomes": [
                    {
                        "prediction_id": logged.prediction_id,
                        "model": logged.model_name,
                        "version": logged.model_version,
                        "predicted_label": logged.predicted_label,
                        "true_label": logged.label_of(true_class),
                        "correct": logged.predicted_class == true_class,
                    }
                    for logged, true_class, _ in checked
                ],
            },
        )

    def _status(self) -> _Reply:
        status = dict(self._status_provider())
        status["window"] = self._monitor.snapshot()
        return _Reply(200, _json_safe(status))

    def _health(self) -> _Reply:
        predictor = self._predictor_provider()
        if predictor is None:
            return _Reply(503, {"status": "no_model", "serving": False})
        manifest = predictor.manifest
        return _Reply(
            200,
            {
                "status": "ok",
                "serving": True,
                "model": manifest.model_name,
                "version": manifest.model_version,
            },
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file no server answers on; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"http.unix_socket {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise ConfigError(f"http.unix_socket {path} is in use by another process")


def _check_content_type(value: str | None) -> None:
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise _HttpError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {value or 'missing'}",
        )


def _content_length(request: _Handler, limit: int) -> int:
    if request.headers.get("Transfer-Encoding"):
        raise _HttpError(
            HTTPStatus.LENGTH_REQUIRED,
            "length_required",
            "send the body with a Content-Length, not a Transfer-Encoding",
            close=True,
        )
    raw = request.headers.get("Content-Length")
    if raw is None:
        raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "length_required", "Content-Length is missing")
    try:
        length = int(raw)
        if length < 0:
            raise ValueError
    except ValueError:
        raise _HttpError(
            HTTPStatus.BAD_REQUEST,
            "bad_length",
            f"Content-Length {raw!r} is not a size",
            close=True,
        ) from None
    if length > limit:
        raise _HttpError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "too_large",
            f"the body is {length} bytes, over the limit of {limit}",
            close=True,  # the unread body must not be taken for the next request
        )
    return length


# ----------------------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    server: _TcpServer | _UnixServer
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-agent"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_SECONDS
    _body_read = False

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # An answer leaves as two writes (headers, body): with Nagle's algorithm the
            # body waits for the client's delayed ACK of the headers, ~40 ms per request
            # on a keep-alive connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        self._body_read = False
        path = self.path.split("?", 1)[0]
        reply = self.server.api._handle(self.command, path, self)
        if not self._body_read and (
            self.headers.get("Content-Length", "0").strip() != "0"
            or self.headers.get("Transfer-Encoding")
        ):
            reply.close = True  # an unread body must not be taken for the next request
        self._send(reply)

    def read_body(self, length: int) -> bytes:
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _HttpError(
                HTTPStatus.REQUEST_TIMEOUT, "timeout", "the body did not arrive in time", close=True
            ) from None
        self._body_read = True
        if len(body) != length:
            raise _HttpError(
                HTTPStatus.BAD_REQUEST,
                "short_body",
                f"the body ended after {len(body)} of {length} bytes",
                close=True,
            )
        return body

    def discard_body(self, length: int) -> None:
        with contextlib.suppress(_HttpError):
            self.read_body(length)

    def _send(self, reply: _Reply) -> None:
        try:
            body = json.dumps(reply.payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError):
            log.exception("local API: cannot encode the answer to %s %s", self.command, self.path)
            reply = _HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "internal error; see the agent log"
            ).reply
            body = json.dumps(reply.payload).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server raises itself (a malformed request line, say), as JSON."""
        status = HTTPStatus(code)
        text = message or status.phrase
        self._send(_Reply(code, {"error": "protocol", "message": text}, close=True))

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("local API %s: " + format, self.address_string(), *args)


class _BoundedThreading(socketserver.ThreadingMixIn):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` at once."""

    daemon_threads = True
    block_on_close = False
    api: LocalApi

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_busy_response())
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-answer, say; never a traceback on stderr.
        log.debug("local API connection from %s failed", client_address or "unix", exc_info=True)


def _busy_response() -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
    )


class _TcpServer(_BoundedThreading, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], *, family: int) -> None:
        self.address_family = family
        super().__init__(address, handler)


class _UnixServer(_BoundedThreading, socketserver.UnixStreamServer):
    pass
