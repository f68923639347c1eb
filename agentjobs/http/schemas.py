"""Request validation at the boundary: bodies through cattrs, query strings by hand.

Why cattrs with strict hooks: the default converter quietly turns `1` into `"1"` and
`"5"` into `5`, which is exactly the kind of guess an API must not make (a prompt of `1` is
a client bug worth a 422). The hooks below accept only the JSON type the field declares,
and `forbid_extra_keys` turns a misspelt field (`sesion_id`) into a 422 naming it rather
than a silently ignored option.

PraisonAI's own request fields (`agent_file`, `agent_yaml`, `framework`, `recipe_name`,
`recipe_config`, `idempotency_scope`) are declared so that its clients are not refused for
sending their defaults (null, `{}`, `"none"`); a real value gets a clear 422
`unsupported-field`, because our runners cannot honour it and silently ignoring it would
run something other than what was asked.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
import orjson
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from ..engine.ssrf import UnsafeWebhookURL, parse_url
from .errors import FieldError, Problem, validation

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_QUERY_INTEGER",
    "ListQuery",
    "Submit",
    "SubmitBody",
    "int_param",
    "parse_batch",
    "parse_list_query",
    "parse_submit",
    "parse_wait",
    "validate_submit",
]

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 20
# The largest integer a query parameter may have: the largest every JSON reader (doubles,
# JavaScript) holds exactly. Larger numbers would make answers that echo them (`page`)
# unencodable (orjson stops at 64 bits) or wrong for clients, so they are refused (422).
MAX_QUERY_INTEGER = 2**53 - 1
_DIGITS = re.compile(r"[+-]?[0-9]+")

# Fields PraisonAI's JobSubmitRequest has and our runners cannot honour.
UNSUPPORTED_FIELDS = ("agent_file", "agent_yaml", "framework", "recipe_name", "recipe_config")
# Fields that are about idempotency, not about the work: left out of the request hash.
_IDEMPOTENCY_FIELDS = frozenset({"idempotency_key", "idempotency_scope"})


@attrs.define(slots=True, kw_only=True)
class SubmitBody:
    """The body of `POST /api/v1/runs`, as declared in docs/openapi.yaml."""

    prompt: str
    config: dict[str, Any] | None = None
    session_id: str | None = None
    webhook_url: str | None = None
    timeout: float | None = None
    idempotency_key: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    runner: str | None = None
    ttl: float | None = None
    # PraisonAI's fields: accepted when unset (see the module docstring).
    idempotency_scope: str | None = None
    agent_file: str | None = None
    agent_yaml: str | None = None
    framework: str | None = None
    recipe_name: str | None = None
    recipe_config: dict[str, Any] | None = None


_FIELD_NAMES = tuple(a.name for a in attrs.fields(SubmitBody))


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"must be a string, not {_json_type(value)}")
    return value


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, not {_json_type(value)}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"must be a number, not {_json_type(value)}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError("must be a finite number")
    return result


def _strict_object(value: Any, _: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"must be an object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(str, _strict_str)
_converter.register_structure_hook(int, _strict_int)
_converter.register_structure_hook(float, _strict_float)
_converter.register_structure_hook_func(lambda t: t == dict[str, Any], _strict_object)


def _field_errors(exc: ClassValidationError) -> list[FieldError]:
    with_notes, without = exc.group_exceptions()
    errors: list[FieldError] = []
    for err, note in with_notes:
        if isinstance(err, KeyError):
            errors.append(FieldError(note.name, "is required"))
        else:
            errors.append(FieldError(note.name, str(err)))
    for err in without:
        if isinstance(err, ForbiddenExtraKeysError):
            for name in sorted(err.extra_fields):
                errors.append(
                    FieldError(
                        name,
                        "unknown field (accepted: " + ", ".join(_FIELD_NAMES) + ")",
                    )
                )
        else:  # pragma: no cover - cattrs reports everything above with a note
            errors.append(FieldError("$", str(err)))
    return errors


@attrs.frozen(slots=True)
class Submit:
    """A validated submit: the engine's arguments plus the idempotency key and body hash."""

    body: SubmitBody
    idempotency_key: str | None
    request_hash: str | None


def check_idempotency_key(value: str, field: str) -> str:
    """A key is 1-255 printable ASCII characters (so it is safe in logs and headers)."""
    if not value:
        raise validation([FieldError(field, "must not be empty")])
    if len(value) > MAX_KEY_LENGTH:
        raise validation(
            [FieldError(field, f"is {len(value)} characters, over the limit of {MAX_KEY_LENGTH}")]
        )
    if not all(" " <= ch <= "~" for ch in value):
        raise validation([FieldError(field, "must be printable ASCII (no control characters)")])
    return value


def _check_webhook_url(url: str) -> None:
    """The URL's shape (scheme, host, length), with the parser deliveries use; whether its
    host may be called is the outbox's check, made by the app (it needs DNS)."""
    try:
        parse_url(url)
    except UnsafeWebhookURL as exc:
        raise validation([FieldError("webhook_url", exc.reason)]) from None


def parse_submit(raw: bytes, header_key: str | None) -> Submit:
    """Validate a submit body (already size-checked). Raises `Problem`."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem("malformed-json", f"the request body is not valid JSON: {exc}") from None
    return validate_submit(data, header_key)


def validate_submit(data: Any, header_key: str | None) -> Submit:
    """Validate one decoded submit body: a `POST /api/v1/runs` body, or one item of a
    batch (with `header_key` None: a batch's items carry their own keys). Raises `Problem`.

    One function for both, so that a batch item is accepted or refused exactly as the
    same body sent alone would be.
    """
    if not isinstance(data, dict):
        raise validation(
            [FieldError("$", f"the body must be a JSON object, not {_json_type(data)}")]
        )
    try:
        body = _converter.structure(data, SubmitBody)
    except ClassValidationError as exc:
        raise validation(_field_errors(exc)) from None

    unsupported = [
        name
        for name in UNSUPPORTED_FIELDS
        if getattr(body, name) is not None and getattr(body, name) != {}
    ]
    if unsupported:
        raise Problem(
            "unsupported-field",
            "this server runs prompts with its configured runners (see the `runner` field) "
            "and does not support PraisonAI's "
            + ", ".join(unsupported)
            + "; remove "
            + ("it" if len(unsupported) == 1 else "them")
            + " or set "
            + ("it" if len(unsupported) == 1 else "them")
            + " to null",
            errors=[FieldError(n, "not supported by this server's runners") for n in unsupported],
        )
    if body.idempotency_scope not in (None, "none"):
        raise Problem(
            "unsupported-field",
            'idempotency_scope: only "none" (or null) is supported; idempotency keys are '
            "always scoped to the caller's tenant",
            errors=[FieldError("idempotency_scope", 'must be "none" or null')],
        )
    if body.webhook_url is not None:
        _check_webhook_url(body.webhook_url)

    key = None
    if header_key is not None:
        key = check_idempotency_key(header_key, IDEMPOTENCY_HEADER)
    elif body.idempotency_key is not None:
        key = check_idempotency_key(body.idempotency_key, "idempotency_key")
    request_hash = _hash(body) if key is not None else None
    return Submit(body, key, request_hash)


def _hash(body: SubmitBody) -> str:
    """sha256 of the canonical JSON of the validated body, minus idempotency fields.

    Canonical: keys sorted, nulls dropped, numbers as the types declared (so `"timeout": 5`
    and `"timeout": 5.0` are the same request, and so are a missing field and a null one).
    """
    fields = {
        name: value
        for name, value in _converter.unstructure(body).items()
        if value is not None and name not in _IDEMPOTENCY_FIELDS
    }
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_batch(raw: bytes, max_items: int) -> list[Any]:
    """The items of a `POST /api/v1/runs/batch` body, `{"runs": [...]}`, still undecided:
    each is validated on its own (`validate_submit`), so one bad item does not refuse the
    others. What is wrong with the batch as a whole raises `Problem` (nothing is written).
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem("malformed-json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise validation(
            [
                FieldError(
                    "$", f'the body must be a JSON object {{"runs": [...]}}, not {_json_type(data)}'
                )
            ]
        )
    extra = sorted(k for k in data if k != "runs")
    if extra:
        raise validation([FieldError(k, "unknown field (accepted: runs)") for k in extra])
    if "runs" not in data:
        raise validation([FieldError("runs", "is required (an array of submit bodies)")])
    runs = data["runs"]
    if not isinstance(runs, list):
        raise validation([FieldError("runs", f"must be an array, not {_json_type(runs)}")])
    if not runs:
        raise validation([FieldError("runs", "must not be empty")])
    if len(runs) > max_items:
        raise validation(
            [
                FieldError(
                    "runs",
                    f"has {len(runs)} items, over the limit of {max_items} per batch "
                    "(--max-batch); split it",
                )
            ]
        )
    return runs


# -- query strings -------------------------------------------------------------------


@attrs.frozen(slots=True)
class ListQuery:
    status: str | None
    session_id: str | None
    limit: int
    cursor: str | None
    page: int | None  # None in cursor mode
    offset: int


def int_param(args: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    """`?name=N`: None when absent, else an integer from `low` to `high` (at most
    `MAX_QUERY_INTEGER` either way). 400 for a non-integer, 422 out of range."""
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    cap = MAX_QUERY_INTEGER if high is None else min(high, MAX_QUERY_INTEGER)
    try:
        value = int(raw)
    except ValueError:
        if _DIGITS.fullmatch(raw.strip()) is None:
            raise Problem(
                "invalid-parameter",
                f"{name}: expected an integer, got {raw!r}",
                errors=[FieldError(name, "expected an integer")],
            ) from None
        value = cap + 1  # too many digits for int(): out of range, said as such below
    if value < low or value > cap:
        bounds = f"from {low} to {cap}"
        text = raw.strip()
        shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        raise Problem(
            "invalid-parameter",
            f"{name}: must be {bounds}, got {shown}",
            status=422,
            errors=[FieldError(name, f"must be {bounds}")],
        )
    return value


def parse_list_query(args: Mapping[str, str], statuses: tuple[str, ...]) -> ListQuery:
    """`status`, `session_id`, `limit`/`page_size` (synonyms), `cursor` or `page`."""
    status = args.get("status") or None
    if status is not None and status not in statuses:
        raise Problem(
            "invalid-parameter",
            f"Invalid status: {status}. Valid values: {list(statuses)}",
            errors=[FieldError("status", "must be one of " + ", ".join(statuses))],
        )
    limit = int_param(args, "limit", 1, MAX_PAGE_SIZE)
    page_size = int_param(args, "page_size", 1, MAX_PAGE_SIZE)
    if limit is not None and page_size is not None and limit != page_size:
        raise Problem(
            "invalid-parameter",
            "limit and page_size are the same setting; give one of them",
            errors=[FieldError("page_size", "conflicts with limit")],
        )
    size = limit if limit is not None else page_size
    if size is None:
        size = DEFAULT_PAGE_SIZE
    page = int_param(args, "page", 1)
    cursor = args.get("cursor") or None
    if cursor is not None and page is not None:
        raise Problem(
            "invalid-parameter",
            "give either cursor (from next_cursor) or page, not both",
            errors=[FieldError("page", "conflicts with cursor")],
        )
    if cursor is not None:
        return ListQuery(status, args.get("session_id") or None, size, cursor, None, 0)
    page = page or 1
    return ListQuery(status, args.get("session_id") or None, size, None, page, (page - 1) * size)


def parse_wait(raw: str | None, cap: float) -> float:
    """`?wait=SECONDS` for long-polls: a number >= 0, capped at `cap`. 0 when absent."""
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise Problem(
            "invalid-parameter",
            f"wait: expected a number of seconds >= 0, got {raw!r}",
            errors=[FieldError("wait", "expected a number of seconds >= 0")],
        )
    return min(value, cap)
