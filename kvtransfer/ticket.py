"""What the ends of a handoff exchange: `Ticket` (a reservation), `FirstToken`, `Handoff`.

No torch here. A `Ticket` is made by the decode worker's `KVReceiver.reserve`, serialised
(`to_bytes`) into the router's reply, and given unchanged to a prefill worker, whose
`KVSender.push` reads it back (`Ticket.from_bytes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from baton.kvtransfer.errors import HandoffError
from baton.kvtransfer.layout import KVLayout
from baton.protos import kvtransfer_pb2 as pb

TRANSPORTS = ("grpc", "ucx", "tcp", "ipc", "auto")


@dataclass(frozen=True)
class Ticket:
    """A reservation of `block_ids` on a decode worker, valid until `expires_at` (unix s).

    `transport` is the data plane the decode worker asks for ("auto": the sender picks, see
    `baton.kvtransfer.transport.candidates`); every decode worker also accepts `grpc` pushes
    on `control_address`. `ucx_address` is empty without a UCX listener, `tcp_address`
    without a KV TCP listener, `ipc_domain` when the decode worker exports no pool.
    `lora_name`: the LoRA adapter the decode worker will run the request with (empty: the
    base model); the prefill worker refuses to fill the ticket with another one.
    """

    ticket_id: str
    request_id: str
    control_address: str
    transport: str
    block_ids: tuple[int, ...]
    layout: KVLayout
    num_tokens: int
    expires_at: float
    ucx_address: str = ""
    tcp_address: str = ""
    ipc_domain: str = ""
    lora_name: str = ""

    @property
    def layout_fingerprint(self) -> str:
        return self.layout.fingerprint()

    @property
    def num_bytes(self) -> int:
        return len(self.block_ids) * self.layout.block_bytes

    def seconds_left(self) -> float:
        return self.expires_at - time.time()

    def to_proto(self) -> pb.KVTicket:
        return pb.KVTicket(
            ticket_id=self.ticket_id,
            request_id=self.request_id,
            control_address=self.control_address,
            transport=self.transport,
            ucx_address=self.ucx_address,
            tcp_address=self.tcp_address,
            ipc_domain=self.ipc_domain,
            block_ids=list(self.block_ids),
            layout=self.layout.to_proto(),
            layout_fingerprint=self.layout_fingerprint,
            num_tokens=self.num_tokens,
            expires_at=self.expires_at,
            lora_name=self.lora_name,
        )

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_proto(cls, msg: pb.KVTicket) -> Ticket:
        """Read a ticket; raises HandoffError("bad_request") if it is malformed."""
        try:
            layout = KVLayout.from_proto(msg.layout)
        except ValueError as exc:
            raise HandoffError("bad_request", f"the ticket's layout is invalid: {exc}") from None
        if msg.layout_fingerprint != layout.fingerprint():
            raise HandoffError("bad_request", "the ticket's layout does not match its fingerprint")
        if msg.transport not in TRANSPORTS:
            raise HandoffError("bad_request", f"the ticket names an unknown transport {msg.transport!r}")
        if not msg.ticket_id or not msg.control_address or not msg.block_ids:
            raise HandoffError("bad_request", "the ticket lacks an id, an address or blocks")
        if len(msg.block_ids) != layout.blocks_for(msg.num_tokens):
            raise HandoffError(
                "bad_request", f"{len(msg.block_ids)} blocks cannot hold exactly {msg.num_tokens} tokens"
            )
        return cls(
            ticket_id=msg.ticket_id,
            request_id=msg.request_id,
            control_address=msg.control_address,
            transport=msg.transport,
            ucx_address=msg.ucx_address,
            tcp_address=msg.tcp_address,
            ipc_domain=msg.ipc_domain,
            block_ids=tuple(msg.block_ids),
            layout=layout,
            num_tokens=msg.num_tokens,
            expires_at=msg.expires_at,
            lora_name=msg.lora_name,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Ticket:
        msg = pb.KVTicket()
        try:
            msg.ParseFromString(data)
        except Exception:
            raise HandoffError("bad_request", "the ticket is not a serialised KVTicket") from None
        return cls.from_proto(msg)


@dataclass(frozen=True)
class FirstToken:
    """The token the prefill engine sampled after the prompt, with its logprobs if asked."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None

    def to_proto(self) -> pb.KVFirstToken:
        msg = pb.KVFirstToken(token_id=self.token_id)
        if self.logprob is not None:
            msg.logprob = self.logprob
        if self.top_logprobs:
            ids = list(self.top_logprobs)
            msg.top_logprobs.token_ids.extend(ids)
            msg.top_logprobs.logprobs.extend(self.top_logprobs[i] for i in ids)
        return msg

    @classmethod
    def from_proto(cls, msg: pb.KVFirstToken) -> FirstToken:
        top = dict(zip(msg.top_logprobs.token_ids, msg.top_logprobs.logprobs)) or None
        return cls(msg.token_id, msg.logprob if msg.HasField("logprob") else None, top)


@dataclass(frozen=True)
class Handoff:
    """A completed, verified handoff, as `KVReceiver.wait` returns it.

    From then on the caller owns `block_ids`: it passes them to the engine
    (`AsyncLLMEngine.generate_prefilled(..., **handoff.prefilled_kwargs())`), or gives them
    back with `KVReceiver.release(handoff)`.
    """

    ticket_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    first_token: FirstToken
    num_bytes: int
    seconds: float  # from the sender's header to verified completion

    def prefilled_kwargs(self) -> dict:
        """Keyword arguments of `add_prefilled_request` this handoff provides."""
        return {
            "block_ids": list(self.block_ids),
            "first_token_id": self.first_token.token_id,
            "first_logprob": self.first_token.logprob,
            "first_top_logprobs": self.first_token.top_logprobs,
        }
