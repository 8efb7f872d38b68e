"""Export a dataset to the layout another trainer reads as it is: verl, TRL, OpenRLHF, or a
Hugging Face dataset directory.

    guidedrl datasets export DATASET --to verl|trl|openrlhf|hf DEST [--guidance EXPLANATIONS_OR_HINTS]

What each target gets, by the kind of the source dataset (its manifest's ``kind``):

- **verl** (RL data, ``problems`` / ``filtered_problems``): verl's RL Parquet layout —
  ``data_source``, ``prompt`` (chat messages: one user turn, the question), ``ability``,
  ``reward_model: {style: rule, ground_truth: answer}``, ``extra_info: {split, index,
  problem_id, level, question, reference_solution, guidance_kind, guidance}`` — one file per split
  (``train.parquet``, ``eval.parquet``). ``--guidance`` adds, per problem, the selected
  self-explanation (an ``explanations`` dataset: ExPO) or the guidance shown (a hint stage's
  dataset: LTE's hint; a prefix stage's: the reference's first steps; a self_hint stage's: the
  policy's own hint; ``guidance_kind`` says which) to ``extra_info``.
- **trl**: ``dpo`` as a preference dataset (``prompt``/``chosen``/``rejected``), ``sft`` as
  prompt–completion, problems as a prompt-only dataset for ``GRPOTrainer`` (``prompt`` as
  chat messages, ``answer`` for reward functions, which TRL passes extra columns to).
  Preference and SFT prompts are stored rendered (the policy's chat template already
  applied), so they go out in TRL's standard (text) format, which TRL uses as it is.
- **openrlhf**: the keys of OpenRLHF's CLI: ``prompt``/``chosen``/``rejected`` (dpo,
  ``--prompt_key prompt``), ``input``/``output`` (sft), ``input``/``label`` (problems,
  ``--input_key input --label_key label``).
- **hf**: every column as it is, ``data/<split>-00000-of-00001.parquet`` and a README.md with
  the ``configs:`` header, so ``datasets.load_dataset(DEST)`` gives named splits.

Every exported row keeps its source row's id (``problem_id``, and ``sample_id`` where the
source has one) in a column or in ``extra_info``. Rows are read in record batches and written
as they go; the export is written under a temporary name beside DEST and renamed into place.
Each export has a card (README.md: source, its fingerprint, the mapping, the command) and
``export.json`` (the same, for scripts). A problems export for verl or TRL also gets the settings that put guidedrl's
rewards into that trainer (tasks/models/rewards.py): ``reward.yaml`` (verl's ``custom_reward_function``) or
``reward.py`` (TRL's reward functions), shown in the card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tasks.core.owner import new_name
from tasks.core.store import TMP_PREFIX, _now, package_version, read_manifest, swap_in

TARGETS = ("verl", "trl", "openrlhf", "hf")
PROBLEM_KINDS = ("problems", "filtered_problems")
BATCH_ROWS = 8192
EXPORT_MANIFEST = "export.json"


class ExportError(ValueError):
    """An export that cannot be made: the target does not take this kind of dataset, or DEST exists."""


class _RowError(ExportError):
    """A row of a batch that cannot be mapped (``row``: its index in the batch)."""

    def __init__(self, row: int, message: str):
        super().__init__(message)
        self.row, self.message = row, message


_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def _messages(role: str, content: pa.Array) -> pa.Array:
    """One chat turn per row: list<struct<role, content>> of length 1."""
    n = len(content)
    turns = pa.StructArray.from_arrays([pa.array([role] * n, pa.string()), content.cast(pa.string())], fields=list(_MESSAGE))
    return pa.ListArray.from_arrays(pa.array(range(n + 1), pa.int32()), turns)


def _col(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def _verl(batch: pa.RecordBatch, split: str, start: int, guidance: dict[str, tuple[str, str]]) -> pa.Table:
    n = batch.num_rows
    ids = _col(batch, "problem_id").to_pylist()
    kinds = [guidance.get(i, (None, None))[0] for i in ids]
    texts = [guidance.get(i, (None, None))[1] for i in ids]
    extra = pa.StructArray.from_arrays(
        [pa.array([split] * n, pa.string()), pa.array(range(start, start + n), pa.int64()), _col(batch, "problem_id"),
         _col(batch, "level"), _col(batch, "question"), _col(batch, "reference_solution"), pa.array(kinds, pa.string()),
         pa.array(texts, pa.string())],
        names=["split", "index", "problem_id", "level", "question", "reference_solution", "guidance_kind", "guidance"])
    reward = pa.StructArray.from_arrays([pa.array(["rule"] * n, pa.string()), _col(batch, "answer")], names=["style", "ground_truth"])
    return pa.table({"data_source": _col(batch, "source"), "prompt": _messages("user", _col(batch, "question")),
                     "ability": pa.array(["math"] * n, pa.string()), "reward_model": reward, "extra_info": extra})


def _select(batch: pa.RecordBatch, mapping: dict[str, str]) -> pa.Table:
    return pa.table({new: _col(batch, old) for new, old in mapping.items()})


Wrapping = tuple[str, str]  # (prefix, suffix): one user turn in a chat template, ready for the assistant turn


def chat_wrapping(tokenizer_dir: Path | str | None) -> Wrapping | None:
    """What the tokenizer's chat template puts around one user turn (with the generation prompt),
    or None when there is no tokenizer or it has no chat template."""
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        return None
    marker = "\x00guidedrl-user-turn\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    prefix, _, suffix = text.partition(marker)
    return prefix, suffix


def _user_turns(prompts: pa.Array, wrap: Wrapping) -> pa.Array:
    """The user turns of prompts rendered with the chat template ``wrap`` describes (the
    stored prompts are rendered); an error names the first row that is not one."""
    prefix, suffix = wrap
    ok = pc.and_(pc.starts_with(prompts, prefix), pc.ends_with(prompts, suffix))
    if not pc.all(ok).as_py():
        i = pc.index(ok, False).as_py()
        raise _RowError(i, f"its prompt is not one user turn in the tokenizer's chat template (it starts "
                           f"{prompts[i].as_py()[:60]!r}); export without --tokenizer for the rendered text")
    return pc.utf8_slice_codeunits(prompts, len(prefix), -len(suffix) if suffix else None)


def _conversation(user: pa.Array, assistant: pa.Array) -> pa.Array:
    """[{user}, {assistant}] per row."""
    n = len(user)
    order = pa.array([j for i in range(n) for j in (i, n + i)], pa.int64())
    contents = pa.concat_arrays([user.cast(pa.string()), assistant.cast(pa.string())]).take(order)
    turns = pa.StructArray.from_arrays([pa.array(["user", "assistant"] * n, pa.string()), contents], fields=list(_MESSAGE))
    return pa.ListArray.from_arrays(pa.array(range(0, 2 * n + 1, 2), pa.int32()), turns)


#: (target, kind) -> (the columns written and where they come from, for the card; the batch transform)
Mapping = tuple[dict[str, str], Callable[..., pa.Table]]


def _mapping(target: str, kind: str, wrap: Wrapping | None = None) -> Mapping:
    """The columns ``target`` gets from a ``kind`` dataset; with ``wrap`` (a chat template) the
    rendered prompts of dpo and sft go out as conversations."""
    if target == "hf":
        return {"(every column)": "as it is"}, lambda b, *a: pa.Table.from_batches([b])
    if target == "verl" and kind in PROBLEM_KINDS:
        return ({"data_source": "source", "prompt": "[{role: user, content: question}]", "ability": "'math'",
                 "reward_model": "{style: 'rule', ground_truth: answer}",
                 "extra_info": "{split, index, problem_id, level, question, reference_solution, guidance_kind, guidance}"}, _verl)
    if target == "verl" and kind == "sft":
        if wrap is None:
            raise ExportError("verl's SFT data is chat messages: give --tokenizer, the policy's tokenizer directory with its chat "
                              "template (the stored prompts are rendered with it)")
        return ({"messages": "[{role: user, content: the prompt's user turn}, {role: assistant, content: completion}]",
                 "problem_id": "problem_id", "sample_id": "sample_id"},
                lambda b, *a: pa.table({"messages": _conversation(_user_turns(_col(b, "prompt"), wrap), _col(b, "completion")),
                                        "problem_id": _col(b, "problem_id"), "sample_id": _col(b, "sample_id")}))
    if target == "trl" and kind == "dpo" and wrap is not None:
        return ({"prompt": "[{role: user, content: the prompt's user turn}]", "chosen": "[{role: assistant, content: chosen}]",
                 "rejected": "[{role: assistant, content: rejected}]", "problem_id": "problem_id", "chosen_kind": "chosen_kind",
                 "rejected_kind": "rejected_kind"},
                lambda b, *a: pa.table({"prompt": _messages("user", _user_turns(_col(b, "prompt"), wrap)),
                                        "chosen": _messages("assistant", _col(b, "chosen")),
                                        "rejected": _messages("assistant", _col(b, "rejected")), "problem_id": _col(b, "problem_id"),
                                        "chosen_kind": _col(b, "chosen_kind"), "rejected_kind": _col(b, "rejected_kind")}))
    if target == "trl" and kind == "sft" and wrap is not None:
        return ({"prompt": "[{role: user, content: the prompt's user turn}]", "completion": "[{role: assistant, content: completion}]",
                 "problem_id": "problem_id", "sample_id": "sample_id"},
                lambda b, *a: pa.table({"prompt": _messages("user", _user_turns(_col(b, "prompt"), wrap)),
                                        "completion": _messages("assistant", _col(b, "completion")),
                                        "problem_id": _col(b, "problem_id"), "sample_id": _col(b, "sample_id")}))
    simple = {
        ("trl", "dpo"): {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "problem_id": "problem_id",
                         "chosen_kind": "chosen_kind", "rejected_kind": "rejected_kind"},
        ("trl", "sft"): {"prompt": "prompt", "completion": "completion", "problem_id": "problem_id", "sample_id": "sample_id"},
        ("openrlhf", "dpo"): {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "problem_id": "problem_id"},
        ("openrlhf", "sft"): {"input": "prompt", "output": "completion", "problem_id": "problem_id", "sample_id": "sample_id"},
        **{("openrlhf", k): {"input": "question", "label": "answer", "datasource": "source", "problem_id": "problem_id", "level": "level"}
           for k in PROBLEM_KINDS},
    }
    if (target, kind) in simple:
        m = simple[(target, kind)]
        return m, lambda b, *a: _select(b, m)
    if target == "trl" and kind in PROBLEM_KINDS:
        return ({"prompt": "[{role: user, content: question}]", "answer": "answer", "reference_solution": "reference_solution",
                 "problem_id": "problem_id", "level": "level"},
                lambda b, *a: pa.table({"prompt": _messages("user", _col(b, "question")), "answer": _col(b, "answer"),
                                        "reference_solution": _col(b, "reference_solution"), "problem_id": _col(b, "problem_id"),
                                        "level": _col(b, "level")}))
    takes = {"verl": [*PROBLEM_KINDS, "sft"], "trl": ["dpo", "sft", *PROBLEM_KINDS], "openrlhf": ["dpo", "sft", *PROBLEM_KINDS]}[target]
    raise ExportError(f"--to {target} does not take a {kind!r} dataset; it takes: {', '.join(sorted(takes))} (hf takes every kind)")


def guidance_by_problem(paths: list[Path]) -> dict[str, tuple[str, str]]:
    """problem_id -> (guidance kind, text): the selected self-explanation of an ``explanations``
    dataset (explanation), the guidance shown in a guided rollouts dataset, named by its ``prompt_kind`` (hint: LTE's
    hint; prefix: the reference's first steps; self_hint: the policy's own hint). One entry per guided problem."""
    out: dict[str, tuple[str, str]] = {}
    for path in paths:
        kind = read_manifest(path).get("kind")
        data = pads.dataset(str(Path(path) / "data"), format="parquet")
        if kind == "explanations":
            for batch in data.to_batches(columns=["problem_id", "completion"], filter=pc.field("selected"), batch_size=BATCH_ROWS):
                for pid, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                    out.setdefault(pid, ("explanation", text))
        elif kind == "rollouts" and "guidance" in data.schema.names:
            for batch in data.to_batches(columns=["problem_id", "guidance", "prompt_kind"], filter=pc.field("guidance").is_valid(),
                                         batch_size=BATCH_ROWS):
                for pid, text, pk in zip(*(batch.column(i).to_pylist() for i in range(3))):
                    out.setdefault(pid, (pk, text))
        else:
            raise ExportError(f"{path}: --guidance takes an explain stage's `explanations`, or the `hints`, `prefixed` or `self_hints` "
                              f"of a hint, prefix or self_hint stage, not a {kind!r} dataset")
    return out


def _batches(source: Path) -> Iterator[pa.RecordBatch]:
    yield from pads.dataset(str(Path(source) / "data"), format="parquet").to_batches(batch_size=BATCH_ROWS)


def _split_batches(batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch]]:
    if "split" not in batch.schema.names:
        yield "train", batch
        return
    split = _col(batch, "split")
    for value in pc.unique(split).to_pylist():
        yield value, batch.filter(pc.equal(split, value))


class _Writers:
    """One Parquet writer per split, opened on the split's first rows."""

    def __init__(self, root: Path, name: Callable[[str], str]):
        self.root, self.name, self.open, self.rows = root, name, {}, {}

    def write(self, split: str, table: pa.Table) -> None:
        if split not in self.open:
            path = self.root / self.name(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.open[split] = pq.ParquetWriter(path, table.schema)
            self.rows[split] = 0
        self.open[split].write_table(table)
        self.rows[split] += table.num_rows

    def close(self) -> dict[str, dict]:
        for w in self.open.values():
            w.close()
        return {s: {"path": self.name(s), "rows": self.rows[s]} for s in sorted(self.open)}


def export(source: Path | str, target: str, dest: Path | str, *, guidance: list[Path] = (), tokenizer: Path | str | None = None,
           command: str = "", force: bool = False) -> dict:
    """Write the dataset directory ``source`` to ``dest`` in ``target``'s layout; returns the export's record.
    ``tokenizer``: the policy's tokenizer directory; where it has a chat template, the rendered prompts
    of dpo and sft go out as conversations (TRL, verl SFT)."""
    source, dest = Path(source), Path(dest)
    if target not in TARGETS:
        raise ExportError(f"--to {target!r}: targets are {', '.join(TARGETS)}")
    manifest = read_manifest(source)
    kind = manifest.get("kind")
    wrap = chat_wrapping(tokenizer) if kind in ("dpo", "sft") and target in ("trl", "verl") else None
    mapping, transform = _mapping(target, kind, wrap)
    if guidance and not (target == "verl" and kind in PROBLEM_KINDS):
        raise ExportError("--guidance goes into verl's extra_info: it needs --to verl and a problems dataset")
    if dest.exists() and not force:
        raise ExportError(f"{dest} already exists; export into a new directory (or --force to replace it)")
    guide = guidance_by_problem(list(guidance)) if guidance else {}
    name = (lambda s: f"data/{s}-00000-of-00001.parquet") if target == "hf" else (lambda s: f"{s}.parquet")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / new_name(f"{TMP_PREFIX}export-{dest.name}")
    tmp.mkdir()
    try:
        writers, seen = _Writers(tmp, name), {}
        for batch in _batches(source):
            for split, part in _split_batches(batch):
                try:
                    writers.write(split, transform(part, split, seen.get(split, 0), guide))
                except _RowError as exc:  # a row that cannot be mapped: name the dataset, split and row
                    raise ExportError(f"{source}: {split} row {seen.get(split, 0) + exc.row}: {exc.message}") from None
                seen[split] = seen.get(split, 0) + part.num_rows
        files = writers.close()
        if not files:
            raise ExportError(f"{source}: the dataset has no rows; nothing to export")
        record = {"target": target, "source": str(source.resolve()), "source_kind": kind, "source_fingerprint": manifest.get("fingerprint"),
                  "source_rows": manifest.get("num_rows"), "files": files, "mapping": mapping,
                  "guidance": [str(Path(g).resolve()) for g in guidance], "guided_problems": len(guide),
                  "conversational": wrap is not None,
                  "command": command, "package_version": package_version(), "created": _now()}
        snippets = reward_snippets(target, str(dest.resolve())) if kind in PROBLEM_KINDS else {}
        for file, text in snippets.items():
            (tmp / file).write_text(text)
        record["reward_settings"] = sorted(snippets)
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(card(record))
        swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


#: the module that holds guidedrl's rewards for other trainers (named by path: verl loads it from its file)
REWARDS_MODULE = Path(__file__).resolve().parents[1] / "models" / "rewards.py"


def reward_snippets(target: str, dest: str = "DEST") -> dict[str, str]:
    """What a problems export writes beside its data so a trainer scores with guidedrl's rewards: file name -> text."""
    if target == "verl":
        return {"reward.yaml": (
            "# guidedrl's rewards in verl: merge into your PPO/GRPO config (or pass each key as an override)\n"
            "reward:\n  custom_reward_function:\n"
            f"    path: {REWARDS_MODULE}\n    name: compute_score\n    reward_kwargs:\n"
            "      settings: /path/to/guidedrl-config.yaml   # its judge: section (default: the rule judge)\n"
            "      reward: judge                             # judge: ExpRL's outcome reward; verifier: the answer check\n"
            "# ExpRL's process rewards (judge.mode: process), each step's advantage on its tokens: add under reward:\n"
            f"#  reward_manager: {{source: importlib, name: ProcessRewardManager, module: {{path: {REWARDS_MODULE.with_name('rewards_verl.py')}}}}}\n")}
    if target == "trl":
        return {"reward.py": (
            "# guidedrl's rewards in TRL's GRPOTrainer, on this export (prompt, answer, reference_solution)\n"
            "from datasets import load_dataset\nfrom trl import GRPOConfig, GRPOTrainer\n\n"
            "from tasks.models.rewards import trl_reward_functions\n\n"
            f"train = load_dataset('parquet', data_files={{'train': '{dest}/train.parquet'}})['train']\n"
            "verifier, judge = trl_reward_functions('/path/to/guidedrl-config.yaml')  # its judge: section\n"
            "trainer = GRPOTrainer(model='/path/to/policy', reward_funcs=[verifier, judge], train_dataset=train,\n"
            "                      args=GRPOConfig(output_dir='out'))\ntrainer.train()\n")}
    return {}


_LOAD = {
    "verl": "data.train_files={dest}/train.parquet data.val_files={dest}/eval.parquet data.prompt_key=prompt",
    "trl": "datasets.load_dataset('parquet', data_files={{'train': '{dest}/train.parquet'}})['train']  # then DPOTrainer / SFTTrainer / GRPOTrainer(train_dataset=...)",
    "openrlhf": "--dataset {dest} (keys: {keys})",
    "hf": "datasets.load_dataset('{dest}')",
}


def card(record: dict) -> str:
    """The export's README.md: where its rows come from and how to read them."""
    files = record["files"]
    head = ""
    if record["target"] == "hf":
        splits = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in files)
        head = f"---\nconfigs:\n- config_name: default\n  data_files:\n{splits}\n---\n\n"
    rows = "\n".join(f"| `{col}` | {src} |" for col, src in record["mapping"].items())
    split_lines = "\n".join(f"- `{f['path']}`: {f['rows']} rows ({s})" for s, f in files.items())
    load = _LOAD[record["target"]].format(dest="DEST", keys=", ".join(c for c in record["mapping"] if not c.startswith("(")))
    rewards = "".join(f"\nScore with guidedrl's rewards (the answer verifier, the ExpRL judge): `{f}` beside this card.\n"
                      for f in record.get("reward_settings", []))
    guided = (f"\nGuidance in `extra_info.guidance` for {record['guided_problems']} problems, from: "
              + ", ".join(f"`{g}`" for g in record["guidance"]) + "\n") if record["guidance"] else ""
    return (f"{head}# {record['source_kind']} for {record['target']}\n\n"
            f"Exported by guidedrl {record['package_version']} on {record['created']} from `{record['source']}` "
            f"(kind `{record['source_kind']}`, {record['source_rows']} rows, fingerprint `{record['source_fingerprint']}`).\n\n"
            f"Made with: `{record['command'] or 'guidedrl datasets export'}`\n\n{split_lines}\n\n"
            f"| column | from the source |\n|---|---|\n{rows}\n{guided}\nRead it with: `{load}`\n" + rewards)


def export_datasets(datasets: dict[str, Path], targets: list[str], root: Path, guidance: list[Path] = (),
                    problems: Path | None = None, tokenizer: Path | None = None, command: str = "materialize.export") -> dict[str, dict]:
    """The exports ``materialize.export`` asks for: trl and openrlhf get the dpo and sft datasets
    (conversational for trl where ``tokenizer`` has a chat template), hf every dataset, verl the
    curated ``problems`` with the run's guidance (selected explanations, hints) and, with a chat
    template, sft as messages. Written under ``root/<target>/<dataset>``; empty datasets are skipped."""
    done = {}
    for target in targets:
        jobs = ([("problems", problems)] + ([("sft", datasets["sft"])] if "sft" in datasets and chat_wrapping(tokenizer) else [])
                if target == "verl" else [(n, path) for n, path in datasets.items() if target == "hf" or n in ("dpo", "sft")])
        for name, path in jobs:
            if path is None or read_manifest(path).get("num_rows", 0) == 0:
                continue
            done[f"{target}/{name}"] = export(path, target, root / target / name, tokenizer=tokenizer, command=f"{command}: [{target}]",
                                             guidance=list(guidance) if target == "verl" and name == "problems" else [])
    return done
