"""Exports to verl, TRL, OpenRLHF and a Hugging Face dataset directory, read by the real consumers.

The quickstart's datasets (one quickstart per test session) are exported with the CLI; TRL's
DPOTrainer, SFTTrainer and GRPOTrainer each run one step on the tiny policy from an export;
verl's RLHFDataset and OpenRLHF's PromptDataset / RewardDataset load theirs (skipped with the
reason when those packages are absent: `pip install --no-deps -r tests/consumers.txt`); every
exported row traces back to its source row.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow.parquet as pq
import pytest

from tasks.core.export import ExportError, export
from tasks.core.store import Store, read_dataset

pytestmark = pytest.mark.slow  # end to end: exports of a finished quickstart, read by the trainers' own classes

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "data" / "models" / "tiny-policy"


@pytest.fixture(scope="module")
def sources(finished_quickstart) -> dict[str, Path]:
    store = Store(finished_quickstart["workspace"])

    def one(stage: str, name: str) -> Path:
        [out] = store.outputs(stage)
        return out.dataset_path(name)

    return {"problems": one("curate", "problems"), "stuck": one("filter", "problems"), "explanations": one("explain", "explanations"),
            "hints": one("hint", "hints"), "dpo": one("materialize", "dpo"), "sft": one("materialize", "sft"),
            "grpo": one("materialize", "grpo")}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory, prefect_server) -> dict[str, Path]:
    """Every export, made with `guidedrl datasets export`."""
    from tests.conftest import _cli

    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name, (source, target, extra) in {
        "verl": ("stuck", "verl", ["--guidance", str(sources["explanations"]), "--guidance", str(sources["hints"])]),
        "trl-dpo": ("dpo", "trl", []), "trl-sft": ("sft", "trl", []), "trl-problems": ("problems", "trl", []),
        "openrlhf-dpo": ("dpo", "openrlhf", []), "openrlhf-sft": ("sft", "openrlhf", []), "openrlhf-problems": ("problems", "openrlhf", []),
        "hf-problems": ("problems", "hf", []), "hf-grpo": ("grpo", "hf", []),
        # the policy's chat template: the rendered prompts go out as conversations
        "trl-dpo-chat": ("dpo", "trl", ["--tokenizer", str(POLICY)]), "trl-sft-chat": ("sft", "trl", ["--tokenizer", str(POLICY)]),
        "verl-sft": ("sft", "verl", ["--tokenizer", str(POLICY)]),
    }.items():
        proc = _cli("datasets", "export", str(sources[source]), "--to", target, str(root / name), *extra)
        assert "exported" in proc.stdout
        made[name] = root / name
    return made


def _rows(path: Path) -> list[dict]:
    return [r for f in sorted(path.rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_exported_row_traces_back_to_its_source_row(sources, exports):
    src = {k: read_dataset(p).to_pylist() for k, p in sources.items()}
    record = json.loads((exports["verl"] / "export.json").read_text())
    assert record["source_fingerprint"] == json.loads((sources["stuck"] / "manifest.json").read_text())["fingerprint"]
    verl = _rows(exports["verl"])
    assert sorted(r["extra_info"]["problem_id"] for r in verl) == sorted(r["problem_id"] for r in src["stuck"])
    by_id = {r["problem_id"]: r for r in src["stuck"]}
    for r in verl:
        p = by_id[r["extra_info"]["problem_id"]]
        assert r["prompt"] == [{"role": "user", "content": p["question"]}]
        assert r["reward_model"] == {"style": "rule", "ground_truth": p["answer"]}
        assert r["extra_info"]["split"] == p["split"] and r["extra_info"]["level"] == p["level"]
    # ExPO's selected explanation (or LTE's hint) rides along for every guided stuck problem
    selected = {r["problem_id"]: r["completion"] for r in src["explanations"] if r["selected"]}
    assert selected and all(r["extra_info"]["guidance"] == selected[r["extra_info"]["problem_id"]]
                            for r in verl if r["extra_info"]["problem_id"] in selected)
    assert sum(r["extra_info"]["guidance_kind"] == "explanation" for r in verl) == len(selected.keys() & by_id.keys())
    assert [r["extra_info"]["index"] for r in verl] == list(range(len(verl)))

    for name, source, key in [("trl-dpo", "dpo", ("problem_id", "prompt", "chosen", "rejected")),
                              ("openrlhf-dpo", "dpo", ("problem_id", "prompt", "chosen", "rejected")),
                              ("trl-sft", "sft", ("sample_id", "prompt", "completion"))]:
        assert sorted(tuple(r[k] for k in key) for r in _rows(exports[name])) == sorted(tuple(r[k] for k in key) for r in src[source]), name
    assert sorted((r["sample_id"], r["input"], r["output"]) for r in _rows(exports["openrlhf-sft"])) == \
        sorted((r["sample_id"], r["prompt"], r["completion"]) for r in src["sft"])
    problems = sorted((r["problem_id"], r["question"], r["answer"]) for r in src["problems"])
    assert sorted((r["problem_id"], r["input"], r["label"]) for r in _rows(exports["openrlhf-problems"])) == problems
    assert sorted((r["problem_id"], r["prompt"][0]["content"], r["answer"]) for r in _rows(exports["trl-problems"])) == problems
    splits = {f.stem for f in exports["trl-problems"].glob("*.parquet")}
    assert splits == {r["split"] for r in src["problems"]}  # one file per split


def test_conversations_render_back_to_the_stored_prompts(sources, exports):
    """With the policy's tokenizer, dpo and sft prompts (stored rendered) go out as user turns: the chat
    template applied to them gives back exactly the stored prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(POLICY)
    render = lambda messages: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    dpo = sorted((r["problem_id"], r["prompt"], r["chosen"], r["rejected"]) for r in read_dataset(sources["dpo"]).to_pylist())
    chat = _rows(exports["trl-dpo-chat"])
    assert sorted((r["problem_id"], render(r["prompt"]), r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in chat) == dpo
    assert {(r["chosen"][0]["role"], r["rejected"][0]["role"]) for r in chat} == {("assistant", "assistant")}
    sft = sorted((r["sample_id"], r["prompt"], r["completion"]) for r in read_dataset(sources["sft"]).to_pylist())
    assert sorted((r["sample_id"], render(r["prompt"]), r["completion"][0]["content"]) for r in _rows(exports["trl-sft-chat"])) == sft
    verl = _rows(exports["verl-sft"])
    assert sorted((r["sample_id"], render(r["messages"][:1]), r["messages"][1]["content"]) for r in verl) == sft
    assert {tuple(m["role"] for m in r["messages"]) for r in verl} == {("user", "assistant")}


def test_hf_export_loads_with_named_splits_and_typed_features(sources, exports):
    ds = datasets.load_dataset(str(exports["hf-problems"]))
    src = read_dataset(sources["problems"]).to_pylist()
    assert set(ds) == {"train", "eval"}
    for split in ds:
        assert sorted(ds[split]["problem_id"]) == sorted(r["problem_id"] for r in src if r["split"] == split)
    assert ds["train"].features["problem_id"] == datasets.Value("string")
    grpo = datasets.load_dataset(str(exports["hf-grpo"]))["train"]
    assert grpo.features["completion_token_ids"].feature == datasets.Value("int32")
    assert len(grpo) == read_dataset(sources["grpo"]).num_rows
    card = (exports["hf-problems"] / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n") and "datasets export" in card and "sha256:" in card


def test_trl_trainers_take_the_exports_as_they_are(exports, tmp_path):
    """DPOTrainer, SFTTrainer and GRPOTrainer: one step each on the tiny policy, from the exported files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    def load(name: str, n: int = 8):
        return datasets.load_dataset("parquet", data_files={"train": str(exports[name] / "train.parquet")})["train"].select(range(n))

    tok = AutoTokenizer.from_pretrained(POLICY)
    common = dict(max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                  disable_tqdm=True, dataloader_num_workers=0)

    def model():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(POLICY)

    for name in ("trl-dpo", "trl-dpo-chat"):  # text as rendered, and conversational (TRL applies the chat template)
        dpo = DPOTrainer(model=model(), args=DPOConfig(output_dir=str(tmp_path / name), max_length=256, **common),
                         train_dataset=load(name), processing_class=tok)
        assert dpo.train().global_step == 1
    for name in ("trl-sft", "trl-sft-chat"):
        sft = SFTTrainer(model=model(), args=SFTConfig(output_dir=str(tmp_path / name), max_length=256, **common),
                         train_dataset=load(name), processing_class=tok)
        assert sft.train().global_step == 1

    seen = []

    def reward(completions, answer, **kwargs):  # TRL passes the export's `answer` column to reward functions
        seen.extend(answer)
        return [float(str(a) in (c if isinstance(c, str) else c[0]["content"])) for c, a in zip(completions, answer)]

    grpo = GRPOTrainer(model=model(), reward_funcs=reward, train_dataset=load("trl-problems"), processing_class=tok,
                       args=GRPOConfig(output_dir=str(tmp_path / "grpo"), num_generations=2, max_completion_length=16, **common))
    assert grpo.train().global_step == 1
    assert seen and set(seen) <= set(load("trl-problems")["answer"])


def test_verl_rlhf_dataset_reads_the_export(exports, tmp_path):
    pytest.importorskip("verl", reason="verl is not installed (pip install --no-deps -r tests/consumers.txt)")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = AutoTokenizer.from_pretrained(POLICY)
    files = [str(p) for p in sorted(exports["verl"].glob("*.parquet"))]
    ds = RLHFDataset(data_files=files, tokenizer=tok, config=OmegaConf.create(
        {"max_prompt_length": 512, "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "verl-cache")}))
    rows = _rows(exports["verl"])
    assert len(ds) == len(rows)
    item = ds[0]  # verl 0.9 hands the chat messages to its agent loop, which applies the chat template
    assert item["raw_prompt"] == rows[0]["prompt"]
    assert rows[0]["prompt"][0]["content"] in tok.apply_chat_template(item["raw_prompt"], tokenize=False, add_generation_prompt=True)
    assert item["extra_info"]["problem_id"] == rows[0]["extra_info"]["problem_id"]
    assert item["reward_model"]["ground_truth"] == rows[0]["reward_model"]["ground_truth"]


def test_verl_sft_dataset_reads_the_export(exports):
    pytest.importorskip("verl", reason="verl is not installed (pip install --no-deps -r tests/consumers.txt)")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    try:
        from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset
    except ImportError as exc:  # verl 0.9.1 imports its Qwen2-VL patches, which need classes transformers 5.23 no longer has
        pytest.skip(f"verl's MultiTurnSFTDataset cannot be imported beside our transformers ({exc}); the layout "
                    "(`messages`: [{role, content}], verl's default messages_key) is checked by the round-trip test")
    tok = AutoTokenizer.from_pretrained(POLICY)
    sft_files = [str(p) for p in sorted(exports["verl-sft"].glob("*.parquet"))]
    sft = MultiTurnSFTDataset(sft_files, tok, OmegaConf.create({"max_length": 512, "truncation": "right"}))
    assert len(sft) == len(_rows(exports["verl-sft"]))
    assert sft[0]["input_ids"].numel() > 0


def test_openrlhf_datasets_read_the_exports(exports):
    pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (pip install --no-deps -r tests/consumers.txt)")
    from openrlhf.datasets import PromptDataset, RewardDataset, SFTDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(POLICY)
    # the keys of OpenRLHF's CLI flags, as the export's card says to pass them
    args = SimpleNamespace(data=SimpleNamespace(input_key="input", label_key="label", output_key="output", prompt_key="prompt",
                                                chosen_key="chosen", rejected_key="rejected", apply_chat_template=False))
    strategy = SimpleNamespace(args=args, is_rank_0=lambda: True)

    def load(name: str):
        return datasets.load_dataset("parquet", data_files=sorted(str(p) for p in exports[name].glob("*.parquet")))["train"]

    prompts = load("openrlhf-problems")
    pd = PromptDataset(prompts, tok, strategy)
    assert len(pd) == len(prompts)
    datasource, prompt, label, _ = pd[0]
    assert (prompt, label, datasource) == (prompts[0]["input"], prompts[0]["label"], prompts[0]["datasource"])
    prefs = load("openrlhf-dpo").select(range(16))
    rd = RewardDataset(prefs, tok, 512, strategy, is_dpo=True, num_processors=1)
    assert len(rd) == len(prefs)
    sft = load("openrlhf-sft").select(range(16))
    sd = SFTDataset(sft, tok, 512, strategy, num_processors=1)
    assert len(sd) == len(sft)


def _other_template(tmp_path: Path) -> Path:
    """The tiny policy's tokenizer with another chat template: the stored prompts were not rendered with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(POLICY)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    tok.save_pretrained(tmp_path / "other-tokenizer")
    return tmp_path / "other-tokenizer"


def test_errors_name_the_problem_and_leave_nothing(sources, tmp_path):
    with pytest.raises(ExportError, match="does not take a 'dpo' dataset; it takes: filtered_problems, problems, sft"):
        export(sources["dpo"], "verl", tmp_path / "x")
    with pytest.raises(ExportError, match="verl's SFT data is chat messages: give --tokenizer"):
        export(sources["sft"], "verl", tmp_path / "x")
    with pytest.raises(ExportError, match=r"sft/data|sft: train row \d+: its prompt is not one user turn"):
        export(sources["sft"], "trl", tmp_path / "x", tokenizer=_other_template(tmp_path))
    with pytest.raises(ExportError, match="--guidance takes an explain stage's"):
        export(sources["stuck"], "verl", tmp_path / "x", guidance=[sources["dpo"]])
    export(sources["dpo"], "trl", tmp_path / "y")
    with pytest.raises(ExportError, match="already exists"):
        export(sources["dpo"], "trl", tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-tokenizer", "y"]  # no temporaries left


def test_materialize_export_writes_the_exports_into_the_output(finished_quickstart, tmp_path):
    """`materialize.export: [trl, verl, hf]`: the output's exports/ directory holds each, made from the run's datasets."""
    import shutil

    from tasks.core.config import read_yaml
    from tasks.registry import REGISTRY, parse_config

    ws = tmp_path / "ws"
    shutil.copytree(finished_quickstart["workspace"], ws)
    raw = read_yaml(ROOT / "configs" / "quickstart.yaml")
    raw["materialize"]["export"] = ["trl", "verl", "hf"]
    config = parse_config(raw, base_dir=ROOT)
    store = Store(ws)
    upstream = {s: outs[0] for s in (*REGISTRY["materialize"].upstream, *REGISTRY["materialize"].optional_upstream)
                if (outs := store.outputs(s))}  # every guidance the quickstart ran
    out, reused = REGISTRY["materialize"].run(config, store, upstream)
    assert not reused
    root = out.path / "exports"
    assert sorted(str(p.relative_to(root)) for p in root.glob("*/*")) == [
        "hf/dpo", "hf/grpo", "hf/sft", "trl/dpo", "trl/sft", "verl/problems", "verl/sft"]
    assert json.loads((root / "trl" / "dpo" / "export.json").read_text())["conversational"]  # the tiny policy has a chat template
    assert len(_rows(root / "trl" / "dpo")) == out.manifest["datasets"]["dpo"]["num_rows"]
    verl = _rows(root / "verl" / "problems")
    assert len(verl) == upstream["curate"].manifest["datasets"]["problems"]["num_rows"]
    assert {r["extra_info"]["guidance_kind"] for r in verl} >= {"explanation", None}
    assert out.summary["exports"]["trl/dpo"]["files"]["train"]["rows"] == out.manifest["datasets"]["dpo"]["num_rows"]
    assert "exports" in out.manifest["directories"]
