"""`baton serve MODEL`, the drop-in for `vllm serve`: vLLM's flags reach the router and the
workers, the official `openai` client works against it, and a flag Baton does not implement
is refused by name before anything starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from serving_harness import baton_up, wait_until

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


@pytest.fixture(scope="module")
def served(_tiny_model_cache, tiny_model_dir, template_file):
    dep = baton_up(str(tiny_model_dir), "--served-model-name", "tiny", "alias", "--max-model-len", "1024",
                   "--seed", "7", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.5",
                   "--dtype", "float", "--no-enable-prefix-caching", "--tool-call-parser", "hermes",
                   "--enable-auto-tool-choice", "--chat-template", str(template_file),
                   "--uvicorn-log-level", "warning", "--disable-log-requests",
                   command="serve", api_key=KEY)
    yield dep
    dep.stop()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_vllm_flags_reach_the_worker_and_the_router(served):
    assert set(served.processes) == {"colocated-0", "router"}
    worker = cmdline(served.processes["colocated-0"].pid)
    for flag, value in (("--seed", "7"), ("--max-num-batched-tokens", "512"), ("--gpu-memory-utilization", "0.5"),
                        ("--dtype", "float32"), ("--max-model-len", "1024"), ("--served-model-name", "tiny,alias")):
        assert worker[worker.index(flag) + 1] == value, (flag, worker)
    assert "--no-enable-prefix-caching" in worker
    router = cmdline(served.processes["router"].pid)
    assert router[router.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in router
    for pid in (served.proc.pid, *(p.pid for p in served.processes.values())):
        assert KEY not in " ".join(cmdline(pid))  # the key travels in the environment only


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


def test_the_quickstart_maps_every_flag():
    """docs/quickstart.md's "Coming from vLLM" table names every flag `baton serve` takes."""
    from baton.serve import build_parser

    text = (ROOT / "docs" / "quickstart.md").read_text()
    table = text[text.index("## Coming from vLLM"):]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", table))
    flags = {next(o for o in a.option_strings if o.startswith("--"))
             for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert not flags - documented, f"missing from the table: {sorted(flags - documented)}"


def test_ctrl_c_stops_everything(served):
    """Last in this file: it stops the module's deployment."""
    assert served.stop() == 0
    for process in served.processes.values():
        wait_until(lambda p=process: not p.alive(), timeout=10, what=f"{process.name} to exit")
