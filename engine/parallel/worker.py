"""A rank other than 0: its process, its shard, its KV pool, and the loop that runs rank 0's ops.

`main` is the process's entry (spawned by `driver.RankGroup`). The rank joins the
process group, loads its shard of the model, then runs each op rank 0 announces on the
control pipe (`steps.py`) until rank 0 says stop or goes away (its pipe closes). It holds
no scheduler, no sampler, no tokenizer: the block tables it is sent index its own pool,
whose blocks mirror rank 0's (same ids, its own KV heads).
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from baton.engine.config import EngineConfig
from baton.engine.loader import load_model
from baton.engine.model_runner import attention_backend, kv_cache_spec, lora_manager
from baton.engine.parallel import steps
from baton.engine.parallel.driver import COLLECTIVE_TIMEOUT, rank_device
from baton.engine.parallel.layers import Collectives
from baton.engine.parallel.layout import ShardLayout
from baton.engine.parallel.shard import parallelize


def main() -> None:
    """The process's entry: `python -c '...main()' FD`, FD a socket to rank 0 on which the
    first message is (EngineConfig, rank, store port). Runs the rank until stopped; any
    failure is sent to rank 0 as ("error", traceback) before the process exits."""
    conn = Connection(int(sys.argv[1]))
    try:
        config, rank, store_port = conn.recv()
        worker = RankWorker(config, rank, store_port, conn)
        conn.send(("ready",))
        worker.serve()
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass  # rank 0 is gone: nobody to tell
        raise SystemExit(1) from None


class RankWorker:
    def __init__(self, config: EngineConfig, rank: int, store_port: int, conn):
        self.conn = conn
        self.device = rank_device(config.device, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        config = dataclasses.replace(config, device=self.device)
        self.config = config
        size = config.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", store_port, size, False, timeout=COLLECTIVE_TIMEOUT)
        conn.send(("hello",))
        self.comm = Collectives(store, rank, size, self.device, COLLECTIVE_TIMEOUT)
        self.layout = ShardLayout.of(config.hf_config, size, rank)
        torch.manual_seed(config.seed)
        self.model = parallelize(load_model(config, self.layout), self.layout, self.comm)
        self.kernels = config.kernels.for_device(self.device)
        self.backend = attention_backend(config, self.layout, self.kernels)
        self.kv_spec = kv_cache_spec(config, self.layout)
        self.kv: torch.Tensor | None = None
        self.lora = lora_manager(config, self.layout, self.model, self.device)
        if self.lora is not None:
            from baton.engine.lora.layers import apply_lora

            apply_lora(self.model, self.lora)

    def serve(self) -> None:
        while True:
            try:
                header = self.conn.recv()
            except EOFError:
                return  # rank 0 is gone
            op = header[0]
            if op == "stop":
                return
            with torch.inference_mode():
                if op == "forward":
                    input_ids, positions, meta = steps.receive_forward(self.comm, header, self.device)
                    self.model(input_ids, positions, self.kv, meta, self.backend)
                elif op == "logits":
                    hidden = torch.empty((header[1], self.config.hf_config["hidden_size"]),
                                         dtype=self.config.dtype, device=self.device)
                    self.model.compute_logits(self.comm.broadcast(hidden))
                elif op == "kv_gather":
                    ids = torch.tensor(header[1], device=self.device)
                    self.comm.gather(self.kv[ids].contiguous())
                elif op == "kv_scatter":
                    ids = torch.tensor(header[1], device=self.device)
                    whole = (len(ids), *self.kv.shape[1:-2], self.layout.num_kv_heads, self.kv.shape[-1])
                    blocks = self.comm.broadcast(torch.empty(whole, dtype=self.kv.dtype, device=self.device))
                    heads = self.layout.kv_heads
                    self.kv[ids] = blocks[..., heads.start : heads.stop, :]
                elif op == "lora":
                    self.lora.follow(header[1], header[2], header[3])
                elif op == "lora_prefetch":
                    self.lora.prefetch(header[1])
                elif op == "lora_reads":
                    self.conn.send(("lora_reads", (self.lora.prefetched_reads, self.lora.step_reads)))
                elif op == "kv":
                    self.kv = None  # free the old pool before the new one is made
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if header[1]:
                        self.kv = self.kv_spec.allocate(header[1], self.device)
                else:
                    raise ValueError(f"unknown op {header!r} from rank 0")
