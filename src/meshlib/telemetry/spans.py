"""Spans written straight to the OpenTelemetry SDK's span processors.

An SDK span costs about 9 µs to start and end (locks, attribute validation, the
sampler, the processors' start hooks, a copy at the end), and a sampled call makes
two of them (the logical call and its attempt), a served request one more. When the
SDK is set up the standard way, the mesh skips all of that: its span is itself a
`ReadableSpan` (the SDK's export type), handed to the processors' ``on_end`` when
it ends, as the SDK's ``Span.end`` does with its copy. "The standard way" is checked
once a second by `sink_for` and means nothing the shortcut would bypass can be in
use:

- the tracer is the SDK's and enabled, and its self-metrics are off;
- the sampler is the SDK's default (parent-based always-on) or always-on, so that a
  span the mesh decided to sample is one the SDK would sample too;
- every span processor is the SDK's batch or simple processor, whose start and
  ending hooks do nothing;
- no limit on the length of attribute values (counts are applied as the SDK does).

Anything else (a custom sampler or processor, value lengths, another SDK) and the
mesh starts its spans through the tracer as any instrumentation does. The ids come
from the tracer's id generator either way, attributes, events and links are checked
and bounded as the SDK does (the application adds to the server span it sees as
current), and the exported spans are the same: a test compares them field by field.

This module imports the SDK; `meshlib.telemetry.tracing` imports it only once the
installed tracer is the SDK's.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SynchronousMultiSpanProcessor,
    sampling,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

log = logging.getLogger("meshlib.telemetry")

try:  # the API's own check of attribute values, as the SDK applies it
    from opentelemetry.attributes import _clean_attribute_value
except ImportError:  # an API without it: no shortcut (see sink_for)
    _clean_attribute_value = None  # type: ignore[assignment]

_UNSET = Status(StatusCode.UNSET)


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


class Sink:
    """The parts of an SDK tracer a finished span needs: its resource, scope and
    processors, its id generator and its span limits (None: no limit)."""

    __slots__ = (
        "_ids",
        "_root_flags",
        "_span",
        "max_attributes",
        "max_event_attributes",
        "max_events",
        "max_link_attributes",
        "max_links",
        "processors",
        "room",
        "tracer",
    )

    def __init__(self, tracer: Any, processors: tuple[Any, ...]) -> None:
        limits = tracer._span_limits
        self.tracer = tracer
        self.max_attributes: int | None = limits.max_span_attributes
        self.max_events: int | None = limits.max_events
        self.max_event_attributes: int | None = limits.max_event_attributes
        self.max_links: int | None = limits.max_links
        self.max_link_attributes: int | None = limits.max_link_attributes
        self.room = math.inf if self.max_attributes is None else self.max_attributes
        """Attributes a span may have before the limit needs a look."""
        self._ids = tracer.id_generator
        self._root_flags = _SAMPLED_RANDOM if self._ids.is_trace_id_random() else _SAMPLED
        self.processors = processors
        # the tracer's resource and scope, as class attributes of this sink's spans:
        # what every span shares is not stored in every span
        self._span: type[DirectSpan] = type(
            "DirectSpan",
            (DirectSpan,),
            {
                "_sink": self,
                "_resource": tracer.resource,
                "_instrumentation_info": tracer.instrumentation_info,
                "_instrumentation_scope": tracer._instrumentation_scope,
            },
        )

    def serves(self, tracer: Any, processors: tuple[Any, ...]) -> bool:
        """Whether this sink is the one `sink_for` would make for ``tracer`` now."""
        return tracer is self.tracer and processors == self.processors

    def start(
        self,
        name: str,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> DirectSpan:
        """A sampled span, child of ``parent`` (None: a root), started now."""
        if parent is None:
            context = SpanContext(
                self._ids.generate_trace_id(),
                self._ids.generate_span_id(),
                False,
                self._root_flags,
            )
        else:
            context = SpanContext(
                parent.trace_id,
                self._ids.generate_span_id(),
                False,
                _SAMPLED_RANDOM if parent.trace_flags & TraceFlags.RANDOM_TRACE_ID else _SAMPLED,
                parent.trace_state,
            )
        return self._span(name, context, parent, kind, attributes)


def sink_for(tracer: Any, current: Sink | None = None) -> Sink | None:
    """A `Sink` for ``tracer`` when its setup allows writing spans straight to its
    processors (see the module's docstring), else None; ``current`` if it still
    serves."""
    try:
        if type(tracer).__module__ != "opentelemetry.sdk.trace" or type(tracer).__name__ != (
            "Tracer"
        ):
            return None
        if not tracer._is_enabled():
            return None
        if type(tracer._tracer_metrics).__name__ != "NoOpTracerMetrics":
            return None
        if tracer.sampler is not sampling.DEFAULT_ON and tracer.sampler is not sampling.ALWAYS_ON:
            return None
        multi = tracer.span_processor
        if type(multi) is not SynchronousMultiSpanProcessor:
            return None
        processors = tuple(multi._span_processors)
        if any(type(p) not in (BatchSpanProcessor, SimpleSpanProcessor) for p in processors):
            return None
        limits = tracer._span_limits
        if limits.max_span_attribute_length is not None or limits.max_attribute_length is not None:
            return None  # every value would need a length check
        if _clean_attribute_value is None:
            return None
        if current is not None and current.serves(tracer, processors):
            return current
        return Sink(tracer, processors)
    except Exception:  # an SDK shaped otherwise: spans go through the tracer
        log.debug("spans go through the tracer", exc_info=True)
        return None


_PRIMITIVES = frozenset((str, bool, int, float))


def _bounded(limit: int | None, attributes: Attributes, dropped: int = 0) -> BoundedAttributes:
    """The SDK's bounded attributes: values checked, the last ``limit`` kept, the
    rest (and ``dropped`` more) counted as dropped."""
    bounded = BoundedAttributes(limit, attributes, immutable=True)
    bounded.dropped += dropped
    return bounded


class DirectSpan(trace.Span, ReadableSpan):
    """A sampled span, and the finished span the processors get when it ends (the
    SDK's `ReadableSpan` reads the same fields); after `end` it takes no more.

    Attributes, events and links are checked and bounded as the SDK does (the
    application may add to a server span); a string, number or boolean value, the
    mesh's own kind, is stored at once."""

    # slots: no instance dict to allocate per span (ReadableSpan's properties read
    # these names all the same)
    __slots__ = ("_attributes", "_context", "_kind", "_name", "_parent", "_start_time", "_values")

    # what a span has until it gets more (read by ReadableSpan's properties)
    _sink: Sink
    _events: Sequence[Event] = ()
    _links: Sequence[Link] = ()
    _status = _UNSET
    _dropped = 0
    _end_time: int | None = None

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> None:
        # ReadableSpan's fields, set here rather than through its __init__; the
        # resource and scope are class attributes of the sink's subclass
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = self._values = attributes  # _values: the same, while it may grow
        self._start_time = time_ns()

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # set in __init__, never None

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is None:
            if type(value) in _PRIMITIVES and type(key) is str and key:
                self._values[key] = value
            elif key and isinstance(key, str):
                self._values[key] = _clean_attribute_value(value, None)
            else:
                log.warning("invalid attribute key %r: dropped", key)
                self._dropped += 1

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self._end_time is None:
            bounded = _bounded(self._sink.max_event_attributes, attributes)
            self._events = [*self._events, Event(name, bounded, timestamp or time_ns())]

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self._end_time is None and (context.is_valid or attributes):  # the SDK's rule
            link = Link(context, _bounded(self._sink.max_link_attributes, attributes))
            self._links = [*self._links, link]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # the SDK's rule: OK is final, UNSET never replaces anything
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        recorded: dict[str, Any] = {
            "exception.type": kind.__qualname__
            if not module or module == "builtins"
            else f"{module}.{kind.__qualname__}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        sink = self._sink
        if self._dropped or self._events or self._links or len(self._values) > sink.room:
            self._bound(sink)
        for processor in sink.processors:
            try:
                processor.on_end(self)
            except Exception:  # a processor's failure must not fail the call
                log.exception("a span processor failed")

    def _bound(self, sink: Sink) -> None:
        """Apply the SDK's span limits (rarely needed: the mesh's spans are small)."""
        limit = sink.max_attributes
        if self._dropped or (limit is not None and len(self._values) > limit):
            self._attributes = _bounded(limit, self._values, self._dropped)  # the oldest go
        if sink.max_events is not None and len(self._events) > sink.max_events:
            self._events = BoundedList.from_seq(sink.max_events, self._events)
        if sink.max_links is not None and len(self._links) > sink.max_links:
            self._links = BoundedList.from_seq(sink.max_links, self._links)
