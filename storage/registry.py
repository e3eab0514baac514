"""Named models: which trained retriever and which index a name serves, chosen explicitly.

`full-pipeline` registers each (train, index) pair it builds under a model name (one per dataset
or config); `promote` chooses the version that `reindex-kb` and `link` serve; `reindex-kb` records
the new index it built for a version. Nothing is ever picked because it is "the newest".

The registry is an append-only log of small JSON events under `<root>/_models/<name>/`, one file
per event with a unique, time-ordered name, so concurrent runs never overwrite each other and the
whole history stays readable. The state is the replay of the log:
- a version is a trained retriever (its `train` key), numbered in order of first registration;
- a version's index is the last index registered or re-indexed for it;
- the served version is the last one promoted; the first version registered under a name is
  promoted by that registration (so a fresh store serves what it trained), later ones are not.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.fs import StoreFS

MODELS_DIR = "_models"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(RuntimeError):
    """A model name, version or promotion that cannot be resolved; the message says what exists."""


@dataclass
class ModelVersion:
    number: int
    train: str
    index: str
    registered_at: str
    info: dict[str, Any] = field(default_factory=dict)
    index_history: list[str] = field(default_factory=list)
    reranker: str | None = None  # the `train_reranker` key trained on this retriever's candidates (stage 3)
    nil: str | None = None  # the `fit_nil` key fitted on this version's final val lists


@dataclass
class ModelState:
    name: str
    versions: list[ModelVersion]
    served: int | None  # version number

    def version(self, ref: str | int) -> ModelVersion:
        """A version by number (`2`, `v2`) or by a prefix of its train key."""
        text = str(ref).removeprefix("v")
        if text.isdigit():
            for version in self.versions:
                if version.number == int(text):
                    return version
        matches = [v for v in self.versions if v.train.startswith(str(ref))]
        if len(matches) == 1:
            return matches[0]
        raise RegistryError(f"model {self.name!r} has no version {str(ref)!r}; versions: {self.describe()}")

    def describe(self) -> str:
        return ", ".join(
            f"v{v.number} (train {v.train[:12]}{', served' if v.number == self.served else ''})" for v in self.versions
        ) or "none"

    @property
    def serving(self) -> ModelVersion:
        if self.served is None:
            raise RegistryError(
                f"model {self.name!r} has no promoted version; versions: {self.describe()}. "
                f"Choose one: kgmel models promote {self.name} <version>"
            )
        return self.version(self.served)


class ModelRegistry:
    """The registry of a store (`ModelRegistry(store.fsx)`)."""

    def __init__(self, fsx: StoreFS):
        self.fsx = fsx
        self.folder = fsx.join(MODELS_DIR)

    def names(self) -> list[str]:
        return [n for n in self.fsx.entries(self.folder, dirs=True) if self.event_files(n)]

    def event_files(self, name: str) -> list[str]:
        folder = self.fsx.join(MODELS_DIR, name)
        return [self.fsx.join(MODELS_DIR, name, f) for f in self.fsx.entries(folder, dirs=False) if f.endswith(".json")]

    def _append(self, name: str, event: dict[str, Any]) -> None:
        if not _NAME.match(name):
            raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        now = datetime.now(UTC)
        event = {**event, "at": now.isoformat()}
        path = self.fsx.join(MODELS_DIR, name, f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.json")
        self.fsx.write_text_atomic(path, json.dumps(event, indent=2, default=str))

    def _events(self, name: str) -> list[dict[str, Any]]:
        events = []
        for path in self.event_files(name):
            try:
                events.append(json.loads(self.fsx.read_text(path)))
            except ValueError as exc:
                raise RegistryError(f"{path}: unreadable registry event ({exc})") from None
        return events

    def state(self, name: str) -> ModelState:
        versions: dict[str, ModelVersion] = {}
        served: str | None = None
        for event in self._events(name):
            train = event["train"]
            if event["event"] == "register":
                if train not in versions:
                    number = len(versions) + 1
                    versions[train] = ModelVersion(number, train, event["index"], event["at"], event.get("info", {}))
                    if served is None:
                        served = train
                versions[train].index = event["index"]
                versions[train].reranker = event.get("reranker")
                versions[train].nil = event.get("nil")
            elif event["event"] == "reindex" and train in versions:
                versions[train].index = event["index"]
            elif event["event"] == "promote" and train in versions:
                served = train
            if train in versions and event.get("index") and event["index"] not in versions[train].index_history:
                versions[train].index_history.append(event["index"])
        ordered = sorted(versions.values(), key=lambda v: v.number)
        return ModelState(name, ordered, versions[served].number if served else None)

    def require(self, name: str) -> ModelState:
        state = self.state(name)
        if not state.versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(
                f"no model named {name!r} under {self.fsx.url} (models: {known}); "
                "run kgmel/full-pipeline with this model name first"
            )
        return state

    def register(self, name: str, train: str, index: str, info: dict[str, Any] | None = None,
                 reranker: str | None = None, nil: str | None = None) -> ModelVersion:
        """Record a trained retriever, its index, the reranker trained on its candidates and the NIL model
        fitted on its final lists under `name`; re-registering the same retriever is a no-op for the version
        list (its index, reranker and NIL model are updated)."""
        state = self.state(name)
        existing = next((v for v in state.versions if v.train == train), None)
        if existing is None or (existing.index, existing.reranker, existing.nil) != (index, reranker, nil):
            self._append(name, {"event": "register", "train": train, "index": index, "info": info or {},
                                "reranker": reranker, "nil": nil})
        return self.state(name).version(train[:20])

    def record_reindex(self, name: str, train: str, index: str) -> None:
        state = self.require(name)
        if not any(v.train == train for v in state.versions):
            raise RegistryError(f"model {name!r} has no version trained as {train}")
        if state.version(train[:20]).index != index:
            self._append(name, {"event": "reindex", "train": train, "index": index})

    def promote(self, name: str, ref: str | int) -> ModelVersion:
        version = self.require(name).version(ref)
        self._append(name, {"event": "promote", "train": version.train})
        return version

    def history(self, name: str) -> list[dict[str, Any]]:
        return self._events(name)
