"""`datasets ls | show | publish | pull | diff`: stage outputs as datasets other teams read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import JsonOpt, console, datasets_app, fail
from flows.cli.render import dataset_entries, print_datasets, print_diff, print_published
from flows.errors import user_errors


@datasets_app.command("ls")
def datasets_ls(url: Optional[str] = typer.Argument(None, help="A shared location (s3://bucket/prefix/, a directory): list the "
                                                     "datasets published there instead of the workspace's."),
                workspace: Path = typer.Option(Path("workspace"), "--workspace", "-w", help="Workspace directory."),
                as_json: bool = JsonOpt):
    """List finished stage outputs and their datasets in the workspace store — or, given URL, the datasets published
    there (a team's catalogue: name, kind, rows, fingerprint, created, the run it came from)."""
    from tasks.core.store import Store

    if url is not None:
        from tasks.core.share import list_published

        try:
            entries = list_published(url)
        except user_errors() as exc:
            fail(str(exc))
        if as_json:
            print(json.dumps(entries, indent=1))
        elif not entries:
            console.print(f"no published datasets under {url}")
        else:
            print_published(entries, f"datasets published under {url}")
        return

    outputs = Store(workspace).outputs()
    if as_json:
        print(json.dumps(dataset_entries(outputs), indent=1))
        return
    if not outputs:
        console.print(f"no stage outputs in {Path(workspace).resolve() / 'store'}")
        return
    print_datasets(dataset_entries(outputs), f"datasets in {Path(workspace).resolve() / 'store'}")


@datasets_app.command("publish")
def datasets_publish(
    path: Path = typer.Argument(..., help="A dataset directory (manifest.json, README.md, data/), e.g. <workspace>/store/materialize/<key>/dpo."),
    url: str = typer.Argument(..., help="Where to: a directory, file://, or an fsspec URL (s3://... with s3fs installed)."),
):
    """Copy a dataset to a shared location (verified first; the manifest is written last)."""
    from tasks.core.share import publish
    from tasks.report.runs import run_of_output

    try:
        m = publish(path, url, run=run_of_output(path))
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"published {path} ({m.get('kind')}, {m.get('num_rows')} rows, {m.get('fingerprint')}) to {url}")
    extra = ", storage_options={...}" if url.startswith(("s3://", "gs://", "az://", "abfs://")) else ""
    console.print(f'load it without guidedrl: datasets.load_dataset("parquet", data_files="{url.rstrip("/")}/data/*.parquet"{extra})'
                  + (" — the README's \"Past one machine\" shows polars, pyarrow and datasets reading from S3" if extra else ""))


@datasets_app.command("pull")
def datasets_pull(
    url: str = typer.Argument(..., help="A published dataset: directory, file:// or fsspec URL."),
    path: Path = typer.Argument(..., help="A new local directory to put it in."),
    force: bool = typer.Option(False, "--force", help="Replace PATH if it exists."),
):
    """Fetch a published dataset; refused unless its bytes match its manifest's fingerprint. Only Parquet and JSON are read."""
    from tasks.core.share import pull

    try:
        m = pull(url, path, force=force)
    except user_errors() as exc:
        fail(str(exc))
    console.print(f"pulled {url} into {path} ({m.get('kind')}, {m.get('num_rows')} rows, fingerprint verified)")


@datasets_app.command("diff")
def datasets_diff(a: str = typer.Argument(..., help="A dataset directory, or a published dataset's URL (s3://...)."),
                  b: str = typer.Argument(..., help="Another one.")):
    """Rows, schema and per-column statistics of two datasets, side by side (a URL is pulled, verified, first)."""
    from tasks.core.share import describe, fetched

    try:
        with fetched(a) as pa_, fetched(b) as pb:
            da, db = describe(pa_), describe(pb)
    except user_errors() as exc:
        fail(str(exc))
    print_diff(a, b, da, db)
    if da["summary"] != db["summary"]:
        console.print("summaries differ:")
        console.print_json(json.dumps({"A": da["summary"], "B": db["summary"]}, default=str))


@datasets_app.command("show")
def datasets_show(
    path: Path = typer.Argument(..., help="A dataset directory, or a stage output directory (shows each dataset)."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many first rows to print."),
):
    """Schema, row count, manifest and first rows of a dataset (its bytes checked against the fingerprint; never read whole)."""
    import polars as pl

    from tasks.core.store import head_rows, open_dataset, read_manifest

    try:
        manifest = read_manifest(path)
        if "datasets" in manifest:  # a stage output: show each dataset
            console.print(f"[bold]stage output[/] {path} (stage {manifest['stage']}, key {manifest['stage_key']})")
            console.print_json(json.dumps(manifest.get("summary", {})))
            for name in manifest["datasets"]:
                datasets_show(path / name, rows)
            return
        data, num_rows = open_dataset(path)
        head = head_rows(path, rows)  # the first rows: a batch of the first file
    except user_errors() as exc:
        fail(str(exc))
    console.rule(f"[bold]{manifest.get('name', path.name)}[/] ({manifest.get('kind')}) — {num_rows} rows")
    console.print(f"path: {Path(path).resolve()}")
    console.print(f"fingerprint: {manifest.get('fingerprint')} (verified)")
    console.print(f"stage: {manifest.get('stage')} key {manifest.get('stage_key')} version {manifest.get('stage_version')}; created {manifest.get('created')}; guidedrl {manifest.get('package_version')}")
    console.print("schema:")
    for field in data.schema:
        console.print(f"  {field.name}: {field.type}{'' if field.nullable else ' (not null)'}", highlight=False)
    console.print("summary:")
    console.print_json(json.dumps(manifest.get("summary", {})))
    console.print("inputs:")
    console.print_json(json.dumps(manifest.get("inputs", {})))
    with pl.Config(fmt_str_lengths=40, tbl_cols=12, tbl_width_chars=console.width):
        print(pl.from_arrow(head))


@datasets_app.command("export")
def datasets_export(
    path: Path = typer.Argument(..., help="A dataset directory, e.g. <workspace>/store/curate/<key>/problems or .../materialize/<key>/dpo."),
    to: str = typer.Option(..., "--to", help="verl (RL data from problems), trl (dpo, sft, problems), openrlhf (dpo, sft, problems), "
                           "hf (any dataset: a directory datasets.load_dataset reads with named splits)."),
    dest: str = typer.Argument(..., help="A new directory to write the export to, or a URL (s3://bucket/prefix: written here, then "
                               "uploaded, its card last)."),
    guidance: list[Path] = typer.Option([], "--guidance", help="verl: an explain stage's `explanations`, or the `hints`, `prefixed` "
                                        "or `self_hints` of a hint, prefix or self_hint stage; each problem's selected explanation or the "
                                        "guidance shown goes into extra_info, guidance_kind naming it (repeatable)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="The policy's tokenizer directory: where it has a chat template, "
                                             "dpo and sft prompts (stored rendered) go out as conversations (trl; verl sft needs it)."),
    force: bool = typer.Option(False, "--force", help="Replace DEST if it exists."),
):
    """Write a dataset in the layout another trainer reads as it is (verl, TRL, OpenRLHF, Hugging Face), with a card."""
    import shlex
    import sys

    from tasks.core.export import ExportError, export

    import tempfile

    from tasks.core.share import is_url, upload_dir

    command = "guidedrl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if is_url(dest):
            with tempfile.TemporaryDirectory(prefix="guidedrl-export-") as tmp:
                record = export(path, to, Path(tmp) / "export", guidance=guidance, tokenizer=tokenizer, command=command)
                upload_dir(Path(tmp) / "export", dest, last="README.md")
        else:
            record = export(path, to, Path(dest), guidance=guidance, tokenizer=tokenizer, force=force, command=command)
    except (ExportError, *user_errors()) as exc:
        fail(str(exc))
    files = ", ".join(f"{f['path']} ({f['rows']} rows)" for f in record["files"].values())
    rewards = "".join(f"; guidedrl's rewards for {to}: {dest.rstrip('/')}/{f}" for f in record.get("reward_settings", []))
    console.print(f"exported {path} ({record['source_kind']}) for {to} to {dest}: {files}; card: {dest.rstrip('/')}/README.md{rewards}",
                  soft_wrap=True)
