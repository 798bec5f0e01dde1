"""Serving one output stream (one prompt, n=1) on the workers (docs/architecture.md, "A request's walk").

Disaggregated: reserve KV on a decode worker (the ticket), open its Decode stream, send
the prompt and the ticket to a prefill worker, and merge what comes back: the first token
from the prefill reply (streamed at once) and the rest from the decode stream, which
repeats the first token (`OutputState` drops the overlap by offset). A failed prefill is
retried once on another prefill worker with the same reservation; prompt logprobs, when
asked for, come with the prefill reply. Colocated: one Generate
stream. However the stream ends early (client gone, a worker failed), every call is
cancelled and every worker touched gets an Abort, so no KV stays held anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from baton import tracing
from baton.protos import worker_pb2
from baton.router.admission import Admission, AdmissionTicket
from baton.router.errors import APIError, bad_request, no_worker, overloaded, worker_failed
from baton.router.routing import RoutingPolicy, prefer_cell, prefix_key
from baton.router.workers import Worker, WorkerPool
from baton.sampling_params import SamplingParams
from baton.worker.messages import OutputState, params_to_proto

log = logging.getLogger(__name__)

# A guard against a reply that never comes; a slow worker is waited for while the polls say
# it is healthy (`_while_available`).
RESERVE_TIMEOUT_S = 60.0
ABORT_TIMEOUT_S = 5.0
PREFIX_MEMORY = 4096  # prompt prefixes remembered with the decode worker that prefilled them


@dataclass
class Delta:
    """What one stream gained: new tokens (with logprobs) and new text; `state` is the whole.

    `state` keeps growing after the delta is made (its consumer may read it several deltas
    later, when the worker's chunks came in a burst), so whether this delta ends the stream
    is fixed when it is made: `finish_reason`."""

    token_ids: list[int]
    logprobs: list[dict[int, float]]
    text: str
    state: OutputState
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _delta(state: OutputState, new_tokens: int, new_chars: int) -> Delta:
    tokens = state.token_ids[len(state.token_ids) - new_tokens:] if new_tokens else []
    logprobs = state.logprobs[len(state.logprobs) - new_tokens:] if new_tokens and state.logprobs else []
    text = state.text[len(state.text) - new_chars:] if new_chars else ""
    return Delta(tokens, logprobs, text, state, state.finish_reason)


class Dispatcher:
    def __init__(self, pool: WorkerPool, policy: RoutingPolicy, disaggregated: bool,
                 max_queue: int | None = None, max_failovers: int = 2, local_prefill_tokens: int = 0):
        self.pool = pool
        self.max_failovers = max_failovers
        self.local_prefill_tokens = local_prefill_tokens  # 0: every prompt is prefilled remotely
        # Counters for /metrics: failovers, and where disaggregated prompts were prefilled.
        self.failovers = 0
        self.prefill_decisions = {"remote": 0, "short_prompt": 0, "cached_prefix": 0}
        # Completed KV handoffs by pairing: both workers in one cell (ipc) or not (the network).
        self.handoff_pairings = {"same_cell": 0, "cross_cell": 0}
        self._decode_by_prefix: dict[bytes, Worker] = {}  # insertion order: oldest first
        self.policy = policy
        self.disaggregated = disaggregated
        self.admission = Admission(pool, self.roles[-1], max_queue)
        self.running = 0  # output streams in flight
        self._background: set[asyncio.Task] = set()

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.disaggregated else ("colocated",)

    def admit(self, prompt_lengths: list[int], streams: int) -> AdmissionTicket:
        """503 when a role has no healthy worker; 429 when the fleet cannot take `streams`
        more outputs (router/admission.py)."""
        for role in self.roles:
            if not self.pool.available(role):
                raise no_worker(role)
        return self.admission.admit(prompt_lengths, streams)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, lora_name: str = "") -> AsyncIterator[Delta]:
        """Stream one output. Raises APIError (before or during the stream).

        `lora_name`: the LoRA adapter to run it with ("": the base model). Only workers
        serving it are candidates, those holding it in memory first; in disaggregated mode
        the reservation, the prefill and the decode all name it (the ticket carries it).

        A worker lost mid-stream (its call UNAVAILABLE) is failed over (`_resume`): the
        prompt and the tokens already streamed are prefilled again, on a prefill worker
        that hands off to another decode worker, or whole on another decode (or colocated)
        worker, which continues where the lost one stopped (`resume_token_ids`), at most
        `max_failovers` times per stream. Guided requests are not resumed (the grammar's
        state is not carried)."""
        self.running += 1
        proto = params_to_proto(params)
        try:
            inner = self._first_attempt(request_id, prompt_token_ids, proto, lora_name)
            failovers = 0
            while True:
                try:
                    async with contextlib.aclosing(inner):
                        async for delta in inner:
                            yield delta
                    return
                except _StreamLost as lost:
                    if failovers >= self.max_failovers or params.guided_decoding is not None:
                        raise lost.error from None
                    failovers += 1
                    self.failovers += 1
                    log.warning("%s worker %s lost %s after %d tokens; resuming elsewhere (failover %d of %d)",
                                lost.worker.role, lost.worker.address, request_id, len(lost.state.token_ids),
                                failovers, self.max_failovers)
                    inner = self._resume(f"{request_id}.f{failovers}", prompt_token_ids, proto, lost, lora_name)
        finally:
            self.running -= 1
            self.pool.notify()

    def _first_attempt(self, rid: str, ids: list[int], params: worker_pb2.SamplingParams, lora: str = ""):
        """The stream's first run: whole on a colocated worker; disaggregated, or whole on a
        decode worker when prefilling there is cheaper (`local_prefill_reason`)."""
        if not self.disaggregated:
            return self._whole(rid, ids, params, lora=lora)
        reason, worker = self.local_prefill_reason(ids, lora)
        self.prefill_decisions[reason] += 1
        if reason == "remote":
            return self._disaggregated(rid, ids, params, lora=lora)
        return self._whole(rid, ids, params, prefer=worker, lora=lora)

    def _resume(self, rid: str, ids: list[int], params: worker_pb2.SamplingParams, lost: _StreamLost,
                lora: str = ""):
        """A lost stream's next run, never on the lost worker: disaggregated, through a
        healthy prefill and decode pair (the prompt and the streamed tokens are one long
        prompt for the prefill worker: a handoff beats recomputing them on the decode
        worker, as for a first run), unless no prefill worker is available or the whole is
        shorter than `local_prefill_tokens`; otherwise whole on another decode (or
        colocated) worker."""
        resumed = len(ids) + len(lost.state.token_ids)
        if self.disaggregated and self._candidates("prefill", lora) and resumed >= self.local_prefill_tokens:
            return self._disaggregated(rid, ids, params, state=lost.state, exclude={lost.worker}, lora=lora)
        return self._whole(rid, ids, params, state=lost.state, exclude={lost.worker}, lora=lora)

    def local_prefill_reason(self, ids: list[int], lora: str = "") -> tuple[str, Worker | None]:
        """Where a disaggregated request's prompt is prefilled: "short_prompt" (fewer than
        `local_prefill_tokens` tokens: the handoff would cost more than the prefill),
        "cached_prefix" (a decode worker ran a prompt with the same leading blocks itself, so
        its prefix cache holds them; that worker is returned), else "remote". Local prefill
        is off while `local_prefill_tokens` is 0."""
        if not self.local_prefill_tokens:
            return "remote", None
        if len(ids) < self.local_prefill_tokens:
            return "short_prompt", None
        worker = self._decode_by_prefix.get(self._prefix_key(ids, lora))
        if worker is not None and worker.available:
            return "cached_prefix", worker
        return "remote", None

    def _prefix_key(self, ids: list[int], lora: str = "") -> bytes | None:
        """The prompt's leading blocks, under its adapter (engines cache them per adapter)."""
        workers = self.pool.available(self.roles[-1])
        block_size = next((w.info.block_size for w in workers if w.info is not None), 16)
        key = prefix_key(ids, block_size)
        if key is None or not lora:
            return key
        return hashlib.blake2b(key + lora.encode(), digest_size=16).digest()

    def _remember_prefix(self, ids: list[int], worker: Worker, lora: str = "") -> None:
        """Note that `worker` prefilled `ids` itself (so its prefix cache holds them)."""
        key = self._prefix_key(ids, lora)
        if key is None:
            return
        self._decode_by_prefix.pop(key, None)
        self._decode_by_prefix[key] = worker
        while len(self._decode_by_prefix) > PREFIX_MEMORY:
            self._decode_by_prefix.pop(next(iter(self._decode_by_prefix)))

    def _candidates(self, role: str, lora: str, exclude=frozenset()) -> list[Worker]:
        """Available workers of `role` that serve adapter `lora` (none in `exclude`)."""
        return [w for w in self.pool.available(role) if w.serves(lora) and w not in exclude]

    @staticmethod
    def _holding_first(ordered: list[Worker], lora: str) -> list[Worker]:
        """The policy's order, workers holding adapter `lora` in memory first (a stable sort)."""
        return sorted(ordered, key=lambda w: not w.holds(lora)) if lora else ordered

    # -- a whole request on one worker: colocated, local prefill, failover -----------------

    async def _whole(self, rid: str, ids: list[int], params: worker_pb2.SamplingParams,
                     state: OutputState | None = None, exclude: set[Worker] | frozenset = frozenset(),
                     prefer: Worker | None = None, lora: str = ""):
        """One Generate stream on a decode or colocated worker (`prefer` first, never one in
        `exclude`). `state`: what the client already has (a failover): the worker resumes
        after its tokens and re-sends them, which `OutputState.apply` drops by offset.
        Raises _StreamLost when the worker becomes unreachable after it sent something."""
        role = self.roles[-1]
        resume = list(state.token_ids) if state is not None else []
        state = _copy_state(state) if state is not None else OutputState()
        request = worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=ids, params=params,
                                             resume_token_ids=resume, lora_name=lora)
        tried: list[Worker] = []
        while True:
            candidates = [w for w in self._candidates(role, lora, exclude) if w not in tried]
            if not candidates:
                raise no_worker(role)
            worker = prefer if prefer in candidates else self._holding_first(self.policy.order_decode(candidates),
                                                                             lora)[0]
            tried.append(worker)
            got_any = False
            worker.outstanding += 1
            worker.sent_since_poll += 1
            worker.add_blocks_since_poll(len(ids) + len(resume))
            call = worker.stub.Generate(request)
            try:
                async for chunk in call:
                    got_any = True
                    new_tokens, new_chars = state.apply(chunk)
                    if new_tokens or new_chars or state.finish_reason:
                        yield _delta(state, new_tokens, new_chars)
                _check_finished(state, worker)
                if role == "decode":
                    self._remember_prefix(ids, worker, lora)
                return
            except grpc.aio.AioRpcError as exc:
                unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
                # Nothing was streamed yet from an unreachable worker: another one may serve it
                # (whether it is out of rotation is for the poll that this starts to decide).
                if unavailable and not got_any and len(tried) < 2:
                    self.pool.check(worker)
                    continue
                error = self.rpc_error(exc, worker)
                if unavailable:
                    raise _StreamLost(error, state, worker) from None
                raise error from None
            finally:
                call.cancel()
                worker.outstanding -= 1
                if state.finish_reason is None:
                    self._abort(worker, rid)

    # -- disaggregated -------------------------------------------------------------------

    async def _disaggregated(self, rid: str, ids: list[int], params: worker_pb2.SamplingParams,
                             state: OutputState | None = None, exclude: set[Worker] | frozenset = frozenset(),
                             lora: str = ""):
        """A prefill worker hands the prompt's KV to a decode worker (not one in `exclude`),
        which streams the rest. `state`: what the client already has (a failover): its
        tokens are prefilled after the prompt, and both workers re-send them, which
        `OutputState.apply` drops by offset."""
        # A handoff that failed mid-way frees its reservation; while nothing has reached the
        # client the whole flow runs once more, under a fresh request id.
        for attempt in range(2):
            yielded = False
            try:
                async for delta in self._disaggregated_once(rid if attempt == 0 else f"{rid}.{attempt}", ids, params,
                                                            state, exclude, lora):
                    yielded = True
                    yield delta
                return
            except _HandoffFailed as exc:
                if yielded or attempt == 1:
                    raise exc.error from None
                log.warning("KV handoff of %s failed (%s); reserving again", rid, exc.error.message)

    async def _disaggregated_once(self, rid: str, ids: list[int], params: worker_pb2.SamplingParams,
                                  state: OutputState | None, exclude: set[Worker] | frozenset, lora: str = ""):
        resume = list(state.token_ids) if state is not None else []
        # Router queueing: until a decode worker has reserved KV for the prompt.
        with tracing.span("queue", **{"baton.request_id": rid}):
            decode, reservation, rid = await self._reserve(rid, len(ids) + len(resume), exclude, lora)
        touched = {decode}
        events: asyncio.Queue = asyncio.Queue()
        decode.outstanding += 1
        call = decode.stub.Decode(worker_pb2.DecodeRequest(
            ticket_id=reservation.ticket_id, request_id=rid, prompt_token_ids=ids, params=_for_decode(params),
            resume_token_ids=resume, lora_name=lora))
        loop = asyncio.get_running_loop()
        reader = loop.create_task(_read_decode(call, events))
        prefilling: list[Worker] = []  # the prefill workers tried, in order
        prefill = loop.create_task(self._prefill(rid, ids, resume, params, reservation.ticket, events, touched,
                                                 decode, prefilling, lora))
        state = _copy_state(state) if state is not None else OutputState()
        # Prompt logprobs come with the prefill reply: the decode stream (which may overtake
        # it) waits, so the client's first delta carries them.
        want_prompt = params.HasField("prompt_logprobs")
        prefilled = counted = False
        backlog: list = []
        try:
            while True:
                if backlog and (prefilled or not want_prompt):
                    kind, payload = backlog.pop(0)
                else:
                    kind, payload = await events.get()
                if kind in ("prefilled", "chunk") and not counted and prefilling:
                    # The handoff is done: the decode engine streams only after it (its
                    # stream may end before the prefill reply is read), from the last tried.
                    counted = True
                    self._count_pairing(prefilling[-1], decode)
                if kind == "prefilled":
                    prefilled, kind = True, "chunk"
                elif kind in ("chunk", "end") and want_prompt and not prefilled:
                    backlog.append((kind, payload))
                    continue
                if kind == "chunk":
                    new_tokens, new_chars = state.apply(payload)
                    if new_tokens or new_chars or (payload.finish_reason and state.finish_reason):
                        yield _delta(state, new_tokens, new_chars)
                elif kind == "end":
                    _check_finished(state, decode)
                    return
                elif kind == "decode_error":
                    error = self.rpc_error(payload, decode)
                    if payload.code() == grpc.StatusCode.ABORTED:
                        raise _HandoffFailed(error)
                    if payload.code() == grpc.StatusCode.UNAVAILABLE:
                        raise _StreamLost(error, state, decode)
                    raise error
                elif kind == "prefill_error":
                    error, handoff_failed = payload
                    raise _HandoffFailed(error) if handoff_failed else error
        finally:
            reader.cancel()
            prefill.cancel()
            call.cancel()
            decode.outstanding -= 1
            if state.finish_reason is None:
                for worker in touched:
                    self._abort(worker, rid)

    async def _reserve(self, rid: str, num_tokens: int, exclude: set[Worker] | frozenset = frozenset(),
                       lora: str = "") -> tuple[Worker, worker_pb2.ReserveReply, str]:
        """Reserve KV for the prompt on the best decode worker that has room; wait for room
        while every one is full or busy (admission bounded how many wait). Returns the
        worker, its reply and the request id the reservation holds: a call abandoned after
        its deadline may still reserve later, so the next try uses a fresh id that the
        abandoned one's Abort cannot touch."""
        attempt = 0
        while True:
            candidates = self._candidates("decode", lora, exclude)
            if not candidates:
                raise no_worker("decode")
            for worker in self._holding_first(self.policy.order_decode(candidates), lora):
                attempt_id = rid if attempt == 0 else f"{rid}.r{attempt}"
                request = worker_pb2.ReserveRequest(request_id=attempt_id, num_prompt_tokens=num_tokens,
                                                    lora_name=lora)
                outcome = await self._try_reserve(worker, request)
                if isinstance(outcome, worker_pb2.ReserveReply):
                    worker.sent_since_poll += 1
                    worker.add_blocks_since_poll(num_tokens)
                    return worker, outcome, attempt_id
                if outcome == "abandoned":
                    attempt += 1
            await self.pool.wait_changed(0.05)

    async def _try_reserve(self, worker: Worker, request: worker_pb2.ReserveRequest):
        """The reply; "full" when the worker has no room now or cannot be reached (the
        polls decide whether it leaves rotation); "abandoned" when it stayed silent past
        the deadline or left rotation meanwhile (its reservation, if any, is aborted).
        Raises 400 for a prompt the worker can never hold."""
        call = worker.stub.Reserve(request, timeout=RESERVE_TIMEOUT_S)
        try:
            return await self._while_available(worker, call)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise bad_request(exc.details() or "invalid request", "prompt") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "full"
            if code == grpc.StatusCode.UNAVAILABLE:
                self.pool.check(worker)
                return "full"
            log.warning("Reserve on %s: %s (%s); trying again", worker.address, code.name, exc.details())
        except _LeftRotation:
            pass
        except asyncio.CancelledError:
            self._abort(worker, request.request_id)  # the reservation may have been made
            raise
        self._abort(worker, request.request_id)
        return "abandoned"

    async def _while_available(self, worker: Worker, call):
        """Await a unary call while its worker stays in rotation: a worker that is merely
        slow is waited for; one the polls take out is given up (the call is cancelled)."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.pool.poll_interval)
                if done:
                    return task.result()
                if not worker.available:
                    raise _LeftRotation
        finally:
            if not task.done():
                task.cancel()

    def _count_pairing(self, prefill: Worker, decode: Worker) -> None:
        self.handoff_pairings["same_cell" if decode.cell and prefill.cell == decode.cell else "cross_cell"] += 1

    async def _prefill(self, rid: str, ids: list[int], resume: list[int], params: worker_pb2.SamplingParams,
                       ticket: bytes, events: asyncio.Queue, touched: set[Worker], decode: Worker,
                       tried: list[Worker], lora: str = "") -> None:
        """Prefill on the best prefill worker, one of the decode worker's cell first
        (`prefer_cell`); a second worker once if the first failed before the handoff.
        `tried` gets each worker as it is asked."""
        request = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, params=params,
                                            ticket=ticket, resume_token_ids=resume, lora_name=lora)
        error: APIError = no_worker("prefill")
        handoff_failed = False
        while len(tried) < 2:
            candidates = [w for w in self._candidates("prefill", lora) if w not in tried]
            if not candidates:
                break
            worker = prefer_cell(self._holding_first(self.policy.order_prefill(candidates, ids), lora), decode.cell)[0]
            tried.append(worker)
            touched.add(worker)
            worker.outstanding += 1
            worker.sent_since_poll += 1
            try:
                reply = await worker.stub.Prefill(request)
            except grpc.aio.AioRpcError as exc:
                error = self.rpc_error(exc, worker)
                code = exc.code()
                # ABORTED: the push failed and ended the reservation; retrying it is futile.
                handoff_failed = code == grpc.StatusCode.ABORTED
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) or handoff_failed:
                    break
                log.warning("prefill of %s failed on %s (%s); %s", rid, worker.address,
                            exc.code().name, "retrying" if len(tried) < 2 else "giving up")
                continue
            finally:
                worker.outstanding -= 1
            events.put_nowait(("prefilled", reply.first))
            return
        events.put_nowait(("prefill_error", (error, handoff_failed)))

    def rpc_error(self, exc: grpc.aio.AioRpcError, worker: Worker) -> APIError:
        """The client's error for a failed call. A busy worker (RESOURCE_EXHAUSTED) is a 429;
        an unreachable one is checked by a poll now, which decides whether it leaves rotation."""
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return bad_request(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return overloaded()
        if code == grpc.StatusCode.UNAVAILABLE:
            self.pool.check(worker)
        return worker_failed(f"{worker.role} worker {worker.address}: {code.name}: {details}")

    # -- cleanup -------------------------------------------------------------------------

    def _abort(self, worker: Worker, rid: str) -> None:
        """Tell a worker to free a request, without waiting (also from a cancelled task)."""
        async def abort() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await worker.stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=ABORT_TIMEOUT_S)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _read_decode(call, events: asyncio.Queue) -> None:
    try:
        async for chunk in call:
            events.put_nowait(("chunk", chunk))
    except grpc.aio.AioRpcError as exc:
        events.put_nowait(("decode_error", exc))
        return
    events.put_nowait(("end", None))


class _LeftRotation(Exception):
    """The worker a call waited on was taken out of rotation meanwhile."""


class _StreamLost(Exception):
    """A worker became unreachable mid-stream; `state` is what the client has so far."""

    def __init__(self, error: APIError, state: OutputState, worker: Worker):
        super().__init__(error.message)
        self.error, self.state, self.worker = error, state, worker


def _for_decode(params: worker_pb2.SamplingParams) -> worker_pb2.SamplingParams:
    """The decode side of a handoff: prompt logprobs come from the prefill worker."""
    if not params.HasField("prompt_logprobs"):
        return params
    copy = worker_pb2.SamplingParams()
    copy.CopyFrom(params)
    copy.ClearField("prompt_logprobs")
    return copy


def _copy_state(state: OutputState) -> OutputState:
    return dataclasses.replace(state, token_ids=list(state.token_ids), logprobs=list(state.logprobs))


class _HandoffFailed(Exception):
    """The KV handoff failed and took the reservation with it: reserve again."""

    def __init__(self, error: APIError):
        super().__init__(error.message)
        self.error = error


def _check_finished(state: OutputState, worker: Worker) -> None:
    if state.finish_reason == "abort":
        raise worker_failed(f"the {worker.role} worker {worker.address} aborted the request")
    if state.finish_reason is None:
        raise worker_failed(f"the {worker.role} worker {worker.address} ended the stream early")
    if state.finish_reason == "error":
        raise worker_failed(state.error or "the engine failed the request")
