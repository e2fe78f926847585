"""Per-request settings: a request's own token budget, or dense attention, through the API.

A request asks through sglang's `custom_params` sampling parameter, under the key "multipole":
`{"multipole": {"token_budget": 0.05}}` or `{"multipole": "dense"}`. The plugin checks the value
where sglang verifies sampling parameters (a bad one is an HTTP 400), and records, before each
forward pass, which request row (`req_to_token` row) holds which setting (`ROW_SETTINGS`). The
backend looks each batch row up there: settings are per-row data, so requests of different
settings share a batch, and one decode CUDA graph replays for all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mp_sglang.method.config import MultipoleConfig

KEY = "multipole"
DENSE = "dense"
ACCEPTED_KEYS = ("token_budget",)
_FORM = f'custom_params["{KEY}"] must be "{DENSE}" or {{"token_budget": <fraction in (0, 1]>}}'


@dataclass(frozen=True)
class RequestSetting:
    """What one request asked for: exact attention over its whole context, or its own token
    budget (a fraction of its context, as the server's `token_budget`)."""

    dense: bool = False
    token_budget: float | None = None


def setting_of(custom_params: Any, limit: float | None = None) -> RequestSetting | None:
    """The request's setting in its `custom_params`, or None (the server's settings).

    A malformed value raises ValueError saying what is accepted; with `limit`, so does a budget
    above it (the largest budget the server's kernel path is sized for).
    """
    if not isinstance(custom_params, dict) or KEY not in custom_params:
        return None
    value = custom_params[KEY]
    if value == DENSE:
        return RequestSetting(dense=True)
    if not isinstance(value, dict):
        raise ValueError(f"{_FORM}; got {value!r}")
    unknown = sorted(set(value) - set(ACCEPTED_KEYS))
    if unknown:
        accepted = list(ACCEPTED_KEYS)
        raise ValueError(f'custom_params["{KEY}"] has unknown key(s) {unknown}; accepted keys: {accepted}')
    if "token_budget" not in value:
        raise ValueError(f"{_FORM}; got {value!r}")
    budget = value["token_budget"]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"{_FORM}; got token_budget={budget!r}")
    if limit is not None and budget > limit:
        raise ValueError(
            f'custom_params["{KEY}"]["token_budget"]={budget!r} is above this server\'s limit {limit!r} '
            "(MULTIPOLE_MAX_REQUEST_BUDGET, docs/usage.md)"
        )
    return RequestSetting(token_budget=float(budget))


def check_request(custom_params: Any) -> None:
    """Refuse a request whose setting is malformed or above the server's limit (ValueError).

    Runs in the process that receives requests, which inherits the server's MULTIPOLE_* settings.
    """
    if isinstance(custom_params, dict) and KEY in custom_params:
        setting_of(custom_params, MultipoleConfig.from_env().max_request_budget)


class RowSettings:
    """The setting of the request in each request row, as of the latest batch that listed it.

    A row's entry is rewritten whenever a batch lists the row, so a row handed to a new request
    takes that request's setting at its first pass (its prefill), before it decodes. Nothing is
    noted until a multipole backend starts in the process (`listen`): servers of other backends
    pay nothing per batch.
    """

    def __init__(self) -> None:
        self._by_row: dict[int, RequestSetting] = {}
        self.listening = False

    def listen(self) -> None:
        self.listening = True

    def record(self, rows_and_params: Iterable[tuple[int, Any]]) -> None:
        """Note the setting of each (request row, custom_params) of a batch."""
        if not self.listening:
            return
        for row, custom_params in rows_and_params:
            setting = setting_of(custom_params)
            if setting is None:
                self._by_row.pop(row, None)
            else:
                self._by_row[row] = setting

    def get(self, row: int) -> RequestSetting | None:
        return self._by_row.get(row)


# One per process: a scheduler process runs one model runner, whose backend reads this.
ROW_SETTINGS = RowSettings()
