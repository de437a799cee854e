"""The docs: every command in them runs as written, and the docs are one navigable set.

Every line of a ```bash block in README.md and docs/*.md is a command (continuation lines
joined, comments dropped, ``a && b`` split into ``a`` and ``b``). The commands run in document
order, README first and then the pages in name order, from the repository root of a temporary
copy of the checkout (its files, ``.venv`` linked to this interpreter's environment), so nothing
is written to the checkout. The copy holds a results fixture (tests/test_report.py's matrix with
every status, on layouts of the default config, and its report) and the files the docs name as
the reader's own (PLACEHOLDERS), so that each command also runs alone. Each command's longest matching prefix (in words) decides what happens:

- RUN: cheap commands run for real and must exit with the status listed (check-config,
  findings-table, the gate, reproducers and the report on the fixture, ``snakemake --report``
  once the report exists, cp).
- DRY_RUN: ``.venv/bin/snakemake ...`` gets ``-n``: Snakemake parses the workflow, validates the
  config, expands the grid and plans every job without running one. Commands with
  ``--profile profiles/slurm`` are dry-run too: the executor plugin plans the jobs and their
  resources without calling sbatch, so no cluster is needed.
- SKIPPED: prefix -> why it is not run (setting up, the test suite itself, long benchmarks,
  commands run inside a reproducer folder of a finished run). The options a skipped command
  passes to a script in HELP_CHECKED are checked against its ``--help``.

A command that matches none of the three fails the test: a new command in the docs is either
run here or listed with its reason. Run time: about a minute (six Snakemake dry runs).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_lib.plan.config import config_hash, load
from pipeline_lib.verify.records import MATRIX_SCHEMA, TENSORS_SCHEMA
from tests import procs
from tests.conftest import REPO
from tests.outside import write_hf_folders

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

RUN = {  # prefix -> the exit status it must give in the copy
    "cp": 0,
    # docs/slurm.md: a SLURM_CONF without a cluster (a file in the copy; export alone is a no-op)
    "touch no-slurm.conf": 0,
    "export": 0,
    ".venv/bin/python -m pipeline_lib check-config": 0,
    ".venv/bin/python -m pipeline_lib findings-table": 0,
    # The fixture has cells that broke where the expectations say they pass: regressions.
    ".venv/bin/python -m pipeline_lib gate": 1,
    ".venv/bin/python -m pipeline_lib reproducers": 0,
    ".venv/bin/python -m pipeline_lib report": 0,
    ".venv/bin/snakemake --report": 0,
    # Writes a small checkpoint in torchtitan's layout (plain torch, a few seconds).
    ".venv/bin/python examples/write_torchtitan_checkpoint.py": 0,
    # Writes four tiny Hugging Face folders with transformers' save_pretrained (a few seconds).
    ".venv/bin/python tests/outside/write_hf_folders.py": 0,
}
DRY_RUN = (".venv/bin/snakemake",)
SKIPPED = {
    "bash scripts/setup.sh": "builds or updates .venv, the environment this test runs in (and "
    "with --dev installs Debian packages); CI runs it before the tests (.ci/run)",
    ".venv/bin/python -m pytest": "the test suite itself, which this test is part of; CI runs "
    "the README's command (.ci/run, test_ci_runs_the_quick_start_test_command)",
    ".venv/bin/python bench/benchmark.py": "benchmarks run on purpose, never in the suite (the "
    "matrix three times: about 35 min; the quick ones still minutes and a 1 GB state)",
    ".venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 "
    "examples/torchtitan_train.py": "trains torchtitan's debug models on 2 ranks with the "
    "optional extra (about a minute); tests/test_torchtitan.py runs it",
    ".venv/bin/python -m pipeline_lib.verify.torchtitan_hf": "needs the optional extra and a torchtitan "
    "step folder (examples/torchtitan_train.py); tests/test_torchtitan.py checks both directions",
    "python repro.py": "runs inside a reproducer folder of a finished run "
    "(results/reproducers/<cell>/); tests/test_reproducer.py runs reproducers",
}
HELP_CHECKED = (".venv/bin/python bench/benchmark.py",)
# Files the docs name as the reader's own (or an earlier command of the page writes), created
# in the copy first, so that each command also runs alone (pytest -k).
PLACEHOLDERS = {
    "my-grid.yaml": lambda config: config,
    "my-cluster.yaml": lambda config: {**config, "run": {**config["run"], "gpus_per_node": 4}},
}

CHECKPOINT = "checkpoints/torchtitan-step-2"
HF_FOLDERS = "checkpoints/hf"

FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def commands(text: str) -> list[str]:
    """Every command of the text's bash blocks, as a shell-quoted string."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                found.append(shlex.join(words[:cut]))
                words = words[cut + 1 :]
    return found


def doc_commands() -> list[tuple[str, str]]:
    """(page, command) in document order, each command once."""
    seen: dict[str, str] = {}
    for page in PAGES:
        for command in commands(page.read_text()):
            seen.setdefault(command, page.relative_to(REPO).as_posix())
    return [(page, command) for command, page in seen.items()]


def how(command: str) -> tuple[str, str]:
    """('run' | 'dry-run' | 'skip' | 'unlisted', the prefix that decides it)."""
    words = shlex.split(command)
    listed = [(p, "run") for p in RUN] + [(p, "dry-run") for p in DRY_RUN]
    listed += [(p, "skip") for p in SKIPPED]
    matches = [(len(shlex.split(p)), p, kind) for p, kind in listed
               if words[: len(shlex.split(p))] == shlex.split(p)]  # fmt: skip
    if not matches:
        return "unlisted", ""
    _, prefix, kind = max(matches)
    return kind, prefix


def test_commands_are_found():
    assert commands("```bash\na b \\\n  c  # note\n# only a comment\nd && e 'f g'\n```\n") == [
        "a b c",
        "d",
        "e 'f g'",
    ]
    assert how("bash scripts/setup.sh --dev") == ("skip", "bash scripts/setup.sh")
    assert how(".venv/bin/snakemake --report x.html") == ("run", ".venv/bin/snakemake --report")
    assert how(".venv/bin/snakemake --cores 2") == ("dry-run", ".venv/bin/snakemake")
    assert how("rm -rf results")[0] == "unlisted"


def _fixture(root: Path) -> None:
    """tests/test_report.py's results (every status) on layouts of the default config
    (fsdp2_2 -> fsdp2_4), so that commands naming config.yaml accept them."""
    from tests.test_report import results_tables

    config = load(str(root / "config.yaml"))
    matrix, tensors = (t.to_pandas() for t in results_tables())
    for frame in (matrix, tensors):
        for side in ("save", "load"):
            frame[f"{side}_layout"] = frame[f"{side}_layout"].replace({"fsdp2_2": "fsdp2_4"})
    for side in ("save", "load"):
        four = matrix[f"{side}_layout"] == "fsdp2_4"
        matrix.loc[four, f"{side}_mesh"], matrix.loc[four, f"{side}_world_size"] = "4", 4
    matrix["config_hash"] = config_hash(config)
    (root / "results").mkdir()
    for frame, schema, name in ((matrix, MATRIX_SCHEMA, "matrix"), (tensors, TENSORS_SCHEMA, "tensors")):  # fmt: skip
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        pq.write_table(table, root / "results" / f"{name}.parquet")
    raw = yaml.safe_load((root / "config.yaml").read_text())
    for name, make in PLACEHOLDERS.items():
        (root / name).write_text(yaml.safe_dump(make(raw), sort_keys=False))
    # The checkpoint README's example names (written by an earlier command of the page): a
    # folder with a .metadata is all a dry run's config check needs.
    titan = yaml.safe_load((root / "configs/torchtitan.yaml").read_text())["checkpoints"]
    for folder in [CHECKPOINT, *(entry["path"] for entry in titan.values())]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / ".metadata").write_bytes(b"")
    # Likewise the Hugging Face folders of examples/hf_folder.yaml: a model.safetensors each.
    for folder in write_hf_folders.FOLDERS:
        (root / HF_FOLDERS / folder.name).mkdir(parents=True, exist_ok=True)
        (root / HF_FOLDERS / folder.name / "model.safetensors").write_bytes(b"")
    # The report, which `snakemake --report` embeds (results.md renders it just before).
    from pipeline_lib.cli import main

    main(["report", "--matrix", str(root / "results" / "matrix.parquet"),
          "--tensors", str(root / "results" / "tensors.parquet"),
          "--configfile", str(root / "config.yaml"),
          "--html", str(root / "results" / "report.html"),
          "--markdown", str(root / "results" / "summary.md")])  # fmt: skip


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The checkout's files (no .git, no outputs), .venv linked, the fixture in results/."""
    root = tmp_path_factory.mktemp("docs") / "repo"
    leave_out = {".git", ".venv", "results", ".snakemake", ".torch-envs", ".pytest_cache",
                 "checkpoints"}  # fmt: skip
    shutil.copytree(
        REPO,
        root,
        symlinks=True,
        ignore=lambda folder, names: [
            n for n in names
            if n in {"__pycache__", ".ruff_cache"} or (Path(folder) == REPO and n in leave_out)
        ],
    )  # fmt: skip
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    _fixture(root)
    return root


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return procs.run(
        command, shell=True, executable="/bin/bash", cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_every_command_is_run_or_listed_with_why_not(copy):
    """A command the docs show is run, dry-run, or named in SKIPPED with the reason it is not
    run (a benchmark's options are still checked against its --help)."""
    for page, command in doc_commands():
        kind, prefix = how(command)
        assert kind != "unlisted", (
            f"{page}: `{command}` is in none of RUN, DRY_RUN, SKIPPED (tests/test_docs.py): run "
            "it there or list why not"
        )
        if kind == "skip" and prefix in HELP_CHECKED:
            usage = _run(f"{prefix} --help", copy)
            assert usage.returncode == 0, usage.stderr
            for option in (w for w in shlex.split(command) if w.startswith("--")):
                assert option in usage.stdout, f"{page}: `{command}`: {prefix} has no {option}"


RUN_OR_DRY_RUN = [(p, c) for p, c in doc_commands() if how(c)[0] in ("run", "dry-run")]


@pytest.mark.parametrize(("page", "command"), RUN_OR_DRY_RUN, ids=lambda v: v)
def test_command_runs_as_written(copy, page, command):
    kind, prefix = how(command)
    proc = _run(command + (" -n" if kind == "dry-run" else ""), copy)
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    if kind == "dry-run":
        assert proc.returncode == 0, f"{page}: `{command} -n` failed:\n{out}"
        planned = ("This was a dry-run", "Nothing to be done")
        assert any(word in proc.stdout + proc.stderr for word in planned), out
    else:
        assert proc.returncode == RUN[prefix], f"{page}: `{command}`: exit {proc.returncode}\n{out}"
    if command.startswith(".venv/bin/python -m pipeline_lib findings-table"):
        assert (copy / "docs" / "findings.md").read_text() == (
            REPO / "docs" / "findings.md"
        ).read_text(), "the findings table differs from the expectations files"


# --- the README and the pages --------------------------------------------------------------
QUICK_START = """\
```bash
# 1. set up (.venv with pinned packages) and run the default matrix
bash scripts/setup.sh && .venv/bin/snakemake --cores 2
# 2. set up the test tools and run the tests
bash scripts/setup.sh --dev && .venv/bin/python -m pytest -ra
```
"""


def test_readme_opens_with_the_quick_start():
    readme = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (.+)$", readme, re.M)
    assert sections[0] == "Quick start"
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert QUICK_START in quick
    assert len(readme.splitlines()) < 150


def test_ci_runs_the_quick_start_test_command():
    test_command = QUICK_START.splitlines()[4]
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_first_config_is_config_yaml():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## A first config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (REPO / "config.yaml").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_and_anchors_resolve():
    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                bad.append(f"{page.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    bad.append(f"{page.name}: {target}: no such heading")
    assert not bad, "\n".join(bad)


def test_every_page_is_linked_from_the_readme_and_the_index():
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"README.md"}
    for index, prefix in ((REPO / "README.md", "docs/"), (REPO / "docs" / "README.md", "")):
        text = index.read_text()
        missing = [name for name in sorted(pages) if f"]({prefix}{name})" not in text]
        assert not missing, f"{index.relative_to(REPO)} does not link {missing}"


def test_glossary_defines_each_word_once():
    headings = re.findall(r"^### (.+)$", (REPO / "docs" / "glossary.md").read_text(), re.M)
    assert len(headings) == len(set(headings))
    for word in ("Layout", "Variant", "Cell", "Job", "Item", "Unit", "Source", "Version root"):
        assert word in headings


def test_no_tracked_link_leaves_the_checkout():
    """A committed symlink to a folder outside the checkout (a worktree's `.venv-main` once was)
    points at another machine's files in every clone, and a copy of the checkout follows it
    (the docs fixture once copied a 4.4 GB venv and filled CI's disk)."""
    listing = subprocess.run(
        ["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000")]
    outside = [
        link for link in links
        if Path(os.readlink(REPO / link)).is_absolute()
        or not (REPO / link).resolve().is_relative_to(REPO.resolve())
    ]  # fmt: skip
    assert not outside, f"tracked links that leave the checkout: {outside}"
