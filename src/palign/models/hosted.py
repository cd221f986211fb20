"""Models served over an OpenAI-compatible chat API: OpenAI itself, or a vLLM, llama.cpp,
Ollama, ... server (``model=openai``, ``conf/model/openai.yaml``; schema ``hosted_schema``).

A :class:`HostedModel` sends one chat-completion request per item through the maintained
``openai`` client (retries with exponential backoff that honours ``Retry-After``, timeouts) and
adds what a run needs around it:

- **bounded concurrency**: :meth:`HostedModel.complete_all` runs ``model.max_concurrency``
  requests at a time on a thread pool, with a progress bar over the requests, and is a safe
  point of the stop policy between them (:func:`palign.stopping.check`);
- **retries**: the client retries 408/409/429/5xx replies and timeouts ``model.max_retries``
  times (``Retry-After`` honoured up to the client's cap); a reply that is not a chat
  completion (malformed JSON) is asked again as often, then kept as an unparseable answer and
  counted; what still fails is one error line naming ``model.base_url`` and the status;
- **caps checked before each request**: ``model.max_requests`` (requests sent by this run) and
  ``model.max_cost`` (USD at ``model.price_input_per_mtok`` / ``price_output_per_mtok``: what
  was spent, plus what the requests in flight and this one may cost at most, never above the
  cap); reaching one stops the run with one line naming it (:class:`HostedLimitError`), the
  finished subjects kept;
- **counted cost**: requests, cache hits, retries, input and output tokens (the server's
  ``usage``) and USD, per subject in the result rows (:class:`~palign.models.cost.HostedCost`);
- **a response cache** under ``palign.cache_root()/hosted``: one file per request, keyed by the
  sha256 of the base URL, the model, the messages and the sampling settings (never the API
  key), so that a rerun or a resumed run sends no request it already sent.

The API key is read from the environment variable ``model.api_key_env`` when the model is
built and is kept only by the client: it is not in the config, the cache key, the cache, the
logs or any error message (each is scrubbed of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from palign import cache_root, stopping
from palign.errors import ConfigError, ModelError
from palign.models.cost import HostedCost

log = logging.getLogger(__name__)

#: The ``_target_`` of a hosted model's config node (how the runner and the plan tell it).
HOSTED_TARGET = "palign.models.hosted.load_hosted"
OPENAI_URL = "https://api.openai.com/v1"
#: Characters per input token assumed for the cost cap until the server's ``usage`` has
#: measured it (low: it over-estimates a request's tokens, so the cap is never passed).
INITIAL_CHARS_PER_TOKEN = 2.0
#: How much of a server's error body an error line quotes.
DETAIL_CHARS = 200


def is_hosted(node: Any) -> bool:
    """Whether the model config ``node`` is a hosted model (``_target_``: :data:`HOSTED_TARGET`)."""
    try:
        return str(node.get("_target_", "")) == HOSTED_TARGET
    except AttributeError:
        return False


class HostedError(ModelError):
    """A hosted model's server could not be used (status, timeout, connection); the message
    names ``model.base_url`` and what happened."""


class HostedLimitError(ModelError):
    """A run reached ``model.max_requests`` or ``model.max_cost``."""


class _Cancelled(Exception):
    """A queued request that the run no longer needs (it stopped or failed)."""


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class HostedSettings:
    """A hosted model's settings (the keys of ``conf/model/openai.yaml``; help in
    :class:`palign.config.schema.HostedModelConfig`), checked when made: a bad value is one
    :class:`~palign.errors.ConfigError` line naming ``model.<key>``."""

    name: str
    model: str
    base_url: str = OPENAI_URL
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 60.0
    max_requests: int | None = None
    max_cost: float | None = None
    price_input_per_mtok: float | None = None
    price_output_per_mtok: float | None = None
    temperature: float = 0.0
    max_tokens: int = 16
    logprobs: bool = True
    top_logprobs: int = 20
    cache: bool = True

    def __post_init__(self) -> None:
        def bad(key: str, rule: str) -> ConfigError:
            return ConfigError(f"model.{key}={getattr(self, key)!r}: {rule}")

        for key in ("name", "model"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise bad(key, "must be a non-empty string")
        if not isinstance(self.base_url, str) or not re.match(r"https?://\S+$", self.base_url):
            raise bad(
                "base_url", "must be an http:// or https:// URL (e.g. http://localhost:8000/v1)"
            )
        if self.api_key_env is not None and not (
            isinstance(self.api_key_env, str)
            and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)
        ):
            raise bad("api_key_env", "must be the name of an environment variable, or null")
        for key, low in (("max_concurrency", 1), ("max_retries", 0), ("max_tokens", 1)):
            if not _int(getattr(self, key)) or getattr(self, key) < low:
                raise bad(key, f"must be an integer >= {low}")
        if not _int(self.top_logprobs) or not 0 <= self.top_logprobs <= 20:
            raise bad("top_logprobs", "must be an integer from 0 to 20")
        if not _number(self.timeout_s) or self.timeout_s <= 0:
            raise bad("timeout_s", "must be a number of seconds > 0")
        if not _number(self.temperature) or not 0 <= self.temperature <= 2:
            raise bad("temperature", "must be a number from 0 to 2")
        if self.max_requests is not None and (not _int(self.max_requests) or self.max_requests < 1):
            raise bad("max_requests", "must be an integer >= 1, or null (no cap)")
        if self.max_cost is not None and (not _number(self.max_cost) or self.max_cost <= 0):
            raise bad("max_cost", "must be a number of USD > 0, or null (no cap)")
        for key in ("price_input_per_mtok", "price_output_per_mtok"):
            value = getattr(self, key)
            if value is not None and (not _number(value) or value < 0):
                raise bad(key, "must be a number of USD per million tokens >= 0, or null")
            if value is None and self.max_cost is not None:
                raise ConfigError(
                    f"model.max_cost={self.max_cost!r} needs model.{key} (USD per million "
                    "tokens) to count what the requests cost"
                )
        for key in ("logprobs", "cache"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")

    @property
    def priced(self) -> bool:
        return self.price_input_per_mtok is not None and self.price_output_per_mtok is not None

    def price(self, input_tokens: float, output_tokens: float) -> float:
        """USD of ``input_tokens`` and ``output_tokens`` (0 without prices)."""
        if not self.priced:
            return 0.0
        return (
            input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok
        ) / 1e6


def hosted_settings(node: Mapping[str, Any]) -> HostedSettings:
    """The checked settings of a hosted model's config node (or its keys as a dict); a key
    :class:`HostedSettings` lacks is one error line listing the keys."""
    values = {str(k): v for k, v in dict(node).items() if not str(k).startswith("_")}
    known = [f.name for f in fields(HostedSettings)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}: a hosted model has no setting {unknown[0]!r} "
            f"(settings: {', '.join(known)})"
        )
    try:
        return HostedSettings(**values)
    except TypeError as e:  # a required key (name, model) missing
        raise ConfigError(f"model: {e} (a hosted model needs name and model)") from None


def api_key(settings: HostedSettings) -> str | None:
    """The API key in ``$<model.api_key_env>`` (None where unset or empty)."""
    if settings.api_key_env is None:
        return None
    return os.environ.get(settings.api_key_env) or None


def check_client() -> None:
    """The ``openai`` package (a dependency of palign) is importable; else one error line."""
    import importlib.util

    if importlib.util.find_spec("openai") is None:
        raise ModelError(
            "model=openai talks to the API through the openai package, which is not installed: "
            "pip install 'openai>=1.40' (or reinstall palign)"
        )


def check_api_key(settings: HostedSettings) -> None:
    """OpenAI's own API needs a key: refused before any work when ``$<api_key_env>`` is unset.
    (A local server usually needs none: it gets the placeholder ``EMPTY``.)"""
    if api_key(settings) is None and "api.openai.com" in settings.base_url:
        env = settings.api_key_env
        raise ConfigError(
            f"model.api_key_env={env}: ${env} is not set; export your API key there (palign "
            "reads it at run time and writes it nowhere)"
            if env
            else f"model.api_key_env=null: model.base_url={settings.base_url} needs an API key; "
            "name the environment variable that holds it"
        )


@dataclass
class Reply:
    """One chat completion as palign reads it: the reply ``text``, its ``finish_reason``
    (``length``: cut off by ``max_tokens``), ``tokens`` (the reply's tokens with their
    ``logprob`` and ``top_logprobs``, where the server returned them), ``malformed`` (no chat
    completion came back even after the retries: ``text`` is empty) and ``cached`` (read from
    the response cache)."""

    text: str = ""
    finish_reason: str | None = None
    tokens: list[dict[str, Any]] | None = None
    malformed: bool = False
    cached: bool = False


def read_reply(data: Any) -> Reply | None:
    """The :class:`Reply` of a chat-completion JSON object, or None when it is not one."""
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        if not isinstance(content, str):
            return None
        tokens = None
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
            tokens = [
                {
                    "token": str(t["token"]),
                    "logprob": float(t["logprob"]),
                    "top_logprobs": [
                        {"token": str(a["token"]), "logprob": float(a["logprob"])}
                        for a in t.get("top_logprobs") or []
                    ],
                }
                for t in logprobs["content"]
            ]
        return Reply(text=content, finish_reason=choice.get("finish_reason"), tokens=tokens)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def _usage(data: Mapping[str, Any]) -> tuple[int, int]:
    usage = data.get("usage") if isinstance(data, Mapping) else None
    if not isinstance(usage, Mapping):
        return 0, 0
    tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return tuple(int(t) if _number(t) else 0 for t in tokens)  # type: ignore[return-value]


class ResponseCache:
    """Replies on disk, one JSON file per request key under ``root`` (``<key[:2]>/<key>.json``),
    each written atomically (readers see no file or the whole file)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        response = record.get("response") if isinstance(record, dict) else None
        return response if isinstance(response, dict) else None

    def put(self, key: str, response: dict, about: Mapping[str, Any]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({**about, "response": response}), encoding="utf-8")
        os.replace(tmp, path)


class HostedMeter:
    """Counts what a hosted model costs (:class:`~palign.models.cost.HostedCost`), thread-safe;
    the runner's ``meter`` of a hosted model (``snapshot()``, as :class:`CostMeter`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(HostedCost)), 0)

    def add(self, **counts: float) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def snapshot(self) -> HostedCost:
        with self._lock:
            return HostedCost(**self._counts)


class HostedModel:
    """A model behind an OpenAI-compatible chat API (see the module's doc). ``name``: palign's
    name of it (reports, rows); ``meter``: what it cost (:class:`HostedMeter`)."""

    def __init__(self, settings: HostedSettings, cache_dir: str | os.PathLike | None = None):
        check_client()
        from openai import DefaultHttpxClient, OpenAI

        self.settings = settings
        self.name = settings.name
        self.meter = HostedMeter()
        key = api_key(settings)
        self._secrets = [key] if key else []
        if (
            key
            and settings.api_key_env == "OPENAI_API_KEY"
            and "api.openai.com" not in (settings.base_url)
        ):
            log.warning(
                "sending $OPENAI_API_KEY to %s; set model.api_key_env=null (or the server's own "
                "variable) if it needs none",
                settings.base_url,
            )
        self.cache = ResponseCache(cache_root(cache_dir) / "hosted") if settings.cache else None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sent = 0
        self._spent = 0.0
        self._reserved = 0.0  # USD the requests in flight may cost at most
        self._in_flight = 0
        self._chars_per_token: float | None = None  # measured on the server's usage
        self._local = threading.local()  # HTTP attempts of the request this thread sends
        self._http = DefaultHttpxClient(event_hooks={"request": [self._on_attempt]})
        self._client = OpenAI(
            api_key=key or "EMPTY",
            base_url=settings.base_url,
            max_retries=settings.max_retries,
            timeout=float(settings.timeout_s),
            http_client=self._http,
        )
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)

    def __repr__(self) -> str:
        s = self.settings
        return f"HostedModel(name={s.name!r}, model={s.model!r}, base_url={s.base_url!r})"

    # --- requests -------------------------------------------------------------------------

    def body(self, messages: Sequence[Mapping[str, str]], logprobs: bool) -> dict[str, Any]:
        """The request's JSON body: the model, ``messages`` and the sampling settings
        (``logprobs``: with ``top_logprobs``)."""
        s = self.settings
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [dict(m) for m in messages],
            "temperature": s.temperature,
            "max_tokens": s.max_tokens,
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=s.top_logprobs)
        return body

    def cache_key(self, body: Mapping[str, Any]) -> str:
        """sha256 of the base URL and the request body (model, messages, sampling settings);
        the API key is not part of it."""
        about = {"base_url": self.settings.base_url.rstrip("/"), "body": body}
        return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()

    def complete(self, messages: Sequence[Mapping[str, str]], logprobs: bool = False) -> Reply:
        """The reply to ``messages``: from the cache when this request was sent before, else
        sent (a malformed reply asked again up to ``max_retries`` times, then kept as a
        ``malformed`` :class:`Reply`). With ``logprobs``, a reply without them is a
        :class:`HostedError` (the server does not return them: the first reply says so)."""
        body = self.body(messages, logprobs)
        key = self.cache_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            reply = read_reply(hit) if hit is not None else None
            if reply is not None:
                self.meter.add(cached=1)
                reply.cached = True
                return self._with_logprobs(reply) if logprobs else reply
        for attempt in range(self.settings.max_retries + 1):
            data = self._send(body)
            reply = read_reply(data)
            if reply is not None:
                if self.cache is not None:
                    about = {"base_url": self.settings.base_url, "model": self.settings.model}
                    self.cache.put(key, data, about)
                return self._with_logprobs(reply) if logprobs else reply
            log.warning(
                "%s: the server's reply is not a chat completion (attempt %d of %d)",
                self.name,
                attempt + 1,
                self.settings.max_retries + 1,
            )
        self.meter.add(malformed=1)
        return Reply(malformed=True)

    def _with_logprobs(self, reply: Reply) -> Reply:
        if reply.tokens is None:
            raise HostedError(
                f"model.base_url={self.settings.base_url}: the server returned no logprobs for "
                f"model {self.settings.model!r}, and scoring.mode=logit reads the option "
                "probabilities from them",
                "use scoring.mode=generate (the answers parsed from the reply text)",
            )
        return reply

    def complete_all(
        self,
        requests: Sequence[Sequence[Mapping[str, str]]],
        logprobs: bool = False,
        desc: str | None = None,
    ) -> list[Reply]:
        """The replies to ``requests`` (each a list of messages), in order, ``max_concurrency``
        at a time, with a progress bar over the requests; a safe point of the stop policy
        between them. The first error (a cap reached, a server that fails) stops the rest:
        queued requests are not sent, those in flight end (their replies cached), then it is
        raised."""
        from tqdm.auto import tqdm

        if not requests:
            return []
        results: list[Reply | None] = [None] * len(requests)
        workers = min(self.settings.max_concurrency, len(requests))
        bar = tqdm(
            total=len(requests),
            desc=desc or f"{self.name} requests",
            unit="request",
            leave=False,
            dynamic_ncols=True,
        )
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="palign-hosted")
        try:
            futures = {
                pool.submit(self._complete_unless_stopped, m, logprobs): i
                for i, m in enumerate(requests)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future]] = future.result()
                if done:
                    bar.update(len(done))
                    bar.set_postfix(cached=sum(r is not None and r.cached for r in results))
                stopping.check()
        finally:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return results  # type: ignore[return-value]

    def _complete_unless_stopped(self, messages, logprobs: bool) -> Reply:
        if self._stop.is_set():
            raise _Cancelled
        return self.complete(messages, logprobs)

    def _on_attempt(self, request) -> None:
        """httpx's request hook, run in the thread that sends: every HTTP attempt, the
        client's retries included."""
        self._local.attempts = getattr(self._local, "attempts", 0) + 1

    def _send(self, body: dict[str, Any]) -> Any:
        """Send ``body`` once (the client retrying as configured) within the caps; the reply's
        JSON (None when it is not JSON). The usage and cost are counted."""
        import openai

        chars = sum(len(str(m.get("content", ""))) for m in body["messages"])
        ratio = self._chars_per_token or INITIAL_CHARS_PER_TOKEN
        estimate = self.settings.price(math.ceil(chars / ratio) + 4, body["max_tokens"])
        self._reserve(estimate)
        self._local.attempts = 0
        spent, text = 0.0, None
        try:
            raw = self._client.chat.completions.with_raw_response.create(**body)
            text = raw.http_response.text
        except openai.APITimeoutError:
            raise HostedError(
                f"model.base_url={self.settings.base_url}: no reply within model.timeout_s="
                f"{self.settings.timeout_s} s, {self.settings.max_retries + 1} times",
                "raise model.timeout_s or model.max_retries, or check the server",
            ) from None
        except openai.APIConnectionError as e:
            reason = self._scrub(str(e.__cause__ or e))
            raise HostedError(
                f"model.base_url={self.settings.base_url}: cannot connect "
                f"({self.settings.max_retries + 1} tries): {reason}",
                "check model.base_url (e.g. http://localhost:8000/v1) and that the server runs",
            ) from None
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        finally:
            retries = max(0, self._local.attempts - 1)
            data = None
            if text is not None:
                try:
                    data = json.loads(text)
                except ValueError:
                    data = None
            tokens_in, tokens_out = _usage(data) if isinstance(data, dict) else (0, 0)
            spent = self.settings.price(tokens_in, tokens_out)
            with self._cond:
                self._in_flight -= 1
                self._reserved = self._reserved - estimate if self._in_flight else 0.0
                self._spent += spent
                if tokens_in > 0 and chars > 0:
                    measured = chars / tokens_in
                    self._chars_per_token = min(self._chars_per_token or measured, measured)
                self._cond.notify_all()
            self.meter.add(
                retries=retries, input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=spent
            )
        return data

    def _reserve(self, estimate: float) -> None:
        """Count one more request within ``model.max_requests`` and reserve ``estimate`` USD
        within ``model.max_cost`` (waiting for the requests in flight while they may leave
        room); a cap that would be passed raises :class:`HostedLimitError`."""
        s = self.settings
        with self._cond:
            while True:
                if self._stop.is_set():
                    raise _Cancelled
                if s.max_requests is not None and self._sent >= s.max_requests:
                    raise HostedLimitError(
                        f"model.max_requests={s.max_requests} reached: {self._sent} requests "
                        "sent by this run; the finished subjects are kept",
                        _CONTINUE.format(key="max_requests"),
                    )
                if s.max_cost is not None and self._spent + self._reserved + estimate > s.max_cost:
                    if self._in_flight:  # what the requests in flight cost is not known yet
                        self._cond.wait()
                        continue
                    raise HostedLimitError(
                        f"model.max_cost={s.max_cost} reached: ${self._spent:.4f} spent by this "
                        f"run and the next request may cost up to ${estimate:.4f}; the finished "
                        "subjects are kept",
                        _CONTINUE.format(key="max_cost"),
                    )
                self._sent += 1
                self._in_flight += 1
                self._reserved += estimate
                self.meter.add(requests=1)
                return

    def _status_error(self, e) -> HostedError:
        status = e.status_code
        detail = self._scrub(" ".join(str(getattr(e, "message", e)).split()))[:DETAIL_CHARS]
        retried = status in (408, 409, 429) or status >= 500
        tries = f"{self.settings.max_retries + 1} tries" if retried else "not retried"
        hints = {
            401: f"check the API key in ${self.settings.api_key_env} (model.api_key_env)",
            403: f"check the API key in ${self.settings.api_key_env} and its access to the model",
            404: "check model.model (the server's name of the model) and model.base_url (it "
            "ends in /v1)",
            429: "lower model.max_concurrency or raise model.max_retries",
        }
        return HostedError(
            f"model.base_url={self.settings.base_url}: HTTP {status} for model "
            f"{self.settings.model!r} ({tries}): {detail}",
            hints.get(status, "check the server; finished subjects are kept (resume=<run dir>)"),
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # --- the run's totals -----------------------------------------------------------------

    def spent(self) -> dict[str, float]:
        """What this model has cost so far (all of :class:`HostedCost`, by name)."""
        return asdict(self.meter.snapshot())

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()


_CONTINUE = (
    "raise model.{key} (null: no cap) and continue with resume=<the run dir>: the cache "
    "answers every request already sent"
)


def load_hosted(**settings: Any) -> HostedModel:
    """The :class:`HostedModel` of a ``model=openai``-style config node (``_target_`` of
    ``conf/model/openai.yaml``); its settings checked (:class:`HostedSettings`)."""
    return HostedModel(hosted_settings(settings))
