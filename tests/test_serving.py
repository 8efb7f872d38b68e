"""Serving and training as two roles of one policy: a served policy (backend openai) is trained from its
local checkpoint, named by it, and made to follow each online round's checkpoint — by restarting the server
on it or by loading the round's LoRA adapter — against real local OpenAI-compatible servers."""

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch

from flows.online import round_config
from tasks.core.config import ConfigError
from tasks.models import serving
from tasks.models.generation import SamplingParams, checkpoint_fingerprint
from tasks.models.policy import check_policy, local_policy_dir, open_backend, policy_id_for
from tasks.registry import parse_config
from tests.openai_server import OpenAIServer
from tests.conftest import chain_sum

pytestmark = pytest.mark.slow  # end to end: served policies restarted as subprocesses on each round's checkpoint

ROOT = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(n=1, max_new_tokens=3)
PROBLEMS = {"sources": [chain_sum(4, 1, "easy", terms=None)]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(src: Path, dst: Path, mark: int) -> Path:
    """A copy of ``src`` with its own fingerprint (config.json carries ``mark``)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "guidedrl_test_mark": mark}))
    return dst


def _served(base_url: str, checkpoint: Path | None, tmp_path: Path, **serve) -> dict:
    policy = {"backend": "openai", "model": "served-policy", "base_url": base_url, "timeout_seconds": 5, "max_retries": 0,
              "serve": serve}
    if checkpoint is not None:
        policy["checkpoint"] = str(checkpoint)
    return {"problems": PROBLEMS, "policy": policy, "workspace": str(tmp_path / "ws")}


def test_a_served_policy_is_trained_from_its_checkpoint_and_named_by_it(random_checkpoint, tmp_path):
    config = parse_config(_served("http://127.0.0.1:9/v1", random_checkpoint, tmp_path), base_dir=tmp_path)
    assert policy_id_for(config) == checkpoint_fingerprint(random_checkpoint)
    assert local_policy_dir(config, "grpo") == random_checkpoint
    bare = parse_config(_served("http://127.0.0.1:9/v1", None, tmp_path), base_dir=tmp_path)
    assert policy_id_for(bare) == "openai:served-policy"
    with pytest.raises(ValueError, match="grpo: trains a local checkpoint.*set policy.checkpoint"):
        local_policy_dir(bare, "grpo")
    with pytest.raises(ConfigError, match="restart needs policy.serve.restart_command"):
        check_policy(parse_config(_served("http://127.0.0.1:9/v1", random_checkpoint, tmp_path, follow="restart"), base_dir=tmp_path))
    for rounds, serve, match in [(2, {}, "set policy.serve.follow"), (2, {"follow": "lora"}, "needs train.grpo.lora")]:
        with pytest.raises(ConfigError, match=match):
            serving.check_following(parse_config(_served("http://x/v1", random_checkpoint, tmp_path, **serve), base_dir=tmp_path), rounds)
    serving.check_following(bare, 1)  # one round: nothing to follow


def _requests(log: Path) -> list[dict]:
    """The logged completion requests, without the capability probes (tasks/models/served.py) a backend sends first."""
    lines = log.read_text().splitlines() if log.is_file() else []
    return [r for r in map(json.loads, lines) if not r.get("probe")]


def test_restart_on_each_checkpoint_then_the_next_requests_reach_the_new_server(random_checkpoint, tmp_path):
    first, second = _checkpoint(random_checkpoint, tmp_path / "round-1", 1), _checkpoint(random_checkpoint, tmp_path / "round-2", 2)
    port, requests = _port(), tmp_path / "requests.jsonl"
    command = (f"{sys.executable} -m tests.openai_server --threaded --port {{port}} --served-model-name {{model}} "
               f"--root {{checkpoint}} --startup-seconds 1.5 --request-log {requests}")
    raw = _served(f"http://127.0.0.1:{port}/v1", first, tmp_path, follow="restart", restart_command=command, ready_timeout_seconds=60)
    try:
        for round_idx, ckpt in [(1, first), (2, second)]:
            config = parse_config(raw, base_dir=tmp_path)
            served = serving.follow(config.policy, ckpt, tmp_path / "logs", cwd=ROOT)
            proc = serving._OWNED[config.policy.base_url.rstrip("/")]
            # the next round's config: rows named by the checkpoint the server now holds
            raw = round_config(raw, str(ckpt), round_idx + 1, served)
            config = parse_config(raw, base_dir=tmp_path)
            assert config.policy.checkpoint == str(ckpt) and policy_id_for(config) == checkpoint_fingerprint(ckpt)
            backend = open_backend(config)
            assert backend.policy_id == checkpoint_fingerprint(ckpt)
            [[sample]] = backend.generate([f"round {round_idx}"], PARAMS)
            assert sample.finish_reason == "stop" and sample.token_ids
            assert _requests(requests)[-1] == {"path": "/v1/completions", "model": "served-policy", "root": str(ckpt)}
            if round_idx == 1:
                old = proc
                # as if this process died and a new one resumes the run: the server it started still holds the port;
                # the next restart stops it through its pid file
                assert (tmp_path / "logs" / f"serve-{port}.pid").read_text().strip() == str(proc.pid)
                serving._OWNED.clear()
                serving._PIDFILES.clear()
        assert old.poll() is not None  # the first server was stopped before the second started
        assert [r["root"] for r in _requests(requests)] == [str(first), str(second)]
        assert len(list((tmp_path / "logs").glob("serve-*.log"))) == 2
    finally:
        serving.stop_owned()
    assert proc.poll() is not None and not (tmp_path / "logs" / f"serve-{port}.pid").exists()  # and the last one when the run ends


def test_a_restart_that_fails_or_never_serves_the_checkpoint_is_an_error_with_its_log(random_checkpoint, tmp_path):
    url = f"http://127.0.0.1:{_port()}/v1"
    failing = parse_config(_served(url, random_checkpoint, tmp_path, follow="restart", restart_command="echo no GPU here >&2; exit 3"),
                           base_dir=tmp_path)
    with pytest.raises(serving.ServingError, match="(?s)exited with 3.*no GPU here"):
        serving.follow(failing.policy, random_checkpoint, tmp_path / "logs")
    hanging = parse_config(_served(url, random_checkpoint, tmp_path, follow="restart", restart_command="sleep 60",
                                   ready_timeout_seconds=1.5), base_dir=tmp_path)
    with pytest.raises(serving.ServingError, match="did not list served-policy loaded from .* within 2 s.*it lists nothing \\(ConnectError"):
        serving.follow(hanging.policy, random_checkpoint, tmp_path / "logs")
    assert not serving._OWNED  # the command that never served was stopped


def test_lora_following_loads_each_rounds_adapter_before_the_next_requests(random_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.stages.grpo import GRPOTrainConfig, save_checkpoint, with_lora

    cfg = GRPOTrainConfig(lora=True, lora_r=2, lora_alpha=4)
    ckpt = tmp_path / "round-1" / "checkpoint"
    save_checkpoint(with_lora(AutoModelForCausalLM.from_pretrained(str(random_checkpoint)), cfg),
                    AutoTokenizer.from_pretrained(str(random_checkpoint)), ckpt, cfg)
    with OpenAIServer() as server:
        server.behaviour.models["served-policy"] = {"root": str(random_checkpoint), "parent": None}
        raw = _served(server.base_url, random_checkpoint, tmp_path, follow="lora")
        raw["train"] = {"grpo": {"lora": True}}
        name = serving.adapter_name(ckpt)
        from tasks.models.served import ServerError

        with pytest.raises(ServerError, match=f"does not serve model '{name}'.*it lists served-policy"):  # not loaded yet: 404
            open_backend(parse_config({**raw, "policy": {**raw["policy"], "model": name}}, base_dir=tmp_path))
        served = serving.follow(parse_config(raw, base_dir=tmp_path).policy, ckpt, tmp_path / "logs")
        assert served == {"checkpoint": str(ckpt.resolve()), "model": name}
        load = [r for r in server.behaviour.requests if "lora_name" in r]
        assert load == [{"lora_name": name, "lora_path": str(ckpt.resolve() / "adapter")}]
        listed = {m["id"]: m for m in serving.served_models(parse_config(raw, base_dir=tmp_path).policy)}
        assert listed[name]["parent"] == "served-policy"
        nxt = parse_config(round_config(raw, str(ckpt), 2, served), base_dir=tmp_path)
        assert nxt.policy.model == name and nxt.train.grpo.lora_adapter == str(ckpt / "adapter")
        assert policy_id_for(nxt) == checkpoint_fingerprint(ckpt)
        [[sample]] = open_backend(nxt).generate(["after"], PARAMS)
        assert sample.finish_reason == "stop" and server.behaviour.requests[-1]["model"] == name
        again = serving.follow(nxt.policy, ckpt, tmp_path / "logs")  # a resumed run: served already, not loaded twice
        assert again == served and len([r for r in server.behaviour.requests if "lora_name" in r]) == 1
        other = _checkpoint(ckpt, tmp_path / "round-x", 3)
        server.behaviour.models[serving.adapter_name(other)] = {"root": "/elsewhere", "parent": "served-policy"}
        with pytest.raises(serving.ServingError, match="refused LoRA adapter.*already been loaded"):
            serving.follow(nxt.policy, other, tmp_path / "logs")  # the name taken by another adapter: the server's refusal


def test_a_continued_adapter_stays_relative_to_the_servers_base(random_checkpoint, tmp_path):
    """Round 2 continues round 1's adapter on the original base (not a new adapter on the merged model), so the
    adapter a server applies to its base weights is the policy the round trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.stages.grpo import GRPOTrainConfig, load_for_update, save_checkpoint, with_lora

    tok = AutoTokenizer.from_pretrained(str(random_checkpoint))
    cfg = GRPOTrainConfig(lora=True, lora_r=2, lora_alpha=4)
    model = with_lora(AutoModelForCausalLM.from_pretrained(str(random_checkpoint)), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # a trained adapter: not the identity
    save_checkpoint(model, tok, tmp_path / "r1", cfg)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r1"))
    cont = cfg.model_copy(update={"lora_adapter": str(tmp_path / "r1" / "adapter"), "kl": 0.01})
    _, model2, ref = load_for_update(tmp_path / "r1", random_checkpoint, cont, "cpu")
    ids = torch.tensor([tok("12+34=46", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model2(ids).logits, merged(ids).logits, atol=1e-5)  # base + adapter = round 1's policy
        base_logits = AutoModelForCausalLM.from_pretrained(str(random_checkpoint))(ids).logits
        with model2.disable_adapter():
            assert torch.allclose(model2(ids).logits, base_logits, atol=1e-6)
    assert ref is not None  # the KL reference (the initial policy = the adapter's base) is the adapters switched off
    assert any(p.requires_grad for n, p in model2.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model2.named_parameters() if "lora_" not in n)
    save_checkpoint(model2, tok, tmp_path / "r2", cfg)
    base = json.loads((tmp_path / "r2" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == random_checkpoint.resolve()


def test_online_with_a_served_policy_restarts_the_server_on_each_rounds_checkpoint(prefect_server, tmp_path):
    """`guidedrl online` over two rounds with the policy sampled from a server: the flow starts it on the initial
    checkpoint, trains that checkpoint, restarts the server on round 1's checkpoint, and round 2's rows come from
    (and are named by) it; the server it started is stopped at the end."""
    from flows.online import online
    from tasks.core.store import Store
    from tests.test_online import TINY, _raw

    port, requests = _port(), tmp_path / "requests.jsonl"
    raw = _raw()
    raw["policy"] = {"backend": "openai", "model": "served-policy", "checkpoint": str(TINY), "base_url": f"http://127.0.0.1:{port}/v1",
                     "max_retries": 1, "serve": {"follow": "restart", "ready_timeout_seconds": 60, "restart_command":
                     f"PYTHONPATH={ROOT} {sys.executable} -m tests.openai_server --threaded --port {{port}} --served-model-name "
                     f"{{model}} --root {{checkpoint}} --solve --request-log {requests}"}}
    raw["filter"] = {"max_pass_rate": 1.0}  # the server solves half of every problem: guide them all
    raw["explain"]["problems"] = "all"
    history = online(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), rounds=2)
    round1, round2 = (h["results"] for h in history)
    store = Store(tmp_path / "ws")
    rows = [store.get("rollouts", Path(r["rollouts"]["path"]).name).read("rollouts") for r in (round1, round2)]
    ckpt1 = Path(history[0]["policy"]).resolve()
    assert set(rows[0]["policy_id"].to_pylist()) == {checkpoint_fingerprint(TINY)}
    assert set(rows[1]["policy_id"].to_pylist()) == {checkpoint_fingerprint(ckpt1)}
    grpo2 = store.get("grpo", Path(round2["grpo"]["path"]).name)
    assert grpo2.manifest["inputs"]["policy"] == checkpoint_fingerprint(ckpt1)  # round 2 trained round 1's checkpoint
    assert all(r["grpo"]["summary"]["steps"] >= 1 for r in (round1, round2))  # the server solves half: groups with signal
    assert checkpoint_fingerprint(ckpt1) != checkpoint_fingerprint(TINY)
    # ExPO's scores and the loss-side log-probs came from the server (prompt_logprobs), not skipped
    explain = round1["explain"]["summary"]
    assert explain["kept"] > 0 and explain["unscored"] == 0 and explain["scoring_unavailable"] is None
    expl = store.get("explain", Path(round1["explain"]["path"]).name).read("explanations")
    assert expl["explain_loglik"].null_count == 0 and expl["loss_logprobs"].null_count == 0
    roots = [r["root"] for r in _requests(requests)]
    assert roots[0] == str(TINY.resolve()) and str(ckpt1) in roots
    first = roots.index(str(ckpt1))
    assert set(roots[:first]) == {str(TINY.resolve())} and set(roots[first:]) == {str(ckpt1)}  # round 2 only from the new server
    assert len(roots[first:]) >= rows[1].num_rows // raw["rollouts"]["samples_per_problem"]
    assert not serving._OWNED
    with pytest.raises(Exception):
        serving.served_models(parse_config(raw, base_dir=tmp_path).policy, timeout=2)  # nothing answers any more


def test_online_with_lora_following_loads_each_rounds_adapter_and_continues_it(prefect_server, tmp_path):
    """`guidedrl online` with `follow: lora`: round 1 trains a LoRA adapter on the served base, the server loads it, round 2
    samples it by name and continues the same adapter on the same base."""
    from flows.online import online
    from tasks.core.store import Store
    from tests.test_online import TINY, _raw

    with OpenAIServer() as server:
        server.behaviour.models["served-policy"] = {"root": str(TINY), "parent": None}
        server.behaviour.solve_even = True
        raw = _raw()
        raw["policy"] = {"backend": "openai", "model": "served-policy", "checkpoint": str(TINY), "base_url": server.base_url,
                         "max_retries": 1, "serve": {"follow": "lora"}}
        raw["train"]["grpo"].update(lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-3)
        history = online(raw_config=raw, base_dir=str(tmp_path), workspace=str(tmp_path / "ws"), rounds=2)
        ckpt1 = Path(history[0]["policy"]).resolve()
        name = serving.adapter_name(ckpt1)
        loads = [r for r in server.behaviour.requests if "lora_name" in r]
        assert loads == [{"lora_name": name, "lora_path": str(ckpt1 / "adapter")}]  # once, between the rounds
        first = server.behaviour.requests.index(loads[0])
        models = [r.get("model") for r in server.behaviour.requests[first + 1:] if "prompt" in r]
        assert models and set(models) == {name}  # round 2 sampled only the adapter
    store = Store(tmp_path / "ws")
    rows = store.get("rollouts", Path(history[1]["results"]["rollouts"]["path"]).name).read("rollouts")
    assert set(rows["policy_id"].to_pylist()) == {checkpoint_fingerprint(ckpt1)}
    ckpt2 = Path(history[1]["policy"])
    base = json.loads((ckpt2 / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).resolve() == TINY.resolve()  # round 2's adapter is still relative to the server's base
    assert history[1]["results"]["grpo"]["summary"]["steps"] >= 1
