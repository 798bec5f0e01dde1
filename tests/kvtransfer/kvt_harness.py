"""Worker processes for the two-process KV-transfer tests, driven over a pipe.

Each `Peer` is a real process with a real engine (the tiny model, a small KV pool), a
`grpc.aio` server with a `KVReceiver` (UCX listener on) and a `KVSender`: the KV bytes
travel between peers over real gRPC, UCX, TCP or shared memory on loopback. The pipe
carries only the tests' commands and small answers (digests, ids, errors).

Peers are `auto` receivers by default, with the UCX listener forced on (an `auto` worker
opens one only where UCX has an RDMA device): one decode process then serves every data
plane, and a test picks one by rewriting the ticket's transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import Future

STARTUP_TIMEOUT_S = 180  # four engine processes start at once on a loaded machine
# CI installs ucxx; the GPU image does not carry it: there peers run without a UCX listener
# and the tests' `ucx` cases skip.
HAS_UCX = importlib.util.find_spec("ucxx") is not None


class PeerDied(RuntimeError):
    """The peer process exited while a command was pending."""


class Peer:
    def __init__(self, model_dir, block_size: int, num_blocks: int, transport: str = "auto",
                 ttl_s: float = 10.0, chunk_bytes: int = 4096, max_message_bytes: int = 16384,
                 device: str = "cpu", gpu_order: str | None = None, tensor_parallel_size: int = 1):
        """A worker with an engine on the tiny model at `model_dir`, or, with
        `model_dir=None`, a bare `TensorPool` on `device` (`gpu_order`: its
        CUDA_VISIBLE_DEVICES, own GPU first)."""
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        spec = dict(model_dir=None if model_dir is None else str(model_dir), block_size=block_size, num_blocks=num_blocks,
                    transport=transport, ttl_s=ttl_s, chunk_bytes=chunk_bytes,
                    max_message_bytes=max_message_bytes, device=device, gpu_order=gpu_order,
                    tensor_parallel_size=tensor_parallel_size)
        self.spec = spec
        self.proc = ctx.Process(target=_child_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.num_blocks = num_blocks
        self._ready = self.submit("ready")

    def ready(self) -> Peer:
        """Wait until the process serves (peers start in parallel; call this before use)."""
        self.info = self._ready.result(STARTUP_TIMEOUT_S)
        return self

    # -- commands ------------------------------------------------------------------------

    def submit(self, name: str, **kwargs) -> Future:
        fut: Future = Future()
        with self._lock:
            if not self.alive:
                fut.set_exception(PeerDied(f"peer {self.proc.pid} is not running"))
                return fut
            i = next(self._ids)
            self._pending[i] = fut
            try:
                self.conn.send((i, name, kwargs))
            except OSError:
                self._pending.pop(i, None)
                fut.set_exception(PeerDied(f"peer {self.proc.pid} is gone"))
        return fut

    def call(self, name: str, timeout: float = 60, **kwargs):
        return self.submit(name, **kwargs).result(timeout)

    def wait_free(self, expected: int, timeout: float = 15.0) -> int:
        """Poll the pool's free block count until it is `expected` (or the time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            free = self.call("free")
            if free == expected or time.monotonic() > deadline:
                return free
            time.sleep(0.05)

    # -- process control -----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code once the process ended (None if it still runs after `timeout`).
        Polls: two threads blocking in waitpid on one child race each other."""
        deadline = time.monotonic() + timeout
        while self.proc.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.proc.exitcode

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait_stopped(self, timeout: float = 15.0) -> bool:
        """Whether the process stopped itself (SIGSTOP) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.wait_exit(10)

    def _read(self) -> None:
        while True:
            try:
                i, ok, value = self.conn.recv()
            except (EOFError, OSError):
                break
            fut = self._pending.pop(i, None)
            if fut is not None:
                fut.set_result(value) if ok else fut.set_exception(value)
        self.wait_exit(5)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(PeerDied(f"peer {self.proc.pid} exited with {self.proc.exitcode}"))


# -- the child process ---------------------------------------------------------------------


def _child_main(conn, spec: dict) -> None:
    if spec["gpu_order"] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec["gpu_order"]
    asyncio.run(_Child(conn, spec).serve())


class _Child:
    def __init__(self, conn, spec):
        self.conn, self.spec = conn, spec
        self.send_lock = threading.Lock()

    async def serve(self) -> None:
        import grpc

        from baton.kvtransfer import KVLayout, KVReceiver, KVSender, TensorPool, TransferConfig
        from baton.kvtransfer import receiver as receiver_module
        from baton.kvtransfer.blocks import block_rows
        from baton.kvtransfer.pool import EnginePool
        from baton.rpc import server_options

        receiver_module.ucx_for_auto = lambda: HAS_UCX  # see the module docstring
        s = self.spec
        if s["model_dir"] is None:  # a bare pool: no model, any device
            self.engine = None
            layout = KVLayout("pool-test", 4, 2, 64, s["block_size"], "bfloat16")
            self.pool = TensorPool(layout, s["num_blocks"], device=s["device"])
        else:
            from baton.engine import AsyncLLMEngine, EngineArgs

            self.engine = AsyncLLMEngine.from_engine_args(EngineArgs(
                model=s["model_dir"], block_size=s["block_size"], num_gpu_blocks_override=s["num_blocks"],
                device="cpu", max_num_seqs=128, tensor_parallel_size=s["tensor_parallel_size"]))
            self.pool = EnginePool(self.engine)
        config = TransferConfig(chunk_bytes=s["chunk_bytes"], tcp_chunk_bytes=s["chunk_bytes"], window_chunks=4,
                                max_message_bytes=s["max_message_bytes"], push_timeout_s=20)
        self.server = grpc.aio.server(options=server_options(config.keepalive))
        self.receiver = KVReceiver(self.pool, s["transport"], default_ttl_s=s["ttl_s"], config=config)
        self.receiver.add_to_server(self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.receiver.start(port)
        self.sender = KVSender(self.pool, config=config)
        self.rows = block_rows(self.pool.kv)
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, daemon=True).start()
        await asyncio.Event().wait()  # until the test kills this process

    def _read(self) -> None:
        while True:
            try:
                i, name, kwargs = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            asyncio.run_coroutine_threadsafe(self._handle(i, name, kwargs), self.loop)

    async def _handle(self, i, name, kwargs) -> None:
        try:
            reply = (i, True, await getattr(self, "cmd_" + name)(**kwargs))
        except BaseException as exc:  # HandoffError pickles; anything else goes as text
            from baton.kvtransfer import HandoffError

            err = exc if isinstance(exc, HandoffError) else RuntimeError(f"{type(exc).__name__}: {exc}")
            reply = (i, False, err)
        with self.send_lock:
            self.conn.send(reply)

    # -- commands ------------------------------------------------------------------------

    async def cmd_ready(self):
        return {"control": self.receiver.control_address, "ucx": self.receiver.ucx_address,
                "tcp": self.receiver.tcp_address, "ipc": self.receiver.ipc_domain,
                "free": await self.cmd_free(), "pid": os.getpid()}

    async def cmd_model_name(self):
        return self.pool.layout.model

    async def cmd_free(self):
        return await self.pool.num_free_blocks()

    async def cmd_set_fault(self, value):
        if value:
            os.environ["BATON_KV_FAULT"] = value
        else:
            os.environ.pop("BATON_KV_FAULT", None)

    async def cmd_reserve(self, request_id, num_tokens, ttl_s=None):
        return (await self.receiver.reserve(request_id, num_tokens, ttl_s)).to_bytes()

    async def cmd_wait(self, ticket_id, timeout_s=30):
        h = await self.receiver.wait(ticket_id, timeout_s)
        return {"block_ids": list(h.block_ids), "first_token": h.first_token, "num_bytes": h.num_bytes}

    async def cmd_wait_many(self, ticket_ids, timeout_s=60):
        return list(await asyncio.gather(*(self.cmd_wait(t, timeout_s) for t in ticket_ids),
                                         return_exceptions=True))

    async def cmd_cancel(self, ticket_id):
        return await self.receiver.cancel(ticket_id)

    async def cmd_release(self, block_ids):
        await self.pool.release(list(block_ids))

    async def cmd_digest(self, block_ids):
        return hashlib.sha256(self.rows[list(block_ids)].cpu().numpy().tobytes()).hexdigest()

    async def cmd_digest_many(self, block_lists):
        return [await self.cmd_digest(ids) for ids in block_lists]

    async def cmd_digest_except(self, block_ids):
        keep = [b for b in range(self.rows.shape[0]) if b not in set(block_ids)]
        return hashlib.sha256(self.rows[keep].cpu().numpy().tobytes()).hexdigest()

    async def cmd_reserve_local(self, num_tokens, seed):
        """Take blocks of this pool and fill them with random values: a synthetic source."""
        import torch

        ids = await self.pool.reserve(num_tokens)
        gen = torch.Generator().manual_seed(seed)
        kv = self.pool.kv
        # Finite values: the engine reads a block's unused slots too (masked), and NaN * 0 is NaN.
        kv[ids] = torch.randn((len(ids), *kv.shape[1:]), generator=gen).to(kv.dtype).to(kv.device)
        return ids

    async def cmd_prefill(self, request_id, prompt_token_ids):
        from baton.engine import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2)
        async for out in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id,
                                              hold_kv=True):
            pass
        c = out.outputs[0]
        blocks = await self.engine.run(lambda e: e.held_blocks(request_id))
        return {"token": c.token_ids[0], "logprob": c.logprobs[0][c.token_ids[0]] if c.logprobs else None,
                "top": c.logprobs[0] if c.logprobs else None, "blocks": blocks}

    async def cmd_push(self, ticket, src_block_ids=None, request_id=None, first_token=1, logprob=None,
                       top=None, transport=None, timeout_s=None):
        from baton.kvtransfer import Ticket

        t = Ticket.from_bytes(ticket)
        if transport:
            t = dataclasses.replace(t, transport=transport)
        if request_id is not None:
            r = await self.sender.push_held(t, request_id, first_token, logprob, top, timeout_s)
        else:
            r = await self.sender.push(t, src_block_ids, first_token, logprob, top, timeout_s)
        return {"num_bytes": r.num_bytes, "seconds": r.seconds, "transport": r.transport}

    async def cmd_push_many(self, pushes, transport=None):
        results = await asyncio.gather(*(self.cmd_push(transport=transport, **p) for p in pushes),
                                       return_exceptions=True)
        return list(results)

    async def cmd_decode(self, ticket_id, request_id, prompt_token_ids, max_tokens):
        """Wait for the handoff, admit it, decode greedily; all output token ids."""
        from baton.engine import SamplingParams

        handoff = await self.receiver.wait(ticket_id, 30)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in self.engine.generate_prefilled(request_id, prompt_token_ids=prompt_token_ids,
                                                        params=params, **handoff.prefilled_kwargs()):
            pass
        return list(out.outputs[0].token_ids)

    async def cmd_generate(self, request_id, prompt_token_ids, max_tokens):
        from baton.engine import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in self.engine.generate({"prompt_token_ids": prompt_token_ids}, params, request_id):
            pass
        return list(out.outputs[0].token_ids)

    async def cmd_stacks(self):
        """Every asyncio task's stack (for debugging a hung test)."""
        lines = []
        for task in asyncio.all_tasks():
            lines.append(repr(task))
            lines.extend(f"  {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack())
        return "\n".join(lines)

    async def cmd_metric(self, metric, labels):
        from prometheus_client import REGISTRY

        return REGISTRY.get_sample_value(metric, labels)
