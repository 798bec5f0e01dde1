"""The router's pure parts: request parameters, structured output, routing order, the wire
format between router and workers, and the command line."""

from __future__ import annotations

import pytest

from baton.protos import common_pb2, worker_pb2
from baton.router.config import build_parser, parse
from baton.router.dispatch import Dispatcher, _delta
from baton.router.errors import APIError
from baton.router.params import check_length, guided_decoding, sampling_params
from baton.router.protocol import ChatCompletionRequest, CompletionRequest
from baton.router.routing import (
    LoadPolicy,
    RoundRobinPolicy,
    prefer_cell,
    prefix_key,
    rendezvous_score,
)
from baton.router.workers import Worker, WorkerPool
from baton.sampling_params import GuidedDecodingParams, SamplingParams
from baton.worker.messages import (
    ChunkWriter,
    OutputState,
    guided_from_json,
    guided_to_json,
    params_from_proto,
    params_to_proto,
)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", prompt="hi", **fields)


# -- parameters ----------------------------------------------------------------------------


def test_openai_fields_map_onto_sampling_params():
    p = sampling_params(completion(temperature=0.5, top_p=0.9, stop="x", seed=7, presence_penalty=0.5,
                                   top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
                                   ignore_eos=True, stop_token_ids=[3]), max_tokens=10, logprobs=2)
    assert (p.temperature, p.top_p, p.stop, p.seed, p.presence_penalty) == (0.5, 0.9, ["x"], 7, 0.5)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens) == (5, 0.1, 1.1, 2)
    assert p.ignore_eos and p.stop_token_ids == [3] and p.max_tokens == 10 and p.logprobs == 2
    assert p.n == 1  # the router fans n out


def test_defaults_are_vllms():
    p = sampling_params(completion(), max_tokens=16, logprobs=None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, 0, 1.0)


@pytest.mark.parametrize("fields,param", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
])
def test_out_of_range_values_name_the_parameter(fields, param):
    with pytest.raises(APIError) as info:
        sampling_params(completion(**fields), max_tokens=5, logprobs=None)
    assert info.value.status == 400 and info.value.param == param


def test_context_length_rule():
    assert check_length(10, None, 100, "prompt") == 90  # chat without max_tokens: fill the context
    assert check_length(10, 90, 100, "prompt") == 90
    for prompt, max_tokens in ((10, 91), (100, None), (0, 5)):
        with pytest.raises(APIError) as info:
            check_length(prompt, max_tokens, 100, "prompt")
        assert info.value.status == 400


@pytest.mark.parametrize("fields,expected", [
    ({"response_format": {"type": "json_object"}}, GuidedDecodingParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     GuidedDecodingParams(json={"type": "object"})),
    ({"response_format": {"type": "text"}}, None),
    ({"guided_json": '{"type": "string"}'}, GuidedDecodingParams(json='{"type": "string"}')),
    ({"guided_regex": "[a-z]+"}, GuidedDecodingParams(regex="[a-z]+")),
    ({"guided_choice": ["yes", "no"]}, GuidedDecodingParams(choice=["yes", "no"])),
    ({"guided_grammar": 'root ::= "a"'}, GuidedDecodingParams(grammar='root ::= "a"')),
])
def test_structured_output_fields(fields, expected):
    assert guided_decoding(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                                 **fields)) == expected


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    {"response_format": {"type": "json_object"}, "guided_regex": "a"},
    {"guided_regex": "a", "guided_choice": ["a"]},
    {"guided_choice": []},
])
def test_conflicting_or_empty_structured_output_is_400(fields):
    with pytest.raises(APIError) as info:
        guided_decoding(completion(**fields))
    assert info.value.status == 400


# -- the wire format ------------------------------------------------------------------------


@pytest.mark.parametrize("guided", [None, GuidedDecodingParams(json={"type": "object", "properties": {}}),
                                    GuidedDecodingParams(choice=["a", "b"]), GuidedDecodingParams(json_object=True)])
def test_sampling_params_survive_the_wire(guided):
    p = SamplingParams(temperature=0.7, top_p=0.3, top_k=4, min_p=0.05, presence_penalty=0.1,
                       frequency_penalty=-0.2, repetition_penalty=1.3, seed=2**62, stop=["a", "bc"],
                       stop_token_ids=[9], ignore_eos=True, max_tokens=77, min_tokens=3, logprobs=0,
                       skip_special_tokens=False, include_stop_str_in_output=True, guided_decoding=guided,
                       spaces_between_special_tokens=False, bad_words=["fox", "lazy dog"],
                       allowed_token_ids=[1, 5], logit_bias={3: -2.0})
    back = params_from_proto(worker_pb2.SamplingParams.FromString(params_to_proto(p).SerializeToString()))
    assert back == p
    unset = params_from_proto(params_to_proto(SamplingParams(max_tokens=None)))
    assert unset.seed is None and unset.max_tokens is None and unset.logprobs is None


def test_guided_json_rejects_garbage():
    assert guided_from_json(guided_to_json(GuidedDecodingParams(regex="x"))) == GuidedDecodingParams(regex="x")
    for bad in ("[1]", '{"nope": 1}', "not json", '{"regex": "a", "choice": ["b"]}'):
        with pytest.raises(ValueError):
            guided_from_json(bad)


class _Completion:
    def __init__(self, tokens, text, finish=None, logprobs=None):
        self.token_ids, self.text, self.finish_reason, self.logprobs = tokens, text, finish, logprobs
        self.stop_reason = None


def test_chunks_join_and_overlaps_are_dropped():
    writer = ChunkWriter(num_prompt_tokens=5)
    chunks = [writer.chunk(_Completion([1], "a", logprobs=[{1: -0.1}])),
              writer.chunk(_Completion([1, 2, 3], "abc", logprobs=[{1: -0.1}, {2: -0.2}, {3: -0.3}])),
              writer.chunk(_Completion([1, 2, 3], "abc", finish="length", logprobs=[{1: -0.1}, {2: -0.2}, {3: -0.3}]))]
    assert writer.chunk(_Completion([1, 2, 3], "abc")) is None  # nothing new
    state = OutputState()
    first = worker_pb2.GenerateChunk(token_index=0, token_ids=[1], text_index=0, text="a",
                                     logprobs=[common_pb2.TokenLogprobs(token_ids=[1], logprobs=[-0.1])])
    state.apply(first)  # the prefill worker's first token...
    for chunk in chunks:  # ...then the decode stream, which repeats it
        state.apply(chunk)
    assert state.token_ids == [1, 2, 3] and state.text == "abc" and state.finish_reason == "length"
    assert [list(e) for e in state.logprobs] == [[1], [2], [3]]
    assert state.logprobs[2][3] == pytest.approx(-0.3)
    assert state.num_prompt_tokens == 5
    with pytest.raises(ValueError):
        OutputState().apply(worker_pb2.GenerateChunk(token_index=2, token_ids=[9]))  # a gap


def test_a_delta_read_after_the_stream_finished_is_not_its_end():
    """The stream's consumer may read a delta after later chunks (the last one included)
    reached its state: only the delta made from the finishing chunk says finished."""
    writer, state = ChunkWriter(), OutputState()
    early = _delta(state, *state.apply(writer.chunk(_Completion([1], "a"))))
    last = _delta(state, *state.apply(writer.chunk(_Completion([1, 2], "ab", finish="length"))))
    assert state.finish_reason == "length"
    assert not early.finished and early.token_ids == [1]
    assert last.finished and last.finish_reason == "length" and last.token_ids == [2]


# -- routing --------------------------------------------------------------------------------


def _worker(address: str, usage: float = 0.0, running: int = 0, waiting: int = 0, cell: str = "") -> Worker:
    w = Worker.__new__(Worker)  # no channel: the policies read load only
    w.address, w.role, w.healthy, w.retired = address, "decode", True, False
    w.info = worker_pb2.WorkerInfo(block_size=16, max_num_seqs=256, cell=cell)
    w.stats = worker_pb2.LoadStats(kv_cache_usage=usage, num_running=running, num_waiting=waiting,
                                   num_blocks=100)
    w.outstanding = w.sent_since_poll = w.reserved_blocks_since_poll = 0
    return w


def test_decode_order_is_kv_usage_then_requests():
    a, b, c = _worker("a", 0.5, 1), _worker("b", 0.1, 9), _worker("c", 0.1, 2)
    assert [w.address for w in LoadPolicy().order_decode([a, b, c])] == ["c", "b", "a"]
    c.reserved_blocks_since_poll = 50  # what this router reserved since the last poll counts
    assert LoadPolicy().order_decode([a, b, c])[0].address == "b"


def test_prefill_prefers_the_prefix_owner_unless_it_is_much_busier():
    workers = [_worker(f"10.0.0.{i}:50051") for i in range(4)]
    prompt = list(range(100))
    key = prefix_key(prompt, 16)
    owner = max(workers, key=lambda w: rendezvous_score(key, w.address))
    policy = LoadPolicy(affinity_slack=4)
    assert policy.order_prefill(workers, prompt)[0] is owner
    # Same first blocks, different tail: same owner.
    assert policy.order_prefill(workers, prompt[:64] + [7] * 30)[0] is owner
    owner.stats = worker_pb2.LoadStats(num_running=10)
    assert policy.order_prefill(workers, prompt)[0] is not owner
    # Shorter than a block: no affinity, least loaded first.
    assert policy.order_prefill(workers, [1, 2, 3])[0] is not owner


def test_prefill_pairs_inside_the_decode_workers_cell_unless_that_is_much_busier():
    fleet, mate, other = _worker("p-fleet"), _worker("p-a", cell="a"), _worker("p-b", cell="b")
    ordered = [fleet, other, mate]  # what the policy said, best first
    assert prefer_cell(ordered, "a")[0] is mate
    assert prefer_cell(ordered, "a")[1:] == [fleet, other]
    assert prefer_cell(ordered, "") == ordered  # a fleet decode worker: no preference
    assert prefer_cell([fleet, other], "a") == [fleet, other]  # no engine of the cell: across cells
    mate.stats = worker_pb2.LoadStats(num_running=5)  # busier than the best by more than the slack
    assert prefer_cell(ordered, "a", slack=4) == ordered
    assert prefer_cell(ordered, "a", slack=5)[0] is mate


async def test_a_lost_stream_resumes_on_a_pair_when_a_prefill_worker_is_there():
    """Disaggregated with a healthy prefill worker: the resumed run is a handoff (prompt and
    streamed tokens prefilled remotely); with none, or below --local-prefill-tokens, or in
    colocated mode, it runs whole on another worker."""
    from baton.router.dispatch import _StreamLost
    from baton.worker.messages import OutputState

    async def resumed_by(pool: WorkerPool, disaggregated: bool = True, local: int = 0, streamed: int = 6) -> str:
        lost = _StreamLost(APIError(503, "lost"), OutputState(token_ids=list(range(streamed))), pool.all(pool.roles[-1])[0])
        run = Dispatcher(pool, LoadPolicy(), disaggregated, local_prefill_tokens=local)._resume(
            "r", list(range(20)), worker_pb2.SamplingParams(), lost)
        try:
            return run.ag_code.co_name
        finally:
            await run.aclose()

    pool = WorkerPool(("prefill", "decode"))
    pool.workers["decode"] = {"d1": _worker("d1"), "d2": _worker("d2")}
    assert await resumed_by(pool) == "_whole"  # no prefill worker
    prefill = _worker("p1")
    pool.workers["prefill"] = {"p1": prefill}
    assert await resumed_by(pool) == "_disaggregated"
    assert await resumed_by(pool, local=27) == "_whole"  # 20 + 6 tokens: short enough to prefill locally
    assert await resumed_by(pool, local=26) == "_disaggregated"
    prefill.healthy = False
    assert await resumed_by(pool) == "_whole"
    colocated = WorkerPool(("colocated",))
    colocated.workers["colocated"] = {"c1": _worker("c1"), "c2": _worker("c2")}
    assert await resumed_by(colocated, disaggregated=False) == "_whole"


def test_local_prefill_decisions():
    """Off by default; with a threshold, short prompts and prompts whose first blocks a
    healthy decode worker prefilled itself stay on decode (that worker), the rest go remote."""
    pool = WorkerPool(("prefill", "decode"))
    d1, d2 = _worker("d1"), _worker("d2")
    pool.workers["decode"] = {"d1": d1, "d2": d2}
    assert Dispatcher(pool, LoadPolicy(), True).local_prefill_reason([5] * 3) == ("remote", None)
    dispatcher = Dispatcher(pool, LoadPolicy(), True, local_prefill_tokens=8)
    assert dispatcher.local_prefill_reason([5] * 7) == ("short_prompt", None)
    prompt = list(range(100))
    assert dispatcher.local_prefill_reason(prompt) == ("remote", None)
    dispatcher._remember_prefix(prompt, d2)
    assert dispatcher.local_prefill_reason(prompt[:64] + [7] * 30) == ("cached_prefix", d2)
    d2.healthy = False  # a worker out of rotation is no reason to stay local
    assert dispatcher.local_prefill_reason(prompt) == ("remote", None)


def test_round_robin_rotates():
    workers = [_worker(a) for a in "abc"]
    policy = RoundRobinPolicy()
    firsts = [policy.order_decode(workers)[0].address for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


# -- command line ---------------------------------------------------------------------------


def test_router_flags(tiny_model_dir):
    config = parse(["--model", str(tiny_model_dir), "--prefill", "a:1,b:2", "--decode", "c:3",
                    "--served-model-name", "x,y", "--max-queue", "5", "--routing-policy", "round-robin",
                    "--max-failovers", "0", "--local-prefill-tokens", "64"])
    assert config.disaggregated and config.prefill == ("a:1", "b:2") and config.decode == ("c:3",)
    assert config.max_failovers == 0 and config.local_prefill_tokens == 64
    assert config.served_model_names == ("x", "y") and config.max_queue == 5
    colocated = parse(["--model", str(tiny_model_dir), "--colocated", "w:1"])
    assert not colocated.disaggregated and colocated.roles == ("colocated",)
    assert colocated.colocated == ("w:1",)
    k8s = parse(["--model", str(tiny_model_dir), "--discovery", "kubernetes", "--namespace", "ns",
                 "--prefill-service", "p", "--decode-service", "d"])
    assert k8s.services == {"prefill": ("p",), "decode": ("d",)} and k8s.namespace == "ns"
    pooled = parse(["--model", str(tiny_model_dir), "--discovery", "kubernetes", "--prefill-service", "p",
                    "--prefill-service", "p-cell-prefill", "--decode-service", "d,d-cell-decode"])
    assert pooled.services == {"prefill": ("p", "p-cell-prefill"), "decode": ("d", "d-cell-decode")}


def test_router_accepts_the_older_colocated_spellings(tiny_model_dir):
    """`--worker` and `--worker-service` were the colocated flags' first names."""
    model = ["--model", str(tiny_model_dir)]
    assert parse([*model, "--worker", "w:1,v:2"]) == parse([*model, "--colocated", "w:1,v:2"])
    k8s = ["--discovery", "kubernetes", "--namespace", "ns"]
    old = parse([*model, *k8s, "--worker-service", "s"])
    assert old == parse([*model, *k8s, "--colocated-service", "s"]) and old.services == {"colocated": ("s",)}


@pytest.mark.parametrize("argv", [
    ["--prefill", "a:1"],  # no decode workers
    ["--colocated", "a:1", "--decode", "b:2"],  # both modes
    ["--worker", "a:1", "--decode", "b:2"],  # both modes, older spelling
    ["--colocated", "nohost"],  # not host:port
    ["--colocated", "a:1", "--max-queue", "0"],
    ["--colocated", "a:1", "--api-key", "secret"],  # a key in argv is readable by anyone: refused
    ["--colocated", "a:1", "--api-key-file", "/nonexistent"],
    ["--colocated", "a:1", "--max-request-mb", "0"],
    ["--colocated", "a:1", "--max-failovers", "-1"],
    ["--prefill", "a:1", "--decode", "b:2", "--local-prefill-tokens", "-5"],
])
def test_bad_router_flags_exit_2(tiny_model_dir, argv):
    with pytest.raises(SystemExit) as info:
        parse(["--model", str(tiny_model_dir), *argv])
    assert info.value.code == 2


def test_api_key_comes_from_a_file_or_the_environment(tiny_model_dir, tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("BATON_API_KEY", "from-env")
    base = ["--model", str(tiny_model_dir), "--colocated", "a:1"]
    assert parse(base).api_key == "from-env"
    assert parse([*base, "--api-key-file", str(key_file)]).api_key == "from-file"
    assert "from-file" not in repr(parse([*base, "--api-key-file", str(key_file)]))


def test_router_help_lists_the_contract_flags():
    text = build_parser().format_help()
    for flag in ("--prefill", "--decode", "--colocated", "--discovery", "--namespace", "--prefill-service",
                 "--decode-service", "--colocated-service", "--routing-policy", "--max-queue", "--api-key-file",
                 "--max-request-mb", "--served-model-name", "--host", "--port", "--model"):
        assert flag in text
