"""The sink contract and the sink registry.

A sink is a noun: a small class with a pydantic ``Config`` (unknown keys rejected) and three
coroutines. The runner (``runner.py``) owns everything else: consuming, batching, retries,
commits, dead letters and shutdown.

- ``start()``: open connections; raise to refuse to start (bad config, unreachable store).
- ``write(batch)``: when it returns, every event in ``batch`` is durably stored. Otherwise it
  raises :class:`RetriableSinkError` (the runner backs off and retries the same batch) or
  :class:`PermanentSinkError` (the runner isolates the offending events and dead-letters them).
  Any other exception is treated as retriable. Writes must be idempotent by ``event_id``:
  after a crash the runner redelivers events whose offsets were not committed.
- ``stop()``: flush and close; safe without ``start()`` and safe twice.

The runner hands ``write`` a :class:`Batch`: a list of events from one partition, in offset
order, that also says where they came from (``topic``, ``partition``, ``offsets``), so a sink
can name what it writes after the records (the s3 sink names objects by first offset, so a
redelivered batch overwrites the same object). ``Batch(events)`` alone is a valid batch
(topic ``""``, partition 0, offsets 0..n-1) for tests and tools.

Typing: ``class MySink(Sink[MyConfig])`` names the config model once; ``Config`` follows from
it and ``self.config`` is a ``MyConfig``. A sink that owns a schema (tables, indexes) also
implements :class:`Migratable`; ``auditpipe sink NAME --migrate`` and ``auditpipe dev`` call it.

Sinks are found through the ``auditpipe.sinks`` entry point group, so a third-party package
adds one by declaring ``[project.entry-points."auditpipe.sinks"] NAME = "pkg.mod:Class"``.

Steps of a sink's own: ``[sinks.NAME] steps = ["redact"]`` (with ``[sinks.NAME.redact]``, the
same keys as ``[pipeline.redact]``) runs those steps on every event before this sink writes
it, so a store many people read can hold less than the restricted archive. The plumbing, not
each sink, handles them: :meth:`Sink.from_mapping` takes ``steps`` and the step tables out of
the sink's table and builds the chain (validated at start-up, errors name
``sinks.NAME.<step>.<key>``) through the shared step registry (:mod:`auditpipe.steps`), and
the runner applies it: an event a step fails on is dead-lettered, never written as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, cast, runtime_checkable

from auditpipe.schemas import Event

from auditpipe.errors import AuditpipeError, ConfigError
from auditpipe.models import StrictModel, validate_model
from auditpipe.plugins import available, bind_config_model, load_entry_point
from auditpipe.steps import ConfigT, Step, available_steps, build_chain, load_step_class

ENTRY_POINT_GROUP = "auditpipe.sinks"


class SinkError(AuditpipeError):
    """Base of the errors a sink's ``write`` may raise."""


class RetriableSinkError(SinkError):
    """The store is unavailable or slow; the same batch may succeed later."""

    permanent = False  # auditpipe.retry.is_permanent reads this


class PermanentSinkError(SinkError):
    """The store rejects the data itself; retrying cannot help."""

    permanent = True


class Batch(list[Event]):
    """Events of one partition in offset order, with their source (``offsets[i]`` is event i's)."""

    def __init__(
        self,
        events: Sequence[Event] = (),
        topic: str = "",
        partition: int = 0,
        offsets: Sequence[int] | None = None,
    ) -> None:
        super().__init__(events)
        self.topic = topic
        self.partition = partition
        self.offsets = list(offsets) if offsets is not None else list(range(len(self)))

    @property
    def first_offset(self) -> int:
        return self.offsets[0] if self.offsets else 0

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self[start:stop], self.topic, self.partition, self.offsets[start:stop])


def batch_source(batch: Sequence[Event]) -> tuple[str, int, int]:
    """(topic, partition, first offset) of ``batch``; neutral values for a plain sequence."""
    if isinstance(batch, Batch):
        return batch.topic, batch.partition, batch.first_offset
    return "events", 0, 0


class Sink(ABC, Generic[ConfigT]):
    """Base class of every sink, generic over its config model: ``Sink[MyConfig]``.

    Subclasses set ``name``; ``Config`` follows from the generic argument (see the module
    docstring for the lifecycle).
    """

    name: ClassVar[str]
    Config: ClassVar[type[Any]] = StrictModel  # a StrictModel subclass: ConfigT at runtime

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bind_config_model(cls, Sink)

    def __init__(self, config: ConfigT | None = None) -> None:
        self.config: ConfigT = config if config is not None else cast(ConfigT, self.Config())
        #: Steps run on every event before it is written (``[sinks.NAME] steps``; the runner
        #: applies them).
        self.steps: tuple[Step, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, origin: str = "settings") -> Sink:
        """The sink configured by its ``[sinks.NAME]`` table, ``steps`` and their tables
        included (see the module docstring)."""
        return cls._configure(data, origin, instantiate=True)  # type: ignore[return-value]

    @classmethod
    def check_mapping(cls, data: Mapping[str, Any] | None, origin: str = "settings") -> None:
        """Validate a ``[sinks.NAME]`` table like :meth:`from_mapping`, building nothing (what
        ``load_settings`` does for every sink table, run or not)."""
        cls._configure(data, origin, instantiate=False)

    @classmethod
    def _configure(
        cls, data: Mapping[str, Any] | None, origin: str, instantiate: bool
    ) -> Sink | None:
        data = dict(data or {})
        prefix = f"sinks.{cls.name}"
        chain = None
        if "steps" in data:
            names = data["steps"]
            table: dict[str, Any] = {"steps": data.pop("steps")}
            for name in names if isinstance(names, list) else ():
                if not isinstance(name, str):
                    continue
                keys = {name, getattr(load_step_class(name, f"{prefix}.steps"), "name", name)}
                for key in keys:
                    if isinstance(data.get(key), Mapping) and key not in cls.Config.model_fields:
                        table[key] = data.pop(key)
            chain = build_chain(table, origin, prefix=prefix, default=(), instantiate=instantiate)
        for key, value in data.items():
            if (
                isinstance(value, Mapping)
                and key not in cls.Config.model_fields
                and (key in available_steps() or ":" in key)
            ):
                raise ConfigError(
                    f"{origin}: [{prefix}.{key}] configures a step but {prefix}.steps does not "
                    f"list it; add it to steps = [...] in [{prefix}] or remove the table"
                )
        if "encrypt_content" in data and "encrypt_content" not in cls.Config.model_fields:
            raise ConfigError(
                f"{origin}: {prefix}.encrypt_content: the {cls.name} sink does not encrypt "
                "content; encrypt_content is for the archive sinks (file, s3), whose copies "
                "cannot always be deleted (S3 Object Lock, backups) and are erased by deleting "
                "the subject's key. A store that deletes records itself (postgres, mongodb) is "
                "erased with `auditpipe erase`, and serve/export read it in clear: remove the key"
            )
        config = validate_model(cls.Config, data, origin, prefix=prefix)
        if not instantiate:
            return None
        sink = cls(config)
        if chain:
            sink.steps = tuple(chain)
        return sink

    async def start(self) -> None:
        """Open connections. Default: nothing to do."""

    @abstractmethod
    async def write(self, batch: Batch) -> None:
        """Store ``batch`` durably, or raise RetriableSinkError / PermanentSinkError."""

    async def stop(self) -> None:
        """Flush and close. Default: nothing to do."""


@runtime_checkable
class Migratable(Protocol):
    """A sink that owns a schema in its store (tables, indexes) and can create or upgrade it.

    ``migrate()`` is idempotent: run on an up-to-date store it changes nothing. It may need
    more privileges than ``write`` (``auditpipe sink NAME --migrate`` runs it on its own).
    """

    async def migrate(self) -> None: ...


def available_sinks() -> dict[str, str]:
    """Installed sink names mapped to their ``module:Class`` (without importing them)."""
    return available(ENTRY_POINT_GROUP)


def load_sink_class(name: str) -> type[Sink]:
    install = f"install its extra: pip install 'auditpipe[{name}]'"
    return load_entry_point(ENTRY_POINT_GROUP, name, Sink, "sink", install)


def create_sink(name: str, sink_settings: Mapping[str, Mapping[str, Any]], origin: str) -> Sink:
    """Instantiate sink ``name`` with its ``[sinks.NAME]`` table from the settings."""
    cls = load_sink_class(name)
    return cls.from_mapping(sink_settings.get(name), origin)
