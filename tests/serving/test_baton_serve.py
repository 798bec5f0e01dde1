"""`baton serve MODEL`, the drop-in for `vllm serve`: one process (the router and the engine
in-process, no gRPC between them) for one colocated replica, the router and worker processes
of `baton up` for `--data-parallel-size N` or `--disaggregated`; vLLM's flags reach the
router and the engine, the official `openai` client works against it (chat, completions,
tools, embeddings, echo, best_of, cancellation, /health, /metrics, a graceful stop), and a
flag Baton does not implement is refused by name before anything starts."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest
from serving_harness import baton_up, series_sum, wait_until

KEY = "serve-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}}]


# A Hermes/Qwen-style template with tools, given with --chat-template (the tiny model's own
# renders tools the Llama 3.1 way).
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions.\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Return each call as <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "hermes.jinja"
    path.write_text(HERMES_TEMPLATE)
    return path


FLAGS = ["--served-model-name", "tiny", "alias", "--max-model-len", "1024", "--seed", "7",
         "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.5", "--dtype", "float",
         "--no-enable-prefix-caching", "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
         "--uvicorn-log-level", "warning", "--disable-log-requests", "--task", "embed"]


@pytest.fixture(scope="module")
def served(_tiny_model_cache, tiny_model_dir, template_file):
    # A long grace: the last test stops it with a stream in flight, which must finish.
    dep = baton_up(str(tiny_model_dir), *FLAGS, "--chat-template", str(template_file),
                   "--shutdown-grace-seconds", "120", command="serve", api_key=KEY)
    yield dep
    dep.stop()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_one_colocated_replica_is_one_process(served):
    """No worker or router child, and no port but the API's: the engine is in this process."""
    process = psutil.Process(served.proc.pid)
    assert process.children(recursive=True) == []
    listening = {c.laddr.port for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {int(served.url.rsplit(":", 1)[1])}  # no gRPC server, no separate /metrics
    assert served.processes == {}  # it printed no per-process lines, as `baton up` does
    assert KEY not in " ".join(cmdline(served.proc.pid))  # the key travels in the environment only
    assert KEY not in "".join(served.output) and "$BATON_API_KEY" in "".join(served.output)  # never printed
    health = httpx.get(f"{served.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["workers"] == {"colocated": {"healthy": 1, "total": 1}}


def test_vllm_flags_reach_the_engine_and_the_router(tiny_model_dir, template_file):
    from baton.inprocess import configs
    from baton.serve import build_parser, in_process, to_up

    ns = build_parser().parse_args([str(tiny_model_dir), *FLAGS, "--chat-template", str(template_file)])
    assert in_process(ns)
    args, problem = to_up(ns)
    assert problem is None
    engine, options, router = configs(args, tiny_model_dir)
    assert (engine.seed, engine.max_num_batched_tokens, engine.gpu_memory_utilization, engine.dtype,
            engine.max_model_len, engine.enable_prefix_caching, engine.task) == (7, 512, 0.5, "float32", 1024,
                                                                                  False, "embed")
    assert engine.served_model_name == "tiny" and options.role == "colocated"  # the metrics' model_name
    assert router.served_model_names == ("tiny", "alias") and router.tool_call_parser == "hermes"
    assert router.enable_auto_tool_choice and router.chat_template == HERMES_TEMPLATE
    for argv in (["-dp", "2"], ["--disaggregated"], ["--no-in-process"]):  # these run `baton up`'s processes
        assert not in_process(build_parser().parse_args(argv))
    assert in_process(build_parser().parse_args(["--in-process", "-dp", "1"]))


def test_the_openai_client_works_against_it(served):
    client = served.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny", "alias"]
    assert models.data[0].model_extra["max_model_len"] == 1024
    out = client.chat.completions.create(model="alias", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                         extra_body={"ignore_eos": True})
    assert out.model == "alias" and out.usage.completion_tokens == 8
    stream = client.completions.create(model="tiny", prompt="Once", max_tokens=6, stream=True,
                                       extra_body={"ignore_eos": True})
    assert sum(1 for c in stream if c.choices and c.choices[0].text) >= 1
    call = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS,
                                          tool_choice="required", parallel_tool_calls=False, max_tokens=100)
    jsonschema.validate(json.loads(call.choices[0].message.tool_calls[0].function.arguments), ADD)
    written = 'Adding.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    auto = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS,
                                          max_tokens=100, extra_body={"guided_choice": [written]})
    # --enable-auto-tool-choice --tool-call-parser hermes took effect
    assert auto.choices[0].finish_reason == "tool_calls" and auto.choices[0].message.content == "Adding."
    assert json.loads(auto.choices[0].message.tool_calls[0].function.arguments) == {"a": 2, "b": 3}
    assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
    assert "baton:e2e_request_latency_seconds" in httpx.get(f"{served.url}/metrics", timeout=30).text
    assert httpx.get(f"{served.url}/v1/models", timeout=30).status_code == 401  # --api-key-file / env


def test_the_chat_template_flag_replaces_the_models(served, tiny_model_dir):
    from baton.tokenizer import Tokenizer

    messages = [{"role": "user", "content": "2+3?"}]
    tokenizer = Tokenizer(tiny_model_dir, HERMES_TEMPLATE)
    expected = len(tokenizer.encode(tokenizer.apply_chat_template(messages, tools=TOOLS), add_special_tokens=False))
    out = served.client().chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                                  max_tokens=1)
    assert out.usage.prompt_tokens == expected
    own = Tokenizer(tiny_model_dir)  # the model's own template renders it otherwise
    assert len(own.encode(own.apply_chat_template(messages, tools=TOOLS), add_special_tokens=False)) != expected


@pytest.mark.parametrize("argv,named", [
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2"),
    (["-tp", "0"], "--tensor-parallel-size must be >= 1"),
    (["--swap-space", "4"], "--swap-space"),
    (["--trust-remote-code"], "--trust-remote-code"),
    (["--lora-modules", "a=b"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules={\"name\": \"a\"}"], 'needs "name" and "path"'),
    (["--enable-lora", "--lora-modules", "a"], "is not NAME=PATH"),
    (["--max-model"], "--max-model"),  # no abbreviations: a typo is not another flag
    (["--api-key", "k"], "BATON_API_KEY"),
    (["--enable-auto-tool-choice"], "--tool-call-parser"),
    (["--in-process", "-dp", "2"], "--in-process runs one colocated engine"),
])
def test_flags_baton_does_not_implement_are_refused_by_name(argv, named):
    result = subprocess.run([sys.executable, "-m", "baton.cli", "serve", "some/model", *argv, "--port", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert named in result.stderr, result.stderr


def test_data_parallel_and_disaggregated_map_onto_workers(tiny_model_dir):
    from baton.serve import build_parser, to_up
    from baton.up import plan

    args, problem = to_up(build_parser().parse_args(["-dp", "2", "--disaggregated", "--dtype", "half",
                                                     "--kv-cache-dtype", "fp8", "--enforce-eager", "-tp", "2"]))
    assert problem is None
    names = [c.name for c in plan(args, tiny_model_dir)]
    assert names == ["prefill-0", "prefill-1", "decode-0", "decode-1"]
    worker = plan(args, tiny_model_dir)[0].argv
    assert worker[worker.index("--dtype") + 1] == "float16"
    assert worker[worker.index("--kv-cache-dtype") + 1] == "fp8" and "--enforce-eager" in worker
    assert worker[worker.index("--tensor-parallel-size") + 1] == "2"
    args, _ = to_up(build_parser().parse_args(["-dp", "3", "-tp", "2", "--task", "embed",
                                               "--speculative-config", '{"method": "ngram"}']))
    assert [c.name for c in plan(args, tiny_model_dir)] == ["colocated-0", "colocated-1", "colocated-2"]
    worker = plan(args, tiny_model_dir)[0].argv
    assert worker[worker.index("--tensor-parallel-size") + 1] == "2" and worker[worker.index("--task") + 1] == "embed"
    assert worker[worker.index("--speculative-config") + 1] == '{"method": "ngram"}'


def test_lora_flags_reach_every_worker(tiny_model_dir, tmp_path):
    from baton.serve import build_parser, to_up
    from baton.up import plan
    from baton.worker.flags import parse as parse_worker

    adapter = tmp_path / "sql"
    args, problem = to_up(build_parser().parse_args([
        "--disaggregated", "--enable-lora", "--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras", "5",
        "--lora-modules", f"sql={adapter}", json.dumps({"name": "chat", "path": str(tmp_path / "chat")})]))
    assert problem is None
    for child in plan(args, tiny_model_dir):
        role = child.name.split("-")[0]
        engine, options = parse_worker(child.argv[1:], "baton serve-" + role, role)
        assert (engine.enable_lora, engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (True, 3, 32, 5)
        assert dict(options.lora_modules) == {"sql": str(adapter), "chat": str(tmp_path / "chat")}


def test_no_in_process_runs_a_router_and_a_worker_process(tiny_model_dir):
    dep = baton_up(str(tiny_model_dir), "--no-in-process", "--served-model-name", "tiny", "alias", "--seed", "7",
                   "--dtype", "float", command="serve", api_key=KEY)
    try:
        assert set(dep.processes) == {"colocated-0", "router"}
        assert {p.pid for p in psutil.Process(dep.proc.pid).children()} == {p.pid for p in dep.processes.values()}
        worker = cmdline(dep.processes["colocated-0"].pid)
        assert worker[worker.index("--seed") + 1] == "7" and worker[worker.index("--dtype") + 1] == "float32"
        assert worker[worker.index("--served-model-name") + 1] == "tiny"
        router = cmdline(dep.processes["router"].pid)
        assert router[router.index("--served-model-name") + 1] == "tiny,alias"
        for pid in (dep.proc.pid, *(p.pid for p in dep.processes.values())):
            assert KEY not in " ".join(cmdline(pid))
        out = dep.client().completions.create(model="alias", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
    finally:
        assert dep.stop() == 0


def test_the_quickstart_maps_every_flag():
    """docs/quickstart.md's "Coming from vLLM" table names every flag `baton serve` takes."""
    from baton.serve import build_parser

    text = (ROOT / "docs" / "quickstart.md").read_text()
    table = text[text.index("## Coming from vLLM"):]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", table))
    flags = {next(o for o in a.option_strings if o.startswith("--"))
             for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert not flags - documented, f"missing from the table: {sorted(flags - documented)}"


def test_chat_and_completions_stream_and_whole(served):
    client = served.client()
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
    chunks = list(chat)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}  # one finish, on the last choice chunk
    assert chunks[-1].usage.completion_tokens == 6
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    streamed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert whole.usage.completion_tokens == 5 and whole.choices[0].finish_reason == "length"


def test_a_named_tool_choice_gives_arguments_that_fit_the_schema(served):
    out = served.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "2+3?"}], tools=TOOLS, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "add"}})
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD)


def test_embeddings_echo_prompt_logprobs_and_best_of(served):
    client = served.client()
    vectors = client.embeddings.create(model="tiny", input=["a cat", "a dog"]).data
    assert len(vectors) == 2 and len(vectors[0].embedding) > 8 and vectors[0].embedding != vectors[1].embedding
    echo = client.completions.create(model="tiny", prompt="The quick brown fox", echo=True, max_tokens=1, logprobs=1,
                                     temperature=0, extra_body={"prompt_logprobs": 1})
    choice = echo.choices[0]
    assert choice.text.startswith("The quick brown fox") and choice.logprobs.token_logprobs[0] is None
    prompt_logprobs = choice.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == echo.usage.prompt_tokens
    best = client.completions.create(model="tiny", prompt="Once", n=1, best_of=3, max_tokens=4, temperature=1.0,
                                     seed=5, extra_body={"ignore_eos": True})
    assert len(best.choices) == 1 and best.usage.completion_tokens == 3 * 4  # every candidate ran


def test_bad_input_is_an_openai_style_400(served):
    for body, param in (({"use_beam_search": True}, "use_beam_search"), ({"temperature": -1}, "temperature"),
                        ({"best_of": 2, "stream": True}, "best_of")):
        r = httpx.post(f"{served.url}/v1/completions", headers=headers(), timeout=30,
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        served.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2, extra_body={"min_p": 2.0})


def test_one_metrics_port_counts_the_router_and_the_engine(served):
    url = f"{served.url}/metrics"

    def success(role: str) -> float:
        return series_sum(url, "vllm:request_success_total", f'role="{role}"')

    before = {role: success(role) for role in ("router", "colocated")}
    for _ in range(3):
        served.client().completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
    wait_until(lambda: all(success(role) - before[role] == 3 for role in before), timeout=30,
               what="vllm:request_success_total of the router and of the engine to count the 3 requests")
    text = httpx.get(url, timeout=30).text
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, both roles' series
    assert 'vllm:num_requests_running{model_name="tiny",role="colocated"}' in text
    assert 'vllm:num_requests_running{model_name="tiny",role="router"}' in text
    assert 'vllm:kv_cache_usage_perc{model_name="tiny",role="colocated"}' in text


def test_a_client_that_leaves_frees_the_engine(served):
    url = f"{served.url}/metrics"
    generated = series_sum(url, "baton:generation_tokens_total", 'role="colocated"')
    stream = served.client().completions.create(model="tiny", prompt="Once", max_tokens=1000, stream=True,
                                                extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_until(lambda: series_sum(url, "baton:num_requests_running", 'role="colocated"') == 0
               and series_sum(url, "baton:kv_cache_usage_perc", 'role="colocated"') == 0, timeout=30,
               what="the engine to abort the abandoned request and free its blocks")
    # Aborted, not run to its end: the engine generated fewer than the 1000 tokens asked for.
    assert series_sum(url, "baton:generation_tokens_total", 'role="colocated"') - generated < 1000


def test_a_full_engine_is_a_429_at_once(served):
    """Admission reads the in-process engine's reports as it reads a worker's: with the KV
    pool (64 blocks of 16) holding one of these outputs at a time, three of the first
    request's four wait in the engine, and the next request is refused at once."""
    url = f"{served.url}/metrics"
    long = dict(model="tiny", prompt=[5] * 500, max_tokens=400, extra_body={"ignore_eos": True})
    first = served.client(timeout=120).completions.create(n=4, stream=True, **long)
    next(iter(first))
    with pytest.raises(openai.RateLimitError) as refused:
        served.client().completions.create(**long)
    assert refused.value.response.headers.get("retry-after")
    first.close()
    wait_until(lambda: series_sum(url, "baton:num_requests_running", 'role="colocated"') == 0
               and series_sum(url, "baton:num_requests_waiting", 'role="colocated"') == 0
               and series_sum(url, "baton:kv_cache_usage_perc", 'role="colocated"') == 0, timeout=60,
               what="the engine to abort the four outputs and free their blocks")


def test_sigterm_lets_the_stream_in_flight_finish(served):
    """Last in this file: it stops the module's server."""
    stream = served.client(timeout=120).completions.create(
        model="tiny", prompt="Once", max_tokens=300, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    served.proc.send_signal(signal.SIGTERM)
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(chunks))
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive()
    texts = [c for c in [first, *rest] if c.choices and c.choices[0].text]
    assert len(texts) > 2  # it was still streaming when the signal came
    assert rest[-1].usage.completion_tokens == 300
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert served.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served.url}/health", timeout=5)
